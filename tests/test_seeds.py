"""The seeds' techniques (#1089, #518, #181) and the record presets: formulas checked against direct computations,
settings checked against the records' own values (their scored runs' logs and code)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import train_gpt
from conftest import tiny_hyperparameters

# ---------------------------------------------------------------------------------------------------- presets

# The scored #1089 run (commit 8c44a2e: its code and logs), as attribute -> value.
PR1089_SCORED = {
    "mlp_mult": 3.5,
    "mlp_negative_slope": 0.3,
    "xsa_last_n": 11,
    "qk_gain_init": 1.5,
    "warmdown_iters": 3500,
    "lr_floor": 0.05,
    "embed_beta1": 0.7,
    "muon_ns": "turbo",
    "muon_backend_steps": 4,
    "muon_post_norm": "row_col",
    "muon_decay_after_update": True,
    "small_matrix_optimizer": "muon",
    "bigram_vocab_size": 0,
    "engram_buckets": 8192,
    "engram_heads": 2,
    "engram_orders": 2,
    "engram_dim_per_head": 32,
    "skip_gates_enabled": True,
    "mimetic_vo_init": 0.05,
    "swa_enabled": True,
    "swa_every": 50,
    "swa_threshold": 0.2,
    "swa_min_snapshots": 2,
    "ema_decay": 0.997,
    "late_qat_threshold": 0.15,
    "soft_round_qat": True,
    "soft_round_alpha_max": 16.0,
    "quant": "gptq",
    "quant_bits_mlp": 5,
    "quant_bits_attn": 5,
    "gptq_calib_batches": 64,
    "gptq_reserve_seconds": 14.0,
    "compressor": "brotli",
    "byte_shuffle": True,
    "size_fit": True,
    "ttt_enabled": False,
    "grad_clip_scope": "local",
    "matrix_lr": 0.025,
    "scalar_lr": 0.025,
    "tied_embed_lr": 0.035,
    "muon_wd": 0.04,
    "adam_wd": 0.04,
    "grad_clip_norm": 0.3,
    "train_batch_tokens": 786_432,
    "train_seq_len": 2048,
    "num_layers": 11,
    "model_dim": 512,
    "num_heads": 8,
    "num_kv_heads": 4,
    "ve_layers": [9, 10],
    "ve_dim": 128,
}
# #181's 1.1190 run (its PR page): #549 with 2048 bigram buckets and TTT freezing 2 blocks.
PR181_RUN = {"bigram_vocab_size": 2048, "ttt_freeze_blocks": 2, "ttt_enabled": True, "ttt_lr": 0.002, "ttt_epochs": 3}
# #518: BigramHash 2048, zstd, TTT AdamW lr 5e-4, mlp.fc x0.5, mlp.proj x3, clip 1; score-first here.
PR518_LEGAL = {
    "bigram_vocab_size": 2048,
    "compressor": "zstd",
    "ttt_optimizer": "adamw",
    "ttt_lr": 0.0005,
    "ttt_lr_mults": [1.0, 1.0, 0.5, 3.0],
    "ttt_grad_clip": 1.0,
    "ttt_enabled": True,
    "mlp_negative_slope": 0.5,
    "xsa_last_n": 4,
}


@pytest.mark.parametrize(
    "preset, expected", [("pr1089", PR1089_SCORED), ("pr181", PR181_RUN), ("pr518_legal", PR518_LEGAL)]
)
def test_presets_reproduce_the_records_settings(preset, expected):
    h = train_gpt.Hyperparameters({"PRESET": preset})
    assert {k: getattr(h, k) for k in expected} == expected
    assert h.preset == preset


def test_record549_is_the_default_and_every_preset_variable_exists():
    assert train_gpt.Hyperparameters({}).preset == "record549" and train_gpt.PRESETS["record549"] == {}
    names = set(train_gpt.Hyperparameters({}).env_names)
    for preset, values in train_gpt.PRESETS.items():
        assert set(values) <= names, preset


def test_pr1089_has_the_records_parameter_count():
    model = train_gpt.GPT(train_gpt.Hyperparameters({"PRESET": "pr1089"}))
    assert sum(p.numel() for p in model.parameters()) == 30_666_843  # #1089's logged model_params


def test_explicit_variables_override_the_preset_and_the_log_says_where_values_came_from():
    h = train_gpt.Hyperparameters({"PRESET": "pr1089", "QUANT_BITS_MLP": "6", "SWA_ENABLED": "0"})
    assert (h.quant_bits_mlp, h.swa_enabled, h.quant_bits_attn) == (6, False, 5)
    assert "QUANT_BITS_MLP" not in h.preset_values and h.preset_values["QUANT_BITS_ATTN"] == "5"


def test_record_spellings_are_accepted_and_conflicts_named():
    h = train_gpt.Hyperparameters(
        {
            "GPTQ_RESERVE_MS": "14000",
            "MATRIX_BITS": "5",
            "QAT_THRESHOLD": "0.2",
            "MIN_LR": "0.1",
            "NGRAM_BUCKETS": "4096",
        }
    )
    assert (h.gptq_reserve_seconds, h.quant_bits_mlp, h.quant_bits_attn) == (14.0, 5, 5)
    assert (h.late_qat_threshold, h.lr_floor, h.engram_buckets) == (0.2, 0.1, 4096)
    assert "GPTQ_RESERVE_MS" in h.record_spellings
    with pytest.raises(train_gpt.InputError, match="QAT_THRESHOLD=0.1 and LATE_QAT_THRESHOLD=0.15 disagree"):
        train_gpt.Hyperparameters({"QAT_THRESHOLD": "0.1", "LATE_QAT_THRESHOLD": "0.15"})


def test_ignored_record_variables_warn_and_illegal_ones_are_refused():
    h = train_gpt.Hyperparameters({"TTT_POLYAK": "1", "GPTQ_DAMP": "0.02"})
    assert h.ignored_record_variables == ["GPTQ_DAMP", "TTT_POLYAK"]
    with pytest.raises(train_gpt.InputError, match="NGRAM_ENABLED=1: #181's two-pass n-gram re-score"):
        train_gpt.Hyperparameters({"NGRAM_ENABLED": "1"})
    train_gpt.Hyperparameters({"NGRAM_ENABLED": "0"})  # #181's own run had it off: fine


# ---------------------------------------------------------------------------------------------------- EngramLite


def engram_rows_by_hand(ids: list[int], t: int, buckets: int) -> list[int]:
    cur, prev, pp = ids[t], ids[t - 1] if t >= 1 else 0, ids[t - 2] if t >= 2 else 0
    hashes = [
        prev * 1009 + cur,
        (prev * 2719 + 314159) ^ (cur * 3137),
        (pp * 36313) ^ (prev * 27191) ^ (cur * 4903),
        (pp * 7919) ^ (prev * 4391) ^ (cur * 6151),
    ]
    return [value % buckets + i * buckets for i, value in enumerate(hashes)]


def test_engram_hashes_match_the_record_formulas():
    engram = train_gpt.EngramLite(buckets=8192, heads=2, orders=2, dim_per_head=32, model_dim=64)
    ids = [5, 1000, 17, 1023, 0, 311]
    rows = engram.bucket_ids(torch.tensor([ids]))
    assert rows.shape == (1, 6, 4)
    for t in range(len(ids)):
        assert rows[0, t].tolist() == engram_rows_by_hand(ids, t, 8192)
    bigram_only = train_gpt.EngramLite(buckets=8192, heads=1, orders=1, dim_per_head=32, model_dim=64)
    assert bigram_only.bucket_ids(torch.tensor([ids]))[0, :, 0].tolist() == [
        engram_rows_by_hand(ids, t, 8192)[0] for t in range(6)
    ]


def test_engram_starts_silent_and_is_routed_like_the_record():
    h = tiny_hyperparameters(ENGRAM_BUCKETS=1024, BIGRAM_VOCAB_SIZE=0, SMALL_MATRIX_OPTIMIZER="muon", EMBED_BETA1=0.7)
    model = train_gpt.GPT(h)
    engram = model.engram
    assert engram.embed.weight.shape == (4 * 1024, 32) and engram.proj.weight.shape == (64, 128)
    assert engram.embed.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert not engram.proj.weight.any() and not engram.gate.any()  # zero projection: no contribution at init
    assert not engram(torch.randint(0, 1024, (2, 8))).any()
    token_adam, muon, scalar_adam, small_muon = train_gpt.build_optimizers(model, h, torch.float32, fused=False)
    owner = lambda p: next(
        o
        for o in (token_adam, muon, scalar_adam, small_muon)  # noqa: E731
        if any(p is q for g in o.param_groups for q in g["params"])
    )
    assert owner(engram.embed.weight) is token_adam and token_adam.param_groups[0]["betas"] == (0.7, 0.95)
    assert owner(engram.proj.weight) is small_muon and owner(engram.gate) is scalar_adam
    assert scalar_adam.param_groups[0]["betas"] == (0.9, 0.95)
    state = train_gpt.export_state(model)
    assert train_gpt.quantization_group("engram.embed.weight", state["engram.embed.weight"]) == "tables"
    assert train_gpt.quantization_group("engram.proj.weight", state["engram.proj.weight"]) is None  # fp16


# ---------------------------------------------------------------------------------------------------- Turbo-Muon


def test_turbo_muon_uses_the_records_polar_express_table():
    table = train_gpt.POLAR_EXPRESS_1089
    assert table[1] == (4.107059111542203, -2.9478499167379106, 0.5448431082926601)
    assert table[4] == (2.300652019954817, -1.6689039845747493, 0.4188073119525673)
    assert table[-1] == (1.875, -1.25, 0.375) and len(table) == 7


def test_turbo_muon_step_by_step_equals_a_direct_computation():
    torch.manual_seed(0)
    x = torch.randn(48, 96, dtype=torch.float64)
    gram = x @ x.T
    s = 1.0 / (gram.abs().sum(dim=1).sqrt() + 1e-7)
    expected = s[:, None] * x
    for k in range(3):
        a, b, c = train_gpt.POLAR_EXPRESS_1089[k + 1]
        g = expected @ expected.T
        expected = a * expected + (b * g + c * g @ g) @ expected
    assert torch.allclose(train_gpt.turbo_orthogonalize(x, 3), expected, atol=1e-10)
    assert torch.allclose(train_gpt.turbo_orthogonalize(x.T, 3), expected.T, atol=1e-10)  # tall: transposed


@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (256, 512)])
def test_turbo_muon_is_nearly_orthogonal(shape):
    torch.manual_seed(1)
    x = torch.randn(*shape)
    assert torch.linalg.matrix_norm(train_gpt.turbo_orthogonalize(x, 0), 2) <= 1.0  # AOL: Gershgorin bound
    four = torch.linalg.svdvals(train_gpt.turbo_orthogonalize(x, 4))
    assert 0.8 < four.min() and four.max() < 1.2  # #1089's 4 steps on a Gaussian matrix
    five = torch.linalg.svdvals(train_gpt.turbo_orthogonalize(x, 5))
    assert 0.99 < five.min() and five.max() < 1.01


def test_post_normalization():
    torch.manual_seed(2)
    u = torch.randn(3, 16, 40)
    row_col = train_gpt.post_normalize(u, "row_col")
    assert torch.allclose(row_col.norm(dim=-2), torch.ones(3, 40), atol=1e-5)  # columns last: unit columns
    assert torch.allclose(train_gpt.post_normalize(u, "row").norm(dim=-1), torch.ones(3, 16), atol=1e-5)
    assert torch.equal(train_gpt.post_normalize(u, "none"), u)
    expected = u / (u.norm(dim=-1, keepdim=True) + 1e-7)
    expected = expected / (expected.norm(dim=-2, keepdim=True) + 1e-7)
    assert torch.allclose(row_col, expected, atol=1e-6)


@pytest.mark.parametrize("decay_after", [False, True])
def test_muon_weight_decay_order(decay_after):
    torch.manual_seed(3)
    bank = torch.nn.Parameter(torch.randn(2, 8, 16))
    start, grad = bank.detach().clone(), torch.randn(2, 8, 16)
    bank.grad = grad.clone()
    lr, wd = 0.1, 0.5
    muon = train_gpt.BankMuon(
        [bank], lr, 0.0, 4, wd, torch.float32, ns="turbo", post_norm="row_col", decay_after_update=decay_after
    )
    muon.step()
    update = train_gpt.post_normalize(train_gpt.turbo_orthogonalize(grad, 4), "row_col")
    if decay_after:  # #1089: p <- p - lr*U, then p <- p*(1 - lr*wd)
        expected = (start - lr * update) * (1 - lr * wd)
    else:  # #549: decay first
        expected = start * (1 - lr * wd) - lr * update
    assert torch.allclose(bank.detach(), expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- model


def test_gated_skips_start_as_an_even_mix():
    plain = train_gpt.GPT(tiny_hyperparameters())
    gated = train_gpt.GPT(tiny_hyperparameters(SKIP_GATES_ENABLED=1))
    x, skip = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    assert plain.skip_gates is None and not gated.skip_gates.any()
    assert torch.allclose(plain.join_skip(x, skip, 0), x + skip)
    assert torch.allclose(gated.join_skip(x, skip, 0), 0.5 * x + 0.5 * skip)
    with torch.no_grad():
        gated.skip_gates[1].fill_(30.0)  # gate ~1: the decoder keeps its own stream
    assert torch.allclose(gated.join_skip(x, skip, 1), x, atol=1e-6)


def test_mimetic_vo_init():
    h = tiny_hyperparameters(MIMETIC_VO_INIT=0.05)
    model = train_gpt.GPT(h)
    layers, group = h.num_layers, h.num_heads // h.num_kv_heads
    for layer in range(layers):
        out, v = model.qo_bank[layers + layer], model.kv_bank[layers + layer]
        for head in range(h.num_heads):
            kv_head = head // group
            rows = slice(head * h.head_dim, (head + 1) * h.head_dim)
            assert torch.equal(out[rows], -0.05 * v[kv_head * h.head_dim : (kv_head + 1) * h.head_dim])
    assert not train_gpt.GPT(tiny_hyperparameters()).qo_bank[layers:].any()  # #549: zero


# ---------------------------------------------------------------------------------------------------- soft-round QAT


def test_soft_round_tends_to_rounding_and_has_a_real_gradient():
    torch.manual_seed(4)
    weight = torch.randn(6, 32)
    hard = train_gpt.fake_quantize_rows(weight, 15)
    sharp = train_gpt.fake_quantize_rows(weight, 15, torch.tensor(1e6))
    assert torch.allclose(sharp, hard, atol=1e-5)  # alpha -> infinity: round on the same int5 grid
    scale = weight.abs().amax(dim=-1, keepdim=True) / 15
    assert (hard / scale).round().abs().max() <= 15
    soft_weight = weight.clone().requires_grad_()
    train_gpt.fake_quantize_rows(soft_weight, 15, torch.tensor(1.0)).sum().backward()
    units = weight / scale
    sig = torch.sigmoid(units - units.floor() - 0.5)
    assert torch.allclose(soft_weight.grad, sig * (1 - sig), atol=1e-5)  # alpha*sig*(1-sig), not the STE's 1


def test_qat_grid_follows_the_export_bits():
    model = train_gpt.GPT(tiny_hyperparameters(QUANT_BITS_MLP=5, QUANT_BITS_ATTN=7))
    assert model.bank_qmax == [63, 63, 15, 15]


def test_soft_round_alpha_ramps_from_1_to_its_maximum():
    h = tiny_hyperparameters(SOFT_ROUND_QAT=1, ITERATIONS=100, LATE_QAT_THRESHOLD=0.5, WARMDOWN_ITERS=40)
    model = train_gpt.GPT(h)
    trainer = SimpleNamespace(h=h, model=model, qat_start=None, run=SimpleNamespace(log=lambda message: None))
    alphas = {}
    for step in range(100):
        train_gpt.Trainer.update_qat(trainer, step, train_gpt.lr_multiplier(h, step, 0.0), 0.0)
        alphas[step] = model.soft_round_alpha.item()
    assert trainer.qat_start == 81  # multiplier 19/40 < 0.5
    assert alphas[80] == 1.0 and alphas[81] == 1.0 and alphas[99] == pytest.approx(1 + 15 * 18 / 19)
    assert all(alphas[s] < alphas[s + 1] for s in range(81, 99))


# ---------------------------------------------------------------------------------------------------- schedule, SWA


def test_lr_floor_and_warmdown_fraction():
    h = tiny_hyperparameters(ITERATIONS=100, WARMDOWN_ITERS=40, LR_FLOOR=0.05)
    assert train_gpt.lr_multiplier(h, 59, 0.0) == 1.0
    assert train_gpt.lr_multiplier(h, 70, 0.0) == pytest.approx(0.75)
    assert train_gpt.lr_multiplier(h, 99, 0.0) == 0.05  # 1/40 is below the floor
    frac = tiny_hyperparameters(ITERATIONS=100, WARMDOWN_FRAC=0.2)
    assert train_gpt.lr_multiplier(frac, 79, 0.0) == 1.0 and train_gpt.lr_multiplier(frac, 90, 0.0) == 0.5
    capped = tiny_hyperparameters(MAX_WALLCLOCK_SECONDS=100, WARMDOWN_FRAC=0.25)
    assert train_gpt.lr_multiplier(capped, 10, 87_500.0) == pytest.approx(0.5)  # 12.5 s of a 25 s warmdown left


def test_swa_needs_its_minimum_of_snapshots():
    h = tiny_hyperparameters(SWA_ENABLED=1, SWA_MIN_SNAPSHOTS=2)
    model = train_gpt.GPT(h)
    ema = train_gpt.ExponentialMovingAverage(model, 0.9)
    swa = train_gpt.SnapshotAverage(model)
    with torch.no_grad():
        model.skip_weights.fill_(3.0)
    swa.add()
    logs = []
    trainer = SimpleNamespace(h=h, model=model, run=SimpleNamespace(log=logs.append))
    train_gpt.Trainer.apply_average(trainer, ema, swa)
    assert torch.equal(model.skip_weights, torch.ones_like(model.skip_weights))  # EMA of the initial weights
    assert "fewer than SWA_MIN_SNAPSHOTS=2" in logs[0]
    with torch.no_grad():
        model.skip_weights.fill_(3.0)
    swa.add()
    train_gpt.Trainer.apply_average(trainer, ema, swa)
    assert torch.equal(model.skip_weights, torch.full_like(model.skip_weights, 3.0))


# ---------------------------------------------------------------------------------------------------- TTT


def test_ttt_optimizer_groups_carry_the_bank_multipliers():
    h = tiny_hyperparameters(TTT_OPTIMIZER="adamw", TTT_LR_MULTS="1,1,0.5,3")
    model = train_gpt.GPT(h)
    optimizer = train_gpt.ttt_optimizer(model, list(model.parameters()), h)
    assert isinstance(optimizer, torch.optim.AdamW)
    groups = optimizer.param_groups
    assert [g["lr_mult"] for g in groups] == [1.0, 1.0, 0.5, 3.0, 1.0]
    assert groups[3]["params"][0] is model.mlp_down_bank and groups[0]["betas"] == (0.9, 0.999)
    assert groups[0]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert math.isclose(sum(p.numel() for g in groups for p in g["params"]), sum(p.numel() for p in model.parameters()))
    with pytest.raises(train_gpt.InputError, match="TTT_LR_MULTS"):
        tiny_hyperparameters(TTT_LR_MULTS="1,2")


# ---------------------------------------------------------------------------------------------------- mixed precision


def mixed_setup(**overrides):
    settings = dict(QUANT="gptq", MIXED_PRECISION=1, QUANT_BITS_MLP=5, QUANT_BITS_ATTN=5, SIZE_FIT_LEVELS=2)
    h = tiny_hyperparameters(**dict(settings, **overrides))
    torch.manual_seed(0)
    model = train_gpt.GPT(h)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    state = train_gpt.export_state(model)
    hessians = {}
    for name, value in state.items():
        if train_gpt.is_bank_matrix(name):  # deeper layers see more input energy: a known sensitivity order
            inputs = torch.randn(256, value.size(1)) * (1 + int(name.split(".")[1]))
            hessians[train_gpt.hessian_name(name)] = inputs.T @ inputs
    return h, state, hessians


def test_mixed_precision_promotes_by_sensitivity_within_the_budget():
    h, state, hessians = mixed_setup()
    ranked = [names for _, names in train_gpt.sensitivity_groups(state, hessians)]
    assert {names[0].rsplit(".", 1)[0] for names in ranked[:2]} == {"blocks.3.mlp", "blocks.3.attn"}
    assert len(ranked) == 2 * h.num_layers
    tensors, schemes = train_gpt.quantize_state(state, h, hessians)
    base = len(train_gpt.encode_artifact(tensors, schemes, h))
    assert train_gpt.allocate_mixed_bits(state, h, hessians, base, lambda message: None) == {}  # nothing spare
    for spare in (3_000, 12_000, 10**9):
        logs = []
        bits = train_gpt.allocate_mixed_bits(state, h, hessians, base + spare, logs.append)
        tensors, schemes = train_gpt.quantize_state(state, h, hessians, bits)
        assert len(train_gpt.encode_artifact(tensors, schemes, h)) <= base + spare  # the real encode fits
        assert logs[0].startswith("mixed_precision: promoted")
    assert {bits[n] for n in ranked[0]} == {7} and all(bits[n] == 6 for names in ranked[1:] for n in names)
    with pytest.raises(train_gpt.InputError, match="MIXED_PRECISION=1 needs QUANT=gptq"):
        tiny_hyperparameters(MIXED_PRECISION=1)


def test_size_fit_prunes_twos_only_when_asked():
    for levels in (1, 2):
        h, state, hessians = mixed_setup(SIZE_FIT_LEVELS=levels, MIXED_PRECISION=0)
        tensors, schemes = train_gpt.quantize_state(state, h, hessians)
        twos = sum(int((tensors[n + ".q"].abs() == 2).sum()) for n, s in schemes.items() if s != "fp16")
        logs = []
        train_gpt.fit_to_budget(tensors, schemes, h, 1, logs.append)  # unreachable budget: prune every candidate
        pruned = int(logs[0].split()[2])
        ones = sum(int((tensors[n + ".q"].abs() == 1).sum()) for n, s in schemes.items() if s != "fp16")
        assert pruned == ones + (twos if levels == 2 else 0)
