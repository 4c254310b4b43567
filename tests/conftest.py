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


# The running test's `e2e` mark (set by the autouse fixture below): a process launch from a test without it is an
# error, so `pytest -m "not e2e"` stays the quick suite (pytest.ini).
RUNNING_TEST = {"e2e": False}


@pytest.fixture(autouse=True)
def e2e_mark_of_the_running_test(request):
    RUNNING_TEST["e2e"] = request.node.get_closest_marker("e2e") is not None
    yield
    RUNNING_TEST["e2e"] = False


def require_e2e_mark(what: str):
    if not RUNNING_TEST["e2e"]:
        raise AssertionError(f"{what}: a test that launches processes carries @pytest.mark.e2e (pytest.ini)")


def run_script(cwd: Path, env_overrides: dict, args=(), timeout=600, nproc: int = 1, script=None):
    """Run train_gpt.py (or torchrun with nproc ranks) in cwd; returns the CompletedProcess. Only from e2e tests."""
    require_e2e_mark(f"run_script({script or 'train_gpt.py'})")
    return launch_script(cwd, env_overrides, args, timeout, nproc, script)


def launch_script(cwd: Path, env_overrides: dict, args=(), timeout=600, nproc: int = 1, script=None):
    env = clean_environment()
    env.update({k: str(v) for k, v in env_overrides.items()})
    script = str(script or REPO / "train_gpt.py")
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    else:
        command = [sys.executable, script]
    return subprocess.run(command + list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# Session fixtures that launch runs: only e2e tests may use them (checked at collection below).
PROCESS_FIXTURES = ("tiny_artifact", "tiny_runs")


def pytest_collection_modifyitems(config, items):
    unmarked = [
        item.nodeid
        for item in items
        if set(PROCESS_FIXTURES) & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("e2e") is None
    ]
    if unmarked:
        raise pytest.UsageError(f"tests using {PROCESS_FIXTURES} must carry @pytest.mark.e2e: {unmarked}")


def short_validation_copy(directory: Path, dataset: str, tokens: int) -> str:
    """The dataset's first train shard (linked) with its validation shard cut to `tokens` tokens: evaluation, most
    of a tiny run's time, stays cheap."""
    import build_sample
    import train_gpt

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "fineweb_train_000000.bin").symlink_to(f"{dataset}/fineweb_train_000000.bin")
    val = train_gpt.load_data_shard(f"{dataset}/fineweb_val_000000.bin", 1 << 16)[:tokens]
    build_sample.write_shard(directory / "fineweb_val_000000.bin", val)
    return str(directory)


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory, fineweb_or_sample):
    """One tiny trained run (TINY_ENV) on real FineWeb text (its first 65,537 validation tokens; TTT in chunks of
    16,384), shared by the test that checks a whole run and the one that re-scores its artifact: (folder, env, log
    text); the artifact is folder/out/model.ptz."""
    dataset, tokenizer = fineweb_or_sample
    folder = tmp_path_factory.mktemp("tiny_artifact")
    data = short_validation_copy(folder / "data", dataset, 65_537)
    env = dict(
        TINY_ENV, DATA_PATH=data, TOKENIZER_PATH=tokenizer, ARTIFACT_PATH="out/model.ptz", TTT_CHUNK_TOKENS=16384
    )
    trained = launch_script(folder, dict(env, RUN_ID="e2e"), timeout=600)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    return folder, env, read_log(folder, "e2e")


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, sample_data):
    """Three 4-step runs on the KJV sample (its first 16,385 validation tokens), shared by the packing tests: the
    readable script at seeds 1337 and 42, and the packed script (tools/pack_code.py) at seed 1337. A dict: "seed1337",
    "seed42", "packed" (log paths), "packed_code" (the packed script)."""
    sys.path.insert(0, str(REPO / "tools"))
    import pack_code

    dataset, tokenizer = sample_data
    root = tmp_path_factory.mktemp("tiny_runs")
    data = short_validation_copy(root / "kjv_sp1024", dataset, 16_385)  # the dataset's name kept: logs name it
    env = dict(TINY_ENV, DATA_PATH=data, TOKENIZER_PATH=tokenizer, ITERATIONS=4, TTT_CHUNK_TOKENS=4096)
    packed = root / "packed" / "train_gpt.py"
    packed.parent.mkdir()
    packed.write_text(pack_code.pack((REPO / "train_gpt.py").read_text()))
    runs = {"seed1337": (1337, None), "seed42": (42, None), "packed": (1337, packed)}
    logs = {"packed_code": packed}
    for run_id, (seed, script) in runs.items():
        result = launch_script(root, dict(env, SEED=seed, RUN_ID=run_id), timeout=300, script=script)
        assert result.returncode == 0, result.stderr[-2000:]
        logs[run_id] = root / "logs" / f"{run_id}.txt"
    return logs


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
