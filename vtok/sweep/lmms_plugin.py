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
parsing, generation and scoring can be used and tested without it).

``loglikelihood`` (lmms-eval's ``loglikelihood`` and ``multiple_choice`` tasks) scores the continuation where the
answer goes, after the prompt of the context (the chat template's assistant header), as generation would reach it:
the prompt is prefilled (and pruned) alone, the continuation follows on its cache. It returns the continuation's
*loss* (summed negative log-likelihood; lmms-eval picks the choice of lowest value). lmms-eval 0.7.3 stringifies
plain ``(loss, greedy)`` pairs, so they come wrapped in its ``GenerationResult`` (``as_response``); its response
cache (``--use_cache``) does not take them. ``make test-lmms`` runs a generation and a multiple-choice task
(``configs/lmms/``) through the real lmms-eval on the small VLM.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import vtok
from vtok.sweep.config import _check_keep

try:  # lmms-eval is optional: the class works (and is tested) without it
    from lmms_eval.api.model import lmms as _Base

    HAVE_LMMS_EVAL = True
except ImportError:  # pragma: no cover - depends on the environment
    _Base = object
    HAVE_LMMS_EVAL = False
try:  # lmms-eval >= 0.7.3: its evaluator passes every response through ``unwrap_generation_output``
    from lmms_eval.api.instance import GenerationResult
except ImportError:  # pragma: no cover - depends on the environment
    GenerationResult = None

if TYPE_CHECKING:
    from torch import Tensor

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


def continuation_ids(tokenizer, prompt: str, continuation: str) -> list[int]:
    """Token ids of ``continuation`` as it follows ``prompt``: the tail of ``tokenize(prompt + continuation)`` past
    ``tokenize(prompt)`` when that is its prefix (as lm-eval splits them), else ``continuation`` tokenized alone."""
    whole = tokenizer(prompt + continuation)["input_ids"]
    head = tokenizer(prompt)["input_ids"]
    if whole[:len(head)] == head:
        return list(whole[len(head):])
    return list(tokenizer(continuation, add_special_tokens=False)["input_ids"])


def continuation_loss(logits: Tensor, cont: Tensor) -> tuple[float, bool]:
    """``(loss, greedy)`` of ``cont`` ``[1, m]`` under ``logits`` ``[1, m, V]`` (the positions that predict it):
    its summed negative log-likelihood, and whether every token is the argmax."""
    logp = logits.float().log_softmax(-1).gather(-1, cont[..., None])[..., 0]
    return float(-logp.sum()), bool((logits.argmax(-1) == cont).all())


def as_response(loss: float, greedy: bool) -> Any:
    """One ``loglikelihood`` response. lmms-eval 0.7.3's evaluator sends every response through
    ``unwrap_generation_output``, which turns a ``(float, bool)`` tuple into its ``str`` (so multiple-choice scoring
    fails); a ``GenerationResult`` reaches the task as its ``.text``, here the pair itself. Without lmms-eval (or
    without ``GenerationResult``) the plain pair."""
    pair = (loss, greedy)
    return pair if GenerationResult is None else GenerationResult(text=pair)


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

    def _inputs(self, context: str, visuals: list, text: str | None = None) -> dict:
        """The processor's tensors of ``text`` (default: the prompt of ``context``) with ``visuals``."""
        text = self.prompt(context, len(visuals)) if text is None else text
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

    def loglikelihood_inputs(self, context: str, continuation: str, visuals: list) -> tuple[dict, Tensor]:
        """``(inputs, cont)``: the processor's tensors of the prompt of ``context`` (ending with the chat template's
        assistant header, or ``prompt_template``), and the continuation's tokens ``cont`` ``[1, m]`` that follow it,
        where the answer goes."""
        import torch

        prompt = self.prompt(context, len(visuals))
        ids = continuation_ids(getattr(self.processor, "tokenizer", self.processor), prompt, continuation)
        if not ids:
            raise ValueError(f"vtok_hf loglikelihood: continuation {continuation!r} has no tokens")
        return self._inputs(context, visuals, prompt), torch.tensor([ids], dtype=torch.long, device=self.device)

    def continuation_logits(self, inputs: dict, cont: Tensor) -> Tensor:
        """Logits ``[1, m, V]`` predicting ``cont`` ``[1, m]`` after the prompt ``inputs``, as generation reaches
        them: the prompt's prefill (where vtok prunes, the continuation unseen, so every choice sees the same kept
        tokens), then the continuation as one step on its cache."""
        import torch

        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(inputs["input_ids"])
        # transformers 5 names the cache ``cache``, 4.x ``past_key_values`` (argument and output alike)
        name = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        with torch.no_grad():
            first = self.model(**inputs, use_cache=True)
            mask = torch.cat([mask, torch.ones_like(cont).to(mask)], dim=1)
            rest = self.model(input_ids=cont, attention_mask=mask, use_cache=True, **{name: first.get(name)})
        return torch.cat([first.logits[:, -1:], rest.logits[:, :-1]], dim=1).float()

    def loglikelihood(self, requests) -> list:
        """``(loss, greedy)`` per request: ``loss`` is the continuation's negative log-likelihood (summed over its
        tokens; lmms-eval picks the choice of *lowest* value, as its own models return a loss), ``greedy`` whether
        greedy decoding produces it. With lmms-eval installed each pair comes wrapped (``as_response``)."""
        out = []
        for req in requests:
            inputs, cont = self.loglikelihood_inputs(*self._loglikelihood_args(req.args))
            out.append(as_response(*continuation_loss(self.continuation_logits(inputs, cont), cont)))
        return out

    def _loglikelihood_args(self, args: tuple) -> tuple[str, str, list]:
        """``(context, continuation, visuals)`` of a request: lmms-eval's 6-tuple (the continuation a string or its
        task's ``doc_to_target``), or the 2-tuple ``(context, continuation)`` of its unconditional requests."""
        if len(args) == 2:
            return args[0], args[1], []
        context, continuation, doc_to_visual, doc_id, task, split = args
        if callable(continuation):
            continuation = continuation(self.task_dict[task][split][doc_id])
        return context, str(continuation), self._visuals(doc_to_visual, doc_id, task, split)

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("vtok_hf: multi-round generation is not supported")


def manifest():
    """The ``lmms_eval.models`` entry point: lmms-eval's ``ModelManifest`` for ``vtok_hf``."""
    try:
        from lmms_eval.models.registry_v2 import ModelManifest
    except ImportError:
        raise ImportError("the vtok_hf lmms-eval model needs lmms-eval: pip install 'vtok[lmms]'") from None
    return ModelManifest(model_id=MODEL_ID, simple_class_path="vtok.sweep.lmms_plugin.VtokHF", aliases=("vtok",))
