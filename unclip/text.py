"""Caption text checks shared by the CLIP's encoder and the dataset loader."""

from __future__ import annotations

__all__ = ["has_printable"]


def has_printable(text: str) -> bool:
    """Whether `text` has a character that is printable and not a space (something a tokenizer reads as a word)."""
    return any(ch.isprintable() and not ch.isspace() for ch in text)
