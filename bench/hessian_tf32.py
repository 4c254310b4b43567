#!/usr/bin/env python3
"""What TF32 Hessians cost GPTQ (issue 32, the second CUDA review's defect 7), emulated on the CPU.

The CPU has no TF32, so the Hessian sums X^T X are computed twice on the same calibration batches of one trained
model: in strict fp32, and with every input rounded to TF32 (10 mantissa bits, round to nearest even, as the tensor
cores take their inputs; fp32 sums). Each Hessian set then drives the same GPTQ export, measured against the strict
Hessians: the relative difference of the sums, the share of quantized values that change, the Hessian-weighted
output error GPTQ minimizes, the compressed bytes and the roundtrip val_bpb.

    source bench/p1_env.sh && python3 bench/hessian_tf32.py > logs/bench_hessian_tf32.txt 2>&1

(what a GPU's TF32 matmul also changes, its summation order, is not emulated; the rounding is the larger effect)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import train_gpt as tg  # noqa: E402
from quant_sweep import hessian_weighted_error, roundtrip_model  # noqa: E402


def tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 values rounded to TF32's 10 explicit mantissa bits (round to nearest, ties to even)."""
    bits = x.float().contiguous().view(torch.int32)
    rounded = (bits + 0x0FFF + ((bits >> 13) & 1)) & ~0x1FFF
    return rounded.view(torch.float32)


@torch.inference_mode()
def both_hessians(model, run, loader, local_tokens: int) -> tuple[dict, dict]:
    """Strict and TF32-input X^T X of every matrix's inputs over GPTQ_CALIB_BATCHES batches (as collect_hessians)."""
    exact, rounded = {}, {}

    def record(name: str, inputs: torch.Tensor):
        flat = inputs.reshape(-1, inputs.size(-1)).float()
        for sums, values in ((exact, flat), (rounded, tf32(flat))):
            gram = values.T @ values
            sums[name] = sums[name] + gram if name in sums else gram

    model.eval()
    for _ in range(run.h.gptq_calib_batches):
        inputs, _, documents = loader.next_batch(local_tokens, run.h.train_seq_len)
        model.hidden_states(inputs, run.compute_dtype, documents, record=record)
    return exact, rounded


def export_and_score(run, h, val, state: dict, hessians: dict, reference: dict) -> dict:
    tensors, schemes = tg.quantize_state(state, h, hessians)
    blob = tg.encode_artifact(tensors, schemes, h)
    loss, bpb = tg.evaluate(roundtrip_model(run, blob), run, val, h.eval_seq_len)[:2]
    error = hessian_weighted_error(state, tensors, schemes, reference)
    return dict(tensors=tensors, bytes=len(blob), loss=loss, bpb=bpb, error=error)


def main() -> int:
    environ = dict(
        os.environ, RUN_ID=os.environ.get("RUN_ID", "bench_hessian_tf32_training"), QUANT="gptq", TTT_ENABLED="0"
    )
    h = tg.Hyperparameters(environ)
    run = tg.RunContext(h)
    started = time.perf_counter()
    val = tg.ValidationSet(h, tg.load_tokenizer(h.tokenizer_path, h.vocab_size))
    model = tg.build_model(h, run)
    trainer = tg.Trainer(h, run, model, lambda: tg.evaluate(model, run, val, h.eval_seq_len)[:2])
    trainer.train()
    state = tg.export_state(model)
    exact, rounded = both_hessians(model, run, trainer.new_loader(), trainer.local_tokens)
    differences = {name: float((rounded[name] - exact[name]).norm() / exact[name].norm()) for name in sorted(exact)}
    worst = max(differences, key=differences.get)
    print(
        f"trained {h.iterations} steps ({h.num_layers} layers x {h.model_dim}) in {time.perf_counter() - started:.0f}s; "
        f"{len(exact)} Hessians over {h.gptq_calib_batches} batches of {trainer.local_tokens} tokens"
    )
    print(
        f"hessian relative difference (Frobenius) TF32 inputs vs fp32: mean {sum(differences.values()) / len(differences):.2e} "
        f"max {differences[worst]:.2e} ({worst})"
    )
    pre_loss, pre_bpb = tg.evaluate(model, run, val, h.eval_seq_len)[:2]
    print(f"pre-quantization val_loss {pre_loss:.6f} val_bpb {pre_bpb:.6f}")
    results = {
        label: export_and_score(run, h, val, state, sums, exact) for label, sums in (("fp32", exact), ("tf32", rounded))
    }
    changed = sum(
        int((results["fp32"]["tensors"][name] != results["tf32"]["tensors"][name]).sum())
        for name in results["fp32"]["tensors"]
        if name.endswith(".q")
    )
    total = sum(t.numel() for name, t in results["fp32"]["tensors"].items() if name.endswith(".q"))
    print(f"quantized values that differ: {changed:,} of {total:,} ({changed / total:.4%})")
    print("| Hessians | model bytes | roundtrip val_loss | roundtrip val_bpb | Hessian-weighted error (fp32 H) |")
    print("|---|---|---|---|---|")
    for label, result in results.items():
        print(f"| {label} | {result['bytes']:,} | {result['loss']:.6f} | {result['bpb']:.6f} | {result['error']:.4f} |")
    delta = results["tf32"]["bpb"] - results["fp32"]["bpb"]
    print(f"tf32 minus fp32: val_bpb {delta:+.6f}, bytes {results['tf32']['bytes'] - results['fp32']['bytes']:+,d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
