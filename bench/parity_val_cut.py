#!/usr/bin/env python3
"""The record-parity runs' CaseOps data: the committed export written by #1855's own script, with its validation
shard (and byte sidecar) cut to the first N documents, the training shard unchanged:

    python3 bench/parity_val_cut.py SOURCE_DIR OUT_DIR [N=20]

#1855's phased TTT over the export's 120 validation documents takes several times longer on this CPU than over
20; both codes read the same OUT_DIR (bench/parity_run.sh)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "data"))
from build_sample import write_shard  # noqa: E402

HEADER_BYTES, BOS_ID = 1024, 1


def main(source: Path, out: Path, documents: int = 20) -> None:
    tokens = np.fromfile(source / "fineweb_val_000000.bin", dtype="<u2", offset=HEADER_BYTES)
    sidecar = np.fromfile(source / "fineweb_val_bytes_000000.bin", dtype="<u2", offset=HEADER_BYTES)
    starts = np.flatnonzero(tokens == BOS_ID)
    if len(starts) <= documents or len(sidecar) != len(tokens):
        raise SystemExit(f"{source}: needs more than {documents} validation documents and a sidecar of equal length")
    cut = int(starts[documents])
    out.mkdir(parents=True, exist_ok=True)
    write_shard(out / "fineweb_val_000000.bin", tokens[:cut])
    write_shard(out / "fineweb_val_bytes_000000.bin", sidecar[:cut])
    for train in sorted(source.glob("fineweb_train_*.bin")):
        shutil.copyfile(train, out / train.name)
    print(f"{out}: {documents} validation documents, {cut} tokens; training shards as {source}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), *(int(a) for a in sys.argv[3:]))
