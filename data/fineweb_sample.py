#!/usr/bin/env python3
"""Unpack the committed FineWeb sample (data/fineweb_sample/, provenance in its SOURCES.md) into data/:

    python3 data/fineweb_sample.py            # -> data/datasets/fineweb_sample_sp1024 (P1's data), the CaseOps
                                              #    export, and data/tokenizers/ (sp1024, SP8192, CaseOps SP8192)

P1 (bench/p1_env.sh) and the tests read these; unpacking twice is a no-op. Nothing is downloaded."""

from __future__ import annotations

import argparse
import lzma
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ARCHIVES = HERE / "fineweb_sample"
SP1024_DATASET, CASEOPS_DATASET = "datasets/fineweb_sample_sp1024", "datasets/fineweb_sample_caseops_record"
SP1024_TOKENIZER = "tokenizers/fineweb_1024_bpe.model"
CASEOPS_TOKENIZER = "tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
PLAIN_SP8192_TOKENIZER = "tokenizers/fineweb_8192_bpe.model"


def unpack(destination: Path = HERE) -> Path:
    """Extract both archives under destination (once: a finished extraction leaves a marker); returns it."""
    marker = destination / "datasets" / ".fineweb_sample_unpacked"
    if not marker.is_file():
        for archive in ("sp1024.tar.xz", "sp8192_caseops_record.tar.xz"):
            with tarfile.open(ARCHIVES / archive) as tar:
                # the "data" filter (no links out, no absolute paths) where this Python has it (3.11.4+, 3.12)
                options = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(destination, **options)
        marker.write_text("data/fineweb_sample.py\n")
    return destination


def documents(limit: int | None = None) -> list[str]:
    """The texts of the sample's first `limit` documents (all 3,100 by default; its 120 validation documents come
    first)."""
    import itertools
    import json

    with lzma.open(ARCHIVES / "docs.jsonl.xz", "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in itertools.islice(f, limit)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--destination", type=Path, default=HERE, help="where datasets/ and tokenizers/ go")
    root = unpack(parser.parse_args().destination)
    print(f"DATA_PATH={root / SP1024_DATASET} TOKENIZER_PATH={root / SP1024_TOKENIZER}")


if __name__ == "__main__":
    main()
