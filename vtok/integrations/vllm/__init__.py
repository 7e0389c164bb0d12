"""vtok's vLLM plugin: pre-LLM visual token pruning inside vLLM, without patching vLLM (docs/vllm.md).

vLLM loads ``register`` from the entry-point group ``vllm.general_plugins`` (pyproject.toml) in every process; it
replaces the architectures ``LlavaForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration`` and
``Qwen3VLForConditionalGeneration`` by subclasses that prune each image's (Qwen2.5-VL: and video's) features with a
vtok method when the model config asks for one, and are vLLM's own classes otherwise. The settings travel in vLLM's
own configuration, ``hf_overrides``::

    LLM(model, hf_overrides={"vtok_method": "divprune", "vtok_keep": 0.25})
    vllm serve MODEL --hf-overrides '{"vtok_method": "divprune", "vtok_keep": 0.25}'

and are checked when the model is built (``settings.read``: unknown method, ``keep`` outside ``(0, 1]``, a method
needing context the plugin cannot supply all fail at startup with the reason).
"""

from __future__ import annotations

from vtok.integrations.vllm.settings import KEYS, Settings, read, supported_methods

ARCHITECTURES = {
    "LlavaForConditionalGeneration": "vtok.integrations.vllm.llava:VtokLlavaForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "vtok.integrations.vllm.qwen2_5_vl:VtokQwen2_5_VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration": "vtok.integrations.vllm.qwen3_vl:VtokQwen3VLForConditionalGeneration",
}

__all__ = ["ARCHITECTURES", "KEYS", "Settings", "read", "register", "supported_methods"]


def register() -> None:
    """vLLM's general-plugin hook: register the pruning-enabled model classes (lazily, by module path)."""
    from vllm import ModelRegistry

    for arch, target in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, target)
