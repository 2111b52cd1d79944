"""Triton kernels for MoE Workbench, installed as `workbench_kernels` (the PyPI name `kernels` is taken).

Each module holds one op: the `@triton.jit` kernel, its launcher, and a plain-torch `*_ref` it is tested against.
"""
