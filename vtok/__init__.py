"""vtok: visual token compression for vision and vision-language models.

    tokens_out, sel = vtok.compress(tokens, "divprune", keep=0.25)
"""

from vtok.api import compress, retained_count
from vtok.budget import resolve_k
from vtok.context import Context
from vtok.hooks.encoders import capture, patch, unpatch
from vtok.pruners import get as get_method
from vtok.pruners import methods, register
from vtok.selection import Selection
from vtok.tokenizers_img import load_tokenizer

__version__ = "0.1.0"
__all__ = ["Context", "Selection", "capture", "compress", "fit_fitprune", "get_method", "load_tokenizer", "methods",
           "patch", "register", "resolve_k", "retained_count", "stats", "unpatch", "unwrap", "wrap", "wrapped",
           "__version__"]

_HF = ("wrap", "unwrap", "wrapped", "stats", "fit_fitprune")


def __getattr__(name: str):
    """``vtok.wrap`` / ``unwrap`` / ``wrapped`` / ``stats`` / ``fit_fitprune`` and ``vtok.bench`` on first use (they
    import transformers and the eval model's dependencies only when asked for)."""
    if name in _HF:  # the VLM wrapper imports transformers only when asked for
        import vtok.hooks.hf as hf

        return getattr(hf, name)
    if name == "bench":
        import importlib

        return importlib.import_module("vtok.bench")
    raise AttributeError(f"module 'vtok' has no attribute {name!r}")
