"""Bytes-per-token accounting (#549 section 4) checked against bytes of independently decoded text."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import train_gpt
from conftest import SHARED_DOCS, SHARED_TOKENIZER


def stream_bytes(processor, documents):
    """Bytes the accounting assigns to a BOS-separated stream, and bytes of each document decoded on its own."""
    stream = []
    for ids in processor.encode(documents):
        stream += [1] + ids
    counter = train_gpt.ByteCounter(processor, processor.vocab_size(), torch.device("cpu"))
    tokens = torch.tensor(stream)
    counted = int(counter.count(tokens[:-1], tokens[1:]).sum())
    decoded = sum(len(processor.decode(ids).encode("utf-8")) for ids in processor.encode(documents))
    return counted, decoded


def documents_without_unknown_pieces(processor, texts, limit):
    unk = processor.unk_id()
    kept = [t for t in texts if unk not in processor.encode(t)]
    return kept[:limit]


def test_real_tokenizer_matches_decoded_fineweb_bytes():
    if not (SHARED_TOKENIZER.is_file() and SHARED_DOCS.is_file()):
        pytest.skip("../shared is not present")
    processor = train_gpt.load_tokenizer(str(SHARED_TOKENIZER), 1024)
    texts = [json.loads(line)["text"] for line in SHARED_DOCS.open(encoding="utf-8")][:400]
    documents = documents_without_unknown_pieces(processor, texts, 200)
    assert len(documents) >= 100
    counted, decoded = stream_bytes(processor, documents)
    assert counted == decoded and counted > 500_000


def test_embedded_tokenizer_matches_decoded_bytes(sample_data):
    import build_sample
    from conftest import REPO

    _, tokenizer = sample_data
    processor = train_gpt.load_tokenizer(tokenizer, 1024)
    texts = build_sample.read_documents(REPO / "data" / "sample" / "kjv_chapters.jsonl.xz")[:80]
    counted, decoded = stream_bytes(processor, documents_without_unknown_pieces(processor, texts, 60))
    assert counted == decoded


def test_boundary_rules(sample_data):
    """A BOS target adds 0 bytes; a '▁' piece after BOS loses its space byte, after a word keeps it."""
    _, tokenizer = sample_data
    processor = train_gpt.load_tokenizer(tokenizer, 1024)
    counter = train_gpt.ByteCounter(processor, 1024, torch.device("cpu"))
    spaced = next(i for i in range(4, 1024) if processor.id_to_piece(i).startswith("\u2581")
                  and len(processor.id_to_piece(i)) > 2)
    word = len(processor.id_to_piece(spaced)[1:].encode())
    previous = torch.tensor([spaced, 1, spaced, processor.unk_id()])
    targets = torch.tensor([1, spaced, spaced, spaced])
    assert counter.count(previous, targets).tolist() == [0, word, word + 1, word]
    assert counter.count(torch.tensor([5]), torch.tensor([processor.unk_id()])).tolist() == [0]


def test_bpb_formula():
    scores = train_gpt.ScoreAccumulator(torch.device("cpu"))
    scores.add(torch.full((10,), 2.0), torch.full((10,), 4), torch.ones(10, dtype=torch.bool))
    keep = torch.tensor([True] * 6 + [False] * 3)  # masked positions count nothing, even non-finite padding
    scores.add(torch.tensor([1.0] * 6 + [7.0, float("nan"), float("inf")]), torch.full((9,), 2), keep)
    loss, bpb, tokens, byte_total = scores.result(distributed=False)
    assert tokens == 16 and byte_total == 52
    assert math.isclose(loss, 26 / 16) and math.isclose(bpb, 26 / math.log(2) / 52)
