"""The model: parameter count, components, and the CUDA code path exercised on the CPU."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

import train_gpt
from conftest import tiny_hyperparameters


def tiny_model(**overrides):
    torch.manual_seed(0)
    return train_gpt.GPT(tiny_hyperparameters(**overrides))


def tiny_batch(batch=2, seq=64, vocab=1024, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def test_default_parameter_count_matches_record():
    """#549 logs model_params:26928220 for the configuration it ran (BigramHash 1536)."""
    model = build_on_meta(train_gpt.Hyperparameters({}))
    assert sum(p.numel() for p in model.parameters()) == 26_928_220
    with_code_default = build_on_meta(train_gpt.Hyperparameters({"BIGRAM_VOCAB_SIZE": "2048"}))
    assert sum(p.numel() for p in with_code_default.parameters()) == 26_993_756


def build_on_meta(h):
    original = train_gpt.GPT._init_weights
    train_gpt.GPT._init_weights = lambda self, h: None  # shapes only: skip the (slow) orthogonal init
    try:
        with torch.device("meta"):
            return train_gpt.GPT(h)
    finally:
        train_gpt.GPT._init_weights = original


def test_init_scheme():
    model = tiny_model()
    n = model.num_layers
    assert torch.count_nonzero(model.qo_bank[n:]) == 0 and torch.count_nonzero(model.mlp_down_bank) == 0
    q = model.qo_bank[0]
    assert torch.allclose(q @ q.T, torch.eye(q.size(0)), atol=1e-5)  # orthogonal
    assert torch.count_nonzero(model.bigram_hash.embed.weight) == 0
    proj = model.bigram_hash.proj.weight
    assert torch.allclose(proj.T @ proj, torch.eye(proj.size(1)), atol=1e-5)
    assert torch.all(model.blocks[0].attn.q_gain == 1.5)
    assert torch.all(model.blocks[0].resid_mix[0] == 1) and torch.all(model.blocks[0].resid_mix[1] == 0)


def test_blocks_start_as_identity_and_loss_is_log_vocab():
    model = tiny_model()
    inputs, targets = tiny_batch()
    with torch.no_grad():
        loss = model(inputs, targets)
    assert abs(loss.item() - torch.log(torch.tensor(1024.0)).item()) < 0.05


def test_bigram_hash_formula():
    module = train_gpt.BigramHash(1536, 8, 16)
    ids = torch.tensor([[5, 7, 1023]])
    expected = [1535, ((36313 * 7) ^ (27191 * 5)) % 1535, ((36313 * 1023) ^ (27191 * 7)) % 1535]
    assert module.bucket_ids(ids).tolist() == [expected]


def test_xsa_removes_the_self_value_direction():
    y, v = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 8)
    out = train_gpt.subtract_self_value(y, v)
    v_for_head = v.repeat_interleave(2, dim=2)
    assert torch.allclose((out * F.normalize(v_for_head, dim=-1)).sum(-1), torch.zeros(2, 5, 4), atol=1e-5)


def test_partial_rotary_is_a_rotation_of_the_first_dims_only():
    x = torch.randn(1, 6, 2, 16)
    rotary = train_gpt.rotary_tables(6, 8, 10000.0, "cpu")
    out = train_gpt.apply_partial_rotary(x, rotary)
    assert torch.equal(out[..., 8:], x[..., 8:])
    assert torch.allclose(out[..., :8].norm(dim=-1), x[..., :8].norm(dim=-1), atol=1e-5)
    assert torch.equal(out[:, 0], x[:, 0])  # position 0 is not rotated


def test_rotary_ntk_base_matches_record_at_2048():
    cos = train_gpt.rotary_tables(2048, 16, 10000.0, "cpu").cos
    base = 10000.0 * 2 ** (16 / 14)  # #549: about 22,082 at T = 2048
    inv_freq = 1.0 / base ** (torch.arange(0, 16, 2).float() / 16)
    assert torch.allclose(cos[0, 100, 0], torch.cos(100 * inv_freq), atol=1e-4)


def test_unet_skips_pair_lifo():
    model = tiny_model(NUM_LAYERS=5)
    order = []
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda module, args, i=i: order.append(i))
    with torch.no_grad():
        model(*tiny_batch())
    assert order == [0, 1, 2, 3, 4] and model.num_encoder == 2 and model.skip_weights.shape[0] == 2


def test_inference_mode_forward_then_training_backward():
    """Scoring under inference_mode, then training (TTT): nothing cached under inference_mode may leak."""
    model = tiny_model()
    inputs, targets = tiny_batch()
    with torch.inference_mode():
        model(inputs, targets, reduction="none")
    loss = model(inputs, targets)
    loss.backward()
    assert model.qo_bank.grad is not None


def assert_qat_changes_the_loss(model, quantized_param):
    """With QAT on, a training forward's loss changes and (straight-through) gradients still reach the weight."""
    inputs, targets = tiny_batch()
    plain = model(inputs, targets)
    model.qat_active = True
    quantized = model(inputs, targets)
    assert plain.item() != quantized.item()
    quantized.backward()
    assert quantized_param.grad.abs().sum() > 0


def test_qat_reaches_the_banks():
    model = tiny_model()
    with torch.no_grad():
        model.qo_bank[model.num_layers :].normal_(std=0.05)
        model.mlp_down_bank.normal_(std=0.05)
    assert_qat_changes_the_loss(model, model.mlp_down_bank)


def test_bf16_autocast_steps_on_cpu():
    """The CUDA precision path (bf16 autocast, bf16 Newton-Schulz) on the CPU: no dtype mismatch anywhere."""
    h = tiny_hyperparameters()
    torch.manual_seed(0)
    model = train_gpt.GPT(h)
    optimizers = train_gpt.build_optimizers(model, h, torch.bfloat16, fused=False)
    inputs, targets = tiny_batch()
    losses = []
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(inputs, targets)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        model.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.logits(inputs).dtype == torch.float32


def test_flash_attention_call_contract(monkeypatch):
    """A stand-in flash_attn_interface checks what the model passes to FlashAttention 3 on CUDA."""
    calls = []

    def flash_attn_func(q, k, v, causal=False):
        assert causal is True
        assert q.dtype == k.dtype == v.dtype == torch.bfloat16, (q.dtype, k.dtype, v.dtype)
        batch, seq, heads, dim = q.shape
        assert k.shape == v.shape == (batch, seq, 2, dim) and heads == 4 and dim == 16  # (B, T, H, D), GQA 4:2
        calls.append(q.shape)
        out = train_gpt.sdpa_attention(q, k, v)
        return out, torch.zeros(batch, heads, seq)  # some FA3 builds return (out, lse)

    monkeypatch.setitem(sys.modules, "flash_attn_interface", types.SimpleNamespace(flash_attn_func=flash_attn_func))
    name, attention = train_gpt.select_attention_backend("auto", "cuda", torch.bfloat16)
    assert name == "flash_attention_3"
    h = tiny_hyperparameters()
    torch.manual_seed(0)
    flash_model = train_gpt.GPT(h, attention=attention)
    torch.manual_seed(0)
    sdpa_model = train_gpt.GPT(h)
    inputs, targets = tiny_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        flash_loss = flash_model(inputs, targets)
        sdpa_loss = sdpa_model(inputs, targets)
    assert len(calls) == h.num_layers
    assert torch.allclose(flash_loss, sdpa_loss)
    flash_loss.backward()


def test_attention_backend_choice(monkeypatch):
    assert train_gpt.select_attention_backend("auto", "cpu", torch.float32)[0] == "sdpa"
    assert train_gpt.select_attention_backend("auto", "cuda", torch.float32)[0] == "sdpa"  # flash is 16-bit only
    assert train_gpt.select_attention_backend("sdpa", "cuda", torch.bfloat16)[0] == "sdpa"
    for device, dtype in (("cpu", torch.bfloat16), ("cuda", torch.float32)):
        with pytest.raises(
            train_gpt.InputError,
            match=r"ATTENTION_BACKEND=fa3: FlashAttention needs CUDA and "
            r"COMPUTE_DTYPE=bf16",
        ):
            train_gpt.select_attention_backend("fa3", device, dtype)
    # DOC_ISOLATION on flash needs its varlen kernel: a wheel without one fails at start
    monkeypatch.setitem(sys.modules, "flash_attn_interface", types.SimpleNamespace(flash_attn_func=None))
    with pytest.raises(train_gpt.InputError, match=r"cannot load flash_attn_interface\.flash_attn_varlen_func"):
        train_gpt.select_attention_backend("auto", "cuda", torch.bfloat16, doc_isolation=True)
    assert train_gpt.select_attention_backend("sdpa", "cuda", torch.bfloat16, doc_isolation=True)[0] == "sdpa"


def test_varlen_flash_isolation_matches_the_sdpa_mask(monkeypatch):
    """DOC_ISOLATION through FA's varlen kernel (here a stand-in running SDPA per segment of cu_seqlens) gives the
    SDPA mask path's outputs: the cu_seqlens, the flattening and the reshape are right."""
    segments = []

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False):
        assert causal and cu_seqlens_q.dtype == torch.int32 and q.dim() == 3
        assert torch.equal(cu_seqlens_q, cu_seqlens_k) and cu_seqlens_q is not cu_seqlens_k  # Dynamo: no tensor twice
        out, bounds = torch.zeros_like(q), cu_seqlens_q.tolist()
        assert bounds[0] == 0 and bounds[-1] == q.size(0) and bounds == sorted(bounds) and max_seqlen_q == 40
        for a, b in zip(bounds, bounds[1:]):
            if b > a:
                segments.append((a, b))
                out[a:b] = train_gpt.sdpa_attention(q[None, a:b], k[None, a:b], v[None, a:b])[0]
        return out

    monkeypatch.setitem(
        sys.modules, "flash_attn_interface", types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func)
    )
    probed = []  # the start-up probe compiles on CUDA tensors: recorded here, run in tests/test_compile.py
    monkeypatch.setattr(train_gpt, "probe_varlen_kernel", lambda kernel, *args: probed.append(kernel))
    name, attention = train_gpt.select_attention_backend("auto", "cuda", torch.bfloat16, doc_isolation=True)
    assert name == "flash_attention_3_varlen" and probed == [flash_attn_varlen_func]
    h = tiny_hyperparameters(DOC_ISOLATION=1)
    ids = torch.randint(2, 1024, (2, 40), generator=torch.Generator().manual_seed(0))
    ids[0, 10] = ids[0, 25] = ids[1, 0] = train_gpt.BOS_ID
    torch.manual_seed(0)
    varlen_model = train_gpt.GPT(h, attention=attention).eval()
    torch.manual_seed(0)
    mask_model = train_gpt.GPT(h).eval()
    with torch.no_grad():
        documents = torch.from_numpy(train_gpt.document_segments(ids.numpy()))  # host-built, as RunContext does
        assert torch.allclose(varlen_model.logits(ids, documents=documents), mask_model.logits(ids), atol=1e-5)
    assert segments[:4] == [(0, 10), (10, 25), (25, 40), (40, 80)]  # row 0's three documents, then row 1


def test_varlen_kernel_of_packed_rows_gets_the_segment_length_as_max_seqlen(monkeypatch):
    """LOADER=documents: one row of a rank's tokens cut every TRAIN_SEQ_LEN from each document start; FA's
    max_seqlen (its grid) is that length, not the row's, and the outputs equal the SDPA mask's."""
    seen = []

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False):
        bounds = cu_seqlens_q.tolist()
        assert max(b - a for a, b in zip(bounds, bounds[1:])) <= max_seqlen_q
        seen.append(max_seqlen_q)
        out = torch.zeros_like(q)
        for a, b in zip(bounds, bounds[1:]):
            if b > a:
                out[a:b] = train_gpt.sdpa_attention(q[None, a:b], k[None, a:b], v[None, a:b])[0]
        return out

    monkeypatch.setitem(
        sys.modules, "flash_attn_interface", types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func)
    )
    monkeypatch.setattr(train_gpt, "probe_varlen_kernel", lambda *args: None)  # CUDA tensors: tests/test_compile.py
    h = tiny_hyperparameters(DOC_ISOLATION=1, LOADER="documents", TRAIN_SEQ_LEN=16, EVAL_SEQ_LEN=16, EVAL_STRIDE=16)
    _, attention = train_gpt.select_attention_backend("fa3", "cuda", torch.bfloat16, True, h.segment_len)
    ids = torch.randint(2, 1024, (1, 64), generator=torch.Generator().manual_seed(0))
    ids[0, 5] = ids[0, 50] = train_gpt.BOS_ID
    torch.manual_seed(0)
    varlen_model = train_gpt.GPT(h, attention=attention).eval()
    torch.manual_seed(0)
    mask_model = train_gpt.GPT(h).eval()
    with torch.no_grad():
        documents = torch.from_numpy(train_gpt.document_segments(ids.numpy(), h.segment_len))
        assert torch.allclose(varlen_model.logits(ids, documents=documents), mask_model.logits(ids), atol=1e-5)
    assert seen and set(seen) == {16}


@pytest.mark.parametrize(
    "requested, module", [("auto", "flash_attn_interface"), ("fa3", "flash_attn_interface"), ("fa2", "flash_attn")]
)
def test_missing_flash_attention_fails_at_start_with_a_hint(monkeypatch, requested, module):
    """No silent fallback on CUDA: a missing or broken FA3 wheel would cost steps in a wallclock-capped run."""
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError, as a missing or mismatched wheel
    with pytest.raises(
        train_gpt.InputError,
        match=rf"cannot load {module}\.flash_attn_func \((ModuleNotFound|Import)Error: .*\); "
        r"(install a FlashAttention 3 wheel|pip install flash-attn)",
    ):
        train_gpt.select_attention_backend(requested, "cuda", torch.bfloat16)


def test_attention_inputs_and_residual_stay_bf16_when_norms_return_fp32(monkeypatch):
    """torch >= 2.12 CUDA autocast runs aten::rms_norm in fp32 (AutocastCUDA; the CPU has no such kernel): the
    old code then fed fp32 to FA3 in the value-embedding layers. Simulate that norm and check every dtype."""
    real_rms_norm = torch.nn.functional.rms_norm
    monkeypatch.setattr(
        torch.nn.functional,
        "rms_norm",
        lambda x, shape, *args, **kwargs: real_rms_norm(x.float(), shape, *args, **kwargs),
    )
    seen = []

    def attention(q, k, v, boundaries=None):
        seen.append((q.dtype, k.dtype, v.dtype))
        return train_gpt.sdpa_attention(q, k, v)

    h = tiny_hyperparameters()
    model = train_gpt.GPT(h, attention=attention)
    residual = []
    for block in model.blocks:
        block.register_forward_hook(lambda module, args, output: residual.append(output.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(*tiny_batch())
    assert len(seen) == h.num_layers and set(seen) == {(torch.bfloat16,) * 3}, seen
    assert set(residual) == {torch.bfloat16}, residual


def test_fake_quantization_only_in_training_forwards():
    """Late QAT must not leak into scoring: the last step:N val_bpb used to be measured on fake-quantized banks."""
    model = tiny_model()
    with torch.no_grad():
        model.mlp_down_bank.normal_(std=0.05)
    inputs, targets = tiny_batch()
    model.eval()
    with torch.no_grad():
        plain = model(inputs, targets).item()
        model.qat_active = True
        assert model(inputs, targets).item() == plain
        model.train()
        assert model(inputs, targets).item() != plain


def test_record1089_qat_scope_reaches_banks_and_projections_on_its_5_bit_floored_grid():
    """#1089's CastedLinear QAT: every bank and projection at 5 bits, scale max(0.9995 absmax, 1) / 15 on [-16, 15],
    soft-round at SOFT_ROUND_QAT=1 (alpha 1 when it starts)."""
    model = train_gpt.GPT(tiny_hyperparameters(LATE_QAT_SCOPE="record1089", VE_DIM=16, BIGRAM_DIM=16))
    model.train()
    model.qat_active = True
    bank_quantizer, projection_quantizer = model.qat_quantizers()
    assert bank_quantizer is not None and projection_quantizer is not None
    model.eval()
    assert model.qat_quantizers() == (None, None)  # never in scoring
    weight = torch.tensor([[0.5, -0.01, 0.02], [4.0, -4.0, 1.0]])
    scale = torch.tensor([[1 / 15], [4.0 * 0.9995 / 15]])
    expected = (weight / scale).round().clamp(-16, 15) * scale
    assert torch.allclose(train_gpt.fake_quantize_rows_record1089(weight), expected)
    alpha = torch.tensor(1.0)
    units = (weight / scale).clamp(-16, 15)
    soft = (units.floor() + torch.sigmoid(alpha * (units - units.floor() - 0.5))) * scale
    assert torch.allclose(train_gpt.fake_quantize_rows_record1089(weight, alpha), soft)
    assert train_gpt.fake_quantize_rows_record1089(torch.full((1, 2), -9.0))[0, 0] == pytest.approx(-9.0 * 0.9995)


def test_record549_qat_scope_reaches_only_the_projections():
    h = tiny_hyperparameters(LATE_QAT_SCOPE="projections")
    torch.manual_seed(0)
    model = train_gpt.GPT(h)
    with torch.no_grad():
        model.bigram_hash.embed.weight.normal_(std=0.5)
        model.mlp_down_bank.normal_(std=0.05)
    assert_qat_changes_the_loss(model, model.bigram_hash.proj.weight)
    inputs, targets = tiny_batch()
    model.bigram_hash, model.value_embedding = None, None  # without the projections QAT changes nothing
    model.ve_layers = []
    model.qat_active = False
    without = model(inputs, targets).item()
    model.qat_active = True
    assert model(inputs, targets).item() == without
    # #549's quantizer: scale = max(absmax / 31, 1 / 31), values in [-32, 31].
    weight = torch.tensor([[0.5, -0.01, 0.02], [4.0, -4.0, 1.0]])
    expected = torch.tensor([[16 / 31, 0.0, 1 / 31], [4.0, -4.0, round(31 / 4) * 4 / 31]])
    assert torch.allclose(train_gpt.fake_quantize_rows_record549(weight), expected)


def test_compiled_fullgraph_training_steps_on_cpu():
    """torch.compile(fullgraph=True): a graph break that would crash the GPU run fails here too."""
    h = tiny_hyperparameters(NUM_LAYERS=2, VE_LAYERS="1", XSA_LAST_N=1)
    torch.manual_seed(0)
    model = train_gpt.GPT(h)
    compiled = torch.compile(model, dynamic=False, fullgraph=True)
    optimizers = train_gpt.build_optimizers(model, h, torch.float32, fused=False)
    inputs, targets = tiny_batch()
    eager = model(inputs, targets).item()
    for step in range(3):
        model.qat_active = step == 2  # late QAT must reach the compiled graph (it recompiles once)
        loss = compiled(inputs, targets)
        if step == 0:
            assert abs(loss.item() - eager) < 1e-4
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        model.zero_grad()
    model.qat_active = True
    with torch.no_grad():
        assert abs(compiled(inputs, targets).item() - model(inputs, targets).item()) < 1e-4
