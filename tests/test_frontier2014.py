"""PRESET=frontier_2014's parts (#2014, docs/CONFIG.md): the progressive training context, AWQ-lite, the short-document
TTT chunks, TTT_LOCAL_LR_MULT, the tail of the validation set and the records' eval clock. Golden numbers come from
#2014's own functions (patched to run on the CPU, run beside, never copied in) on the inputs built here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import train_gpt
from conftest import tiny_hyperparameters


def hyperparameters(**values) -> train_gpt.Hyperparameters:
    return train_gpt.Hyperparameters({k: str(v) for k, v in values.items()})


# ---- TRAIN_SEQ_SCHEDULE -------------------------------------------------------------------------------------------


def test_schedule_parses_as_2014s_parser():
    assert train_gpt.parse_train_seq_schedule("1024@0.100,2048@0.700,3072@1.000") == (
        (0.1, 1024),
        (0.7, 2048),
        (1.0, 3072),
    )
    # sorted by fraction; a last stage short of 1.0 holds to the end; empty: no schedule
    assert train_gpt.parse_train_seq_schedule(" 2048@0.7, 1024@0.1 ") == ((0.1, 1024), (0.7, 2048), (1.0, 2048))
    assert train_gpt.parse_train_seq_schedule("") == ()


@pytest.mark.parametrize("raw", ["1024", "1024@x", "0@0.5", "1024@0", "1024@1.5"])
def test_a_bad_schedule_names_the_variable(raw):
    with pytest.raises(train_gpt.InputError, match="TRAIN_SEQ_SCHEDULE"):
        train_gpt.parse_train_seq_schedule(raw)


def test_the_stage_at_each_progress_is_2014s():
    """#2014's current_train_seq_len: the first stage whose fraction is >= the progress."""
    h = hyperparameters(PRESET="frontier_2014")
    grid = [0.0, 0.0999, 0.1, 0.1001, 0.7, 0.7001, 1.0]
    assert [train_gpt.train_seq_len_at(h, p) for p in grid] == [1024, 1024, 1024, 2048, 2048, 3072, 3072]
    assert train_gpt.train_seq_len_at(hyperparameters(TRAIN_SEQ_LEN=512), 0.5) == 512


def test_schedule_progress_by_wallclock_and_by_step():
    h = hyperparameters(PRESET="frontier_2014", MAX_WALLCLOCK_SECONDS=600, ITERATIONS=1000)
    # wallclock: elapsed / (cap - GPTQ_RESERVE_SECONDS 4), clamped to 1
    assert train_gpt.schedule_progress(h, 10, 59_600.0) == pytest.approx(0.1)
    assert train_gpt.schedule_progress(h, 10, 700_000.0) == 1.0
    stepped = hyperparameters(
        PRESET="frontier_2014", MAX_WALLCLOCK_SECONDS=600, ITERATIONS=1000, **{"TRAIN_SEQ_SCHEDULE_MODE": "step"}
    )
    assert train_gpt.schedule_progress(stepped, 150, 59_600.0) == pytest.approx(0.15)


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(TRAIN_SEQ_LEN=2048, TRAIN_SEQ_SCHEDULE="1024@0.5,3072@1.0"), "longest stage"),
        (dict(TRAIN_SEQ_LEN=3072, TRAIN_SEQ_SCHEDULE="1000@0.5,3072@1.0"), r"stages \[1000\] do not divide"),
        (dict(TTT_SHORT_SCORE_FIRST_ENABLED=1), "TTT_SHORT_SCORE_FIRST_STEPS"),
        (dict(TTT_SHORT_SCORE_FIRST_STEPS="256-8"), "TTT_SHORT_SCORE_FIRST_STEPS"),
    ],
)
def test_schedules_that_cannot_run_are_refused(values, message):
    with pytest.raises(train_gpt.InputError, match=message):
        hyperparameters(**values)


def test_a_stage_change_rewarms_the_lr_as_2014():
    """LR x (k + 1) / SEQ_CHANGE_WARMUP_STEPS on the k-th step from the change (not at step 0), then 1."""
    h = tiny_hyperparameters(TRAIN_SEQ_SCHEDULE="32@0.25,64@1.0", TRAIN_SEQ_SCHEDULE_MODE="step", ITERATIONS=8)
    h.seq_change_warmup_steps = 4
    trainer = train_gpt.Trainer(h, train_gpt.RunContext(h), train_gpt.GPT(h))
    trainer.run.log = lambda message, console=True: None
    assert trainer.seq_len == 32
    factors = []
    for step in range(8):
        trainer.update_seq_len(step, 0.0)
        factors.append(trainer.rewarm_factor(step))
    assert trainer.seq_len == 64
    assert factors == [1.0, 1.0, 1.0, 0.25, 0.5, 0.75, 1.0, 1.0]  # the change is at step 3 (progress 0.375)


@pytest.mark.parametrize("skip_stale", [False, True])
def test_a_stage_change_skips_the_prefetched_batches_only_as_asked(tmp_path, skip_stale):
    """SEQ_CHANGE_SKIP_PREFETCHED: #2014's loader clears its two batches built ahead at a change, whose tokens its
    cursor has passed: the batch after a change starts 3 blocks (of 64 + 1 tokens) on, not 1. Without it the loader
    rewinds to the first unused batch."""
    tokens = np.arange(2, 4002, dtype=np.uint16)  # each value once: a batch's place is its second token's
    tokens[::37] = train_gpt.BOS_ID
    header = np.zeros(256, dtype=np.int32)
    header[:3] = (train_gpt.SHARD_MAGIC, train_gpt.SHARD_VERSION, len(tokens))
    path = tmp_path / "fineweb_train_000000.bin"
    path.write_bytes(header.tobytes() + tokens.tobytes())
    source = train_gpt.PackedDocumentBlocks([str(path)], 8192, rank=0, world_size=1)
    loader = train_gpt.TrainingLoader(source, torch.device("cpu"), prefetch=2, packed=True, skip_stale=skip_stale)

    def place(batch) -> int:
        return int(np.flatnonzero(tokens == int(batch[0][0, 1]))[0]) - 1

    assert place(loader.next_batch(64, 32)) == 0
    assert place(loader.next_batch(64, 64)) == (3 if skip_stale else 1) * 65


# ---- AWQ-lite -----------------------------------------------------------------------------------------------------


def awq_inputs():
    torch.manual_seed(0)
    weight = torch.randn(16, 192) * torch.linspace(0.5, 2, 192)
    inputs = torch.randn(400, 192) * torch.linspace(0.2, 3, 192)
    return weight, inputs


def test_awq_gptq_is_2014s_bitwise():
    """#2014's gptq_quantize_weight(W, X^T X, clip_sigmas=12, clip_range=31, protect_groups=[(64, 128)],
    group_size=64, protect_clip_range=127) on these inputs gave q summing to -379 (|q| 12,357), s summing to
    8.060546875 and s_hi to 1.96722412109375; ours gives the same tensors bitwise (compared directly, beside it)."""
    weight, inputs = awq_inputs()
    h = hyperparameters(QUANT="gptq", QUANT_CLIP_SIGMAS_MLP=12, AWQ_LITE_ENABLED=1)
    name = "blocks.0.mlp.up"
    stored = train_gpt.quantize_tensor(name, weight, "mlp", 6, h, {name: inputs.T @ inputs}, [64])
    q = stored[".q"].long()
    assert (int(q.sum()), int(q.abs().sum())) == (-379, 12357)
    assert float(stored[".scale"].float().sum()) == 8.060546875
    assert float(stored[".awq_scale"].float().sum()) == 1.96722412109375
    assert stored[".awq_start"].tolist() == [64] and int(stored[".awq_size"]) == 64
    assert q[:, 64:128].abs().max() > 31 and q[:, :64].abs().max() <= 31  # the group on the int8 grid
    plain = train_gpt.quantize_tensor(name, weight, "mlp", 6, h, {name: inputs.T @ inputs})
    assert set(plain) == {".q", ".scale"}


def test_awq_scores_are_2014s_and_chosen_over_the_whole_model():
    """#2014's _awq_lite_group_candidates on these inputs: 27.8286, 102.3721, 221.7650 for the three 64-column
    groups; the choice is global (top-K over every matrix), each matrix's act_rms from its own calibration rows."""
    weight, inputs = awq_inputs()
    grams = train_gpt.InputGrams()
    grams.add("head", inputs)  # the tied embedding's input: the final norm's output, as #1908's tok_emb hook
    rms = train_gpt.activation_rms(grams, "token_embedding.weight", 192)
    assert torch.allclose(rms, (inputs.square().sum(0) / 400).sqrt())
    grams.add("head", inputs)  # a second call (a looped block): rows count twice, the RMS is unchanged
    assert grams.rows["head"] == 800
    assert torch.allclose(train_gpt.activation_rms(grams, "token_embedding.weight", 192), rms)
    saliency = rms * weight.abs().mean(0)
    assert saliency.view(3, 64).sum(1).tolist() == pytest.approx([27.82857, 102.37206, 221.76495], rel=1e-6)
    big = torch.randn(1024, 192)  # over 65,536 entries: a candidate (the 16 x 192 matrix above is not)
    h = hyperparameters(QUANT="gptq", AWQ_LITE_ENABLED=1, AWQ_LITE_GROUP_TOP_K=2, QUANT_BITS_EMBED=7)
    big[:, 128:] *= 5
    state = {"token_embedding.weight": big, "blocks.0.mlp.up": weight}
    assert train_gpt.awq_lite_groups(state, h, grams) == {"token_embedding.weight": [128, 64]}
    assert train_gpt.awq_lite_groups(state, hyperparameters(QUANT="gptq"), grams) == {}
    eight_bits = hyperparameters(QUANT="gptq", AWQ_LITE_ENABLED=1, QUANT_BITS_EMBED=8)
    assert train_gpt.awq_lite_groups(state, eight_bits, grams) == {}  # nothing below AWQ_LITE_BITS


def test_awq_artifact_round_trips(tmp_path):
    weight = torch.randn(600, 128)
    state = {"token_embedding.weight": weight}
    h = hyperparameters(QUANT="gptq", AWQ_LITE_ENABLED=1, QUANT_BITS_EMBED=7, QUANT_CLIP_SIGMAS_EMBED=14)
    tensors, schemes = train_gpt.quantize_state(state, h)
    assert schemes == {"token_embedding.weight": "int7+awq"}
    path = tmp_path / "artifact.ptz"
    path.write_bytes(train_gpt.encode_artifact(tensors, schemes, h))
    restored = train_gpt.read_artifact(str(path))["token_embedding.weight"]
    start = int(tensors["token_embedding.weight.awq_start"][0])
    fine = tensors["token_embedding.weight.awq_scale"].float()[:, None]
    coarse = tensors["token_embedding.weight.scale"].float()[:, None]
    q = tensors["token_embedding.weight.q"].float()
    assert torch.equal(restored[:, start : start + 64], q[:, start : start + 64] * fine)
    assert torch.equal(restored[:, :start], q[:, :start] * coarse)
    error = (restored - weight).square()
    assert error[:, start : start + 64].mean() < error[:, :start].mean() / 4  # 127 levels instead of 63


def test_the_size_planner_counts_the_awq_group():
    """DRY_RUN's plan quantizes the stand-in weights as configured: the int8 group and its per-row scales cost
    bytes (the 1,024 x 128 embedding is the one candidate over 65,536 entries)."""
    shape = dict(MODEL_DIM=128, QUANT="gptq", QUANT_BITS_EMBED=7, QUANT_CLIP_SIGMAS_EMBED=14, COMPRESSOR="brotli")
    plain = train_gpt.plan_artifact(tiny_hyperparameters(**shape))
    with_group = train_gpt.plan_artifact(tiny_hyperparameters(AWQ_LITE_ENABLED=1, **shape))
    assert with_group > plain


@pytest.mark.parametrize(
    "values, message",
    [(dict(AWQ_LITE_ENABLED=1), "QUANT=gptq"), (dict(AWQ_LITE_ENABLED=1, QUANT="gptq", MIXED_PRECISION=1), "MIXED")],
)
def test_awq_settings_that_cannot_work_are_refused(values, message):
    with pytest.raises(train_gpt.InputError, match=message):
        hyperparameters(**values)


def test_sd_clip_is_the_records_sample_std():
    weight = torch.randn(8, 64)
    assert torch.equal(
        train_gpt.sd_clip_scale(weight, 12.0, 31), (12.0 * weight.std(dim=1) / 31).clamp_min(1e-8).half().float()
    )


# ---- TTT ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("targets, chunk", [(3, 8), (255, 8), (256, 24), (1999, 24), (2000, 48)])
def test_short_documents_score_in_smaller_chunks(targets, chunk):
    """#2014's _score_first_chunk_for_doc on the batch's longest doc_len (targets + 1): <= 256 -> 8, <= 2000 -> 24,
    else TTT_CHUNK_SIZE 48."""
    docs = np.array([[0, 3], [10, 10 + targets]])
    assert train_gpt.lora_chunk(hyperparameters(PRESET="frontier_2014"), docs) == chunk
    assert train_gpt.lora_chunk(hyperparameters(PRESET="frontier_caseops"), docs) == 48


def test_local_lr_mult_scales_only_the_adapters_lr():
    h = tiny_hyperparameters(
        PRESET="frontier_2014",
        NUM_LOOPS=0,
        PARALLEL_START_LAYER=2,
        XSA_LAST_N=4,
        VOCAB_SIZE=64,
        TRAIN_SEQ_SCHEDULE="64@1",
    )
    assert h.ttt_lora_targets == ("k", "mlp", "o")  # no_qv: K, O, MLP and the head
    model = train_gpt.GPT(h)
    lora = train_gpt.new_adapter(model, h, 2, torch.Generator().manual_seed(0))
    assert train_gpt.adapter_optimizer(lora, h).param_groups[0]["lr"] == pytest.approx(7.5e-5)
    assert h.ttt_phase_lr == 0.001


def test_the_tail_is_scored_only_when_asked():
    from conftest import SAMPLE_DATASET, SAMPLE_TOKENIZER

    common = dict(DATA_PATH=SAMPLE_DATASET, TOKENIZER_PATH=SAMPLE_TOKENIZER, EVAL_SEQ_LEN=1024)
    processor = train_gpt.load_tokenizer(str(SAMPLE_TOKENIZER), 1024)
    cut = train_gpt.ValidationSet(hyperparameters(**common), processor)
    whole = train_gpt.ValidationSet(hyperparameters(EVAL_INCLUDE_TAIL=1, **common), processor)
    files = train_gpt.shard_files(str(SAMPLE_DATASET), "val")
    stream = np.concatenate([train_gpt.load_data_shard(f, 1024) for f in files])
    assert len(whole.tokens) == len(stream) and len(whole.target_bytes) == len(stream) - 1
    assert (len(cut.tokens) - 1) % 1024 == 0 and len(cut.tokens) < len(stream)
    plan = train_gpt.SlidingWindows(len(whole.tokens) - 1, 1024, 1024)
    covered = np.zeros(len(whole.tokens) - 1, int)
    for lo, hi in zip(plan.score_lo, plan.score_hi):
        covered[lo:hi] += 1
    assert (covered == 1).all()  # every target of the tail scored once


# ---- The eval clock -----------------------------------------------------------------------------------------------


class FakeRun:
    def __init__(self, clock: str):
        self.h = hyperparameters(EVAL_CLOCK=clock)
        self.lines = []

    def sync(self):
        pass

    def log(self, message, console=True):
        self.lines.append(message)


def test_the_records_clock_starts_at_the_scored_pass():
    run = FakeRun("records")
    clock = train_gpt.EvalClock(run)
    first = clock.started
    clock.start_if(False, "not yet")
    assert clock.started == first and not run.lines
    clock.start_if(True, "the TTT pass")
    assert clock.started > first and clock.off_clock > 0 and "off the clock" in run.lines[0]
    started = clock.started
    clock.start_if(True, "again")
    assert clock.started == started  # once
    strict = train_gpt.EvalClock(FakeRun("artifact"))
    kept = strict.started
    strict.start_if(True, "the TTT pass")
    assert strict.started == kept and strict.off_clock == 0.0
