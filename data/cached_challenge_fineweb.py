#!/usr/bin/env python3
"""Download the challenge's FineWeb export, verified, in the official script's layout.

    python3 data/cached_challenge_fineweb.py --variant sp1024                    # val + 80 train shards
    python3 data/cached_challenge_fineweb.py --variant sp1024 --train-shards 10  # a prefix of the train split
    python3 data/cached_challenge_fineweb.py --variant sp8192                    # #1394's SP8192 export
    python3 data/cached_challenge_fineweb.py --variant caseops_sp8192            # #1729's CaseOps + byte sidecar

Source: a Hugging Face dataset repo per variant (the ones the records used; MATCHED_FINEWEB_REPO_ID / --repo-id
overrides): sp1024 willdepueoai/parameter-golf (the challenge's own), sp4096/sp8192 kevclark/parameter-golf
(#1218/#1394), caseops_sp8192 romeerp/parameter-golf-caseops-v1 (#1729, dataset
fineweb10B_sp8192_lossless_caps_caseops_v1_reserved); files under datasets/ (MATCHED_FINEWEB_REMOTE_ROOT_PREFIX /
--remote-root), driven by the repo's manifest.json. Only the sp1024 layout has been exercised against the real
hub from this project; the others follow the records' download commands.
Destination (as data/cached_challenge_fineweb.py of openai/parameter-golf): data/manifest.json,
data/datasets/fineweb10B_<variant>/fineweb_{val,train}_NNNNNN.bin and data/tokenizers/<tokenizer files>.

Every file is verified before it is kept: shard header (magic, version, token count), size, token ids below
the vocabulary, each shard's token count against the manifest's split totals, the validation split's total
and its document count (BOS tokens; the challenge's split is 50,000 documents), and the tokenizer's
vocabulary size. A rerun resumes: files already present and valid are kept, anything missing or invalid
(an interrupted download, a truncated shard) is fetched again, into a temporary name then moved into place.
A local manifest that differs from the hub's is stale (shards may have been re-exported): the script refuses
to mix them unless --refresh-manifest, which replaces it and re-verifies every file. Each repo keeps its own
local copy (data/manifest.json for the challenge's repo, data/manifest.<owner>__<name>.json for the others), so
switching variants never trips over another repo's manifest (the records' "delete data/manifest.json" step).
CaseOps: every validation shard's byte sidecar fineweb_val_bytes_NNNNNN.bin is fetched and checked to have
one entry per token; train_gpt.py charges BPB against it.
--local-hub DIR reads the repo from a local copy instead of the network (mirrors, tests).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(DATA_DIR.parent))
CHALLENGE_REPO = "willdepueoai/parameter-golf"
VARIANTS = {  # variant: (Hugging Face dataset repo, dataset name in its manifest)
    "sp1024": (CHALLENGE_REPO, "fineweb10B_sp1024"),
    "sp4096": ("kevclark/parameter-golf", "fineweb10B_sp4096"),
    "sp8192": ("kevclark/parameter-golf", "fineweb10B_sp8192"),
    "caseops_sp8192": ("romeerp/parameter-golf-caseops-v1", "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"),
}
CHALLENGE_VAL_DOCS = 50_000


class DownloadError(RuntimeError):
    """A download or verification failure, naming the file and the problem."""


def hub_fetcher(repo_id: str, local_hub: Path | None):
    """A function remote_path -> local file path: a local mirror, or huggingface_hub's cached download."""
    if local_hub is not None:

        def fetch_local(remote: str) -> Path:
            path = local_hub / remote
            if not path.is_file():
                raise DownloadError(f"{remote} is not in the local hub {local_hub}")
            return path

        return fetch_local
    from huggingface_hub import hf_hub_download  # resumes partial downloads in its own cache

    def fetch_hub(remote: str) -> Path:
        parent, _, name = remote.rpartition("/")
        return Path(
            hf_hub_download(repo_id=repo_id, filename=name, subfolder=parent or None, repo_type="dataset")
        ).resolve(strict=True)

    return fetch_hub


def expected_shard_tokens(split_tokens: int, shard_size: int, index: int) -> int:
    return max(0, min(shard_size, split_tokens - index * shard_size))


def verify_shard(path: Path, expected_tokens: int, vocab_size: int) -> np.ndarray:
    import train_gpt

    try:
        tokens = train_gpt.load_data_shard(path, vocab_size)
    except train_gpt.InputError as error:
        raise DownloadError(str(error)) from None
    if len(tokens) != expected_tokens:
        raise DownloadError(f"{path}: {len(tokens)} tokens, the manifest implies {expected_tokens}")
    return tokens


def verify_tokenizer(path: Path, vocab_size: int) -> None:
    if path.suffix != ".model":
        return
    import train_gpt

    try:
        train_gpt.load_tokenizer(str(path), vocab_size)
    except train_gpt.InputError as error:
        raise DownloadError(str(error)) from None


def install(remote: str, destination: Path, fetch, verify, log) -> bool:
    """Keep a valid existing file; else fetch into a temporary name, verify, move into place. True if fetched."""
    if destination.exists():
        try:
            verify(destination)
            return False
        except DownloadError as error:
            log(f"re-fetching {destination.name}: {error}")
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".partial")
    shutil.copyfile(fetch(remote), partial)
    try:
        verify(partial)
    except DownloadError as error:
        partial.unlink()
        raise DownloadError(f"downloaded {remote} is invalid: {error}") from None
    os.replace(partial, destination)
    return True


def manifest_path(data_dir: Path, repo_id: str) -> Path:
    return data_dir / ("manifest.json" if repo_id == CHALLENGE_REPO else f"manifest.{repo_id.replace('/', '__')}.json")


def load_manifest(fetch, remote_root: str, local_path: Path, refresh: bool, log) -> dict:
    remote = json.loads(Path(fetch(f"{remote_root}/manifest.json")).read_text(encoding="utf-8"))
    if local_path.exists():
        local = json.loads(local_path.read_text(encoding="utf-8"))
        if local != remote and not refresh:
            raise DownloadError(
                f"{local_path} is stale: it differs from {remote_root}/manifest.json on the hub, so the "
                f"shards on disk may come from another export. Rerun with --refresh-manifest to "
                f"replace it and re-verify every file (or move data/ away)"
            )
        if local != remote:
            log(f"replacing stale {local_path}")
    local_path.parent.mkdir(parents=True, exist_ok=True)
    local_path.write_text(json.dumps(remote, indent=2) + "\n", encoding="utf-8")
    return remote


def download(
    variant: str,
    train_shards: int,
    data_dir: Path,
    fetch,
    remote_root: str = "datasets",
    refresh_manifest: bool = False,
    log=print,
    repo_id: str | None = None,
) -> dict:
    repo_id, name = repo_id or VARIANTS[variant][0], VARIANTS[variant][1]
    manifest = load_manifest(fetch, remote_root, manifest_path(data_dir, repo_id), refresh_manifest, log)
    dataset = next((d for d in manifest.get("datasets", []) if d.get("name") == name), None)
    if dataset is None:
        raise DownloadError(
            f"{name} is not in {remote_root}/manifest.json (variants there: "
            f"{[d.get('name') for d in manifest.get('datasets', [])]})"
        )
    stats, vocab_size, bos = dataset["stats"], int(dataset["vocab_size"]), int(dataset.get("bos_id", 1))
    if stats.get("docs_val") != CHALLENGE_VAL_DOCS:
        raise DownloadError(
            f"{name}: the manifest's validation split has {stats.get('docs_val')} documents, "
            f"not the challenge's {CHALLENGE_VAL_DOCS:,}"
        )
    if train_shards > int(stats["files_train"]):
        raise DownloadError(f"{name} has {stats['files_train']} train shards; {train_shards} were requested")
    shard_size = int(manifest.get("shard_size", 100_000_000))
    target, fetched = data_dir / "datasets" / name, 0
    val_tokens, val_docs = 0, 0
    for split, count in (("val", int(stats["files_val"])), ("train", train_shards)):
        for index in range(count):
            file = f"fineweb_{split}_{index:06d}.bin"
            expected = expected_shard_tokens(int(stats[f"tokens_{split}"]), shard_size, index)
            fetched += install(
                f"{remote_root}/datasets/{name}/{file}",
                target / file,
                fetch,
                lambda path, e=expected: verify_shard(path, e, vocab_size),
                log,
            )
            if split == "val":
                tokens = verify_shard(target / file, expected, vocab_size)
                val_tokens, val_docs = val_tokens + len(tokens), val_docs + int(np.count_nonzero(tokens == bos))
            if split == "val" and variant.startswith("caseops"):  # one original-byte count per token, uint16
                sidecar = file.replace("fineweb_val_", "fineweb_val_bytes_")
                fetched += install(
                    f"{remote_root}/datasets/{name}/{sidecar}",
                    target / sidecar,
                    fetch,
                    lambda path, e=expected: verify_shard(path, e, 1 << 16),
                    log,
                )
    if (val_tokens, val_docs) != (int(stats["tokens_val"]), CHALLENGE_VAL_DOCS):
        raise DownloadError(
            f"{target}: validation has {val_tokens} tokens and {val_docs} documents; the manifest says "
            f"{stats['tokens_val']} and {CHALLENGE_VAL_DOCS}"
        )
    tokenizer = next(t for t in manifest["tokenizers"] if t.get("name") == dataset["tokenizer_name"])
    for key in ("model_path", "vocab_path"):
        if tokenizer.get(key):
            remote = tokenizer[key]
            fetched += install(
                f"{remote_root}/{remote}",
                data_dir / "tokenizers" / Path(remote).name,
                fetch,
                lambda path: verify_tokenizer(path, vocab_size),
                log,
            )
    log(
        f"{name}: {stats['files_val']} val shard(s) ({val_tokens:,} tokens, {val_docs:,} documents) and {train_shards} "
        f"train shard(s) verified in {target}; {fetched} file(s) fetched, the rest were already valid"
    )
    model = data_dir / "tokenizers" / Path(tokenizer["model_path"]).name
    log(f"train with: DATA_PATH={target} TOKENIZER_PATH={model} VOCAB_SIZE={vocab_size}")
    return {"dataset": target, "fetched": fetched, "val_tokens": val_tokens, "val_docs": val_docs, "tokenizer": model}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="sp1024")
    parser.add_argument(
        "--train-shards", type=int, default=80, help="train shards to fetch (a prefix; default 80 = 8B tokens)"
    )
    parser.add_argument(
        "--repo-id",
        default=os.environ.get("MATCHED_FINEWEB_REPO_ID"),
        help="the Hugging Face dataset repo (default: the variant's, see above)",
    )
    parser.add_argument("--remote-root", default=os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "datasets"))
    parser.add_argument(
        "--data-dir", type=Path, default=DATA_DIR, help="where manifest.json, datasets/, tokenizers/ go"
    )
    parser.add_argument(
        "--local-hub", type=Path, help="read the dataset repo from this directory instead of the network"
    )
    parser.add_argument("--refresh-manifest", action="store_true", help="replace a stale local manifest.json")
    args = parser.parse_args(argv)
    if args.train_shards < 0:
        parser.error("--train-shards must be >= 0")
    try:
        repo_id = args.repo_id or VARIANTS[args.variant][0]
        download(
            args.variant,
            args.train_shards,
            args.data_dir,
            hub_fetcher(repo_id, args.local_hub),
            args.remote_root,
            args.refresh_manifest,
            repo_id=repo_id,
        )
    except DownloadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
