"""tools/pack_code.py: the packed train_gpt.py decodes to the transformed source and runs identically."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO, parse_metric

sys.path.insert(0, str(REPO / "tools"))
import pack_code  # noqa: E402


def test_strip_keeps_behaviour_and_drops_comments_and_docstrings():
    source = 'def f(x):\n    """Doc."""\n    # comment\n    return "kept # not a comment" + x\n'
    stripped = pack_code.strip_source(source)
    assert "Doc." not in stripped and "# comment" not in stripped and "kept # not a comment" in stripped
    namespace = {}
    exec(stripped, namespace)
    assert namespace["f"]("!") == "kept # not a comment!"


def test_pack_then_verify(tmp_path):
    packed = tmp_path / "train_gpt.py"
    packed.write_text(pack_code.pack((REPO / "train_gpt.py").read_text()))
    assert packed.stat().st_size < (REPO / "train_gpt.py").stat().st_size / 3
    pack_code.verify(packed, REPO / "train_gpt.py")
    tampered = tmp_path / "tampered.py"
    tampered.write_text(pack_code.pack((REPO / "train_gpt.py").read_text().replace("0.997", "0.998")))
    with pytest.raises(ValueError, match="does not decode to the python-minifier 3.4.0-transformed"):
        pack_code.verify(tampered, REPO / "train_gpt.py")
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "pack_code.py"), "--verify", str(packed), str(REPO / "train_gpt.py")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and result.stdout.startswith("OK:")


@pytest.mark.e2e
def test_packed_script_runs_identically(tiny_runs):
    """The packed script (conftest.tiny_runs) trains and scores as the readable one, and logs its own bytes."""
    log_readable, log_packed = (tiny_runs[name].read_text(encoding="utf-8") for name in ("seed1337", "packed"))
    assert parse_metric(log_packed, "artifact")["code_bytes"] == tiny_runs["packed_code"].stat().st_size
    for label in ("final_int6_roundtrip_exact", "final_int6_sliding_window_exact", "legal_ttt_exact"):
        assert parse_metric(log_packed, label) == parse_metric(log_readable, label), label


def test_minifier_pass_shrinks_and_verify_names_the_transform(tmp_path):
    source = (REPO / "train_gpt.py").read_text()
    plain, minified = tmp_path / "plain.py", tmp_path / "minified.py"
    plain.write_text(pack_code.pack(source, minify=False))
    minified.write_text(pack_code.pack(source))
    assert minified.stat().st_size < plain.stat().st_size  # python-minifier's pass, as #1089's shrink.py
    for packed in (plain, minified):
        pack_code.verify(packed, REPO / "train_gpt.py")
    assert pack_code.unpack(plain.read_text()).startswith("# tools/pack_code.py transform: ast\n")
    code = pack_code.unpack(minified.read_text())
    assert code.startswith("# tools/pack_code.py transform: python-minifier ")
    other_version = tmp_path / "other.py"
    other_version.write_text(
        pack_code.STUB.format(
            payload=pack_code.base64.b85encode(
                pack_code.lzma.compress(
                    code.replace("python-minifier 3.4.0", "python-minifier 2.0.0").encode(),
                    format=pack_code.lzma.FORMAT_RAW,
                    filters=pack_code.FILTERS,
                )
            )
        )
    )
    with pytest.raises(ValueError, match="was minified with python-minifier 2.0.0, this machine has python-minifier"):
        pack_code.verify(other_version, REPO / "train_gpt.py")
