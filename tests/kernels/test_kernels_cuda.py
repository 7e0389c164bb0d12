"""The fused kernels on a real GPU (marker ``cuda``): Triton against the eager reference on the same device, at
LLaVA-sized shapes, and the strategies on CUDA against the CPU.

Skipped without CUDA, unless ``VTOK_CUDA_TESTS_ON_CPU=1`` (``benchmarks.gpu_all --dry-run``): then the same tests
run on CPU tensors, small, under the Triton interpreter, so that they cannot rot between GPU loans.
Tolerances as in ``test_kernels.py``; selections index-exact.
"""

import os

import pytest
import torch

from vtok.kernels import ops
from vtok.kernels import reference as R
from vtok.kernels.triton_attention import attention_received_triton
from vtok.kernels.triton_frames import segment_stats_triton
from vtok.kernels.triton_match import cosine_argmax_triton, kmeans_assign_triton
from vtok.kernels.triton_select import farthest_point_triton, stable_topk_triton, topk_gather_triton

ON_CPU = os.environ.get("VTOK_CUDA_TESTS_ON_CPU") == "1" and os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE == "cpu" and not ON_CPU,
                                 reason="needs a CUDA GPU (or VTOK_CUDA_TESTS_ON_CPU=1 with TRITON_INTERPRET=1)")]
SMALL = DEVICE == "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_received(dtype):
    b, h, m, n, dh = (1, 2, 4, 40, 16) if SMALL else (1, 32, 64, 2880, 128)
    q, k = _rand(b, h, m, dh, dtype=dtype), _rand(b, h, n, dh, dtype=dtype, seed=1)
    torch.testing.assert_close(attention_received_triton(q, k), R.attention_received(q, k), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matching(dtype):
    b, n, d = (2, 40, 16) if SMALL else (4, 2880, 1024)
    x = _rand(b, n, d, dtype=dtype)
    a, bb = x[:, ::2], x[:, 1::2]
    s, i = cosine_argmax_triton(a, bb)
    s_ref, i_ref = R.cosine_argmax(a, bb)
    assert (i == i_ref).float().mean() > 0.999  # near-ties may flip under a different summation order
    torch.testing.assert_close(s, s_ref, atol=1e-4, rtol=1e-4)
    c = x[:, : n // 8].contiguous()
    i, dist = kmeans_assign_triton(x, c)
    i_ref, d_ref = R.kmeans_assign(x, c)
    assert (i == i_ref).float().mean() > 0.999
    torch.testing.assert_close(dist, d_ref, atol=1e-2, rtol=1e-3)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_farthest_point(metric):
    b, n, d, k = (2, 50, 16, 9) if SMALL else (2, 2880, 1024, 288)
    x = _rand(b, n, d)
    assert torch.equal(farthest_point_triton(x, k, None, metric), R.farthest_point(x, k, metric=metric))


def test_topk_and_segments():
    b, n, d, t = (2, 60, 16, 4) if SMALL else (4, 2880, 4096, 64)
    s = _rand(b, n)
    assert torch.equal(stable_topk_triton(s, n // 4), R.stable_topk(s, n // 4))
    x = _rand(b, n, d, dtype=torch.bfloat16, seed=2)
    i, g = topk_gather_triton(x, s, n // 4)
    i_ref, g_ref = R.topk_gather(x, s, n // 4)
    assert torch.equal(i, i_ref) and torch.equal(g, g_ref)
    v = _rand(1, t * (n // t), d, seed=3)
    m, sd = segment_stats_triton(v, t)
    m_ref, sd_ref = R.segment_stats(v, t)
    torch.testing.assert_close(m, m_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sd, sd_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["divprune", "tome", "kmeans", "visionzip", "random"])
def test_strategies_on_the_device_match_the_cpu(method):
    import vtok
    from vtok.bench.synthetic import example_context

    x = torch.randn(2, 64 if SMALL else 576, 32 if SMALL else 1024, generator=torch.Generator().manual_seed(4))
    ctx = example_context(method, x, seed=0)
    out_cpu, sel_cpu = vtok.compress(x, method, 0.25, **ctx)
    dev = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in ctx.items()}
    out, sel = vtok.compress(x.to(DEVICE), method, 0.25, **dev)
    assert ops.use_triton(x.to(DEVICE)) == (DEVICE == "cuda")
    assert (sel.keep.cpu() == sel_cpu.keep).float().mean() > 0.99
    torch.testing.assert_close(out.cpu()[sel.keep.cpu() == sel_cpu.keep], out_cpu[sel.keep.cpu() == sel_cpu.keep],
                               atol=1e-4, rtol=1e-4)
