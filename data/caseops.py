"""CaseOps (lossless_caps_caseops_v1 of #1729, as the 1.0611 record #1855 exports it): a bijective case transform
applied before SentencePiece, and the per-token byte sidecar of the original text.

Over maximal runs of ASCII letters: lowercase words stay; ALLCAPS words of two or more letters become ALLCAPS +
lowercase; a capital followed by lowercase letters (or a single capital) becomes TITLE + lowercase; any other mix
becomes TITLE (when the first letter is a capital) then the lowercased letters with CAPNEXT before each later
capital ("McDonald" -> TITLE "mc" CAPNEXT "donald"). A literal operator character is written ESC + itself; nothing
else is escaped (U+E000 and U+2581 pass through as text, as in the record). The operators are the private-use
characters U+E001 TITLE, U+E002 ALLCAPS, U+E003 CAPNEXT, U+E004 ESC, registered as user-defined pieces 4-7 (after
pad/bos/eos/unk), which is how train_gpt.py finds them in a tokenizer; the inverse is train_gpt.caseops_decode.

Bytes: BPB is charged against the ORIGINAL text, so every validation token carries its original UTF-8 byte count
in a uint16 sidecar shard fineweb_val_bytes_NNNNNN.bin (the token shard's header, one entry per token), counted from
the span of the input each piece covers (SentencePiece's `surface`): operators 0, ESC + c the bytes of c, every
other character its UTF-8 bytes, BOS 0. A byte-fallback character's span lies on its last byte piece (the others
count 0). With a normalizing tokenizer (the record's: NFKC, extra whitespace removed) the spans are those of the
text before normalization, so a document's entries sum to its original UTF-8 length while SentencePiece's decode
returns the normalized text: the two differ wherever normalization changed something (about 1 document in 20 of
the sample). Surfaces need the protobuf package (sentencepiece's encode_as_proto).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_gpt import BOS_ID, CASEOPS_OPERATORS  # noqa: E402

TITLE, ALLCAPS, CAPNEXT, ESC = CASEOPS_OPERATORS
_TOKENS = re.compile(f"[{CASEOPS_OPERATORS}]|[A-Za-z]+")


def _encode_match(match: re.Match) -> str:
    word = match.group(0)
    if word in CASEOPS_OPERATORS:
        return ESC + word
    if word.islower():
        return word
    lower = word.lower()
    if len(word) >= 2 and word.isupper():
        return ALLCAPS + lower
    if word[0].isupper() and word[1:].islower():
        return TITLE + lower
    later = "".join(CAPNEXT + low if char.isupper() else low for char, low in zip(word[1:], lower[1:]))
    return (TITLE if word[0].isupper() else "") + lower[0] + later


def caseops_encode(text: str) -> str:
    return _TOKENS.sub(_encode_match, text)


def surface_byte_counts(surfaces) -> list[int]:
    """Original UTF-8 bytes of each piece's input span: operators 0, an escaped character its bytes (the ESC may
    end the previous piece)."""
    counts, escaped = [], False
    for surface in surfaces:
        count = 0
        for char in surface:
            if escaped or char not in CASEOPS_OPERATORS:
                count, escaped = count + len(char.encode("utf-8")), False
            elif char == ESC:
                escaped = True
        counts.append(count)
    if escaped:
        raise ValueError("CaseOps text ends with a dangling ESC")
    return counts


def encode_document(processor, text: str) -> tuple[list[int], list[int]]:
    """One document's tokens (BOS first) and their sidecar entries (0 for the BOS)."""
    pieces = processor.encode_as_proto(caseops_encode(text)).pieces
    if any(piece.id == processor.unk_id() for piece in pieces):
        raise ValueError("an unknown piece in CaseOps text: its original bytes are lost (train with byte_fallback)")
    return [BOS_ID] + [piece.id for piece in pieces], [0] + surface_byte_counts(piece.surface for piece in pieces)


def encode_documents(processor, texts) -> tuple[list[int], list[int]]:
    """Documents as one stream, as the record's export writes a shard: their tokens and sidecar entries."""
    encoded = [encode_document(processor, text) for text in texts]
    return [t for ids, _ in encoded for t in ids], [c for _, costs in encoded for c in costs]
