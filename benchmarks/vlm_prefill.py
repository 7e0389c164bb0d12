"""Wrapped-VLM prefill and decode cost on CPU, as ratios to the unpruned model measured in one run.

Random-weight models built from configs (no downloads), eval, ``torch.no_grad``, fp32, batch 1:

* ``llava``: LLaVA-1.5-shaped prompt (576 image tokens from a 336 px / patch-14 CLIP tower + 64 text tokens); the
  language model is Llama-shaped, 8 layers × hidden 1024 (16 heads, 4 KV heads); the CLIP tower is kept small
  (3 layers × 128) so the language model dominates as in the real 7B model;
* ``qwen2_vl``: Qwen2-VL-shaped (a 672 × 672 image → 48 × 48 patches → 576 tokens after the 2 × 2 merge, 3-D M-RoPE
  positions), the same language-model size;
* ``qwen3_vl``: Qwen3-VL-shaped: the same image and language-model size, interleaved M-RoPE, and DeepStack (three
  tower blocks' features added to the first three decoder layers at the image tokens, pruned with them).

Variants: pre-LLM ``random``, ``divprune``, ``visionzip`` (LLaVA only: it needs a CLS tower) and in-LLM ``fastv`` at
``K=2``, each at keep ∈ {1.0, 0.5, 0.25, 0.11}. All variants are timed interleaved (one call of each per round,
after a warm-up round); reported: the median over rounds of the paired ratio ``t_variant / t_unpruned`` for

* ``prefill``: the whole forward on the prompt (vision tower + projector + language model), the unpruned model's
  time in seconds beside it;
* ``decode``: per-token time of 16 greedy cached steps after the prefill (``generate``);
* ``peak``: peak resident memory added during the prefill (the kernel's high-water mark, reset before it; glibc
  returns freed tensors at once), as a ratio;
* ``wrapper``: the wrapper's own work in the prefill (context, strategy, bookkeeping: ``vtok.stats``'s
  ``wrapper_seconds``) as a share of the pruned prefill.

    python -m benchmarks.vlm_prefill                    # LLaVA and Qwen2-VL, 5 rounds
    python -m benchmarks.vlm_prefill --families qwen3_vl --rounds 5
    python -m benchmarks.vlm_prefill --quick            # tiny shapes, smoke run
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

import vtok

KEEPS = (1.0, 0.5, 0.25, 0.11)


class PeakRSS:
    """Peak resident memory added inside the block (bytes): the kernel's high-water mark ``VmHWM`` reset on entry
    (``/proc/self/clear_refs``) minus the resident size then. Run with ``MALLOC_MMAP_THRESHOLD_=65536`` (``main``
    re-executes itself so) so that freed tensors go back to the system and one block's peak does not hide in memory
    an earlier block left in glibc's pool."""

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{key} not in /proc/self/status")

    def __enter__(self) -> PeakRSS:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.start = self._status("VmRSS:")
        return self

    def __exit__(self, *exc) -> None:
        self.peak = self._status("VmHWM:")

    @property
    def extra(self) -> int:
        return max(self.peak - self.start, 0)


def llava(quick: bool, *, hidden: int | None = None, layers: int | None = None, heads: int | None = None,
          kv_heads: int | None = None, images: int = 1):
    """LLaVA-1.5-shaped model and prompt; ``hidden`` / ``layers`` / ``heads`` / ``kv_heads`` size the language model
    (defaults: the CPU sizes above; ``benchmarks.gpu_all`` asks for 32 × 4096), ``images`` images of 576 tokens
    each in one prompt (5: 2,880 image tokens, LLaVA-NeXT's count)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    img, patch, h0, l0, text = (56, 14, 64, 3, 8) if quick else (336, 14, 1024, 8, 64)
    hidden, layers = hidden or h0, layers or l0
    vision = CLIPVisionConfig(hidden_size=32 if quick else 128, intermediate_size=64 if quick else 512,
                              num_hidden_layers=3, num_attention_heads=4, image_size=img, patch_size=patch)
    lm = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                     num_attention_heads=heads or (16 if not quick else 4),
                     num_key_value_heads=kv_heads or (4 if not quick else 2),
                     vocab_size=32000 if not quick else 512, max_position_embeddings=8192)
    cfg = LlavaConfig(vision_config=vision, text_config=lm, image_token_id=lm.vocab_size - 1,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    n_img = (img // patch) ** 2
    parts = [torch.randint(1, 400, (1, 5))]
    for i in range(images):  # images after the first follow two text tokens each
        parts += ([torch.randint(1, 400, (1, 2))] if i else []) + [torch.full((1, n_img), cfg.image_token_id)]
    parts.append(torch.randint(1, 400, (1, text - 5)))
    ids = torch.cat(parts, 1)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": torch.randn(images, 3, img, img)}
    return model, inputs, n_img * images


def _qwen_prompt(side: int, vocab: int, text: int) -> tuple[dict[str, torch.Tensor], int]:
    """A Qwen-VL prompt of ``text`` tokens around one ``side × side``-patch image (its tokens between vision start /
    end, ids ``vocab - 1`` / ``- 3`` / ``- 4``), its pixels and grid: ``(inputs, image tokens)``."""
    n_img = (side // 2) ** 2
    ids = torch.cat([torch.randint(1, 400, (1, 5)), torch.tensor([[vocab - 3]]),
                     torch.full((1, n_img), vocab - 1), torch.tensor([[vocab - 4]]),
                     torch.randint(1, 400, (1, text - 7))], 1)
    types = (ids == vocab - 1).int()
    pix = torch.randn(side * side, 3 * 2 * 14 * 14)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pix,
              "image_grid_thw": torch.tensor([[1, side, side]]), "mm_token_type_ids": types}
    return inputs, n_img


def qwen2_vl(quick: bool, *, hidden: int | None = None, layers: int | None = None, heads: int | None = None,
             kv_heads: int | None = None):
    """Qwen2-VL-shaped model and prompt (576 merged image tokens); the language model sized as in :func:`llava`."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    side, h0, l0, text = (8, 64, 3, 8) if quick else (48, 1024, 8, 64)
    hidden, layers = hidden or h0, layers or l0
    vocab = 512 if quick else 32000
    heads, kv_heads = heads or (16 if not quick else 4), kv_heads or (4 if not quick else 2)
    half = hidden // heads // 2  # M-RoPE sections split the rotary half of each head: 1/4, 3/8, 3/8
    section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    cfg = Qwen2VLConfig(
        vision_config={"depth": 2, "embed_dim": 64, "hidden_size": hidden, "num_heads": 4, "mlp_ratio": 2,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3},
        text_config={"hidden_size": hidden, "intermediate_size": hidden * 11 // 4, "num_hidden_layers": layers,
                     "num_attention_heads": heads, "num_key_value_heads": kv_heads,
                     "vocab_size": vocab, "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2,
                     "rope_scaling": {"type": "mrope", "mrope_section": section}},
        image_token_id=vocab - 1, video_token_id=vocab - 2, vision_start_token_id=vocab - 3,
        vision_end_token_id=vocab - 4)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    return (model, *_qwen_prompt(side, vocab, text))


def qwen3_vl(quick: bool):
    """Qwen3-VL-shaped: as ``qwen2_vl`` (same image, 576 merged tokens, same language-model size), with interleaved
    M-RoPE and DeepStack features from three tower blocks added to the first three decoder layers' image tokens."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    side, hidden, layers, text = (8, 64, 3, 8) if quick else (48, 1024, 8, 64)
    vocab = 512 if quick else 32000
    mrope = {"mrope_section": [2, 3, 3] if quick else [8, 12, 12], "mrope_interleaved": True}
    heads = 4 if quick else 16
    cfg = Qwen3VLConfig(
        vision_config={"depth": 3, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4,
                       "out_hidden_size": hidden, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "num_position_embeddings": 64 if quick else 2304, "deepstack_visual_indexes": [0, 1, 2]},
        text_config={"hidden_size": hidden, "intermediate_size": hidden * 11 // 4, "num_hidden_layers": layers,
                     "num_attention_heads": heads, "num_key_value_heads": 4 if not quick else 2,
                     "head_dim": hidden // heads, "vocab_size": vocab, "max_position_embeddings": 4096,
                     "bos_token_id": 1, "eos_token_id": 2,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, **mrope},
                     "rope_scaling": {"rope_type": "default", **mrope}},
        image_token_id=vocab - 1, video_token_id=vocab - 2, vision_start_token_id=vocab - 3,
        vision_end_token_id=vocab - 4)
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(cfg).eval()
    return (model, *_qwen_prompt(side, vocab, text))


FAMILIES = {"llava": llava, "qwen2_vl": qwen2_vl, "qwen3_vl": qwen3_vl}


def variants(family: str) -> list[tuple[str, int | None, float]]:
    methods = ["random", "divprune"] + (["visionzip"] if family == "llava" else [])
    out = [(m, None, k) for m in methods for k in KEEPS[1:]]
    return out + [("fastv", 2, k) for k in KEEPS[1:]]


def measure(model, inputs, variant, new_tokens: int) -> dict[str, float]:
    method, layer, keep = variant
    ctx = vtok.wrapped(model, method, keep, layer=layer) if method else _null(model)
    with ctx, torch.no_grad():
        with PeakRSS() as mem:
            t = time.perf_counter()
            model(**inputs)
            prefill = time.perf_counter() - t
        wrapper = vtok.stats(model)["wrapper_seconds"] if method else 0.0
        after = sum(d["visual_after"] for d in vtok.stats(model)["per_sample"]) if method else None
        t = time.perf_counter()
        model.generate(**inputs, max_new_tokens=1, do_sample=False, min_new_tokens=1)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(**inputs, max_new_tokens=new_tokens + 1, do_sample=False, min_new_tokens=new_tokens + 1)
        tn = time.perf_counter() - t
    return {"prefill": prefill, "decode": max(tn - t1, 1e-9) / new_tokens, "peak": mem.extra, "wrapper": wrapper,
            "after": after}


class _null:
    def __init__(self, model) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def run_family(family: str, quick: bool, rounds: int, new_tokens: int) -> list[str]:
    model, inputs, n_img = FAMILIES[family](quick)
    model.generation_config.pad_token_id = 0
    base = (None, None, 1.0)
    vs = [base] + variants(family)
    for v in vs:  # warm-up
        measure(model, inputs, v, new_tokens)
    res: dict[tuple, list[dict]] = {v: [] for v in vs}
    for _ in range(rounds):
        for v in vs:
            res[v].append(measure(model, inputs, v, new_tokens))
    lines = [f"| {family} | method | layer | keep | image tokens | prefill | decode / token | peak extra memory "
             f"| wrapper share |", "|---|---|---|---|---|---|---|---|---|"]
    b = res[base]
    pb = statistics.median(r["prefill"] for r in b)
    db = statistics.median(r["decode"] for r in b)
    mb = statistics.median(r["peak"] for r in b)
    lines.append(f"| {family} | (unpruned) | - | 1.0 | {n_img} | 1.00 ({pb:.3f} s) | 1.00 ({db * 1e3:.1f} ms) | "
                 f"1.00 ({mb / 2**20:.0f} MiB) | - |")
    for v in vs[1:]:
        rs = res[v]
        pr = statistics.median(r["prefill"] / x["prefill"] for r, x in zip(rs, b, strict=True))
        dr = statistics.median(r["decode"] / x["decode"] for r, x in zip(rs, b, strict=True))
        mr = f"{statistics.median(r['peak'] for r in rs) / mb:.2f}" if mb > 2**20 else "n/a"
        share = statistics.median(r["wrapper"] / r["prefill"] for r in rs)
        lines.append(f"| {family} | {v[0]} | {v[1] if v[1] is not None else 'pre'} | {v[2]} | "
                     f"{n_img} → {rs[0]['after']} | {pr:.2f} ({1 / pr:.2f}× faster) | {dr:.2f} | {mr} | "
                     f"{share:.1%} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", default="llava,qwen2_vl")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (smoke run)")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    load = os.getloadavg()[0]
    print(f"command: python {shlex.join(['-m', 'benchmarks.vlm_prefill'] + (argv or sys.argv[1:]))}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load:.2f} at start")
    for fam in args.families.split(","):
        for line in run_family(fam, args.quick, args.rounds, args.new_tokens):
            print(line)
        print()


if __name__ == "__main__":
    if sys.platform == "linux" and os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # see PeakRSS
        root = str(Path(__file__).resolve().parents[1])  # the re-run finds the benchmarks package from anywhere
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
        os.execv(sys.executable, [sys.executable, "-m", "benchmarks.vlm_prefill", *sys.argv[1:]])
    main()
