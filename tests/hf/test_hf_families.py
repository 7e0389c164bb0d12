"""``vtok.wrap`` on the tiny model of every supported family (``vtok.hooks.hf.tiny``): an uncached ``generate`` gives
the cached one's tokens for every in-LLM method, ``labels`` are pruned with the sequence, and placements a method is
not defined for are refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vtok
from tests.helpers.hf_reference import greedy
from tests.helpers.hf_tiny import _one_thread  # noqa: F401  (autouse: one intra-op thread per module)
from vtok.hooks.hf import llm_context
from vtok.hooks.hf.tiny import TINY_FAMILIES, tiny_inputs, tiny_model

pytest.importorskip("transformers")

# context only the language model has: a method reading any of it is an in-LLM method
LLM_ONLY = {"text_attn", "self_cross_attn", "text_rows_attn", "text_relevance", "prev_hidden", "keys", "text_keys",
            "text_features", "query"}
IN_LLM = [m.name for m in vtok.methods() if (m.needs | m.uses) & LLM_ONLY and m.needs <= llm_context(2, m.name)]
STAGES = [("pdrop", [0.5, 0.25], [1, 3]), (["divprune", "fastv"], [0.5, 0.25], [None, 2]),
          ("sparsevlm", [0.5, 0.25], [1, 3]), ("fitprune", [0.5, 0.25], [1, 2])]




@pytest.fixture(scope="module", params=sorted(TINY_FAMILIES))
def model(request):
    return tiny_model(request.param)


def _counts(st: dict) -> dict:
    return {k: v for k, v in st.items() if k != "wrapper_seconds"}


def test_in_llm_methods_are_the_ones_issue_29_names():
    assert {"fastv", "pdrop", "dart", "fitprune", "sparsevlm", "holitom_llm", "mustdrop_llm"} <= set(IN_LLM)


@pytest.mark.parametrize("method", IN_LLM)
def test_uncached_generate_equals_cached(model, method):
    """Every uncached step re-runs the prompt and the tokens generated so far; the stage must score the prompt alone
    (FastV / PyramidDrop used to rank by the last generated token's attention). MustDrop's decode stage prunes the
    cache, so ``decode_kv="stage"`` here (the ``"final"`` case is refused, below)."""
    inp = tiny_inputs(model, [1, 2, 0])
    kw = {"decode_kv": "stage"} if vtok.get_method(method).placement.decode_kv == "final" else {}
    with vtok.wrapped(model, method, 0.5, layer=2, **kw):
        cached = greedy(model, inp, n=8)
        st = _counts(vtok.stats(model))
        uncached = greedy(model, inp, n=8, use_cache=False)
        assert _counts(vtok.stats(model)) == st  # the prompt's, as the cached generate reports
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("method,keep,layer", STAGES)
def test_uncached_generate_equals_cached_over_stages(model, method, keep, layer):
    inp = tiny_inputs(model, [1, 2, 0], seed=1)
    with vtok.wrapped(model, method, keep, layer=layer):
        cached = greedy(model, inp, n=8)
        uncached = greedy(model, inp, n=8, use_cache=False)
    assert torch.equal(cached, uncached)


def test_uncached_generate_with_a_pruned_cache_is_refused(model):
    inp = tiny_inputs(model, [1])
    with vtok.wrapped(model, "mustdrop_llm", 0.5, layer=2), pytest.raises(NotImplementedError, match="decode_kv"):
        greedy(model, inp, n=8, use_cache=False)


@pytest.mark.parametrize("method,keep,layer", [("divprune", 0.5, None), ("fastv", 0.5, 2),
                                               ("random", [0.5, 0.25], [None, 2]), ("tome", 0.5, 1)])
def test_labels_give_the_loss_over_the_pruned_sequence(model, method, keep, layer):
    """The reference: each sample's labels taken at its kept ``input_ids`` columns (``vtok.stats``), left-padded with
    -100 like the pruned sequence, and the shifted cross-entropy of the logits against them, by hand."""
    inp = tiny_inputs(model, [1, 2, 0])
    labels = inp["input_ids"].masked_fill(inp["attention_mask"] == 0, -100)
    labels[0, -2] = -100  # an ignored text token
    with torch.no_grad(), vtok.wrapped(model, method, keep, layer=layer):
        out = model(**inp, labels=labels)
        kept = [d["kept"] for d in vtok.stats(model)["per_sample"]]
    logits = out.logits
    assert logits.shape[1] < labels.shape[1]
    want = torch.full(logits.shape[:2], -100, dtype=torch.long)
    for b, cols in enumerate(kept):
        want[b, logits.shape[1] - len(cols):] = labels[b, cols]
    ref = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), want[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, ref)


def test_labels_of_another_shape_are_refused(model):
    inp = tiny_inputs(model, [1])
    with torch.no_grad(), vtok.wrapped(model, "random", 0.5), pytest.raises(ValueError, match="shape of input_ids"):
        model(**inp, labels=inp["input_ids"][:, 1:])


def test_dart_before_the_language_model_is_refused(model):
    with pytest.raises(ValueError, match="runs inside the language model"):
        vtok.wrap(model, "dart", 0.25)
    with pytest.raises(ValueError, match="runs inside the language model"):
        vtok.wrap(model, ["dart", "dart"], [0.5, 0.25], layer=[None, 2])
    assert getattr(model, "_vtok_runtime", None) is None
