"""A byte-level tokenizer built in code: one token per UTF-8 byte, for tests that need text with no download."""

from __future__ import annotations

from typing import Any

__all__ = ["BYTE_VOCAB_SIZE", "byte_tokenizer"]

SPECIALS = ("<s>", "</s>", "<pad>")
#: 256 byte tokens plus ``<s>``, ``</s>`` and ``<pad>``: give tiny models ``vocab_size=BYTE_VOCAB_SIZE``.
BYTE_VOCAB_SIZE = 256 + len(SPECIALS)


def byte_tokenizer() -> Any:
    """A ``PreTrainedTokenizerFast`` that maps each UTF-8 byte to one token (ids 0-255; specials after).

    Any text round-trips through it exactly, so tests can run text through tiny random models.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda ch: _byte_of(ch))
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    for name in SPECIALS:
        vocab[name] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _byte_of(char: str) -> int:
    """The byte that GPT-2's byte-to-unicode table maps to ``char``."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    if ord(char) in printable:
        return ord(char)
    others = [b for b in range(256) if b not in printable]
    return others[ord(char) - 256]
