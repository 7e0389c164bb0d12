"""Offline vLLM throughput and time to first token with vtok's plugin, pruned against unpruned in one run (CPU).

A random-weight LLaVA-1.5-shaped model (``build_llava_shaped``): a 336 px / patch-14 CLIP tower (576 image tokens per
image; 3 layers x 128, kept small so that the language model dominates as in the real 7B model) and a Llama-shaped
language model (8 layers x hidden 1024, 16 heads of 64, 4 KV heads), float32, saved once as a vLLM folder. One
engine per setting (``LLM(folder, hf_overrides={"vtok_method": M, "vtok_keep": k})``, unpruned first), each in its
own process, prefix caching off, every prompt a different image:

* ``req/s``: ``LLM.generate`` on ``--n`` image prompts at once, ``--max-tokens`` greedy tokens each;
* ``TTFT``: the median wall time of ``--ttft`` single requests of one token each (prefill + first token).

    python -m benchmarks.vllm_throughput                      # divprune at keep 1.0 / 0.5 / 0.25 / 0.11
    python -m benchmarks.vllm_throughput --method random --n 8 --ttft 4
    python -m benchmarks.vllm_throughput --quick              # the tiny test LLaVA, smoke run

Run it in ``.venv-vllm`` (``make vllm``); ``docs/vllm.md`` holds the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "USER: <image> describe the image in detail ASSISTANT:"


def build_llava_shaped(root: Path, layers: int = 8, hidden: int = 1024) -> Path:
    """The vLLM folder of the benchmark's LLaVA-shaped model (built once under ``root``)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from vtok.integrations.vllm.tiny import tiny_llava_pair, vllm_copy

    out = root / f"llava_l{layers}_h{hidden}"
    if (out / "vllm" / "model.safetensors").exists():
        return out / "vllm"
    tiny_hf, _ = tiny_llava_pair(root / "tiny")  # its tokenizer and processor (576 tokens per 336 px image)
    cfg_tiny = LlavaConfig.from_pretrained(tiny_hf)
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                              image_size=336, patch_size=14, projection_dim=128)
    text = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                       num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
                       vocab_size=cfg_tiny.text_config.vocab_size, max_position_embeddings=4096,
                       pad_token_id=cfg_tiny.text_config.pad_token_id)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=cfg_tiny.image_token_id,
                      vision_feature_select_strategy="default", vision_feature_layer=-2)
    model = LlavaForConditionalGeneration(cfg).eval()
    hf = out / "hf"
    hf.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(hf)
    for f in tiny_hf.iterdir():
        if f.name not in ("config.json", "model.safetensors", "generation_config.json"):
            (hf / f.name).write_bytes(f.read_bytes())
    return vllm_copy(hf, out / "vllm")


def _image(seed: int):
    import numpy as np

    return (np.random.default_rng(seed).random((336, 336, 3)) * 255).astype(np.uint8)


def child(spec: dict) -> dict:
    """One engine: warm-up, throughput, TTFT."""
    from vllm import LLM, SamplingParams

    from vtok.integrations.vllm import register

    register()
    t0 = time.perf_counter()
    llm = LLM(spec["model"], dtype="float32", max_model_len=2048, enforce_eager=True, seed=0,
              hf_overrides=spec["overrides"], enable_prefix_caching=False, max_num_seqs=spec["n"],
              limit_mm_per_prompt={"image": 1})
    startup = time.perf_counter() - t0
    seed = iter(range(10**6))

    def reqs(k: int) -> list[dict]:
        return [{"prompt": PROMPT, "multi_modal_data": {"image": _image(next(seed))}} for _ in range(k)]

    gen = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, ignore_eos=True)
    one = SamplingParams(max_tokens=1, temperature=0.0)
    llm.generate(reqs(2), gen, use_tqdm=False)  # warm-up
    batch = reqs(spec["n"])
    t = time.perf_counter()
    outs = llm.generate(batch, gen, use_tqdm=False)
    wall = time.perf_counter() - t
    ttft = []
    for r in reqs(spec["ttft"]):
        t = time.perf_counter()
        llm.generate([r], one, use_tqdm=False)
        ttft.append(time.perf_counter() - t)
    return {"startup_s": startup, "req_s": len(outs) / wall, "ttft_s": statistics.median(ttft),
            "prompt_tokens": len(outs[0].prompt_token_ids)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="divprune")
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.5, 0.25, 0.11])
    ap.add_argument("--n", type=int, default=16, help="image prompts in the throughput batch")
    ap.add_argument("--ttft", type=int, default=8, help="single requests timed for TTFT")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--root", default="outputs/vllm_throughput")
    ap.add_argument("--quick", action="store_true", help="the tiny test LLaVA (hidden 128), n 4, ttft 2")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("VTOK_RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return
    root = Path(args.root)
    if args.quick:
        from vtok.integrations.vllm.tiny import tiny_llava_pair

        model, args.n, args.ttft = tiny_llava_pair(root / "tiny")[1], 4, 2
    else:
        model = build_llava_shaped(root, args.layers, args.hidden)
    rows = []
    for keep in [None] + args.keeps:
        over = None if keep is None else {"vtok_method": args.method, "vtok_keep": keep}
        spec = {"model": str(model), "overrides": over, "n": args.n, "ttft": args.ttft, "max_tokens": args.max_tokens}
        proc = subprocess.run([sys.executable, "-m", "benchmarks.vllm_throughput", "--child", json.dumps(spec)],
                              capture_output=True, text=True)
        got = [ln for ln in proc.stdout.splitlines() if ln.startswith("VTOK_RESULT ")]
        if not got:
            sys.exit(f"engine failed (keep {keep}):\n{proc.stderr[-3000:]}")
        res = json.loads(got[-1][len("VTOK_RESULT "):])
        rows.append((keep, res))
        print(f"keep {keep or 1.0}: {res}", file=sys.stderr, flush=True)
    base = rows[0][1]
    print(f"\n{args.method}, {args.n} image prompts x {args.max_tokens} tokens, TTFT median of {args.ttft}; "
          f"model {model}\n")
    print("| keep | prompt tokens | req/s | req/s ratio | TTFT (s) | TTFT ratio |")
    print("|---|---|---|---|---|---|")
    for keep, r in rows:
        print(f"| {keep or 1.0:g} | {r['prompt_tokens']} | {r['req_s']:.2f} | {r['req_s'] / base['req_s']:.2f} | "
              f"{r['ttft_s']:.3f} | {r['ttft_s'] / base['ttft_s']:.2f} |")


if __name__ == "__main__":
    main()
