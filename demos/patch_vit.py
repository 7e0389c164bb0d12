"""Make a timm ViT faster in one line: ToMe merging or any pruning strategy inside the encoder.

    python demos/patch_vit.py --model vit_base_patch16_224 --method tome --r 16
    python demos/patch_vit.py --method divprune --keep 0.5 --layer 6
"""

import argparse
import time

import timm
import torch

import vtok


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16_224", help="a timm ViT name (random weights)")
    p.add_argument("--method", default="tome")
    p.add_argument("--r", type=int, default=8, help="tokens merged per block (tome)")
    p.add_argument("--keep", type=float, default=0.5, help="budget for pruning methods")
    p.add_argument("--layer", type=int, default=None, help="block where pruning methods act (default: middle)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--img", type=int, default=224)
    args = p.parse_args(argv)

    model = timm.create_model(args.model, pretrained=False, img_size=args.img).eval()
    x = torch.randn(args.batch, 3, args.img, args.img)
    with torch.no_grad():
        t = time.perf_counter()
        base = model(x)
        t_base = time.perf_counter() - t
        if args.method == "tome":
            vtok.patch(model, "tome", r=args.r)
        else:
            vtok.patch(model, args.method, keep=args.keep, layers=args.layer)
        t = time.perf_counter()
        out = model(x)
        t_fast = time.perf_counter() - t
    sel = model._vtok_state.selection
    print(f"{args.model} + {args.method}: {sel.n} patch tokens -> {sel.k} at the end; "
          f"one batch {t_base * 1e3:.0f} ms -> {t_fast * 1e3:.0f} ms (single run; see benchmarks/ for ratios)")
    print(f"output shape {tuple(out.shape)}, mean |logit change| {float((out - base).abs().mean()):.3f}")
    vtok.unpatch(model)


if __name__ == "__main__":
    main()
