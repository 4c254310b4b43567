"""A CPU stand-in for FlashAttention's varlen kernel that enforces the limits the real one has (the CUDA review,
defect 1): int32 cu_seqlens from 0 to the token count, non-decreasing, at most 65,535 sequences (FA3's backward grid
puts them on an axis of at most 65,535 blocks), no empty sequence except a padding tail at the end; then causal
attention within each sequence (SDPA, native GQA). `calls` records each call's sequence counts."""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_SEQUENCES = 65_535
calls: list[tuple[int, int]] = []  # (sequences including padding, non-empty sequences)


def check_contract(cu_seqlens: torch.Tensor, total: int):
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.dim() == 1, "cu_seqlens must be 1-D int32"
    values = cu_seqlens.tolist()
    assert values[0] == 0 and values[-1] == total, f"cu_seqlens must run from 0 to {total}: {values[0]}..{values[-1]}"
    lengths = [b - a for a, b in zip(values[:-1], values[1:])]
    assert min(lengths) >= 0, "cu_seqlens must not decrease"
    assert len(lengths) <= MAX_SEQUENCES, f"{len(lengths)} sequences: past the kernel's grid limit of {MAX_SEQUENCES}"
    real = next((i for i, length in enumerate(lengths) if length == 0), len(lengths))
    assert all(length == 0 for length in lengths[real:]), "an empty sequence before the padding tail"
    calls.append((len(lengths), real))
    return values[: real + 1]


def varlen_attention(q, k, v, cu_seqlens=None):
    """q (B, T, H, D), k/v (B, T, Hkv, D) -> (B, T, H, D), every sequence of the flattened batch on its own."""
    if cu_seqlens is None:
        raise AssertionError("the varlen stand-in was called without cu_seqlens")
    batch, seq = q.shape[:2]
    bounds = check_contract(cu_seqlens, batch * seq)
    flat_q, flat_k, flat_v = (t.flatten(0, 1) for t in (q, k, v))
    out = torch.empty_like(flat_q)
    for a, b in zip(bounds[:-1], bounds[1:]):
        pieces = (t[a:b].transpose(0, 1)[None] for t in (flat_q, flat_k, flat_v))
        out[a:b] = F.scaled_dot_product_attention(*pieces, is_causal=True, enable_gqa=q.size(2) != k.size(2))[
            0
        ].transpose(0, 1)
    return out.view(q.shape)


varlen_attention.varlen = True


def limited_to(max_segment: int):
    """The stand-in, also enforcing max_seqlen: no segment longer than max_segment (a packed row's cut; 0: none)."""

    def attention(q, k, v, cu_seqlens=None):
        if max_segment and cu_seqlens is not None:
            bounds = cu_seqlens.tolist()
            longest = max((b - a for a, b in zip(bounds, bounds[1:])), default=0)
            assert longest <= max_segment, f"a segment of {longest} tokens, over max_seqlen {max_segment}"
        return varlen_attention(q, k, v, cu_seqlens)

    attention.varlen = True
    return attention
