"""Ahead-of-time compile every Triton kernel for a CUDA target without a GPU (``triton.compile`` + GPUTarget).

The interpreter is lenient (it runs any Python); a real compile catches kernels that would fail on hardware.
``compile_all()`` returns ``{kernel/dtype: ptx byte count}``; used by CI and ``python -m vtok.kernels.compile_check``.
"""

from __future__ import annotations

from vtok.kernels._triton import triton

TL_DTYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


def kernel_specs(dtype: str) -> dict[str, tuple[object, dict[str, str], dict[str, object]]]:
    """``name → (jit function, signature, constexprs)`` for tokens of ``dtype`` (fp32 / fp16 / bf16)."""
    from vtok.kernels import triton_attention as ta
    from vtok.kernels import triton_frames as tf
    from vtok.kernels import triton_match as tm
    from vtok.kernels import triton_select as ts

    p = TL_DTYPES[dtype]
    f32, i64, i8, i32 = "*fp32", "*i64", "*i8", "i32"
    upcast = dtype == "fp32"
    attn_sig = {"q_ptr": p, "k_ptr": p, "kmask_ptr": i8, "qpos_ptr": i64, "kpos_ptr": i64, "m_ptr": f32,
                "l_ptr": f32, "H": i32, "M": i32, "N": i32, "scale": "fp32", "sqb": i32, "sqh": i32, "sqm": i32,
                "skb": i32, "skh": i32, "skn": i32, "smb": i32}
    attn_const = {"HAS_KMASK": True, "CAUSAL": True, "UPCAST": upcast, "BM": 16, "BN": 64, "BD": 128, "DH": 128}
    col_sig = {"q_ptr": p, "k_ptr": p, "kmask_ptr": i8, "qpos_ptr": i64, "kpos_ptr": i64, "m_ptr": f32, "l_ptr": f32,
               "out_ptr": f32, "H": i32, "M": i32, "N": i32, "scale": "fp32", "sqb": i32, "sqh": i32, "sqm": i32,
               "skb": i32, "skh": i32, "skn": i32, "smb": i32}
    match_sig = {"a_ptr": p, "b_ptr": p, "ra_ptr": f32, "rb_ptr": f32, "c_ptr": f32, "best_ptr": f32,
                 "idx_ptr": i64, "NA": i32, "NB": i32, "D": i32, "sab": i32, "san": i32, "sbb": i32, "sbn": i32}
    kc_sig = {"x_ptr": p, "rn_ptr": f32, "sq_ptr": f32, "start_ptr": i64, "out_ptr": i64, "mind_ptr": f32,
              "N": i32, "D": i32, "K": i32, "sxb": i32, "sxn": i32}
    topk_sig = {"s_ptr": p, "out_ptr": i64, "N": i32, "K": i32, "ssb": i32}
    gather_sig = {"x_ptr": p, "idx_ptr": i64, "out_ptr": p, "K": i32, "D": i32, "sxb": i32, "sxn": i32,
                  "sob": i32, "son": i32}
    seg_sig = {"x_ptr": p, "mean_ptr": f32, "sim_ptr": f32, "T": i32, "P": i32, "D": i32, "sxb": i32, "sxn": i32,
               "inv_p": "fp32"}
    return {
        "attention_row_stats": (ta._row_stats_kernel, attn_sig, attn_const),
        "attention_col_sum": (ta._col_sum_kernel, col_sig, attn_const),
        "best_match": (tm._best_match_kernel, match_sig, {"UPCAST": upcast, "BA": 32, "BB": 64, "BD": 64}),
        "kcenter": (ts._kcenter_kernel, kc_sig, {"COSINE": True, "BN": 1024, "BD": 16}),
        "topk_index": (ts._topk_index_kernel, topk_sig, {"BN": 1024}),
        "gather_rows": (ts._gather_rows_kernel, gather_sig, {"BK": 16, "BD": 256}),
        "segment_stats": (tf._segment_stats_kernel, seg_sig, {"BP": 128, "BD": 64}),
    }


def compile_kernel(fn, signature: dict[str, str], constexprs: dict[str, object], arch: int = 90):
    """Compile one kernel for ``sm_<arch>``; returns the compiled kernel (``.asm['ptx']``, ``['cubin']``)."""
    from triton.backends.compiler import GPUTarget

    sig = dict(signature)
    sig.update({k: "constexpr" for k in constexprs})
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=dict(constexprs))
    return triton.compile(src, target=GPUTarget("cuda", arch, 32))


def compile_all(arch: int = 90, dtypes: tuple[str, ...] = ("fp32", "fp16", "bf16")) -> dict[str, int]:
    out = {}
    for dt in dtypes:
        for name, (fn, sig, const) in kernel_specs(dt).items():
            k = compile_kernel(fn, sig, const, arch)
            out[f"{name}/{dt}"] = len(k.asm["cubin"])
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Compile every vtok Triton kernel for a CUDA target, no GPU needed.")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "fp16", "bf16"], choices=sorted(TL_DTYPES))
    args = ap.parse_args()
    for key, size in compile_all(args.arch, tuple(args.dtypes)).items():
        print(f"{key:28s} sm_{args.arch} cubin {size} bytes")
