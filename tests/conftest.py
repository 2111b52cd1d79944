"""Suite-wide set-up.

Without CUDA, Triton kernels can only run in its CPU interpreter, and `TRITON_INTERPRET=1` must be set before any
`@triton.jit` function is defined: set it here, before any test module can import a kernel launcher (directly, or
through a model whose Triton backend runs). The interpreter's numeric fixes are installed by tests/triton_interpreter.py
in the folders that launch kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# jupyter_server's fixtures (jp_fetch, jp_root_dir, ...) for tests/server; pytest requires plugins at the top level
pytest_plugins = ["pytest_jupyter.jupyter_server"]
