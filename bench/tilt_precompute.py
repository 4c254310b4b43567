#!/usr/bin/env python3
"""Times NGRAM_TILT's hint precompute at the challenge's size: one order alone, then rank 0's share of an
8-rank run (orders 16 and 8, side by side in threads), on a 62,021,633-token stream (the sample's validation
shard tiled: its repeats make hints common, the sorts cost the same).

    python3 bench/tilt_precompute.py [--shard S] [--ranks R] > logs/bench_tilt_precompute.txt
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_gpt as tg  # noqa: E402
from audit_bytes import SAMPLE_SHARD, challenge_sized_stream  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shard", default=SAMPLE_SHARD)
    parser.add_argument("--ranks", type=int, default=8, help="the run's rank count; rank 0's orders are timed")
    args = parser.parse_args()
    tokens = challenge_sized_stream(args.shard)
    started = time.perf_counter()
    tg.ngram_hint_counts(tokens, 8)
    print(f"one order (8): {time.perf_counter() - started:.1f} s")
    rank0 = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"), log=lambda message: None)
    orders = list(tg.NGRAM_TILT_ORDERS[0 :: args.ranks])
    original, tg.NGRAM_TILT_ORDERS = tg.NGRAM_TILT_ORDERS, orders  # rank 0's share, without a process group
    tilt = tg.NgramTilt(tokens, 2.0, rank0)
    tg.NGRAM_TILT_ORDERS = original
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"rank 0 of {args.ranks} (orders {orders}, in threads): {tilt.seconds:.1f} s; peak memory {peak:.1f} GiB; "
        f"hinted {(tilt.hint >= 0).mean():.4f} of the targets by these orders"
    )


if __name__ == "__main__":
    main()
