#!/usr/bin/env python3
"""Times the start-up byte accounting at the challenge's size: #549's lookup table and the decode audit on a
62,021,633-token validation stream (the sample's validation shard tiled), with the challenge's sp1024 tokenizer;
with --caseops, the sidecar audit on 47,851,521 tokens of the record's CaseOps export of the sample's first 3,000
documents (data/caseops.py, the record's export entry for entry), tiled, with the record's tokenizer.

    python3 bench/audit_bytes.py [--shard S] [--tokenizer T] > logs/bench_audit_bytes.txt
    python3 bench/audit_bytes.py --caseops > logs/bench_audit_sidecar.txt
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
CASEOPS_CHALLENGE_TOKENS = 47_851_521  # CaseOps SP8192's 47,851,520 scored targets (tools/pack_record.py) plus one
CASEOPS_TOKENIZER = "data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
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


def caseops_sidecar_audit() -> None:
    """The sidecar audit (decode audit, zero charges, byte-fallback placement, deficit windows) at CaseOps' size."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
    import fineweb_sample
    from caseops import encode_documents

    processor = tg.load_tokenizer(CASEOPS_TOKENIZER, 8192)
    sample = tuple(map(np.array, encode_documents(processor, fineweb_sample.documents(3000))))
    tiles = -(-CASEOPS_CHALLENGE_TOKENS // len(sample[0]))
    tokens, costs = (np.tile(a, tiles)[:CASEOPS_CHALLENGE_TOKENS] for a in sample)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, numpy {np.__version__}; "
        f"tokens {len(tokens):,} ({len(sample[0]):,}-token CaseOps export of 3,000 sample documents tiled)"
    )
    started = time.perf_counter()
    audit = tg.audit_bytes(processor, tokens, costs[1:].astype(np.int64), tg.caseops_operators(processor))
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"sidecar audit: {seconds:.1f} s; peak memory {peak:.1f} GiB; {audit}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shard", default=SAMPLE_SHARD)
    parser.add_argument("--tokenizer", default="data/tokenizers/fineweb_1024_bpe.model")
    parser.add_argument("--caseops", action="store_true", help="the CaseOps sidecar audit instead")
    args = parser.parse_args()
    if args.caseops:
        caseops_sidecar_audit()
        return
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
