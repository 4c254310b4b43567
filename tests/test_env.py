"""Environment variables: each one read once, used by the code, documented in docs/CONFIG.md, validated."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

import pytest

import train_gpt
from conftest import REPO

SOURCE = (REPO / "train_gpt.py").read_text(encoding="utf-8")
CONFIG_DOC = (REPO / "docs" / "CONFIG.md").read_text(encoding="utf-8")


def hyperparameter_fields() -> dict[str, str]:
    """attribute -> env name: every variable Hyperparameters reads lands in the attribute of its lower-case name."""
    h = train_gpt.Hyperparameters({})
    missing = [name for name in h.env_names if not hasattr(h, name.lower())]
    assert not missing, f"read into no attribute of their name: {missing}"
    return {name.lower(): name for name in h.env_names}


def readme_variables() -> set[str]:
    section = CONFIG_DOC.split("## Environment variables", 1)[1].split("\n## ", 1)[0]
    names = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            names |= set(re.findall(r"`([A-Z][A-Z0-9_]+)`", line.split("|")[1]))
    return names


def test_every_variable_is_read_exactly_once():
    names = train_gpt.Hyperparameters({}).env_names
    assert len(names) == len(set(names))
    assert set(names) == set(hyperparameter_fields().values())
    outside = SOURCE.replace(SOURCE[SOURCE.index("class Hyperparameters") : SOURCE.index("# Data:")], "")
    assert "os.environ" not in outside and "getenv" not in outside


def test_every_variable_is_documented_and_nothing_else():
    assert readme_variables() == set(train_gpt.Hyperparameters({}).env_names)


def test_config_doc_is_generated_from_the_code():
    """docs/CONFIG.md's variable and preset tables are what tools/config_doc.py makes of train_gpt.py (names,
    order, defaults, accepted values, every preset's values), and every variable has a meaning."""
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "config_doc.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_config_doc_regenerates_a_stale_default_and_flags_an_unexplained_variable():
    sys.path.insert(0, str(REPO / "tools"))
    import config_doc

    assert config_doc.generate(CONFIG_DOC) == CONFIG_DOC
    stale = CONFIG_DOC.replace("| `SEED` | 1337 |", "| `SEED` | 42 |")
    assert stale != CONFIG_DOC and config_doc.generate(stale) == CONFIG_DOC
    unexplained = CONFIG_DOC.replace("| `SEED` | 1337 |", "| `SEEDS` | 1337 |")  # SEED's meaning is lost
    assert "| `SEED` | 1337 | integer | UNDOCUMENTED |" in config_doc.generate(unexplained)


def unused_settings(source: str, attributes) -> list[str]:
    """The attributes no code reads outside Hyperparameters.__init__ (its env reads and cross-checks of settings do not
    count): read by a function or another class, or by a Hyperparameters property or method that such code reads."""

    def loads(node) -> set[str]:
        return {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load)}

    tree = ast.parse(source)
    settings = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Hyperparameters")
    used = set().union(*(loads(node) for node in tree.body if node is not settings))
    members = {n.name: n for n in settings.body if isinstance(n, ast.FunctionDef) and n.name != "__init__"}
    reached: set[str] = set()
    while new := (used & members.keys()) - reached:  # the derived values (h.training_seconds, ...) read their inputs
        reached |= new
        used |= set().union(*(loads(members[name]) for name in new))
    return [attr for attr in attributes if attr not in used]


def test_every_setting_is_used_by_the_code():
    """Each attribute read from the environment is read by code outside Hyperparameters."""
    unused = unused_settings(SOURCE, hyperparameter_fields())
    assert not unused, f"read but never used: {unused}"


def test_an_unused_setting_is_found():
    """The check above can fail: a variable planted in Hyperparameters (read, cross-checked there, used nowhere else)
    is reported, while the file's own variables still are not."""
    anchor = "        self.ttt_enabled = "
    assert SOURCE.count(anchor) == 1
    planted = SOURCE.replace(
        anchor,
        '        self.planted_unused = env.int("PLANTED_UNUSED", 0, 0)\n'
        "        assert self.planted_unused >= 0\n" + anchor,
    )
    assert unused_settings(planted, [*hyperparameter_fields(), "planted_unused"]) == ["planted_unused"]


@pytest.mark.parametrize(
    "env, message",
    [
        ({"NUM_LAYERS": "eleven"}, "env NUM_LAYERS='eleven': expected an integer"),
        ({"MATRIX_LR": "fast"}, "env MATRIX_LR='fast': expected a number"),
        ({"LN_SCALE": "yes"}, "env LN_SCALE='yes': expected 0 or 1"),
        ({"COMPRESSOR": "zip"}, "env COMPRESSOR='zip': expected one of lzma, zstd, brotli"),
        ({"VE_LAYERS": "9;10"}, "env VE_LAYERS='9;10': expected comma-separated integers"),
        ({"VE_LAYERS": "3,11"}, "env VE_LAYERS has layers [11] outside 0..10"),
        ({"MODEL_DIM": "500"}, "env MODEL_DIM=500 is not divisible by NUM_HEADS=8"),
        ({"NUM_KV_HEADS": "3"}, "env NUM_HEADS=8 is not divisible by NUM_KV_HEADS=3"),
        ({"ROPE_DIMS": "7"}, "env ROPE_DIMS=7: must be even and <= head_dim=64"),
        ({"XSA_LAST_N": "12"}, "env XSA_LAST_N=12 exceeds NUM_LAYERS=11"),
        ({"EMA_DECAY": "1"}, "env EMA_DECAY=1.0: must be in [0, 1)"),
        ({"ITERATIONS": "-1"}, "env ITERATIONS=-1: must be >= 0"),
        ({"WORLD_SIZE": "3", "RANK": "0"}, "WORLD_SIZE=3: must divide 8"),
        (
            {"TRAIN_BATCH_TOKENS": "1000"},
            "env TRAIN_BATCH_TOKENS=1000 is not divisible by WORLD_SIZE*grad_accum*TRAIN_SEQ_LEN=16384",
        ),
    ],
)
def test_bad_values_are_named(env, message):
    with pytest.raises(train_gpt.InputError) as error:
        train_gpt.Hyperparameters(env)
    assert message in str(error.value)


def test_record_defaults():
    h = train_gpt.Hyperparameters({})
    assert (h.num_layers, h.model_dim, h.num_heads, h.num_kv_heads, h.mlp_mult) == (11, 512, 8, 4, 3.0)
    assert (h.train_batch_tokens, h.train_seq_len, h.warmdown_iters, h.max_wallclock_seconds) == (
        786432,
        2048,
        3500,
        600,
    )
    assert (h.matrix_lr, h.scalar_lr, h.tied_embed_lr, h.muon_wd, h.adam_wd, h.grad_clip_norm) == (
        0.025,
        0.025,
        0.035,
        0.04,
        0.04,
        0.3,
    )
    assert (h.bigram_vocab_size, h.ve_layers, h.xsa_last_n, h.rope_dims, h.ema_decay) == (1536, [9, 10], 4, 16, 0.997)
    assert h.grad_accum_steps == 8 and not h.distributed


def test_dropped_record_variables_are_reported():
    h = train_gpt.Hyperparameters({"EMA_ENABLED": "1", "LATE_QAT": "1"})
    assert h.ignored_record_variables == ["EMA_ENABLED", "LATE_QAT"]


def test_a_missing_compressor_module_fails_at_start(monkeypatch):
    """On the first H200 the brotli module was absent: PRESET=pr1089 would have trained for 600 s and then failed
    to write its artifact (logs/gpu_seeds_check_brotli_missing.txt). Now the settings refuse it before training."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "brotli" else real(name, *a))
    with pytest.raises(train_gpt.InputError, match="COMPRESSOR=brotli: the brotli module is not installed"):
        train_gpt.Hyperparameters({"PRESET": "pr1089"})
    train_gpt.Hyperparameters({"PRESET": "pr1089", "COMPRESSOR": "lzma"})
