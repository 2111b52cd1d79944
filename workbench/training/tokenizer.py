"""A byte-level BPE tokenizer trained with the `tokenizers` library on the training split.

Byte-level (GPT-2 style) so every string, including any Unicode and any run of spaces, encodes and decodes back
exactly; indentation runs become their own tokens, which the specialisation analysis relies on.
Ids 0 and 1 are `<bos>` / `<eos>`, matching the model config's `bos_token_id` / `eos_token_id`.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS, EOS = "<bos>", "<eos>"


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    if vocab_size < 256 + 2:
        raise ValueError(f"vocab_size {vocab_size} is below the 256 byte tokens + 2 special tokens a byte-level BPE needs")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2, show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.token_to_id(BOS) != 0 or tok.token_to_id(EOS) != 1:
        raise RuntimeError("tokenizers placed the special tokens away from ids 0/1")
    return tok
