"""Triton kernels for MoE Workbench, installed as `workbench_kernels` (the PyPI name `kernels` is taken).

Each launcher module (`fp8_quant`, `fp8_gemm`, `moe_gate`, `fused_moe`, `mla_decode`) holds one op: its
`@triton.jit` kernel(s) and the launcher; their plain-torch references live in `reference`, which imports torch
only. Importing this package imports no Triton: only a launcher module does, and the model imports one only when
the Triton backend is asked for (`workbench.model.dispatch`).
"""
