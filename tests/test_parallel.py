"""Parallel Muon over torchrun on the CPU (gloo): sharded = unsharded, 2 ranks train the same model as 1."""

from __future__ import annotations

import pytest

import json
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO, TINY_ENV, clean_environment, parse_metric, read_log, run_script, short_validation_copy


@pytest.mark.e2e
def test_sharded_muon_equals_unsharded(tmp_path):
    result_path = tmp_path / "result.json"
    env = clean_environment()
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "--tee",
        "3",
        str(REPO / "tests" / "muon_shard_worker.py"),
        str(result_path),
    ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, rank_output(result)
    outcome = json.loads(result_path.read_text())
    assert outcome["shard_rows"] == [3, 2]  # banks of 5 and 3 matrices (largest first), padded to 6 and 4
    # Same arithmetic on the same numbers; only the batching of the shard matmuls differs.
    assert outcome["max_abs_difference"] < 1e-6


def rank_output(result) -> str:
    """Each rank's own lines (torchrun --tee prefixes them), without the launcher's traceback noise."""
    lines = (result.stdout + result.stderr).splitlines()
    return "\n".join(line for line in lines if "Warning" not in line and "return func" not in line)[:6000]


def train_losses(log: str) -> list[float]:
    return [float(x) for x in re.findall(r"^step:\d+/\d+ train_loss:([\d.]+)", log, re.M)]


@pytest.mark.e2e
def test_two_ranks_train_the_same_model_as_one(tmp_path, sample_data):
    dataset, tokenizer = sample_data
    data = short_validation_copy(tmp_path / "data", dataset, 32_769)  # the ranks' split of evaluation, cheaply
    env = dict(
        TINY_ENV, DATA_PATH=data, TOKENIZER_PATH=tokenizer, ITERATIONS=8, OMP_NUM_THREADS=1, TTT_CHUNK_TOKENS=16384
    )
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    single = run_script(one, dict(env, RUN_ID="one"), timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    double = run_script(two, dict(env, RUN_ID="two"), nproc=2, timeout=300)  # timeout: no rank may hang
    assert double.returncode == 0, double.stderr[-3000:]
    log_one, log_two = read_log(one, "one"), read_log(two, "two")
    assert "world_size:2 grad_accum_steps:4" in log_two
    assert re.search(r"^replicas:identical ranks:2 sha256:[0-9a-f]{16}$", log_two, re.M)
    losses_one, losses_two = train_losses(log_one), train_losses(log_two)
    assert len(losses_one) == len(losses_two) == 8
    # Both runs see the same 8 micro-batches per step; only fp32 summation order differs (2 partial sums
    # averaged vs one running sum), a relative 1e-7 per step that Muon's normalization keeps from growing.
    assert max(abs(a - b) for a, b in zip(losses_one, losses_two)) <= 2e-4
    for label in ("final_int6_roundtrip_exact", "final_int6_sliding_window_exact", "legal_ttt_exact"):
        # Evaluation and TTT split windows and sequences across ranks and sum: same tolerance argument.
        assert abs(parse_metric(log_one, label)["val_loss"] - parse_metric(log_two, label)["val_loss"]) < 1e-3, label
    assert re.search(r"^ttt_audit ok: chunks=2 tokens_scored=32768 tokens_trained=16384$", log_two, re.M)


@pytest.mark.e2e
def test_skewed_clocks_under_a_wallclock_cap_keep_replicas_identical(tmp_path, sample_data):
    """Under MAX_WALLCLOCK_SECONDS the warmdown, late QAT, SWA and the stop all follow the clock; with rank 1's
    clock running 1.5x fast, every rank must still take the same decisions (one agreed time) and finish."""
    dataset, tokenizer = sample_data
    env = dict(
        TINY_ENV,
        DATA_PATH=dataset,
        TOKENIZER_PATH=tokenizer,
        OMP_NUM_THREADS=1,
        RUN_ID="skew",
        ITERATIONS=100000,
        MAX_WALLCLOCK_SECONDS=5,
        WARMDOWN_ITERS=30,
        TRAIN_LOG_EVERY=0,
        SWA_ENABLED=1,
        SWA_EVERY=2,
        TTT_ENABLED=0,
        EVAL_STRIDE=64,
    )
    worker = Path(__file__).with_name("skewed_clock_worker.py")
    result = run_script(tmp_path, env, args=[str(REPO / "train_gpt.py")], nproc=2, timeout=300, script=worker)
    assert result.returncode == 0, result.stderr[-3000:]
    log = read_log(tmp_path, "skew")
    assert re.search(r"^stopping_early: wallclock_cap train_time:\d+ms step:\d+/100000$", log, re.M)
    assert re.search(r"^late_qat:enabled step:\d+ scale:0\.1\d+$", log, re.M)
    assert re.search(r"^swa:applying mean of \d+ snapshots", log, re.M)
    assert re.search(r"^replicas:identical ranks:2 sha256:[0-9a-f]{16}$", log, re.M)
    assert (tmp_path / "final_model.int6.ptz").stat().st_size > 0
    assert "final_int6_roundtrip_exact" in log
