#!/usr/bin/env python3
"""Turn real run logs into a records/ submission folder whose numbers all come from those logs.

    python3 tools/pack_record.py logs/seed1337.txt logs/seed42.txt logs/seed2025.txt \
        --name "LeakyReLU2_TTT_ParallelMuon" --author "Your Name" --github-id you [--code packed/train_gpt.py]

Creates records/track_10min_16mb/<date>_<name>/ with the code that ran (--code, default train_gpt.py; a
file written by tools/pack_code.py is verified to decode to the readable train_gpt.py), requirements.txt,
the logs, a README skeleton (results per seed, the configuration found in the logs, the command) and
submission.json (val_bpb, val_loss, bytes_total, seeds ... parsed from the logs, never typed).

Refused, with the reason: a log whose code is not byte-identical to --code; a log whose final
log_sha256 line does not match its content (edited after the run); an artifact over 16,000,000 bytes;
training (or GPTQ calibration) past 600 s; evaluation past 600 s; a TTT score without its audit line.
Runs that are not on 8 CUDA GPUs or not on the challenge's validation set are refused unless --allow-non-record,
and are then labelled non-record in submission.json. The validation set is checked by its 50,000 documents (the
log's audited val_bytes line) and its scored token count, which depends on the vocabulary: 62,021,632 for sp1024,
47,851,520 for CaseOps sp8192, and for any other dataset the count its manifest (data/manifest*.json) implies.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import pack_code  # noqa: E402
from logparse import final_score  # noqa: E402

CAP_BYTES, LIMIT_SECONDS, CHALLENGE_VAL_DOCS = 16_000_000, 600.0, 50_000
# Scored validation tokens (the stream trimmed to whole 2048-token sequences) of the exports the records used.
KNOWN_VAL_TOKENS = {"fineweb10B_sp1024": 62_021_632, "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved": 47_851_520}
RULE = "=" * 100


class Refused(ValueError):
    """A log that cannot go into a submission; the message says which and why."""


@dataclass
class RunLog:
    path: Path
    seed: int
    score_label: str
    val_loss: float
    val_bpb: float
    total_bytes: int
    code_bytes: int
    train_ms: float
    eval_seconds: float
    started: str
    device: str
    world_size: int
    val_tokens: int
    val_docs: int
    torch: str
    attention: str
    settings: dict = field(default_factory=dict)
    non_record: list = field(default_factory=list)


def last(pattern: str, text: str, path: Path, what: str):
    found = re.findall(pattern, text, re.M)
    if not found:
        raise Refused(f"{path}: no {what} line")
    return found[-1]


def check_digest(text: str, path: Path) -> None:
    body, _, tail = text.rstrip("\n").rpartition("\n")
    match = re.fullmatch(r"log_sha256:([0-9a-f]{64})", tail)
    if not match:
        raise Refused(f"{path}: no final log_sha256 line (an unfinished run, or not written by train_gpt.py)")
    if hashlib.sha256((body + "\n").encode("utf-8")).hexdigest() != match.group(1):
        raise Refused(f"{path}: log_sha256 does not match the log's content: it was edited after the run")


def parse_log(path: Path, code: str) -> RunLog:
    text = path.read_text(encoding="utf-8")
    if not text.startswith(code + "\n" + RULE + "\n"):
        raise Refused(f"{path}: the code at the top of the log is not byte-identical to the code being packed")
    check_digest(text, path)
    score = final_score(text)
    if score is None:
        raise Refused(f"{path}: no final_score line (a log from before that line, or an unfinished run)")
    label, val_loss, val_bpb = score
    if label.startswith("legal_ttt") and not re.search(r"^ttt_audit ok: ", text, re.M):
        raise Refused(f"{path}: a TTT score without its 'ttt_audit ok' line")
    code_bytes, total = map(
        int, last(r"^artifact path:\S+ code_bytes:(\d+) model_bytes:\d+ total_bytes:(\d+)", text, path, "artifact")
    )
    train_ms = float(
        last(r"^step:\d+/\d+ val_loss:\S+ val_bpb:\S+ train_time:([\d.]+)ms", text, path, "final validation")
    )
    calibration = re.findall(r"^gptq:hessians .* ended_at:([\d.]+)s", text, re.M)
    eval_seconds = float(last(r"^eval:total seconds:([\d.]+)", text, path, "eval:total"))
    run = RunLog(
        path,
        int(last(r"^train_batch_tokens:.* seed:(\d+)$", text, path, "seed")),
        label,
        val_loss,
        val_bpb,
        total,
        code_bytes,
        train_ms,
        eval_seconds,
        last(r"^started:(\S+)$", text, path, "started"),
        last(r"^device:(\w+)", text, path, "device"),
        int(last(r"world_size:(\d+) grad_accum_steps", text, path, "world_size")),
        int(last(r"^val_loader:shards \S+ tokens:(\d+)", text, path, "val_loader")),
        int(last(r"^val_bytes:\S+ .*documents:(\d+)", text, path, "val_bytes (byte audit)")),
        last(r"^python:\S+ torch:(\S+) ", text, path, "python/torch"),
        last(r"^compute_dtype:\S+ attention:(\S+) ", text, path, "attention"),
        json.loads(last(r"^hyperparameters (\{.*\})$", text, path, "hyperparameters")),
    )
    if code_bytes != len(code.encode("utf-8")):
        raise Refused(f"{path}: logged code_bytes {code_bytes} is not the size of the packed code")
    if total > CAP_BYTES:
        raise Refused(f"{path}: artifact total {total:,} bytes is over the {CAP_BYTES:,}-byte cap")
    if train_ms > 1000 * LIMIT_SECONDS or (calibration and float(calibration[-1]) > LIMIT_SECONDS):
        raise Refused(f"{path}: training (with GPTQ calibration) took over {LIMIT_SECONDS:.0f} s")
    if eval_seconds > LIMIT_SECONDS:
        raise Refused(f"{path}: evaluation took {eval_seconds:.1f} s, over {LIMIT_SECONDS:.0f} s")
    if run.device != "cuda" or run.world_size != 8:
        run.non_record.append(f"ran on {run.device} x{run.world_size}, not 8 CUDA GPUs")
    dataset = Path(run.settings.get("data_path", "")).name
    expected, source = expected_val_tokens(dataset, int(run.settings.get("eval_seq_len", 2048)))
    if run.val_docs != CHALLENGE_VAL_DOCS:
        run.non_record.append(f"validated on {run.val_docs:,} documents, not the challenge's {CHALLENGE_VAL_DOCS:,}")
    if expected is None:
        run.non_record.append(f"the scored token count of {dataset!r} cannot be checked: {source}")
    elif run.val_tokens != expected:
        run.non_record.append(f"validated on {run.val_tokens:,} tokens, not the {expected:,} of {dataset} ({source})")
    return run


def expected_val_tokens(dataset: str, seq_len: int, data_dir: Path = REPO / "data") -> tuple[int | None, str]:
    """The scored token count of a challenge export: known for sp1024 and CaseOps, else from a local manifest's
    tokens_val (as train_gpt.py trims it); (None, why) when neither knows the dataset."""
    if dataset in KNOWN_VAL_TOKENS and seq_len == 2048:
        return KNOWN_VAL_TOKENS[dataset], "the records' logs"
    for manifest in sorted(data_dir.glob("manifest*.json")):
        entry = next(
            (
                d
                for d in json.loads(manifest.read_text(encoding="utf-8")).get("datasets", [])
                if d.get("name") == dataset
            ),
            None,
        )
        if entry:
            return (int(entry["stats"]["tokens_val"]) - 1) // seq_len * seq_len, f"{manifest.name}"
    return None, "no data/manifest*.json lists it (download it with data/cached_challenge_fineweb.py)"


def non_default_settings(runs: list[RunLog]) -> dict:
    sys.path.insert(0, str(REPO))
    import train_gpt

    defaults = vars(train_gpt.Hyperparameters({}))
    per_seed = {
        "seed",
        "run_id",
        "artifact_path",
        "rank",
        "local_rank",
        "world_size",
        "distributed",
        *train_gpt.NOT_SETTINGS,
    }
    settings = runs[0].settings
    return {k: v for k, v in sorted(settings.items()) if k not in per_seed and defaults.get(k) != v}


def submission(runs: list[RunLog], args, code: str) -> dict:
    bpbs, losses = [r.val_bpb for r in runs], [r.val_loss for r in runs]
    notes = sorted({note for r in runs for note in r.non_record})
    return {
        "author": args.author,
        "github_id": args.github_id,
        "name": args.name,
        "blurb": args.blurb,
        "date": min(r.started for r in runs),
        "val_loss": round(statistics.fmean(losses), 8),
        "val_bpb": round(statistics.fmean(bpbs), 8),
        "val_bpb_std": round(statistics.stdev(bpbs), 8) if len(bpbs) > 1 else None,
        "score": runs[0].score_label,
        "seeds": [r.seed for r in runs],
        "bytes_total": max(r.total_bytes for r in runs),
        "bytes_code": len(code.encode("utf-8")),
        "track": "10min_16mb" if not notes else "non-record: " + "; ".join(notes),
        "runs": [
            {
                "seed": r.seed,
                "val_loss": r.val_loss,
                "val_bpb": r.val_bpb,
                "bytes_total": r.total_bytes,
                "train_time_ms": r.train_ms,
                "eval_seconds": r.eval_seconds,
                "log": f"train_seed{r.seed}.log",
            }
            for r in runs
        ],
    }


READABLE_NAME = "train_gpt_human.py"  # as #1394 named the readable source beside its packed train_gpt.py
COMPRESSOR_MODULES = {"zstd": "zstandard", "brotli": "brotli", "lrzip": "brotli"}


def record_requirements(runs: list[RunLog]) -> str:
    """What the logged runs needed, from the logs: the torch they ran (pinned), FlashAttention 3 when they used
    it (ATTENTION_BACKEND=auto requires it on CUDA), the compressor's module, lrzip's system package."""
    versions = sorted({run.torch for run in runs})
    settings, attention = runs[0].settings, sorted({run.attention for run in runs})
    lines = [
        "# What the runs in this folder needed (tools/pack_record.py, from their logs).",
        f"torch=={versions[0].split('+')[0]}  # the runs used torch {', '.join(versions)}",
        "numpy",
        "sentencepiece",
    ]
    module = COMPRESSOR_MODULES.get(settings.get("compressor", "lzma"))
    if module:
        lines.append(f"{module}  # COMPRESSOR={settings['compressor']}")
    if "fa3" in attention:
        lines.append("# FlashAttention 3 (module flash_attn_interface): a Hopper wheel built for this torch; required")
        lines.append("# on CUDA by ATTENTION_BACKEND=auto, which refuses to run without it")
    elif attention:
        lines.append(f"# attention kernel used: {', '.join(attention)} (FlashAttention 3 not needed by these runs)")
    if settings.get("compressor") == "lrzip":
        lines.append("# system package: lrzip (apt-get install lrzip)")
    return "\n".join(lines) + "\n"


def readme(info: dict, runs: list[RunLog], settings: dict) -> str:
    env = " ".join(
        f"{k.upper()}={','.join(map(str, v)) if isinstance(v, list) else int(v) if isinstance(v, bool) else v}"
        for k, v in settings.items()
    )
    rows = "\n".join(
        f"| {r.seed} | {r.val_bpb:.8f} | {r.val_loss:.8f} | {r.total_bytes:,} | {r.train_ms / 1000:.1f} s | "
        f"{r.eval_seconds:.1f} s |"
        for r in runs
    )
    return f"""# {info["name"]}

{info["blurb"] or "(describe the submission here)"}

**val_bpb {info["val_bpb"]:.4f}** (mean of {len(runs)} seed{"s" if len(runs) > 1 else ""}, score line `{info["score"]}`), \
artifact at most {info["bytes_total"]:,} bytes. Track: {info["track"]}.

| seed | val_bpb | val_loss | artifact bytes | training | evaluation |
|---|---|---|---|---|---|
{rows}

Every number above is parsed from the logs in this folder by `tools/pack_record.py`.

## Configuration (settings that differ from train_gpt.py's defaults)

```bash
{env or "# none: the defaults"} torchrun --standalone --nproc_per_node=8 train_gpt.py
```

## Files

`train_gpt.py` (the code that produced every log, byte for byte: the counted code), `{READABLE_NAME}` when
`train_gpt.py` is the packed file (its readable source, not counted), `requirements.txt` (what the runs used, from
their logs), `train_seed<N>.log`, `submission.json`.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+", type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--author", default="")
    parser.add_argument("--github-id", default="")
    parser.add_argument("--blurb", default="")
    parser.add_argument("--code", type=Path, default=REPO / "train_gpt.py", help="the exact file that ran")
    parser.add_argument("--records-dir", type=Path, default=REPO / "records" / "track_10min_16mb")
    parser.add_argument("--submission-json", type=Path, help="also write submission.json here")
    parser.add_argument("--allow-non-record", action="store_true", help="accept CPU / proxy-data runs, labelled so")
    args = parser.parse_args(argv)
    try:
        code = args.code.read_bytes().decode("utf-8")
        if pack_code.STUB_PATTERN.match(code):
            pack_code.verify(args.code, REPO / "train_gpt.py")
        runs = [parse_log(path, code) for path in args.logs]
        if len({r.seed for r in runs}) != len(runs):
            raise Refused("two logs have the same seed")
        if any(r.non_record for r in runs) and not args.allow_non_record:
            raise Refused(
                "not a record run: "
                + "; ".join(sorted({n for r in runs for n in r.non_record}))
                + " (pass --allow-non-record to package it as a non-record submission)"
            )
    except (OSError, ValueError) as error:
        print(f"refused: {error}", file=sys.stderr)
        return 2
    info = submission(runs, args, code)
    folder = args.records_dir / f"{info['date'][:10]}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', args.name)}"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.code, folder / "train_gpt.py")
    if pack_code.STUB_PATTERN.match(code):  # the packed file is counted; the readable source beside it is not (#1394)
        shutil.copyfile(REPO / "train_gpt.py", folder / READABLE_NAME)
    (folder / "requirements.txt").write_text(record_requirements(runs), encoding="utf-8")
    for run in runs:
        shutil.copyfile(run.path, folder / f"train_seed{run.seed}.log")
    (folder / "submission.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    (folder / "README.md").write_text(readme(info, runs, non_default_settings(runs)), encoding="utf-8")
    if args.submission_json:
        args.submission_json.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    print(
        f"packed {len(runs)} log(s) into {folder}: val_bpb {info['val_bpb']:.8f}, bytes_total {info['bytes_total']:,}, "
        f"track {info['track']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
