"""data/cached_challenge_fineweb.py against a fake local hub: layout, verification, resume, stale manifests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import cached_challenge_fineweb as downloader
from build_sample import write_shard

SHARD, VAL_DOCS, TRAIN_TOKENS = 60_000, 50_000, 250_000


def make_hub(root: Path, tokenizer: str, name: str = "fineweb10B_sp1024") -> Path:
    """A dataset repo laid out like willdepueoai/parameter-golf/datasets, small: shards of 60,000 tokens (a
    CaseOps dataset also gets a byte sidecar per validation shard)."""
    rng = np.random.default_rng(0)
    val = np.concatenate([[1, *rng.integers(4, 1024, 2)] for _ in range(VAL_DOCS)])  # 50,000 docs of 3 tokens
    train = rng.integers(4, 1024, TRAIN_TOKENS)
    base = root / "datasets" / "datasets" / name
    for split, tokens in (("val", val), ("train", train)):
        for index, first in enumerate(range(0, len(tokens), SHARD)):
            write_shard(base / f"fineweb_{split}_{index:06d}.bin", tokens[first : first + SHARD])
            if split == "val" and "caseops" in name:
                write_shard(base / f"fineweb_val_bytes_{index:06d}.bin", (tokens[first : first + SHARD] != 1) * 3)
    (root / "datasets" / "tokenizers").mkdir(parents=True)
    shutil.copy(tokenizer, root / "datasets" / "tokenizers" / "fineweb_1024_bpe.model")
    shutil.copy(Path(tokenizer).with_suffix(".vocab"), root / "datasets" / "tokenizers" / "fineweb_1024_bpe.vocab")
    manifest = {
        "version": "10B",
        "num_val_docs": VAL_DOCS,
        "shard_size": SHARD,
        "tokenizers": [
            {
                "name": "sp_bpe_1024",
                "kind": "sentencepiece_bpe",
                "vocab_size": 1024,
                "model_path": "tokenizers/fineweb_1024_bpe.model",
                "vocab_path": "tokenizers/fineweb_1024_bpe.vocab",
            }
        ],
        "datasets": [
            {
                "name": name,
                "tokenizer_name": "sp_bpe_1024",
                "vocab_size": 1024,
                "bos_id": 1,
                "stats": {
                    "docs_val": VAL_DOCS,
                    "files_val": 3,
                    "files_train": 5,
                    "tokens_val": len(val),
                    "tokens_train": TRAIN_TOKENS,
                },
            }
        ],
    }
    (root / "datasets" / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture
def hub(tmp_path, sample_data):
    return make_hub(tmp_path / "hub", sample_data[1])


def run(hub: Path, data: Path, **kwargs) -> dict:
    messages = []
    result = downloader.download(
        "sp1024", kwargs.pop("train_shards", 3), data, downloader.hub_fetcher("x", hub), log=messages.append, **kwargs
    )
    result["messages"] = messages
    return result


def test_downloads_the_official_layout_and_verifies_it(hub, tmp_path):
    data = tmp_path / "data"
    result = run(hub, data)
    dataset = data / "datasets" / "fineweb10B_sp1024"
    assert sorted(p.name for p in dataset.iterdir()) == [
        "fineweb_train_000000.bin",
        "fineweb_train_000001.bin",
        "fineweb_train_000002.bin",
        "fineweb_val_000000.bin",
        "fineweb_val_000001.bin",
        "fineweb_val_000002.bin",
    ]
    assert (data / "tokenizers" / "fineweb_1024_bpe.model").is_file() and (data / "manifest.json").is_file()
    assert result["fetched"] == 8 and result["val_docs"] == 50_000 and result["val_tokens"] == 150_000
    assert result["messages"][-1] == (
        f"train with: DATA_PATH={dataset} TOKENIZER_PATH={data}/tokenizers/fineweb_1024_bpe.model VOCAB_SIZE=1024"
    )
    assert run(hub, data)["fetched"] == 0  # a rerun keeps every valid file


def test_resumes_an_interrupted_download(hub, tmp_path):
    data = tmp_path / "data"
    run(hub, data)
    dataset = data / "datasets" / "fineweb10B_sp1024"
    (dataset / "fineweb_train_000001.bin").unlink()
    truncated = dataset / "fineweb_val_000001.bin"
    truncated.write_bytes(truncated.read_bytes()[:5000])  # what a killed copy leaves behind
    (dataset / "fineweb_train_000002.bin.partial").write_bytes(b"junk")
    result = run(hub, data)
    assert result["fetched"] == 2
    assert any("re-fetching fineweb_val_000001.bin" in m for m in result["messages"])
    assert downloader.verify_shard(truncated, 60_000, 1024).size == 60_000


def test_a_truncated_shard_on_the_hub_is_refused(hub, tmp_path):
    bad = hub / "datasets" / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000002.bin"
    bad.write_bytes(bad.read_bytes()[:-10])
    with pytest.raises(
        downloader.DownloadError,
        match=r"downloaded datasets/datasets/fineweb10B_sp1024/"
        r"fineweb_train_000002.bin is invalid: .*header says 60000 tokens",
    ):
        run(hub, tmp_path / "data")
    assert not list((tmp_path / "data" / "datasets" / "fineweb10B_sp1024").glob("fineweb_train_000002*"))


def test_a_shard_that_disagrees_with_the_manifest_is_refused(hub, tmp_path):
    shard = hub / "datasets" / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000000.bin"
    write_shard(shard, np.ones(50_000, dtype=np.uint16))  # a valid shard of the wrong size
    with pytest.raises(downloader.DownloadError, match=r"50000 tokens, the manifest implies 60000"):
        run(hub, tmp_path / "data")


def test_a_stale_manifest_is_refused_until_refreshed(hub, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    old = json.loads((hub / "datasets" / "manifest.json").read_text())
    old["datasets"][0]["stats"]["files_train"] = 4
    (data / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(
        downloader.DownloadError, match=r"manifest.json is stale: it differs from datasets/manifest.json"
    ):
        run(hub, data)
    result = run(hub, data, refresh_manifest=True)
    assert result["fetched"] == 8 and any("replacing stale" in m for m in result["messages"])


def test_the_validation_split_must_be_the_challenges(hub, tmp_path):
    manifest_path = hub / "datasets" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["datasets"][0]["stats"]["docs_val"] = 10_000
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(
        downloader.DownloadError, match=r"validation split has 10000 documents, not the challenge's 50,000"
    ):
        run(hub, tmp_path / "data")


def test_command_line_reports_errors_in_one_line(hub, tmp_path, capsys):
    status = downloader.main(["--variant", "sp4096", "--local-hub", str(hub), "--data-dir", str(tmp_path / "d")])
    assert status == 2
    assert capsys.readouterr().err.startswith("error: fineweb10B_sp4096 is not in datasets/manifest.json")
    assert downloader.main(["--train-shards", "9", "--local-hub", str(hub), "--data-dir", str(tmp_path / "d")]) == 2


def test_caseops_fetches_its_byte_sidecars_and_keeps_its_own_manifest(tmp_path, sample_data):
    name = downloader.VARIANTS["caseops_sp8192"][1]
    hub, data = make_hub(tmp_path / "hub", sample_data[1], name), tmp_path / "data"
    (data / "manifest.json").parent.mkdir()
    (data / "manifest.json").write_text("{}")  # the challenge repo's manifest: another repo's, left alone
    result = downloader.download("caseops_sp8192", 1, data, downloader.hub_fetcher("x", hub), log=lambda m: None)
    dataset = data / "datasets" / name
    assert sorted(p.name for p in dataset.glob("fineweb_val_bytes_*.bin")) == [
        f"fineweb_val_bytes_{i:06d}.bin" for i in range(3)
    ]
    assert result["fetched"] == 3 + 3 + 1 + 2 and (data / "manifest.romeerp__parameter-golf-caseops-v1.json").is_file()
    assert (data / "manifest.json").read_text() == "{}"
    sidecar = hub / "datasets" / "datasets" / name / "fineweb_val_bytes_000001.bin"
    write_shard(sidecar, np.zeros(59_999, dtype=np.uint16))  # one entry short of its token shard
    (dataset / "fineweb_val_bytes_000001.bin").unlink()
    with pytest.raises(
        downloader.DownloadError,
        match=r"fineweb_val_bytes_000001.bin is invalid: .*59999 tokens, "
        r"the manifest implies 60000",
    ):
        downloader.download("caseops_sp8192", 1, data, downloader.hub_fetcher("x", hub), log=lambda m: None)
