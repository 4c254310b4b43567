#!/usr/bin/env python3
"""Is a candidate a new record? Multi-seed means, the difference in BPB and nats/token, a Welch t-test.

    python3 tools/significance.py --candidate logs/seed1337.txt logs/seed42.txt logs/seed2025.txt \
        --baseline-logs base/seed1337.txt base/seed42.txt base/seed2025.txt
    python3 tools/significance.py --candidate logs/seed*.txt --baseline-mean 1.1194

Each log's score is its one final_score line (the last pass its configuration ran). BPB differences
are converted to nats per token with the logs' own validation tokens and bytes:
nats/token = BPB x ln 2 x bytes / tokens. The challenge's bar (README of openai/parameter-golf): a new
record must beat the current one by at least 0.005 nats per token at p < 0.01. Here "met" means: the mean
improvement is >= 0.005 nats AND the one-sided Welch test that the candidate is better gives p < 0.01.
The stricter reading (the improvement itself exceeds 0.005 nats at p < 0.01) is printed too.
Numbers can also be given directly: --candidate-values 1.1190,1.1195 (then pass --tokens-per-byte).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from logparse import final_score, validation_counts  # noqa: E402

BAR_NATS, BAR_P = 0.005, 0.01


@dataclass
class Score:
    source: str
    val_bpb: float
    tokens_per_byte: float | None


def read_score(path: Path) -> Score:
    text = path.read_text(encoding="utf-8", errors="replace")
    score = final_score(text)
    if score is None:
        raise ValueError(f"{path}: no final_score line (a log of train_gpt.py from before that line, or unfinished)")
    counts = validation_counts(text)
    tokens_per_byte = counts[0] / counts[1] if counts else None
    return Score(str(path), score[2], tokens_per_byte)


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) by Lentz's continued fraction (converges fast for x < (a + 1) / (a + b + 2))."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - regularized_incomplete_beta(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * fraction / a


def student_t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df degrees of freedom."""
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def welch_one_sided(candidate: list[float], baseline: list[float], margin: float = 0.0) -> tuple[float, float, float]:
    """p-value of H0: mean(baseline) - mean(candidate) <= margin (lower BPB is better); returns (t, df, p).
    A baseline of one value is taken as a known mean (one-sample t-test)."""
    n_c, mean_c, var_c = len(candidate), statistics.fmean(candidate), statistics.variance(candidate)
    if len(baseline) == 1:
        se2, df = var_c / n_c, n_c - 1
    else:
        n_b, var_b = len(baseline), statistics.variance(baseline)
        se2 = var_c / n_c + var_b / n_b
        df = se2**2 / ((var_c / n_c) ** 2 / (n_c - 1) + (var_b / n_b) ** 2 / (n_b - 1))
    if se2 == 0:
        raise ValueError("zero variance: the test needs spread in the seeds (or more seeds)")
    t = (statistics.fmean(baseline) - mean_c - margin) / math.sqrt(se2)
    return t, df, student_t_sf(t, df)


def parse_values(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def report(candidate: list[Score], baseline: list[Score], tokens_per_byte: float) -> tuple[str, bool]:
    c, b = [s.val_bpb for s in candidate], [s.val_bpb for s in baseline]
    if len(c) < 2:
        raise ValueError("need at least 2 candidate seeds for a t-test")
    nats_per_bpb = math.log(2) / tokens_per_byte
    delta_bpb = statistics.fmean(b) - statistics.fmean(c)
    delta_nats = delta_bpb * nats_per_bpb
    t, df, p = welch_one_sided(c, b)
    _, _, p_margin = welch_one_sided(c, b, margin=BAR_NATS / nats_per_bpb)
    met = delta_nats >= BAR_NATS and p < BAR_P
    describe = lambda xs: (
        f"mean {statistics.fmean(xs):.6f}" + (f" std {statistics.stdev(xs):.6f}" if len(xs) > 1 else "")
    )
    lines = [
        f"candidate: {len(c)} seeds, val_bpb {describe(c)}",
        f"baseline:  {len(b)} {'seeds' if len(b) > 1 else 'value (known mean)'}, val_bpb {describe(b)}",
        f"improvement: {delta_bpb:+.6f} BPB = {delta_nats:+.6f} nats/token "
        f"(tokens/byte {tokens_per_byte:.6f}; the 0.005-nat bar is {BAR_NATS / nats_per_bpb:.6f} BPB here)",
        f"one-sided Welch t-test, candidate better: t = {t:.3f}, df = {df:.2f}, p = {p:.3g}",
        f"stricter reading, improvement > 0.005 nats: p = {p_margin:.3g}",
        f"verdict: the 0.005-nat, p < 0.01 bar is {'MET' if met else 'NOT met'}"
        + ("" if met else (" (improvement below 0.005 nats)" if delta_nats < BAR_NATS else f" (p = {p:.3g} >= 0.01)")),
    ]
    return "\n".join(lines), met


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidate", nargs="*", type=Path, default=[], help="candidate run logs, one per seed")
    parser.add_argument("--candidate-values", type=parse_values, help="candidate val_bpb values, comma-separated")
    baseline = parser.add_mutually_exclusive_group(required=True)
    baseline.add_argument("--baseline-logs", nargs="+", type=Path, help="baseline run logs, one per seed")
    baseline.add_argument("--baseline-values", type=parse_values, help="baseline val_bpb values, comma-separated")
    baseline.add_argument("--baseline-mean", type=float, help="a baseline's published mean val_bpb")
    parser.add_argument("--tokens-per-byte", type=float, help="override (or supply) validation tokens per byte")
    args = parser.parse_args(argv)
    try:
        candidate = [read_score(p) for p in args.candidate] + [
            Score("value", v, None) for v in args.candidate_values or []
        ]
        if args.baseline_logs:
            base = [read_score(p) for p in args.baseline_logs]
        else:
            base = [Score("value", v, None) for v in (args.baseline_values or [args.baseline_mean])]
        ratios = {round(s.tokens_per_byte, 9) for s in candidate + base if s.tokens_per_byte is not None}
        if len(ratios) > 1 and args.tokens_per_byte is None:
            raise ValueError(f"the logs disagree on tokens per byte {sorted(ratios)}: different validation sets?")
        tokens_per_byte = args.tokens_per_byte or (ratios.pop() if ratios else None)
        if tokens_per_byte is None:
            raise ValueError("no validation token/byte counts in the inputs: pass --tokens-per-byte")
        text, met = report(candidate, base, tokens_per_byte)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(text)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
