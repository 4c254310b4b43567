"""Muon, the LR and momentum schedules, and the EMA/SWA arithmetic."""

from __future__ import annotations

import math

import pytest
import torch

import train_gpt
from conftest import tiny_hyperparameters


@pytest.mark.parametrize("shape", [(3, 64, 64), (2, 96, 32), (2, 32, 96)])
def test_newton_schulz_is_nearly_orthogonal(shape):
    """Singular values spanning 100x (condition 100) all land in the quintic's band of roughly [0.7, 1.2]."""
    generator = torch.Generator().manual_seed(0)
    batch, rows, cols = shape
    u, _ = torch.linalg.qr(torch.randn(batch, rows, min(rows, cols), generator=generator))
    v, _ = torch.linalg.qr(torch.randn(batch, cols, min(rows, cols), generator=generator))
    spectrum = torch.logspace(-1, 1, min(rows, cols))
    update = u @ torch.diag_embed(spectrum.expand(batch, -1)) @ v.mT
    out = train_gpt.newton_schulz_orthogonalize(update, steps=5)
    singular = torch.linalg.svdvals(out)
    assert singular.min() > 0.6 and singular.max() < 1.25
    u, _, vh = torch.linalg.svd(update, full_matrices=False)
    polar = u @ vh
    cosine = (out * polar).sum(dim=(-2, -1)) / (out.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
    assert torch.all(cosine > 0.97)


def test_bank_muon_update_formula():
    bank = torch.nn.Parameter(torch.randn(2, 12, 4))
    start = bank.detach().clone()
    grads = [torch.randn(2, 12, 4) for _ in range(2)]
    muon = train_gpt.BankMuon([bank], lr=0.1, momentum=0.9, backend_steps=5, weight_decay=0.5, comm_dtype=torch.float32)
    expected, buffer = start.clone(), torch.zeros_like(start)
    for grad in grads:
        bank.grad = grad.clone()
        muon.step()
        buffer = 0.9 * buffer + grad
        update = train_gpt.newton_schulz_orthogonalize(grad + 0.9 * buffer, 5)
        expected = expected * (1 - 0.1 * 0.5) - 0.1 * math.sqrt(12 / 4) * update
    assert torch.allclose(bank.detach(), expected, atol=1e-5)


def test_optimizer_partition_covers_every_parameter_once():
    h = tiny_hyperparameters()
    model = train_gpt.GPT(h)
    token_adam, muon, scalar_adam = train_gpt.build_optimizers(model, h, torch.float32, fused=False)
    groups = [
        token_adam.param_groups[0]["params"],
        muon.param_groups[0]["params"],
        scalar_adam.param_groups[0]["params"],
    ]
    ids = [id(p) for group in groups for p in group]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert {id(p) for p in groups[1]} == {id(p) for p in model.banks()}
    assert {id(p) for p in groups[0]} == {
        id(model.token_embedding.weight),
        id(model.bigram_hash.embed.weight),
        id(model.value_embedding.embed.weight),
    }
    assert token_adam.param_groups[0]["lr"] == h.tied_embed_lr and scalar_adam.param_groups[0]["lr"] == h.scalar_lr


def test_lr_multiplier_by_iterations():
    h = tiny_hyperparameters(ITERATIONS=100, WARMDOWN_ITERS=20, MAX_WALLCLOCK_SECONDS=0)
    assert train_gpt.lr_multiplier(h, 0, 0) == 1.0 and train_gpt.lr_multiplier(h, 80, 0) == 1.0
    assert train_gpt.lr_multiplier(h, 90, 0) == pytest.approx(0.5)
    assert train_gpt.lr_multiplier(h, 100, 0) == 0.0


def test_lr_multiplier_by_wallclock():
    """#549: warmdown = WARMDOWN_ITERS x measured step time before the cap, linear to 0."""
    h = tiny_hyperparameters(ITERATIONS=100000, WARMDOWN_ITERS=100, MAX_WALLCLOCK_SECONDS=10)
    # 50 steps in 5 s -> 100 ms/step -> warmdown 10 s: the whole run is warmdown; at 5 s, half remains.
    assert train_gpt.lr_multiplier(h, 50, 5000.0) == pytest.approx(0.5)
    h = tiny_hyperparameters(ITERATIONS=100000, WARMDOWN_ITERS=10, MAX_WALLCLOCK_SECONDS=10)
    assert train_gpt.lr_multiplier(h, 50, 5000.0) == 1.0  # warmdown is the last 1 s
    assert train_gpt.lr_multiplier(h, 95, 9500.0) == pytest.approx(0.5)
    assert train_gpt.lr_multiplier(h, 101, 10100.0) == 0.0


def test_muon_momentum_warmup():
    h = tiny_hyperparameters(MUON_MOMENTUM_WARMUP_STEPS=1500)
    assert train_gpt.muon_momentum_at(h, 0) == pytest.approx(0.92)
    assert train_gpt.muon_momentum_at(h, 750) == pytest.approx(0.955)
    assert train_gpt.muon_momentum_at(h, 5000) == pytest.approx(0.99)


def test_ema_arithmetic():
    model = torch.nn.Linear(3, 2, bias=False)
    torch.nn.init.constant_(model.weight, 1.0)
    ema = train_gpt.ExponentialMovingAverage(model, decay=0.9)
    for value in (2.0, 4.0):
        torch.nn.init.constant_(model.weight, value)
        ema.update()
    expected = (0.9 * 1.0 + 0.1 * 2.0) * 0.9 + 0.1 * 4.0
    ema.copy_to(model)
    assert torch.allclose(model.weight, torch.full((2, 3), expected))


def test_swa_is_the_uniform_mean():
    model = torch.nn.Linear(3, 2, bias=False)
    swa = train_gpt.SnapshotAverage(model)
    for value in (1.0, 2.0, 6.0):
        torch.nn.init.constant_(model.weight, value)
        swa.add()
    swa.copy_to(model)
    assert swa.count == 3 and torch.allclose(model.weight, torch.full((2, 3), 3.0))


def test_gptq_reserve_comes_out_of_the_training_clock():
    h = tiny_hyperparameters(
        QUANT="gptq", MAX_WALLCLOCK_SECONDS=600, GPTQ_RESERVE_SECONDS=8, ITERATIONS=100000, WARMDOWN_ITERS=100
    )
    assert h.training_seconds == 592
    assert train_gpt.lr_multiplier(h, 1000, 592_000.0) == 0.0  # the warmdown ends where calibration starts
    assert tiny_hyperparameters(QUANT="gptq_lite", MAX_WALLCLOCK_SECONDS=600).training_seconds == 600
    assert tiny_hyperparameters(QUANT="gptq", MAX_WALLCLOCK_SECONDS=0).training_seconds == 0


def clipped_step(tmp_path, monkeypatch, dataset, **overrides):
    """Two Trainer steps of a tiny model on the sample data; returns its parameters afterwards."""
    from conftest import TINY_ENV

    monkeypatch.chdir(tmp_path)
    env = dict(TINY_ENV, DATA_PATH=dataset, TOKENIZER_PATH="unused", RUN_ID="clip")
    env.update({k: str(v) for k, v in overrides.items()})
    h = train_gpt.Hyperparameters(env)
    run = train_gpt.RunContext(h)
    model = train_gpt.build_model(h, run)
    trainer = train_gpt.Trainer(h, run, model)
    loader = trainer.new_loader()
    for step in range(2):  # Muon and Adam are scale-invariant in their first step: the second shows the clip
        trainer.step(loader, step, 1.0)
    return [p.detach().clone() for p in model.parameters()]


def test_local_clip_scope_is_the_global_one_on_a_single_process(tmp_path, monkeypatch, sample_data):
    """GRAD_CLIP_SCOPE=local (#549: each rank clips before averaging) equals the global clip with one rank;
    with a clip that binds, both differ from no clip at all."""
    global_scope = clipped_step(tmp_path, monkeypatch, sample_data[0], GRAD_CLIP_NORM=0.01)
    local_scope = clipped_step(tmp_path, monkeypatch, sample_data[0], GRAD_CLIP_NORM=0.01, GRAD_CLIP_SCOPE="local")
    unclipped = clipped_step(tmp_path, monkeypatch, sample_data[0], GRAD_CLIP_NORM=0)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(global_scope, local_scope))
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(global_scope, unclipped))
