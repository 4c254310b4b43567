"""The size planner (DRY_RUN=1) against real artifacts, and the over-cap exit status."""

from __future__ import annotations

import pytest

import re

import train_gpt
from conftest import REPO, TINY_ENV, parse_metric, read_log, run_script, short_validation_copy


@pytest.mark.e2e
def test_dry_run_prints_one_plan_line_without_data(tmp_path):
    result = run_script(
        tmp_path,
        dict(TINY_ENV, DRY_RUN=1, DATA_PATH="/nonexistent", TOKENIZER_PATH="/nonexistent", RUN_ID="plan"),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("size_plan ")]
    assert len(lines) == 1
    fields = dict(re.findall(r"(\w+):(\d+)", lines[0]))
    assert list(fields) == ["params", "code_bytes", "predicted_model_bytes", "predicted_total_bytes", "cap", "headroom"]
    values = {k: int(v) for k, v in fields.items()}
    assert values["code_bytes"] == len((REPO / "train_gpt.py").read_bytes())
    assert values["predicted_total_bytes"] == values["code_bytes"] + values["predicted_model_bytes"]
    assert values["headroom"] == 16_000_000 - values["predicted_total_bytes"]
    assert not (tmp_path / "final_model.int6.ptz").exists()


# Measured on this machine (logs/planner_vs_3step_full_size.txt): a 3-step CPU run of the full-size default model
# gave an artifact of 18,664,262 bytes against a plan of 15,869,851 (plan 15.0 % low). Early weights are nearly
# Gaussian; the planner models long-trained, heavy-tailed weights (fitted to #549's logged size). The bound is that
# measurement plus margin; this test's cheaper shape (8 micro-batches of 32 tokens a step) measured 18,319,726
# against 15,868,804 (13.4 % low).
SHORT_RUN_TOLERANCE = 0.20


@pytest.mark.e2e
def test_plan_of_the_default_model_versus_a_short_cpu_run(tmp_path, sample_data):
    dataset, tokenizer = sample_data
    env = dict(
        DATA_PATH=short_validation_copy(tmp_path / "data", dataset, 2 * 256 + 1),
        TOKENIZER_PATH=tokenizer,
        RUN_ID="full",
        TRAIN_SEQ_LEN=32,  # 8 micro-batches of 32 tokens: the full-size steps stay cheap
        EVAL_SEQ_LEN=256,
        TRAIN_BATCH_TOKENS=256,
        ITERATIONS=3,
        WARMUP_STEPS=0,
        MAX_WALLCLOCK_SECONDS=0,
        VAL_LOSS_EVERY=0,
        TTT_ENABLED=0,
        EVAL_STRIDE=256,
        MUON_MOMENTUM_WARMUP_STEPS=3,
        WARMDOWN_ITERS=0,
    )
    result = run_script(tmp_path, env, timeout=900)
    assert result.returncode == 3, result.stderr[-3000:]  # near-Gaussian early weights do not fit 16 MB
    log = read_log(tmp_path, "full")
    assert "model_params:26928220" in log
    check = parse_metric(log, "size_plan:check")
    error = (check["predicted_model_bytes"] - check["actual_model_bytes"]) / check["actual_model_bytes"]
    assert abs(error) < SHORT_RUN_TOLERANCE, error


def test_over_the_cap_is_written_evaluated_and_exits_3(tmp_path, sample_data, monkeypatch):
    dataset, tokenizer = sample_data
    monkeypatch.chdir(tmp_path)
    env = dict(TINY_ENV, DATA_PATH=dataset, TOKENIZER_PATH=tokenizer, RUN_ID="over", ITERATIONS=2, TTT_ENABLED=0)
    for name in train_gpt.Hyperparameters({}).env_names:
        monkeypatch.delenv(name, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.setattr(train_gpt, "SIZE_CAP_BYTES", 100_000)
    assert train_gpt.main() == 3
    log = (tmp_path / "logs" / "over.txt").read_text()
    assert "WARNING: PREDICTED ARTIFACT OVER THE CAP" in log and "ERROR: ARTIFACT OVER THE CAP" in log
    assert (tmp_path / "final_model.int6.ptz").exists() and "final_int6_roundtrip_exact" in log
    assert log.strip().splitlines()[-2].startswith("ERROR: exiting with status 3")
    assert log.strip().splitlines()[-1].startswith("log_sha256:")
