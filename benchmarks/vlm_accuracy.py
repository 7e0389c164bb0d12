"""Issue #17's yardstick: every strategy on the small VLM trained here — accuracy, prefill speed-up, FastV's question.

Three parts, each resumable (the sweeps skip finished cells; re-run the same command):

1. **Accuracy**: exact match on the first ``--n`` held-out Fashion-MNIST scenes of the wrapped VLM, for the pre-LLM
   grid (``configs/sweeps/vlm_accuracy.yaml``) and the in-LLM grid at layer 2 (``vlm_accuracy_llm.yaml``), beside
   keep = 1.0 (sweep task ``real_vlm``) → ``OUT/accuracy.jsonl``.
2. **Prefill speed**: the same cells timed on ``--timing-scenes`` scenes, paired with the unwrapped model
   (task ``hf_vlm_timing`` on the assembled folder, prompts written to ``OUT/timing/``) → ``OUT/timing.jsonl``.
3. **FastV's claim** ("after layer 2 the LLM barely attends to image tokens"): the attention mass the last prompt
   token puts on the image tokens in every LLM layer, mean over ``--attention-scenes`` scenes, beside the image
   tokens' share of the prompt → ``OUT/attention_mass.json`` and ``.png``.

Then ``vtok report`` tables (markdown + CSV + plots) for both JSONL files.

    python -m benchmarks.vlm_accuracy                          # the table in docs/benchmarks.md (needs `make vlm`)
    python -m benchmarks.vlm_accuracy --n 200 --methods random pool2d fastv --keeps 0.25   # a quick look
    python -m benchmarks.vlm_accuracy --vlm clip --n 1000      # the VLM on the real CLIP ViT-B/16 (task real_vlm_clip)

``--vlm fmnist`` (default) is the 64-token VLM (``vtok.bench.vlm``, configs ``vlm_accuracy*.yaml``); ``--vlm clip``
the one on the real CLIP tower (``vtok.bench.vlm_clip``, 196 tokens, configs ``vlm_clip_accuracy*.yaml``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = ROOT / "configs" / "sweeps"
# per bench VLM: its sweep task (= its model name), the module that opens / asks it, its scenes, its two configs
VLMS = {
    "fmnist": {"task": "real_vlm", "bench": "vtok.bench.vlm", "scenes": "vtok.bench.vlm_task",
               "configs": (SWEEPS / "vlm_accuracy.yaml", SWEEPS / "vlm_accuracy_llm.yaml")},
    "clip": {"task": "real_vlm_clip", "bench": "vtok.bench.vlm_clip", "scenes": "vtok.bench.clip_scenes",
             "configs": (SWEEPS / "vlm_clip_accuracy.yaml", SWEEPS / "vlm_clip_accuracy_llm.yaml")},
}
CONFIGS = VLMS["fmnist"]["configs"]


def _rgb(image):
    """A scene as the processor takes it: grey ``[H, W]`` scenes repeated to RGB, RGB ones as they are."""
    from vtok.bench import vlm_task as task

    return task.to_rgb(image) if image.ndim == 2 else image


@torch.no_grad()
def image_attention_mass(model, processor, scenes) -> dict[str, list[float]]:
    """Per LLM layer, the softmax mass the last prompt token puts on the image tokens (heads and scenes averaged),
    from eager attention weights; and the image tokens' share of the prompt (the mass of uniform attention)."""
    from vtok.bench import vlm

    cfg = model.config.text_config
    impl = cfg._attn_implementation
    cfg._attn_implementation = "eager"
    image_id = model.config.image_token_id
    mass, share = None, 0.0
    try:
        for s in scenes:
            text = processor.apply_chat_template(vlm.prompt(s.question), add_generation_prompt=True)
            inputs = processor(images=[_rgb(s.image)], text=[text], return_tensors="pt")
            att = model(**inputs, output_attentions=True).attentions
            img = inputs["input_ids"][0] == image_id
            row = torch.stack([a[0, :, -1, img].sum(-1).mean() for a in att])  # [layers]
            mass = row if mass is None else mass + row
            share += float(img.float().mean())
    finally:
        cfg._attn_implementation = impl
    return {"image_attention_mass": (mass / len(scenes)).tolist(), "image_token_share": share / len(scenes)}


def plot_attention_mass(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = res["image_attention_mass"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(len(m)), m, marker="o", ms=3, label="last prompt token → image tokens")
    ax.axhline(res["image_token_share"], color="grey", ls=":", label="image tokens' share of the prompt")
    ax.axvline(2, color="black", lw=0.8, ls="--", label="FastV's K = 2")
    ax.set_xlabel("LLM layer")
    ax.set_ylabel("attention mass on image tokens")
    ax.set_ylim(0, max(max(m), res["image_token_share"]) * 1.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _configs(args) -> list:
    from vtok.sweep import load_config

    spec = VLMS[args.vlm]
    opts = {spec["task"]: {"n": args.n}}
    out = []
    for path in spec["configs"]:
        cfg = load_config(path, models=[args.model], task_options=opts)
        methods = [m for m in cfg.methods if args.methods is None or m in args.methods]
        if methods:
            out.append(load_config(path, models=[args.model], methods=methods, keeps=args.keeps,
                                   task_options=opts))
    return out


def _timing_prompts(processor, scenes, folder: Path) -> Path:
    from PIL import Image

    from vtok.bench import vlm

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, s in enumerate(scenes):
        Image.fromarray(_rgb(s.image)).save(folder / f"scene_{i}.png")
        text = processor.apply_chat_template(vlm.prompt(s.question), add_generation_prompt=True)
        lines.append(json.dumps({"prompt": text, "image": f"scene_{i}.png"}))
    path = folder / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vlm", choices=sorted(VLMS), default="fmnist", help="which bench VLM (see above)")
    ap.add_argument("--model", default=None, help="default: the --vlm's committed weights; or an assembled folder")
    ap.add_argument("--n", type=int, default=2000, help="held-out scenes for accuracy")
    ap.add_argument("--methods", nargs="+", default=None, help="only these methods (default: both configs' lists)")
    ap.add_argument("--keeps", nargs="+", type=float, default=None, help="default: the configs' 0.5 0.25 0.11 0.05")
    ap.add_argument("--timing-scenes", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--attention-scenes", type=int, default=50)
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "vlm_accuracy")
    args = ap.parse_args(argv)

    import importlib

    from vtok.sweep import load_config, run_sweep, write_report

    spec = VLMS[args.vlm]
    bench, task = importlib.import_module(spec["bench"]), importlib.import_module(spec["scenes"])
    args.model = args.model or spec["task"]
    args.out.mkdir(parents=True, exist_ok=True)
    configs = _configs(args)
    for cfg in configs:
        run_sweep(cfg, str(args.out / "accuracy.jsonl"))
    model, processor = bench.open_vlm(args.model)
    folder = bench.VLM_FOLDER if args.model == spec["task"] else Path(args.model)
    if not args.no_timing:
        prompts = _timing_prompts(processor, task.heldout(args.timing_scenes), args.out / "timing")
        for cfg in configs:
            tcfg = load_config({"tasks": ["hf_vlm_timing"], "models": [str(folder)], "methods": cfg.methods,
                                "keeps": cfg.keeps, "placements": cfg.placements,
                                "task_options": {"hf_vlm_timing": {"prompts": str(prompts), "rounds": args.rounds}}})
            run_sweep(tcfg, str(args.out / "timing.jsonl"))
    att_path = args.out / "attention_mass.json"
    att = None
    if att_path.exists():
        att = json.loads(att_path.read_text())
    elif args.attention_scenes > 0:  # 0: no attention-mass figure
        att = image_attention_mass(model, processor, task.heldout(args.attention_scenes))
        att_path.write_text(json.dumps(att, indent=1))
    if att is not None:
        plot_attention_mass(att, args.out / "attention_mass.png")
    reports = {"accuracy": write_report(str(args.out / "accuracy.jsonl"))}
    if not args.no_timing:
        reports["timing"] = write_report(str(args.out / "timing.jsonl"))
    for name, rep in reports.items():
        print(f"## {name}\n\n{rep['markdown']}\n", flush=True)
    if att is not None:
        print("attention mass on image tokens per layer: "
              + ", ".join(f"{v:.3f}" for v in att["image_attention_mass"])
              + f" (image tokens' share {att['image_token_share']:.3f})", flush=True)
    return {"reports": reports, "attention": att}


if __name__ == "__main__":
    main()
