#!/usr/bin/env python3
"""Preflight on one GPU, in a few minutes, before renting eight: does this configuration run, how fast, how big.

    python3 tools/preflight.py                    # the configuration in the environment, as train_gpt.py reads it
    NUM_LAYERS=12 COMPRESSOR=brotli python3 tools/preflight.py --steps 30

It reads the same environment variables as train_gpt.py (RANK/WORLD_SIZE are ignored: one process plays one
rank of a RANKS-GPU run) and, on random tokens (no dataset needed, nothing from the validation set):
1. prints python/torch/CUDA/driver and the attention kernel that loaded (ATTENTION_BACKEND: a requested kernel
   that cannot load is a failure, with the import error and an install hint);
2. builds the model and compiles and runs every graph variant the run will use: the training step, the
   late-QAT training step, both scoring widths and TTT's training shapes (and GPTQ's Hessian pass if QUANT=gptq);
3. times STEPS training steps at the per-rank batch of a RANKS-GPU run and reports ms/step, peak memory and the
   projected number of steps inside the training cap, stating the assumptions;
4. times scoring batches, a TTT step, a document-LoRA batch (TTT_MODE=lora) and the n-gram tilt's precompute
   (NGRAM_TILT=1) and projects each evaluation pass on the challenge's full validation set (62,021,632 targets)
   split over RANKS ranks;
5. prints the artifact size plan (DRY_RUN's) for this configuration.
It exits 0 when every check passed, 1 naming the first check that failed and why, 2 for a bad setting. On the
CPU it runs the same checks in fp32 (SDPA, eager unless COMPILE=1): slow, but a tiny config proves the path.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

CHALLENGE_VAL_TARGETS = 62_021_632  # sp1024 validation tokens minus one: every target of the 50,000 documents
CHALLENGE_DOCUMENTS, CHALLENGE_MEAN_DOCUMENT = 50_000, CHALLENGE_VAL_TARGETS // 50_000  # 1,240 tokens
RECORD_549_STEP_MS = 83.4  # #549 on 8xH100 (its README): the overlap the projection assumes


class RankOfRun(tg.Hyperparameters):
    """The configuration as one rank of a `ranks`-GPU run sees it: 8 / ranks micro-steps of the same
    per-rank micro-batch (Hyperparameters itself is for the process count it runs with)."""

    ranks, lora_memory_limit_gib = 8, 75.0

    @property
    def grad_accum_steps(self) -> int:
        return 8 // self.ranks


class RandomBatches:
    """Stands in for the training loader: random token ids in the shapes the run's loader makes (LOADER=documents:
    one packed row of the rank's tokens a micro-batch, not TRAIN_SEQ_LEN rows: the CUDA review at 945e22d, defect 2),
    with a BOS wherever a document of `lengths` (the training shard's) would start, so the varlen kernel is primed and
    timed on the run's graph and segment counts."""

    def __init__(self, vocab_size: int, device: torch.device, documents=tg.no_documents, packed=False, lengths=None):
        self.vocab_size, self.device, self.documents, self.packed = vocab_size, device, documents, packed
        self.lengths, self.generator = lengths, torch.Generator().manual_seed(0)
        self.rng = np.random.default_rng(0)

    def next_batch(self, local_tokens: int, seq_len: int):
        flat = torch.randint(2, self.vocab_size, (local_tokens + 1,), generator=self.generator)
        if self.lengths is not None:
            starts = np.cumsum(self.rng.choice(self.lengths, local_tokens // max(int(self.lengths.min()), 1) + 1))
            flat[np.r_[0, starts[starts <= local_tokens]]] = tg.BOS_ID
        inputs = flat[:-1].view(-1, local_tokens if self.packed else seq_len)
        documents = self.documents(inputs.numpy())
        flat = flat.to(self.device)
        return flat[:-1].view(inputs.shape), flat[1:].view(inputs.shape), documents


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def expect_no_new_graphs(primed: int, what: str):
    """Priming must have compiled every variant: a graph compiled later would compile inside the clock."""
    extra = compiled_graphs() - primed
    if extra:
        raise RuntimeError(
            f"{extra} graph(s) compiled during {what} after priming: that compile would run inside "
            f"the timed loop or the eval clock (TORCH_LOGS=recompiles shows which guard failed)"
        )


def report(check: str, message: str):
    print(f"preflight {check}: {message}", flush=True)


def timed(run: tg.RunContext, fn) -> float:
    """Seconds fn() takes, the device's queued work included."""
    run.sync()
    started = time.perf_counter()
    fn()
    run.sync()
    return time.perf_counter() - started


def check_environment():
    report(
        "environment",
        f"python {platform.python_version()} torch {torch.__version__} "
        f"cuda {torch.version.cuda or 'none'} cuda_available {torch.cuda.is_available()}",
    )
    if torch.cuda.is_available():
        try:
            driver = (
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=20,
                )
                .stdout.strip()
                .splitlines()[0]
            )
        except (OSError, subprocess.SubprocessError, IndexError):
            driver = "unknown (nvidia-smi failed)"
        report("environment", f"gpu {torch.cuda.get_device_name()} x{torch.cuda.device_count()} driver {driver}")


def check_training(run: tg.RunContext, steps: int) -> dict:
    """Prime (compiles the training and QAT graphs as the run's warmup does), then time steps."""
    h = run.h
    model = tg.build_model(h, run)
    report("model", f"params {sum(p.numel() for p in model.parameters())}")
    trainer = tg.Trainer(h, run, model)
    trainer.local_tokens = h.train_batch_tokens // (h.ranks * h.grad_accum_steps)
    lengths = document_lengths(h)[0] if h.doc_isolation else None
    trainer.new_loader = lambda: RandomBatches(
        h.vocab_size, run.device, run.documents, packed=h.loader == "documents", lengths=lengths
    )
    prime_seconds = timed(run, trainer.prime)
    report(
        "graphs",
        f"training primed in {prime_seconds:.1f}s ({h.warmup_steps} warmup steps"
        + (", looped graph included" if run.compile and h.num_loops else "")
        + (", QAT graph included)" if run.compile and h.late_qat_threshold > 0 else ")"),
    )
    loader, muon = trainer.new_loader(), trainer.optimizers[1]
    muon_seconds, plain_step = [], muon.step

    def timed_muon(*args, **kwargs):
        muon_seconds.append(timed(run, lambda: plain_step(*args, **kwargs)))

    muon.step = timed_muon
    primed = compiled_graphs()
    step_seconds = [timed(run, lambda: trainer.step(loader, i, 1.0)) for i in range(steps)]
    muon.step = plain_step
    if model.num_loops:  # depth recurrence: the looped graph (primed in warmup) runs from ENABLE_LOOPING_AT on
        model.looping = True
        report(
            "graphs",
            f"looped step ({len(model.layer_order())} virtual layers) ran in "
            f"{1000 * timed(run, lambda: trainer.step(loader, steps, 1.0)):.1f}ms",
        )
    if h.late_qat_threshold > 0 or h.qat_enabled:
        model.qat_active = True
        report("graphs", f"late-QAT step ran in {1000 * timed(run, lambda: trainer.step(loader, steps, 0.1)):.1f}ms")
        model.qat_active = h.qat_enabled
    expect_no_new_graphs(primed, "training")
    if h.quant == "gptq":
        h.gptq_calib_batches, batches = 1, h.gptq_calib_batches
        with tg.matmul_precision(tf32=h.gptq_hessian_tf32):  # as Trainer.calibrate runs it
            seconds = timed(run, lambda: tg.collect_hessians(model, run, loader, trainer.local_tokens))
        h.gptq_calib_batches = batches
        fits = min(batches, int(h.gptq_reserve_seconds / seconds))
        report(
            "graphs",
            f"GPTQ Hessian pass ran: {seconds:.2f}s per batch (TF32 {'on' if h.gptq_hessian_tf32 else 'off'}): "
            f"{fits} of {batches} batches fit GPTQ_RESERVE_SECONDS={h.gptq_reserve_seconds:g}"
            + ("" if fits == batches else f" (all {batches} need {math.ceil(seconds * batches + 1)})"),
        )
    return dict(step_ms=1000 * float(np.median(step_seconds)), muon_ms=1000 * float(np.median(muon_seconds)))


def report_training_projection(run: tg.RunContext, timing: dict):
    h = run.h
    step_ms, muon_ms = timing["step_ms"], timing["muon_ms"]
    # On R ranks each rank runs Newton-Schulz on 1/R of the bank matrices; the rest of the step is per rank.
    projected_ms = step_ms - muon_ms * (1 - 1 / h.ranks)
    memory = (
        f"peak memory allocated {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB reserved "
        f"{torch.cuda.max_memory_reserved() / 2**30:.1f} GiB"
        if run.device.type == "cuda"
        else "peak memory n/a on the CPU"
    )
    report(
        "training",
        f"{step_ms:.1f} ms/step measured (median) at the per-rank batch of {h.ranks} ranks "
        f"({h.train_batch_tokens // h.ranks} tokens, grad_accum {h.grad_accum_steps}); "
        f"Muon {muon_ms:.1f} ms of it; {memory}",
    )
    cap = h.training_seconds
    steps = f"{int(1000 * cap / projected_ms)} steps in the {cap:.0f}s training cap" if cap > 0 else "no cap set"
    report(
        "projection",
        f"{projected_ms:.1f} ms/step on {h.ranks} ranks -> {steps}. Assumes: each rank runs "
        f"Newton-Schulz on 1/{h.ranks} of the banks, communication fully overlapped (#549's "
        f"8xH100 step was {RECORD_549_STEP_MS} ms with this overlap), the same GPU model as here",
    )


def check_evaluation(run: tg.RunContext, batches: int) -> dict:
    """Prime the eval graphs (as evaluate_artifact does), then time scoring batches and TTT steps."""
    h = run.h
    model = tg.build_model(h, run)
    rows = tg.ttt_rows(h, h.ranks - 1, h.ranks)  # the last rank gets the largest share of each TTT step
    variants = []
    prime_seconds = timed(run, lambda: variants.append(tg.prime_eval_graphs(model, run, rows)))
    report("graphs", f"evaluation primed: {variants[0]} graphs in {prime_seconds:.1f}s (outside the eval clock)")
    timing, primed = {}, compiled_graphs()
    random_tokens = lambda *shape: np.random.default_rng(0).integers(0, h.vocab_size, shape)  # noqa: E731
    for width, hinted in tg.scoring_graphs(h):  # the primed (width, hints) pairs, as the passes use them
        window = random_tokens(run.window_batch, h.eval_seq_len + 1)

        def score():
            with torch.inference_mode():  # inference tensors, as score_windows makes: graphs guard on that
                hints = tg.to_device(random_tokens(run.window_batch, width), run.device) if hinted else None
                tg.window_nll(model, run, window, width, hints)

        timing[width] = float(np.median([timed(run, score) for _ in range(batches)]))
    if h.ttt_enabled and h.ttt_mode == "sgd" and h.ttt_epochs > 0:
        zeros = np.zeros(h.ttt_chunk_tokens + 1, dtype=np.uint16)
        trainer = tg.TestTimeTrainer(model, run, SimpleNamespace(tokens=zeros, target_bytes=zeros[1:]), 0.0)
        shapes = [b - a for _, _, a, b in tg.ttt_steps(h, h.ttt_chunk_tokens // h.train_seq_len, h.ranks - 1, h.ranks)]

        def ttt_chunk():
            model.train()
            for count in filter(None, shapes):
                tg.sequences_loss(model, run, random_tokens(count * h.train_seq_len + 1), h.train_seq_len).backward()
                trainer.update()  # one rank: the gradient all-reduce of a real run is not timed
            model.eval()

        timing["ttt_chunk"] = float(np.median([timed(run, ttt_chunk) for _ in range(batches)])) * h.ttt_epochs
    if h.ttt_enabled and h.ttt_mode == "lora":
        timing.update(time_lora_batch(run, model, batches))
    expect_no_new_graphs(primed, "evaluation")
    if h.ngram_tilt:  # one order on a tenth of the stream, scaled (n log n) to the full stream and a rank's orders
        tokens = np.random.default_rng(0).integers(0, h.vocab_size, CHALLENGE_VAL_TARGETS // 10 + 1).astype(np.uint16)
        seconds = (
            timed(run, lambda: tg.ngram_hint_counts(tokens, 8))
            * 10
            * math.log(CHALLENGE_VAL_TARGETS)
            / math.log(len(tokens))
        )
        timing["tilt"] = seconds * math.ceil(math.ceil(len(tg.NGRAM_TILT_ORDERS) / h.ranks) / 2)  # two threads
    return timing


def random_document_trainer(run: tg.RunContext, model, documents: int, length: int) -> tg.DocumentLoRATrainer:
    """Document LoRA TTT over `documents` random documents of `length` tokens (BOS first; never validation data),
    its budget guard off so every LoRA step runs: what the preflight and the GPU check time and measure."""
    tokens = np.random.default_rng(0).integers(2, run.h.vocab_size, documents * length + 1).astype(np.uint16)
    tokens[:-1:length] = tg.BOS_ID
    val = SimpleNamespace(tokens=tokens, target_bytes=np.ones(len(tokens) - 1, np.int64))
    trainer = tg.DocumentLoRATrainer(model, run, val, eval_started=time.perf_counter())
    trainer.guard.eval_started = math.inf
    return trainer


def time_lora_batch(run: tg.RunContext, model, batches: int) -> dict:
    """The document LoRA pass as the run runs it (compiled under COMPILE, else eager), on random tokens: its widest
    batch (TTT_LORA_BATCH documents long enough to fill TTT_LORA_CONTEXT, cut by TTT_LORA_BATCH_TOKENS) and a narrow
    one (documents of two chunks), each with LoRA steps. A chunk step costs a + b * tokens: b from the tokens, a the
    per-step floor (launches, the optimizer) that the narrow steps of short documents pay (the second CUDA review's
    defect 4: 45 % of the steps run under 32k tokens). Also the wide batch's peak memory and a phase's s/token."""
    h = run.h
    wide = random_document_trainer(run, model, h.ttt_lora_batch, h.ttt_lora_context + 2 * h.ttt_lora_chunk)
    narrow = random_document_trainer(run, model, h.ttt_lora_batch, 2 * h.ttt_lora_chunk)
    resident = sum(p.numel() * p.element_size() for p in model.parameters()) + 4 * sum(
        p.numel() * p.element_size() for p in wide.lora.parameters()
    )  # weights, grads, AdamW's state
    real_chunk_step = wide.chunk_step
    with PeakMemory(run, resident) as memory:
        wide.chunk_step = lambda *args: (memory.saved.clear(), real_chunk_step(*args))  # freed by each backward
        wide_seconds = float(np.median([timed(run, lambda: wide.score_batch(0, 0.0)) for _ in range(batches)]))
    narrow_seconds = float(np.median([timed(run, lambda: narrow.score_batch(0, 0.0)) for _ in range(batches)]))
    per_step, per_token = step_cost_model(
        [(wide_seconds, wide.batches[0]), (narrow_seconds, narrow.batches[0])], h.ttt_lora_chunk, h.ttt_lora_context
    )
    wide.ledger.sync(0, len(wide.val.tokens) - 1)
    docs = wide.batches[0]
    phase_seconds = timed(run, lambda: wide.train_base(docs, 0))
    model.eval()
    return dict(
        lora_per_step=per_step,
        lora_per_token=per_token,
        lora_how="compiled" if run.compile else "eager",
        lora_rows=min(len(docs), max(h.ttt_lora_batch_tokens // h.ttt_lora_context, 1)),  # rows a forward holds
        lora_peak=memory.peak,
        lora_peak_how=memory.how,
        phase_per_token=phase_seconds / int((docs[:, 1] - docs[:, 0]).sum()),
    )


def step_cost_model(timed_batches: list, chunk: int, context: int) -> tuple[float, float]:
    """(a, b) of seconds = a * steps + b * tokens through two timed LoRA batches (seconds, docs): a wide and a
    narrow one. Noise can make the solve negative: then that term is dropped and the other fits the wide batch."""
    (wide_seconds, wide), (narrow_seconds, narrow) = timed_batches
    steps = [len(tg.lora_step_tokens(docs, chunk, context)) for docs in (wide, narrow)]
    tokens = [tg.lora_batch_tokens(docs, chunk, context) for docs in (wide, narrow)]
    determinant = steps[0] * tokens[1] - steps[1] * tokens[0]
    per_step = (wide_seconds * tokens[1] - narrow_seconds * tokens[0]) / determinant if determinant else 0.0
    per_token = (steps[0] * narrow_seconds - steps[1] * wide_seconds) / determinant if determinant else -1.0
    if per_token <= 0:
        return wide_seconds / steps[0], 0.0
    if per_step < 0:
        return 0.0, wide_seconds / tokens[0]
    return per_step, per_token


class PeakMemory:
    """Peak memory of what runs inside: the CUDA allocator's peak on a GPU; on the CPU an estimate, the resident
    bytes given plus the most bytes held for backward at once (the caller clears `saved` when a backward frees
    them). The CPU computes in fp32: bf16 activations on the GPU take about half."""

    def __init__(self, run: tg.RunContext, resident: int):
        self.cuda, self.saved, self.peak, self.resident = run.device.type == "cuda", {}, 0, resident
        self.how = "CUDA allocator peak" if self.cuda else "CPU estimate: weights + tensors saved for backward, fp32"
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda packed: packed[0])

    def pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        self.saved[storage.data_ptr()] = storage.nbytes()
        self.peak = max(self.peak, sum(self.saved.values()))
        return tensor, storage.data_ptr()

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self.hooks.__enter__()
        return self

    def __exit__(self, *exc_info):
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.hooks.__exit__(*exc_info)
            self.peak += self.resident


def report_evaluation_projection(run: tg.RunContext, timing: dict):
    h, ranks = run.h, run.h.ranks

    def pass_seconds(stride: int) -> float:
        plan = tg.SlidingWindows(CHALLENGE_VAL_TARGETS, h.eval_seq_len, stride)
        batches = math.ceil(math.ceil((len(plan) - 1) / ranks) / run.window_batch)
        return timing[h.eval_seq_len] + batches * timing[stride]  # window 0 scores a full window

    stride_timed = h.eval_stride in timing  # no stride graph when no stream pass runs (tg.scoring_graphs)
    roundtrip, sliding = pass_seconds(h.eval_seq_len), pass_seconds(h.eval_stride) if stride_timed else 0.0
    total = roundtrip + sliding
    report(
        "eval",
        f"scoring batch of {run.window_batch} windows: {1000 * timing[h.eval_seq_len]:.1f} ms at width "
        f"{h.eval_seq_len}"
        + (
            f", {1000 * timing[h.eval_stride]:.1f} ms at width {h.eval_stride}"
            if stride_timed
            else " (no sliding or SGD TTT pass)"
        ),
    )
    report(
        "eval",
        f"projected on {CHALLENGE_VAL_TARGETS:,} targets over {ranks} ranks: roundtrip {roundtrip:.0f}s, "
        f"sliding {sliding:.0f}s",
    )
    if "ttt_chunk" in timing and "lora_per_token" not in timing:
        chunks = math.ceil(CHALLENGE_VAL_TARGETS / h.ttt_chunk_tokens)
        ttt = sliding + (chunks - 1) * timing["ttt_chunk"]
        total += ttt
        report(
            "eval",
            f"projected legal TTT {ttt:.0f}s ({chunks} chunks; training {timing['ttt_chunk']:.3f}s per "
            f"chunk for {h.ttt_epochs} epochs, gradient all-reduce not included)",
        )
    if "ttt_chunk" in timing and not h.eval_sliding:  # EVAL_SLIDING=0: TTT's own scoring replaces the sliding pass
        total -= sliding
        report("eval", "the sliding pass is skipped (EVAL_SLIDING=0): TTT scores every target")
    if "lora_per_token" in timing:
        total += report_lora_projection(h, timing)
    if "tilt" in timing:
        total += timing["tilt"]
        report(
            "eval",
            f"projected n-gram tilt precompute {timing['tilt']:.0f}s per rank (this CPU, two orders at a "
            f"time; {len(tg.NGRAM_TILT_ORDERS)} orders over {ranks} ranks)",
        )
    verdict = "within" if total <= h.eval_budget_seconds else "OVER (the TTT budget guard will stop training early)"
    report(
        "eval",
        f"projected total {total:.0f}s, {verdict} EVAL_BUDGET_SECONDS={h.eval_budget_seconds:.0f} "
        f"(artifact read and decompression not included)",
    )


def document_lengths(h: tg.Hyperparameters) -> tuple[np.ndarray, str]:
    """Token lengths of the documents of the first training shard at DATA_PATH: the validation set's distribution
    and tokenizer, never its tokens. Without a shard, the mean document (LoRA's cost grows faster than length)."""
    try:
        path = tg.shard_files(h.data_path, "train")[0]
        tokens = tg.load_data_shard(path, h.vocab_size)
        spans = tg.document_spans(tokens)[int(tokens[0] != tg.BOS_ID) :]  # from its first BOS on
    except tg.InputError as error:
        return np.array([CHALLENGE_MEAN_DOCUMENT]), f"the mean document ({error}: an underestimate)"
    lengths = spans[:, 1] - spans[:, 0]
    return lengths, f"the length distribution of {len(lengths):,} documents in {path} (mean {lengths.mean():.0f})"


def report_lora_projection(h: tg.Hyperparameters, timing: dict) -> float:
    """Seconds of document LoRA TTT per rank on CHALLENGE_DOCUMENTS documents drawn from the real length
    distribution, batched and padded as the trainer does, plus the phases' SGD; its peak memory against the limit."""
    lengths, source = document_lengths(h)
    drawn = np.random.default_rng(0).choice(lengths, CHALLENGE_DOCUMENTS)
    ends = np.cumsum(drawn)
    batches = tg.lora_queue(np.stack((ends - drawn, ends), 1), h)  # TTT_LORA_ORDER's batches, as the trainer's
    step_tokens = np.concatenate([tg.lora_step_tokens(b, tg.lora_chunk(h, b), h.ttt_lora_context) for b in batches])
    processed = int(step_tokens.sum())
    # the real step mix: batches are balanced over ranks by tokens, so each rank gets about 1/ranks of the steps
    lora = (timing["lora_per_step"] * len(step_tokens) + timing["lora_per_token"] * processed) / h.ranks
    phased = drawn[
        : sum(map(len, batches[: max(tg.phase_ends(batches, h.phased_ttt_prefix_docs, h.ttt_phases), default=0)]))
    ].sum()
    phases = timing["phase_per_token"] * phased / h.ranks
    report(
        "eval",
        f"projected document LoRA TTT {lora + phases:.0f}s per rank: scoring with LoRA steps {lora:.0f}s "
        f"({1e3 * timing['lora_per_step']:.2f} ms per chunk step + {1e6 * timing['lora_per_token']:.2f} us per "
        f"processed token, {timing['lora_how']}; "
        f"{len(step_tokens):,} chunk steps, {np.mean(step_tokens < 32_768):.0%} under 32k tokens; {processed:,} "
        f"tokens processed in {len(batches)} batches for {CHALLENGE_DOCUMENTS:,} documents drawn from {source}), "
        f"{h.ttt_phases} phases' SGD {phases:.0f}s ({phased:,} tokens, "
        f"{1e6 * timing['phase_per_token']:.2f} us per token, eager)",
    )
    limit = h.lora_memory_limit_gib * 2**30
    report(
        "eval",
        f"document LoRA peak memory {timing['lora_peak'] / 2**20:,.0f} MiB ({timing['lora_peak_how']}; a "
        f"forward of {timing['lora_rows']} rows of {h.ttt_lora_context} tokens), limit "
        f"{h.lora_memory_limit_gib:g} GiB",
    )
    if timing["lora_peak"] > limit:
        raise RuntimeError(
            f"document LoRA peak memory {timing['lora_peak'] / 2**30:.1f} GiB is over the "
            f"{h.lora_memory_limit_gib:g} GiB limit: lower TTT_LORA_BATCH_TOKENS or TTT_LORA_BATCH"
        )
    return lora + phases


def check_size(h: tg.Hyperparameters, code_path: Path) -> bool:
    code_bytes = len(code_path.read_bytes())
    predicted = tg.plan_artifact(h)
    total = code_bytes + predicted
    fits = total <= tg.SIZE_CAP_BYTES
    report(
        "size",
        f"code_bytes {code_bytes} ({code_path.name}) predicted_model_bytes {predicted} predicted_total "
        f"{total} cap {tg.SIZE_CAP_BYTES} headroom {tg.SIZE_CAP_BYTES - total}"
        + ("" if fits or not h.size_fit else " (SIZE_FIT=1 will prune to fit)"),
    )
    return fits or h.size_fit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed training steps (after priming)")
    parser.add_argument("--batches", type=int, default=3, help="timed scoring batches and TTT chunks")
    parser.add_argument("--ranks", type=int, default=8, choices=(1, 2, 4, 8), help="GPUs of the real run")
    parser.add_argument(
        "--lora-memory-gib",
        type=float,
        default=75.0,
        help="fail when document LoRA TTT's peak memory is above this (an 80 GB H100 less headroom)",
    )
    parser.add_argument("--code", type=Path, default=Path(tg.__file__), help="the script whose bytes count")
    args = parser.parse_args()
    environ = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    environ.setdefault("RUN_ID", f"preflight_{os.getpid()}")
    RankOfRun.ranks, RankOfRun.lora_memory_limit_gib = args.ranks, args.lora_memory_gib
    check = "settings"
    try:
        check_environment()
        h = RankOfRun(environ)
        check = "attention"
        run = tg.RunContext(h)  # loads the attention kernel: a requested one that cannot load fails here
        run.log = lambda message, console=True: None  # the warmup's step lines; a preflight writes no run log
        run.window_batch = max(h.val_batch_size // (8 * h.eval_seq_len), 1)  # per rank, at any rank count
        report(
            "attention",
            f"requested {h.attention_backend}, loaded {run.attention_name} compute_dtype "
            f"{str(run.compute_dtype).removeprefix('torch.')} compile {int(run.compile)}",
        )
        for check, action in (  # noqa: B007 - `check` names the failing check in the except clauses
            ("training", lambda: report_training_projection(run, check_training(run, args.steps))),
            ("eval", lambda: report_evaluation_projection(run, check_evaluation(run, args.batches))),
        ):
            action()
        check = "size"
        if not check_size(h, args.code):
            raise RuntimeError("the predicted artifact is over the 16,000,000-byte cap (set SIZE_FIT=1 or shrink)")
    except tg.InputError as error:
        print(f"preflight FAIL {check}: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - any failure is the answer, with its cause
        traceback.print_exc()
        print(f"preflight FAIL {check}: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    report("result", "ok: every check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
