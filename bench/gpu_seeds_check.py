#!/usr/bin/env python3
"""GPU check of the #1089 switches (PRESET=pr1089 at full size, one device): what only a GPU can show.

    DATA_PATH=./data/datasets/fineweb_sample_sp1024 ATTENTION_BACKEND=sdpa python3 bench/gpu_seeds_check.py

1. builds the pr1089 model (EngramLite, gated skips, mimetic init, MLP 3.5x) and primes the compiled training
   graphs (plain and soft-round QAT) through Trainer.prime, timing the compile;
2. times training steps with QAT off, then on with soft-round's alpha changing every step, and fails if any
   graph compiles after priming (alpha is a tensor filled in place);
3. times one Muon step over the banks in bf16: #549's quintic Newton-Schulz (5 steps) against Turbo-Muon
   (AOL + Polar Express, 4 steps, row_col);
4. collects GPTQ Hessians on a few batches and times the mixed-precision allocation and one brotli encode.
Prints one line per result; exits 1 if a graph compiled after priming.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def muon_step_seconds(model, h, run, ns: str, steps: int, post_norm: str, reps: int = 10) -> float:
    banks = [torch.nn.Parameter(b.detach().clone()) for b in model.banks()]
    for bank in banks:
        bank.grad = torch.randn_like(bank) * 1e-3
    muon = tg.BankMuon(
        banks, h.matrix_lr, h.muon_momentum, steps, h.muon_wd, run.compute_dtype, ns=ns, post_norm=post_norm
    )
    muon.step()  # allocation
    return min(timed(muon.step, run.device) for _ in range(reps))


def main() -> int:
    environ = dict(
        os.environ,
        PRESET="pr1089",
        RUN_ID=os.environ.get("RUN_ID", f"gpu_seeds_{int(time.time())}"),
        WARMUP_STEPS=os.environ.get("WARMUP_STEPS", "2"),
        GPTQ_CALIB_BATCHES="4",
    )
    h = tg.Hyperparameters(environ)
    run = tg.RunContext(h)
    print(f"device {run.device} dtype {run.compute_dtype} compile {run.compile} attention {run.attention_name}")
    model = tg.build_model(h, run)
    print(f"params {sum(p.numel() for p in model.parameters())}")
    trainer = tg.Trainer(h, run, model)
    print(f"prime: {timed(trainer.prime, run.device):.1f}s (plain + soft-round QAT graphs)")
    primed = counters["stats"]["unique_graphs"]
    loader = trainer.new_loader()
    plain = [timed(lambda: trainer.step(loader, step, 1.0), run.device) for step in range(6)]
    model.qat_active = True
    qat = []
    for step in range(6):
        model.soft_round_alpha.fill_(1.0 + 3.0 * step)
        qat.append(timed(lambda: trainer.step(loader, step, 0.1), run.device))
    model.qat_active = False
    new_graphs = counters["stats"]["unique_graphs"] - primed
    print(
        f"train step: {1000 * sorted(plain)[3]:.1f} ms plain, {1000 * sorted(qat)[3]:.1f} ms soft-round QAT "
        f"(median of 6; {h.grad_accum_steps} micro-batches of {trainer.local_tokens} tokens); "
        f"graphs compiled after priming: {new_graphs}"
    )
    quintic = muon_step_seconds(model, h, run, "quintic", 5, "none")
    turbo = muon_step_seconds(model, h, run, "turbo", 4, "row_col")
    print(
        f"muon step over all banks ({run.compute_dtype}): quintic x5 {1000 * quintic:.2f} ms, "
        f"turbo x4 + row_col {1000 * turbo:.2f} ms"
    )
    hessians, _ = tg.collect_hessians(model, run, loader, trainer.local_tokens)
    state = tg.export_state(model)
    started = time.perf_counter()
    bits = tg.allocate_mixed_bits(state, h, hessians, tg.SIZE_CAP_BYTES - 30_000, print)
    allocation = time.perf_counter() - started
    tensors, schemes = tg.quantize_state(state, h, hessians, bits)
    started = time.perf_counter()
    blob = tg.encode_artifact(tensors, schemes, h)
    print(
        f"mixed precision allocation {allocation:.1f}s; one {h.compressor} encode {time.perf_counter() - started:.1f}s "
        f"-> {len(blob)} bytes (after 12 steps: not a trained model's size)"
    )
    return 1 if new_graphs else 0


if __name__ == "__main__":
    sys.exit(main())
