"""vtok.wrap on a tiny random-weight Qwen3-VL (built from configs, no downloads): DeepStack features pruned with the
image tokens, before and inside the language model."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
import vtok  # noqa: E402
from tests.helpers.hf_reference import (  # noqa: E402
    assert_batch_equals_one_by_one,
    assert_keep_all_is_identity,
    assert_unwrap_bit_exact,
    greedy,
)
from tests.helpers.hf_tiny import _one_thread  # noqa: E402, F401  (_one_thread: autouse)
from vtok.budget import resolve_k  # noqa: E402
from vtok.hooks.hf import stats  # noqa: E402
from vtok.hooks.hf.tiny import QWEN_IMAGE_TOKEN, QWEN_VIDEO_TOKEN, left_pad, tiny_inputs, tiny_model  # noqa: E402

KEEP = 0.5  # of the pre-LLM reference test
LM_INPUTS = ("inputs_embeds", "position_ids", "visual_pos_masks", "deepstack_visual_embeds")


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen3_vl")


def _lm_inputs(m, inp) -> dict:
    """What the unwrapped model hands its language model (a forward pre-hook reads it)."""
    got = {}

    def hook(module, args, kwargs):
        got.update({k: kwargs.get(k) for k in LM_INPUTS})

    handle = m.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            m(**inp)
    finally:
        handle.remove()
    return got


def _lm_logits(m, x, pos, vm, ds):
    with torch.no_grad():
        h = m.model.language_model(inputs_embeds=x, position_ids=pos, attention_mask=torch.ones(x.shape[:2]).long(),
                                   visual_pos_masks=vm, deepstack_visual_embeds=ds).last_hidden_state
        return m.lm_head(h)


def _greedy(m, x, pos, vm, ds, nxt, n=16):
    emb = m.model.get_input_embeddings()
    toks, first = [], None
    for step in range(n):
        logits = _lm_logits(m, x, pos, vm, ds)
        first = logits if first is None else first
        t = int(logits[0, -1].argmax())
        toks.append(t)
        x = torch.cat([x, emb(torch.tensor([[t]]))], 1)
        pos = torch.cat([pos, torch.full((pos.shape[0], 1, 1), nxt + step, dtype=pos.dtype)], 2)
        vm = torch.cat([vm, torch.zeros(1, 1, dtype=torch.bool)], 1)
    return first, toks


def _assert_equals_kept_reference(m, lm_in, kept, out, tokens):
    """``out`` (logits) and ``tokens`` of the wrapped model equal ``_greedy`` on the unwrapped model's language-model
    inputs ``lm_in`` at the ``kept`` columns: DeepStack rows of the kept visual tokens, original positions."""
    x, pos, vm, ds = (lm_in[k] for k in LM_INPUTS)
    c = torch.tensor(kept)
    row = (vm.reshape(-1).long().cumsum(0) - 1).view(vm.shape)[0, c][vm[0, c]]
    ref_logits, ref_tokens = _greedy(m, x[:, c], pos[..., c], vm[:, c], [d[row] for d in ds], int(pos.max()) + 1)
    torch.testing.assert_close(out, ref_logits, atol=1e-4, rtol=1e-4)
    assert tokens[0].tolist() == ref_tokens


# ---------------------------------------------------------------------------------------------------- tests
def test_registered():
    assert "Qwen3VLForConditionalGeneration" in vtok.hooks.hf.supported()


@pytest.mark.parametrize("layer", [None, 0, 1, 2])
def test_keep_all_is_identity(model, layer):
    assert_keep_all_is_identity(model, tiny_inputs(model, [1, 2, 0]), layer)


def test_pre_llm_equals_manual_reference(model):
    """DivPrune keeps half of each image (rerun here on the image features); the reference hands the unwrapped
    language model the kept input embeddings, their original 3-D positions, the visual mask at them and every
    DeepStack layer's rows of the kept image tokens."""
    inp = tiny_inputs(model, [2], seed=1)
    got = _lm_inputs(model, inp)
    x = got["inputs_embeds"]
    ids = inp["input_ids"][0]
    cols = (ids != QWEN_IMAGE_TOKEN).nonzero().squeeze(1).tolist()
    runs = [(int(s), int(n)) for s, n in zip(*_runs(ids == QWEN_IMAGE_TOKEN), strict=True)]
    for s, n in runs:
        _, sel = vtok.compress(x[0, s:s + n][None], "divprune", KEEP)
        cols += [s + r for r in sel.emitted_keep()[0].tolist()]
    cols.sort()  # divprune's order within an image is its emission order; compare the sets below
    with vtok.wrapped(model, "divprune", KEEP, positions="original"):
        with torch.no_grad():
            out = model(**inp).logits
        kept = stats(model)["per_sample"][0]["kept"]
        tokens = greedy(model, inp)
    assert sorted(kept) == cols
    _assert_equals_kept_reference(model, got, kept, out, tokens)


def _runs(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Starts and lengths of the True runs of ``m [L]``."""
    d = torch.diff(torch.cat([torch.zeros(1), m.float(), torch.zeros(1)]))
    starts, ends = (d == 1).nonzero().squeeze(1), (d == -1).nonzero().squeeze(1)
    return starts, ends - starts


def test_in_llm_stage_before_deepstack_prunes_the_injections(model):
    """A stage entering layer 0 sees the input embeddings, so DivPrune keeps what it keeps before the language
    model; the DeepStack injections after layers 0 and 1 must then follow the selection, and both runs agree."""
    inp = tiny_inputs(model, [1, 2, 0])
    with vtok.wrapped(model, "divprune", KEEP, positions="original"), torch.no_grad():
        pre = model(**inp).logits
        kept_pre = stats(model)["per_sample"]
    with vtok.wrapped(model, "divprune", KEEP, layer=0, positions="original"), torch.no_grad():
        inllm = model(**inp).logits
        kept_in = stats(model)["per_sample"]
    assert [sorted(d["kept"]) for d in kept_pre] == [sorted(d["kept"]) for d in kept_in]
    valid = torch.zeros(pre.shape[:2], dtype=torch.bool)
    for b, d in enumerate(kept_pre):
        valid[b, pre.shape[1] - len(d["kept"]):] = True
    torch.testing.assert_close(inllm[valid], pre[valid], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method,layer,keep", [("visionzip", None, 0.5), ("fastv", 1, 0.5),
                                                ("divprune", [None, 1], [0.5, 0.25]), ("pdrop", [0, 2], [0.5, 0.25])])
def test_cached_generate_equals_uncached(model, method, layer, keep):
    inp = tiny_inputs(model, [1, 2, 0])
    with vtok.wrapped(model, method, keep, layer=layer):
        assert torch.equal(greedy(model, inp, n=8), greedy(model, inp, n=8, use_cache=False))


@pytest.mark.parametrize("method,layer,keep", [("visionzip", None, 0.5), ("fastv", 1, 0.5),
                                                ("divprune", [None, 1], [0.5, 0.25])])
def test_batch_equals_one_by_one(model, method, layer, keep):
    counts = [1, 2, 0]
    inp = tiny_inputs(model, counts)
    rows = [r[m.bool()].tolist() for r, m in zip(inp["input_ids"], inp["attention_mask"], strict=True)]
    thw = inp["image_grid_thw"]
    patches = thw.prod(-1).tolist()
    ones, img = [], 0
    for b, (r, n) in enumerate(zip(rows, counts, strict=True)):
        one = dict(zip(("input_ids", "attention_mask"), left_pad([r]), strict=True))
        if "mm_token_type_ids" in inp:
            one["mm_token_type_ids"] = inp["mm_token_type_ids"][b][inp["attention_mask"][b].bool()][None]
        if n:
            a = sum(patches[:img])
            one |= {"pixel_values": inp["pixel_values"][a:a + sum(patches[img:img + n])],
                    "image_grid_thw": thw[img:img + n]}
        img += n
        ones.append(one)
    with vtok.wrapped(model, method, keep, layer=layer):
        assert_batch_equals_one_by_one(model, inp, ones)


def test_stats_and_unwrap_bit_exact(model):
    inp = tiny_inputs(model, [1, 2, 0])
    sizes = (inp["image_grid_thw"].prod(-1) // 4).tolist()

    def pruned_stats(m):
        m(**inp)
        st = stats(m)
        assert [(d["before"], d["after"]) for d in st["per_image"]] == [(n, resolve_k(0.25, n)) for n in sizes]
        greedy(m, inp, n=6)

    assert_unwrap_bit_exact(model, inp, [("divprune", 0.25, None, pruned_stats),
                                         ("fastv", 0.5, 1, lambda m: greedy(m, inp, n=6))])
    assert "_deepstack_process" not in vars(model.model.language_model)


def _video_inputs(frames: int = 3, seed: int = 4) -> dict:
    """One prompt holding an image and a video of ``frames`` temporal patches of a 4 x 4 patch grid (4 tokens each),
    each frame in its own run after its timestamp text (two tokens), as Qwen3-VL's processor lays it out."""
    from vtok.hooks.hf.tiny import VISION_END, VISION_START, qwen_pixels

    pix, thw = qwen_pixels([(1, 4, 6)], seed=seed)
    vpix, vthw = qwen_pixels([(frames, 4, 4)], seed=seed + 1)
    ids = [1, 5, VISION_START] + [QWEN_IMAGE_TOKEN] * 6 + [VISION_END, 9]
    for f in range(frames):
        ids += [20 + f, 21, VISION_START] + [QWEN_VIDEO_TOKEN] * 4 + [VISION_END]
    ids += [11, 12]
    inp = dict(zip(("input_ids", "attention_mask"), left_pad([ids]), strict=True))
    inp |= {"pixel_values": pix, "image_grid_thw": thw, "pixel_values_videos": vpix, "video_grid_thw": vthw}
    import transformers

    if not transformers.__version__.startswith("4."):
        t = inp["input_ids"]
        inp["mm_token_type_ids"] = (t == QWEN_IMAGE_TOKEN).int() + 2 * (t == QWEN_VIDEO_TOKEN).int()
    return inp


@pytest.mark.parametrize("layer", [None, 1])
def test_video_keep_all_is_identity(model, layer):
    inp = _video_inputs()
    with torch.no_grad():
        ref = model(**inp).logits
    with vtok.wrapped(model, "random", 1.0, layer=layer), torch.no_grad():
        torch.testing.assert_close(model(**inp).logits, ref, atol=1e-5, rtol=1e-5)


def test_video_frames_are_records_of_one_budget(model):
    """A video is one record per frame (its own timestamped run) sharing one budget; every kept token stays in its
    frame's run; the pruned prompt equals the hand-built reference (the unwrapped language model on the kept inputs,
    original 3-D positions, DeepStack rows at the kept visual tokens)."""
    inp = _video_inputs()
    got = _lm_inputs(model, inp)
    with vtok.wrapped(model, "divprune", 0.5, positions="original"):
        with torch.no_grad():
            out = model(**inp).logits
        recs = list(model._vtok_runtime.records)  # generate's own encoding appends to this call's list
        st = stats(model)
        tokens = greedy(model, inp)
    assert [(r.n, r.video, r.frames) for r in recs] == [(6, False, 1)] + [(4, True, 1)] * 3
    assert [(d["video"], d["before"], d["after"]) for d in st["per_image"]] == [(False, 6, 3), (True, 12, 6)]
    kept = st["per_sample"][0]["kept"]
    ids = inp["input_ids"][0]
    run = torch.cumsum((ids == 292).long(), 0)  # the run (vision start) each column follows
    assert run[kept].tolist() == sorted(run[kept].tolist())  # runs stay in prompt order
    _assert_equals_kept_reference(model, got, kept, out, tokens)


@pytest.mark.parametrize("method,layer,keep,positions", [("divprune", None, 0.5, "original"),
                                                          ("divprune", None, 0.5, "reindex"),
                                                          ("fastv", 1, 0.5, "original"),
                                                          ("random", [None, 2], [0.5, 0.25], "reindex")])
def test_video_cached_generate_equals_uncached(model, method, layer, keep, positions):
    inp = _video_inputs()
    with vtok.wrapped(model, method, keep, layer=layer, positions=positions):
        assert torch.equal(greedy(model, inp, n=8), greedy(model, inp, n=8, use_cache=False))
