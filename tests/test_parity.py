"""Parity with #549's own code on the P1 benchmark configuration (bench/p1_env.sh): the same seed builds
#549's initial weights, so step 1's training loss is #549's to the logged digit."""

from __future__ import annotations

import re

import pytest
import torch

import train_gpt
from conftest import P1_ENV, RECORD_CASEOPS_DATASET, RECORD_CASEOPS_TOKENIZER, SAMPLE_DATASET

# Step 1's train_loss of #549's own code (patched only to run on the CPU in fp32) at P1, from bench/ANCHORS.md;
# reproduced in logs/p1/parity_*_rec549_*.txt.
PEER_STEP1_LOSS = {1337: 6.9272, 42: 6.9245, 2024: 6.9267}


def p1_hyperparameters(**overrides) -> train_gpt.Hyperparameters:
    """The exports of p1_env.sh, as the benchmark defines them."""
    env = dict(
        re.findall(
            r"(\w+)=(\S+)",
            " ".join(
                line.removeprefix("export ") for line in P1_ENV.read_text().splitlines() if line.startswith("export ")
            ),
        )
    )
    env["DATA_PATH"] = str(SAMPLE_DATASET)
    env.update({k: str(v) for k, v in overrides.items()})
    return train_gpt.Hyperparameters(env)


def step1_loss(h: train_gpt.Hyperparameters) -> float:
    """The first step's logged loss: the mean over its micro-batches, before any update."""
    torch.set_num_threads(2)
    train_gpt.set_seeds(h.seed)
    model = train_gpt.GPT(h)
    loader = train_gpt.training_loader(h, rank=0, world_size=1, device="cpu")
    model.looping = train_gpt.looping_at(h, 0.0)  # as the Trainer starts: the plain graph first
    local_tokens = h.train_batch_tokens // h.grad_accum_steps
    seq_len = train_gpt.train_seq_len_at(h, 0.0)  # TRAIN_SEQ_SCHEDULE's first stage
    segment_len = seq_len if h.loader == "documents" else None
    with torch.no_grad():
        batches = [loader.next_batch(local_tokens, seq_len)[:2] for _ in range(h.grad_accum_steps)]
        losses = [model(*batch, segment_len=segment_len) for batch in batches]
    return torch.stack(losses).mean().item()


@pytest.mark.parametrize("seed", sorted(PEER_STEP1_LOSS))
def test_p1_step1_loss_is_549s(seed):
    assert step1_loss(p1_hyperparameters(SEED=seed)) == pytest.approx(PEER_STEP1_LOSS[seed], abs=1e-4)


def test_no_value_embedding_projection_when_the_table_is_kv_wide():
    """#549 projects the VE table only when VE_DIM differs from the KV width (parity D1); likewise the bigram."""
    from conftest import tiny_hyperparameters

    kv_wide = train_gpt.GPT(tiny_hyperparameters(VE_DIM=32, BIGRAM_DIM=64))  # KV width 2 x 16, model width 64
    assert kv_wide.value_embedding.proj is None and kv_wide.bigram_hash.proj is None
    assert kv_wide.value_embedding.embed.weight.std().item() == pytest.approx(0.01, rel=0.1)
    narrow = train_gpt.GPT(tiny_hyperparameters(VE_DIM=16, BIGRAM_DIM=16))
    assert narrow.value_embedding.proj.weight.shape == (32, 16) and narrow.bigram_hash.proj.weight.shape == (64, 16)
    ids = torch.randint(0, 1024, (2, 16))
    assert kv_wide.value_embedding(ids).shape == narrow.value_embedding(ids).shape == (2, 16, 32)


# PRESET=pr1089 against #1089's code as scored (commit 8c44a2e, patched only to run on the CPU in fp32), at the tiny
# P1-like shape below: its logged step-1 train_loss per seed (logs/p1/parity_pr1089_rec1089_step1_s*.txt) and
# its parameter count. The same seed builds the same initial weights: the same loss on the same first batch.
RECORD_TINY_SHAPE = dict(  # bench/parity_run.sh's shape, shared by both records' runs
    NUM_LAYERS=6,
    MODEL_DIM=128,
    NUM_HEADS=4,
    NUM_KV_HEADS=2,
    XSA_LAST_N=6,
    TRAIN_SEQ_LEN=256,
    EVAL_SEQ_LEN=256,
    TRAIN_BATCH_TOKENS=8192,
)
PR1089_TINY = dict(
    RECORD_TINY_SHAPE,
    PRESET="pr1089",
    VOCAB_SIZE=1024,
    VE_LAYERS="4,5",
    VE_DIM=64,
    ENGRAM_BUCKETS=1536,
    ITERATIONS=20,
    WARMDOWN_ITERS=7,
    MUON_MOMENTUM_WARMUP_STEPS=7,
    WARMUP_STEPS=2,
    MAX_WALLCLOCK_SECONDS=0,
    EMA_DECAY=0.98,
)
PEER_1089_STEP1_LOSS, PEER_1089_PARAMETERS = {1337: 6.9236, 42: 6.9235, 2024: 6.9249}, 1_396_763


def assert_record_step1(env: dict, parameters: int, loss: float):
    """The preset at this shape has the record's parameter count (less any it never uses) and its step-1 loss."""
    h = train_gpt.Hyperparameters({k: str(v) for k, v in env.items()})
    assert sum(p.numel() for p in train_gpt.GPT(h).parameters()) == parameters
    assert step1_loss(h) == pytest.approx(loss, abs=5e-5)


@pytest.mark.parametrize("seed", sorted(PEER_1089_STEP1_LOSS))
def test_pr1089_step1_loss_is_1089s(seed):
    env = dict(PR1089_TINY, SEED=seed, DATA_PATH=SAMPLE_DATASET)
    assert_record_step1(env, PEER_1089_PARAMETERS, PEER_1089_STEP1_LOSS[seed])


# PRESET=frontier_caseops against #1855's code (patched only to run on the CPU in fp32) on the committed CaseOps export
# written by #1855's own script, at the tiny shape of bench/parity_run.sh: its step-1 train_loss per seed
# (logs/p1/parity_frontier_caseops_rec1855_step1_s*.txt). Its loader (LOADER=documents), its draw order
# (INIT_ORDER=record1855) and its RoPE (ROPE_NTK_LEN=0) are what make them equal. #1855 also allocates the parallel
# lanes' 6 scalars on every layer, used only from PARALLEL_START_LAYER on: 24 unused parameters more at this shape.
FRONTIER_CASEOPS_TINY = dict(
    RECORD_TINY_SHAPE, PRESET="frontier_caseops", NUM_LOOPS=2, LOOP_START=2, LOOP_END=3, PARALLEL_START_LAYER=4
)
PEER_1855_STEP1_LOSS, PEER_1855_PARAMETERS, PEER_1855_UNUSED = {1337: 9.0059, 42: 9.0058, 2024: 9.0103}, 2_134_633, 24


@pytest.mark.parametrize("seed", sorted(PEER_1855_STEP1_LOSS))
def test_frontier_caseops_step1_loss_is_1855s(seed):
    env = dict(
        FRONTIER_CASEOPS_TINY, SEED=seed, DATA_PATH=RECORD_CASEOPS_DATASET, TOKENIZER_PATH=RECORD_CASEOPS_TOKENIZER
    )
    assert_record_step1(env, PEER_1855_PARAMETERS - PEER_1855_UNUSED, PEER_1855_STEP1_LOSS[seed])


def test_the_record_orders_differ_only_in_order():
    """INIT_ORDER draws the same kinds of weights either way: record1855's first layer's up matrix is not
    record549's (the draws moved), its token embedding is (drawn first in both without an input SmearGate)."""
    from conftest import tiny_hyperparameters

    models = {}
    for order in ("record549", "record1855"):
        train_gpt.set_seeds(7)
        models[order] = train_gpt.GPT(tiny_hyperparameters(INIT_ORDER=order))
    a, b = models["record549"], models["record1855"]
    assert torch.equal(a.token_embedding.weight, b.token_embedding.weight)
    assert torch.equal(a.qo_bank[0], b.qo_bank[0]) and not torch.equal(a.mlp_up_bank[0], b.mlp_up_bank[0])
    assert torch.allclose(b.mlp_up_bank[0] @ b.mlp_up_bank[0].T, torch.eye(b.mlp_up_bank.size(1)), atol=1e-5) or (
        torch.allclose(b.mlp_up_bank[0].T @ b.mlp_up_bank[0], torch.eye(b.mlp_up_bank.size(2)), atol=1e-5)
    )


# PRESET=frontier_2014 against #2014's code at bench/parity_run.sh's frontier_2014 shape: the record's schedule scaled
# to it (64/128/256 by step), so step 1 runs 64-token segments (logs/p1/parity_frontier_2014_rec2014_s*.txt). #2014
# adds #1923's two softcap scalars, which never receive a gradient (docs/CONFIG.md): 2 parameters more than #1855.
FRONTIER_2014_TINY = dict(
    FRONTIER_CASEOPS_TINY,
    PRESET="frontier_2014",
    TRAIN_SEQ_SCHEDULE="64@0.1,128@0.7,256@1.0",
    TRAIN_SEQ_SCHEDULE_MODE="step",
    SEQ_CHANGE_WARMUP_STEPS=2,
    EVAL_STRIDE=128,
)
PEER_2014_STEP1_LOSS = {1337: 9.0059, 42: 9.0058, 2024: 9.0103}


@pytest.mark.parametrize("seed", sorted(PEER_2014_STEP1_LOSS))
def test_frontier_2014_step1_loss_is_2014s(seed):
    env = dict(FRONTIER_2014_TINY, SEED=seed, DATA_PATH=RECORD_CASEOPS_DATASET, TOKENIZER_PATH=RECORD_CASEOPS_TOKENIZER)
    assert train_gpt.Hyperparameters({k: str(v) for k, v in env.items()}).qk_gain_init == 5.25
    assert_record_step1(env, PEER_1855_PARAMETERS - PEER_1855_UNUSED, PEER_2014_STEP1_LOSS[seed])  # #2014 less 2
