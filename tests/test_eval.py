"""Evaluation that cannot cheat: the window plan, sliding = plain at stride = L, the TTT ledger and audit,
the budget guard, frozen blocks and eval-only reruns."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train_gpt
from conftest import TINY_ENV, parse_metric, read_log, run_script


@pytest.mark.parametrize(
    "num_targets, seq_len, stride", [(640, 64, 16), (640, 64, 64), (700, 64, 16), (64, 64, 8), (1000, 128, 64)]
)
def test_every_target_scored_exactly_once(num_targets, seq_len, stride):
    plan = train_gpt.SlidingWindows(num_targets, seq_len, stride)
    counts = np.zeros(num_targets, dtype=int)
    for lo, hi, start in zip(plan.score_lo, plan.score_hi, plan.starts):
        counts[lo:hi] += 1
        assert start >= 0 and start + seq_len == hi  # full windows that end at their last scored target
        assert lo == 0 or lo - start >= seq_len - stride  # every later target sees >= L - s tokens of context
    assert (counts == 1).all()


def make_run(tmp_path, monkeypatch, **overrides):
    monkeypatch.chdir(tmp_path)
    env = dict(TINY_ENV, DATA_PATH="unused", TOKENIZER_PATH="unused", RUN_ID="unit")
    env.update({k: str(v) for k, v in overrides.items()})
    h = train_gpt.Hyperparameters(env)
    return train_gpt.RunContext(h)


def constant_bytes(tokens: np.ndarray) -> SimpleNamespace:
    """A stand-in ValidationSet: 3 bytes per target, so BPB is a known function of the loss."""
    return SimpleNamespace(tokens=tokens, target_bytes=np.full(len(tokens) - 1, 3, dtype=np.int64))


def tiny_setup(tmp_path, monkeypatch, num_tokens=64 * 12 + 1, **overrides):
    run = make_run(tmp_path, monkeypatch, **overrides)
    torch.manual_seed(0)
    model = train_gpt.GPT(run.h)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    tokens = np.random.default_rng(0).integers(0, 1024, num_tokens).astype(np.uint16)
    return run, model, constant_bytes(tokens)


def test_sliding_equals_plain_evaluation_at_stride_equal_window(tmp_path, monkeypatch):
    run, model, tokens = tiny_setup(tmp_path, monkeypatch)
    loss, bpb = train_gpt.evaluate(model, run, tokens, stride=64)[:2]
    ids = torch.from_numpy(tokens.tokens.astype(np.int64))
    with torch.no_grad():
        plain = model(ids[:-1].view(-1, 64), ids[1:].view(-1, 64), reduction="none")
    assert loss == pytest.approx(plain.mean().item(), abs=1e-6)
    assert bpb == pytest.approx(plain.mean().item() / np.log(2) / 3, abs=1e-6)
    sliding_loss = train_gpt.evaluate(model, run, tokens, stride=16).val_loss
    assert sliding_loss != loss  # more context per target changes the score


def ttt_setup(tmp_path, monkeypatch, **overrides):
    settings = dict(EVAL_STRIDE=16, TTT_CHUNK_TOKENS=128, TTT_EPOCHS=1, TTT_BATCH_SEQS=2, TTT_LR=0.01)
    settings.update(overrides)
    run, model, tokens = tiny_setup(tmp_path, monkeypatch, **settings)
    return run, model, tokens, train_gpt.TestTimeTrainer(model, run, tokens, eval_started=time_now())


def time_now():
    import time

    return time.perf_counter()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])  # adamw: #518's TTT optimizer, run score-first
def test_legal_ttt_scores_everything_once_and_trains_all_but_the_last_chunk(tmp_path, monkeypatch, optimizer):
    run, model, tokens, ttt = ttt_setup(tmp_path, monkeypatch, TTT_OPTIMIZER=optimizer, TTT_LR_MULTS="1,1,0.5,3")
    before = model.mlp_down_bank.detach().clone()
    loss, bpb, _, summary = ttt.run_schedule(train_gpt.score_first_schedule(ttt.num_chunks))
    assert ttt.num_chunks == 6 and summary == "chunks=6 tokens_scored=768 tokens_trained=640"
    assert not torch.equal(before, model.mlp_down_bank)
    for chunk in range(5):
        scored, trained = ttt.ledger.chunks[chunk]
        assert trained == scored == 128 * (chunk + 1) - 1  # trained exactly up to what was scored
    assert ttt.ledger.chunks[5][1] == -1  # the last chunk is never trained on


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_audit_stops_training_before_scoring(tmp_path, monkeypatch, optimizer):
    run, model, tokens, ttt = ttt_setup(tmp_path, monkeypatch, TTT_OPTIMIZER=optimizer)
    before = [p.detach().clone() for p in model.parameters()]
    illegal = [("score", 0), ("train", 0), ("train", 1), ("score", 1)]
    with pytest.raises(
        train_gpt.IllegalTestTimeTraining,
        match=r"chunk 1: an update would train on targets \[128, 256\) "
        r"but target 128 has not been scored",
    ):
        ttt.run_schedule(illegal)
    # The illegal update was refused before it happened: only chunk 0's legal training changed the weights.
    replay_run, replay_model, replay_tokens, replay = ttt_setup(tmp_path, monkeypatch, TTT_OPTIMIZER=optimizer)
    replay.score(0)
    replay.train(0)
    for a, b in zip(model.parameters(), replay_model.parameters()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_audit_catches_double_scoring(tmp_path, monkeypatch):
    run, model, tokens, ttt = ttt_setup(tmp_path, monkeypatch)
    schedule = list(train_gpt.score_first_schedule(ttt.num_chunks)) + [("score", 2)]
    with pytest.raises(AssertionError, match=r"target 256 was scored 2 times"):
        ttt.run_schedule(schedule)


def test_budget_guard_stops_training_but_scores_every_token(tmp_path, monkeypatch):
    run, model, tokens, ttt = ttt_setup(tmp_path, monkeypatch, EVAL_BUDGET_SECONDS=0)
    loss, bpb, _, summary = ttt.run_schedule(train_gpt.score_first_schedule(ttt.num_chunks))
    assert summary == "chunks=6 tokens_scored=768 tokens_trained=0"
    log = (tmp_path / "logs" / "unit.txt").read_text()
    assert re.search(
        r"ttt_budget: stopping training at chunk 1/6, scoring the remaining 5 chunks as is: .* > "
        r"EVAL_BUDGET_SECONDS=0; every target is still scored",
        log,
    )
    plain_loss = train_gpt.evaluate(model, run, tokens, stride=16).val_loss
    assert loss == pytest.approx(plain_loss, abs=1e-6)  # untrained TTT is exactly the sliding evaluation


def test_freeze_reaches_the_bank_slices(tmp_path, monkeypatch):
    run, model, tokens, ttt = ttt_setup(tmp_path, monkeypatch, TTT_FREEZE_BLOCKS=2)
    n = model.num_layers
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ttt.run_schedule(train_gpt.score_first_schedule(ttt.num_chunks))
    for bank_name, frozen_rows, free_rows in (
        ("qo_bank", [0, 1, n, n + 1], [2, 3, n + 2]),
        ("mlp_up_bank", [0, 1], [2, 3]),
        ("kv_bank", [0, 1, n, n + 1], [2, 3, n + 3]),
    ):
        bank = dict(model.named_parameters())[bank_name]
        assert torch.equal(bank[frozen_rows], before[bank_name][frozen_rows]), bank_name
        assert not torch.equal(bank[free_rows], before[bank_name][free_rows]), bank_name
    assert torch.equal(model.blocks[0].attn_scale, before["blocks.0.attn_scale"])
    assert not torch.equal(model.token_embedding.weight, before["token_embedding.weight"])


def test_frozen_blocks_train_on_every_chunk_despite_a_slow_first_chunk(tmp_path, monkeypatch):
    """TTT_FREEZE_BLOCKS=2 used to flip requires_grad after the eval graphs were compiled: chunk 0's scoring
    recompiled, and the budget guard, projecting every chunk at chunk 0's time, stopped TTT for the whole run.
    Here chunk 0's scoring is made slow (as a compile would) and the budget fits only steady-state chunks."""
    run, model, tokens, ttt = ttt_setup(tmp_path, monkeypatch, TTT_FREEZE_BLOCKS=2, EVAL_BUDGET_SECONDS=4)
    assert all(p.requires_grad for p in model.parameters())  # freezing is by gradient masks only
    score = ttt.score

    def slow_first_score(chunk):
        if chunk == 0:
            time_sleep(1.0)  # 6 chunks projected at this pace: 6 s > the 4 s budget
        score(chunk)

    ttt.score = slow_first_score
    summary = ttt.run_schedule(train_gpt.score_first_schedule(ttt.num_chunks)).audit
    assert summary == "chunks=6 tokens_scored=768 tokens_trained=640"  # every chunk but the last
    assert all(p.requires_grad for p in model.parameters())
    log = tmp_path / "logs" / "unit.txt"
    assert not log.exists() or "ttt_budget" not in log.read_text()


def time_sleep(seconds: float):
    import time

    time.sleep(seconds)


def test_eval_graphs_are_primed_on_random_tokens_without_touching_the_weights(tmp_path, monkeypatch):
    run, model, _ = tiny_setup(tmp_path, monkeypatch, EVAL_STRIDE=16, TTT_CHUNK_TOKENS=256, TTT_BATCH_SEQS=3)
    shapes = []
    real_forward = run.forward

    def recording_forward(model, inputs, targets, reduction="mean", hints=None, documents=None):
        shapes.append((model.training, torch.is_inference_mode_enabled(), tuple(inputs.shape), targets.size(1)))
        return real_forward(model, inputs, targets, reduction, hints, documents)

    run.forward = recording_forward
    before = [p.detach().clone() for p in model.parameters()]
    assert train_gpt.prime_eval_graphs(model, run) == 4
    batch = run.window_batch
    # Scoring at both scored widths (L for window 0 and the plain pass, the stride after), then TTT's shapes:
    # 4 sequences per chunk in steps of 3 global sequences -> 3 and 1 on one rank.
    assert shapes == [
        (False, True, (batch, 64), 16),
        (False, True, (batch, 64), 64),
        (True, False, (1, 64), 64),
        (True, False, (3, 64), 64),
    ]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters()) and not model.training


@pytest.mark.e2e
def test_end_to_end_with_ttt_and_eval_only_rerun(tiny_artifact):
    """The shared tiny run's passes, then EVAL_ONLY on its artifact read back: the same exact scores, no training;
    with EVAL_SLIDING=0 no sliding pass and TTT's score unchanged (it scores every target itself)."""
    folder, env, log = tiny_artifact
    for label in ("final_int6_roundtrip", "final_int6_sliding_window", "legal_ttt"):
        assert parse_metric(log, label)["val_bpb"] > 0 and parse_metric(log, label + "_exact")["val_bpb"] > 0
    assert parse_metric(log, "final_int6_sliding_window")["stride"] == int(env["EVAL_STRIDE"])
    targets = int(parse_metric(log, "val_loader:shards")["tokens"])
    assert re.search(rf"^ttt_audit ok: chunks=\d+ tokens_scored={targets} tokens_trained=\d+$", log, re.M)
    again = run_script(folder, dict(env, RUN_ID="again", EVAL_ONLY=1), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = read_log(folder, "again")
    assert "eval_only: evaluating out/model.ptz without training" in rerun
    assert not re.search(r"^step:\d+/\d+ train_loss", rerun, re.M)
    for label in ("final_int6_roundtrip_exact", "final_int6_sliding_window_exact", "legal_ttt_exact"):
        assert parse_metric(rerun, label) == parse_metric(log, label), label
    lean = run_script(folder, dict(env, RUN_ID="lean", EVAL_ONLY=1, EVAL_SLIDING=0), timeout=600)
    assert lean.returncode == 0, lean.stderr[-3000:]
    lean_log = read_log(folder, "lean")
    assert "final_int6_sliding_window" not in lean_log.split("eval_only: evaluating", 1)[1]
    assert parse_metric(lean_log, "legal_ttt_exact") == parse_metric(log, "legal_ttt_exact")


@pytest.mark.e2e
def test_eval_only_needs_an_artifact(tmp_path, sample_data):
    dataset, tokenizer = sample_data
    result = run_script(
        tmp_path,
        dict(
            TINY_ENV, DATA_PATH=dataset, TOKENIZER_PATH=tokenizer, EVAL_ONLY=1, ARTIFACT_PATH="missing.ptz", RUN_ID="x"
        ),
        timeout=120,
    )
    assert result.returncode == 2 and "missing.ptz: EVAL_ONLY=1 needs an existing artifact" in result.stderr
