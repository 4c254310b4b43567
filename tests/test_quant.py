"""Export: per-row quantization bounds, bank splitting, the artifact container and its failure modes."""
from __future__ import annotations

import pytest
import torch

import train_gpt
from conftest import tiny_hyperparameters


def trained_like_model():
    """A tiny model whose zero-initialised matrices are filled, so every tensor has real content."""
    torch.manual_seed(0)
    model = train_gpt.GPT(tiny_hyperparameters())
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


@pytest.mark.parametrize("bits", [6, 8])
def test_quantize_rows_error_bound(bits):
    torch.manual_seed(0)
    weight = torch.randn(64, 256) * 0.05
    q, scale = train_gpt.quantize_rows(weight, bits)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and scale.dtype == torch.float16 and int(q.abs().max()) <= qmax
    restored = q.float() * scale.float()[:, None]
    inside = weight.abs() <= qmax * scale.float()[:, None]
    # Unclipped entries are within half a step; clipped ones lose at most what the clip quantile removed.
    assert torch.all((restored - weight).abs()[inside] <= scale.float()[:, None].expand_as(weight)[inside] / 2 + 1e-6)
    relative = (restored - weight).square().mean() / weight.square().mean()
    assert relative < {6: 2e-3, 8: 1e-4}[bits]


def test_per_row_search_is_no_worse_than_absmax():
    torch.manual_seed(1)
    weight = torch.randn(32, 512) * 0.05
    weight[:, :3] *= 20  # outliers make a clipped row scale worthwhile
    q, scale = train_gpt.quantize_rows(weight, 6)
    searched = (q.float() * scale.float()[:, None] - weight).square().sum()
    absmax = weight.abs().amax(dim=1, keepdim=True) / 31
    plain = ((weight / absmax).round().clamp(-31, 31) * absmax - weight).square().sum()
    assert searched <= plain


def test_export_state_splits_and_rebanks_exactly():
    model = trained_like_model()
    state = train_gpt.export_state(model)
    assert "blocks.3.mlp.down" in state and "qo_bank" not in state
    assert torch.equal(state["blocks.1.attn.out"], model.qo_bank[model.num_layers + 1])
    assert torch.equal(state["blocks.2.attn.v"], model.kv_bank[model.num_layers + 2])
    fresh = train_gpt.GPT(tiny_hyperparameters())
    train_gpt.load_exported_state(fresh, state)
    for (name, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), name


def test_quantization_categories():
    tensors, schemes = train_gpt.quantize_state(train_gpt.export_state(trained_like_model()))
    assert schemes["blocks.0.mlp.up"] == "int6" and schemes["blocks.0.attn.q"] == "int6"
    assert schemes["blocks.0.attn.q_gain"] == "fp16" and tensors["blocks.0.attn.q_gain"].dtype == torch.float16
    # #549's rule is "<= 65,536 elements stays fp16": the tiny token table has exactly 1024 x 64 = 65,536.
    assert schemes["token_embedding.weight"] == "fp16"
    _, schemes = train_gpt.quantize_state({"token_embedding.weight": torch.randn(1025, 64)})
    assert schemes["token_embedding.weight"] == "int8"


@pytest.mark.parametrize("compressor", ["lzma", "zstd", "brotli"])
def test_artifact_round_trip_is_exact(tmp_path, compressor):
    model = trained_like_model()
    path = tmp_path / "model.ptz"
    path.write_bytes(train_gpt.build_artifact(model, compressor))
    loaded = train_gpt.read_artifact(str(path))
    expected = train_gpt.dequantize_state(*train_gpt.quantize_state(train_gpt.export_state(model)))
    assert loaded.keys() == expected.keys()
    for name in expected:
        assert torch.equal(loaded[name], expected[name]), name


def test_container_round_trip_keeps_dtypes_and_shapes():
    tensors = {"a": torch.arange(6, dtype=torch.int8).view(2, 3), "b": torch.randn(4).half(), "c": torch.randn(2, 2)}
    restored, meta = train_gpt.unpack_tensors(train_gpt.pack_tensors(tensors, {"k": 1}))
    assert meta == {"k": 1}
    for name, tensor in tensors.items():
        assert restored[name].dtype == tensor.dtype and torch.equal(restored[name], tensor)


def test_corrupt_and_truncated_artifacts_fail_clearly(tmp_path):
    blob = train_gpt.build_artifact(trained_like_model(), "lzma")
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0xFF
    cases = {"flipped.ptz": (bytes(flipped), "checksum mismatch"),
             "truncated.ptz": (blob[:-100], "truncated"),
             "other.ptz": (b"PK\x03\x04" + blob[4:], "bad magic")}
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(train_gpt.InputError, match=message) as error:
            train_gpt.read_artifact(str(path))
        assert name in str(error.value)
