"""Shared fixtures: the repository on sys.path, the KJV and FineWeb samples, run helpers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "data"))
import fineweb_sample  # noqa: E402

# The committed FineWeb sample (data/fineweb_sample/SOURCES.md), unpacked into data/ (ignored by git) once
FINEWEB = fineweb_sample.unpack()
SAMPLE_TOKENIZER = FINEWEB / fineweb_sample.SP1024_TOKENIZER
SAMPLE_DATASET = FINEWEB / fineweb_sample.SP1024_DATASET
# The 1.0611 record's CaseOps tokenizer and an export of the sample written by its own prepare_caseops_data.py
RECORD_CASEOPS_TOKENIZER = FINEWEB / fineweb_sample.CASEOPS_TOKENIZER
RECORD_CASEOPS_DATASET = FINEWEB / fineweb_sample.CASEOPS_DATASET
PLAIN_SP8192_TOKENIZER = FINEWEB / fineweb_sample.PLAIN_SP8192_TOKENIZER  # a record's plain SP8192
P1_ENV = REPO / "bench" / "p1_env.sh"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "data"))
torch.set_num_threads(2)

# The smallest config that still exercises every feature: XSA, VE, BigramHash, U-Net skips, late QAT.
TINY_ENV = {
    "NUM_LAYERS": "4",
    "MODEL_DIM": "64",
    "NUM_HEADS": "4",
    "NUM_KV_HEADS": "2",
    "MLP_MULT": "2",
    "TRAIN_SEQ_LEN": "64",
    "EVAL_SEQ_LEN": "64",
    "TRAIN_BATCH_TOKENS": "2048",
    "ITERATIONS": "12",
    "WARMDOWN_ITERS": "4",
    "WARMUP_STEPS": "1",
    "MAX_WALLCLOCK_SECONDS": "0",
    "VAL_LOSS_EVERY": "0",
    "TRAIN_LOG_EVERY": "1",
    "VAL_BATCH_SIZE": "65536",
    "MUON_MOMENTUM_WARMUP_STEPS": "4",
    "EMA_DECAY": "0.9",
    "VE_LAYERS": "2,3",
    "VE_DIM": "16",
    "XSA_LAST_N": "2",
    "BIGRAM_VOCAB_SIZE": "256",
    "BIGRAM_DIM": "16",
    "ROPE_DIMS": "8",
    "SEED": "1337",
    "EVAL_STRIDE": "32",
    "TTT_EPOCHS": "1",
    "TTT_CHUNK_TOKENS": "65536",
    "TTT_BATCH_SEQS": "32",
}


def tiny_hyperparameters(**overrides):
    import train_gpt

    env = dict(TINY_ENV, DATA_PATH="unused", TOKENIZER_PATH="unused")
    env.update({k: str(v) for k, v in overrides.items()})
    return train_gpt.Hyperparameters(env)


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
    """The embedded KJV sample, built offline into a temporary directory: (dataset_dir, tokenizer_path)."""
    import build_sample

    root = tmp_path_factory.mktemp("sample")
    info = build_sample.build(REPO / "data" / "sample" / "kjv_chapters.jsonl.xz", root)
    return str(info["dataset"]), str(info["tokenizer"])


@pytest.fixture(scope="session")
def whole_sample_caseops(tmp_path_factory):
    """The record's CaseOps export of all 3,100 sample documents, the first 3,000 as validation (as
    `prepare_caseops_data.py --val-docs 3000`): data/caseops.py, which writes the record's script's export token for
    token and entry for entry. (folder, the validation documents' original UTF-8 bytes)."""
    import build_sample
    import sentencepiece as spm
    from caseops import encode_documents

    processor = spm.SentencePieceProcessor(model_file=str(RECORD_CASEOPS_TOKENIZER))
    texts = fineweb_sample.documents()
    folder = tmp_path_factory.mktemp("whole_sample_caseops")
    tokens, entries = encode_documents(processor, texts[:3000])
    build_sample.write_shard(folder / "fineweb_val_000000.bin", tokens)
    build_sample.write_shard(folder / "fineweb_val_bytes_000000.bin", entries)
    build_sample.write_shard(folder / "fineweb_train_000000.bin", encode_documents(processor, texts[3000:])[0])
    return folder, sum(len(text.encode("utf-8")) for text in texts[:3000])


@pytest.fixture(scope="session")
def nfkc_stress_export(tmp_path_factory) -> Path:
    """The record's export of the NFKC stress documents (data/nfkc_stress.py), unpacked."""
    import nfkc_stress

    return nfkc_stress.unpack(tmp_path_factory.mktemp("nfkc_stress"))


@pytest.fixture(scope="session")
def fineweb_or_sample():
    """Real FineWeb text: the committed sample's sp1024 export (dataset_dir, tokenizer_path)."""
    return str(SAMPLE_DATASET), str(SAMPLE_TOKENIZER)


def clean_environment() -> dict:
    """The parent environment minus every variable train_gpt.py reads (so a developer's exports don't leak)."""
    import train_gpt

    names = set(train_gpt.Hyperparameters({}).env_names) | set(train_gpt.DROPPED_RECORD_VARIABLES)
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.update(OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    return env


def run_script(cwd: Path, env_overrides: dict, args=(), timeout=600, nproc: int = 1, script=None):
    """Run train_gpt.py (or torchrun with nproc ranks) in cwd; returns the CompletedProcess."""
    env = clean_environment()
    env.update({k: str(v) for k, v in env_overrides.items()})
    script = str(script or REPO / "train_gpt.py")
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    else:
        command = [sys.executable, script]
    return subprocess.run(command + list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def read_log(cwd: Path, run_id: str) -> str:
    return (Path(cwd) / "logs" / f"{run_id}.txt").read_text(encoding="utf-8")


def assert_final_score(log: str, expected_pass: str):
    """The run's one final_score line names expected_pass and repeats that pass's _exact numbers; tools read it
    (significance, pack_record's submission.json, compare_logs)."""
    sys.path.insert(0, str(REPO / "tools"))
    import logparse

    assert len(re.findall(r"^final_score ", log, re.M)) == 1
    name, val_loss, val_bpb = logparse.final_score(log)
    exact = parse_metric(log, f"{expected_pass}_exact")
    assert (name, val_loss, val_bpb) == (expected_pass, exact["val_loss"], exact["val_bpb"])


def parse_metric(log: str, label: str) -> dict:
    """Fields of the last line starting with label, e.g. parse_metric(log, 'final_int6_roundtrip_exact')."""
    lines = [line for line in log.splitlines() if line.startswith(label + " ")]
    assert lines, f"no line starting with {label!r} in the log"
    fields = {}
    for key, value in re.findall(r"(\w+):(\S+)", lines[-1]):
        number = re.fullmatch(r"([-+]?[\d.]+)(ms|s|%)?", value)  # numbers lose their unit: 12ms, 6.5s, -1.2%
        fields[key] = float(number.group(1)) if number else value
    return fields
