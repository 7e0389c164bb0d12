"""Every GPU figure in one call: kernels, encoder throughput and wrapped-VLM prefill, written to ``--out`` as they come.

A GPU machine is lent only now and then, for ~15 minutes start-up included, so this script is ready before one
appears and one run produces every table. The steps run in this order, each written to ``--out`` (``gpu_all.md`` and
``gpu_all.json``, rewritten atomically after every step) the moment it ends, so a run that is cut off still leaves
the first tables; a step that would not fit the remaining ``--budget-s`` is recorded as skipped:

1. ``env``: the machine (GPU, copy bandwidth), the versions in use against ``requirements/lock.txt``; wheels found in
   ``--wheels`` (default ``.whl``, for packages the GPU image lacks; it has no package index) are installed first
   with ``pip --no-index --no-deps``;
2. ``cuda_tests``: ``pytest -m cuda`` (``tests/kernels/test_kernels_cuda.py``: the Triton kernels against the eager
   reference on the device, the strategies on CUDA against the CPU);
3. ``kernels``: every fused op vs the eager reference vs ``torch.compile`` of it (``benchmarks.kernel_ops``'s cases:
   time, % of the copy bandwidth, extra peak memory), with the kernels' targets checked;
4. ``encoder``: timm ViT-B/16 and ViT-L/16 at batch 64 in fp16: unpatched vs ``tome`` r=16 vs ``divprune`` keep 0.5
   at block 6 (images/s, paired ratios over interleaved rounds);
5. ``prefill``: ``vtok.wrap`` prefill of random LLaVA-shaped models (Llama 32 × 4096 in fp16; 576 image tokens, and
   2,880 as five images) and a Qwen2-VL-shaped one (28 × 3584), unpruned vs ``random`` / ``divprune`` pre-LLM and
   ``fastv`` at K=2, at keep 0.25 and 0.11 (64 of 576 tokens: DART's 2.99× setting).

    python -m benchmarks.gpu_all --out "$OUT" --budget-s 500      # on the GPU machine (its own torch)
    python -m benchmarks.gpu_all --dry-run --out outputs/gpu_all  # CPU, tiny shapes, the Triton interpreter

``--dry-run`` runs the same steps on the CPU with tiny shapes (kernels under ``TRITON_INTERPRET=1``); ``make test``
runs it (``tests/bench/test_gpu_all.py``), so the script cannot rot between loans.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata as md
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCKED = ("torch", "triton", "transformers", "timm", "safetensors", "numpy")

# the kernels' targets (issue #36): name -> (op, shape text, check on (speed-up vs eager, memory ratio, % copy BW))
TARGETS = {
    "attention-received at 12k keys: >= 5x eager, <= 1/10 of its peak memory":
        ("attention_received", "N=12288", lambda sp, mem, bw: sp >= 5 and mem <= 0.1),
    "greedy k-center (N=2880, k=288): >= 10x the reference loop":
        ("farthest_point", "N=2880 D=1024 k=288", lambda sp, mem, bw: sp >= 10),
    "memory-bound ops (top-k + gather, segment stats): >= 60 % of copy bandwidth":
        ("topk_gather|segment_stats", "", lambda sp, mem, bw: bw >= 60),
}


class Run:
    """The steps' results, written to ``out`` after each one (atomically)."""

    def __init__(self, out: Path, budget_s: float, dry_run: bool) -> None:
        self.out, self.dry_run = out, dry_run
        self.deadline = time.monotonic() + budget_s
        self.steps: list[dict] = []
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def step(self, name: str, need_s: float, fn: Callable[[Run], tuple[str, dict]]) -> None:
        if not self.dry_run and self.left() < need_s:
            self.steps.append({"step": name, "status": "skipped", "why": f"{self.left():.0f} s left < {need_s} s"})
        else:
            t0 = time.monotonic()
            try:
                text, data = fn(self)
                self.steps.append({"step": name, "status": "ok", "seconds": round(time.monotonic() - t0, 1),
                                   "markdown": text, "data": data})
            except Exception as e:  # a failed step must not cost the later tables
                self.steps.append({"step": name, "status": "failed", "seconds": round(time.monotonic() - t0, 1),
                                   "error": f"{type(e).__name__}: {e}"})
        self.write()
        last = self.steps[-1]
        print(f"[gpu_all] {name}: {last['status']} {last.get('seconds', '')} {last.get('error', last.get('why', ''))}",
              flush=True)

    def write(self) -> None:
        lines = [f"# vtok GPU figures ({'dry run, CPU' if self.dry_run else 'GPU'})", ""]
        for s in self.steps:
            lines.append(f"## {s['step']} — {s['status']}" + (f" ({s['seconds']} s)" if "seconds" in s else ""))
            lines += ["", s.get("markdown") or s.get("error") or s.get("why", ""), ""]
        for name, text in (("gpu_all.md", "\n".join(lines)), ("gpu_all.json", json.dumps(self.steps, indent=1))):
            tmp = self.out / (name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.out / name)


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def _version(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "missing"


def _locked() -> dict[str, str]:
    out = {}
    lock = ROOT / "requirements" / "lock.txt"
    for line in lock.read_text().splitlines() if lock.exists() else []:
        name, _, ver = line.split(";")[0].strip().partition("==")
        if ver:
            out[name.lower()] = ver.strip()
    return out


# ------------------------------------------------------------------------------------------------ 1. environment
def step_env(run: Run, wheels: Path) -> tuple[str, dict]:
    installed = []
    if wheels.is_dir() and any(wheels.glob("*.whl")):
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", *map(str, wheels.glob("*.whl"))]
        subprocess.run(cmd, check=True, timeout=300)
        installed = sorted(p.name for p in wheels.glob("*.whl"))
    import torch

    from benchmarks.kernel_ops import copy_bandwidth

    dev = _device()
    lock = _locked()
    rows = [(n, _version(n), lock.get(n, "-")) for n in LOCKED]
    gpu = torch.cuda.get_device_name() if dev.type == "cuda" else "none (CPU)"
    bw = copy_bandwidth(dev) if dev.type == "cuda" else float("nan")
    text = [f"GPU: {gpu}; device-to-device copy {bw / 1e9:.0f} GB/s (read + write); python {platform.python_version()}",
            f"wheels installed from the carried folder: {', '.join(installed) or 'none'}", "",
            "| package | in use | lock |", "|---|---|---|", *(f"| {n} | {v} | {lk} |" for n, v, lk in rows)]
    return "\n".join(text), {"gpu": gpu, "copy_bw": bw, "versions": {n: v for n, v, _ in rows},
                             "wheels": installed}


# ------------------------------------------------------------------------------------------------ 2. CUDA tests
def step_tests(run: Run) -> tuple[str, dict]:
    env = dict(os.environ, TRITON_INTERPRET="1" if run.dry_run else "0", VTOK_CUDA_TESTS_ON_CPU="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda",
           "tests/kernels/test_kernels_cuda.py"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=max(60, min(600, run.left() - 30)))
    tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-15:])
    return f"`{' '.join(cmd[2:])}` → exit {res.returncode}\n\n```\n{tail}\n```", {"returncode": res.returncode}


# ------------------------------------------------------------------------------------------------ 3. kernels
def step_kernels(run: Run) -> tuple[str, dict]:
    import torch

    from benchmarks.kernel_ops import bench, cases, copy_bandwidth, peak_extra

    dev = _device()
    gpu = dev.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    bw = copy_bandwidth(dev) if gpu else float("nan")
    rows, lines = [], ["| op | shape | triton ms | eager ms | compile ms | vs eager | vs compile | % copy BW | "
                       "extra MiB triton / eager |", "|---|---|---|---|---|---|---|---|---|"]
    for op, shape, fused, refn, nbytes in cases(run.dry_run, dev, dtype):
        reps = 2 if run.dry_run else 20
        t_ref, t_fused = bench(refn, dev, reps), bench(fused, dev, reps)
        t_cmp = bench(torch.compile(refn), dev, reps) if gpu else float("nan")
        mem_f, mem_r = peak_extra(fused, dev), peak_extra(refn, dev)
        pct = 100 * nbytes / t_fused / bw if gpu else float("nan")
        rows.append({"op": op, "shape": shape, "triton_ms": t_fused * 1e3, "eager_ms": t_ref * 1e3,
                     "compile_ms": t_cmp * 1e3, "speedup": t_ref / t_fused, "speedup_compile": t_cmp / t_fused,
                     "pct_copy_bw": pct, "mem_triton": mem_f, "mem_eager": mem_r})
        lines.append(f"| {op} | {shape} | {t_fused * 1e3:.3f} | {t_ref * 1e3:.3f} | {t_cmp * 1e3:.3f} | "
                     f"{t_ref / t_fused:.1f}x | {t_cmp / t_fused:.1f}x | {pct:.0f}% | {mem_f:.1f} / {mem_r:.1f} |")
        if run.left() < 60 and not run.dry_run:
            lines.append("(cut short: budget)")
            break
    lines += ["", "| target | rows | met |", "|---|---|---|"]
    for target, (ops_, shape, ok) in TARGETS.items():
        hit = [r for r in rows if r["op"] in ops_.split("|") and shape in r["shape"]]
        met = [ok(r["speedup"], r["mem_triton"] / max(r["mem_eager"], 1e-9), r["pct_copy_bw"]) for r in hit]
        lines.append(f"| {target} | {len(hit)} | {'yes' if hit and all(met) else 'no' if hit else 'not measured'} |")
    return "\n".join(lines), {"rows": rows, "copy_bw": bw, "dtype": str(dtype)}


# ------------------------------------------------------------------------------------------------ 4. encoders
def _time_interleaved(fns: dict[str, Callable[[], object]], dev, rounds: int, warmup: int = 2) -> dict[str, list]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            _sync(dev)
            t = time.perf_counter()
            fn()
            _sync(dev)
            if r >= warmup:
                times[name].append(time.perf_counter() - t)
    return times


def step_encoder(run: Run) -> tuple[str, dict]:
    import torch

    import vtok

    dev = _device()
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    if run.dry_run:
        from timm.models.vision_transformer import VisionTransformer

        specs = {"tiny ViT": lambda: VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)}
        batch, rounds, r, layer = 2, 1, 2, 2
    else:
        import timm

        specs = {n: (lambda n=n: timm.create_model(n, pretrained=False)) for n in
                 ("vit_base_patch16_224", "vit_large_patch16_224")}
        batch, rounds, r, layer = 64, 10, 16, 6
    lines = ["| model | variant | tokens out | images/s | speed-up vs unpatched |", "|---|---|---|---|---|"]
    data = []
    for name, build in specs.items():
        torch.manual_seed(0)
        base = build().eval().to(dev, dtype)
        models = {"unpatched": base, f"tome r={r}": vtok.patch(copy.deepcopy(base), "tome", r=r),
                  f"divprune keep=0.5 @ block {layer}": vtok.patch(copy.deepcopy(base), "divprune", keep=0.5,
                                                                   layers=layer)}
        x = torch.randn(batch, 3, *base.patch_embed.img_size, device=dev, dtype=dtype)
        with torch.no_grad():
            times = _time_interleaved({k: (lambda m=m, x=x: m(x)) for k, m in models.items()}, dev, rounds)
        for variant, m in models.items():
            st = getattr(m, "_vtok_state", None)
            tokens = (st.selection.k + st.n_prefix) if st is not None else base.patch_embed.num_patches + 1
            ratio = statistics.median(a / b for a, b in zip(times["unpatched"], times[variant], strict=True))
            ips = batch / statistics.median(times[variant])
            data.append({"model": name, "variant": variant, "tokens": tokens, "images_per_s": ips, "speedup": ratio})
            lines.append(f"| {name} | {variant} | {tokens} | {ips:.1f} | {ratio:.2f}x |")
        del models, base
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    lines.append(f"\nbatch {batch}, {str(dtype).replace('torch.', '')}, {rounds} interleaved rounds (median); "
                 "ToMe's paper: ~2x for ViT-B/16 at r=16")
    return "\n".join(lines), {"rows": data, "batch": batch}


# ------------------------------------------------------------------------------------------------ 5. VLM prefill
def _prefill_models(dry_run: bool):
    from benchmarks import vlm_prefill as vp

    if dry_run:
        return {"llava, 16 image tokens": lambda: vp.llava(True),
                "llava, 2 images": lambda: vp.llava(True, images=2),
                "qwen2_vl": lambda: vp.qwen2_vl(True)}
    big = {"hidden": 4096, "layers": 32, "heads": 32, "kv_heads": 32}
    return {"llava 32x4096, 576 image tokens": lambda: vp.llava(False, **big),
            "llava 32x4096, 2880 image tokens (5 images)": lambda: vp.llava(False, images=5, **big),
            "qwen2_vl 28x3584, 576 image tokens": lambda: vp.qwen2_vl(False, hidden=3584, layers=28, heads=28,
                                                                        kv_heads=4)}


def step_prefill(run: Run) -> tuple[str, dict]:
    import torch

    import vtok

    dev = _device()
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    rounds = 1 if run.dry_run else 5
    variants = [(None, None, 1.0)] + [(m, layer, k) for k in (0.25, round(64 / 576, 4))  # 64 of 576 tokens
                                      for m, layer in (("random", None), ("divprune", None), ("fastv", 2))]
    lines = ["| model | method | layer | keep | image tokens | prefill ms | speed-up | peak GiB |",
             "|---|---|---|---|---|---|---|---|"]
    data = []
    for name, build in _prefill_models(run.dry_run).items():
        if not run.dry_run and run.left() < 90:
            lines.append(f"| {name} | (skipped: budget) | | | | | | |")
            continue
        with torch.device(dev):
            model, inputs, n_img = build()
        model = model.to(dtype).eval()
        inputs = {k: (v.to(dev, dtype) if v.is_floating_point() else v.to(dev)) for k, v in inputs.items()}

        def call(v, model=model, inputs=inputs):
            method, layer, keep = v
            with torch.no_grad():
                if method is None:
                    return model(**inputs)
                with vtok.wrapped(model, method, keep, layer=layer):
                    return model(**inputs)

        times = _time_interleaved({v: (lambda v=v, call=call: call(v)) for v in variants}, dev, rounds,
                                  warmup=1 if run.dry_run else 2)
        base = statistics.median(times[variants[0]])
        for v in variants:
            peak = float("nan")
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                call(v)
                peak = torch.cuda.max_memory_allocated() / 2**30
            ratio = statistics.median(a / b for a, b in zip(times[variants[0]], times[v], strict=True))
            after = n_img if v[0] is None else vtok.retained_count(v[0], n_img, v[2])
            data.append({"model": name, "method": v[0] or "unpruned", "layer": v[1], "keep": v[2],
                         "prefill_ms": statistics.median(times[v]) * 1e3, "speedup": ratio, "peak_gib": peak})
            lines.append(f"| {name} | {v[0] or '(unpruned)'} | {v[1] if v[1] is not None else 'pre'} | {v[2]} | "
                         f"{n_img} → {after} | {statistics.median(times[v]) * 1e3:.1f} | "
                         f"{ratio:.2f}x | {peak:.1f} |")
        del model, inputs, call, times
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        lines.append(f"| {name} | (unpruned prefill {base * 1e3:.1f} ms) | | | | | | |")
    lines.append(f"\n{str(dtype).replace('torch.', '')}, batch 1, {rounds} interleaved rounds (median); the vision "
                 "towers are small (the language model dominates, as in the 7B models); DART reports 2.99× at 64 of "
                 "576 tokens on LLaVA-1.5-7B (target: >= 3x pre-LLM at keep 0.1111)")
    return "\n".join(lines), {"rows": data}


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "outputs/gpu_all", help="folder for the tables")
    ap.add_argument("--budget-s", type=float, default=500, help="wall-clock budget for all steps")
    ap.add_argument("--wheels", default=".whl", help="folder of wheels to install first (no package index there)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, the Triton interpreter")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before any triton import in this process
    if args.budget_s <= 0:
        raise SystemExit(f"--budget-s must be > 0, got {args.budget_s}")
    run = Run(Path(args.out), args.budget_s, args.dry_run)
    run.step("env", 20, lambda r: step_env(r, ROOT / args.wheels))
    run.step("cuda_tests", 60, step_tests)
    run.step("kernels", 120, step_kernels)
    run.step("encoder", 90, step_encoder)
    run.step("prefill", 150, step_prefill)
    return run.out


if __name__ == "__main__":
    main()
