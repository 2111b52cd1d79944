"""Model tests that run the Triton backend use the CPU interpreter with its numeric bugs fixed
(tests/triton_interpreter.py, imported here before any kernel module). The torch-backend tests are unaffected."""

from __future__ import annotations

import tests.triton_interpreter  # noqa: F401  (sets TRITON_INTERPRET before any kernel module is imported)
