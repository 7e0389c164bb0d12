"""Run prompts through vLLM (CPU build) in a fresh process and print the results as one JSON line.

``python -m tests.vllm.engine SPEC_JSON`` with ``SPEC = {"model": folder, "overrides": {...} | null, "runs":
[[prompt, ...], ...]}`` where a prompt is ``{"text": str, "images": [[h, w, seed], ...], "videos": [[t, h, w, seed],
...]}`` (both optional); each run is one
``LLM.generate`` call (a batch). Output: ``{"ok": true, "startup_s": .., "runs": [[{"ids": [...], "logprobs": [...],
"prompt_len": n}, ...], ...]}``, or ``{"ok": false, "error": "..."}`` when the engine fails to start. A subprocess per
engine: vLLM keeps process-wide state, and a failed start must not leak into the next test.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MAX_TOKENS = 16


def image(h: int, w: int, seed: int):
    """A seeded random RGB image (uint8 ``[h, w, 3]``), the same on the HF side."""
    import numpy as np

    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def video(t: int, h: int, w: int, seed: int):
    """A seeded random RGB clip (uint8 ``[t, h, w, 3]``) whose frames drift slowly (so frames are redundant)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    base, step = rng.random((h, w, 3)), rng.random((h, w, 3)) - 0.5
    return np.stack([np.clip(base + 0.1 * i * step, 0, 1) * 255 for i in range(t)]).astype(np.uint8)


def clip_metadata(t: int, fps: float = 2.0) -> dict:
    """What vLLM asks of a decoded clip: every frame taken (no resampling), at ``fps``."""
    return {"fps": fps, "duration": t / fps, "total_num_frames": t, "frames_indices": list(range(t)),
            "video_backend": "opencv", "do_sample_frames": False}


def main(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    from vtok.integrations.vllm import register

    register()  # what the entry point does in every process; explicit so a stale egg-info in the cwd cannot hide it
    t0 = time.perf_counter()
    try:
        llm = LLM(spec["model"], dtype="float32", max_model_len=spec.get("max_model_len", 2048), enforce_eager=True,
                  hf_overrides=spec.get("overrides"), seed=0,
                  limit_mm_per_prompt=spec.get("limit_mm_per_prompt", {"image": 2}),
                  max_num_seqs=spec.get("max_num_seqs", 8))
    except Exception as e:  # noqa: BLE001 - reported to the test
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    startup = time.perf_counter() - t0
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=1)
    runs = []
    for batch in spec["runs"]:
        reqs = []
        for p in batch:
            req = {"prompt": p["text"]}
            if p.get("images"):
                imgs = [image(*im) for im in p["images"]]
                req["multi_modal_data"] = {"image": imgs if len(imgs) > 1 else imgs[0]}
            if p.get("videos"):
                clips = [(c, clip_metadata(len(c))) for c in (video(*v) for v in p["videos"])]
                req.setdefault("multi_modal_data", {})["video"] = clips if len(clips) > 1 else clips[0]
            reqs.append(req)
        try:
            outs = llm.generate(reqs, params, use_tqdm=False)
        except Exception as e:  # noqa: BLE001 - a request refused while processing, reported to the test
            return {"ok": False, "error": f"{type(e).__name__}: {e}", "startup_s": startup}
        runs.append([{"ids": list(o.outputs[0].token_ids), "prompt_len": len(o.prompt_token_ids),
                      "logprobs": [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids,
                                                                   strict=True)]} for o in outs])
    return {"ok": True, "startup_s": startup, "runs": runs}


if __name__ == "__main__":
    result = main(json.loads(sys.argv[1]))
    print("VTOK_RESULT " + json.dumps(result), flush=True)
