"""The model package, in the order its modules import each other (each imports only modules above it):

- `dispatch`: backend choice and the per-run FP8 switch, which every block asks; imports no block, and Triton only
  when a kernel runs. `quant`: DeepSeek-V3's FP8 recipe in torch.
- Blocks, one component each: `norm`, `rope`, `attention`, `cache`, `indexer` (V3.2's lightning indexer), `mla`,
  `routing`, `experts`, `fp8_linear`, `moe`, `block` (the decoder layer with a plain residual stream).
- `families/`: one small module per family (`v2`, `v3`, `v32`) assembling blocks from its config; the registry keyed by HF
  `model_type` (`families.family_for`).
- `transformer`: `DeepSeekModel`, the decoder a family's blocks make up. Beside it, whole-model operations:
  `fp8` (enable/disable FP8 sites), `backend` (`set_backend`), `costs`, `sampling`.
"""
