"""A tiny config trained for a few steps on real text, through export and the roundtrip evaluation."""

from __future__ import annotations

import pytest

import re

from conftest import REPO, TINY_ENV, assert_final_score, parse_metric, read_log, run_script


@pytest.mark.e2e
def test_tiny_run_end_to_end(tiny_artifact):
    """The shared tiny run (conftest.tiny_artifact): its log holds the code, the curve fell, the artifact's bytes
    are the ones on disk, every pass logged its exact score, the log is sealed."""
    folder, _, log = tiny_artifact
    code = (REPO / "train_gpt.py").read_text(encoding="utf-8")
    assert log.startswith(code)  # the log holds the exact code that ran
    assert re.search(r"^python:\S+ torch:\S+", log, re.M) and re.search(r"^device:cpu", log, re.M)
    assert re.search(r"^model_params:\d+$", log, re.M)
    losses = [
        float(x)
        for x in re.findall(
            r"^step:\d+/12 train_loss:([\d.]+) train_time:\S+ step_avg:\S+ tok_s:\d+ eta:\d+s$", log, re.M
        )
    ]
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.5
    artifact = parse_metric(log, "artifact")
    model_bytes = (folder / "out" / "model.ptz").stat().st_size
    assert artifact["model_bytes"] == model_bytes and artifact["code_bytes"] == len(code.encode("utf-8"))
    assert artifact["total_bytes"] == model_bytes + artifact["code_bytes"] and artifact["cap"] == 16_000_000
    roundtrip = parse_metric(log, "final_int6_roundtrip")
    exact = parse_metric(log, "final_int6_roundtrip_exact")
    assert abs(roundtrip["val_bpb"] - exact["val_bpb"]) < 1e-4 and 1.0 < exact["val_bpb"] < 4.0
    for label in ("final_int6_roundtrip_exact", "final_int6_sliding_window_exact", "legal_ttt_exact"):
        assert re.search(rf"^{label} val_loss:\d+\.\d{{8}} val_bpb:\d+\.\d{{8}}$", log, re.M), label
    assert re.search(r"^ttt_audit ok: chunks=\d+ tokens_scored=\d+ tokens_trained=\d+$", log, re.M)
    assert_final_score(log, "legal_ttt")
    import hashlib

    body, _, seal = log.rstrip("\n").rpartition("\n")
    assert seal == f"log_sha256:{hashlib.sha256((body + chr(10)).encode()).hexdigest()}"  # the log is sealed
    assert re.search(r"^started:\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", log, re.M)
    assert '"num_layers": 4' in log.split("\nhyperparameters ", 1)[1].splitlines()[0]
    # Quantization costs something but not much: the roundtrip is close to the pre-quantization score.
    assert abs(exact["val_bpb"] - parse_metric(log, "DIAGNOSTIC post_average")["val_bpb"]) < 0.05


@pytest.mark.e2e
def test_tiny_run_with_gptq(tmp_path, sample_data):
    """QUANT=gptq end to end: Hessians on training data inside the cap, then GPTQ, then the roundtrip."""
    dataset, tokenizer = sample_data
    env = dict(
        TINY_ENV,
        DATA_PATH=dataset,
        TOKENIZER_PATH=tokenizer,
        RUN_ID="gptq",
        QUANT="gptq",
        MAX_WALLCLOCK_SECONDS=120,
        GPTQ_RESERVE_SECONDS=10,
        GPTQ_CALIB_BATCHES=4,
        TTT_ENABLED=0,
    )
    result = run_script(tmp_path, env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    log = read_log(tmp_path, "gptq")
    hessians = parse_metric(log, "gptq:hessians")
    assert hessians["batches"] == "4/4" and hessians["tokens"] == 4 * 256 and hessians["ended_at"] <= 120
    assert "artifact:written quant:gptq" in log
    assert_final_score(log, "final_int6_sliding_window")  # no TTT: the sliding window is the score
    gap = (
        parse_metric(log, "final_int6_roundtrip_exact")["val_bpb"]
        - parse_metric(log, "DIAGNOSTIC post_average")["val_bpb"]
    )
    assert abs(gap) < 0.05
