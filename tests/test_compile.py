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
    trainer = train_gpt.Trainer(run.h, run, model)
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
    trainer = train_gpt.Trainer(run.h, run, model)
    assert not model.looping
    trainer.prime()
    primed = compiled_graphs()
    assert primed >= 3 and not model.looping  # plain, looped, looped + QAT
    loader = trainer.new_loader()
    for step, (looping, qat) in enumerate(((False, False), (True, False), (True, True), (True, False))):
        model.looping, model.qat_active = looping, qat
        trainer.step(loader, step, 1.0, wd_multiplier=0.75)
    assert compiled_graphs() == primed


def test_warmup_primes_every_stage_of_the_sequence_schedule(tmp_path, monkeypatch, sample_data):
    """TRAIN_SEQ_SCHEDULE (#2014) on #2014's packed loader: each stage's graph (its row's segments cut at the stage)
    plain and, from ENABLE_LOOPING_AT on, looped, and late QAT's, all compiled by prime(): nothing in the timed loop."""
    torch._dynamo.reset()
    schedule = dict(TRAIN_SEQ_SCHEDULE="32@0.3,64@1.0", NUM_LOOPS=1, LOOP_START=0, LOOP_END=0, LOADER="documents")
    run = make_run(tmp_path, monkeypatch, DATA_PATH=sample_data[0], WARMUP_STEPS=1, DOC_ISOLATION=1, **schedule)
    model = train_gpt.build_model(run.h, run)
    trainer = train_gpt.Trainer(run.h, run, model)
    labels = [label for label, *_ in trainer.graph_variants()]
    assert labels == [":graph_seq64", ":graph_seq64_looped", ":qat_graph"]
    trainer.prime()
    primed = compiled_graphs()
    assert trainer.seq_len == 32 and not model.looping
    loader_ = trainer.new_loader()
    for step, (seq_len, looping, qat) in enumerate(((32, 0, 0), (64, 0, 0), (64, 1, 0), (64, 1, 1))):
        trainer.seq_len, model.looping, model.qat_active = seq_len, bool(looping), bool(qat)
        trainer.step(loader_, step, 1.0)
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


@pytest.mark.parametrize("recipe", ["ours", "record1855"])  # record1855: branch adapters, redraws, a remainder batch
def test_frontier_evaluation_compiles_nothing_after_priming(tmp_path, monkeypatch, recipe):
    """PRESET=frontier's evaluation (EVAL_SLIDING=0, the tilt, document LoRA TTT): the roundtrip's unhinted graph is
    the only scoring graph and is primed (before, the tilt primed only a hinted one: a recompile on the eval clock).
    The LoRA pass runs compiled with dynamic shapes (the second CUDA review's defect 4; it ran eager), primed on
    random tokens: rows, context and chunk widths change at every step (down to one row of a few tokens) and
    nothing compiles; its scores are the eager pass's."""
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
        TTT_RECIPE=recipe,
        TTT_PHASE_CHUNK_TOKENS=128,
        DOC_ISOLATION=int(recipe == "record1855"),  # record1855's packed phases need it (ours: the faster test)
    )
    assert train_gpt.scoring_graphs(run.h) == [(64, False)]
    model = train_gpt.build_model(run.h, run)
    train_gpt.prime_eval_graphs(model, run)
    primed = compiled_graphs()
    tokens = np.random.default_rng(0).integers(2, 1024, 64 * 4 + 1).astype(np.uint16)
    tokens[::50] = train_gpt.BOS_ID
    val = SimpleNamespace(tokens=tokens, target_bytes=np.full(len(tokens) - 1, 3))
    train_gpt.evaluate(model, run, val, stride=64)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    lora = train_gpt.DocumentLoRATrainer(model, run, val, eval_started=0.0)
    lora.h.eval_budget_seconds = float("inf")
    compiled = lora.run_schedule()
    assert compiled.audit.startswith("chunks=")
    assert (id(model), True) in run.compiled  # the chunk steps went through the dynamic-shape compiled model
    assert compiled_graphs() == primed
    steps = [-(-(batch[:, 1] - batch[:, 0]) // 16) for batch in lora.batches]
    assert any(len(set(s.tolist())) > 1 for s in steps)  # steps with a lone row (padded to two under compile)
    model.load_state_dict(state)  # the phase's SGD moved the weights
    run.compile = False
    eager = train_gpt.DocumentLoRATrainer(model, run, val, eval_started=0.0).run_schedule()
    assert eager.audit == compiled.audit
    assert abs(eager.val_loss - compiled.val_loss) < 1e-5


def test_the_frontier_compiles_through_an_fa3_shaped_varlen_kernel(tmp_path, monkeypatch):
    """The CUDA review at 945e22d, defect 1: FA3's flash_attn_varlen_func is an autograd.Function, and Dynamo (torch
    >= 2.12) refuses one tensor in two of its slots under fullgraph=True; the call passed cu_seqlens for both q and k
    (`Unsupported: autograd.Function.apply: duplicate tensor input`). Through tests/varlen_standin.py's FA3-shaped
    interface the frontier model compiles as RunContext.forward compiles it, forward and backward, one graph for two
    segment buckets, with the loss and gradients of SDPA's document mask on the same weights."""
    import sys

    import varlen_standin
    from test_frontier import FRONTIER_TINY

    torch._dynamo.reset()
    monkeypatch.setitem(sys.modules, "flash_attn_interface", varlen_standin)
    monkeypatch.setattr(train_gpt, "probe_varlen_kernel", lambda *args: None)  # it needs CUDA tensors: tested below
    run = make_run(tmp_path, monkeypatch, DATA_PATH="unused", **dict(FRONTIER_TINY, NUM_LAYERS=4, VE_LAYERS="2,3"))
    run.attention_name, run.attention = train_gpt.select_attention_backend(
        "fa3", "cuda", torch.bfloat16, True, run.segment_len
    )
    run.varlen = True
    model = train_gpt.build_model(run.h, run)
    masked = train_gpt.GPT(run.h)
    masked.load_state_dict(model.state_dict())
    generator, before, graphs = torch.Generator().manual_seed(0), compiled_graphs(), []
    for every in (40, 2, 33):  # a BOS every `every` tokens: segments in the 64 bucket, the 512 one, the 64 one
        ids = torch.randint(4, 1024, (2, 65), generator=generator)
        ids[:, ::every] = train_gpt.BOS_ID
        inputs, targets = ids[:, :-1], ids[:, 1:]
        loss = run.forward(model, inputs, targets, documents=run.documents(inputs.numpy()))
        loss.backward()
        graphs.append(compiled_graphs() - before)
        reference = masked(inputs, targets)
        reference.backward()
        assert torch.allclose(loss, reference, atol=1e-5)
        for (name, p), q in zip(model.named_parameters(), masked.parameters()):
            assert torch.allclose(p.grad, q.grad, atol=1e-5), name
        model.zero_grad(set_to_none=True)
        masked.zero_grad(set_to_none=True)
    assert graphs == [1, 1, 1]


@torch.library.custom_op("varlen_standin_test::old_backward", mutates_args=())
def _old_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    import varlen_standin

    return tuple(t.clone() for t in varlen_standin._backward(dout, q, k, v, cu_q))


@_old_backward.register_fake
def _(dout, q, k, v, cu_q):
    if cu_q:  # FA3's varlen backward fake before 6250fbec: the truth value of a tensor
        pass
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class OldVarlenFunction(torch.autograd.Function):
    """The stand-in with an FA3 wheel's varlen backward from before 2025-08-22: it runs, but cannot be traced."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, causal):
        import varlen_standin

        ctx.save_for_backward(q, k, v, cu_q)
        return varlen_standin._forward(q, k, v, cu_q, cu_k, max_q, max_k)

    @staticmethod
    def backward(ctx, dout):
        return *_old_backward(dout, *ctx.saved_tensors), None, None, None, None, None


def test_a_varlen_kernel_that_cannot_be_compiled_is_refused_at_start():
    """CUDA review 945e22d, defect 9: a wheel that imports but whose varlen backward cannot be traced fails the start-up
    probe (a tiny compiled forward and backward) with the reason; the FA3-shaped stand-in passes it."""
    import varlen_standin

    cpu = torch.device("cpu")
    train_gpt.probe_varlen_kernel(varlen_standin.flash_attn_varlen_func, cpu, torch.float32, "stand-in")

    def old(q, k, v, cu_q, cu_k, max_q, max_k, causal=False):
        return OldVarlenFunction.apply(q, k, v, cu_q, cu_k, max_q, max_k, causal)

    with pytest.raises(train_gpt.InputError, match=r"old wheel loads but a compiled varlen forward and backward"):
        train_gpt.probe_varlen_kernel(old, cpu, torch.float32, "old wheel")
