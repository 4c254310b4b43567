"""Two gloo ranks: rank 1 stops its LoRA steps on a local budget check, then both take an agreed check (before a
phase). The agreed check must be a collective on both (no hang) and stop both. Prints each rank's answers."""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt  # noqa: E402

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
rank = dist.get_rank()
run = SimpleNamespace(
    h=SimpleNamespace(eval_budget_seconds=600.0),
    device=torch.device("cpu"),
    rank=rank,
    world_size=2,
    log=lambda message: print(f"rank {rank} log: {message}", flush=True),
)
guard = train_gpt.BudgetGuard(run, eval_started=train_gpt.time.perf_counter())
local = guard.allows(1e9 if rank == 1 else 0.0, "the LoRA steps", agreed=False)
agreed = guard.allows(0.0, "the phases")
print(f"rank {rank} local:{local} agreed:{agreed}", flush=True)
dist.destroy_process_group()
os._exit(0)
