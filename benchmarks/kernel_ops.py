"""Fused kernels vs the eager reference and vs torch.compile of the reference (GPU).

For each op and shape: median time of the Triton op, the eager reference, and torch.compile(reference); the
speed-ups; achieved bandwidth (bytes the op must read + write, over its time) as a fraction of a measured
device-to-device copy; and extra peak memory above the inputs. Shapes follow LLaVA (576 / 2880 tokens,
D = 1024 / 4096, 32 heads, batch 1 and 16) and video (64 frames × 196 tokens), plus attention-received at
12k keys. Needs a CUDA GPU; ``--quick`` runs tiny shapes on whatever device exists (CPU: reference only).

    python -m benchmarks.kernel_ops            # full table (GPU)
    python -m benchmarks.kernel_ops --quick    # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from vtok.kernels import reference as R


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def bench(fn: Callable[[], object], dev: torch.device, reps: int = 20) -> float:
    """Median seconds per call after warm-up."""
    for _ in range(3):
        fn()
    _sync(dev)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def peak_extra(fn: Callable[[], object], dev: torch.device) -> float:
    """Extra peak memory (MiB) allocated while running ``fn`` (CUDA only; NaN elsewhere)."""
    if dev.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_bandwidth(dev: torch.device) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write)."""
    x = torch.empty(256 * 2**20 // 4, device=dev)
    y = torch.empty_like(x)
    t = bench(lambda: y.copy_(x), dev, reps=10)
    return 2 * x.numel() * 4 / t


def cases(quick: bool, dev: torch.device, dtype: torch.dtype):
    """Yield (op name, shape text, triton fn, reference fn, bytes moved)."""
    from vtok.kernels import triton_attention as ta
    from vtok.kernels import triton_frames as tf
    from vtok.kernels import triton_match as tm
    from vtok.kernels import triton_select as ts

    es = torch.empty((), dtype=dtype).element_size()
    rnd = lambda *s: torch.randn(*s, device=dev, dtype=dtype)  # noqa: E731
    heads, dh = (2, 16) if quick else (32, 128)
    attn_shapes = [(1, 8, 64)] if quick else [(1, 64, 576), (1, 64, 2880), (16, 64, 576), (1, 576, 12288)]
    for b, m, n in attn_shapes:
        q, k = rnd(b, heads, m, dh), rnd(b, heads, n, dh)
        yield ("attention_received", f"B={b} H={heads} M={m} N={n}",
               lambda q=q, k=k: ta.attention_received_triton(q, k), lambda q=q, k=k: R.attention_received(q, k),
               (q.numel() + k.numel()) * es + b * n * 4)
    tok_shapes = [(1, 64, 16)] if quick else [(1, 576, 1024), (1, 2880, 1024), (16, 576, 1024), (1, 576, 4096),
                                               (1, 2880, 4096)]
    for b, n, d in tok_shapes:
        x = rnd(b, n, d)
        a, bb = x[:, ::2], x[:, 1::2]
        yield ("cosine_argmax", f"B={b} N={n} D={d}", lambda a=a, bb=bb: tm.cosine_argmax_triton(a, bb),
               lambda a=a, bb=bb: R.cosine_argmax(a, bb), x.numel() * es + b * n // 2 * 12)
        kk = max(1, n // 10)
        yield ("farthest_point", f"B={b} N={n} D={d} k={kk}", lambda x=x, kk=kk: ts.farthest_point_triton(x, kk),
               lambda x=x, kk=kk: R.farthest_point(x, kk), x.numel() * es * kk)
        s = torch.randn(b, n, device=dev)
        yield ("topk_gather", f"B={b} N={n} D={d} k={n // 4}",
               lambda x=x, s=s, n=n: ts.topk_gather_triton(x, s, n // 4),
               lambda x=x, s=s, n=n: R.topk_gather(x, s, n // 4),
               b * n * 4 + 2 * b * (n // 4) * d * es)
        c = x[:, : max(1, n // 8)].contiguous()
        yield ("kmeans_assign", f"B={b} N={n} D={d} C={c.shape[1]}", lambda x=x, c=c: tm.kmeans_assign_triton(x, c),
               lambda x=x, c=c: R.kmeans_assign(x, c), (x.numel() + c.numel()) * es + b * n * 12)
    vid = [(1, 4, 16, 16)] if quick else [(1, 64, 196, 1024), (1, 64, 196, 4096)]
    for b, t, p, d in vid:
        v = rnd(b, t * p, d)
        yield ("segment_stats", f"B={b} T={t} P={p} D={d}", lambda v=v, t=t: tf.segment_stats_triton(v, t),
               lambda v=v, t=t: R.segment_stats(v, t), v.numel() * es + b * t * (d + p) * 4)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "fp16", "bf16"])
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    gpu = dev.type == "cuda"
    name = torch.cuda.get_device_name() if gpu else "CPU (no GPU: reference only, no Triton timings)"
    print(f"# kernels benchmark on {name}, dtype {args.dtype}")
    bw = copy_bandwidth(dev) if gpu else float("nan")
    if gpu:
        print(f"device-to-device copy: {bw / 1e9:.0f} GB/s")
    print("| op | shape | triton ms | eager ms | compile ms | vs eager | vs compile | % copy BW | extra MiB "
          "triton / eager |")
    print("|---|---|---|---|---|---|---|---|---|")
    for op, shape, fused, refn, nbytes in cases(args.quick, dev, dtype):
        t_ref = bench(refn, dev, 3 if args.quick else 10)
        if not gpu:
            print(f"| {op} | {shape} | - | {t_ref * 1e3:.3f} | - | - | - | - | - |")
            continue
        compiled = torch.compile(refn)
        t_cmp = bench(compiled, dev)
        t_fused = bench(fused, dev)
        mem_f, mem_r = peak_extra(fused, dev), peak_extra(refn, dev)
        print(f"| {op} | {shape} | {t_fused * 1e3:.3f} | {t_ref * 1e3:.3f} | {t_cmp * 1e3:.3f} | "
              f"{t_ref / t_fused:.1f}x | {t_cmp / t_fused:.1f}x | {100 * nbytes / t_fused / bw:.0f}% | "
              f"{mem_f:.1f} / {mem_r:.1f} |")


if __name__ == "__main__":
    main()
