"""vtok.bench.layer_cache: a memoised frozen tower answers exactly as the tower does, hooks included."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from vtok.bench.layer_cache import cached_layers, input_digest, module_digest


@pytest.fixture()
def tower():
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           image_size=32, patch_size=8)
    return CLIPVisionModel(cfg).eval()


def _layers(tower):
    return getattr(tower, "vision_model", tower).encoder.layers  # transformers 4.x nests the body in .vision_model


def _run(tower, pixels):
    with torch.no_grad():
        out = tower(pixel_values=pixels, output_hidden_states=True)
    return [out.last_hidden_state, *out.hidden_states]


def test_cached_equals_uncached_and_hooks_see_the_same_inputs(tower):
    pixels = torch.randn(2, 3, 32, 32)
    layers = _layers(tower)
    seen = []
    handle = layers[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    want = _run(tower, pixels)
    store = {}
    with cached_layers(layers, store) as stats:
        first = _run(tower, pixels)
        again = _run(tower, pixels)
    handle.remove()
    assert (stats.hits, stats.misses, len(store)) == (3, 3, 3)
    for w, a, b in zip(want, first, again, strict=True):
        assert torch.equal(w, a) and torch.equal(w, b)
    assert len(seen) == 3 and all(torch.equal(seen[0], s) for s in seen[1:])  # the pre-hook ran on every call
    assert stats.bytes == sum(t.numel() * t.element_size() for t in store.values())


def test_other_inputs_compute_and_the_forward_is_restored(tower):
    layers = _layers(tower)
    store = {}
    with cached_layers(layers, store) as stats:
        _run(tower, torch.randn(1, 3, 32, 32))
        other = torch.randn(1, 3, 32, 32)
        got = _run(tower, other)
    assert stats.hits == 0 and stats.misses == 6
    assert all("forward" not in vars(layer) for layer in layers)
    for w, g in zip(_run(tower, other), got, strict=True):
        assert torch.equal(w, g)
    # a store kept between blocks answers the next block
    with cached_layers(layers, store) as stats:
        _run(tower, other)
    assert (stats.hits, stats.misses) == (3, 0)


def test_gradients_limit_and_misuse(tower):
    layers = _layers(tower)
    pixels = torch.randn(1, 3, 32, 32)
    store = {}
    with cached_layers(layers, store) as stats:
        out = tower(pixel_values=pixels).last_hidden_state  # gradients on: computes, stores nothing
        assert out.requires_grad and not store and stats.misses == 0
        with pytest.raises(RuntimeError, match="does not nest"), cached_layers(layers, {}):
            pass
    with cached_layers(layers, store, limit_bytes=0) as stats:
        _run(tower, pixels)
    assert not store and stats.full == 3
    with pytest.raises(ValueError, match="limit_bytes"), cached_layers(layers, store, limit_bytes=-1):
        pass


def test_digests_follow_values_shapes_and_weights(tower):
    x = torch.zeros(2, 3)
    assert input_digest(0, (x,), {}) == input_digest(0, (x.clone(),), {})
    assert input_digest(0, (x,), {}) != input_digest(1, (x,), {})
    assert input_digest(0, (x,), {}) != input_digest(0, (x.reshape(3, 2),), {})
    assert input_digest(0, (x,), {}) != input_digest(0, (x.double(),), {})
    assert input_digest(0, (x,), {"mask": None}) != input_digest(0, (x,), {"mask": x})
    before = module_digest(tower)
    with torch.no_grad():
        _layers(tower)[0].mlp.fc1.weight[0, 0] += 1e-6
    assert module_digest(tower) != before
