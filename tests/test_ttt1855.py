"""TTT_RECIPE=record1855 against #1855's own TTT: its forward with adapters (the peer's per-token losses, pinned from
bench/ttt1855_harness.py's run beside the CPU-patched record: logs/ttt1855_harness.txt), its queue, pauses, phase
sets and streams, its adapter draws and its global-SGD LR (constants from running the record's eval_val_ttt_phased
with a stub forward, and from its logs)."""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest
import torch

import train_gpt
from conftest import REPO, RECORD_CASEOPS_DATASET

sys.path.insert(0, str(REPO / "bench"))
import ttt1855_harness  # noqa: E402

# The peer's per-row NLL sums over the harness's 3 x 96 tokens (logs/ttt1855_harness.txt; ours differed by <= 4e-6)
PEER_ROW_SUMS = {
    "base": (885.641742, 881.243717, 876.552604),
    "adapted": (885.846687, 884.166753, 878.004582),
}


@pytest.fixture(scope="module")
def harness():
    torch.set_num_threads(2)
    return ttt1855_harness.our_side()


@pytest.mark.parametrize("kind", sorted(PEER_ROW_SUMS))
def test_record1855_adapters_score_as_1855s_forward_ttt(harness, kind):
    _, model, lora, inputs, targets = harness
    losses = ttt1855_harness.our_losses(model, lora, inputs, targets, zero_b=kind == "base")
    assert losses.double().sum(1).tolist() == pytest.approx(PEER_ROW_SUMS[kind], abs=1e-4)


def test_record1855_adapters_are_per_virtual_layer_with_1855s_shapes(harness):
    h, model, lora, inputs, targets = harness
    slots = len(model.layer_order(True))
    assert slots == 10  # 0,1,2,3,2,3,2,3,4,5 at the parity shape
    per_document = sum(p[0].numel() for p in lora.parameters())
    assert per_document == 1_587_200  # #1855's count at this shape (ours' own placement: 1,402,880)
    shapes = {key: (lora.b[i].shape[1], lora.a[i].shape[2]) for key, i in lora.index.items()}
    assert shapes[(9, "q")] == shapes[(9, "o")] == shapes[(9, "mlp")] == (128, 128)
    assert shapes[(9, "k")] == shapes[(9, "v")] == (64, 128) and shapes["head"] == (8192, 128)
    ours = train_gpt.new_adapter(
        model,
        train_gpt.Hyperparameters(
            dict(ttt1855_harness.SHAPE, PRESET="frontier_caseops", TTT_RECIPE="ours", TTT_LORA_PLACEMENT="ours")
        ),
        2,
        torch.Generator(),
    )
    assert sum(p[0].numel() for p in ours.parameters()) == 1_402_880


def test_each_repeat_of_a_looped_block_has_its_own_adapter(harness):
    """Block 2 runs at virtual layers 2, 4 and 6: an o adapter at one of them changes the output alone."""
    _, model, lora, inputs, targets = harness
    outputs = []
    for slot in (2, 4):
        with torch.no_grad():
            saved = [b.clone() for b in lora.b]
            for b in lora.b:
                b.zero_()
            lora.b[lora.index[(slot, "o")]].normal_(generator=torch.Generator().manual_seed(0))
            lora.rows = slice(None)
            outputs.append(model(inputs, targets, "none", adapters=lora))
            for b, value in zip(lora.b, saved):
                b.copy_(value)
    with torch.no_grad():
        base = model(inputs, targets, "none")
    assert not torch.equal(outputs[0], base) and not torch.equal(outputs[1], base)
    assert not torch.allclose(outputs[0], outputs[1])


def test_ttt_mask_and_switches_pick_the_adapters():
    h = train_gpt.Hyperparameters(dict(TTT_MASK="no_qv"))
    assert h.ttt_lora_targets == ("k", "mlp", "o")
    h = train_gpt.Hyperparameters(dict(TTT_MASK="no_qv", TTT_Q_LORA="1", TTT_MLP_LORA="0"))
    assert h.ttt_lora_targets == ("q", "k", "o")
    assert train_gpt.Hyperparameters({}).ttt_lora_targets == train_gpt.LORA_TARGETS


def test_the_recipe_sets_its_switches_below_explicit_variables():
    h = train_gpt.Hyperparameters(dict(PRESET="frontier_caseops"))
    assert (h.ttt_lora_placement, h.ttt_lora_init, h.ttt_lora_order, h.ttt_phase_mode) == ("record1855",) * 4
    assert not h.ngram_tilt  # #1855 has no tilt
    h = train_gpt.Hyperparameters(dict(PRESET="frontier_caseops", TTT_LORA_PLACEMENT="ours", TTT_PHASE_MODE="ours"))
    assert (h.ttt_lora_placement, h.ttt_lora_init, h.ttt_phase_mode) == ("ours", "record1855", "ours")
    assert train_gpt.Hyperparameters(dict(GLOBAL_TTT_LR="0.002")).ttt_phase_lr == 0.002


def validation_tokens(documents: int | None = None, eval_seq_len: int = 256) -> np.ndarray:
    """The committed CaseOps export's validation stream (its first `documents`), truncated as ValidationSet does."""
    tokens = train_gpt.load_data_shard(RECORD_CASEOPS_DATASET / "fineweb_val_000000.bin", 8192)
    if documents is not None:
        tokens = tokens[: int(np.flatnonzero(tokens == train_gpt.BOS_ID)[documents])]
    return tokens[: (len(tokens) - 1) // eval_seq_len * eval_seq_len + 1]


def ascending_index(spans: np.ndarray, batch: np.ndarray) -> int:
    """#1855's orig_batch_idx of a queued batch: its place among the batches cut from the ascending list."""
    ascending = spans[np.argsort(spans[:, 1] - spans[:, 0], kind="stable")]
    return int(np.flatnonzero((ascending == batch[0]).all(1))[0]) // 7


def test_record1855_queue_is_1855s():
    """120 documents in batches of 7: the remainder batch (the single longest document) first, then batches 16,
    15, 14 of the ascending list; rows ascending."""
    spans = train_gpt.document_spans(validation_tokens())
    queue = train_gpt.record1855_queue(spans, 7)
    lengths = spans[:, 1] - spans[:, 0]
    assert len(spans) == 120 and [len(b) for b in queue] == [1] + [7] * 17
    assert queue[0][0, 1] - queue[0][0, 0] == lengths.max()
    assert [ascending_index(spans, b) for b in queue[:4]] == [17, 16, 15, 14]
    assert all(np.all(np.diff(b[:, 1] - b[:, 0]) >= 0) for b in queue)


def phase_streams(tokens: np.ndarray, batch: int, prefix: int, phases: int = 3):
    batches = train_gpt.record1855_queue(train_gpt.document_spans(tokens), batch)
    ends, sizes = train_gpt.record1855_pauses(batches, prefix, phases)
    sets = [train_gpt.record1855_phase_documents(np.concatenate(batches[:end]), size) for end, size in zip(ends, sizes)]
    scored = [sum(map(len, batches[:end])) for end in ends]
    return ends, scored, sets, [train_gpt.phase_stream(tokens, docs) for docs in sets]


def test_record1855_pauses_and_phase_streams_are_1855s():
    """The record's own eval_val_ttt_phased (stub forward): its pauses, cumulative trimmed sets and streams."""
    ends, scored, sets, streams = phase_streams(validation_tokens(20), batch=4, prefix=12)
    assert ends == [1, 2, 3] and scored == [4, 8, 12] and [len(s) for s in sets] == [4, 8, 12]
    assert [len(s) for s in streams] == [11_056, 18_421, 23_187]
    assert [-(-(len(s) - 1) // 4096) - 1 for s in streams] == [2, 4, 5]  # SGD steps: the last chunk is skipped
    joins = [int(((s[:-1] == train_gpt.BOS_ID) & (s[1:] == train_gpt.BOS_ID)).sum()) for s in streams]
    assert joins == [3, 7, 11]  # a BOS -> BOS target at every join
    ends, scored, sets, streams = phase_streams(validation_tokens(), batch=7, prefix=50)
    assert ends == [4, 6, 8] and scored == [22, 36, 50] and [len(s) for s in sets] == [16, 33, 50]
    assert [len(s) for s in streams] == [81_571, 144_031, 204_031]


def test_record1855_phase_lr_is_1855s_cosine():
    """Its log at 131 chunks: c1 0.001000, c3 0.000999, c100 0.000134, c130 0.000000."""
    h = train_gpt.Hyperparameters({})
    logged = [f"{train_gpt.phase_stream_lr(h, chunk, 131):.6f}" for chunk in (0, 2, 99, 129)]
    assert logged == ["0.001000", "0.000999", "0.000134", "0.000000"]


def draws_of(tmp_path, monkeypatch, tokens, **overrides) -> list[tuple[int, int]]:
    """(rows, adapters) of every adapter the trainer draws, with scoring and the phases' SGD stubbed out."""
    from test_legality import setup

    draws = []
    real = train_gpt.new_adapter

    def recording(model, h, rows, generator):
        lora = real(model, h, rows, generator)
        draws.append((rows, len(lora.a)))  # (rows, adapters)
        return lora

    monkeypatch.setattr(train_gpt, "new_adapter", recording)
    monkeypatch.setattr(train_gpt.DocumentLoRATrainer, "chunk_step", lambda *args: None)
    monkeypatch.setattr(train_gpt.DocumentLoRATrainer, "train_stream", lambda *args: None)
    env = dict(TTT_MODE="lora", TTT_RECIPE="record1855", TTT_LORA_RANK=4, TTT_PHASES=3, DOC_ISOLATION=1, **overrides)
    run, model, val = setup(tmp_path, monkeypatch, tokens, **env)
    trainer = train_gpt.DocumentLoRATrainer(model, run, val, time.perf_counter())
    for index, _ in enumerate(trainer.batches):
        trainer.score_batch(index, 0.0)
        if index + 1 in trainer.phase_ends:
            trainer.train_phase(trainer.phase_ends.index(index + 1), 0, index + 1)
    return draws


def test_record1855_redraws_where_1855_does(tmp_path, monkeypatch):
    """A new shared adapter at the start and after every phase, a throw-away one for the remainder batch."""
    tiny = draws_of(
        tmp_path / "a",
        monkeypatch,
        small_vocabulary(validation_tokens(20)),
        TTT_LORA_BATCH=4,
        PHASED_TTT_PREFIX_DOCS=12,
    )
    assert [rows for rows, _ in tiny] == [4, 4, 4, 4]
    export = draws_of(
        tmp_path / "b", monkeypatch, small_vocabulary(validation_tokens()), TTT_LORA_BATCH=7, PHASED_TTT_PREFIX_DOCS=50
    )
    assert [rows for rows, _ in export] == [7, 1, 7, 7, 7]


def small_vocabulary(tokens: np.ndarray) -> np.ndarray:
    """The tiny model's 1,024 tokens, BOS kept where it is and nowhere else."""
    return np.where(tokens == train_gpt.BOS_ID, train_gpt.BOS_ID, 2 + tokens % 1022).astype(tokens.dtype)


def test_the_phase_sgd_cuts_attention_at_eval_seq_len_whatever_the_loader():
    """#1855's packed slices are cut at every BOS and every EVAL_SEQ_LEN from each segment's start: a call's
    segment_len does it on a model whose own segments are uncapped (LOADER=stream)."""
    from conftest import tiny_hyperparameters

    torch.manual_seed(0)
    model = train_gpt.GPT(tiny_hyperparameters(DOC_ISOLATION=1)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    assert model.segment_len == 0
    ids = torch.randint(2, 1024, (1, 40), generator=torch.Generator().manual_seed(1))
    ids[0, 0] = train_gpt.BOS_ID
    with torch.no_grad():
        whole = model(ids[:, :-1], ids[:, 1:], "none")
        capped = model(ids[:, :-1], ids[:, 1:], "none", segment_len=16)
    assert torch.equal(whole[:, :16], capped[:, :16]) and not torch.allclose(whole[:, 16:], capped[:, 16:])


def test_record1855_phases_need_document_isolation():
    with pytest.raises(train_gpt.InputError, match="DOC_ISOLATION=1"):
        train_gpt.Hyperparameters(dict(TTT_MODE="lora", TTT_RECIPE="record1855", DOC_ISOLATION="0"))
    train_gpt.Hyperparameters(dict(TTT_MODE="lora", TTT_RECIPE="record1855", DOC_ISOLATION="0", TTT_PHASES="0"))
