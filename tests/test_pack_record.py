"""tools/pack_record.py on logs of tiny real runs: a packed folder whose numbers come from the logs, and
every refusal (edited log, other code, over the cap, over time, unaudited TTT, not a record run)."""

from __future__ import annotations

import hashlib
import json
import re
import sys

import pytest
import torch

from conftest import REPO, parse_metric

sys.path.insert(0, str(REPO / "tools"))
import pack_record  # noqa: E402


@pytest.fixture(scope="session")
def run_logs(tiny_runs):
    """Logs of two tiny real runs (seeds 1337 and 42) and of one run of the packed code (conftest.tiny_runs)."""
    return {
        1337: tiny_runs["seed1337"],
        42: tiny_runs["seed42"],
        "packed": tiny_runs["packed"],
        "packed_code": tiny_runs["packed_code"],
    }


def pack(tmp_path, *logs, extra=()):
    return pack_record.main(
        [
            *map(str, logs),
            "--name",
            "Tiny Test",
            "--author",
            "A. Tester",
            "--github-id",
            "tester",
            "--records-dir",
            str(tmp_path / "records"),
            *extra,
        ]
    )


@pytest.mark.e2e
def test_packs_a_folder_from_the_logs(tmp_path, run_logs, capsys):
    assert (
        pack(
            tmp_path,
            run_logs[1337],
            run_logs[42],
            extra=["--allow-non-record", "--submission-json", str(tmp_path / "s.json")],
        )
        == 0
    )
    folder = next((tmp_path / "records").iterdir())
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}_Tiny_Test", folder.name)
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "requirements.txt",
        "submission.json",
        "train_gpt.py",
        "train_seed1337.log",
        "train_seed42.log",
    ]
    info = json.loads((folder / "submission.json").read_text())
    scores = [parse_metric(run_logs[s].read_text(), "final_score") for s in (1337, 42)]
    totals = [parse_metric(run_logs[s].read_text(), "artifact")["total_bytes"] for s in (1337, 42)]
    assert info["val_bpb"] == pytest.approx(sum(s["val_bpb"] for s in scores) / 2, abs=1e-8)
    assert info["val_loss"] == pytest.approx(sum(s["val_loss"] for s in scores) / 2, abs=1e-8)
    assert info["bytes_total"] == max(totals) and info["seeds"] == [1337, 42] and info["score"] == "legal_ttt"
    assert info["bytes_code"] == len((REPO / "train_gpt.py").read_bytes())
    assert info["track"].startswith("non-record: ran on cpu x1, not 8 CUDA GPUs")
    assert json.loads((tmp_path / "s.json").read_text()) == info
    readme = (folder / "README.md").read_text()
    assert "| 1337 |" in readme and "EVAL_STRIDE=32" in readme and "NUM_LAYERS=4" in readme
    assert (folder / "train_gpt.py").read_bytes() == (REPO / "train_gpt.py").read_bytes()
    requirements = (folder / "requirements.txt").read_text()  # from the logs: their torch, kernel, compressor
    assert f"torch=={torch.__version__.split('+')[0]}  # the runs used torch {torch.__version__}" in requirements
    assert "attention kernel used: sdpa (FlashAttention 3 not needed by these runs)" in requirements
    assert "zstandard" not in requirements and "brotli" not in requirements  # lzma: the standard library


@pytest.mark.e2e
def test_a_cpu_run_is_not_a_record(tmp_path, run_logs, capsys):
    assert pack(tmp_path, run_logs[1337]) == 2
    assert "not a record run: ran on cpu x1, not 8 CUDA GPUs" in capsys.readouterr().err


@pytest.mark.e2e
def test_the_packed_code_is_verified_and_packed(tmp_path, run_logs):
    assert pack(tmp_path, run_logs["packed"], extra=["--allow-non-record", "--code", str(run_logs["packed_code"])]) == 0
    folder = next((tmp_path / "records").iterdir())
    assert (folder / "train_gpt.py").read_bytes() == run_logs["packed_code"].read_bytes()
    assert (folder / "train_gpt_human.py").read_bytes() == (REPO / "train_gpt.py").read_bytes()  # readable, uncounted
    info = json.loads((folder / "submission.json").read_text())
    assert info["bytes_code"] == run_logs["packed_code"].stat().st_size
    assert "`train_gpt_human.py` when" in (folder / "README.md").read_text()


def reseal(text: str) -> str:
    """What an honest run with these numbers would have written: the digest recomputed."""
    body = text.rstrip("\n").rpartition("\n")[0] + "\n"
    return body + f"log_sha256:{hashlib.sha256(body.encode()).hexdigest()}\n"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: re.sub(r"(final_score pass:\S+ val_loss:\S+ val_bpb:)\d", r"\g<1>1", t), "edited after the run"),
        (
            lambda t: reseal(re.sub(r"^(artifact .*)total_bytes:\d+", r"\g<1>total_bytes:16000001", t, flags=re.M)),
            "over the 16,000,000-byte cap",
        ),
        (
            lambda t: reseal(
                re.sub(r"^(step:\d+/\d+ val_loss:\S+ val_bpb:\S+ train_time:)\d+ms", r"\g<1>600001ms", t, flags=re.M)
            ),
            "training (with GPTQ calibration) took over 600 s",
        ),
        (
            lambda t: reseal(re.sub(r"^eval:total seconds:\S+", "eval:total seconds:600.5", t, flags=re.M)),
            "evaluation took 600.5 s, over 600 s",
        ),
        (
            lambda t: reseal(re.sub(r"^ttt_audit ok: .*\n", "", t, flags=re.M)),
            "a TTT score without its 'ttt_audit ok' line",
        ),
        (lambda t: t.rstrip("\n").rpartition("\n")[0] + "\n", "no final log_sha256 line"),
    ],
)
@pytest.mark.e2e
def test_doctored_or_invalid_logs_are_refused(tmp_path, run_logs, capsys, edit, message):
    doctored = tmp_path / "doctored.txt"
    doctored.write_text(edit(run_logs[1337].read_text()))
    assert pack(tmp_path, doctored, extra=["--allow-non-record"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.e2e
def test_logs_of_other_code_are_refused(tmp_path, run_logs, capsys):
    other = tmp_path / "train_gpt.py"
    other.write_text((REPO / "train_gpt.py").read_text().replace("0.997", "0.996"))
    assert pack(tmp_path, run_logs[1337], extra=["--allow-non-record", "--code", str(other)]) == 2
    assert "not byte-identical to the code being packed" in capsys.readouterr().err


def test_the_expected_validation_tokens_follow_the_vocabulary(tmp_path):
    caseops = "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"
    assert pack_record.expected_val_tokens("fineweb10B_sp1024", 2048) == (62_021_632, "the records' logs")
    assert pack_record.expected_val_tokens(caseops, 2048, tmp_path)[0] == 47_851_520
    manifest = {"datasets": [{"name": "fineweb10B_sp8192", "stats": {"tokens_val": 40_000_001}}]}
    (tmp_path / "manifest.kevclark__parameter-golf.json").write_text(json.dumps(manifest))
    assert pack_record.expected_val_tokens("fineweb10B_sp8192", 2048, tmp_path) == (
        19_531 * 2048,
        "manifest.kevclark__parameter-golf.json",
    )
    assert pack_record.expected_val_tokens("fineweb10B_sp4096", 2048, tmp_path)[0] is None


@pytest.mark.e2e
def test_a_sample_run_is_labelled_by_its_validation_set(run_logs):
    run = pack_record.parse_log(run_logs[1337], (REPO / "train_gpt.py").read_text(encoding="utf-8"))
    assert "validated on 12 documents, not the challenge's 50,000" in run.non_record  # conftest.tiny_runs' cut
    assert any(note.startswith("the scored token count of 'kjv_sp1024' cannot be checked") for note in run.non_record)


def test_the_root_submission_json_describes_this_code_and_its_logs():
    """submission.json at the root is pack_record's, from logs/p1/p1_submission_seed*.txt: runs of today's
    train_gpt.py (each log starts with it, byte for byte), so its bytes_code is this file's size and its score the
    mean of their final_score lines. Any change to train_gpt.py needs those runs again."""
    import logparse

    info = json.loads((REPO / "submission.json").read_text())
    code = (REPO / "train_gpt.py").read_text(encoding="utf-8")
    logs = sorted((REPO / "logs" / "p1").glob("p1_submission_seed*.txt"))
    assert info["bytes_code"] == len(code.encode("utf-8")), "train_gpt.py changed since submission.json was made"
    assert len(logs) == len(info["seeds"]) >= 2
    texts = [path.read_text(encoding="utf-8") for path in logs]
    assert all(text.startswith(code + "\n" + "=" * 100 + "\n") for text in texts)
    scores = [logparse.final_score(text) for text in texts]
    assert info["val_bpb"] == pytest.approx(sum(s[2] for s in scores) / len(scores), abs=1e-8)
    assert info["score"] == scores[0][0] and info["track"].startswith("non-record: ")
