"""A byte-level BPE tokenizer trained with HF `tokenizers` on the data layer's corpus."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from emu_edge.runtime.prompt import EMU2_SPECIAL_TOKENS


def train_tokenizer(corpus: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(EMU2_SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # Each line is seen with the leading space the prompt builder gives text segments.
    tok.train_from_iterator([" " + line for line in corpus], trainer)
    return tok


def special_token_ids(tok: Tokenizer) -> dict[str, int]:
    ids = {t: tok.token_to_id(t) for t in EMU2_SPECIAL_TOKENS}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"tokenizer lacks the special tokens {missing}")
    return ids


def encode_text_fn(tok: Tokenizer):
    return lambda text: tok.encode(text, add_special_tokens=False).ids
