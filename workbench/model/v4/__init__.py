"""DeepSeek-V4 blocks: two RoPE tables, sliding-window + compressed (CSA/HCA) attention, its cache, mHC, V4 MoE."""
