"""PRESET=frontier_caseops's GPU risks in one device call (at most 540 s on one GPU), in the order of the second CUDA
review (945e22d, issue 32):
  1. environment: torch, the GPU, FlashAttention 3's wheel (its version and build date), brotli and zstandard;
  2. FA3's varlen kernel compiled with fullgraph=True: the call before the fix (the same cu_seqlens for q and k:
     Dynamo on torch >= 2.12 refuses it) and after (its own tensor for k), one graph over three segment counts,
     output and gradients against SDPA on each sequence;
  3. one packed-row training step (LOADER=documents), plain and looped, at full size: priming, ms per step, peak
     memory (tools/preflight.py's check_training, whose loader feeds what the run's feeds);
  4. the fused soft-capped CE (Triton, FUSED_KERNELS=1) under torch.compile against the reference math
     (FUSED_KERNELS=0), then the two kernels alone at a rank's 98,304 rows: errors and milliseconds;
  5. document LoRA TTT as the run runs it (compiled, primed first), on 65,536-token batches of ~2,100-token documents
     and on two-chunk documents: us per processed token, the per-step floor and per-token cost, peak, no recompile;
  6. GPTQ's Hessians of the looped model in steady state, TF32 (the run's) and strict fp32: 16 batches' seconds
     against GPTQ_RESERVE_SECONDS.
Each stage prints `stage NAME: ok|FAIL ... seconds:S` and the run goes on after a failure; exit 1 if any failed.

    python3 bench/gpu_frontier_check.py > logs/gpu_frontier_check.txt 2>&1     # on the GPU
    python3 bench/gpu_frontier_check.py --dry-run                             # the same stages, tiny, on the CPU
(the dry run uses tests/varlen_standin.py's FA3-shaped interface and SDPA: it checks the stages' code, no GPU fact)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
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


def new_run(dry: bool, name: str, settings=tg.Hyperparameters, **env) -> tg.RunContext:
    """PRESET=frontier_caseops at full size with its own attention (FA3 varlen on the GPU); tiny with SDPA's mask on
    the CPU."""
    values = dict(
        PRESET="frontier_caseops",
        DATA_PATH="unused",
        TOKENIZER_PATH="unused",
        RUN_ID=f"gpu_check_{name}",
        **(dict(TINY, ATTENTION_BACKEND="sdpa", COMPILE="0") if dry else {}),
    )
    values.update({k: str(v) for k, v in env.items()})
    return tg.RunContext(settings(values))


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
    primed = synced(run, lambda: tg.prime_lora_graphs(model, run)) if run.compile else 0.0
    graphs = compiled_graphs()
    wide = preflight.random_document_trainer(run, model, h.ttt_lora_batch, length)  # every LoRA step runs
    narrow = preflight.random_document_trainer(run, model, h.ttt_lora_batch, 2 * h.ttt_lora_chunk)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    wide_seconds = synced(run, lambda: wide.score_batch(0, 0.0))
    narrow_seconds = synced(run, lambda: narrow.score_batch(0, 0.0))
    per_step, per_token = preflight.step_cost_model(
        [(wide_seconds, wide.batches[0]), (narrow_seconds, narrow.batches[0])], h.ttt_lora_chunk, h.ttt_lora_context
    )
    limit = 75.0
    over = run.device.type == "cuda" and torch.cuda.max_memory_allocated() / 2**30 > limit
    recompiled = compiled_graphs() - graphs
    return (
        f"{'FAIL' if over or recompiled else 'ok'} {'compiled' if run.compile else 'eager'} primed_s:{primed:.1f} "
        f"graphs_after_priming:{recompiled} documents:{len(wide.batches[0])} of {h.ttt_lora_batch} x {length} "
        f"tokens (TTT_LORA_BATCH_TOKENS={h.ttt_lora_batch_tokens}) rank:{h.ttt_lora_rank} "
        f"us_per_processed_token:{1e6 * wide_seconds / wide.costs[0]:.2f} fit: ms_per_step:{1e3 * per_step:.2f} "
        f"us_per_token:{1e6 * per_token:.2f} peak_GiB:{peak_gib(run)} limit_GiB:{limit}"
    )


def fused_step(dry: bool) -> str:
    """FUSED_KERNELS=1 compiled (the Triton kernels on CUDA) against the reference math (FUSED_KERNELS=0, eager), then
    the CE kernels alone at a rank's micro-batch: loss, LSE and bf16 gradient against their torch math, and time."""
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
    )
    model = tg.build_model(run.h, run)
    loader = RandomBatches(run.h.vocab_size, run.device, run.documents, packed=True, lengths=np.array([2_100]))
    inputs, targets, documents = loader.next_batch(8 * run.h.train_seq_len, run.h.train_seq_len)
    batch = (inputs, targets, "mean", None, documents)
    losses, grads = [], []
    for fused in (False, True):
        for module in model.modules():
            if hasattr(module, "fused_kernels"):
                module.fused_kernels = fused
        model.zero_grad(set_to_none=True)
        with run.autocast():
            loss = run.forward(model, *batch) if fused else model(*batch)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None]))
    error = ((grads[0] - grads[1]).norm() / grads[0].norm()).item()
    ok = abs(losses[0] - losses[1]) < 1e-2 * abs(losses[0]) and error < 5e-2
    kernels = ce_kernels(run) if run.device.type == "cuda" else "kernels:not run (no CUDA; tests run them interpreted)"
    return (
        f"{'ok' if ok else 'FAIL'} reference_loss:{losses[0]:.5f} fused_compiled_loss:{losses[1]:.5f} "
        f"grad_rel_error:{error:.2e} {kernels}"
    )


def ce_kernels(run: tg.RunContext) -> str:
    rows, cols = 98_304, run.h.vocab_size
    generator = torch.Generator(device=run.device).manual_seed(0)
    z = (10 * torch.randn(rows, cols, device=run.device, generator=generator)).bfloat16()
    targets = torch.randint(0, cols, (rows,), device=run.device, generator=generator)
    grad = torch.full((rows,), 1.0 / rows, device=run.device)
    loss, lse = tg.softcap_ce_forward_triton(z, targets, 30.0)
    dz = tg.softcap_ce_backward_triton(z, targets, lse, grad, 30.0)
    expected_loss, expected_lse = tg.softcap_ce_reference(z, targets, 30.0)
    expected_dz = tg.softcap_ce_backward_reference(z, targets, expected_lse, grad, 30.0)
    loss_error = (loss - expected_loss).abs().max().item()
    grad_error = ((dz.float() - expected_dz.float()).norm() / expected_dz.float().norm()).item()
    kernel_ms = 1e3 * synced(
        run,
        lambda: tg.softcap_ce_backward_triton(
            z, targets, *tg.softcap_ce_forward_triton(z, targets, 30.0)[1:], grad, 30.0
        ),
    )
    reference_ms = 1e3 * synced(
        run,
        lambda: tg.softcap_ce_backward_reference(
            z, targets, *tg.softcap_ce_reference(z, targets, 30.0)[1:], grad, 30.0
        ),
    )
    return (
        f"kernels:{'ok' if loss_error < 1e-3 and grad_error < 1e-2 else 'FAIL'} rows:{rows} cols:{cols} bf16 "
        f"loss_max_error:{loss_error:.2e} grad_rel_error:{grad_error:.2e} fwd_bwd_ms:{kernel_ms:.2f} "
        f"torch_math_ms:{reference_ms:.2f}"
    )


def hessians(dry: bool) -> str:
    run = new_run(dry, "hessians", COMPILE=0)
    h = run.h
    model = tg.build_model(h, run)
    model.looping = True
    local_tokens = h.train_batch_tokens // (run.world_size * h.grad_accum_steps)
    loader = RandomBatches(h.vocab_size, run.device, run.documents, packed=True, lengths=np.array([2_100]))
    h.gptq_calib_batches = 2
    tg.collect_hessians(model, run, loader, local_tokens)  # warm
    h.gptq_calib_batches = 16
    seconds = {}
    for tf32 in (True, False):  # the run's (GPTQ_HESSIAN_TF32=1, as the records) and strict fp32
        with tg.matmul_precision(tf32=tf32):
            seconds[tf32] = synced(run, lambda: tg.collect_hessians(model, run, loader, local_tokens))
    ok = seconds[h.gptq_hessian_tf32] < h.gptq_reserve_seconds
    return (
        f"{'ok' if ok else 'FAIL'} batches:16 of {local_tokens} tokens seconds_tf32:{seconds[True]:.2f} "
        f"seconds_fp32:{seconds[False]:.2f} reserve:{h.gptq_reserve_seconds} peak_GiB:{peak_gib(run)}"
    )


def environment(dry: bool) -> str:
    """What the run will import: torch, the GPU, FA3's wheel (version and the file's date), the compressors."""
    import importlib.metadata
    import importlib.util

    found = importlib.util.find_spec("flash_attn_interface")
    try:
        wheel = importlib.metadata.version("flash_attn_3")
    except importlib.metadata.PackageNotFoundError:
        wheel = "no flash_attn_3 distribution"
    built = time.strftime("%Y-%m-%d", time.gmtime(os.path.getmtime(found.origin))) if found else "-"
    compressors = {name: importlib.util.find_spec(name) is not None for name in ("brotli", "zstandard")}
    missing = (not dry and not found) or not all(compressors.values())
    return (
        f"{'FAIL' if missing else 'ok'} torch:{torch.__version__} cuda:{torch.version.cuda} "
        f"gpu:{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'} "
        f"flash_attn_interface:{found.origin if found else 'MISSING'} wheel:{wheel} file_date:{built} "
        + " ".join(f"{name}:{'ok' if here else 'MISSING'}" for name, here in compressors.items())
    )


def varlen_kernel(dry: bool):
    """FA3's flash_attn_varlen_func (the dry run: tests/varlen_standin.py's FA3-shaped stand-in), and the device."""
    if dry:
        import varlen_standin

        return varlen_standin.flash_attn_varlen_func, torch.device("cpu"), torch.float32
    from flash_attn_interface import flash_attn_varlen_func

    return flash_attn_varlen_func, torch.device("cuda"), torch.bfloat16


def varlen_compile(dry: bool) -> str:
    """The call before the fix (expected: refused by Dynamo on torch >= 2.12) and after it, compiled as the run
    compiles (fullgraph), over three segment counts, against SDPA on each sequence."""
    kernel, device, dtype = varlen_kernel(dry)
    heads, kv_heads, dim, total = 8, 4, 64, 4 * 512 if dry else 98_304

    def attend(q, k, v, cu_seqlens, same_tensor: bool):
        cu_k = cu_seqlens if same_tensor else cu_seqlens.clone()
        out = kernel(q, k, v, cu_seqlens, cu_k, 2048, 2048, causal=True)  # a packed row's segment_len
        return out[0] if isinstance(out, tuple) else out

    results = {}
    for same in (True, False):
        torch._dynamo.reset()
        compiled = torch.compile(attend, fullgraph=True, dynamic=False)
        try:
            before, errors = compiled_graphs(), []
            for documents in (64, 100, 700):  # segments of at most 2,048 tokens, in three multiples of 64
                cu = torch.linspace(0, total, documents + 1, device=device).round().to(torch.int32)
                padding = torch.full((-(-documents // 64) * 64 - documents,), total, dtype=torch.int32, device=device)
                cu = torch.cat([cu, padding])
                torch._dynamo.maybe_mark_dynamic(cu, 0)  # as RunContext.documents: one graph for every length
                q, k, v = (
                    torch.randn(total, n, dim, device=device, dtype=dtype, requires_grad=True)
                    for n in (heads, kv_heads, kv_heads)
                )
                out = compiled(q, k, v, cu, same)
                out.float().square().sum().backward()
                errors.append(reference_error(q, k, v, cu, out))
            results[same] = f"graphs:{compiled_graphs() - before} max_rel_error:{max(errors):.1e}"
        except Exception as error:  # the call before the fix is expected to fail on torch >= 2.12
            results[same] = f"refused({type(error).__name__}: {str(error).splitlines()[0][:120]})"
    fixed_ok = results[False].startswith("graphs:1 ") and float(results[False].split(":")[-1]) < 2e-2
    return f"{'ok' if fixed_ok else 'FAIL'} fixed_call {results[False]}; call_before_the_fix {results[True]}"


def reference_error(q, k, v, cu, out) -> float:
    """Relative error of out (and of q's gradient) against SDPA run on each sequence in fp32."""
    bounds = cu.tolist()
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    pieces = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            seq = (t[a:b].transpose(0, 1)[None] for t in (q32, k32, v32))
            attended = torch.nn.functional.scaled_dot_product_attention(*seq, is_causal=True, enable_gqa=True)
            pieces.append(attended[0].transpose(0, 1))
    expected = torch.cat(pieces)
    expected.square().sum().backward()
    output = ((out.float() - expected).norm() / expected.norm()).item()
    return max(output, ((q.grad.float() - q32.grad).norm() / q32.grad.norm()).item())


def packed_step(dry: bool) -> str:
    """A packed-row training step, plain and looped: priming, ms per step, peak memory (preflight's check)."""
    run = new_run(dry, "packed", settings=preflight.RankOfRun)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timing = preflight.check_training(run, 2 if dry else 5)
    return f"ok step_ms:{timing['step_ms']:.1f} muon_ms:{timing['muon_ms']:.1f} peak_GiB:{peak_gib(run)}"


STAGES = (
    ("environment", environment),
    ("varlen_compile", varlen_compile),
    ("packed_step", packed_step),
    ("fused_step", fused_step),
    ("lora_batch", lora_batch),
    ("hessians", hessians),
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
