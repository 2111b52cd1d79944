"""Safetensors checkpoints <-> DeepSeekModel, with one name table per layout between them.

- Reads a single `model.safetensors` or shards listed in `model.safetensors.index.json`, tensor by tensor through
  safetensors' memory map, so peak memory is the model plus one tensor; `CheckpointReader` inspects a checkpoint
  larger than RAM one layer at a time.
- Layouts (`layouts`, `checkpoint_layout`): transformers' save_pretrained names ("hf"; V2/V3/V3.2 always), and for
  V4 also DeepSeek's released hub names ("hub": `layers.3.attn.wq_a.weight`, `embed.weight`, `.scale`) and
  transformers' in-memory names ("internal"). The layout is told from the names alone; names of two layouts in one
  checkpoint are refused.
- On disk routed experts are per expert (`mlp.experts.{e}.gate_proj.weight`, V4: `ffn.experts.{e}.w1.weight`), as
  DeepSeek and transformers save them; in memory they are stacked [E, ...]. transformers' fused in-memory
  `gate_up_proj` layout is read too.
- FP8 (e4m3) weights with fp32 `weight_scale_inv` or ue8m0 `.scale` (DeepSeek-V4) in 128x128 blocks are dequantized
  block by block; a last partial block (V3's kv_a_proj_with_mqa is 576 x 7168) takes the scale of the block it
  falls in. FP4 (e2m1) experts, int8 [N, K/2] with ue8m0 scales [N, K/32], are dequantized exactly
  (`workbench.model.fp4`).
- Multi-token-prediction layers (index in [num_hidden_layers, num_hidden_layers + num_nextn_predict_layers), or V4's
  `mtp.K.*`) are skipped, and the skip is reported; any other layer index the config does not declare is a mismatch.
- Before the model is built, the tensor names and shapes in the safetensors headers are checked against the config
  (a config of 20,000 layers fails in milliseconds, allocating nothing); every tensor read is checked for NaN/inf.
- An index may name only regular files inside the checkpoint folder (symlinks resolved): no absolute paths, no
  `..`, and nothing that is not a regular file is ever opened (a FIFO would block the reader forever).
- `keep_fp8=True` keeps FP8 codes and scales in the modules that run them (`FP8Linear`, FP8 `Experts`); FP4 experts
  and FP8 weights of other modules (V4's grouped o_a_proj) are held dequantized (exact in fp32 and bf16) with their
  stored scales beside the model (`model.checkpoint_source`), so `save_checkpoint` writes the checkpoint back bit for
  bit: same layout, names, dtypes and bytes, and its `quantization_config` (here and in transformers).
Every mismatch raises `CheckpointError` naming the file and tensor.
- `checkpoint_digest` identifies the weights by their bytes (sha256 of config.json and every weight file), cached
  by file size and mtime_ns beside the checkpoint or in the user cache dir.

Modules, in import order: `layouts` (the name tables), `files` (files, `CheckpointReader`), `checks` (layers,
header shapes and finite values against the config), `load` (`load_checkpoint`, `build_meta`), `save`
(`save_checkpoint`), `digest` (`checkpoint_digest`).
"""

from workbench.checkpoint.digest import DIGEST_CACHE_NAME, checkpoint_digest, digest_cache_paths
from workbench.checkpoint.files import (
    INDEX_NAME,
    SINGLE_NAME,
    CheckpointError,
    CheckpointReader,
    CheckpointSource,
    checkpoint_layout,
    dequantize_fp8_blocks,
    hf_to_ours,
    ours_to_hf,
)
from workbench.checkpoint.layouts import LAYOUTS, CheckpointLayout
from workbench.checkpoint.load import build_meta, load_checkpoint
from workbench.checkpoint.save import default_layout, fp8_quantization_config, hf_state_dict, save_checkpoint

__all__ = [
    "DIGEST_CACHE_NAME",
    "INDEX_NAME",
    "LAYOUTS",
    "SINGLE_NAME",
    "CheckpointError",
    "CheckpointLayout",
    "CheckpointReader",
    "CheckpointSource",
    "build_meta",
    "checkpoint_digest",
    "checkpoint_layout",
    "default_layout",
    "dequantize_fp8_blocks",
    "digest_cache_paths",
    "fp8_quantization_config",
    "hf_state_dict",
    "hf_to_ours",
    "load_checkpoint",
    "ours_to_hf",
    "save_checkpoint",
]
