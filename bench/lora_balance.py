#!/usr/bin/env python3
"""Seconds per rank of document-LoRA TTT on 8 ranks: #2014's scheme (ranks claim the queue's next batch from a shared
counter) against ours (balanced_owners: each phase's batches given out costliest first to the least loaded rank),
both on the queue and settings of a preset, over the validation set's document lengths as #2014's own log shows them.

    .venv/bin/python bench/lora_balance.py [--config "PRESET [VAR=VALUE ...]" ...]   # default: frontier_2014, frontier_next
    .venv/bin/python bench/lora_balance.py --record-log train_seed42.log   # rewrite bench/record2014_batches.csv

The lengths: #2014's queue holds the 50,000 documents sorted by length in batches of 24, and rank 0 logs each batch
it scores as `ttp: bB/2084 ... dl:MIN-MAX` (261 of the 2,084); bench/record2014_batches.csv keeps those (B, MIN, MAX),
and the sorted lengths in between are interpolated. (The preflight's training-shard sample is no stand-in: its 600
documents average 2,064 tokens; the validation set's average 957.)

A chunk step of a batch (its active rows, each padded to the widest window, as lora_step_tokens) costs beta per token
it processes plus delta per token x window (attention's quadratic part); the phase's SGD costs gamma per token of its
stream, split over the ranks. beta, delta and gamma are fitted to #2014's own seed-42 log (rank 0's lines):

    ttpp: phase:1/1 pd:2672 gd:2500 t:269.0s      the longest 2,500+ documents scored (segment 1)
    ttpr: phase:1/1 t:296.6s                      the phase's SGD: 27.6 s
    total_eval_time:572.4s                        the rest scored (segment 2): 275.8 s

under #2014's scheme: delta/beta is the ratio whose two segment times stand as 269.0 to 275.8 (a per-step constant
cannot fit them: with tokens alone segment 2 comes out 15 % long, with a per-step cost longer still). A projection
from one log and a cost model, not a measurement of either code on a GPU: it compares schemes and presets, it does not
claim seconds of 8xH100."""

from __future__ import annotations

import argparse
import heapq
import re
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_gpt as tg  # noqa: E402

RANKS = 8
RECORD_DOCUMENTS, RECORD_BATCH = 50_000, 24
BATCHES_CSV = REPO / "bench" / "record2014_batches.csv"
# #2014's seed-42 log (above): seconds of segment 1, of the phase, of segment 2
RECORD_SEGMENT1_S, RECORD_PHASE_S, RECORD_SEGMENT2_S = 269.0, 296.6 - 269.0, 572.4 - 296.6


class QueueCosts:
    """A preset's LoRA queue on the drawn documents: per batch its chunk steps and processed tokens, the phase's
    pause points and stream tokens."""

    def __init__(self, h: tg.Hyperparameters, spans: np.ndarray):
        self.batches = tg.lora_queue(spans, h)
        chunks = [tg.lora_chunk(h, batch) for batch in self.batches]
        steps = [step_shapes(b, c, h.ttt_lora_context) for b, c in zip(self.batches, chunks)]
        self.steps = np.array([len(rows) for rows, _ in steps], dtype=np.float64)
        self.tokens = np.array([(rows * width).sum() for rows, width in steps], dtype=np.float64)
        self.quadratic = np.array([(rows * width * width).sum() for rows, width in steps], dtype=np.float64)
        self.pauses, sizes = tg.record1855_pauses(self.batches, h.phased_ttt_prefix_docs, h.ttt_phases)
        scored = [np.concatenate(self.batches[:end]) for end in self.pauses]
        phase_docs = [tg.record1855_phase_documents(s, size) for s, size in zip(scored, sizes)]
        self.phase_tokens = np.array([float((d[:, 1] - d[:, 0]).sum()) for d in phase_docs])

    def segments(self) -> list[slice]:
        bounds = [0, *self.pauses, len(self.batches)]
        return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

    def cost(self, beta: float, delta: float) -> np.ndarray:
        return beta * self.tokens + delta * self.quadratic


def step_shapes(docs: np.ndarray, chunk: int, context: int) -> tuple[np.ndarray, np.ndarray]:
    """(active rows, padded window) of each chunk step of a LoRA batch: tg.lora_step_tokens's factors."""
    lengths = docs[:, 1] - docs[:, 0]
    ends = np.minimum(np.arange(1, -(-int(lengths.max()) // chunk) + 1)[:, None] * chunk, lengths)
    active = np.arange(ends.shape[0])[:, None] * chunk < lengths
    width = np.where(active, np.minimum(ends, context), 0).max(1)
    assert np.array_equal(active.sum(1) * width, tg.lora_step_tokens(docs, chunk, context))
    return active.sum(1).astype(np.float64), width.astype(np.float64)


def extract_batches(log: Path):
    """bench/record2014_batches.csv from #2014's log: each `ttp:` line's batch number and document length range."""
    rows = re.findall(r"^ttp: b(\d+)/\d+ .* dl:(\d+)-(\d+) ", log.read_text(), re.M)
    BATCHES_CSV.write_text("batch,min_doc_len,max_doc_len\n" + "".join(f"{b},{lo},{hi}\n" for b, lo, hi in rows))
    print(f"wrote {BATCHES_CSV.relative_to(REPO)}: {len(rows)} batches")


def record_spans() -> np.ndarray:
    """(first, end) target spans of 50,000 documents whose sorted lengths follow #2014's logged batches (a batch B
    holds sorted documents 24(B-1)..24B-1), in a random stream order; a length is #2014's doc_len less 1."""
    table = np.loadtxt(BATCHES_CSV, delimiter=",", skiprows=1, dtype=np.int64).reshape(-1, 3)
    first = (table[:, 0] - 1) * RECORD_BATCH
    last = np.minimum(first + RECORD_BATCH - 1, RECORD_DOCUMENTS - 1)
    known = np.concatenate((first, last))
    order = np.argsort(known, kind="stable")
    values = np.concatenate((table[:, 1], table[:, 2]))[order]
    lengths = np.round(np.interp(np.arange(RECORD_DOCUMENTS), known[order], values)).astype(np.int64) - 1
    lengths = np.random.default_rng(0).permutation(lengths)
    ends = np.cumsum(lengths)
    return np.stack((ends - lengths, ends), 1)


def counter_makespans(costs: np.ndarray, segments: list[slice]) -> list[float]:
    """#2014: within a segment each rank, when free, claims the queue's next batch; the segment ends with its slowest."""
    spans = []
    for segment in segments:
        free = [(0.0, rank) for rank in range(RANKS)]
        for cost in costs[segment]:
            start, rank = heapq.heappop(free)
            heapq.heappush(free, (start + cost, rank))
        spans.append(max(t for t, _ in free))
    return spans


def balanced_makespans(costs: np.ndarray, queue: QueueCosts) -> list[float]:
    """Ours: balanced_owners' static assignment; a segment ends with its most loaded rank."""
    owners = tg.balanced_owners(costs, queue.pauses, RANKS)
    return [max(costs[s][owners[s] == r].sum() for r in range(RANKS)) for s in queue.segments()]


def fit(record: QueueCosts) -> tuple[float, float, float]:
    """(beta, delta, gamma) with which #2014's scheme on its own queue takes the log's segment and phase seconds."""
    target = RECORD_SEGMENT2_S / RECORD_SEGMENT1_S
    best = None
    for ratio in np.geomspace(1e-7, 1e-1, 700):  # delta / beta: the attention part per token of window
        first, second = counter_makespans(record.cost(1.0, ratio), record.segments())
        miss = abs(second / first - target)
        if best is None or miss < best[0]:
            best = (miss, ratio, first, second)
    _, ratio, first, second = best
    beta = RECORD_SEGMENT1_S / first
    print(f"fit: segment 2 / segment 1 = {second / first:.4f} (#2014's log: {target:.4f})")
    gamma = RECORD_PHASE_S / (record.phase_tokens[0] / RANKS)
    return beta, ratio * beta, gamma


def project(name: str, queue: QueueCosts, beta: float, delta: float, gamma: float) -> dict:
    costs = queue.cost(beta, delta)
    phases = gamma * queue.phase_tokens.sum() / RANKS
    counter = counter_makespans(costs, queue.segments())
    balanced = balanced_makespans(costs, queue)
    mean = [costs[s].sum() / RANKS for s in queue.segments()]
    print(
        f"{name}: {len(queue.batches)} batches, {int(queue.steps.sum())} chunk steps, "
        f"{queue.tokens.sum() / 1e6:.0f} M tokens processed, phases' stream {queue.phase_tokens.sum() / 1e6:.1f} M "
        f"tokens ({phases:.1f} s)"
    )
    for label, spans in (("#2014's counter", counter), ("ours, balanced", balanced), ("perfect balance", mean)):
        print(
            f"  {label:16s} segments {' + '.join(f'{s:.1f}' for s in spans)} s + phases {phases:.1f} s = "
            f"{sum(spans) + phases:.1f} s per rank (idle {100 * (1 - sum(mean) / sum(spans)):.1f} %)"
        )
    return dict(counter=sum(counter) + phases, balanced=sum(balanced) + phases)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", help='"PRESET [VAR=VALUE ...]"; the first is fitted to the log')
    parser.add_argument("--record-log", type=Path, help="#2014's train_seed42.log: rewrite the batches table")
    args = parser.parse_args()
    if args.record_log:
        extract_batches(args.record_log)
    spans = record_spans()
    lengths = spans[:, 1] - spans[:, 0]
    print(
        f"documents: {len(spans):,} with #2014's logged lengths ({BATCHES_CSV.name}): mean {lengths.mean():.0f} "
        f"targets, median {np.median(lengths):.0f}, longest {lengths.max()}, {lengths.sum():,} targets in all"
    )
    queues = {}
    for config in args.config or ["frontier_2014", "frontier_next"]:
        preset, *values = config.split()
        queues[config] = QueueCosts(
            tg.Hyperparameters(dict(PRESET=preset, **dict(v.split("=", 1) for v in values))), spans
        )
    record_config = next(iter(queues))
    beta, delta, gamma = fit(queues[record_config])
    print(
        f"fitted to #2014's log under its scheme: {1e9 * beta:.1f} s per G processed tokens + {1e12 * delta:.3f} s "
        f"per T token x window; phase {1e9 * gamma:.1f} s per G stream tokens per rank"
    )
    results = {name: project(name, queue, beta, delta, gamma) for name, queue in queues.items()}
    record = results[record_config]["counter"]
    for name, result in results.items():
        print(f"{name} with our balance: {result['balanced']:.1f} s vs {record_config} as #2014 ran it: {record:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
