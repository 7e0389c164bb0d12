"""Cost of every registered strategy on the CPU, as ratios measured in the same run.

For each N, every method reduces ``[1, N, D]`` tokens to ``keep * N`` (the strategy call and ``Selection.apply``,
as ``vtok.compress`` runs them; the context comes from ``vtok.bench.synthetic.example_context`` and is generated
outside the timed call). Reported per method:

* the ratio of its median time to the median time of ``random`` on the same input, and
* the ratio to one timm ViT-B/16 block forward (dim 768, 12 heads, mlp_ratio 4, eval, no_grad) on ``[1, N, 768]``,

both measured in the same run. Samples of all entries are taken round-robin and cheap calls are looped (see
:class:`Timer`), so that load from elsewhere on the machine shifts all entries alike. Absolute times on a shared,
noisy CPU mean little; the ratios are the numbers to compare.

Peak extra memory (``--no-memory`` skips it) is measured in a child process (:func:`peak_extra_memory`): the growth
of its resident set during one call (after a warm-up call), read from the kernel's high-water mark ``VmHWM`` reset
right before the call (``/proc/self/clear_refs``), with glibc's ``MALLOC_MMAP_THRESHOLD_=65536`` so that every
allocation of 64 KiB or more is its own mapping, returned to the system when freed: the number is the most memory
the call's tensors (inputs and context excluded, its output included) held at once, to the page. Linux only.

    python -m benchmarks.strategies                 # N in {576, 2880}, D = 1024, keep = 0.25
    python -m benchmarks.strategies --quick         # tiny smoke run (N = 64)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import vtok
from vtok.bench.synthetic import example_context
from vtok.context import Context

VIT = "(ViT-B/16 block)"


def fmt(x: float) -> str:
    """3 significant digits without exponents: 0.00123, 1.5, 12.3, 1234."""
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Timer:
    """Times one callable like ``timeit``'s autorange: after ``warmup`` untimed calls, one sample is the mean time of
    ``number`` back-to-back calls, ``number`` chosen so a sample lasts at least ``min_sample_s`` (cheap calls are
    looped instead of being timed one by one at the clock's and the scheduler's resolution)."""

    def __init__(self, fn: Callable[[], object], *, warmup: int, min_sample_s: float) -> None:
        self.fn = fn
        for _ in range(warmup):
            fn()
        t0 = time.perf_counter()
        fn()
        once = time.perf_counter() - t0
        self.number = max(1, min(100_000, math.ceil(min_sample_s / max(once, 1e-9))))
        self.samples: list[float] = []
        self.spent = 0.0

    def sample(self) -> None:
        t0 = time.perf_counter()
        for _ in range(self.number):
            self.fn()
        dt = time.perf_counter() - t0
        self.spent += dt
        self.samples.append(dt / self.number)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def measure(timers: dict[str, Timer], *, repeats: int, budget_s: float) -> dict[str, float]:
    """Median seconds per call of each timer. Samples are taken round-robin (one sample of every entry per round),
    so a burst of load from elsewhere on the machine hits all entries alike instead of one method; an entry stops
    sampling once it has at least ``min(3, repeats)`` samples and has spent ``budget_s`` seconds."""
    for _ in range(repeats):
        for t in timers.values():
            if len(t.samples) >= min(3, repeats) and t.spent > budget_s:
                continue
            t.sample()
    return {name: t.median for name, t in timers.items()}


def vit_block_call(n: int) -> Callable[[], object]:
    from timm.models.vision_transformer import Block

    torch.manual_seed(0)
    block = Block(dim=768, num_heads=12, mlp_ratio=4).eval()
    x = torch.randn(1, n, 768)

    def run() -> None:
        with torch.no_grad():
            block(x)

    return run


def method_call(name: str, tokens: torch.Tensor, k: int) -> Callable[[], object]:
    """The strategy and the reduction it implies (``Selection.apply``), as ``vtok.compress`` runs them; the context
    is generated and validated here, outside the timed call."""
    m = vtok.get_method(name)
    ctx = Context.build(tokens, example_context(m, tokens, seed=0))

    def run() -> None:
        with torch.no_grad():
            m.fn(tokens, k, ctx).apply(tokens, weights=ctx.get("sizes"))

    return run


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure_memory_child(spec: dict) -> dict[str, float]:
    """In the child process: peak resident-set growth (MiB) of one call per (N, method), after a warm-up call."""
    torch.set_num_threads(spec["threads"])
    out: dict[str, float] = {}
    for n in spec["n"]:
        tokens = torch.randn(1, n, spec["dim"], generator=torch.Generator().manual_seed(0))
        k = vtok.resolve_k(spec["keep"], n)
        for name in spec["methods"]:
            try:
                call = method_call(name, tokens, k)
                call()
            except Exception:  # reported as an error in the timing table
                continue
            before = _proc_status_kib("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current resident set
            call()
            out[f"{n}:{name}"] = max(0, _proc_status_kib("VmHWM") - before) / 1024
    return out


def peak_extra_memory(args: argparse.Namespace, names: list[str]) -> dict[str, float]:
    """``{"N:method": MiB}`` from a child process (see the module docstring); empty where it cannot be measured."""
    if not os.path.exists("/proc/self/clear_refs"):
        return {}
    spec = {"n": args.n, "dim": args.dim, "keep": args.keep, "threads": args.threads, "methods": names}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    try:
        res = subprocess.run([sys.executable, "-m", "benchmarks.strategies", "--memory-child", json.dumps(spec)],
                             env=env, cwd=Path(__file__).resolve().parents[1],
                             capture_output=True, text=True, check=True)
    except (subprocess.CalledProcessError, OSError) as e:
        print(f"peak memory not measured: {e}", file=sys.stderr)
        return {}
    return json.loads(res.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=None, help="token counts N (default 576 2880)")
    p.add_argument("--dim", type=int, default=None, help="token dimension D (default 1024)")
    p.add_argument("--keep", type=float, default=0.25, help="kept fraction (default 0.25)")
    p.add_argument("--repeats", type=int, default=None, help="timed samples per entry, median reported (default 7)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 2)")
    p.add_argument("--min-sample", type=float, default=None,
                   help="seconds one sample lasts at least; cheap calls are looped (default 0.2)")
    p.add_argument("--budget", type=float, default=20.0,
                   help="stop sampling an entry after this many seconds (once it has 3 samples)")
    p.add_argument("--methods", nargs="+", default=None, help="only these methods (default: all registered)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the machine's cores)")
    p.add_argument("--quick", action="store_true", help="tiny run for smoke tests: N = 64, D = 64, 2 repeats")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-extra-memory column")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.n = args.n or ([64] if args.quick else [576, 2880])
    args.dim = args.dim or (64 if args.quick else 1024)
    args.repeats = args.repeats or (2 if args.quick else 7)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.min_sample = args.min_sample if args.min_sample is not None else (0.01 if args.quick else 0.2)
    args.threads = args.threads or cpu_count()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_child is not None:
        print(json.dumps(_measure_memory_child(json.loads(args.memory_child))))
        return 0
    torch.set_num_threads(args.threads)
    names = args.methods or [m.name for m in vtok.methods()]
    if "random" not in names:
        names = ["random", *names]
    command = " ".join(["python", "-m", "benchmarks.strategies", *map(shlex.quote, sys.argv[1:] if argv is None
                                                                        else argv)])
    print(f"command: `{command}`")
    print(f"torch {torch.__version__}, {args.threads} threads, D = {args.dim}, keep = {args.keep}, batch 1, "
          f"median of up to {args.repeats} samples (each >= {args.min_sample} s of back-to-back calls) after "
          f"{args.warmup} warm-up calls, sampled round-robin\n")
    memory = {} if args.no_memory else peak_extra_memory(args, names)

    def mib(n: int, name: str) -> str:
        v = memory.get(f"{n}:{name}")
        return "" if v is None else f"{v:.1f}"

    rows = []
    for n in args.n:
        tokens = torch.randn(1, n, args.dim, generator=torch.Generator().manual_seed(0))
        k = vtok.resolve_k(args.keep, n)
        timers: dict[str, Timer] = {}
        errors: dict[str, str] = {}
        timers[VIT] = Timer(vit_block_call(n), warmup=args.warmup, min_sample_s=args.min_sample)
        for name in names:
            try:
                timers[name] = Timer(method_call(name, tokens, k), warmup=args.warmup, min_sample_s=args.min_sample)
            except Exception as e:  # a broken method is reported, not fatal
                errors[name] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
        times: dict[str, float | str] = {**measure(timers, repeats=args.repeats, budget_s=args.budget), **errors}
        vit = times.pop(VIT)
        base = times["random"]
        for name in names:
            t = times[name]
            m = vtok.get_method(name)
            if isinstance(t, str):
                rows.append((name, m.family, n, t, "", "", ""))
            else:
                vs_random = fmt(t / base) if isinstance(base, float) else "n/a"
                rows.append((name, m.family, n, vs_random, fmt(t / vit), fmt(t * 1e3), mib(n, name)))
        rows.append((VIT, "", n, fmt(vit / base) if isinstance(base, float) else "n/a", "1", fmt(vit * 1e3), ""))
    print("| method | family | N | time / random | time / ViT-B block | ms (this run) | peak extra MiB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
