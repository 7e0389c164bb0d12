"""The fused kernels against the reference (Triton interpreter on the CPU)."""
