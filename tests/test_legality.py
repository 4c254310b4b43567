"""Perturb the future: changing the validation tokens after target p must not change any score of a target
before p, in every evaluation pass (sliding window, plain, score-first SGD TTT), with and without document
isolation; and with DOC_ISOLATION a document's outputs do not depend on any other document. Scores are captured
per target from the one scoring function every pass shares."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train_gpt
from conftest import TINY_ENV


@pytest.fixture
def per_target_scores(monkeypatch):
    """Every scored target's NLL, as ScoreAccumulator.add sees it (window rows mapped to target indices)."""
    scores = {}
    real_add = train_gpt.ScoreAccumulator.add

    def recording_add(self, nll, byte_counts, keep, windows=None):
        width = nll.shape[1]
        for row, window in enumerate(windows.tolist()):
            first = int(self.plan.score_hi[int(window)]) - width
            for position in np.nonzero(keep[row].cpu().numpy())[0]:
                scores[first + int(position)] = float(nll[row, position])
        return real_add(self, nll, byte_counts, keep, windows)

    monkeypatch.setattr(train_gpt.ScoreAccumulator, "add", recording_add)
    return scores


def setup(tmp_path, monkeypatch, tokens: np.ndarray, **overrides):
    tmp_path.mkdir(exist_ok=True)
    monkeypatch.chdir(tmp_path)
    env = dict(TINY_ENV, DATA_PATH="unused", TOKENIZER_PATH="unused", RUN_ID="legality", EVAL_STRIDE="16",
               TTT_CHUNK_TOKENS="128", TTT_EPOCHS="1", TTT_BATCH_SEQS="2", TTT_LR="0.05")
    env.update({k: str(v) for k, v in overrides.items()})
    run = train_gpt.RunContext(train_gpt.Hyperparameters(env))
    torch.manual_seed(0)
    model = train_gpt.GPT(run.h)
    with torch.no_grad():
        for param in model.parameters():  # a model that is not at its (partly zero) initialization
            param.add_(torch.randn_like(param) * 0.05)
    return run, model, SimpleNamespace(tokens=tokens, target_bytes=np.full(len(tokens) - 1, 3))


def original_and_perturbed(p: int, num_tokens: int = 64 * 12 + 1):
    """Two streams equal up to token p (target p - 1) and different after it."""
    rng = np.random.default_rng(1)
    original = rng.integers(0, 1024, num_tokens).astype(np.uint16)
    perturbed = original.copy()
    perturbed[p + 1:] = rng.integers(0, 1024, num_tokens - p - 1)
    return original, perturbed


def scores_of(pass_fn, tokens, tmp_path, monkeypatch, per_target_scores, **overrides) -> dict:
    per_target_scores.clear()
    run, model, val = setup(tmp_path, monkeypatch, tokens, **overrides)
    pass_fn(model, run, val)
    return dict(per_target_scores)


def assert_past_unchanged(before: dict, after: dict, p: int, num_targets: int):
    assert sorted(before) == sorted(after) == list(range(num_targets))  # every target scored once, in both
    assert all(before[t] == after[t] for t in range(p)), "a score before p changed with tokens after it"
    assert any(before[t] != after[t] for t in range(p + 1, num_targets))  # the test can fail: the future changed


@pytest.mark.parametrize("isolation", [0, 1])
@pytest.mark.parametrize("stride", [16, 64])  # sliding, and plain (stride = window)
@pytest.mark.parametrize("p", [200, 300])  # inside a window, and straddling a window boundary
def test_sliding_and_plain_scores_ignore_the_future(tmp_path, monkeypatch, per_target_scores, stride, p, isolation):
    original, perturbed = original_and_perturbed(p)
    evaluate = lambda model, run, val: train_gpt.evaluate(model, run, val, stride)  # noqa: E731
    before = scores_of(evaluate, original, tmp_path / "a", monkeypatch, per_target_scores, DOC_ISOLATION=isolation)
    after = scores_of(evaluate, perturbed, tmp_path / "b", monkeypatch, per_target_scores, DOC_ISOLATION=isolation)
    assert_past_unchanged(before, after, p, len(original) - 1)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("p", [300, 384])  # mid-chunk 2, and the first target of chunk 3
def test_score_first_ttt_scores_ignore_the_future(tmp_path, monkeypatch, per_target_scores, optimizer, p):
    """TTT trains on chunks as it goes: a score before p may depend on training, but only on chunks that
    were scored before it, which lie before p too."""
    original, perturbed = original_and_perturbed(p)

    def ttt(model, run, val):
        trainer = train_gpt.TestTimeTrainer(model, run, val, eval_started=0.0)
        trainer.h.eval_budget_seconds = float("inf")  # no budget stop
        _, _, summary = trainer.run_schedule(train_gpt.score_first_schedule(trainer.num_chunks))
        assert summary == "chunks=6 tokens_scored=768 tokens_trained=640"

    before = scores_of(ttt, original, tmp_path / "a", monkeypatch, per_target_scores, TTT_OPTIMIZER=optimizer)
    after = scores_of(ttt, perturbed, tmp_path / "b", monkeypatch, per_target_scores, TTT_OPTIMIZER=optimizer)
    assert_past_unchanged(before, after, p, len(original) - 1)


@pytest.mark.parametrize("isolation", [0, 1])
def test_document_isolation_hides_other_documents(isolation):
    """Two documents in one window (BOS at 0 and 40): with DOC_ISOLATION, changing the first document changes no
    output of the second (BigramHash off and the smear BOS-masked, the other ways across a BOS); without, it does."""
    from conftest import tiny_hyperparameters

    h = tiny_hyperparameters(DOC_ISOLATION=isolation, BIGRAM_VOCAB_SIZE=0, SMEAR_BOS_MASK=1)
    torch.manual_seed(0)
    model = train_gpt.GPT(h).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    ids = torch.randint(4, 1024, (1, 64), generator=torch.Generator().manual_seed(0))
    ids[0, 0] = ids[0, 40] = train_gpt.BOS_ID
    other = ids.clone()
    other[0, 1:40] = torch.randint(4, 1024, (39,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        first, second = model.logits(ids), model.logits(other)
    assert not torch.equal(first[0, :40], second[0, :40])
    assert torch.equal(first[0, 40:], second[0, 40:]) == bool(isolation)
