"""tools/preflight.py on the CPU: the same checks a user runs on one GPU before renting eight."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

import train_gpt

from conftest import REPO, TINY_ENV, clean_environment, require_e2e_mark

PREFLIGHT = REPO / "tools" / "preflight.py"


def preflight(tmp_path, args=(), **overrides):
    """tools/preflight.py in a process: it builds, compiles and times the run's graphs (an e2e test's work)."""
    require_e2e_mark("tools/preflight.py")
    env = clean_environment()
    env.update(TINY_ENV)
    env.update(NUM_LAYERS="2", VE_LAYERS="1", XSA_LAST_N="1", MAX_WALLCLOCK_SECONDS="600")
    env.update({k: str(v) for k, v in overrides.items()})
    return subprocess.run(
        [sys.executable, str(PREFLIGHT), "--steps", "2", "--batches", "1", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.e2e
def test_preflight_compiles_every_graph_and_projects_the_run(tmp_path):
    result = preflight(tmp_path, COMPILE=1, QUANT="gptq", TTT_BATCH_SEQS=3, TTT_CHUNK_TOKENS=256)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "preflight attention: requested auto, loaded sdpa compute_dtype float32 compile 1" in out
    assert re.search(
        r"^preflight graphs: training primed in [\d.]+s \(1 warmup steps, QAT graph included\)$", out, re.M
    )
    assert re.search(r"^preflight graphs: late-QAT step ran in [\d.]+ms$", out, re.M)
    assert re.search(r"^preflight graphs: GPTQ Hessian pass ran", out, re.M)
    # Scoring at widths 64 and 32, TTT at 4 sequences per chunk in global steps of 3 over 8 ranks: 1 and 0 rows.
    assert re.search(r"^preflight graphs: evaluation primed: 3 graphs", out, re.M)
    assert re.search(
        r"^preflight training: [\d.]+ ms/step measured \(median\) at the per-rank batch of 8 ranks "
        r"\(256 tokens, grad_accum 1\)",
        out,
        re.M,
    )
    steps = re.search(
        r"^preflight projection: [\d.]+ ms/step on 8 ranks -> (\d+) steps in the 592s training cap", out, re.M
    )
    assert steps and int(steps.group(1)) > 0  # 600 s minus GPTQ_RESERVE_SECONDS
    assert re.search(
        r"^preflight eval: projected on 62,021,632 targets over 8 ranks: roundtrip \d+s, sliding \d+s$", out, re.M
    )
    assert re.search(r"^preflight eval: projected legal TTT \d+s \(242272 chunks", out, re.M)
    assert re.search(r"^preflight size: code_bytes \d+ \(train_gpt.py\) predicted_model_bytes \d+", out, re.M)
    assert out.rstrip().endswith("preflight result: ok: every check passed")
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())


@pytest.mark.e2e
def test_preflight_primes_and_times_the_looped_graph(tmp_path):
    result = preflight(tmp_path, COMPILE=1, NUM_LOOPS=1, LOOP_START=0, LOOP_END=0, TTT_ENABLED=0)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert re.search(
        r"^preflight graphs: training primed in [\d.]+s \(1 warmup steps, looped graph included, QAT "
        r"graph included\)$",
        out,
        re.M,
    )
    assert re.search(r"^preflight graphs: looped step \(3 virtual layers\) ran in [\d.]+ms$", out, re.M)
    assert out.rstrip().endswith("preflight result: ok: every check passed")


@pytest.mark.e2e
def test_preflight_fails_on_an_attention_kernel_that_cannot_run(tmp_path):
    result = preflight(tmp_path, ATTENTION_BACKEND="fa3")
    assert result.returncode == 2
    assert (
        "preflight FAIL attention: env ATTENTION_BACKEND=fa3: FlashAttention needs CUDA and COMPUTE_DTYPE=bf16"
        in result.stderr
    )


@pytest.mark.e2e
def test_preflight_fails_on_an_artifact_over_the_cap(tmp_path):
    code = tmp_path / "huge_train_gpt.py"
    code.write_bytes(b"#" * 16_000_001)
    result = preflight(tmp_path, args=["--code", str(code)], COMPILE=0)
    assert result.returncode == 1
    assert re.search(r"^preflight size: code_bytes 16000001 .* headroom -\d+$", result.stdout, re.M)
    assert "preflight FAIL size: RuntimeError: the predicted artifact is over the 16,000,000-byte cap" in result.stderr


@pytest.mark.e2e
def test_preflight_projects_document_lora_ttt_and_the_tilt(tmp_path):
    """COMPILE=1: document LoRA runs compiled (primed with the scoring graphs) and its phases eager; nothing may
    compile after priming (the CUDA review's defect 8: the SGD chunk was timed through an unprimed compiled graph,
    a false FAIL). The projection counts the real step mix: a per-step floor and a per-token cost."""
    result = preflight(
        tmp_path,
        COMPILE=1,
        TTT_MODE="lora",
        TTT_LORA_CONTEXT=64,
        TTT_LORA_CHUNK=16,
        TTT_LORA_BATCH=2,
        TTT_LORA_RANK=4,
        TTT_CHUNK_TOKENS=256,
        TTT_BATCH_SEQS=3,
        NGRAM_TILT=1,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert re.search(
        r"^preflight eval: projected document LoRA TTT \d+s per rank: scoring with LoRA steps \d+s "
        r"\([\d.]+ ms per chunk step \+ [\d.]+ us per processed token, compiled; [\d,]+ chunk steps, \d+% under "
        r"32k tokens; [\d,]+ tokens processed in \d+ batches for 50,000 documents drawn from the mean document \(no files match .*: an underestimate\)\), 3 phases' SGD "
        r"\d+s \([\d,]+ tokens, [\d.]+ us per token, eager\)$",
        out,
        re.M,
    )
    assert "projected legal TTT" not in out
    assert re.search(r"^preflight eval: projected n-gram tilt precompute \d+s per rank", out, re.M)
    assert out.rstrip().endswith("preflight result: ok: every check passed")


def write_documents_shard(folder, lengths):
    """A training shard of documents of these token lengths (BOS first), as the challenge writes them."""
    import build_sample

    tokens = np.concatenate([np.r_[1, np.full(n - 1, 7)] for n in lengths])
    build_sample.write_shard(folder / "fineweb_train_000000.bin", tokens)


@pytest.mark.e2e
def test_preflight_passes_for_the_frontier_preset_with_its_lora_memory_and_real_lengths(tmp_path):
    """PRESET=frontier at a tiny shape: the LoRA projection draws 50,000 documents from the training shard's length
    distribution (here 100 and 2,100 tokens, mean 600), batches them as the trainer does, and reports the pass's peak memory; a limit below it fails the check."""
    from test_frontier import FRONTIER_TINY

    write_documents_shard(tmp_path / "data", [100] * 3 + [2100])
    env = dict(
        FRONTIER_TINY,
        NUM_LAYERS=4,
        VE_LAYERS="2,3",
        DATA_PATH=tmp_path / "data",
        TTT_CHUNK_TOKENS=16384,
        TTT_LORA_BATCH_TOKENS=256,
    )
    result = preflight(tmp_path, **env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    lora = re.search(
        r"^preflight eval: projected document LoRA TTT (\d+)s per rank: scoring with LoRA steps \d+s "
        r"\([\d.]+ ms per chunk step \+ [\d.]+ us per processed token, eager; [\d,]+ chunk steps, 100% under "
        r"32k tokens; ([\d,]+) tokens processed in (\d+) batches for 50,000 documents drawn from the length distribution of 4 documents in \S+ \(mean 600\)\)",
        out,
        re.M,
    )
    assert lora, out
    assert int(lora[3]) == 50_000 // 8  # #1855's queue (the preset's): no token cap, TTT_LORA_BATCH=8 a batch
    memory = re.search(
        r"^preflight eval: document LoRA peak memory ([\d,]+) MiB \(CPU estimate: weights \+ tensors "
        r"saved for backward, fp32; a forward of 4 rows of 64 tokens\), limit 75 GiB$",
        out,
        re.M,
    )
    assert memory and int(memory[1].replace(",", "")) > 0
    assert re.search(r"^preflight eval: projected total \d+s, ", out, re.M)
    assert out.rstrip().endswith("preflight result: ok: every check passed")
    failed = preflight(tmp_path, args=["--lora-memory-gib", "0.001"], **env)
    assert failed.returncode == 1
    assert "preflight FAIL eval: RuntimeError: document LoRA peak memory" in failed.stderr
    assert "GiB limit: lower TTT_LORA_BATCH_TOKENS or TTT_LORA_BATCH" in failed.stderr


def test_the_preflight_feeds_packed_rows_with_real_document_starts():
    """CUDA review 945e22d, defect 2: with LOADER=documents the preflight primes and times one packed row of the
    rank's tokens per micro-batch (as the run's loader), not TRAIN_SEQ_LEN rows, with a BOS wherever a document of
    the training shard's lengths starts; other loaders keep their rows."""
    import torch

    sys.path.insert(0, str(REPO / "tools"))
    import preflight as tool

    lengths = np.array([100, 2100])
    packed = tool.RandomBatches(1024, torch.device("cpu"), packed=True, lengths=lengths)
    inputs, targets, _ = packed.next_batch(8192, 64)
    assert inputs.shape == targets.shape == (1, 8192) and torch.equal(inputs[0, 1:], targets[0, :-1])
    starts = np.flatnonzero(inputs[0].numpy() == 1)
    assert starts[0] == 0 and set(np.diff(starts)) <= {100, 2100} and len(starts) >= 8192 // 2100
    rows, _, _ = tool.RandomBatches(1024, torch.device("cpu")).next_batch(8192, 64)
    assert rows.shape == (128, 64) and not (rows == 1).any()


def test_lora_step_cost_model_recovers_a_per_step_floor():
    """Two timed LoRA batches (a wide one and one of two-chunk documents) give seconds = a * steps + b * tokens: on
    times made by a known (a, b) the solve returns them; noise that makes a term negative drops it."""
    sys.path.insert(0, str(REPO / "tools"))
    import preflight as tool

    wide = np.array([[0, 400], [400, 790], [790, 1100]])
    narrow = np.array([[0, 32], [32, 64], [64, 90]])
    steps = [len(train_gpt.lora_step_tokens(d, 16, 64)) for d in (wide, narrow)]
    tokens = [train_gpt.lora_batch_tokens(d, 16, 64) for d in (wide, narrow)]
    assert steps == [25, 2] and tokens[0] > 25 * tokens[1]
    seconds = [2e-3 * n + 1e-6 * t for n, t in zip(steps, tokens)]
    per_step, per_token = tool.step_cost_model(list(zip(seconds, (wide, narrow))), 16, 64)
    assert per_step == pytest.approx(2e-3) and per_token == pytest.approx(1e-6)
    assert tool.step_cost_model([(seconds[0], wide), (1e-9, narrow)], 16, 64) == (0.0, seconds[0] / tokens[0])
