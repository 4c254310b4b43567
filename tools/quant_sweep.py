#!/usr/bin/env python3
"""Train once, then export and score the same weights under several quantization/compression settings.

    source bench/p1_env.sh
    python3 tools/quant_sweep.py --run-id p1_quant_sweep \
        --grid QUANT=gptq_lite,COMPRESSOR=lzma --grid QUANT=gptq,COMPRESSOR=brotli,BYTE_SHUFFLE=1 ...

Training follows the environment exactly like train_gpt.py (GPTQ Hessians are always collected after it,
on the next training batches). Without a wallclock cap the training does not depend on the export
settings, so every row scores the very same trained weights. For each --grid entry (env overrides), the
tool quantizes, encodes, writes and reads back the artifact, and evaluates the roundtrip model on the
validation set (non-overlapping windows). It also measures whether packing 6-bit values into 6 bits
(instead of one per int8 byte) helps each compressor. Everything goes to logs/<run-id>.txt, which starts
with train_gpt.py's code like a training log.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def pack_six_bits(q: torch.Tensor) -> bytes:
    """Values in [-31, 31] as 6-bit fields, 4 values in 3 bytes (little-endian bit order)."""
    values = (q.reshape(-1).to(torch.int16) + 32).numpy().astype(np.uint32)
    values = np.concatenate([values, np.zeros((-len(values)) % 4, dtype=np.uint32)]).reshape(-1, 4)
    words = values[:, 0] | values[:, 1] << 6 | values[:, 2] << 12 | values[:, 3] << 18
    return np.stack([words & 255, words >> 8 & 255, words >> 16 & 255], axis=1).astype(np.uint8).tobytes()


def bitpack_report(tensors: dict, schemes: dict, log) -> None:
    """Compressed bytes of all int6 values: one per int8 byte vs packed into 6 bits."""
    names = [n for n, scheme in schemes.items() if scheme == "int6"]
    if not names:
        return
    bytewise = b"".join(tensors[n + ".q"].numpy().tobytes() for n in names)
    packed = b"".join(pack_six_bits(tensors[n + ".q"]) for n in names)
    for compressor in ("lzma", "zstd", "brotli"):
        a, b = len(tg.compress(bytewise, compressor)), len(tg.compress(packed, compressor))
        log(
            f"bitpack compressor:{compressor} int6_values:{sum(tensors[n + '.q'].numel() for n in names)} "
            f"one_per_byte:{a} six_bit_packed:{b} packed_minus_bytewise:{b - a:+d}"
        )


def hessian_weighted_error(state: dict, tensors: dict, schemes: dict, hessians: dict) -> float:
    """Sum over the matrices that have calibration Hessians H = sum(x^T x) of ||X (W - W_hat)^T||^2 =
    tr(E H E^T): the output error GPTQ minimizes, measured the same way for every setting."""
    restored = tg.dequantize_state(tensors, schemes)
    total = 0.0
    for name, scheme in schemes.items():
        hessian = hessians.get(tg.hessian_name(name)) if scheme != "fp16" else None
        if hessian is not None:
            error = state[name].float() - restored[name]
            total += float(((error @ hessian.float()) * error).sum())
    return total


def roundtrip_model(run, blob: bytes):
    """A fresh model holding what an artifact of these bytes gives back when written and read from disk."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "roundtrip.ptz"
        path.write_bytes(blob)
        restored = tg.build_model(run.h, run)
        tg.load_exported_state(restored, tg.read_artifact(str(path)))
    return restored


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--grid", action="append", required=True, help="comma-separated VAR=VALUE overrides")
    parser.add_argument("--save-state", type=Path, help="save the trained weights and Hessians here (tensors only)")
    parser.add_argument("--load-state", type=Path, help="skip training: load weights and Hessians saved earlier")
    args = parser.parse_args()
    environ = dict(os.environ, RUN_ID=args.run_id, QUANT="gptq")
    h = tg.Hyperparameters(environ)
    run = tg.RunContext(h)
    tg.log_run_header(run, Path(tg.__file__).read_bytes().decode("utf-8"))
    run.log(f"quant_sweep: grid {args.grid}")
    val = tg.ValidationSet(h, tg.load_tokenizer(h.tokenizer_path, h.vocab_size))
    model = tg.build_model(h, run)
    if args.load_state:
        saved = torch.load(args.load_state, weights_only=True)
        tg.load_exported_state(model, saved["state"])
        hessians = saved["hessians"]
        run.log(f"quant_sweep: loaded trained weights and Hessians from {args.load_state}")
    else:
        hessians = tg.Trainer(h, run, model, lambda: tg.evaluate(model, run, val, h.eval_seq_len)[:2]).train()
    state = tg.export_state(model)
    if args.save_state:
        torch.save({"state": state, "hessians": hessians}, args.save_state)
    pre_loss, pre_bpb = tg.evaluate(model, run, val, h.eval_seq_len)[:2]
    run.log(f"sweep pre_quant val_loss:{pre_loss:.6f} val_bpb:{pre_bpb:.6f}")
    rows = []
    for entry in args.grid:
        overrides = dict(item.split("=", 1) for item in entry.split(","))
        variant = tg.Hyperparameters(dict(environ, **overrides))
        started = time.perf_counter()
        tensors, schemes = tg.quantize_state(state, variant, hessians)
        blob = tg.encode_artifact(tensors, schemes, variant)
        seconds = time.perf_counter() - started
        weighted_error = hessian_weighted_error(state, tensors, schemes, hessians)
        loss, bpb = tg.evaluate(roundtrip_model(run, blob), run, val, h.eval_seq_len)[:2]
        run.log(
            f"sweep {entry} model_bytes:{len(blob)} roundtrip_val_loss:{loss:.6f} roundtrip_val_bpb:{bpb:.6f} "
            f"gap:{bpb - pre_bpb:+.6f} hessian_weighted_error:{weighted_error:.1f} export_seconds:{seconds:.1f}"
        )
        rows.append((entry, len(blob), bpb))
        if entry == args.grid[0]:
            bitpack_report(tensors, schemes, run.log)
    run.log(f"| settings | model bytes | roundtrip val_bpb | gap vs pre-quant {pre_bpb:.4f} |")
    run.log("|---|---|---|---|")
    for entry, size, bpb in rows:
        run.log(f"| {entry} | {size:,} | {bpb:.4f} | {bpb - pre_bpb:+.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
