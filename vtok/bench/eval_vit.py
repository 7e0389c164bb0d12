"""The evaluation ViT: a small timm ViT trained in this project on Fashion-MNIST.

No pretrained ViT can be downloaded here, so vtok measures what each strategy costs in accuracy on its own
model: 28×28 images upsampled to 56×56 and cut into 4×4 patches → 14×14 = 196 patch tokens + CLS, like
ViT-B/16 at 224. Width 256, depth 8, 4 heads → 6.4 M parameters. Trained by ``scripts/train/train_eval_vit.py`` in
three stages (``make eval-vit``: 4 epochs mostly at 28×28, then 56×56; see docs/benchmarks.md).

The classifier mean-pools the patch tokens (timm ``global_pool="avg"``), so pruning *after* the encoder — the head
sees only the kept tokens, as an LLM does in a VLM — changes its output. The CLS token is kept and trained too (the
training loss also classifies from it through the same head), so CLS-attention strategies score with a CLS token
that carries class information, as in CLIP.
"""

from __future__ import annotations

import json
from pathlib import Path

from timm.models.vision_transformer import VisionTransformer

EVAL_VIT_CONFIG = dict(img_size=56, patch_size=4, in_chans=1, num_classes=10, embed_dim=256, depth=8,
                       num_heads=4, mlp_ratio=4.0, class_token=True, global_pool="avg")
CHECKPOINT = Path(__file__).with_name("checkpoints") / "eval_vit_fmnist.safetensors"


def build_eval_vit(**overrides) -> VisionTransformer:
    """The eval ViT architecture with random weights (``overrides`` change config entries)."""
    cfg = {**EVAL_VIT_CONFIG, **overrides}
    return VisionTransformer(**cfg)


def save_eval_vit(model: VisionTransformer, path: str | Path, meta: dict | None = None) -> None:
    """Weights as fp16 safetensors (12.8 MB, under the 20 MB budget) plus the config and ``meta`` (e.g. test
    accuracy) as JSON metadata. Accuracy in ``meta`` should be measured on the fp16-rounded weights."""
    from safetensors.torch import save_file

    cfg = {k: v for k, v in EVAL_VIT_CONFIG.items()}
    cfg.update({"embed_dim": model.embed_dim, "depth": len(model.blocks), "num_heads": model.blocks[0].attn.num_heads})
    state = {k: v.detach().half().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"config": json.dumps(cfg), "meta": json.dumps(meta or {})})


def load_eval_vit(path: str | Path | None = None) -> VisionTransformer:
    """Load the committed eval ViT (or ``path``), in eval mode. Raises ``FileNotFoundError`` with the command
    that trains it when the checkpoint is missing."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path) if path is not None else CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"no eval ViT checkpoint at {path}; train one with "
                                "`python -m scripts.train.train_eval_vit` (see docs/benchmarks.md)")
    with safe_open(str(path), "pt") as f:
        cfg = json.loads(f.metadata()["config"])
    model = VisionTransformer(**cfg)
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.eval()


def checkpoint_meta(path: str | Path | None = None) -> dict:
    """The JSON metadata stored with a checkpoint (test accuracy, steps, seed, ...)."""
    from safetensors import safe_open

    with safe_open(str(Path(path) if path is not None else CHECKPOINT), "pt") as f:
        return json.loads(f.metadata().get("meta", "{}"))
