"""Wrap a Hugging Face VLM in one line and compare pruning methods on your own generate() calls.

    python demos/wrap_vlm.py                                   # a small random-weight LLaVA built here
    python demos/wrap_vlm.py --family qwen3_vl                 # or qwen3_vl, gemma3, internvl, smolvlm
    python demos/wrap_vlm.py --model /path/to/llava-1.5-7b-hf  # any local checkpoint folder of a supported family
    python demos/wrap_vlm.py --methods divprune,visionzip --keep 0.25 --fastv-layer 2

``--family`` picks the tiny random-weight checkpoint folder built here (``vtok.hooks.hf.tiny.folders``: the model and
the family's own processor, read back with ``from_pretrained``). Prompts come from the processor's chat template when
it has one (one image and a question per prompt), else LLaVA's ``USER: <image> ... ASSISTANT:`` text.
"""

from __future__ import annotations

import argparse
import inspect
import time

import numpy as np
import torch

import vtok


def photos(size: int) -> list[np.ndarray]:
    """Two real photos shipped with scikit-image (no download)."""
    from skimage import data, transform

    return [(transform.resize(im, (size, size), anti_aliasing=True) * 255).astype(np.uint8)
            for im in (data.astronaut(), data.chelsea())]


QUESTIONS = ["describe the image", "what is in the image ?"]


def prompts(processor) -> list[str]:
    """One prompt per question, each with one image: the processor's chat template, else LLaVA's format."""
    if getattr(processor, "chat_template", None) is None:
        return [f"USER: <image> {q} ASSISTANT:" for q in QUESTIONS]
    return [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                        {"type": "text", "text": q}]}],
                                          add_generation_prompt=True) for q in QUESTIONS]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    from vtok.hooks.hf.tiny.folders import FOLDER_FAMILIES

    p.add_argument("--model", default=None, help="a local checkpoint folder (default: build a tiny random model)")
    p.add_argument("--family", default="llava", choices=FOLDER_FAMILIES, help="the tiny model's family")
    p.add_argument("--out", default=None, help="where the tiny model is built (default: outputs/tiny_<family>)")
    p.add_argument("--image-size", type=int, default=336)
    p.add_argument("--methods", default="random,divprune,visionzip", help="pre-LLM methods, comma-separated")
    p.add_argument("--keep", type=float, default=0.25)
    p.add_argument("--fastv-layer", type=int, default=2, help="also run FastV at this layer (-1: skip)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    args = p.parse_args(argv)

    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = args.model
    if path is None:
        from vtok.hooks.hf.tiny.folders import build_tiny_folder

        out = args.out or f"outputs/tiny_{args.family}"
        opts = {"image_size": args.image_size} if args.family == "llava" else {}
        path = build_tiny_folder(args.family, out, **opts)
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    images = [[im] for im in photos(args.image_size)]  # one image per prompt
    inputs = processor(images=images, text=prompts(processor), return_tensors="pt", padding=True)
    if "token_type_ids" not in inspect.signature(model.forward).parameters:  # a tokenizer's, not the model's input
        inputs.pop("token_type_ids", None)
    n = inputs["input_ids"].shape[1]

    def run():
        t = time.perf_counter()
        with torch.no_grad():
            model(**inputs)
        prefill = time.perf_counter() - t
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        return prefill, out[:, n:]

    run()  # warm-up
    base_t, base = run()
    runs = [(m, None) for m in args.methods.split(",") if m] + ([("fastv", args.fastv_layer)]
                                                                 if args.fastv_layer >= 0 else [])
    print(f"{'method':<10} {'layer':>5} {'visual tokens':>15} {'cut':>8} {'speed-up':>8} {'same tokens':>11}")
    print(f"{'(none)':<10} {'-':>5} {'-':>15} {'-':>8} {'1.00x':>8} {'100%':>11}")
    for method, layer in runs:
        with vtok.wrapped(model, method, args.keep, layer=layer):
            t, out = run()
            st = vtok.stats(model)
        vis = f"{sum(d['visual_before'] for d in st['per_sample'])}→{sum(d['visual_after'] for d in st['per_sample'])}"
        same = (out == base).float().mean().item()
        print(f"{method:<10} {str(layer if layer is not None else 'pre'):>5} {vis:>15} "
              f"{st['prefill_reduction']:>7.0%} {base_t / t:>7.2f}x {same:>10.0%}")
    print("\ngenerated (unpruned):", processor.batch_decode(base, skip_special_tokens=True)[0][:80])
    print("(a random-weight model: agreement and speed are what to read here, not the text)" if args.model is None
          else "")


if __name__ == "__main__":
    main()
