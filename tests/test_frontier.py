"""The leaderboard's techniques past the seeds (#1204-#1855) and PRESET=frontier: identity at init, the recurrence
order, the lane algebra, the optimizer formulas against direct computations, LQER's error, the shuffled loader
(#1855's code and the PRs it builds on)."""

from __future__ import annotations

import concurrent.futures

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt
from conftest import TINY_ENV, assert_final_score, read_log, run_script, tiny_hyperparameters


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return train_gpt.GPT(tiny_hyperparameters(**overrides))


def tiny_batch(batch=2, seq=64, vocab=1024, seed=0, bos_every=None):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, vocab, (batch, seq + 1), generator=generator)
    if bos_every:
        tokens[:, ::bos_every] = train_gpt.BOS_ID
    return tokens[:, :-1], tokens[:, 1:]


def loss_of(model, batch):
    with torch.no_grad():
        return model(*batch).item()


# ---------------------------------------------------------------------------------------------------- smear gates


def test_input_smear_gate_is_the_identity_at_init_and_its_formula_after():
    batch = tiny_batch(bos_every=16)
    plain, smeared = tiny_model(), tiny_model(SMEAR_GATE="input")
    smeared.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(2, 64, 64)
    ids = batch[0]
    gate = smeared.smear_gate
    assert torch.equal(gate(x, ids), x)  # lambda = 0
    with torch.no_grad():
        gate.weight.normal_()
        gate.strength.fill_(0.7)
    expected = x.clone()
    for t in range(1, 64):
        g = 0.7 * torch.sigmoid(x[:, t, :12] @ gate.weight)
        expected[:, t] = x[:, t] + g[:, None] * x[:, t - 1]
    assert torch.allclose(gate(x, ids), expected, atol=1e-6)
    gate.bos_mask = True
    masked = gate(x, ids)
    bos = ids == train_gpt.BOS_ID
    assert bos.any() and torch.equal(masked[bos], x[bos]) and torch.allclose(masked[~bos], expected[~bos], atol=1e-6)


def test_bos_mask_stops_the_549_smear_at_document_starts_only():
    ids = tiny_batch(bos_every=8)[0]
    x = torch.randn(2, 64, 64)
    plain, masked = train_gpt.SmearGate(64, False), train_gpt.SmearGate(64, True)
    bos = ids == train_gpt.BOS_ID
    assert torch.equal(masked(x, ids)[bos], x[bos])
    assert torch.equal(masked(x, ids)[~bos], plain(x, ids)[~bos])
    assert not torch.equal(plain(x, ids)[bos][1:], x[bos][1:])  # #549's form smears into a BOS


def test_bos_mask_holds_on_the_scoring_path():
    """Changing only the tokens before a BOS cannot change the predictions made from that BOS on through the
    smear (every forward path runs hidden_states); checked on a one-layer model without attention mixing."""
    model = tiny_model(SMEAR_GATE="input", SMEAR_BOS_MASK=1)
    with torch.no_grad():
        model.smear_gate.strength.fill_(1.0)
    ids = tiny_batch(bos_every=32)[0][:1]
    embedded = model.token_embedding(ids)
    other = ids.clone()
    other[0, 31] = (other[0, 31] + 5) % 1024  # the token right before the BOS at position 32
    before = model.smear_gate(embedded, ids)
    after = model.smear_gate(model.token_embedding(other), other)
    assert torch.equal(before[0, 32], after[0, 32]) and not torch.equal(before[0, 31], after[0, 31])


# ---------------------------------------------------------------------------------------------------- attention gates


@pytest.mark.parametrize("kind, init_value", [("attn_out", 1.0), ("sparse", 0.5)])
def test_zero_initialized_output_gates_scale_the_heads_by_their_init_value(kind, init_value):
    gate = train_gpt.AttentionOutputGate(kind, 64, 4, 0.5)
    x = torch.randn(2, 10, 64)
    assert gate(x).shape == (2, 10, 4, 1) and torch.all(gate(x) == init_value)
    plain, gated = tiny_model(), tiny_model(ATTN_OUT_GATE=kind)
    missing = gated.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert all(k.endswith("output_gate.weight") for k in missing) and len(missing) == 4
    if kind == "attn_out":  # x1: exactly the ungated model
        assert loss_of(gated, tiny_batch()) == loss_of(plain, tiny_batch())


def test_gate_formulas_and_the_dense_gate_draws_last():
    x = torch.randn(3, 5, 64)
    for kind, width in (("attn_out", 12), ("sparse", 12), ("dense", 64)):
        gate = train_gpt.AttentionOutputGate(kind, 64, 4, 0.5)
        with torch.no_grad():
            gate.weight.normal_()
        logits = x[..., :width] @ gate.weight.T
        expected = {
            "attn_out": 2 * torch.sigmoid(logits),
            "sparse": torch.sigmoid(0.5 * logits),
            "dense": torch.sigmoid(logits),
        }[kind]
        assert torch.allclose(gate(x)[..., 0], expected, atol=1e-6)
    plain, dense = tiny_model(), tiny_model(ATTN_OUT_GATE="dense")
    for name, value in plain.state_dict().items():
        assert torch.equal(value, dense.state_dict()[name]), name  # every other draw unchanged
    weight = dense.blocks[0].attn.output_gate.weight
    assert weight.shape == (4, 64) and 0.005 < weight.std().item() < 0.02


# ---------------------------------------------------------------------------------------------------- residual forms


def block_and_inputs(form, seed=1):
    h = tiny_hyperparameters(PARALLEL_RESIDUAL=form, PARALLEL_START_LAYER=0)
    torch.manual_seed(seed)
    model = train_gpt.GPT(h)
    with torch.no_grad():
        for bank in model.banks():
            bank.normal_(std=0.05)
        for p in model.blocks[0].parameters():
            p.add_(0.1 * torch.randn_like(p))
    weights = model.layer_weights(0, model.banks())
    x, x0 = torch.randn(2, 16, 64), torch.randn(2, 16, 64)
    return model.blocks[0], weights, x, x0


def test_gptj_block_adds_both_branches_of_the_same_input():
    block, weights, x, x0 = block_and_inputs("gptj")
    mixed = block.resid_mix[0] * x + block.resid_mix[1] * x0
    attn = block.attention_branch(mixed, weights, None, None, None, None)
    expected = mixed + attn + block.mlp_branch(mixed, weights, None)
    assert torch.allclose(block(x, x0, weights, None), expected, atol=1e-6)


def test_two_lane_block_routes_with_rho_and_pi():
    block, weights, l0, x0 = block_and_inputs("two_lane")
    l1 = torch.randn_like(l0)
    a = block.attention_branch(block.resid_mix[0] * l0 + block.resid_mix[1] * x0, weights, None, None, None, None)
    m = block.mlp_branch(l1, weights, None)
    rho, pi = block.lane_decay, block.lane_routing
    new0, new1 = block((l0, l1), x0, weights, None)
    assert torch.allclose(new0, rho[0] * l0 + pi[0, 0] * a + pi[1, 0] * m, atol=1e-6)
    assert torch.allclose(new1, rho[1] * l1 + pi[0, 1] * a + pi[1, 1] * m, atol=1e-6)


def test_two_lane_init_and_where_it_starts():
    model = tiny_model(PARALLEL_RESIDUAL="two_lane", PARALLEL_START_LAYER=2)
    forms = [b.residual_form for b in model.blocks]
    assert forms == ["none", "none", "two_lane", "two_lane"]
    assert torch.equal(model.blocks[2].lane_decay, torch.full((2,), 1.1))
    assert torch.equal(model.blocks[2].lane_routing, torch.ones(2, 2))
    assert not hasattr(model.blocks[0], "lane_decay")
    loss = model(*tiny_batch())
    loss.backward()
    assert model.blocks[3].lane_decay.grad.abs().sum() > 0  # (pi's is 0 at init: Out and down start at zero)
    with pytest.raises(train_gpt.InputError, match="PARALLEL_START_LAYER"):
        tiny_hyperparameters(PARALLEL_RESIDUAL="gptj", PARALLEL_START_LAYER=4)
    looped = tiny_model(PARALLEL_RESIDUAL="two_lane", PARALLEL_START_LAYER=2, NUM_LOOPS=1, LOOP_START=1, LOOP_END=2)
    assert looped.layer_order() == [0, 1, 2, 1, 2, 3]  # block 1 after a two-lane block 2 gets the lanes' mean
    assert torch.isfinite(looped(*tiny_batch()))


# ---------------------------------------------------------------------------------------------------- depth recurrence


def test_recurrence_order_is_the_records_17_virtual_layers():
    h = train_gpt.Hyperparameters({"PRESET": "frontier"})
    with torch.device("meta"):
        model = train_gpt.GPT(h)
    assert model.layer_order(True) == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
    assert model.layer_order(False) == list(range(11))
    model.looping = True
    assert model.num_encoder == 8 and model.skip_weights.shape[0] == 8  # 8 encoder, 9 decoder positions
    model.looping = False
    assert model.num_encoder == 5


def test_looped_forward_runs_the_shared_blocks_in_order_and_records_physical_layers():
    model = tiny_model(NUM_LOOPS=2, LOOP_START=1, LOOP_END=2)
    order = []
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda module, args, i=i: order.append(i))
    recorded = []
    ids, _ = tiny_batch()
    with torch.no_grad():
        model.hidden_states(ids, torch.float32, record=lambda name, inputs: recorded.append(name))
    assert order == [0, 1, 2, 1, 2, 1, 2, 3]
    assert {n.split(".")[1] for n in recorded if n.startswith("blocks.")} == {"0", "1", "2", "3"}
    assert sum(n == "blocks.1.attn.qkv" for n in recorded) == 3  # one Hessian per matrix, summed over passes
    order.clear()
    model.looping = False
    with torch.no_grad():
        model(*tiny_batch())
    assert order == [0, 1, 2, 3]


@pytest.mark.e2e
def test_looping_switches_on_at_its_training_fraction_and_for_evaluation(tmp_path, sample_data):
    dataset, tokenizer = sample_data
    env = dict(
        TINY_ENV,
        DATA_PATH=dataset,
        TOKENIZER_PATH=tokenizer,
        RUN_ID="loop",
        NUM_LOOPS=1,
        LOOP_START=1,
        LOOP_END=2,
        ENABLE_LOOPING_AT=0.5,
        TTT_ENABLED=0,
        ITERATIONS=8,
    )
    result = run_script(tmp_path, env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = read_log(tmp_path, "loop")
    assert re.search(r"^looping:enabled step:4 fraction:0\.500 layers:\[0, 1, 2, 1, 2, 3\]$", log, re.M)


# ---------------------------------------------------------------------------------------------------- optimizer

# #1855's train_gpt.py L1720-1748, written out again here
FRONTIER_TUPLES = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def test_polar_express_steps_equal_a_direct_float64_computation():
    assert [tuple(t) for t in train_gpt.POLAR_EXPRESS_FRONTIER] == FRONTIER_TUPLES
    g = torch.randn(3, 24, 40, dtype=torch.float64)
    x = g / g.norm(dim=(-2, -1), keepdim=True)
    for a, b, c in FRONTIER_TUPLES:
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    assert torch.allclose(train_gpt.polar_express_orthogonalize(g, 5, eps=0.0), x, atol=1e-10)
    tall = torch.randn(40, 24, dtype=torch.float64)  # transposed internally: same as orthogonalizing tall^T
    assert torch.allclose(
        train_gpt.polar_express_orthogonalize(tall, 5), train_gpt.polar_express_orthogonalize(tall.T, 5).T, atol=1e-10
    )
    sigma = torch.linalg.svdvals(train_gpt.polar_express_orthogonalize(torch.randn(64, 128), 5))
    assert sigma.min() > 0.6 and sigma.max() < 1.3  # close to orthogonal after 5 steps


def test_muon_eq_r_normalizes_rows_before_newton_schulz():
    torch.manual_seed(0)
    bank = torch.nn.Parameter(torch.randn(2, 16, 32))
    bank.grad = torch.randn(2, 16, 32)
    start, grad = bank.detach().clone(), bank.grad.clone()
    muon = train_gpt.BankMuon(
        [bank], lr=0.1, momentum=0.9, backend_steps=5, weight_decay=0.0, comm_dtype=torch.float32, eq_r=True
    )
    muon.step()
    nesterov = grad + 0.9 * grad  # buffer = grad after one step
    rows = nesterov / nesterov.norm(dim=-1, keepdim=True)
    assert torch.allclose(train_gpt.equalize_rows(nesterov).norm(dim=-1), torch.ones(2, 16), atol=1e-6)
    expected = start - 0.1 * train_gpt.newton_schulz_orthogonalize(rows, 5)
    assert torch.allclose(bank.detach(), expected, atol=1e-6)


def test_wd_taper_schedule_and_its_use_in_the_step():
    h = tiny_hyperparameters(WD_TAPER_START=0.7, WD_TAPER_FINAL=0.5)
    values = [train_gpt.weight_decay_multiplier(h, f) for f in (0.0, 0.7, 0.85, 1.0, 1.2)]
    assert values == pytest.approx([1.0, 1.0, 0.75, 0.5, 0.5])
    assert train_gpt.weight_decay_multiplier(tiny_hyperparameters(), 0.99) == 1.0  # off by default
    assert train_gpt.training_fraction(h, 6, 0.0) == 0.5  # no cap: step / ITERATIONS
    capped = tiny_hyperparameters(MAX_WALLCLOCK_SECONDS=100)
    assert train_gpt.training_fraction(capped, 1, 35_000.0) == pytest.approx(0.35)


def test_frontier_optimizer_groups_take_the_records_decays_and_rates():
    h = train_gpt.Hyperparameters(
        {
            "PRESET": "frontier",
            **{k: v for k, v in TINY_ENV.items() if k not in ("XSA_LAST_N",)},
            "XSA_LAST_N": "4",
            "LOOP_START": "1",
            "LOOP_END": "2",
            "PARALLEL_START_LAYER": "2",
        }
    )
    model = train_gpt.GPT(h)
    token_adam, muon, scalar_adam = train_gpt.build_optimizers(model, h, torch.float32, fused=False)
    assert token_adam.param_groups[0]["weight_decay"] == 0.085 and token_adam.param_groups[0]["lr"] == 0.03
    assert scalar_adam.param_groups[0]["weight_decay"] == 0.02 and scalar_adam.param_groups[0]["lr"] == 0.02
    assert scalar_adam.defaults["betas"] == (0.9, 0.99)
    assert muon.param_groups[0]["base_weight_decay"] == 0.095 and muon.eq_r
    assert muon.orthogonalize is train_gpt.polar_express_orthogonalize


# ---------------------------------------------------------------------------------------------------- LQER


def test_lqer_factor_ranges_and_a_smaller_error_than_plain_quantization():
    torch.manual_seed(0)
    h = tiny_hyperparameters(LQER_TOP_K=2, LQER_RANK=4)
    weight = torch.randn(96, 128) + 3.0 * torch.randn(96, 4) @ torch.randn(4, 128) / 4  # low-rank structure
    state = {
        "blocks.0.mlp.up": weight,
        "blocks.1.mlp.up": 0.01 * torch.randn(96, 128),
        "blocks.0.attn.q": torch.randn(64, 64),
    }
    tensors, schemes = train_gpt.quantize_state(state, h)
    plain = train_gpt.dequantize_state(tensors, schemes)
    chosen = train_gpt.add_lqer_corrections(state, tensors, schemes, h)
    assert chosen == ["blocks.0.mlp.up", "blocks.0.attn.q"] and schemes["blocks.0.mlp.up"] == "int6+lqer"
    a, b = tensors["blocks.0.mlp.up.lqer_a"], tensors["blocks.0.mlp.up.lqer_b"]
    assert a.shape == (96, 4) and a.min() >= -2 and a.max() <= 1 and a.dtype == torch.int8
    assert b.shape == (4 * 128 // 64, 64) and b.min() >= -8 and b.max() <= 7
    corrected = train_gpt.dequantize_state(tensors, schemes)
    for name in chosen:
        assert (corrected[name] - state[name]).norm() < (plain[name] - state[name]).norm(), name
    assert torch.equal(corrected["blocks.1.mlp.up"], plain["blocks.1.mlp.up"])
    blob = train_gpt.encode_artifact(tensors, schemes, h)  # survives the container and the compressor
    path = "/tmp/_lqer_test.ptz"
    with open(path, "wb") as f:
        f.write(blob)
    restored = train_gpt.read_artifact(path)
    assert torch.equal(restored["blocks.0.mlp.up"], corrected["blocks.0.mlp.up"])


# ---------------------------------------------------------------------------------------------------- loader


def write_shard(path, tokens):
    header = np.zeros(256, dtype="<i4")
    header[:3] = (train_gpt.SHARD_MAGIC, train_gpt.SHARD_VERSION, len(tokens))
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())


def test_shuffled_loader_draws_whole_sequences_without_repeats(tmp_path):
    files = []
    for i in range(4):
        files.append(str(tmp_path / f"fineweb_train_{i:06d}.bin"))
        write_shard(files[-1], np.arange(i * 1000, i * 1000 + 999) % 4096)
    loaders = [shuffled_loader(files, r, 2) for r in range(2)]
    assert loaders[0].source.files == files[0::2] and loaders[1].source.files == files[1::2]  # disjoint shards
    seen = set()
    for _ in range(4):
        inputs, targets, _ = loaders[0].next_batch(4 * 32, 32)
        assert inputs.shape == targets.shape == (4, 32) and torch.equal(inputs[:, 1:], targets[:, :-1])
        assert torch.all(targets - inputs == 1)  # a contiguous slice of one shard
        assert {int(v) // 1000 for v in inputs[:, 0]} <= {0, 2}
        seen.update(int(v) for v in inputs[:, 0])
    assert len(seen) == 16  # no sequence twice within a pass
    again = shuffled_loader(files, 0, 2)
    assert torch.equal(again.next_batch(128, 32)[0], shuffled_loader(files, 0, 2).next_batch(128, 32)[0])
    write_shard(files[0], [5000] * 999)
    with pytest.raises(train_gpt.InputError, match="VOCAB_SIZE"):
        shuffled_loader(files[:1], 0, 1).next_batch(128, 32)


def shuffled_loader(files, rank, world_size, prefetch=0):
    source = train_gpt.ShuffledSequences(files, 4096, rank, world_size, seed=7)
    return train_gpt.TrainingLoader(source, torch.device("cpu"), prefetch=prefetch)


def test_every_source_rewinds_to_the_same_batches(tmp_path):
    """One batch builder for every LOADER: built ahead on a thread, a size change rewinds the source to the first
    batch not handed out, and the batches equal the synchronous loader's (stream, shuffled, documents)."""
    files = []
    for i in range(2):
        tokens = np.random.default_rng(i).integers(2, 1024, 900)
        tokens[::37] = train_gpt.BOS_ID
        files.append(str(tmp_path / f"fineweb_train_{i:06d}.bin"))
        write_shard(files[-1], tokens)
    sources = {
        "stream": lambda: train_gpt.StreamBlocks(files, 1024, 1, 2),
        "shuffled": lambda: train_gpt.ShuffledSequences(files, 1024, 1, 2, seed=3),
        "documents": lambda: train_gpt.PackedDocumentBlocks(files, 1024, 1, 2),
    }
    for name, source in sources.items():
        plain = train_gpt.TrainingLoader(source(), torch.device("cpu"))
        ahead = train_gpt.TrainingLoader(source(), torch.device("cpu"), prefetch=2)
        for count, (tokens, seq_len) in enumerate([(64, 32)] * 5 + [(32, 32)] * 3 + [(64, 32)] * 9):
            expected, got = plain.next_batch(tokens, seq_len), ahead.next_batch(tokens, seq_len)
            assert all(torch.equal(a, b) for a, b in zip(expected[:2], got[:2])), (name, count)


def test_document_packing_loader_packs_a_rank_span_from_the_first_bos_and_skips_shard_ends(tmp_path):
    """LOADER=documents (#1855): one row per micro-batch, rank r's span of each block as the stream's; the first
    shard from its first BOS; a block that would cross a shard's end starts the next shard's first BOS."""
    first = np.arange(10, 110) % 1000
    first[[0, 1, 2]] = (7, 8, train_gpt.BOS_ID)  # two tokens before the first BOS are never read
    second = np.arange(500, 560)
    second[[0, 5]] = (9, train_gpt.BOS_ID)
    files = [str(tmp_path / f"fineweb_train_{i:06d}.bin") for i in range(2)]
    write_shard(files[0], first)
    write_shard(files[1], second)
    loaders = [document_loader(files, r, 2) for r in range(2)]
    rows = [[loader.next_batch(15, 256) for _ in range(4)] for loader in loaders]
    assert rows[0][0][0].shape == (1, 15) and torch.equal(rows[0][0][0][0, 1:], rows[0][0][1][0, :-1])
    assert rows[0][0][0][0, 0] == train_gpt.BOS_ID and rows[1][0][0][0, 0] == first[2 + 16]
    assert [int(r[0][0, 0]) for r in rows[0][:3]] == [first[2], first[2 + 32], first[2 + 64]]
    assert int(rows[0][3][0][0, 0]) == train_gpt.BOS_ID and int(rows[1][3][0][0, 0]) == second[5 + 16]  # 2nd shard
    write_shard(files[0], np.full(100, 5))
    with pytest.raises(train_gpt.InputError, match="no BOS"):
        document_loader(files[:1], 0, 1)


def document_loader(files, rank, world_size, documents=train_gpt.no_documents, prefetch=0):
    source = train_gpt.PackedDocumentBlocks(files, 1024, rank, world_size)
    return train_gpt.TrainingLoader(source, torch.device("cpu"), documents, prefetch)


def test_document_loader_builds_two_batches_ahead_on_a_thread(tmp_path):
    """Review 945e22d, defect 6: LOADER=documents built each batch (shard reads, the BOS scan, the varlen segments,
    the copy) on the training thread between steps. The run's loader (Trainer.new_loader) builds them on a thread,
    LOADER_PREFETCH = 2 ahead: the same batches as the synchronous loader across shard switches, and a request for
    another size (GPTQ calibration's) rewinds to the first batch not handed out."""
    import threading

    shards = []
    for i, length in enumerate((700, 500, 900)):
        tokens = np.random.default_rng(i).integers(2, 1024, length)
        tokens[::37] = train_gpt.BOS_ID
        shards.append(str(tmp_path / f"fineweb_train_{i:06d}.bin"))
        write_shard(shards[-1], tokens)
    threads = set()

    def documents(inputs):
        threads.add(threading.current_thread().name)
        return torch.from_numpy(train_gpt.document_segments(inputs))

    def loader(prefetch):
        return document_loader(shards, 1, 2, documents, prefetch)

    sizes = [63] * 9 + [40] * 5 + [63] * 12  # 26 batches over every shard, twice over the first
    plain, ahead = loader(0), loader(train_gpt.LOADER_PREFETCH)
    assert threads == set()  # nothing built before the first request
    visited = []
    for count, size in enumerate(sizes):
        expected, got = plain.next_batch(size, 256), ahead.next_batch(size, 256)
        visited.append(plain.source.file_index)
        assert all(torch.equal(a, b) for a, b in zip(expected, got)), count
        if count == 0:
            concurrent.futures.wait([future for _, future in ahead.ahead])
            assert len(ahead.ahead) == 2 and all(future.done() for _, future in ahead.ahead)
    assert threads == {threading.main_thread().name, next(t for t in threads if t.startswith("training-loader"))}
    assert visited[0] == 0 and set(visited) == {0, 1, 2} and visited.index(0, visited.index(2)) > 0  # wrapped
    assert len(ahead.ahead) == 2  # the next two are built already


def cu_seqlens_of_1855(bos_positions: list[int], total: int, max_len: int) -> list[int]:
    """#1855's rule, as its README and code describe it: a segment at each document start (position 0 counts), and
    a long document cut every max_len tokens from its start; the boundaries end with the total."""
    starts = sorted(set([0] + bos_positions))
    boundaries = []
    for start, end in zip(starts, starts[1:] + [total]):
        boundaries += list(range(start, end, max_len))
    return boundaries + [total]


def test_segments_of_a_packed_row_cut_long_documents_as_1855():
    row = torch.randint(4, 1024, (1, 1000), generator=torch.Generator().manual_seed(3))
    bos = [17, 300, 301, 900]
    row[0, bos] = train_gpt.BOS_ID
    starts = np.flatnonzero(train_gpt.segment_starts(row, 128)[0].numpy()).tolist()
    assert starts + [1000] == cu_seqlens_of_1855(bos, 1000, 128)
    assert np.flatnonzero(train_gpt.segment_starts(row)[0].numpy()).tolist() == [0] + bos  # without a length
    segments = train_gpt.document_segments(row.numpy(), 128)
    assert segments[: len(starts) + 1].tolist() == cu_seqlens_of_1855(bos, 1000, 128)
    mask = train_gpt.document_mask(row, 128)[0, 0]
    assert mask[299, 17 + 256] and not mask[299, 17 + 255] and not mask[301, 300] and mask[129, 128]
    with pytest.raises(train_gpt.InputError, match="LOADER=documents .* needs DOC_ISOLATION=1"):
        tiny_hyperparameters(LOADER="documents", DOC_ISOLATION=0)
    h = tiny_hyperparameters(LOADER="documents", DOC_ISOLATION=1)
    assert h.segment_len == h.train_seq_len and tiny_hyperparameters().segment_len == 0


def test_rope_is_rescaled_above_its_ntk_length_only():
    """#549 NTK-rescales RoPE's base above 1024 tokens; #1855 (ROPE_NTK_LEN=0) never; a packed row's rescale is
    decided by its longest segment, not its length."""
    plain = train_gpt.rotary_tables(2048, 16, 10000.0, "cpu", 0).cos
    assert torch.equal(plain[:, :1024], train_gpt.rotary_tables(1024, 16, 10000.0, "cpu").cos)
    assert not torch.allclose(train_gpt.rotary_tables(2048, 16, 10000.0, "cpu").cos, plain)
    assert torch.equal(train_gpt.rotary_tables(4096, 16, 10000.0, "cpu", 1024, 1024).cos[:, :2048], plain)


# ---------------------------------------------------------------------------------------------------- preset


FRONTIER_1855 = {
    "mlp_mult": 4.0,
    "xsa_last_n": 11,
    "qk_gain_init": 5.0,  # #1855's code default, which its run kept (5.25 was #1493's)
    "skip_gates_enabled": True,
    "smear_gate": "input",
    "smear_bos_mask": True,
    "attn_out_gate": "sparse",
    "sparse_attn_gate_scale": 0.5,
    "parallel_residual": "two_lane",
    "parallel_start_layer": 8,
    "num_loops": 2,
    "loop_start": 3,
    "loop_end": 5,
    "enable_looping_at": 0.35,
    "muon_ns": "polar_express",
    "muon_backend_steps": 5,
    "muon_eq_r": True,
    "matrix_lr": 0.026,
    "muon_wd": 0.095,
    "muon_momentum": 0.97,
    "muon_momentum_warmup_start": 0.92,
    "muon_momentum_warmup_steps": 1500,
    "tied_embed_lr": 0.03,
    "embed_wd": 0.085,
    "scalar_lr": 0.02,
    "adam_wd": 0.02,
    "beta1": 0.9,
    "beta2": 0.99,
    "grad_clip_norm": 0.3,
    "warmdown_frac": 0.85,
    "lr_floor": 0.1,
    "wd_taper_start": 0.7,
    "wd_taper_final": 0.5,
    "ema_decay": 0.9965,
    "loader": "documents",
    "init_order": "record1855",
    "rope_ntk_len": 0,
    "quant": "gptq",
    "quant_bits_mlp": 6,
    "quant_bits_attn": 6,
    "quant_bits_embed": 7,
    "quant_bits_tables": 7,
    "quant_clip_sigmas_mlp": 11.5,
    "quant_clip_sigmas_attn": 13.0,
    "lqer_top_k": 3,
    "lqer_rank": 4,
    "compressor": "brotli",
    "byte_shuffle": True,
    "gptq_calib_batches": 16,
    "train_batch_tokens": 786_432,
    "train_seq_len": 2048,
    "rope_dims": 16,
    "logit_softcap": 30.0,
}


def test_frontier_preset_has_the_1855_stacks_values():
    h = train_gpt.Hyperparameters({"PRESET": "frontier"})
    assert {k: getattr(h, k) for k in FRONTIER_1855} == FRONTIER_1855
    assert h.late_qat_threshold == 0  # #1218 removed QAT; LR_FLOOR 0.1 < 0.15 would otherwise switch it on
    for preset, dataset in (
        ("frontier_sp8192", "fineweb10B_sp8192"),
        ("frontier_caseops", "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"),
    ):
        h = train_gpt.Hyperparameters({"PRESET": preset})
        assert {k: getattr(h, k) for k in FRONTIER_1855} == FRONTIER_1855 and h.vocab_size == 8192
        assert h.bigram_vocab_size == 0 and not h.ve_enabled and h.data_path == f"./data/datasets/{dataset}"


FRONTIER_TINY = dict(
    PRESET="frontier",
    XSA_LAST_N=4,
    LOOP_START=1,
    LOOP_END=2,
    PARALLEL_START_LAYER=3,
    QUANT_BITS_EMBED=7,
    GPTQ_CALIB_BATCHES=2,
    LQER_TOP_K=2,
    TTT_LORA_BATCH=8,
    TTT_LORA_CONTEXT=64,
    TTT_LORA_RANK=4,
    PHASED_TTT_PREFIX_DOCS=30,
    TTT_BATCH_SEQS=4,
)


@pytest.mark.e2e
def test_frontier_preset_trains_identical_replicas_on_two_ranks(tmp_path, sample_data):
    """Every frontier part on at once (looping switched on mid-run, two lanes, gates, Polar Express + MuonEq-R,
    WD taper, #1855's packing loader, document isolation, GPTQ + SDClip + LQER, brotli, phased document LoRA TTT with its
    SGD phases and the n-gram tilt) under torchrun with 2 gloo ranks; document isolation through the varlen
    stand-in, which enforces FA3's limits on every call (training, calibration, scoring, LoRA rows, phases)."""
    from conftest import REPO

    dataset, tokenizer = sample_data
    env = dict(
        TINY_ENV,
        **FRONTIER_TINY,
        DATA_PATH=dataset,
        TOKENIZER_PATH=tokenizer,
        RUN_ID="frontier",
        ITERATIONS=8,
        OMP_NUM_THREADS=1,
        TTT_CHUNK_TOKENS=16384,
    )
    result = run_script(tmp_path, env, nproc=2, timeout=400, script=REPO / "tests" / "varlen_worker.py")
    assert result.returncode == 0, result.stderr[-3000:]
    stats = re.search(r"varlen_calls:(\d+) max_sequences:(\d+) max_real:(\d+)", result.stdout)
    assert stats and int(stats[1]) > 100 and int(stats[2]) % 64 == 0, result.stdout[-2000:]
    log = read_log(tmp_path, "frontier")
    assert "attention:varlen_standin " in log
    assert "preset:frontier" in log and "world_size:2" in log
    assert re.search(r"^looping:enabled step:3 ", log, re.M)
    assert re.search(r"^replicas:identical ranks:2 sha256:[0-9a-f]{16}$", log, re.M)
    assert re.search(r"^lqer: rank 4 corrections on \S+ \S+$", log, re.M)
    # #1855's queue: the 4-document remainder first, then 7 batches of 8; pauses at 12 >= 10, 20 >= 20, 36 >= 30 scored
    assert re.search(r"^ttt:start mode=lora order=record1855 documents=60 batches=8 phase_ends=\[2, 3, 5\] ", log, re.M)
    assert len(re.findall(r"^  ttt_phase \[\d/3\] docs=(10|20|30) tokens=\d+ chunks=\d+ steps=\d+ ", log, re.M)) == 3
    assert re.search(r"^legal_ttt_tilt_exact val_loss:[\d.]+ val_bpb:[\d.]+$", log, re.M)
    assert re.search(r"^ttt_audit ok: ", log, re.M)
    assert_final_score(log, "legal_ttt_tilt")  # LoRA TTT with the tilt: the tilted pass is the score


def record_caseops_cut(folder, documents: int = 20):
    """The record's CaseOps export (data/fineweb_sample) with its validation shard and sidecar cut to the first documents."""
    import build_sample
    from conftest import RECORD_CASEOPS_DATASET, RECORD_CASEOPS_TOKENIZER

    folder.mkdir()
    tokens = train_gpt.load_data_shard(RECORD_CASEOPS_DATASET / "fineweb_val_000000.bin", 8192)
    entries = train_gpt.load_data_shard(RECORD_CASEOPS_DATASET / "fineweb_val_bytes_000000.bin", 1 << 16)
    cut = np.flatnonzero(tokens == train_gpt.BOS_ID)[documents]
    build_sample.write_shard(folder / "fineweb_val_000000.bin", tokens[:cut])
    build_sample.write_shard(folder / "fineweb_val_bytes_000000.bin", entries[:cut])
    (folder / "fineweb_train_000000.bin").symlink_to(RECORD_CASEOPS_DATASET / "fineweb_train_000000.bin")
    return folder, RECORD_CASEOPS_TOKENIZER, int(entries[:cut].astype(np.int64).sum())


@pytest.mark.e2e
def test_frontier_caseops_trains_and_evaluates_on_the_records_export(tmp_path):
    """PRESET=frontier_caseops at a tiny shape on the data #1855's own script wrote, unchanged but cut to 20
    validation documents, with its normalizing tokenizer: the audit accepts it, logging counted (sidecar) and
    decoded totals, and #1855's phased LoRA TTT (no tilt, as #1855) scores every target."""
    dataset, tokenizer, original_bytes = record_caseops_cut(tmp_path / "data")
    env = dict(
        TINY_ENV,
        **dict(FRONTIER_TINY, PRESET="frontier_caseops"),
        DATA_PATH=dataset,
        TOKENIZER_PATH=tokenizer,
        RUN_ID="caseops",
        ITERATIONS=4,
        TTT_CHUNK_TOKENS=16384,
    )
    result = run_script(tmp_path, env, timeout=500)
    assert result.returncode == 0, result.stderr[-3000:]
    log = read_log(tmp_path, "caseops")
    audit = re.search(
        r"^val_bytes:sidecar counted:(\d+) decoded:(\d+) documents:20 .* normalized_documents:(\d+)", log, re.M
    )
    assert audit and int(audit[1]) == original_bytes and int(audit[2]) != original_bytes
    assert re.search(r"^ttt:start mode=lora order=record1855 documents=20 .* recipe=record1855 ", log, re.M)
    assert not re.search(r"^ngram_tilt: ", log, re.M)
    assert re.search(r"^legal_ttt_exact val_loss:[\d.]+ val_bpb:[\d.]+$", log, re.M)
    assert_final_score(log, "legal_ttt")


@pytest.mark.e2e
@pytest.mark.parametrize("export", ["whole_sample", "nfkc_stress"])
def test_frontier_caseops_starts_and_trains_on_every_legitimate_export(tmp_path, request, export):
    """PRESET=frontier_caseops at a tiny shape starts on the record's export of all 3,100 sample documents (3,000
    validation, whose audit the fixed slack refused) and on the NFKC stress export, counting the sidecar's bytes, and
    trains; SIGINT then stops it with its artifact written (evaluating 6.4 M validation tokens would take minutes)."""
    import signal

    from conftest import RECORD_CASEOPS_TOKENIZER
    from test_faults import launch, wait_for_step

    if export == "whole_sample":
        dataset, original_bytes = request.getfixturevalue("whole_sample_caseops")
        documents, counted = 3000, original_bytes
    else:
        dataset, documents, counted = request.getfixturevalue("nfkc_stress_export"), 123, 540_535
    env = dict(
        TINY_ENV,
        **dict(FRONTIER_TINY, PRESET="frontier_caseops"),
        DATA_PATH=dataset,
        TOKENIZER_PATH=RECORD_CASEOPS_TOKENIZER,
        RUN_ID=export,
        ITERATIONS=5000,
    )
    [process] = launch(tmp_path, {k: str(v) for k, v in env.items()})
    wait_for_step(tmp_path, export, 2, timeout=300)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=120)
    log = read_log(tmp_path, export)
    assert process.returncode == 128 + signal.SIGINT, log[-3000:]
    assert re.search(rf"^val_bytes:sidecar counted:{counted} decoded:\d+ documents:{documents} ", log, re.M)
    assert re.search(r"^step:2/5000 train_loss:[\d.]+ ", log, re.M) and "artifact:written" in log


# ---------------------------------------------------------------------------------------------------- lrzip groups


def fake_lrzip(data: bytes, unpack: bool) -> bytes:
    """lzma in lrzip's place: the grouping, ordering and container are what is tested without the program."""
    import lzma

    return lzma.decompress(data) if unpack else lzma.compress(data)


def test_similarity_order_is_a_greedy_nearest_neighbour_chain():
    rows = torch.tensor([[0, 0], [10, 10], [1, 0], [9, 10], [2, 1]], dtype=torch.int8)
    assert train_gpt.similarity_order(rows).tolist() == [0, 2, 4, 3, 1]
    big = torch.randint(-31, 32, (300, 16), dtype=torch.int8)
    assert sorted(train_gpt.similarity_order(big).tolist()) == list(range(300))


def test_similarity_order_runs_its_chain_on_the_host():
    """The chain is a host loop over one copied distance matrix: a fixed handful of tensor operations whatever the
    row count (on a GPU, a device op and a sync per row, and a CPU mask on a CUDA matrix crashed the export)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountOps.count += 1
            return func(*args, **(kwargs or {}))

    rows = torch.randint(-31, 32, (400, 16), dtype=torch.int8)
    reference = [0]
    distance = torch.cdist(rows.float(), rows.float(), p=1).numpy()
    for _ in range(399):
        candidates = [(distance[reference[-1], j], j) for j in range(400) if j not in reference]
        reference.append(min(candidates)[1])
    with CountOps():
        order = train_gpt.similarity_order(rows)
    assert order.tolist() == reference and CountOps.count < 20


def test_grouped_lrzip_artifact_round_trips(tmp_path, monkeypatch):
    monkeypatch.setattr(train_gpt, "run_lrzip", fake_lrzip)
    monkeypatch.setattr(train_gpt.shutil, "which", lambda name: "/usr/bin/" + name)
    h = tiny_hyperparameters(COMPRESSOR="lrzip", LQER_TOP_K=1)
    model = tiny_model()
    with torch.no_grad():
        for bank in model.banks():
            bank.normal_(std=0.02)
    state = train_gpt.export_state(model)
    tensors, schemes = train_gpt.quantize_state(state, h)
    train_gpt.add_lqer_corrections(state, tensors, schemes, h)
    expected = train_gpt.dequantize_state(tensors, schemes)
    blob = train_gpt.encode_artifact(tensors, schemes, h)
    path = tmp_path / "model.ptz"
    path.write_bytes(blob)
    restored = train_gpt.read_artifact(str(path))
    assert restored.keys() == expected.keys()
    assert all(torch.equal(restored[n], expected[n]) for n in expected)
    index = blob.index(b'"transform": "grouped"')
    assert index > 0


def test_lrzip_chosen_but_absent_fails_at_start_with_the_install_hint(monkeypatch):
    monkeypatch.setattr(train_gpt.shutil, "which", lambda name: None)
    with pytest.raises(train_gpt.InputError, match="apt-get install lrzip"):
        tiny_hyperparameters(COMPRESSOR="lrzip")


@pytest.mark.skipif(train_gpt.shutil.which("lrzip") is None, reason="the lrzip program is not installed")
def test_real_lrzip_round_trips():
    data = bytes(range(256)) * 64
    assert train_gpt.run_lrzip(train_gpt.run_lrzip(data, unpack=False), unpack=True) == data


# ---------------------------------------------------------------------------------------------------- fused kernels


def test_fused_softcapped_cross_entropy_matches_the_eager_path_and_its_gradient():
    torch.manual_seed(0)
    z = (40 * torch.randn(37, 50, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, 50, (37,))
    eager = F.cross_entropy(30 * torch.tanh(z / 30), targets, reduction="none")
    fused = train_gpt.softcapped_cross_entropy(z, targets, 30.0)
    assert fused.dtype == torch.float32 and torch.allclose(fused.double(), eager, atol=1e-5)
    weights = torch.rand(37, dtype=torch.float64)
    (expected,) = torch.autograd.grad((eager * weights).sum(), z)
    (got,) = torch.autograd.grad((train_gpt.softcapped_cross_entropy(z, targets, 30.0) * weights).sum(), z)
    assert got.dtype == torch.float64 and torch.allclose(got, expected, atol=1e-6)
    # bf16 logits (CUDA autocast's head): fp32 math inside, the gradient in bf16 (#1855's traffic: review 945e22d, 8b)
    low = z.detach().bfloat16().requires_grad_()
    (low_grad,) = torch.autograd.grad((train_gpt.softcapped_cross_entropy(low, targets, 30.0) * weights).sum(), low)
    assert low_grad.dtype == torch.bfloat16 and torch.allclose(low_grad.double(), expected, atol=2e-2)


@pytest.mark.e2e
def test_triton_softcapped_ce_kernels_match_the_torch_math_in_the_interpreter():
    """FUSED_KERNELS' two Triton kernels (never run on a GPU), executed by Triton's interpreter on the CPU
    (TRITON_INTERPRET=1, in a subprocess: the flag is read when the kernels are defined): loss, LSE and gradient
    equal the custom ops' torch math for bf16 and fp32 logits, 8,192 columns (eight 1,024-wide blocks, #1855's
    launch shape) and 1,000 (a masked tail block)."""
    pytest.importorskip("triton")
    import subprocess
    import sys

    from conftest import REPO, clean_environment

    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "triton_ce_worker.py")],
        env=dict(clean_environment(), TRITON_INTERPRET="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checks = re.findall(r"^(\w+) cols:(\d+) loss:(\S+) lse:(\S+) grad:(\S+)$", result.stdout, re.M)
    assert {(dtype, int(cols)) for dtype, cols, *_ in checks} == {
        (d, c) for d in ("float32", "bfloat16") for c in (8192, 1000)
    }
    for dtype, cols, loss, lse, grad in checks:
        assert float(loss) < 1e-4 and float(lse) < 1e-4, (dtype, cols)
        assert float(grad) < (1e-6 if dtype == "float32" else 1e-2), (dtype, cols)


@pytest.mark.e2e
def test_triton_softcapped_ce_kernels_assemble_for_hopper_without_spills():
    """The same kernels lowered by Triton and assembled by its bundled ptxas for sm_90a, no GPU needed
    (bench/triton_ce_ptxas.py): they compile for the real target, not only for the interpreter, at bf16 and fp32
    logits, with no register spills and at most 64 registers a thread (the kernel they replaced: 96-128)."""
    pytest.importorskip("triton")
    import subprocess
    import sys

    from conftest import REPO, clean_environment

    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "triton_ce_ptxas.py")],
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    kernels = re.findall(
        r"^(\w+) logits:(\w+) registers:(\d+) spill_stores:(\d+) spill_loads:(\d+)$", result.stdout, re.M
    )
    assert len(kernels) == 4
    for name, dtype, registers, stores, loads in kernels:
        assert int(registers) <= 64 and stores == loads == "0", (name, dtype)


def test_fused_leaky_relu_square_matches_the_eager_path_and_its_gradient():
    u = torch.randn(64, 33, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: train_gpt.LeakyReluSquare.apply(x, 0.3), (u,))
    assert torch.allclose(train_gpt.LeakyReluSquare.apply(u, 0.5), F.leaky_relu(u, 0.5).square())


def test_fused_kernels_train_the_same_model_and_leave_scoring_eager():
    plain, fused = tiny_model(), tiny_model(FUSED_KERNELS=1)
    with torch.no_grad():
        for a, b in zip(plain.banks(), fused.banks()):
            a.normal_(std=0.05)
            b.copy_(a)
    batch = tiny_batch()
    loss_plain, loss_fused = plain(*batch), fused(*batch)
    assert torch.allclose(loss_plain, loss_fused, atol=1e-6)
    loss_plain.backward()
    loss_fused.backward()
    for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-4), name
    fused.eval()
    with torch.no_grad():
        assert torch.equal(fused(*batch, reduction="none"), plain.eval()(*batch, reduction="none"))


# ---------------------------------------------------------------------------------------- varlen document isolation


def test_document_segments_are_padded_to_a_multiple_of_64(sample_data):
    """Training-shaped batches of the sample (8 rows of 256): one segment per row start and BOS, padded with empty
    tail segments to a multiple of 64 (as #1855; rows + 512 launched FA3's backward over 513 sequences for a
    challenge row's ~80-150: review 945e22d, defect 5); the varlen contract (tests/varlen_standin.py) holds."""
    import varlen_standin

    tokens = train_gpt.load_data_shard(Path(sample_data[0]) / "fineweb_train_000000.bin", 1024).astype(np.int64)
    for start in range(0, 20 * 2048, 2048):
        batch = tokens[start : start + 2048].reshape(8, 256)
        segments = train_gpt.document_segments(batch)
        real = 8 + int(np.count_nonzero(batch[:, 1:] == train_gpt.BOS_ID))
        assert len(segments) - 1 == 64 and varlen_standin.check_contract(torch.from_numpy(segments), 2048)
        assert len(varlen_standin.check_contract(torch.from_numpy(segments), 2048)) - 1 == real
    challenge = tokens[: 48 * 2048].reshape(48, 2048)  # a rank's batch at the challenge's shape (98,304 tokens)
    segments = train_gpt.document_segments(challenge)
    real = len(varlen_standin.check_contract(torch.from_numpy(segments), 48 * 2048)) - 1
    assert len(segments) - 1 == -(-real // 64) * 64 < 48 + 512
    assert challenge.size > varlen_standin.MAX_SEQUENCES  # a segment per token (before) broke the kernel's grid
    crowded = np.full((2, 256), 5)
    crowded[:, ::2] = train_gpt.BOS_ID  # 256 documents: exactly four multiples, no padding
    assert len(train_gpt.document_segments(crowded)) - 1 == 256
    with pytest.raises(train_gpt.RunFault, match=r"holds 80000 document segments, more than FA's 65535 sequences"):
        train_gpt.document_segments(np.ones((2, 40_000), np.int64))


@pytest.mark.parametrize("segment_len", [0, 16])
def test_lora_rows_get_their_segments_without_a_token_scan(segment_len):
    """Document LoRA's rows each hold one document's tokens (a BOS at most at a row's start, right padding never a
    BOS): RunContext.row_segments builds their cu_seqlens from the shape (review 945e22d, defect 4), exactly what
    document_segments finds by scanning the tokens, for every chunk step of a LoRA batch."""
    from types import SimpleNamespace

    run = SimpleNamespace(varlen=True, segment_len=segment_len, device=torch.device("cpu"))
    tokens = np.random.default_rng(0).integers(2, 1024, 4_000)
    tokens[[0, 700, 1_900, 2_000, 3_100]] = train_gpt.BOS_ID
    docs = train_gpt.lora_document_order(train_gpt.document_spans(tokens), "length")
    checked = 0
    for chunk in range(25):  # the longest document: 1,200 targets, 25 chunks
        docs_left = docs[docs[:, 1] - docs[:, 0] > chunk * 48]
        lo = docs_left[:, 0] + chunk * 48
        hi = np.minimum(lo + 48, docs_left[:, 1])
        first = np.maximum(docs_left[:, 0], hi - 160)
        for compiled in (False, True):
            context = train_gpt.lora_step_layout(first, lo, hi, compiled).context
            expected = train_gpt.document_segments(tokens[context], segment_len)
            built = train_gpt.RunContext.row_segments(run, *context.shape)
            assert torch.equal(built, torch.from_numpy(expected))
            checked += 1
    assert checked == 50


def test_packed_rows_need_the_varlen_kernel_on_cuda():
    """CUDA review 945e22d, defect 2: LOADER=documents (a segment_len) with SDPA on CUDA would build a 98,304^2 mask
    at the first step: refused at start. SDPA's mask stays for the CPU and for DOC_ISOLATION over ordinary rows."""
    with pytest.raises(train_gpt.InputError, match=r"LOADER=documents packs .* needs FlashAttention's varlen kernel"):
        train_gpt.select_attention_backend("sdpa", "cuda", torch.bfloat16, True, 2048)
    with pytest.raises(train_gpt.InputError, match=r"ATTENTION_BACKEND=auto \(FA3 on CUDA with bf16\): LOADER="):
        train_gpt.select_attention_backend("auto", "cuda", torch.float32, True, 2048)  # auto falls back to SDPA
    assert train_gpt.select_attention_backend("sdpa", "cpu", torch.float32, True, 64)[0] == "sdpa"
    assert train_gpt.select_attention_backend("sdpa", "cuda", torch.bfloat16, True, 0)[0] == "sdpa"


def test_varlen_model_equals_the_masked_model():
    """The same weights through the varlen stand-in (host-built segments) and through SDPA's document mask."""
    import varlen_standin

    ids = torch.randint(4, 1024, (3, 64), generator=torch.Generator().manual_seed(0))
    ids[0, 10] = ids[1, 0] = ids[1, 33] = ids[2, 63] = train_gpt.BOS_ID
    h = tiny_hyperparameters(DOC_ISOLATION=1)
    torch.manual_seed(0)
    masked = train_gpt.GPT(h).eval()
    torch.manual_seed(0)
    varlen = train_gpt.GPT(h, attention=varlen_standin.varlen_attention).eval()
    with torch.no_grad():
        for model in (masked, varlen):
            for bank in model.banks():
                bank.normal_(std=0.05, generator=torch.Generator().manual_seed(1))
        documents = torch.from_numpy(train_gpt.document_segments(ids.numpy()))
        expected, got = masked.logits(ids), varlen.logits(ids, documents=documents)
    assert torch.allclose(expected, got, atol=1e-5)
    with pytest.raises(RuntimeError, match="needs the batch's host-built segments"):
        varlen.logits(ids)
