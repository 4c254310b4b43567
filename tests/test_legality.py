"""Perturb the future: changing the validation tokens after target p must not change any score of a target
before p, in every evaluation pass (sliding window, plain, score-first SGD TTT), with and without document
isolation; and with DOC_ISOLATION a document's outputs do not depend on any other document. Scores are captured
per target from the one scoring function every pass shares."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train_gpt
from conftest import TINY_ENV


@pytest.fixture
def per_target_scores(monkeypatch):
    """Every scored target's NLL (tilted when a tilt is on), as ScoreAccumulator.add sees it."""
    scores = {}
    real_add = train_gpt.ScoreAccumulator.add

    def recording_add(self, scored, targets, keep):
        scored = scored.detach()
        values = self.tilt.apply(scored[0], scored[1], targets, scored.device) if self.tilt is not None else scored
        for target, value in zip(targets[keep].tolist(), values[torch.from_numpy(keep)].tolist()):
            assert target not in scores, f"target {target} scored twice"
            scores[target] = value
        return real_add(self, scored, targets, keep)

    monkeypatch.setattr(train_gpt.ScoreAccumulator, "add", recording_add)
    return scores


def setup(tmp_path, monkeypatch, tokens: np.ndarray, **overrides):
    tmp_path.mkdir(exist_ok=True)
    monkeypatch.chdir(tmp_path)
    env = dict(
        TINY_ENV,
        DATA_PATH="unused",
        TOKENIZER_PATH="unused",
        RUN_ID="legality",
        EVAL_STRIDE="16",
        TTT_CHUNK_TOKENS="128",
        TTT_EPOCHS="1",
        TTT_BATCH_SEQS="2",
        TTT_LR="0.05",
    )
    env.update({k: str(v) for k, v in overrides.items()})
    run = train_gpt.RunContext(train_gpt.Hyperparameters(env))
    torch.manual_seed(0)
    model = train_gpt.GPT(run.h)
    with torch.no_grad():
        for param in model.parameters():  # a model that is not at its (partly zero) initialization
            param.add_(torch.randn_like(param) * 0.05)
    return run, model, SimpleNamespace(tokens=tokens, target_bytes=np.full(len(tokens) - 1, 3))


def perturbed_tiny_model(**overrides) -> train_gpt.GPT:
    """A tiny GPT in eval mode, moved off its (partly zero) initialization."""
    from conftest import tiny_hyperparameters

    torch.manual_seed(0)
    model = train_gpt.GPT(tiny_hyperparameters(**overrides)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def original_and_perturbed(p: int, num_tokens: int = 64 * 12 + 1):
    """Two streams equal up to token p (target p - 1) and different after it."""
    rng = np.random.default_rng(1)
    original = rng.integers(0, 1024, num_tokens).astype(np.uint16)
    perturbed = original.copy()
    perturbed[p + 1 :] = rng.integers(0, 1024, num_tokens - p - 1)
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
        summary = trainer.run_schedule(train_gpt.score_first_schedule(trainer.num_chunks)).audit
        assert summary == "chunks=6 tokens_scored=768 tokens_trained=640"

    before = scores_of(ttt, original, tmp_path / "a", monkeypatch, per_target_scores, TTT_OPTIMIZER=optimizer)
    after = scores_of(ttt, perturbed, tmp_path / "b", monkeypatch, per_target_scores, TTT_OPTIMIZER=optimizer)
    assert_past_unchanged(before, after, p, len(original) - 1)


@pytest.mark.parametrize("isolation", [0, 1])
def test_document_isolation_hides_other_documents(isolation):
    """Two documents in one window (BOS at 0 and 40): with DOC_ISOLATION, changing the first document changes no
    output of the second (BigramHash off and the smear BOS-masked, the other ways across a BOS); without, it does."""
    model = perturbed_tiny_model(DOC_ISOLATION=isolation, BIGRAM_VOCAB_SIZE=0, SMEAR_BOS_MASK=1)
    ids = torch.randint(4, 1024, (1, 64), generator=torch.Generator().manual_seed(0))
    ids[0, 0] = ids[0, 40] = train_gpt.BOS_ID
    other = ids.clone()
    other[0, 1:40] = torch.randint(4, 1024, (39,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        first, second = model.logits(ids), model.logits(other)
    assert not torch.equal(first[0, :40], second[0, :40])
    assert torch.equal(first[0, 40:], second[0, 40:]) == bool(isolation)


@pytest.mark.parametrize("isolation", [0, 1])
def test_isolated_hash_embeddings_do_not_read_across_a_bos(isolation):
    """BigramHash and EngramLite with DOC_ISOLATION: changing the previous document's last two tokens changes no
    output of the next document (its BOS and first token hashed without them); without isolation it does."""
    model = perturbed_tiny_model(
        DOC_ISOLATION=isolation,
        SMEAR_BOS_MASK=1,
        ENGRAM_BUCKETS=64,
        ENGRAM_HEADS=2,
        ENGRAM_ORDERS=2,
        ENGRAM_DIM_PER_HEAD=4,
    )
    with torch.no_grad():
        model.engram.proj.weight.normal_(std=0.1)  # zero at init: the test needs the table to reach the output
    ids = torch.randint(4, 1024, (1, 64), generator=torch.Generator().manual_seed(0))
    ids[0, 0] = ids[0, 40] = train_gpt.BOS_ID
    other = ids.clone()
    other[0, 38:40] = torch.tensor([5, 6]) + ids[0, 38:40] % 900
    with torch.no_grad():
        first, second = model.logits(ids), model.logits(other)
    assert torch.equal(first[0, 40:], second[0, 40:]) == bool(isolation)


@pytest.mark.parametrize("bos_mask", [0, 1])
def test_what_isolation_lets_through_without_the_smear_bos_mask(bos_mask):
    """DOC_ISOLATION=1 with SMEAR_BOS_MASK=0 (docs/EVALUATION.md): the next document's BOS smears in the previous
    document's last token, whose embedding holds the bigram hash of the last two, so exactly those two reach every
    output of the next document; the 37 tokens before them do not. With the mask nothing of the previous document does."""
    model = perturbed_tiny_model(DOC_ISOLATION=1, SMEAR_BOS_MASK=bos_mask)
    ids = torch.randint(4, 1024, (1, 64), generator=torch.Generator().manual_seed(0))
    ids[0, 0] = ids[0, 40] = train_gpt.BOS_ID
    last_two, earlier = ids.clone(), ids.clone()
    last_two[0, 38:40] = torch.tensor([5, 6]) + ids[0, 38:40] % 900
    earlier[0, 1:38] = torch.randint(4, 1024, (37,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base, changed_last_two, changed_earlier = (model.logits(x)[0, 40:] for x in (ids, last_two, earlier))
    assert torch.equal(base, changed_earlier)
    assert torch.equal(base, changed_last_two) == bool(bos_mask)
    if not bos_mask:
        assert (base - changed_last_two).abs().amax(-1).min() > 0  # every position of the next document


# ---- The n-gram tilt ------------------------------------------------------------------------------------------


def repetitive_stream(num_tokens: int = 64 * 12 + 1, seed: int = 1) -> np.ndarray:
    """Phrases that recur (so 8..16-token contexts repeat and the tilt has hints), with noise, BOS every 100."""
    rng = np.random.default_rng(seed)
    phrases = rng.integers(2, 1024, (3, 24))
    stream = np.concatenate([phrases[i] for i in rng.integers(0, 3, num_tokens // 24 + 1)])[:num_tokens]
    noise = rng.random(num_tokens) < 0.05
    stream[noise] = rng.integers(2, 1024, int(noise.sum()))
    stream[::100] = train_gpt.BOS_ID
    return stream.astype(np.uint16)


def perturbed_after(stream: np.ndarray, p: int, seed: int = 2) -> np.ndarray:
    """The stream changed after token p (target p - 1), its BOS positions kept (document lengths unchanged)."""
    perturbed = stream.copy()
    fresh = np.random.default_rng(seed).integers(2, 1024, len(stream) - p - 1)
    perturbed[p + 1 :] = np.where(stream[p + 1 :] == train_gpt.BOS_ID, train_gpt.BOS_ID, fresh)
    return perturbed


def one_rank():
    return SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"), log=lambda message: None)


def test_ngram_hints_match_a_token_by_token_count():
    """Each target's hint is the most frequent follower of its context among earlier targets (first to reach
    a count wins), counted before the target joins the table."""
    import collections

    tokens = np.random.default_rng(0).integers(0, 4, 1500).astype(np.uint16)
    for order in (1, 3):
        hint, hint_count, context_count = train_gpt.ngram_hint_counts(tokens, order)
        followers, leader = collections.defaultdict(collections.Counter), {}
        for i in range(order - 1, len(tokens) - 1):
            context, following = tuple(tokens[i - order + 1 : i + 1]), int(tokens[i + 1])
            counts = followers[context]
            assert context_count[i] == sum(counts.values())
            assert (hint[i], hint_count[i]) == (leader.get(context, (-1, 0)))
            counts[following] += 1
            if context not in leader or counts[following] > leader[context][1]:
                leader[context] = (following, counts[following])


def test_ngram_tilt_reads_only_the_past():
    stream = repetitive_stream(4000)
    tilt = train_gpt.NgramTilt(stream, 2.0, one_rank())
    assert (tilt.hint >= 0).mean() > 0.3 and tilt.hit[tilt.hint >= 0].mean() > 0.5  # the test has hints to lose
    p = 2500
    other = train_gpt.NgramTilt(perturbed_after(stream, p), 2.0, one_rank())
    assert np.array_equal(tilt.hint[:p], other.hint[:p]) and np.array_equal(tilt.beta[:p], other.beta[:p])
    assert not np.array_equal(tilt.hint[p:], other.hint[p:])


def test_tilted_distribution_sums_to_one():
    """p'(t) = p(t) exp(b 1[t = hint]) / Z over the whole vocabulary, from the tilted NLL of every possible target."""
    vocab, hint, beta = 50, 7, 1.3
    log_probs = torch.log_softmax(torch.randn(vocab, generator=torch.Generator().manual_seed(0)), dim=0)
    tilt = SimpleNamespace(beta=np.full(vocab, beta, np.float32), hit=np.arange(vocab) == hint)
    targets = np.arange(vocab)  # target t stands for "the next token is t"
    tilted = train_gpt.NgramTilt.apply(tilt, -log_probs, -log_probs[hint].expand(vocab), targets, "cpu")
    assert math.isclose(torch.exp(-tilted).sum().item(), 1.0, rel_tol=1e-6)
    assert tilted[hint] < -log_probs[hint]  # the hint gained


@pytest.mark.parametrize("pass_name", ["sliding", "sgd_ttt"])
def test_tilted_scores_ignore_the_future(tmp_path, monkeypatch, per_target_scores, pass_name):
    p = 300
    original = repetitive_stream()
    perturbed = perturbed_after(original, p)

    def scored(model, run, val):
        tilt = train_gpt.NgramTilt(val.tokens, 2.0, run)
        if pass_name == "sliding":
            train_gpt.evaluate(model, run, val, 16, tilt)
        else:
            trainer = train_gpt.TestTimeTrainer(model, run, val, eval_started=0.0, tilt=tilt)
            trainer.h.eval_budget_seconds = float("inf")
            trainer.run_schedule(train_gpt.score_first_schedule(trainer.num_chunks))

    before = scores_of(scored, original, tmp_path / "a", monkeypatch, per_target_scores, NGRAM_TILT=1)
    after = scores_of(scored, perturbed, tmp_path / "b", monkeypatch, per_target_scores, NGRAM_TILT=1)
    assert_past_unchanged(before, after, p, len(original) - 1)


# ---- Document LoRA TTT ----------------------------------------------------------------------------------------

LORA_ENV = dict(
    TTT_MODE="lora",
    TTT_LORA_CHUNK=16,
    TTT_LORA_CONTEXT=48,
    TTT_LORA_BATCH=2,
    TTT_LORA_RANK=4,
    TTT_LORA_LR=0.01,
    TTT_PHASES=0,
    TTT_PHASE_LR=0.05,
    TTT_BATCH_SEQS=4,
)


def test_a_fresh_lora_is_the_base_model():
    model = perturbed_tiny_model()
    ids = torch.randint(2, 1024, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model.logits(ids)
        lora = train_gpt.BatchedLoRA(model, rows=3, rank=4, alpha=8.0, seed=0)
        adapted = model.logits(ids, adapters=lora)
        lora.b[0].add_(0.1)  # the test can fail: a nonzero B changes the outputs
        changed = model.logits(ids, adapters=lora)
    assert torch.equal(base, adapted) and not torch.equal(base, changed)


def lora_pass(record_phases: list | None = None, budget: float = float("inf"), summaries: list | None = None):
    def run_pass(model, run, val):
        trainer = train_gpt.DocumentLoRATrainer(model, run, val, eval_started=time.perf_counter())
        trainer.h.eval_budget_seconds = budget
        if record_phases is not None:
            real_train_base = trainer.train_base

            def recording_train_base(docs, phase):
                record_phases.append(docs.copy())
                return real_train_base(docs, phase)

            trainer.train_base = recording_train_base
        summary = trainer.run_schedule().audit
        assert summary.startswith("chunks=")
        if summaries is not None:
            summaries.append(summary)

    return run_pass


def test_lora_budget_guard_drops_every_update_and_scores_every_target(tmp_path, monkeypatch, per_target_scores):
    stream, env, summaries = repetitive_stream(), dict(LORA_ENV, TTT_PHASES=1, PHASED_TTT_PREFIX_DOCS=4), []
    guarded = scores_of(
        lora_pass(budget=0.0, summaries=summaries), stream, tmp_path / "a", monkeypatch, per_target_scores, **env
    )
    untrained = scores_of(
        lora_pass(), stream, tmp_path / "b", monkeypatch, per_target_scores, **dict(env, TTT_LORA_LR=0, TTT_PHASES=0)
    )
    assert guarded == untrained and summaries[0].endswith("tokens_trained=0")
    log = (tmp_path / "a" / "logs" / "legality.txt").read_text()
    assert "ttt_budget: the LoRA steps and phases: elapsed" in log and "every target is still scored" in log


@pytest.mark.parametrize("p", [130, 555])  # inside the second document, and in a late one
def test_lora_ttt_scores_ignore_the_future(tmp_path, monkeypatch, per_target_scores, p):
    """Without phases each document is scored from its own prefix and its own scored chunks only."""
    original = repetitive_stream()
    perturbed = perturbed_after(original, p)
    before = scores_of(lora_pass(), original, tmp_path / "a", monkeypatch, per_target_scores, **LORA_ENV)
    after = scores_of(lora_pass(), perturbed, tmp_path / "b", monkeypatch, per_target_scores, **LORA_ENV)
    assert_past_unchanged(before, after, p, len(original) - 1)


@pytest.mark.parametrize("p", [130, 555])
def test_short_document_chunks_are_still_score_first(tmp_path, monkeypatch, per_target_scores, p):
    """#2014's short-document chunks (TTT_SHORT_SCORE_FIRST_STEPS): chunks of 8 instead of 16 on every batch here,
    more adapter steps, and still no score before p moves when everything after p changes."""
    env = dict(LORA_ENV, TTT_SHORT_SCORE_FIRST_ENABLED=1, TTT_SHORT_SCORE_FIRST_STEPS="100000:8")
    original = repetitive_stream()
    perturbed = perturbed_after(original, p)
    before = scores_of(lora_pass(), original, tmp_path / "a", monkeypatch, per_target_scores, **env)
    after = scores_of(lora_pass(), perturbed, tmp_path / "b", monkeypatch, per_target_scores, **env)
    plain = scores_of(lora_pass(), original, tmp_path / "c", monkeypatch, per_target_scores, **LORA_ENV)
    assert_past_unchanged(before, after, p, len(original) - 1)
    assert before != plain  # the chunks did change: the test can fail


def test_lora_ttt_trains_and_phases_see_only_scored_documents(tmp_path, monkeypatch, per_target_scores):
    """The phase trains on exactly the documents scored before its boundary. Changing a document changes no score
    of a document scored before it or beside it in its batch (the processing order: longest first, batches of 2),
    and changes every document after the phase that trained on it."""
    stream = repetitive_stream()
    env = dict(LORA_ENV, TTT_PHASES=1, PHASED_TTT_PREFIX_DOCS=4)
    phases = []
    base = scores_of(lora_pass(phases), stream, tmp_path / "a", monkeypatch, per_target_scores, **env)
    spans = train_gpt.document_spans(stream)
    processing = spans[np.argsort(spans[:, 0] - spans[:, 1], kind="stable")]
    batch_of = {tuple(doc): i // 2 for i, doc in enumerate(processing)}
    assert len(phases) == 1 and [tuple(d) for d in phases[0]] == [tuple(d) for d in processing[:4]]
    late = [tuple(d) for d in processing[4:]]
    no_lora = scores_of(
        lora_pass(), stream, tmp_path / "b", monkeypatch, per_target_scores, **dict(env, TTT_LORA_LR=0, TTT_PHASE_LR=0)
    )
    assert any(base[t] != no_lora[t] for start, end in processing[:4] for t in range(start + 16, end))  # LoRA acts

    def changed_documents(document):
        start, end = document
        perturbed = stream.copy()
        perturbed[start + 1 : end] = np.random.default_rng(3).integers(2, 1024, end - start - 1)
        after = scores_of(lora_pass(), perturbed, tmp_path / f"c{start}", monkeypatch, per_target_scores, **env)
        return {tuple(s) for s in spans if any(base[t] != after[t] for t in range(*s))} - {document}

    for document in (tuple(processing[0]), tuple(processing[-1])):
        changed = changed_documents(document)
        assert all(batch_of[d] > batch_of[document] for d in changed)  # only documents scored after it
        if document in late:
            assert changed == set()
        else:
            assert set(late) <= changed  # the phase's SGD used it


def test_lora_rows_keep_the_scoring_windows_rope_base():
    """RoPE's NTK base follows the table length: LoRA TTT's short rows pin the table at EVAL_SEQ_LEN, so a row of
    100 tokens gets the positions a 2048-token scoring window gives its first 100 (unpinned, it would not)."""
    model = perturbed_tiny_model()
    model.adapted_rope_length = 2048  # EVAL_SEQ_LEN
    lora = train_gpt.BatchedLoRA(model, rows=1, rank=4, alpha=8.0, seed=0)  # B = 0: the base model's outputs
    ids = torch.randint(2, 1024, (1, 2048), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        window = model.logits(ids)[:, :100]
        unpinned = model.logits(ids[:, :100])
        pinned = model.logits(ids[:, :100], adapters=lora)
    assert torch.allclose(pinned, window, atol=1e-5) and not torch.allclose(unpinned, window, atol=1e-3)


@pytest.mark.e2e
def test_budget_guard_agrees_across_ranks_after_a_local_stop(tmp_path):
    """A rank whose own LoRA projection stopped its updates still joins the next agreed check (before a phase),
    which then stops every rank: skipping the collective there hung the other rank (found on 2 gloo ranks)."""
    import subprocess
    import sys

    from conftest import REPO, clean_environment

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(REPO / "tests" / "budget_guard_worker.py"),
        ],
        cwd=tmp_path,
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0 local:True agreed:False" in result.stdout and "rank 1 local:False agreed:False" in result.stdout
    assert "rank 0 log: ttt_budget: the phases: elapsed" in result.stdout and "(another rank over)" in result.stdout


# ---- The tilt in the LoRA pass's own scoring order ------------------------------------------------------------


def varied_documents_stream(lengths=(40, 120, 50, 110, 60, 100, 70, 90, 80, 30), seed: int = 1) -> np.ndarray:
    """repetitive_stream's phrases cut into documents of these lengths (BOS first): longest-first LoRA batches
    score the short early documents last."""
    body = repetitive_stream(sum(lengths) + 1, seed)
    body[body == train_gpt.BOS_ID] = 7
    body[np.cumsum((0,) + lengths[:-1])] = train_gpt.BOS_ID
    return body


def test_scoring_order_hints_match_a_token_by_token_count():
    """With a scoring order, each target's hint counts only targets scored before it, from contexts that stop at
    its document's BOS (earlier tokens read as 0)."""
    import collections

    tokens = np.random.default_rng(0).integers(2, 5, 900).astype(np.uint16)
    tokens[[0, 250, 400, 700]] = train_gpt.BOS_ID
    spans = train_gpt.document_spans(tokens)
    docs = spans[[2, 0, 3, 1]]
    rank = train_gpt.scoring_ranks(docs, len(tokens) - 1)
    for order in (1, 3):
        hint, hint_count, context_count = train_gpt.ngram_hint_counts(tokens, order, rank)
        followers, leader = collections.defaultdict(collections.Counter), {}
        for start, end in docs:
            for i in range(max(start, order - 1), end):
                context = tuple(int(tokens[j]) + 1 if j >= start else 0 for j in range(i - order + 1, i + 1))
                counts = followers[context]
                assert context_count[i] == sum(counts.values())
                assert (hint[i], hint_count[i]) == leader.get(context, (-1, 0))
                counts[int(tokens[i + 1])] += 1
                if context not in leader or counts[int(tokens[i + 1])] > leader[context][1]:
                    leader[context] = (int(tokens[i + 1]), counts[int(tokens[i + 1])])


TILTED_LORA_ENV = dict(LORA_ENV, NGRAM_TILT=1, TTT_PHASES=1, PHASED_TTT_PREFIX_DOCS=5, TTT_LORA_WARM_START_A=1)


def lora_scoring_order(stream: np.ndarray, order: str = "length") -> list[tuple[int, int]]:
    return [tuple(d) for d in train_gpt.lora_document_order(train_gpt.document_spans(stream), order)]


def rewritten(stream: np.ndarray, document: tuple[int, int], seed: int = 3) -> np.ndarray:
    """The stream with one document's tokens after its BOS replaced by other phrases (lengths and BOS kept)."""
    start, end = document
    other = stream.copy()
    other[start + 1 : end] = repetitive_stream(end - start - 1 + 1, seed)[: end - start - 1]
    other[start + 1 : end][other[start + 1 : end] == train_gpt.BOS_ID] = 9
    return other


def test_tilted_lora_is_score_first_in_its_own_order(tmp_path, monkeypatch, per_target_scores):
    """Coupled LoRA TTT (warm-started A, a phase) with the tilt: rewriting a document scored late in the LoRA order
    but early in the stream (the first document, 40 tokens) leaves every tilted score of every document scored
    before it bit-identical. A tilt counted in stream order gave those documents hints from its tokens."""
    stream = varied_documents_stream()
    order = lora_scoring_order(stream)
    late = (0, 40)
    assert order.index(late) == len(order) - 2  # scored in the last batch, first in the stream
    before = scores_of(lora_pass(), stream, tmp_path / "a", monkeypatch, per_target_scores, **TILTED_LORA_ENV)
    after = scores_of(
        lora_pass(), rewritten(stream, late), tmp_path / "b", monkeypatch, per_target_scores, **TILTED_LORA_ENV
    )
    earlier = [t for start, end in order[: order.index(late)] for t in range(start, end)]
    assert len(earlier) > 600 and sorted(before) == sorted(after) == list(range(len(stream) - 1))
    assert [t for t in earlier if before[t] != after[t]] == []
    assert any(before[t] != after[t] for t in range(*late))  # the test can fail: the document itself changed


def test_lora_scoring_leaves_no_gradient_on_the_base_weights(tmp_path, monkeypatch, per_target_scores):
    """LoRA steps train the adapters only: when a phase starts, no base weight holds a gradient, so the phase's
    first SGD step is its own documents' gradient (before: the sum of every LoRA backward so far)."""
    grads_at_phase = []
    real_train_base = train_gpt.DocumentLoRATrainer.train_base

    def checking_train_base(self, docs, phase):
        grads_at_phase.append([name for name, p in self.model.named_parameters() if p.grad is not None])
        return real_train_base(self, docs, phase)

    monkeypatch.setattr(train_gpt.DocumentLoRATrainer, "train_base", checking_train_base)
    scores_of(lora_pass(), varied_documents_stream(), tmp_path, monkeypatch, per_target_scores, **TILTED_LORA_ENV)
    assert grads_at_phase == [[]]


def test_stream_order_lora_ignores_future_documents_and_their_lengths(tmp_path, monkeypatch, per_target_scores):
    """TTT_LORA_ORDER=stream batches documents as they come: a change after p, its BOS positions moved too, leaves
    every score before p's batch bit-identical; under the length order the same change moves earlier scores."""
    stream = varied_documents_stream()
    p = 280  # inside the 4th document (batch 1 of batches of 2)
    future = stream.copy()
    future[p + 1 :] = varied_documents_stream((30, 90, 45, 160, 60, 40, 80), seed=5)[: len(stream) - p - 1]
    env = dict(TILTED_LORA_ENV, TTT_LORA_ORDER="stream")
    before = scores_of(lora_pass(), stream, tmp_path / "a", monkeypatch, per_target_scores, **env)
    after = scores_of(lora_pass(), future, tmp_path / "b", monkeypatch, per_target_scores, **env)
    first_of_batch = 160  # batch 1 holds the documents at 160 and 210
    assert all(before[t] == after[t] for t in range(first_of_batch))
    length_before = scores_of(lora_pass(), stream, tmp_path / "c", monkeypatch, per_target_scores, **TILTED_LORA_ENV)
    length_after = scores_of(lora_pass(), future, tmp_path / "d", monkeypatch, per_target_scores, **TILTED_LORA_ENV)
    assert any(length_before[t] != length_after[t] for t in range(first_of_batch))


def test_stream_order_phase_boundaries_ignore_how_many_documents_follow(tmp_path, monkeypatch, per_target_scores):
    """A phase boundary is an absolute document count (PHASED_TTT_PREFIX_DOCS): splitting the last document into six
    (BOS positions only: 10 documents become 15) leaves the phase after batch 1 and every score before the split's
    batch bit-identical, those of the batches after the phase included. Boundaries at a fraction of all documents
    (the rule before, 0.4: 4 of 10, 6 of 15) move the phase across batch 2 and change its scores."""
    stream = varied_documents_stream()
    split = stream.copy()
    split[[660, 675, 690, 705, 735]] = train_gpt.BOS_ID  # inside the documents at 640 and 720 (batch 4)
    env = dict(TILTED_LORA_ENV, TTT_LORA_ORDER="stream", PHASED_TTT_PREFIX_DOCS=4)
    ends = []
    real_phase_ends = train_gpt.phase_ends

    def recorded(batches, prefix_docs, phases):
        ends.append(real_phase_ends(batches, prefix_docs, phases))
        return ends[-1]

    monkeypatch.setattr(train_gpt, "phase_ends", recorded)
    before = scores_of(lora_pass(), stream, tmp_path / "a", monkeypatch, per_target_scores, **env)
    after = scores_of(lora_pass(), split, tmp_path / "b", monkeypatch, per_target_scores, **env)
    first_of_batch = 640  # batch 4 holds the documents at 640 and 720
    assert ends == [[2], [2]]
    assert [t for t in range(first_of_batch) if before[t] != after[t]] == []
    assert any(before[t] != after[t] for t in range(first_of_batch, len(stream) - 1))  # the split changed its own

    def fraction_of_all(batches, prefix_docs, phases):  # the rule this replaced, with 0.4 of the documents
        total = sum(map(len, batches))
        return real_phase_ends(batches, int(0.4 * total), phases)

    monkeypatch.setattr(train_gpt, "phase_ends", fraction_of_all)
    before = scores_of(lora_pass(), stream, tmp_path / "c", monkeypatch, per_target_scores, **env)
    after = scores_of(lora_pass(), split, tmp_path / "d", monkeypatch, per_target_scores, **env)
    assert any(
        before[t] != after[t] for t in range(320, 480)
    )  # batch 2: after the phase in one, before it in the other


def test_lora_batches_go_to_ranks_balanced_by_cost_within_each_phase():
    """Costliest first to the least loaded rank, phase by phase (round robin gave rank 0 each phase's longest batch,
    so the other ranks waited at the phase's sync); a rank then scores its own batches in index order."""
    costs = np.array([100, 90, 80, 10, 50, 40, 5, 5])
    owner = train_gpt.balanced_owners(costs, [4], world_size=2)
    assert owner.tolist() == [0, 1, 1, 0, 0, 1, 1, 1]  # phase 0: 100+10 vs 90+80; phase 1: 50 vs 40+5+5
    assert train_gpt.balanced_owners(costs, [4], world_size=1).tolist() == [0] * 8


def test_lora_head_runs_on_the_scored_chunk_only(tmp_path, monkeypatch, per_target_scores):
    """Defect 5: the tied head (fp32 logits) runs on each row's scored chunk (at most TTT_LORA_CHUNK columns), not
    on every context position; the scores equal those of the full-width head gathered at the chunk."""
    stream, widths = varied_documents_stream(), []
    env = dict(LORA_ENV, TTT_PHASES=1, PHASED_TTT_PREFIX_DOCS=5)
    real_raw_logits = train_gpt.GPT.raw_logits

    def recording(self, ids, positions=None, documents=None, adapters=None, segment_len=None):
        logits = real_raw_logits(self, ids, positions, documents, adapters, segment_len)
        if adapters is not None:
            widths.append(logits.size(1))
        return logits

    monkeypatch.setattr(train_gpt.GPT, "raw_logits", recording)
    chunked = scores_of(lora_pass(), stream, tmp_path / "a", monkeypatch, per_target_scores, **env)
    assert widths and max(widths) <= 16 < env["TTT_LORA_CONTEXT"]

    def full_width(self, ids, positions=None, documents=None, adapters=None, segment_len=None):
        logits = real_raw_logits(
            self, ids, None, documents, adapters, segment_len
        )  # every position, then the chunk's columns
        if isinstance(positions, torch.Tensor):
            return logits.gather(1, positions[..., None].expand(-1, -1, logits.size(-1)))
        return logits if positions is None else logits[:, -positions:]

    monkeypatch.setattr(train_gpt.GPT, "raw_logits", full_width)
    reference = scores_of(lora_pass(), stream, tmp_path / "b", monkeypatch, per_target_scores, **env)
    assert sorted(chunked) == sorted(reference) == list(range(len(stream) - 1))
    assert max(abs(chunked[t] - reference[t]) for t in reference) < 1e-4


def test_lora_batches_bound_their_padded_tokens_and_phases_count_documents():
    """Defect 5: a batch holds at most TTT_LORA_BATCH documents and TTT_LORA_BATCH_TOKENS padded row tokens (one
    longer document alone); the phases fall after the same numbers of documents however the batches are cut."""
    rng = np.random.default_rng(0)
    starts = np.cumsum(np.concatenate(([0], rng.integers(5, 3000, 299))))
    docs = np.stack([starts, starts + rng.integers(5, 3000, 300)], 1)
    docs = docs[np.argsort(docs[:, 0] - docs[:, 1], kind="stable")]
    batches = train_gpt.lora_batches(docs, 64, 16384, 2048)
    assert np.array_equal(np.concatenate(batches), docs)
    for batch in batches:
        rows = np.minimum(batch[:, 1] - batch[:, 0], 2048)
        assert len(batch) <= 64 and (len(batch) == 1 or len(batch) * rows.max() <= 16384)
    assert len(batches[0]) == 8 < len(batches[-1])  # 8 rows of 2,048 tokens; short documents fill up to 64
    unbounded = train_gpt.lora_batches(docs, 64, 10**9, 2048)
    assert [len(b) for b in unbounded] == [64, 64, 64, 64, 44]
    assert train_gpt.phase_ends(unbounded, 150, 3) == [1, 2, 3]  # ceil(150 k / 3 / 64): #1855's boundaries
    assert train_gpt.phase_ends(unbounded, 2500, 3) == []  # boundaries past the last batch: no phase
    ends = train_gpt.phase_ends(batches, 150, 3)
    scored = np.cumsum([len(b) for b in batches])
    assert [int(scored[end - 1]) >= 50 * k > int(scored[end - 2]) for k, end in zip((1, 2, 3), ends)] == [True] * 3
    assert train_gpt.phase_ends(unbounded, 0, 3) == []


RECORD1855_LORA_ENV = dict(TILTED_LORA_ENV, TTT_RECIPE="record1855", TTT_LORA_BATCH_TOKENS=10**6, DOC_ISOLATION=1)


def test_record1855_ttt_is_score_first_in_its_queue_order(tmp_path, monkeypatch, per_target_scores):
    """#1855's queue scores the 40-token first document in its last batch; its cumulative phase trains on the
    shortest 5 of the 6 documents scored by then (the 120-token one dropped). Rewriting that first document leaves
    every score before it bit-identical (tilt, warm A, redraws and the phase included)."""
    stream = varied_documents_stream()
    phases = []
    real = train_gpt.DocumentLoRATrainer.train_stream

    def recording(self, docs, phase):
        phases.append([int(end - start) for start, end in docs])
        return real(self, docs, phase)

    monkeypatch.setattr(train_gpt.DocumentLoRATrainer, "train_stream", recording)
    before = scores_of(lora_pass(), stream, tmp_path / "a", monkeypatch, per_target_scores, **RECORD1855_LORA_ENV)
    assert phases == [[70, 80, 90, 100, 110]]
    after = scores_of(
        lora_pass(), rewritten(stream, (0, 40)), tmp_path / "b", monkeypatch, per_target_scores, **RECORD1855_LORA_ENV
    )
    queue = train_gpt.record1855_queue(train_gpt.document_spans(stream), 2)
    order = [tuple(d) for batch in queue for d in batch]
    assert order.index((0, 40)) == len(order) - 1
    earlier = [t for start, end in order[:-2] for t in range(start, end)]
    assert len(earlier) > 600 and [t for t in earlier if before[t] != after[t]] == []
    assert any(before[t] != after[t] for t in range(0, 40))  # the test can fail: the document itself changed


def test_record1855_rows_split_for_memory_score_the_same(tmp_path, monkeypatch, per_target_scores):
    """TTT_LORA_BATCH_TOKENS splits a chunk step's rows into forwards whose gradients add into one AdamW step: the
    same scores as one forward (a step per group would advance Adam's count and change them)."""
    stream = varied_documents_stream()
    whole = scores_of(lora_pass(), stream, tmp_path / "a", monkeypatch, per_target_scores, **RECORD1855_LORA_ENV)
    split = scores_of(
        lora_pass(),
        stream,
        tmp_path / "b",
        monkeypatch,
        per_target_scores,
        **dict(RECORD1855_LORA_ENV, TTT_LORA_BATCH_TOKENS=48),
    )
    assert sorted(whole) == sorted(split) == list(range(len(stream) - 1))
    assert max(abs(whole[t] - split[t]) for t in whole) < 1e-5
