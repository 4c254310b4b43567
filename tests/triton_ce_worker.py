"""Run under TRITON_INTERPRET=1 by tests/test_frontier.py: FUSED_KERNELS' Triton kernels on CPU tensors (Triton's
interpreter) against the custom ops' torch math; prints the largest differences."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt  # noqa: E402

generator = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    for cols in (8192, 1000):
        z = (20 * torch.randn(16, cols, generator=generator)).to(dtype)
        targets = torch.randint(0, cols, (16,), generator=generator)
        grad = torch.rand(16, generator=generator)
        loss, lse = train_gpt.softcap_ce_forward_triton(z, targets, 30.0)
        expected_loss, expected_lse = train_gpt.softcap_ce_reference(z, targets, 30.0)
        dz = train_gpt.softcap_ce_backward_triton(z, targets, lse, grad, 30.0)
        expected_dz = train_gpt.softcap_ce_backward_reference(z, targets, expected_lse, grad, 30.0)
        assert dz.dtype == dtype and loss.dtype == lse.dtype == torch.float32
        print(
            f"{str(dtype).split('.')[-1]} cols:{cols} loss:{(loss - expected_loss).abs().max().item():.3e} "
            f"lse:{(lse - expected_lse).abs().max().item():.3e} grad:{(dz.float() - expected_dz.float()).abs().max().item():.3e}"
        )
