"""tools/significance.py on synthetic seed lists with known answers."""

from __future__ import annotations

import math
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import significance  # noqa: E402


@pytest.mark.parametrize(
    "t, df, p",
    [(2.228, 10, 0.025), (3.747, 4, 0.01), (6.314, 1, 0.05), (0.0, 7, 0.5), (-2.228, 10, 0.975), (2.576, 1e6, 0.005)],
)
def test_student_t_tail_matches_tables(t, df, p):
    assert significance.student_t_sf(t, df) == pytest.approx(p, abs=2e-4)


def test_welch_statistic_by_hand():
    t, df, p = significance.welch_one_sided([1.0, 1.1, 0.9], [2.0, 2.1, 1.9])
    assert t == pytest.approx(1.0 / math.sqrt(2 * 0.01 / 3)) and df == pytest.approx(4.0)
    assert p == pytest.approx(significance.student_t_sf(t, 4.0))


def write_log(path, bpb, tokens=62_021_632, byte_count=151_080_633):
    path.write_text(
        f"val_loader:shards pattern=x tokens:{tokens} bytes:{byte_count}\n"
        f"legal_ttt_exact val_loss:1.90000000 val_bpb:{bpb + 1:.8f}\n"  # not the score: final_score is
        f"final_score pass:legal_ttt_tilt val_loss:1.90000000 val_bpb:{bpb:.8f}\n"
    )
    return str(path)


def test_clear_record_meets_the_bar(tmp_path, capsys):
    candidate = [write_log(tmp_path / f"c{i}.txt", v) for i, v in enumerate((1.1100, 1.1105, 1.1095))]
    baseline = [write_log(tmp_path / f"b{i}.txt", v) for i, v in enumerate((1.1200, 1.1205, 1.1195))]
    assert significance.main(["--candidate", *candidate, "--baseline-logs", *baseline]) == 0
    out = capsys.readouterr().out
    nats = 0.01 * math.log(2) * 151_080_633 / 62_021_632  # 0.0169 nats/token
    assert f"improvement: +0.010000 BPB = +{nats:.6f} nats/token" in out and "bar is MET" in out


def test_small_but_certain_improvement_misses_the_bar(capsys):
    # 0.002 BPB at 0.4105 tokens/byte is 0.0034 nats: below 0.005 however certain.
    status = significance.main(
        [
            "--candidate-values",
            "1.1180,1.1181,1.1179",
            "--baseline-values",
            "1.1200,1.1201,1.1199",
            "--tokens-per-byte",
            "0.4105",
        ]
    )
    assert status == 1 and "NOT met (improvement below 0.005 nats)" in capsys.readouterr().out


def test_noisy_improvement_misses_the_bar(capsys):
    status = significance.main(
        ["--candidate-values", "1.100,1.125", "--baseline-mean", "1.1194", "--tokens-per-byte", "0.4105"]
    )
    out = capsys.readouterr().out
    assert status == 1 and "NOT met (p =" in out and "1 value (known mean)" in out


def test_inputs_that_cannot_be_compared_are_rejected(tmp_path, capsys):
    a = write_log(tmp_path / "a.txt", 1.10)
    b = write_log(tmp_path / "b.txt", 1.11, tokens=1000, byte_count=2000)
    assert significance.main(["--candidate", a, a, "--baseline-logs", b]) == 2
    assert "disagree on tokens per byte" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("nothing\n")
    assert significance.main(["--candidate", str(tmp_path / "empty.txt"), a, "--baseline-mean", "1.2"]) == 2
    assert "no final_score line" in capsys.readouterr().err
