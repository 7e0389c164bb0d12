"""Ask the small VLM about a held-out scene, with fewer visual tokens, and see which patches it kept.

    python demos/ask_vlm.py              # the VLM on the real CLIP ViT-B/16 (vtok.bench.load_clip_vlm()), scene 0
                                         # (the 64-token one while the CLIP VLM's weights are not committed)
    python demos/ask_vlm.py --scene 7 --methods random,divprune,fastv --keeps 1.0,0.25,0.11
    python demos/ask_vlm.py --vlm fmnist   # the older 64-token VLM (vtok.bench.load_vlm())
    python demos/ask_vlm.py --vlm clip --model outputs/vlm/llava-smollm2-clip   # an assembled folder

For every method × keep: the answer (greedy, through the chat template), the visual tokens kept (of 196 on the CLIP
VLM, 64 on the older one), and the prefill time (median of 3 forward passes, the unwrapped model timed alongside).
``fastv`` runs inside the LLM at layer 2, the others before it. The kept patches are drawn on the scene:
``OUT/vlm_kept_patches.png``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import vtok

IN_LLM = {"fastv": 2, "pdrop": 2, "dart": 2}  # methods that read the LLM: pruned entering layer 2


def _prefill_ms(model, inputs, reps: int = 3) -> float:
    times = []
    with torch.no_grad():
        for _ in range(reps):
            t = time.perf_counter()
            model(**inputs)
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def _kept_patches(model, inputs) -> list[int]:
    """Indices (row-major) of the scene's visual tokens the last call kept."""
    image_id = model.config.image_token_id
    img = (inputs["input_ids"][0] == image_id).nonzero().squeeze(1).tolist()
    kept = set(vtok.stats(model)["per_sample"][0]["kept"])
    return [j for j, pos in enumerate(img) if pos in kept]


def draw(scene: np.ndarray, rows: list[tuple[str, float, list[int], str]], out: Path, patch: int = 14) -> None:
    """One panel per (method, keep): the scene (grey ``[H, W]`` or RGB ``[H, W, 3]``) with dropped patches dimmed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(2.2 * len(rows), 2.6), squeeze=False)
    side = scene.shape[0] // patch
    for ax, (method, keep, kept, ans) in zip(axes[0], rows, strict=True):
        shade = np.full((side, side), 0.35)
        for j in kept:
            shade[j // side, j % side] = 1.0
        mask = np.kron(shade, np.ones((patch, patch)))
        if scene.ndim == 3:
            ax.imshow((scene * mask[..., None]).astype(np.uint8))
        else:
            ax.imshow(scene * mask, cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{method} {keep:g}\n{len(kept)} tok: {ans}", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vlm", choices=("clip", "fmnist"), default=None,
                   help="clip: the VLM on the real CLIP ViT-B/16 (196 tokens); fmnist: the older 64-token one "
                        "(default: clip when its trained weights are committed, else fmnist)")
    p.add_argument("--model", default=None, help="an assembled folder of that VLM (default: the committed one)")
    p.add_argument("--scene", type=int, default=0, help="held-out scene index")
    p.add_argument("--methods", default="random,pool2d,divprune,fastv")
    p.add_argument("--keeps", default="1.0,0.25,0.11")
    p.add_argument("--out", type=Path, default=Path("outputs/demo"))
    args = p.parse_args(argv)

    from vtok.bench import clip_scenes, vlm, vlm_clip
    from vtok.bench import vlm_task as task

    if args.vlm is None:
        args.vlm = "clip" if vlm_clip.CHECKPOINT.exists() else "fmnist"
        print(f"ask_vlm: the {args.vlm} VLM")
    bench, scenes, default = ((vlm_clip, clip_scenes, "real_vlm_clip") if args.vlm == "clip"
                              else (vlm, task, "real_vlm"))
    try:
        model, processor = bench.open_vlm(args.model or default)
    except FileNotFoundError as e:  # no committed weights yet
        print(f"ask_vlm: skipped — {e}")
        return []
    scene = scenes.heldout(1, start=args.scene)[0]
    text = processor.apply_chat_template(vlm.prompt(scene.question), add_generation_prompt=True)
    image = scene.image if scene.image.ndim == 3 else task.to_rgb(scene.image)
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    patch = model.config.vision_config.patch_size
    n_tokens = (scene.image.shape[0] // patch) ** 2
    print(f"scene {args.scene}: {scene.question}  (truth: {scene.answer})")
    base_ms = _prefill_ms(model, inputs)
    results, drawn = [], []
    for method in args.methods.split(","):
        for keep in (float(k) for k in args.keeps.split(",")):
            layer = IN_LLM.get(method)
            layer = None if layer is None else min(layer, model.config.text_config.num_hidden_layers - 1)
            with vtok.wrapped(model, method, keep, layer=layer):
                ans = bench.answer(model, processor, [scene.image], [scene.question])[0].strip()
                ms = _prefill_ms(model, inputs)
                kept = _kept_patches(model, inputs)
            ref_ms = _prefill_ms(model, inputs, reps=1)  # unwrapped, beside it (load drifts)
            results.append({"method": method, "keep": keep, "answer": ans, "kept": len(kept), "prefill_ms": ms,
                            "speedup": (ref_ms + base_ms) / 2 / ms})
            drawn.append((method, keep, kept, ans))
            mark = "✓" if task.exact_match(ans, scene.answer) else "✗"
            print(f"  {method:>9} keep {keep:<4g} {len(kept):>3}/{n_tokens} tokens  prefill {ms:6.1f} ms "
                  f"({results[-1]['speedup']:.2f}× vs unpruned)  answer: {ans!r} {mark}")
    path = args.out / "vlm_kept_patches.png"
    draw(scene.image, drawn, path, patch=patch)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
