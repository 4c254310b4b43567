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


# ---- FlashAttention 3's varlen interface, as hopper/flash_attn_interface.py builds it: flash_attn_varlen_func is an
# autograd.Function whose forward and backward call torch.library custom ops with fake (shape-only) kernels, so
# torch.compile traces it as the real one is traced (a duplicate tensor input is refused, defect 1 of the review).
@torch.library.custom_op("varlen_standin::forward", mutates_args=())
def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int
) -> torch.Tensor:
    assert torch.equal(cu_q, cu_k), "the stand-in attends q's sequences to the same k sequences"
    bounds = check_contract(cu_q, q.size(0))
    assert max(b - a for a, b in zip(bounds[:-1], bounds[1:])) <= max_q, "a sequence over max_seqlen"
    out = torch.zeros_like(q)
    for a, b in zip(bounds[:-1], bounds[1:]):
        pieces = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))
        attended = F.scaled_dot_product_attention(*pieces, is_causal=True, enable_gqa=q.size(1) != k.size(1))
        out[a:b] = attended[0].transpose(0, 1)
    return out


@_forward.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k):
    return torch.empty_like(q)


def _sequence_grads(dout, q, k, v):
    """Causal attention's gradients for one sequence, q (T, H, D), k/v (T, Hkv, D), written out (an op's kernel
    runs without autograd): P = softmax(QK^T/sqrt(D)), dV = P^T dO, dS = P * (dO V^T - rowsum(P * dO V^T))."""
    group, scale = q.size(1) // k.size(1), q.size(-1) ** -0.5
    qh, kh, vh, doh = (
        t.transpose(0, 1) for t in (q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), dout)
    )
    causal = torch.ones(q.size(0), q.size(0), dtype=torch.bool).tril()
    probs = ((qh @ kh.transpose(1, 2)) * scale).masked_fill(~causal, float("-inf")).softmax(-1)
    dprobs = doh @ vh.transpose(1, 2)
    dscores = probs * (dprobs - (dprobs * probs).sum(-1, keepdim=True))
    dq, dk, dv = (dscores @ kh) * scale, (dscores.transpose(1, 2) @ qh) * scale, probs.transpose(1, 2) @ doh
    dk, dv = (t.transpose(0, 1).unflatten(1, (k.size(1), group)).sum(2) for t in (dk, dv))
    return dq.transpose(0, 1), dk, dv


@torch.library.custom_op("varlen_standin::backward", mutates_args=())
def _backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    bounds = cu_q.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            dq[a:b], dk[a:b], dv[a:b] = _sequence_grads(dout[a:b], q[a:b], k[a:b], v[a:b])
    return dq, dk, dv


@_backward.register_fake
def _(dout, q, k, v, cu_q):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class FlashAttnVarlenFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal):
        assert causal, "the stand-in is causal only"
        ctx.save_for_backward(q, k, v, cu_seqlens_q)
        return _forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, cu_seqlens_q = ctx.saved_tensors
        return *_backward(dout, q, k, v, cu_seqlens_q), None, None, None, None, None


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False):
    return FlashAttnVarlenFunc.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal)


def flash_attn_func(q, k, v, causal=False):
    raise AssertionError("the stand-in has only the varlen kernel")
