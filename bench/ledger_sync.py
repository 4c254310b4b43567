#!/usr/bin/env python3
"""Time the TTT ledger's per-chunk bookkeeping at the challenge's size (62,021,632 validation targets,
TTT_CHUNK_TOKENS=32768: 1,893 chunks), one process, no model: mark every chunk as scored, sync it, check a
training range, then audit — what TestTimeTrainer does around the real scoring and training; then the
bookkeeping of one plain or sliding pass (one sync of the whole range and the audit).

    python3 bench/ledger_sync.py                       # this checkout's train_gpt.py
    python3 bench/ledger_sync.py --script old/train_gpt.py   # another version, to compare
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path
from types import SimpleNamespace

CHALLENGE_VAL_TARGETS, CHUNK_TOKENS = 62_021_632, 32_768


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--script", type=Path, default=Path(__file__).resolve().parents[1] / "train_gpt.py")
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("train_gpt_under_test", args.script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ledger = module.ScoreLedger(CHALLENGE_VAL_TARGETS, SimpleNamespace(world_size=1))
    chunks = -(-CHALLENGE_VAL_TARGETS // CHUNK_TOKENS)
    started = time.perf_counter()
    for chunk in range(chunks):
        lo, hi = chunk * CHUNK_TOKENS, min((chunk + 1) * CHUNK_TOKENS, CHALLENGE_VAL_TARGETS)
        ledger.mark(lo, hi)
        ledger.sync(lo, hi, chunk)
        if chunk < chunks - 1:
            ledger.check_training(chunk, lo, hi)
    summary = ledger.audit()
    print(f"ledger_sync script:{args.script} chunks:{chunks} seconds:{time.perf_counter() - started:.2f} {summary}")
    # A plain or sliding pass: every target marked, one sync of the whole range, the audit.
    ledger = module.ScoreLedger(CHALLENGE_VAL_TARGETS, SimpleNamespace(world_size=1))
    ledger.mark(0, CHALLENGE_VAL_TARGETS)
    started = time.perf_counter()
    ledger.sync(0, CHALLENGE_VAL_TARGETS)
    summary = ledger.audit()
    print(f"ledger_pass script:{args.script} sync_and_audit_seconds:{time.perf_counter() - started:.2f} {summary}")


if __name__ == "__main__":
    main()
