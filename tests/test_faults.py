"""Faults during a run (docs/RUNNING.md): a diverged loss, a dead or hung rank, SIGINT/SIGTERM,
inputs checked before the clock, and a non-finite score. Each test provokes the fault and checks the message, the
exit status, what is on disk afterwards and, for ranks, that nothing waits past its bound."""

from __future__ import annotations

import math
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train_gpt
from conftest import (
    REPO,
    TINY_ENV,
    clean_environment,
    parse_metric,
    read_log,
    require_e2e_mark,
    run_script,
    tiny_hyperparameters,
)


def tiny_env(sample_data, **overrides) -> dict:
    dataset, tokenizer = sample_data
    env = dict(TINY_ENV, DATA_PATH=dataset, TOKENIZER_PATH=tokenizer)
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def launch(cwd: Path, env: dict, ranks: int = 1) -> list[subprocess.Popen]:
    """train_gpt.py as `ranks` processes wired by hand (as torchrun would), so a test can signal one of them."""
    require_e2e_mark("launch")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    processes = []
    for rank in range(ranks):
        full = dict(clean_environment(), **env, OMP_NUM_THREADS="1")
        if ranks > 1:
            full.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(ranks),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
        processes.append(
            subprocess.Popen(
                [sys.executable, str(REPO / "train_gpt.py")],
                cwd=cwd,
                env=full,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return processes


def run_part(log: str) -> str:
    """The log after the code that heads it (the code itself mentions val_bpb:nan)."""
    return log.split("\n" + "=" * 100 + "\n", 1)[1]


def wait_for_step(cwd: Path, run_id: str, step: int, timeout: float = 240):
    log = Path(cwd) / "logs" / f"{run_id}.txt"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.exists() and f"\nstep:{step}/" in log.read_text(encoding="utf-8"):
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} never logged")


@pytest.mark.e2e
def test_a_diverged_loss_stops_the_run_without_an_artifact(tmp_path, sample_data):
    result = run_script(tmp_path, tiny_env(sample_data, MATRIX_LR=1e30, ITERATIONS=40, RUN_ID="nan"), timeout=300)
    assert result.returncode == train_gpt.EXIT_NONFINITE == 4
    assert (
        "error: training diverged: the loss is not finite at step 2 on some rank (the last finite loss was "
        in result.stderr
    )
    log = read_log(tmp_path, "nan")
    steps = [int(line.split("/")[0][5:]) for line in log.splitlines() if line.startswith("step:")]
    assert max(steps) <= 2 + train_gpt.WATCH_LAG  # stopped within the watch's lag, not after 40 steps
    assert not (tmp_path / "final_model.int6.ptz").exists() and "val_bpb:nan" not in run_part(log)
    assert log.splitlines()[-2].startswith("error: training diverged") and log.splitlines()[-1].startswith(
        "log_sha256:"
    )


@pytest.mark.e2e
def test_a_diverged_loss_stops_every_rank_at_the_same_step(tmp_path, sample_data):
    result = run_script(
        tmp_path, tiny_env(sample_data, MATRIX_LR=1e30, ITERATIONS=40, RUN_ID="nan2"), nproc=2, timeout=300
    )
    assert result.returncode != 0 and "training diverged: the loss is not finite at step 2" in result.stderr
    assert not (tmp_path / "final_model.int6.ptz").exists()
    assert "error: training diverged" in read_log(tmp_path, "nan2")


@pytest.mark.e2e
def test_sigint_writes_the_averaged_artifact_and_eval_only_scores_it(tmp_path, sample_data):
    env = tiny_env(sample_data, ITERATIONS=5000, RUN_ID="interrupted")
    [process] = launch(tmp_path, env)
    wait_for_step(tmp_path, "interrupted", 3)
    process.send_signal(signal.SIGINT)
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)  # what torchrun sends after a Ctrl-C: not a repeat, so still graceful
    process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT
    log = read_log(tmp_path, "interrupted")
    stopped = int(parse_metric(log, "stopping_early:")["step"].split("/")[0])
    assert 3 <= stopped < 5000 and "interrupted: SIGINT; the artifact of the averaged weights is written" in log
    assert "ema:applying EMA weights" in log and "final_int6_roundtrip" not in run_part(log)  # no evaluation
    assert "artifact:written quant:gptq_lite compressor:lzma (fast: after a signal)" in log  # torchrun kills in 30 s
    scored = run_script(tmp_path, dict(env, EVAL_ONLY=1, RUN_ID="scored"), timeout=300)
    assert scored.returncode == 0, scored.stderr[-2000:]
    assert math.isfinite(parse_metric(read_log(tmp_path, "scored"), "legal_ttt_exact")["val_bpb"])


@pytest.mark.e2e
def test_a_signal_skips_gptq_calibration_and_exports_at_once(tmp_path, sample_data):
    """QUANT=gptq: after SIGTERM the Hessians are not collected (16 batches of the frontier took 24-32 s of the 30 s
    torchrun allows; review 945e22d, defect 11): round-to-nearest on the searched scales, the fast artifact."""
    env = tiny_env(sample_data, ITERATIONS=5000, RUN_ID="gptq_interrupted", QUANT="gptq", GPTQ_CALIB_BATCHES=16)
    [process] = launch(tmp_path, env)
    wait_for_step(tmp_path, "gptq_interrupted", 3)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM
    log = run_part(read_log(tmp_path, "gptq_interrupted"))
    assert "gptq:hessians skipped after a signal" in log and "gptq:hessians batches:" not in log
    assert "artifact:written quant:gptq compressor:lzma (fast: after a signal)" in log


@pytest.mark.e2e
def test_sigterm_to_one_rank_stops_both_at_the_same_step(tmp_path, sample_data):
    processes = launch(tmp_path, tiny_env(sample_data, ITERATIONS=5000, RUN_ID="term"), ranks=2)
    wait_for_step(tmp_path, "term", 3)
    processes[1].send_signal(signal.SIGTERM)  # rank 0 never sees a signal: the ranks agree through the watch
    for process in processes:
        process.communicate(timeout=120)
    assert [p.returncode for p in processes] == [128 + signal.SIGTERM] * 2
    log = read_log(tmp_path, "term")
    assert "replicas:identical ranks:2" in log and "stopping_early: SIGTERM" in log
    assert (tmp_path / "final_model.int6.ptz").stat().st_size > 0


@pytest.mark.e2e
@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP])
def test_a_dead_or_hung_rank_ends_the_run_within_the_timeout(tmp_path, sample_data, fault):
    """SIGKILL: the survivor's next collective fails at once; SIGSTOP (a hang): it fails after
    COLLECTIVE_TIMEOUT_SECONDS. Either way rank 0 leaves with status 5 and says why."""
    processes = launch(
        tmp_path, tiny_env(sample_data, ITERATIONS=5000, RUN_ID="dead", COLLECTIVE_TIMEOUT_SECONDS=6), ranks=2
    )
    wait_for_step(tmp_path, "dead", 3)
    started = time.time()
    processes[1].send_signal(fault)
    try:
        _, stderr = processes[0].communicate(timeout=60)
        elapsed = time.time() - started
    finally:
        processes[1].kill()
        processes[1].communicate()
    assert processes[0].returncode == train_gpt.EXIT_COLLECTIVE == 5
    assert "error: rank 0: a collective failed: another rank died, hung past COLLECTIVE_TIMEOUT_SECONDS=6" in stderr
    assert elapsed < (3 if fault == signal.SIGKILL else 6 + 10)
    assert "a collective failed" in read_log(tmp_path, "dead")


@pytest.mark.e2e
def test_a_fault_one_rank_sees_mid_step_ends_the_run_at_once(tmp_path, sample_data):
    """CUDA review 945e22d, defect 10: rank 0 alone cannot fit its batch's varlen segments. It exits at once with the
    reason and torchrun ends rank 1, which waits in the step's collective; before, rank 0 waited at the closing
    barrier and both hung until COLLECTIVE_TIMEOUT_SECONDS (120 s here)."""
    env = tiny_env(sample_data, RUN_ID="overflow", DOC_ISOLATION=1, COLLECTIVE_TIMEOUT_SECONDS=120, OMP_NUM_THREADS=1)
    started = time.perf_counter()
    result = run_script(tmp_path, env, nproc=2, timeout=300, script=REPO / "tests" / "overflow_worker.py")
    seconds = time.perf_counter() - started
    assert result.returncode != 0 and "error: rank 0: DOC_ISOLATION: a batch of" in result.stderr
    assert seconds < 90, f"{seconds:.0f} s: the ranks waited for the collective timeout"


@pytest.mark.e2e
def test_a_long_export_does_not_time_out_the_waiting_ranks(tmp_path, sample_data):
    """Rank 0's export outlasts COLLECTIVE_TIMEOUT_SECONDS (5 s here; MIXED_PRECISION took 94 s on the H200): rank 1
    waits on the long gloo group and the run ends normally (on the default group it died with exit 5)."""
    env = tiny_env(
        sample_data, ITERATIONS=3, RUN_ID="slow_export", COLLECTIVE_TIMEOUT_SECONDS=5, TTT_ENABLED=0, OMP_NUM_THREADS=1
    )
    result = run_script(tmp_path, env, nproc=2, timeout=300, script=REPO / "tests" / "slow_export_worker.py")
    assert result.returncode == 0, result.stderr[-3000:]
    log = read_log(tmp_path, "slow_export")
    assert float(parse_metric(log, "artifact:written")["seconds"]) > 9
    assert "final_int6_roundtrip_exact" in log


@pytest.mark.e2e
def test_inputs_are_checked_before_the_clock_starts(tmp_path, sample_data):
    import build_sample

    dataset = tmp_path / "data"
    dataset.mkdir()
    for name in ("fineweb_train_000000.bin", "fineweb_val_000000.bin"):
        (dataset / name).write_bytes((Path(sample_data[0]) / name).read_bytes())
    build_sample.write_shard(dataset / "fineweb_train_000001.bin", [1, 2, 3])
    with open(dataset / "fineweb_train_000001.bin", "ab") as f:
        f.write(b"\0")  # a second shard one byte longer than its header says: found at start, not mid-run
    result = run_script(tmp_path, tiny_env(sample_data, DATA_PATH=dataset, RUN_ID="shard"), timeout=300)
    assert result.returncode == 2 and "fineweb_train_000001.bin: header says 3 tokens" in result.stderr
    assert "step:" not in run_part(read_log(tmp_path, "shard"))
    (tmp_path / "occupied").write_text("a file where a directory should be")
    result = run_script(
        tmp_path,
        tiny_env(sample_data, ARTIFACT_PATH=tmp_path / "occupied" / "model.ptz", RUN_ID="unwritable"),
        timeout=300,
    )
    assert result.returncode == 2 and "env ARTIFACT_PATH=" in result.stderr and "cannot write in" in result.stderr
    assert "step:" not in run_part(read_log(tmp_path, "unwritable"))


@pytest.mark.e2e
def test_a_wrong_data_path_is_reported_before_anything_slow(tmp_path, sample_data):
    """At the default shape (whose size plan takes seconds) a DATA_PATH with no shards exits 2 before the size plan,
    the model or the clock: under 3 s, or under 1 s more than importing torch where that alone takes over 2 s."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, numpy, sentencepiece"], check=True, env=clean_environment())
    imports = time.perf_counter() - started
    started = time.perf_counter()
    env = dict(DATA_PATH=tmp_path / "no_such_dataset", TOKENIZER_PATH=sample_data[1], RUN_ID="wrong_path")
    result = run_script(tmp_path, env, timeout=120)
    seconds = time.perf_counter() - started
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: no files match {tmp_path / 'no_such_dataset'}/fineweb_val_[0-9]*.bin " + (
        "(set DATA_PATH to the dataset directory)"
    )
    assert "size_plan" not in run_part(read_log(tmp_path, "wrong_path"))
    assert seconds < max(3.0, imports + 1.0), f"{seconds:.1f} s to report a wrong DATA_PATH (imports {imports:.1f} s)"


@pytest.mark.e2e
def test_a_non_finite_score_is_an_error_naming_the_pass_and_window(tmp_path, sample_data):
    env = tiny_env(sample_data, RUN_ID="nan_eval", EVAL_ONLY=1)
    h = tiny_hyperparameters(**{k: v for k, v in env.items() if k in TINY_ENV})
    torch.manual_seed(0)
    state = train_gpt.export_state(train_gpt.GPT(h))
    state["blocks.0.attn.q_gain"] = torch.full_like(state["blocks.0.attn.q_gain"], float("nan"))  # stored fp16
    tensors, schemes = train_gpt.quantize_state(state, h)
    (tmp_path / "final_model.int6.ptz").write_bytes(train_gpt.encode_artifact(tensors, schemes, h))
    result = run_script(tmp_path, env, timeout=300)
    assert result.returncode == 4
    assert "error: final_int6_roundtrip: the NLL is not finite at target 0" in result.stderr
    assert "val_bpb:nan" not in run_part(read_log(tmp_path, "nan_eval"))


def test_the_accumulator_names_the_first_bad_target():
    scores = train_gpt.ScoreAccumulator(torch.device("cpu"), SimpleNamespace(target_bytes=np.ones(20, np.int64)))
    nll = torch.ones(3, 4)
    nll[2, 1], nll[1, 3] = float("inf"), float("nan")
    keep = np.ones((3, 4), dtype=bool)
    keep[1, 3] = False  # a masked NaN (padding) is not an error
    scores.add(nll, np.arange(12).reshape(3, 4) + 5, keep)
    with pytest.raises(train_gpt.RunFault, match=r"not finite at target 14"):
        scores.result(distributed=False)
