"""An lmms-eval model that loads a Hugging Face VLM and prunes its visual tokens with ``vtok.wrap``.

Installed with vtok as the ``lmms_eval.models`` entry point ``vtok_hf`` (``manifest``); lmms-eval itself is an
optional extra (``pip install 'vtok[lmms]'``). For users with GPUs and real checkpoints::

    lmms-eval --model vtok_hf --tasks mme \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=divprune,keep=0.25,device=cuda,dtype=float16

``model_args``: ``pretrained`` (a folder or hub id ``from_pretrained`` loads), ``method`` (a registered strategy,
or ``none``), ``keep`` (ratio in (0, 1] or int count), ``layer`` (``none``/``pre_llm`` or an LLM layer index),
``positions`` (``original`` / ``reindex``), ``device``, ``dtype``, ``max_new_tokens``, ``prompt_template`` (used
when the processor has no chat template; ``{images}`` and ``{context}`` are filled in), and any option of the method.
The class derives from lmms-eval's ``lmms`` base when lmms-eval is importable, else from ``object`` (so argument
parsing and generation can be used and tested without it).
"""

from __future__ import annotations

from typing import Any

import vtok
from vtok.sweep.config import _check_keep

try:  # lmms-eval is optional: the class works (and is tested) without it
    from lmms_eval.api.model import lmms as _Base

    HAVE_LMMS_EVAL = True
except ImportError:  # pragma: no cover - depends on the environment
    _Base = object
    HAVE_LMMS_EVAL = False

MODEL_ID = "vtok_hf"
ARGS = ("pretrained", "method", "keep", "layer", "positions", "device", "dtype", "max_new_tokens", "prompt_template",
        "batch_size")


def _scalar(value: str) -> Any:
    """A ``model_args`` value as lmms-eval reads it: true / false, an int, a float, else the string."""
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    if value.isdigit():
        return int(value)
    try:
        return float(value)
    except ValueError:
        return value


def parse_model_args(arg_string: str) -> dict[str, Any]:
    """``"pretrained=PATH,method=divprune,keep=0.25"`` -> ``{"pretrained": "PATH", "method": "divprune", ...}``."""
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in arg_string.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"model_args: expected KEY=VALUE, got {item!r}")
        out[key.strip()] = _scalar(value.strip())
    return out


def check_args(method: str, keep: Any, layer: Any) -> tuple[str, float | int, int | None]:
    """Validated ``(method, keep, layer)``; a bad one raises ``ValueError`` naming the argument."""
    method = str(method)
    if method != "none" and method not in {m.name for m in vtok.methods()}:
        raise ValueError(f"model_args method: unknown method {method!r}; use 'none' or one of "
                         f"{[m.name for m in vtok.methods()]}")
    try:
        keep = _check_keep(keep)
    except ValueError as e:
        raise ValueError(f"model_args keep: {e}") from None
    if layer is None or (isinstance(layer, str) and layer.lower() in ("none", "pre_llm", "")):
        layer = None
    elif isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"model_args layer: expected none / pre_llm or an LLM layer index >= 0, got {layer!r}")
    return method, keep, layer


class VtokHF(_Base):
    """lmms-eval ``simple`` model: an HF VLM, wrapped by ``vtok.wrap(model, method, keep, layer=...)``."""

    def __init__(self, pretrained: str, method: str = "none", keep: float | int = 1.0, layer: Any = None,
                 positions: str | None = None, device: str = "cpu", dtype: str = "float32", max_new_tokens: int = 64,
                 prompt_template: str = "USER: {images}{context} ASSISTANT:", batch_size: int = 1,
                 **options: Any) -> None:
        if _Base is not object:
            super().__init__()
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.method, self.keep, self.layer = check_args(method, keep, layer)
        if not hasattr(torch, str(dtype)):
            raise ValueError(f"model_args dtype: {dtype!r} is not a torch dtype name (float32, float16, bfloat16)")
        self.device, self.max_new_tokens, self.prompt_template = device, int(max_new_tokens), prompt_template
        self.batch_size_per_gpu = int(batch_size)
        self.processor = AutoProcessor.from_pretrained(pretrained)
        self.model = AutoModelForImageTextToText.from_pretrained(pretrained, dtype=getattr(torch, dtype))
        self.model.to(device).eval()
        self.task_dict: dict = getattr(self, "task_dict", {})
        if self.method != "none" and self.keep != 1.0:
            vtok.wrap(self.model, self.method, self.keep, layer=self.layer, positions=positions, **options)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> VtokHF:
        """What lmms-eval calls with ``--model_args``."""
        args = parse_model_args(arg_string)
        args.update({k: v for k, v in (additional_config or {}).items() if v is not None and k in ARGS})
        return cls(**args)

    def prompt(self, context: str, n_images: int) -> str:
        """The model's prompt for ``context`` and ``n_images`` images (its chat template when it has one)."""
        proc = self.processor
        if getattr(proc, "chat_template", None):
            content = [{"type": "image"}] * n_images + [{"type": "text", "text": context}]
            return proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        token = getattr(proc, "image_token", "<image>")
        return self.prompt_template.format(images=f"{token} " * n_images, context=context)

    def _inputs(self, context: str, visuals: list) -> dict:
        text = self.prompt(context, len(visuals))
        kw = {"images": visuals} if visuals else {}
        return self.processor(text=[text], return_tensors="pt", **kw).to(self.device)

    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        vis = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        return [v for v in (vis or []) if v is not None]

    def generate_until(self, requests) -> list[str]:
        """Greedy generation per request; ``gen_kwargs``: ``max_new_tokens``, ``until`` (stop strings)."""
        import torch

        out = []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            inputs = self._inputs(context, self._visuals(doc_to_visual, doc_id, task, split))
            n = inputs["input_ids"].shape[1]
            with torch.no_grad():
                ids = self.model.generate(**inputs, do_sample=False,
                                          max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)))
            text = self.processor.batch_decode(ids[:, n:], skip_special_tokens=True)[0]
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop)[0]
            out.append(text)
        return out

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """Log-probability of each continuation after its context (text tokens are never pruned, so the last
        positions of the pruned sequence are the continuation's)."""
        import torch

        out = []
        for req in requests:
            context, continuation, doc_to_visual, doc_id, task, split = req.args
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            whole = self._inputs(context + continuation, visuals)
            n_ctx = self._inputs(context, visuals)["input_ids"].shape[1]
            cont = whole["input_ids"][:, n_ctx:]
            with torch.no_grad():
                logits = self.model(**whole).logits[:, -cont.shape[1] - 1:-1].float()
            logp = logits.log_softmax(-1).gather(-1, cont[..., None])[..., 0]
            out.append((float(logp.sum()), bool((logits.argmax(-1) == cont).all())))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("vtok_hf: multi-round generation is not supported")


def manifest():
    """The ``lmms_eval.models`` entry point: lmms-eval's ``ModelManifest`` for ``vtok_hf``."""
    try:
        from lmms_eval.models.registry_v2 import ModelManifest
    except ImportError:
        raise ImportError("the vtok_hf lmms-eval model needs lmms-eval: pip install 'vtok[lmms]'") from None
    return ModelManifest(model_id=MODEL_ID, simple_class_path="vtok.sweep.lmms_plugin.VtokHF", aliases=("vtok",))
