"""HF-format safetensors checkpoints <-> DeepSeekModel, with one name table between them.

- Reads a single `model.safetensors` or shards listed in `model.safetensors.index.json`, tensor by tensor through
  safetensors' memory map, so peak memory is the model plus one tensor; `CheckpointReader` inspects a checkpoint
  larger than RAM one layer at a time.
- On disk routed experts are per expert (`mlp.experts.{e}.gate_proj.weight`), as DeepSeek and transformers save
  them; in memory they are stacked [E, ...]. transformers' fused in-memory `gate_up_proj` layout is read too.
- FP8 (e4m3) weights with `weight_scale_inv` in 128x128 blocks are dequantized block by block; a last partial
  block (V3's kv_a_proj_with_mqa is 576 x 7168) takes the scale of the block it falls in.
- Multi-token-prediction layers (index in [num_hidden_layers, num_hidden_layers + num_nextn_predict_layers)) are
  skipped, and the skip is reported; any other layer index the config does not declare is a mismatch.
- Before the model is built, the tensor names and shapes in the safetensors headers are checked against the config
  (a config of 20,000 layers fails in milliseconds, allocating nothing); every tensor read is checked for NaN/inf.
- An index may name only regular files inside the checkpoint folder (symlinks resolved): no absolute paths, no
  `..`, and nothing that is not a regular file is ever opened (a FIFO would block the reader forever).
- A model that kept its FP8 weights (`keep_fp8=True`) is saved in the same FP8 layout it was read from: e4m3
  codes + fp32 `weight_scale_inv` per linear and per expert under DeepSeek's names, and the
  `quantization_config` in config.json, so it reads back bit for bit (here and in transformers).
Every mismatch raises `CheckpointError` naming the file and tensor.
- `checkpoint_digest` identifies the weights by their bytes (sha256 of config.json and every weight file), cached
  by file size and mtime_ns beside the checkpoint or in the user cache dir.

Modules, in import order: `files` (names, files, `CheckpointReader`), `checks` (layers, header shapes and finite
values against the config), `load` (`load_checkpoint`, `build_meta`), `save` (`save_checkpoint`), `digest`
(`checkpoint_digest`).
"""

from workbench.checkpoint.digest import DIGEST_CACHE_NAME, checkpoint_digest, digest_cache_paths
from workbench.checkpoint.files import (
    INDEX_NAME,
    SINGLE_NAME,
    CheckpointError,
    CheckpointReader,
    dequantize_fp8_blocks,
    hf_to_ours,
    ours_to_hf,
)
from workbench.checkpoint.load import build_meta, load_checkpoint
from workbench.checkpoint.save import fp8_quantization_config, hf_state_dict, save_checkpoint

__all__ = [
    "DIGEST_CACHE_NAME",
    "INDEX_NAME",
    "SINGLE_NAME",
    "CheckpointError",
    "CheckpointReader",
    "build_meta",
    "checkpoint_digest",
    "dequantize_fp8_blocks",
    "digest_cache_paths",
    "fp8_quantization_config",
    "hf_state_dict",
    "hf_to_ours",
    "load_checkpoint",
    "ours_to_hf",
    "save_checkpoint",
]
