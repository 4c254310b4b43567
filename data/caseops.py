"""CaseOps (#1729/#1736, frontier.md A.3): a bijective case transform applied before SentencePiece.

Over maximal runs of ASCII letters: lowercase words stay; TitleCase (and a single capital) becomes TITLE +
lowercase; ALLCAPS (two or more capitals) becomes ALLCAPS + lowercase; any other mix becomes CAPNEXT before each
capital, lowercased. A literal operator character is written ESC + itself, and a literal U+2581 ('▁', which
SentencePiece would read back as a space) is written SPACE_MARK. The operators are private-use characters,
registered as user-defined pieces in the order TITLE, ALLCAPS, CAPNEXT, ESC, SPACE_MARK (ids 4-8, after
pad/bos/eos/unk), which is how train_gpt.py finds them in a tokenizer. The inverse is train_gpt.caseops_decode.

Bytes: BPB is charged against the original text, so every validation token carries its original UTF-8 byte
cost in a uint16 sidecar shard fineweb_val_bytes_NNNNNN.bin (the token shard's header, one entry per token):
operators cost 0, a lowercased letter 1 (the capital it stands for), '▁' in a piece 1 (a space), a byte piece 1,
ESC + c the bytes of c, SPACE_MARK 3 (the bytes of U+2581), BOS 0. The tokenizer uses identity normalization
and byte fallback, so decoding gives back exactly the transformed text.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_gpt import CASEOPS_OPERATORS  # noqa: E402

TITLE, ALLCAPS, CAPNEXT, ESC, SPACE_MARK = CASEOPS_OPERATORS
SPACE_PIECE = "\u2581"
_TOKENS = re.compile(f"[{CASEOPS_OPERATORS}]|{SPACE_PIECE}|[A-Za-z]+")


def _encode_match(match: re.Match) -> str:
    text = match.group(0)
    if text in CASEOPS_OPERATORS:
        return ESC + text
    if text == SPACE_PIECE:
        return SPACE_MARK
    if text.islower():
        return text
    if len(text) == 1 or (text[0].isupper() and text[1:].islower()):
        return TITLE + text.lower()
    if text.isupper():
        return ALLCAPS + text.lower()
    return "".join(CAPNEXT + c.lower() if c.isupper() else c for c in text)


def caseops_encode(text: str) -> str:
    return _TOKENS.sub(_encode_match, text)


def token_byte_costs(processor, ids) -> list[int]:
    """The original UTF-8 bytes each token of one BOS-led document stands for (the sidecar's entries)."""
    costs, escaped = [], False
    for token in ids:
        if processor.is_control(token) or processor.is_unknown(token):
            if processor.is_unknown(token):
                raise ValueError("an unknown piece in CaseOps text: its original bytes are lost (train with byte_fallback)")
            costs.append(0)
            continue
        if processor.is_byte(token):
            costs.append(1)
            continue
        cost = 0
        for char in processor.id_to_piece(token):
            if escaped or char == SPACE_MARK:  # a literal character, or U+2581: 3 bytes either way
                cost, escaped = cost + len(char.encode("utf-8")), False
            elif char == ESC:
                escaped = True
            elif char not in CASEOPS_OPERATORS:
                cost += 1 if char == SPACE_PIECE else len(char.encode("utf-8"))
        costs.append(cost)
    return costs
