"""float64 stays float64: every registered method computes fp64 input in fp64, so near-ties resolve on the exact values.

Two properties over every registered method:

1. **No downcast.** Run on fp64 tokens and fp64 context, no torch operation turns an fp64 tensor into a narrower
   float (the fused ops are routed to their pure-torch references so their insides are seen too).
2. **Near-ties at 1e-12.** For a method whose selection is a function of the *ranking* of a score context key (it is
   invariant under a positive affine map of the score), scores ``0.25 + 1e-12 · s`` — neighbours 1e-12 apart, far
   below fp32's resolution — select exactly what the well-separated scores ``s`` select (the method's own float64
   computation where nothing can tie). Methods whose selection depends on the score *values* are listed in
   :data:`VALUE_DEPENDENT` with the reason; property 1 covers them.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import vtok
from tests.helpers.hyp_settings import examples
from vtok.bench.synthetic import example_context
from vtok.context import Context
from vtok.kernels import ops
from vtok.kernels import reference as ref

METHODS = [m.name for m in vtok.methods()]
B, N, D = 2, 48, 16
NARROW = (torch.float32, torch.float16, torch.bfloat16)
SCORE_KEYS = ("cls_attn", "text_attn", "mid_attn", "attn", "frame_scores", "self_cross_attn", "text_rows_attn")
# selection depends on the score values, not only their order: no affine map leaves it unchanged
VALUE_DEPENDENT = {
    "fitprune": "ranks the product cross x self of two scores",
    "zero_tprune": "PageRank needs a row-stochastic attention graph",
    "transprune": "adds the text attention to the transition variation by magnitude",
    "scope": "saliency times coverage, by value",
    "query_budget": "splits the budget in proportion to the frame scores",
}


class _Downcasts(TorchDispatchMode):
    """Records every op that takes an fp64 tensor and returns a narrower float, with the vtok line that ran it."""

    def __init__(self) -> None:
        super().__init__()
        self.hits: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = tree_leaves((args, kwargs))
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in ins) and any(
                isinstance(t, torch.Tensor) and t.dtype in NARROW for t in tree_leaves(out)):
            frames = [f for f in traceback.extract_stack()[:-1] if "/vtok/" in f.filename]
            where = f"{frames[-1].filename.split('/vtok/')[-1]}:{frames[-1].lineno}" if frames else "?"
            self.hits.append(f"{func} at {where}")
        return out


@pytest.fixture
def transparent_ops(monkeypatch):
    """The fused custom ops call their references directly, so the dispatch mode sees the ops inside them."""
    monkeypatch.setattr(ops, "_attention_received", lambda q, k, scale, key_mask, q_pos, k_pos, head_mean:
                        ref.attention_received(q, k, scale=scale, key_mask=key_mask, q_pos=q_pos, k_pos=k_pos,
                                               head_mean=head_mean))
    monkeypatch.setattr(ops, "_cosine_argmax", ref.cosine_argmax)
    monkeypatch.setattr(ops, "_farthest_point", lambda x, k, start, metric:
                        ref.farthest_point(x, k, start=start, metric=metric))
    monkeypatch.setattr(ops, "_stable_topk", ref.stable_topk)
    monkeypatch.setattr(ops, "_topk_gather", ref.topk_gather)
    monkeypatch.setattr(ops, "_segment_stats", ref.segment_stats)
    monkeypatch.setattr(ops, "_kmeans_assign", ref.kmeans_assign)


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randn(B, N, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("name", METHODS)
def test_float64_input_is_never_downcast(name, transparent_ops):
    tokens = _tokens()
    ctx = example_context(name, tokens, seed=0)
    assert all(v.dtype == torch.float64 for v in ctx.values() if isinstance(v, torch.Tensor) and v.is_floating_point())
    c = Context.build(tokens, ctx)
    k = max(24, {"mustdrop": 12, "sparsevlm": 2}.get(name, 0))
    mode = _Downcasts()
    with mode:
        sel = vtok.get_method(name).fn(tokens, k, c).validate()
        out = sel.apply(tokens, weights=c.get("sizes"))
    assert out.dtype == torch.float64
    assert not mode.hits, f"{name} narrows fp64: {sorted(set(mode.hits))}"


NEAR_TIE_METHODS = [m.name for m in vtok.methods() if (m.needs | m.uses) & set(SCORE_KEYS)
                    and m.name not in VALUE_DEPENDENT]


def test_near_tie_list_is_not_empty():
    assert {"cls_attn", "fastervlm", "vispruner", "visionzip", "prumerge", "pdrop", "holitom_llm"} <= set(
        NEAR_TIE_METHODS)
    assert set(VALUE_DEPENDENT) <= set(METHODS)


@pytest.mark.parametrize("name", NEAR_TIE_METHODS)
@examples(8)
@given(seed=st.integers(0, 2**16), k=st.integers(1, N - 1))
def test_scores_1e12_apart_select_as_in_float64(name, seed, k):
    tokens = _tokens(seed)
    ctx = example_context(name, tokens, seed=seed)
    g = torch.Generator().manual_seed(seed)
    well, near = dict(ctx), dict(ctx)
    for key in SCORE_KEYS:
        if isinstance(ctx.get(key), torch.Tensor):  # ranks 1..n along the last dim, one permutation per sample
            v = ctx[key]  # (shared by heads and query rows, so their means are distinct as well)
            perm = torch.argsort(torch.rand(v.shape[0], v.shape[-1], generator=g), dim=-1).to(torch.float64)
            s = 1.0 + perm.view(v.shape[0], *([1] * (v.dim() - 2)), v.shape[-1]).expand(v.shape).contiguous()
            well[key], near[key] = s, 0.25 + 1e-12 * s
    method = vtok.get_method(name)
    try:
        expected = method.fn(tokens, k, Context.build(tokens, well))
    except ValueError as e:  # a budget below the method's fewest tokens
        assert f"k={k}" in str(e)
        return
    got = method.fn(tokens, k, Context.build(tokens, near))
    assert torch.equal(got.keep, expected.keep), f"{name} k={k}"


def test_fastervlm_keeps_the_larger_of_two_scores_1e12_apart():
    cls_attn = torch.tensor([[0.25, 0.25 + 1e-12, 0.2, 0.3 - 1e-9]], dtype=torch.float64)
    tokens = torch.randn(1, 4, 8, dtype=torch.float64)
    _, sel = vtok.compress(tokens, "fastervlm", keep=2, cls_attn=cls_attn)
    assert sel.keep.tolist() == [[1, 3]]
    assert ops.stable_topk(cls_attn, 2).tolist() == [[1, 3]]


def test_fused_ops_keep_float64():
    x = _tokens()
    assert ops.cosine_argmax(x, x)[0].dtype == torch.float64
    assert ops.kmeans_assign(x, x[:, :4])[1].dtype == torch.float64
    assert all(t.dtype == torch.float64 for t in ops.segment_stats(x, 4))
    q = x.view(B, 1, N, D)
    assert ops.attention_received(q[:, :, :3], q).dtype == torch.float64
    assert ops.nearest_neighbor_distance(x).dtype == torch.float64
    assert ops.pagerank(torch.softmax(x @ x.transpose(1, 2), -1)).dtype == torch.float64
