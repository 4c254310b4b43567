#!/usr/bin/env python3
"""Tokens document LoRA TTT runs through the model on the challenge's 50,000 validation documents, per chunk size:
documents drawn from the FineWeb sample's training-shard lengths scaled to the challenge's sp1024 mean (1,240
tokens), batched and padded as DocumentLoRATrainer does (length order, 64 documents, TTT_LORA_BATCH_TOKENS).

    python3 bench/lora_processed_tokens.py > logs/bench_lora_processed_tokens.txt
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
import fineweb_sample  # noqa: E402
import train_gpt as tg  # noqa: E402

DOCUMENTS, CHALLENGE_MEAN, RANKS, CONTEXT = 50_000, 1_240, 8, 2048


def main() -> None:
    shard = fineweb_sample.unpack() / fineweb_sample.SP1024_DATASET / "fineweb_train_000000.bin"
    spans = tg.document_spans(tg.load_data_shard(shard, 1024))[1:]
    lengths = spans[:, 1] - spans[:, 0]
    print(f"sample: {len(lengths)} documents, mean {lengths.mean():.0f}, median {np.median(lengths):.0f} tokens")
    scaled = np.maximum((lengths * CHALLENGE_MEAN / lengths.mean()).astype(int), 2)
    drawn = np.random.default_rng(0).choice(scaled, DOCUMENTS)
    ends = np.cumsum(drawn)
    docs = tg.lora_document_order(np.stack((ends - drawn, ends), 1), "length")
    for chunk in (48, 64, 96):
        for batch_tokens in (131_072, 65_536):
            batches = tg.lora_batches(docs, 64, batch_tokens, CONTEXT)
            processed = sum(tg.lora_batch_tokens(batch, chunk, CONTEXT) for batch in batches)
            print(
                f"chunk {chunk} TTT_LORA_BATCH_TOKENS {batch_tokens}: {len(batches)} batches, {processed / 1e6:.0f} M "
                f"tokens processed, {processed / RANKS / 1e6:.1f} M per rank of {RANKS}; {drawn.sum() / 1e6:.1f} M scored"
            )


if __name__ == "__main__":
    main()
