"""GPU check of FUSED_KERNELS' Triton soft-capped cross-entropy (never run on this project's CPU machines):
forward and backward against the eager path, and their times. Run on a CUDA machine with triton installed:
    python3 bench/gpu_frontier_check.py
Prints one line per vocabulary size; exits 1 if the kernel disagrees with the eager math."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt  # noqa: E402


def timed(fn, repeats=20) -> float:
    fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - started) / repeats


def eager(z, targets):
    return F.cross_entropy(30 * torch.tanh(z / 30), targets, reduction="none")


def check(rows: int, vocab: int) -> bool:
    generator = torch.Generator(device="cuda").manual_seed(0)
    z = (20 * torch.randn(rows, vocab, device="cuda", generator=generator)).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), device="cuda", generator=generator)
    fused_loss = train_gpt.SoftcappedCrossEntropy.apply(z, targets, 30.0)
    (fused_grad,) = torch.autograd.grad(fused_loss.mean(), z)
    eager_loss = eager(z, targets)
    (eager_grad,) = torch.autograd.grad(eager_loss.mean(), z)
    loss_error = (fused_loss - eager_loss).abs().max().item()
    grad_error = ((fused_grad - eager_grad).abs().max() / eager_grad.abs().max()).item()
    fused_ms = timed(lambda: train_gpt.SoftcappedCrossEntropy.apply(z, targets, 30.0).mean().backward())
    eager_ms = timed(lambda: eager(z, targets).mean().backward())
    ok = loss_error < 1e-4 and grad_error < 1e-4
    print(f"fused_ce rows:{rows} vocab:{vocab} triton:{train_gpt.triton is not None} max_loss_error:{loss_error:.2e} "
          f"max_rel_grad_error:{grad_error:.2e} fused_ms:{fused_ms:.2f} eager_ms:{eager_ms:.2f} {'ok' if ok else 'FAIL'}")
    return ok


if __name__ == "__main__":
    results = [check(rows, vocab) for rows, vocab in ((98_304, 1024), (98_304, 8192))]
    sys.exit(0 if all(results) else 1)
