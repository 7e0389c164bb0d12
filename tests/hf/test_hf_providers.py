"""The wrapper's context providers (``vtok.hooks.hf.providers``): every key a registered method can read inside the
language model has one, ``llm_context`` derived from them agrees with the wrapper's, and a capture that did not run
fails naming the key and the layer."""

from __future__ import annotations

import pytest
import torch

import vtok
from tests.helpers.hf_tiny import tiny_llava
from vtok.context import CONTEXT_KEYS
from vtok.hooks.hf import _attention, providers
from vtok.hooks.hf.providers import PROVIDERS, llm_context
from vtok.hooks.hf.tiny import tiny_inputs

pytest.importorskip("transformers")

METHODS = [m.name for m in vtok.methods()]
NOT_GIVEN = {"attn", "sizes", "frame_scores", "relevance_features",  # keys the wrapper gives no stage (yet)
             "prefix_error"}  # a 1D tokenizer's prefix errors: no VLM tower has them


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


def test_every_key_a_method_reads_has_a_provider_or_is_known_not_given():
    read = set().union(*((m.needs | m.uses) for m in vtok.methods()))
    given = {k for k, p in PROVIDERS.items() if p.tower is not None or p.llm is not None}
    assert read - given == NOT_GIVEN & read
    assert set(PROVIDERS) <= set(CONTEXT_KEYS)


# the wrapper's in-LLM context and layer-0 rule as they were written by hand before the registry (the reference)
_REF_LLM_CONTEXT = frozenset({"text_attn", "prev_hidden", "query", "grid", "keys", "features", "text_features",
                              "text_keys", "self_cross_attn", "text_rows_attn", "text_relevance", "seq_index",
                              "text_seq_index"})


def _ref_llm_context(layer: int, method: str) -> frozenset[str]:
    if layer > 0:
        return _REF_LLM_CONTEXT
    own = vtok.pruners.get(method).placement.attn_layer == "own"
    return (_REF_LLM_CONTEXT - {"prev_hidden", "keys", "text_keys", "self_cross_attn", "text_rows_attn"}
            - (set() if own else {"text_attn"}))


def test_every_llm_key_of_the_wrapper_has_an_llm_provider():
    from vtok.hooks.hf import _LLM_CONTEXT

    assert {k for k, p in PROVIDERS.items() if p.llm is not None} == set(_LLM_CONTEXT) == _REF_LLM_CONTEXT


def test_providers_are_complete():
    """What the engine runs exists: a capture for every ``"attention"`` provider, a ``compute`` for every
    ``"prompt"`` one, a ``cut`` for every provider the engine cuts."""
    for key, p in PROVIDERS.items():
        assert p.key == key
        assert (p.llm == "attention") == (p.capture is not None), key
        assert p.capture is None or p.capture in _attention.CAPTURES, key
        assert (p.llm == "prompt") == (p.compute is not None), key
        assert p.layer in ("previous", "placement"), key
        cut_by_engine = p.llm not in (None, "slot") or p.tower == "engine"
        assert (p.cut is not None) == cut_by_engine, key
        assert p.together <= set(PROVIDERS), key


@pytest.mark.parametrize("layer", [0, 1, 3])
def test_llm_context_agrees_with_the_wrappers(layer):
    from vtok.hooks.hf import llm_context as wrapper_llm_context

    for name in METHODS:
        assert llm_context(layer, name) == wrapper_llm_context(layer, name) == _ref_llm_context(layer, name), name


def test_token_dims_are_the_wrappers():
    assert providers.TOKEN_DIM == {"cls_attn": -1, "mid_attn": -1, "text_attn": -1, "keys": -2, "prev_hidden": -2,
                                   "features": -2, "self_cross_attn": -1, "text_rows_attn": -1,
                                   "relevance_features": -2, "seq_index": -1}


def test_tower_keys_cover_what_the_adapter_provides(model):
    from vtok.hooks.hf import _adapter

    assert _adapter(model).provides(model) <= set(providers.tower_keys())


@pytest.mark.parametrize("method,key", [("fastv", "text_attn"), ("sparsevlm", "text_rows_attn"),
                                        ("fitprune", "self_cross_attn"), ("dart", "keys")])
def test_a_missing_capture_names_the_key_and_the_layer(model, method, key):
    """The attention module the stage reads stops reporting (as under an attention implementation vtok cannot
    watch): the stage fails with its provider's one message."""
    inputs = tiny_inputs(model, [1])
    with torch.no_grad(), vtok.wrapped(model, method, 0.5, layer=2):
        _attention.unwatch(model.model.language_model.layers[1].self_attn)
        with pytest.raises(RuntimeError, match=rf"no attention was captured for context '{key}' .*before layer 2; "
                                               r"the attention implementation must be 'sdpa' or 'eager'"):
            model(**inputs)


def test_per_record_keeps_the_values_of_keeping_providers(model):
    inputs = tiny_inputs(model, [2])
    with torch.no_grad(), vtok.wrapped(model, "fitprune", [0.75, 0.5], layer=[1, 3]):
        model(**inputs, use_cache=False)
        st = model._vtok_runtime.state
        got = st.per_record("self_cross_attn")
        assert sorted(got) == [1, 3]
        n = {1: 16, 3: 12}  # each image's tokens entering the stage
        for ly, per in got.items():
            assert sorted(per) == [0, 1] and all(v.shape == (2, n[ly]) for v in per.values())
        assert st.per_record("text_attn") == {}
        assert st.captures.get("head_max", {}) == {}  # read once, freed with the stage
