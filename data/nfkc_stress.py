#!/usr/bin/env python3
"""The NFKC stress set: every code point that the CaseOps tokenizer's normalizer or Python's NFKC changes, in words,
numbers and tables, exported by the 1.0611 record's own prepare_caseops_data.py (data/nfkc_stress/SOURCES.md).

    python3 data/nfkc_stress.py --tokenizer CASEOPS.model --out docs.jsonl   # the documents (then the record's export)
    python3 data/nfkc_stress.py                                              # unpack the committed export into data/

Each code point c appears in "word{c}word Title{c}Case ALL{c}CAPS {c}start end{c} 12{c}34 3.{c}5 | {c} | x{c}{c}y |
{c}{c}{c} |" (CaseOps operators on either side, a line start after a newline, numbers, a table, doubled and
tripled), 40 code points a document, each document starting with its first code point; then TRAIN_DOCUMENTS
FineWeb documents of the committed sample as training data. The audit must accept every one (tests/test_bpb.py)."""

from __future__ import annotations

import argparse
import json
import tarfile
import unicodedata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ARCHIVES = HERE / "nfkc_stress"
DATASET = "datasets/nfkc_stress_caseops_record"
PER_DOCUMENT, TRAIN_DOCUMENTS = 40, 20


def changed_code_points(processor) -> list[str]:
    """Every code point (no surrogates) that the tokenizer's normalizer (between two private-use marks) or NFKC
    changes."""
    points = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    marked = processor.normalize(["\ue000" + c + "\ue000" for c in points])
    tokenizer = {c for c, m in zip(points, marked) if m.split("\ue000")[1] != c}
    return sorted(tokenizer | {c for c in points if unicodedata.normalize("NFKC", c) != c})


def line(c: str) -> str:
    return f"U+{ord(c):04X} word{c}word Title{c}Case ALL{c}CAPS {c}start end{c} 12{c}34 3.{c}5 | {c} | x{c}{c}y | {c}{c}{c} |"


def documents(processor) -> list[str]:
    points = changed_code_points(processor)
    groups = [points[i : i + PER_DOCUMENT] for i in range(0, len(points), PER_DOCUMENT)]
    return [group[0] + "\n".join(map(line, group)) for group in groups]


def unpack(destination: Path = HERE) -> Path:
    """Extract the committed export (the record's) under destination/DATASET; returns that folder."""
    folder = destination / DATASET
    if not (folder / "fineweb_val_bytes_000000.bin").is_file():
        with tarfile.open(ARCHIVES / "export.tar.xz") as tar:
            options = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(folder, **options)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, help="the CaseOps tokenizer: write the documents' JSON lines")
    parser.add_argument("--out", type=Path, help="where the JSON lines go (stress documents, then training ones)")
    args = parser.parse_args()
    if args.tokenizer is None:
        print(f"DATA_PATH={unpack()}")
        return
    import sentencepiece as spm

    import fineweb_sample

    stress = documents(spm.SentencePieceProcessor(model_file=str(args.tokenizer)))
    train = fineweb_sample.documents(TRAIN_DOCUMENTS)
    with open(args.out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": text}) + "\n" for text in stress + train)
    print(f"{len(stress)} stress documents (--val-docs {len(stress)}), then {len(train)} training documents")


if __name__ == "__main__":
    main()
