"""The frontier's highest GPU risks in one device call (at most 540 s on one GPU), in the order of issue 24:
  1. document LoRA `score_batch` on 64 documents of ~2,100 tokens (frontier shapes, SDPA): seconds per processed
     token and peak memory (defect 5: an 80 GB H100 must hold it);
  2. `similarity_order` on a CUDA int8 matrix (defect 2);
  3. a 4-layer NGRAM_TILT model primed, then evaluated: no graph compiled after priming (defect 4);
  4. a FUSED_KERNELS training step under torch.compile(fullgraph=True): loss and gradients against the eager path;
  5. `collect_hessians` in steady state (2 warm + 16 timed batches, looped frontier shapes) against the reserve;
  6. PRESET=pr1089's export (mixed precision, size fit) wall time.
Each stage prints `stage NAME: ok|FAIL ... seconds:S` and the run goes on after a failure; exit 1 if any failed.

    python3 bench/gpu_frontier_check.py > logs/gpu_frontier_check.txt 2>&1     # on the GPU
    python3 bench/gpu_frontier_check.py --dry-run                             # the same stages, tiny, on the CPU
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import preflight  # noqa: E402
import train_gpt as tg  # noqa: E402
from preflight import RandomBatches, compiled_graphs  # noqa: E402

TINY = dict(
    NUM_LAYERS="4",
    MODEL_DIM="64",
    NUM_HEADS="4",
    NUM_KV_HEADS="2",
    TRAIN_SEQ_LEN="64",
    EVAL_SEQ_LEN="64",
    TRAIN_BATCH_TOKENS="4096",
    XSA_LAST_N="4",
    LOOP_START="1",
    LOOP_END="2",
    PARALLEL_START_LAYER="3",
    VE_LAYERS="2,3",
    TTT_LORA_RANK="4",
    TTT_LORA_CONTEXT="64",
    TTT_LORA_CHUNK="16",
    BIGRAM_VOCAB_SIZE="256",
)


def new_run(dry: bool, name: str, **env) -> tg.RunContext:
    settings = dict(
        PRESET="frontier",
        DATA_PATH="unused",
        TOKENIZER_PATH="unused",
        RUN_ID=f"gpu_check_{name}",
        ATTENTION_BACKEND="sdpa",
        **(TINY if dry else {}),
    )
    settings.update({k: str(v) for k, v in env.items()})
    return tg.RunContext(tg.Hyperparameters(settings))


def synced(run: tg.RunContext, fn) -> float:
    run.sync()
    started = time.perf_counter()
    fn()
    run.sync()
    return time.perf_counter() - started


def peak_gib(run: tg.RunContext) -> str:
    return f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if run.device.type == "cuda" else "n/a"


def lora_batch(dry: bool) -> str:
    run = new_run(dry, "lora")
    h, length = run.h, 100 if dry else 2_100
    model = tg.build_model(h, run)
    trainer = preflight.random_document_trainer(run, model, h.ttt_lora_batch, length)  # every LoRA step runs
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = synced(run, lambda: trainer.score_batch(0, 0.0))
    limit = 75.0
    over = run.device.type == "cuda" and torch.cuda.max_memory_allocated() / 2**30 > limit
    return (
        f"{'FAIL' if over else 'ok'} documents:{len(trainer.batches[0])} of {h.ttt_lora_batch} x {length} tokens "
        f"(TTT_LORA_BATCH_TOKENS={h.ttt_lora_batch_tokens}) rank:{h.ttt_lora_rank} "
        f"us_per_processed_token:{1e6 * seconds / trainer.costs[0]:.2f} peak_GiB:{peak_gib(run)} limit_GiB:{limit}"
    )


def similarity(dry: bool) -> str:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = torch.randint(-31, 32, (300 if dry else 31_000, 64 if dry else 512), dtype=torch.int8, device=device)
    started = time.perf_counter()
    order = tg.similarity_order(rows)
    ok = sorted(order.tolist()) == list(range(len(rows)))
    return f"{'ok' if ok else 'FAIL'} rows:{len(rows)} device:{device.type} chain_seconds:{time.perf_counter() - started:.1f}"


def tilt_priming(dry: bool) -> str:
    results = []
    for sliding in (0, 1):  # the frontier's evaluation (roundtrip + LoRA), and with the sliding pass's hinted graphs
        run = new_run(
            dry,
            f"tilt{sliding}",
            NUM_LAYERS=4,
            COMPILE=1,
            EVAL_SLIDING=sliding,
            VE_LAYERS="2,3",
            XSA_LAST_N=4,
            LOOP_START=1,
            LOOP_END=2,
            PARALLEL_START_LAYER=3,
        )
        model = tg.build_model(run.h, run)
        tg.prime_eval_graphs(model, run)
        primed = compiled_graphs()
        tokens = np.random.default_rng(0).integers(2, run.h.vocab_size, 4 * run.h.eval_seq_len + 1).astype(np.uint16)
        tokens[::500] = tg.BOS_ID
        val = SimpleNamespace(tokens=tokens, target_bytes=np.ones(len(tokens) - 1, np.int64))
        tg.evaluate(model, run, val, run.h.eval_seq_len)
        if sliding:
            tg.evaluate(model, run, val, run.h.eval_stride, tg.NgramTilt(tokens, run.h.ngram_tilt_beta, run))
        results.append(compiled_graphs() - primed)
    return f"{'ok' if results == [0, 0] else 'FAIL'} graphs_after_priming:{results} (frontier eval, with sliding)"


def fused_step(dry: bool) -> str:
    run = new_run(
        dry,
        "fused",
        NUM_LAYERS=4,
        COMPILE=1,
        FUSED_KERNELS=1,
        VE_LAYERS="2,3",
        XSA_LAST_N=4,
        LOOP_START=1,
        LOOP_END=2,
        PARALLEL_START_LAYER=3,
        DOC_ISOLATION=0,
    )
    model = tg.build_model(run.h, run)
    batch = RandomBatches(run.h.vocab_size, run.device).next_batch(8 * run.h.train_seq_len, run.h.train_seq_len)
    losses, grads = [], []
    for compiled in (False, True):
        model.zero_grad(set_to_none=True)
        with run.autocast():
            loss = run.forward(model, *batch[:2]) if compiled else model(*batch[:2])
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None]))
    error = ((grads[0] - grads[1]).norm() / grads[0].norm()).item()
    ok = abs(losses[0] - losses[1]) < 1e-2 * abs(losses[0]) and error < 5e-2
    return (
        f"{'ok' if ok else 'FAIL'} eager_loss:{losses[0]:.5f} compiled_loss:{losses[1]:.5f} grad_rel_error:{error:.2e}"
    )


def hessians(dry: bool) -> str:
    run = new_run(dry, "hessians", COMPILE=0)
    h = run.h
    model = tg.build_model(h, run)
    model.looping = True
    local_tokens = h.train_batch_tokens // (run.world_size * h.grad_accum_steps)
    loader = RandomBatches(h.vocab_size, run.device, run.documents)
    h.gptq_calib_batches = 2
    tg.collect_hessians(model, run, loader, local_tokens)  # warm
    h.gptq_calib_batches = 16
    with tg.exact_fp32_matmuls():
        seconds = synced(run, lambda: tg.collect_hessians(model, run, loader, local_tokens))
    ok = seconds < h.gptq_reserve_seconds
    return (
        f"{'ok' if ok else 'FAIL'} batches:16 of {local_tokens} tokens seconds:{seconds:.2f} "
        f"reserve:{h.gptq_reserve_seconds} peak_GiB:{peak_gib(run)}"
    )


def pr1089_export(dry: bool) -> str:
    env = dict(TINY, PRESET="pr1089") if dry else dict(PRESET="pr1089")
    run = new_run(dry, "export", **env)
    h = run.h
    model = tg.build_model(h, run)
    loader = RandomBatches(h.vocab_size, run.device, run.documents)
    h.gptq_calib_batches = 2
    local_tokens = h.train_batch_tokens // (run.world_size * h.grad_accum_steps)
    hessian_sums, _ = tg.collect_hessians(model, run, loader, local_tokens)
    code_bytes = len(Path(tg.__file__).read_bytes())
    started = time.perf_counter()
    with tg.exact_fp32_matmuls():
        blob = tg.export_blob(run, model, code_bytes, hessian_sums, fast=False)
    fast_started = time.perf_counter()
    fast = tg.export_blob(run, model, code_bytes, hessian_sums, fast=True)
    return (
        f"ok export_seconds:{fast_started - started:.1f} bytes:{len(blob)} fast_export_seconds:"
        f"{time.perf_counter() - fast_started:.1f} fast_bytes:{len(fast)} (mixed precision {h.mixed_precision}, "
        f"size fit {h.size_fit}, compressor {h.compressor})"
    )


STAGES = (
    ("lora_batch", lora_batch),
    ("similarity_order", similarity),
    ("tilt_priming", tilt_priming),
    ("fused_step", fused_step),
    ("hessians", hessians),
    ("pr1089_export", pr1089_export),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny shapes on the CPU (the stages' code, not GPU facts)"
    )
    parser.add_argument(
        "--budget", type=float, default=540.0, help="seconds; stages that would start later are skipped"
    )
    args = parser.parse_args()
    started, failed = time.perf_counter(), 0
    tg.raise_recompile_limit()
    print(
        f"device:{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'} torch:{torch.__version__} "
        f"dry_run:{args.dry_run}",
        flush=True,
    )
    os.chdir(tempfile.mkdtemp())  # each stage's RunContext writes its own log there
    for name, stage in STAGES:
        if time.perf_counter() - started > args.budget:
            print(f"stage {name}: SKIPPED (budget {args.budget:.0f}s spent)", flush=True)
            continue
        stage_started = time.perf_counter()
        try:
            result = stage(args.dry_run)
        except Exception:  # a failed stage is reported and the next one runs
            result = "FAIL " + traceback.format_exc(limit=3).replace("\n", " | ")
        failed += result.startswith("FAIL")
        print(f"stage {name}: {result} seconds:{time.perf_counter() - stage_started:.1f}", flush=True)
        torch._dynamo.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    print(f"total_seconds:{time.perf_counter() - started:.1f} failed_stages:{failed}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
