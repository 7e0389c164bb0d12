"""Compress the patch tokens of a real photo with any strategy, in a few lines.

    python demos/prune_photo_patches.py --method pool2d --keep 0.25
"""

import argparse

import vtok
from vtok.images import patchify, sample_photo


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="uniform", help="a name from `vtok methods`")
    p.add_argument("--keep", type=float, default=0.25, help="ratio in (0, 1]")
    p.add_argument("--size", type=int, default=224)
    args = p.parse_args(argv)

    image = sample_photo("astronaut", args.size)            # [3, H, W] in [0, 1]
    tokens = patchify(image[None], 16)                       # [1, N, 768]: one token per 16x16 patch
    grid = (args.size // 16, args.size // 16)
    out, sel = vtok.compress(tokens, args.method, keep=args.keep, grid=grid)
    print(f"{args.method}: {tokens.shape[1]} -> {out.shape[1]} tokens; kept indices {sel.keep[0, :8].tolist()} ...")


if __name__ == "__main__":
    main()
