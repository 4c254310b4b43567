#!/usr/bin/env python3
"""Bytes document LoRA TTT holds for backward per row token, at the configured shape, on the CPU: one LoRA chunk
step of ROWS rows at full TTT_LORA_CONTEXT under bf16 autocast (the GPU's dtype flow), every tensor saved for
backward counted once. SDPA's math path on the CPU also saves each head's T x T attention weights, which
FlashAttention never stores: those are counted apart. Projects a batch of TTT_LORA_BATCH_TOKENS row tokens.

    PRESET=frontier python3 bench/lora_memory.py [--rows 2] > logs/bench_lora_memory.txt   # 12 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import preflight  # noqa: E402
import train_gpt as tg  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2, help="documents in the measured batch")
    args = parser.parse_args()
    environ = dict(
        os.environ,
        COMPUTE_DTYPE="bf16",
        TTT_MODE="lora",
        TTT_LORA_BATCH=str(args.rows),
        RUN_ID=f"bench_lora_memory_{os.getpid()}",
        DATA_PATH="unused",
        TOKENIZER_PATH="unused",
    )
    h = tg.Hyperparameters(environ)
    run = tg.RunContext(h)
    run.log = lambda message, console=True: None
    model = tg.build_model(h, run).eval()
    context, chunk = h.ttt_lora_context, h.ttt_lora_chunk
    length = context + chunk  # the last chunk step runs a full-context row
    trainer = preflight.random_document_trainer(run, model, args.rows, length)
    saved, attention = {}, {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        square = tensor.dim() >= 2 and tensor.shape[-1] == tensor.shape[-2] >= context
        (attention if square else saved)[storage.data_ptr()] = storage.nbytes()
        return tensor

    docs = trainer.batches[0]
    trainer.lora.reset(True)
    steps = length // chunk
    for index in range(steps - 1):  # the ledger: earlier chunks scored
        trainer.ledger.mark(int(docs[0, 0]), int(docs[0, 0]) + index * chunk)
    started = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        trainer.chunk_step(trainer.lora, docs, np.arange(len(docs)), steps - 2, np.ones(len(docs), bool), chunk)
    row_tokens = len(docs) * context
    per_token = sum(saved.values()) / row_tokens
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    lora = (
        4 * sum(p.numel() * p.element_size() for p in trainer.lora.parameters()) * h.ttt_lora_batch_tokens / row_tokens
    )
    projected = per_token * h.ttt_lora_batch_tokens + weights + lora
    print(
        f"preset {os.environ.get('PRESET', '(none)')} model_dim {h.model_dim} layers {h.num_layers} virtual "
        f"{len(model.layer_order())} vocab {h.vocab_size} lora rank {h.ttt_lora_rank} context {context} chunk "
        f"{chunk}; one chunk step of {len(docs)} rows in {time.perf_counter() - started:.1f}s (CPU, bf16 autocast)"
    )
    print(
        f"saved for backward: {sum(saved.values()) / 2**20:,.1f} MiB = {per_token / 1024:.1f} KiB per row token "
        f"(T x T attention weights of SDPA's math path, not counted: {sum(attention.values()) / 2**20:,.1f} MiB)"
    )
    print(
        f"weights {weights / 2**30:.2f} GiB; LoRA weights, grads and AdamW state at TTT_LORA_BATCH_TOKENS: "
        f"{lora / 2**30:.2f} GiB"
    )
    print(
        f"projected peak for a batch of TTT_LORA_BATCH_TOKENS={h.ttt_lora_batch_tokens:,} row tokens: "
        f"{projected / 2**30:.1f} GiB (+ the allocator's fragmentation and FlashAttention's workspace)"
    )


if __name__ == "__main__":
    main()
