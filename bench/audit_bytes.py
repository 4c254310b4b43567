#!/usr/bin/env python3
"""Times the start-up byte accounting at the challenge's size: #549's lookup table and the decode audit on a
62,021,633-token validation stream (the sample's validation shard tiled), with the challenge's sp1024 tokenizer.

    python3 bench/audit_bytes.py [--shard S] [--tokenizer T] > logs/bench_audit_bytes.txt
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

CHALLENGE_TOKENS = 62_021_633  # 62,021,632 scored targets plus the first input
SAMPLE_SHARD = "data/datasets/fineweb_sample_sp1024/fineweb_val_000000.bin"  # python3 data/fineweb_sample.py


def challenge_sized_stream(shard: str) -> np.ndarray:
    """The sample's validation shard tiled to the challenge's token count (also bench/tilt_precompute.py's)."""
    sample = tg.load_data_shard(shard, 1024)
    tokens = np.tile(sample, -(-CHALLENGE_TOKENS // len(sample)))[:CHALLENGE_TOKENS]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, numpy {np.__version__}; "
        f"tokens {len(tokens):,} ({len(sample):,}-token sample tiled)"
    )
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shard", default=SAMPLE_SHARD)
    parser.add_argument("--tokenizer", default="data/tokenizers/fineweb_1024_bpe.model")
    args = parser.parse_args()
    processor = tg.load_tokenizer(args.tokenizer, 1024)
    tokens = challenge_sized_stream(args.shard)
    started = time.perf_counter()
    target_bytes = tg.lookup_target_bytes(processor, tokens)
    table = time.perf_counter() - started
    audit = tg.audit_bytes(processor, tokens, target_bytes, "")
    decoded = time.perf_counter() - started - table
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"lookup table: {table:.1f} s; decode audit: {decoded:.1f} s; peak memory {peak:.1f} GiB; {audit}")


if __name__ == "__main__":
    main()
