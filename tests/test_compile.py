"""The compiled (CUDA) path's graph variants, on the CPU: every variant a run uses is compiled while priming,
never inside the timed training loop or the eval clock."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import train_gpt
from conftest import TINY_ENV

SMALL = dict(NUM_LAYERS=2, VE_LAYERS="1", XSA_LAST_N=1, COMPILE=1, RUN_ID="compiled")


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def make_run(tmp_path, monkeypatch, **overrides):
    monkeypatch.chdir(tmp_path)
    env = dict(TINY_ENV, TOKENIZER_PATH="unused")
    env.update({k: str(v) for k, v in dict(SMALL, **overrides).items()})
    return train_gpt.RunContext(train_gpt.Hyperparameters(env))


def test_recompile_limit_is_raised(tmp_path, monkeypatch):
    make_run(tmp_path, monkeypatch, DATA_PATH="unused")
    assert torch._dynamo.config.recompile_limit >= train_gpt.RECOMPILE_LIMIT > 8


# #1089's model and optimizer switches, soft-round QAT included (its alpha changes every QAT step)
SEED_1089 = dict(
    SOFT_ROUND_QAT=1,
    ENGRAM_BUCKETS=1024,
    BIGRAM_VOCAB_SIZE=0,
    SKIP_GATES_ENABLED=1,
    MUON_NS="turbo",
    MUON_BACKEND_STEPS=4,
    MUON_POST_NORM="row_col",
    SMALL_MATRIX_OPTIMIZER="muon",
    QUANT_BITS_MLP=5,
)


@pytest.mark.parametrize("features", [{}, SEED_1089], ids=["record549", "pr1089_switches"])
def test_one_warmup_step_primes_the_plain_and_the_qat_graph(tmp_path, monkeypatch, sample_data, features):
    """WARMUP_STEPS=1 with late QAT used to prime only the QAT graph; the plain one compiled at step 1."""
    torch._dynamo.reset()
    run = make_run(tmp_path, monkeypatch, DATA_PATH=sample_data[0], WARMUP_STEPS=1, **features)
    model = train_gpt.build_model(run.h, run)
    trainer = train_gpt.Trainer(run.h, run, model, val=None)
    trainer.prime()
    primed = compiled_graphs()
    assert primed >= 2
    loader = trainer.new_loader()
    for step, qat in enumerate((False, True, True, False)):
        model.qat_active = qat
        if model.soft_round_alpha is not None:
            model.soft_round_alpha.fill_(1.0 + 5 * step)
        trainer.step(loader, step, 1.0)
    assert compiled_graphs() == primed


# The frontier's switches on the compiled path: looping switches on mid-run (a second graph), lanes, gates, the
# input smear with its BOS mask, the fused kernels' autograd functions, the shuffled loader.
FRONTIER = dict(
    NUM_LOOPS=1,
    LOOP_START=0,
    LOOP_END=0,
    PARALLEL_RESIDUAL="two_lane",
    PARALLEL_START_LAYER=1,
    ATTN_OUT_GATE="sparse",
    SMEAR_GATE="input",
    SMEAR_BOS_MASK=1,
    MUON_NS="polar_express",
    MUON_EQ_R=1,
    FUSED_KERNELS=1,
    LOADER="shuffled",
    WD_TAPER_START=0.5,
)


def test_warmup_primes_the_looped_graph_before_the_clock(tmp_path, monkeypatch, sample_data):
    torch._dynamo.reset()
    run = make_run(tmp_path, monkeypatch, DATA_PATH=sample_data[0], WARMUP_STEPS=1, **FRONTIER)
    model = train_gpt.build_model(run.h, run)
    trainer = train_gpt.Trainer(run.h, run, model, val=None)
    assert not model.looping
    trainer.prime()
    primed = compiled_graphs()
    assert primed >= 3 and not model.looping  # plain, looped, looped + QAT
    loader = trainer.new_loader()
    for step, (looping, qat) in enumerate(((False, False), (True, False), (True, True), (True, False))):
        model.looping, model.qat_active = looping, qat
        trainer.step(loader, step, 1.0, wd_multiplier=0.75)
    assert compiled_graphs() == primed


@pytest.mark.parametrize("tilt", [0, 1])
def test_evaluation_compiles_nothing_after_priming(tmp_path, monkeypatch, tilt):
    """Scoring (roundtrip, sliding) and TTT (its scoring and training) run on graphs primed on random tokens, with
    the stream tilt too (the roundtrip scores without hints, the sliding and TTT passes with them)."""
    torch._dynamo.reset()
    run = make_run(
        tmp_path,
        monkeypatch,
        DATA_PATH="unused",
        EVAL_STRIDE=16,
        TTT_CHUNK_TOKENS=128,
        TTT_BATCH_SEQS=2,
        TTT_FREEZE_BLOCKS=1,
        NGRAM_TILT=tilt,
    )
    model = train_gpt.build_model(run.h, run)
    train_gpt.prime_eval_graphs(model, run)
    primed = compiled_graphs()
    tokens = np.random.default_rng(0).integers(0, 1024, 64 * 8 + 1).astype(np.uint16)
    val = SimpleNamespace(tokens=tokens, target_bytes=np.full(len(tokens) - 1, 3))  # a stand-in ValidationSet
    stream_tilt = train_gpt.NgramTilt(tokens, 2.0, run) if tilt else None
    train_gpt.evaluate(model, run, val, stride=64)
    train_gpt.evaluate(model, run, val, stride=16, tilt=stream_tilt)
    ttt = train_gpt.TestTimeTrainer(model, run, val, eval_started=0.0, tilt=stream_tilt)
    ttt.h.eval_budget_seconds = float("inf")
    summary = ttt.run_schedule(train_gpt.score_first_schedule(ttt.num_chunks)).audit
    assert summary == "chunks=4 tokens_scored=512 tokens_trained=384"
    assert compiled_graphs() == primed


def test_frontier_evaluation_compiles_nothing_after_priming(tmp_path, monkeypatch):
    """PRESET=frontier's evaluation (EVAL_SLIDING=0, the tilt, document LoRA TTT): the roundtrip's unhinted graph is
    the only scoring graph and is primed (before, the tilt primed only a hinted one: a recompile on the eval clock);
    the LoRA pass runs eager and compiles nothing."""
    torch._dynamo.reset()
    run = make_run(
        tmp_path,
        monkeypatch,
        DATA_PATH="unused",
        TTT_MODE="lora",
        NGRAM_TILT=1,
        EVAL_SLIDING=0,
        TTT_LORA_CHUNK=16,
        TTT_LORA_CONTEXT=64,
        TTT_LORA_BATCH=2,
        TTT_LORA_RANK=4,
        TTT_PHASES=1,
        PHASED_TTT_PREFIX_DOCS=3,
        TTT_BATCH_SEQS=2,
    )
    assert train_gpt.scoring_graphs(run.h) == [(64, False)]
    model = train_gpt.build_model(run.h, run)
    train_gpt.prime_eval_graphs(model, run)
    primed = compiled_graphs()
    tokens = np.random.default_rng(0).integers(2, 1024, 64 * 4 + 1).astype(np.uint16)
    tokens[::50] = train_gpt.BOS_ID
    val = SimpleNamespace(tokens=tokens, target_bytes=np.full(len(tokens) - 1, 3))
    train_gpt.evaluate(model, run, val, stride=64)
    lora = train_gpt.DocumentLoRATrainer(model, run, val, eval_started=0.0)
    lora.h.eval_budget_seconds = float("inf")
    assert lora.run_schedule().audit.startswith("chunks=")
    assert compiled_graphs() == primed
