"""Fused kernels vs the reference, under the Triton interpreter (conftest sets TRITON_INTERPRET=1 before any
triton import), plus torch.library.opcheck, torch.compile(fullgraph=True), and an sm_90 compile without a GPU.

Tolerances: values in fp32 agree to 1e-5 absolute (softmax sums / cosine) and 1e-4 relative for squared
distances; half-precision inputs are accumulated in fp32 on both sides, so the same bounds hold. Selections
(argmax / k-center / top-k indices) must be index-exact.
"""

import os
import subprocess
import sys

import pytest
import torch

from vtok.kernels import ops
from vtok.kernels import reference as R
from vtok.kernels.triton_attention import attention_received_triton
from vtok.kernels.triton_frames import segment_stats_triton
from vtok.kernels.triton_match import cosine_argmax_triton, kmeans_assign_triton
from vtok.kernels.triton_select import farthest_point_triton, stable_topk_triton, topk_gather_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_interpreter_is_on():
    assert os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 5, 37, 24), (1, 2, 20, 70, 16), (1, 1, 1, 13, 8)])
def test_attention_received(dtype, shape):
    b, h, m, n, dh = shape
    q = torch.randn(b, h, m, dh, generator=_g()).to(dtype)
    k = torch.randn(b, h, n, dh, generator=_g(1)).to(dtype)
    for head_mean in (True, False):
        ref = R.attention_received(q, k, head_mean=head_mean)
        out = attention_received_triton(q, k, head_mean=head_mean)
        assert out.dtype == torch.float32 and out.shape == ref.shape
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_attention_received_masks_and_causal():
    b, h, m, n, dh = 2, 2, 6, 29, 16
    q, k = torch.randn(b, h, m, dh, generator=_g()), torch.randn(b, h, n, dh, generator=_g(1))
    km = torch.rand(b, n, generator=_g(2)) > 0.3
    qp, kp = torch.arange(n - m, n), torch.arange(n)
    kw = dict(key_mask=km, q_pos=qp, k_pos=kp)
    torch.testing.assert_close(attention_received_triton(q, k, **kw), R.attention_received(q, k, **kw),
                               atol=1e-5, rtol=1e-5)
    # a query that sees no key contributes nothing
    kw = dict(q_pos=torch.full((m,), -1), k_pos=kp)
    assert attention_received_triton(q, k, **kw).abs().max() == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_cosine_argmax(dtype):
    a = torch.randn(2, 37, 20, generator=_g()).to(dtype)
    b = torch.randn(2, 70, 20, generator=_g(1)).to(dtype)
    s_ref, i_ref = R.cosine_argmax(a, b)
    s, i = cosine_argmax_triton(a, b)
    assert torch.equal(i, i_ref)
    torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kmeans_assign(dtype):
    x = torch.randn(2, 45, 12, generator=_g()).to(dtype)
    c = torch.randn(2, 7, 12, generator=_g(1)).to(dtype)
    i_ref, d_ref = R.kmeans_assign(x, c)
    i, d = kmeans_assign_triton(x, c)
    assert torch.equal(i, i_ref)
    torch.testing.assert_close(d, d_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_farthest_point(metric, dtype):
    x = torch.randn(3, 53, 24, generator=_g()).to(dtype)
    start = torch.tensor([3, 0, 52])
    assert torch.equal(farthest_point_triton(x, 11, start, metric), R.farthest_point(x, 11, start=start, metric=metric))


@pytest.mark.parametrize("n,k", [(53, 10), (64, 64), (7, 1), (100, 37)])
def test_stable_topk_and_gather(n, k):
    s = torch.randn(3, n, generator=_g())
    s[0, : min(n, 6)] = 2.5  # ties resolve to the lower index
    assert torch.equal(stable_topk_triton(s, k), R.stable_topk(s, k))
    x = torch.randn(3, n, 40, generator=_g(1)).to(torch.bfloat16)
    i, g = topk_gather_triton(x, s, k)
    i_ref, g_ref = R.topk_gather(x, s, k)
    assert torch.equal(i, i_ref) and torch.equal(g, g_ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_segment_stats(dtype):
    x = torch.randn(2, 5 * 13, 24, generator=_g()).to(dtype)
    m_ref, s_ref = R.segment_stats(x, 5)
    m, s = segment_stats_triton(x, 5)
    torch.testing.assert_close(m, m_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-5)


def _op_cases():
    x = torch.randn(2, 30, 8, generator=_g())
    return {
        "attention_received": (torch.randn(1, 2, 3, 8), torch.randn(1, 2, 30, 8), 0.3, None, None, None, True),
        "cosine_argmax": (x, x[:, :10]),
        "farthest_point": (x, 5, None, "cosine"),
        "stable_topk": (torch.randn(2, 30, generator=_g(2)), 4),
        "topk_gather": (x, torch.randn(2, 30, generator=_g(3)), 4),
        "segment_stats": (x, 5),
        "kmeans_assign": (x, x[:, :4].clone()),
    }


@pytest.mark.parametrize("name", ops.FUSED_OPS)
def test_opcheck(name):
    torch.library.opcheck(getattr(torch.ops.vtok, name).default, _op_cases()[name])


def test_ops_dispatch_to_reference_on_cpu():
    x = torch.randn(2, 30, 8, generator=_g())
    assert not ops.use_triton(x)
    assert torch.equal(ops.farthest_point(x, 6), R.farthest_point(x, 6))


def test_torch_compile_fullgraph_over_strategies():
    import vtok
    from vtok.context import Context

    x = torch.randn(2, 48, 16, generator=_g())
    attn = torch.softmax(torch.randn(2, 48, generator=_g(1)), -1)
    cls_fn = vtok.get_method("cls_attn").fn

    def f(x, a):
        return cls_fn(x, 12, Context(cls_attn=a)).keep

    assert torch.equal(torch.compile(f, fullgraph=True)(x, attn), f(x, attn))

    def g(x):
        return ops.farthest_point(x, 6, metric="cosine")

    assert torch.equal(torch.compile(g, fullgraph=True)(x), g(x))


def test_every_kernel_compiles_for_sm90(tmp_path):
    """A real (non-interpreted) compile to PTX and cubin for sm_90, no GPU needed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    out = subprocess.run([sys.executable, "-m", "vtok.kernels.compile_check", "--dtypes", "fp32", "bf16"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if "cubin" in ln]
    assert len(lines) == 14, out.stdout
