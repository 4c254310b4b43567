"""Shard reading, the training stream, validation loading and every bad-input message."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt
from build_sample import write_shard
from conftest import SAMPLE_TOKENIZER, TINY_ENV, run_script


def test_shard_roundtrip(tmp_path):
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, [1, 5, 1023, 0, 7])
    assert train_gpt.load_data_shard(path, 1024).tolist() == [1, 5, 1023, 0, 7]


def _header(magic=20240520, version=1, count=3):
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, count
    return header.tobytes()


@pytest.mark.parametrize(
    "content, message",
    [
        (_header(magic=1234) + b"\0" * 6, "magic 1234 is not 20240520"),
        (_header(version=2) + b"\0" * 6, "shard version 2 is not 1"),
        (_header(count=3) + b"\0" * 4, "header says 3 tokens (1030 bytes) but the file has 1028 bytes"),
        (_header(count=3) + b"\0" * 8, "header says 3 tokens (1030 bytes) but the file has 1032 bytes"),
        (b"\0" * 100, "100 bytes, shorter than the 1024-byte shard header"),
    ],
)
def test_bad_shard_messages(tmp_path, content, message):
    path = tmp_path / "fineweb_val_000000.bin"
    path.write_bytes(content)
    with pytest.raises(train_gpt.InputError) as error:
        train_gpt.load_data_shard(path, 1024)
    assert str(path) in str(error.value) and message in str(error.value)


def test_token_id_out_of_vocab(tmp_path):
    path = tmp_path / "fineweb_train_000001.bin"
    write_shard(path, [1, 2, 3, 2000, 4])
    with pytest.raises(train_gpt.InputError, match=r"token id 2000 at position 3 is >= VOCAB_SIZE=1024"):
        train_gpt.load_data_shard(path, 1024)


def test_no_files_match(tmp_path):
    with pytest.raises(train_gpt.InputError, match=r"no files match .*fineweb_train_\[0-9\]\*\.bin"):
        train_gpt.shard_files(str(tmp_path), "train")


def validation_set(path, seq_len: int, sample_data) -> train_gpt.ValidationSet:
    h = train_gpt.Hyperparameters(
        dict(DATA_PATH=str(path), TOKENIZER_PATH=sample_data[1], EVAL_SEQ_LEN=str(seq_len), EVAL_STRIDE=str(seq_len))
    )
    return train_gpt.ValidationSet(h, train_gpt.load_tokenizer(sample_data[1], 1024))


def test_validation_shorter_than_one_sequence(tmp_path, sample_data):
    write_shard(tmp_path / "fineweb_val_000000.bin", [1] + list(range(5, 68)))
    with pytest.raises(
        train_gpt.InputError, match=r"has 64 tokens: fewer than one sequence of EVAL_SEQ_LEN=64 plus one"
    ):
        validation_set(tmp_path, 64, sample_data)


def test_validation_concatenates_and_trims(tmp_path, sample_data):
    write_shard(tmp_path / "fineweb_val_000000.bin", [1] + list(range(5, 54)))
    write_shard(tmp_path / "fineweb_val_000001.bin", [1] + list(range(54, 103)))
    val = validation_set(tmp_path, 32, sample_data)
    assert val.tokens.tolist() == ([1] + list(range(5, 54)) + [1] + list(range(54, 103)))[:97]  # 3 x 32 targets + 1
    assert len(val.target_bytes) == 96 and val.audit["documents"] == 2 and val.audit["tokens"] == 100


def test_tokenizer_vocab_mismatch(sample_data):
    _, tokenizer = sample_data
    with pytest.raises(train_gpt.InputError, match=r"tokenizer has 1024 pieces but VOCAB_SIZE=2048"):
        train_gpt.load_tokenizer(tokenizer, 2048)


def test_tokenizer_missing_or_garbage(tmp_path):
    with pytest.raises(train_gpt.InputError, match=r"tokenizer file not found"):
        train_gpt.load_tokenizer(str(tmp_path / "missing.model"), 1024)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    with pytest.raises(train_gpt.InputError, match=r"garbage.model: not a SentencePiece model"):
        train_gpt.load_tokenizer(str(garbage), 1024)


def test_stream_wraps_across_shards(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", [1, 2, 3])
    write_shard(tmp_path / "fineweb_train_000001.bin", [4, 5])
    stream = train_gpt.TokenStream(train_gpt.shard_files(str(tmp_path), "train"), 1024)
    assert stream.take(4).tolist() == [1, 2, 3, 4]
    assert stream.take(4).tolist() == [5, 1, 2, 3]


def test_ranks_take_disjoint_spans_of_the_same_block(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", list(range(100)))
    files = train_gpt.shard_files(str(tmp_path), "train")
    batches = [
        train_gpt.TrainingLoader(train_gpt.StreamBlocks(files, 1024, r, 2), torch.device("cpu")).next_batch(8, 4)
        for r in range(2)
    ]
    (x0, y0, _), (x1, y1, _) = batches
    assert x0.flatten().tolist() == list(range(0, 8)) and y0.flatten().tolist() == list(range(1, 9))
    assert x1.flatten().tolist() == list(range(9, 17)) and y1.flatten().tolist() == list(range(10, 18))


@pytest.mark.e2e
def test_script_reports_bad_input_in_one_line(tmp_path, sample_data):
    """End to end: a broken validation shard stops the run with exit code 2 and one 'error:' line."""
    dataset, tokenizer = sample_data
    data = tmp_path / "data"
    data.mkdir()
    write_shard(data / "fineweb_train_000000.bin", [1, 2, 3, 4])
    (data / "fineweb_val_000000.bin").write_bytes(_header(magic=7) + b"\0" * 6)
    result = run_script(tmp_path, {"DATA_PATH": data, "TOKENIZER_PATH": tokenizer, "RUN_ID": "bad"}, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {data / 'fineweb_val_000000.bin'}: magic 7 is not 20240520; not a challenge shard"
    ]


@pytest.mark.e2e
@pytest.mark.parametrize("ranks", [1, 2])
def test_an_existing_log_is_never_appended_to(tmp_path, ranks):
    """A second run with the same RUN_ID stops before writing: a log holds one run under one seal."""
    log = tmp_path / "logs" / "again.txt"
    log.parent.mkdir()
    log.write_text("an earlier run\n")
    env = dict(TINY_ENV, DRY_RUN=1, DATA_PATH="unused", TOKENIZER_PATH="unused", RUN_ID="again")
    result = run_script(tmp_path, env, timeout=120, nproc=ranks)
    assert result.returncode != 0
    assert f"error: {Path('logs') / 'again.txt'}: already exists (a log holds one run)" in result.stderr
    assert log.read_text() == "an earlier run\n"
    if ranks == 1:  # the refusal is the point; once, that the same settings run under a new RUN_ID
        assert run_script(tmp_path, dict(env, RUN_ID="fresh"), timeout=120).returncode == 0


def test_real_tokenizer_vocab_check():
    assert train_gpt.load_tokenizer(str(SAMPLE_TOKENIZER), 1024).vocab_size() == 1024
