"""#1855's TTT forward beside ours: the same weights and the same adapters (A and B), per-token losses compared.

    python3 bench/ttt1855_harness.py PEER_SCRIPT [--log logs/ttt1855_harness.txt]

PEER_SCRIPT is #1855's train_gpt.py patched to run on the CPU in fp32 (not in this repository: the record's code is
run beside ours, never copied in). At bench/parity_run.sh's frontier_caseops shape, ours (PRESET=frontier_caseops,
TTT_LORA_PLACEMENT=record1855) gets seeded random weights and adapters; they are mapped by name into #1855's GPT and
its BatchedTTTLoRA; both score the same rows: ours through GPT.forward(adapters=...), #1855's through forward_ttt.
Logged: the largest per-token difference with the adapters at B = 0 (the base model) and with random B, and the
peer's per-row NLL sums (tests/test_ttt1855.py pins them: ours is checked against #1855's numbers without the peer).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_gpt  # noqa: E402

# bench/parity_run.sh's frontier_caseops shape, the variables both codes read
SHAPE = dict(
    NUM_LAYERS="6",
    MODEL_DIM="128",
    NUM_HEADS="4",
    NUM_KV_HEADS="2",
    XSA_LAST_N="6",
    NUM_LOOPS="2",
    LOOP_START="2",
    LOOP_END="3",
    PARALLEL_START_LAYER="4",
    TRAIN_SEQ_LEN="256",
    EVAL_SEQ_LEN="256",
    TTT_EVAL_SEQ_LEN="256",
    VOCAB_SIZE="8192",
    TTT_LORA_RANK="80",
    SPARSE_ATTN_GATE_SCALE="0.5",
    SPARSE_ATTN_GATE_ENABLED="1",
    GATED_ATTN_QUANT_GATE="1",
    GATE_WINDOW="12",
    SMEAR_GATE_ENABLED="1",
    CASEOPS_ENABLED="1",
)
ROWS, WIDTH, SEED, DRAW_SEED = 3, 96, 5, 11


def our_side(seed: int = SEED):
    """Our model with seeded random weights, a record1855 adapter with random A and B, and the rows to score."""
    h = train_gpt.Hyperparameters(dict(SHAPE, PRESET="frontier_caseops", TTT_RECIPE="record1855"))
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = train_gpt.GPT(h).eval()
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    lora = train_gpt.new_adapter(model, h, ROWS, generator)
    with torch.no_grad():
        for b in lora.b:
            b.copy_(0.02 * torch.randn(b.shape, generator=generator))
    ids = torch.randint(2, h.vocab_size, (ROWS, WIDTH + 1), generator=generator)
    ids[:, 0] = train_gpt.BOS_ID
    # no BOS further in: a TTT row holds one document (#1855's forward_ttt attends plainly causally, ours isolates)
    return h, model, lora, ids[:, :-1], ids[:, 1:]


def our_losses(model, lora, inputs, targets, zero_b: bool) -> torch.Tensor:
    saved = [b.detach().clone() for b in lora.b]
    with torch.no_grad():
        if zero_b:
            for b in lora.b:
                b.zero_()
        lora.rows = slice(None)
        losses = model(inputs, targets, "none", adapters=lora)
        for b, value in zip(lora.b, saved):
            b.copy_(value)
    return losses


def peer_state(model) -> dict[str, torch.Tensor]:
    """Our parameters under #1855's names (its lanes' scalars are per model, ours per block)."""
    renamed = {"token_embedding.weight": "tok_emb.weight", "smear_gate.strength": "smear_lambda"}
    state = {}
    for name, value in model.state_dict().items():
        if name.endswith("output_gate.weight"):
            state[name.replace("output_gate.weight", "attn_gate_w")] = value
        elif name == "smear_gate.weight":
            state[name] = value[None]
        elif name == "smear_gate.strength":
            state[renamed[name]] = value.reshape(1)
        elif ".lane_" not in name:
            state[renamed.get(name, name)] = value
    return state


def load_peer(path: str):
    os.environ.update(SHAPE)
    spec = importlib.util.spec_from_file_location("peer1855", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.BOS_ID = train_gpt.BOS_ID
    return module


def peer_side(peer, model, lora):
    h = peer.Hyperparameters()
    net = peer.GPT(h).eval()
    state = net.state_dict()
    state.update(peer_state(model))
    for index, block in enumerate(model.blocks):
        if block.residual_form == "two_lane":
            state["parallel_resid_lambdas"][index] = block.lane_decay.detach()
            state["parallel_post_lambdas"][index] = block.lane_routing.detach()
    net.load_state_dict(state)
    net.looping_active = True  # #1855's TTT model always loops
    adapters = peer.BatchedTTTLoRA(ROWS, net, int(SHAPE["TTT_LORA_RANK"]))
    with torch.no_grad():
        for key, index in lora.index.items():
            target = peer_adapter(adapters, key)
            target.A.copy_(lora.a[index])
            target.B.copy_(lora.b[index])
    return net, adapters


def peer_adapter(adapters, key):
    """#1855's BatchedLinearLoRA of our key: "head" or (slot, name)."""
    return adapters.lm_head_lora if key == "head" else getattr(adapters, f"{key[1]}_loras")[key[0]]


def peer_losses(net, adapters, inputs, targets, zero_b: bool) -> torch.Tensor:
    saved = {name: p.detach().clone() for name, p in adapters.named_parameters()}
    with torch.no_grad():
        if zero_b:
            for name, p in adapters.named_parameters():
                if name.endswith("B"):
                    p.zero_()
        losses = net.forward_ttt(inputs, targets, adapters)
        for name, p in adapters.named_parameters():
            p.copy_(saved[name])
    return losses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("peer", help="#1855's train_gpt.py patched for the CPU in fp32")
    parser.add_argument("--log", default=str(REPO / "logs" / "ttt1855_harness.txt"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    h, model, lora, inputs, targets = our_side()
    peer_module = load_peer(args.peer)
    net, adapters = peer_side(peer_module, model, lora)
    lines = [f"ttt1855_harness rows={ROWS} width={WIDTH} seed={SEED} slots={len(model.layer_order(True))}"]
    for zero_b in (True, False):
        ours = our_losses(model, lora, inputs, targets, zero_b)
        theirs = peer_losses(net, adapters, inputs, targets, zero_b)
        label = "base (B = 0)" if zero_b else "adapted"
        lines.append(f"{label}: max_abs_diff:{(ours - theirs).abs().max().item():.3e}")
        lines.append(f"{label}: peer_row_sums:{','.join(f'{v:.6f}' for v in theirs.double().sum(1).tolist())}")
        lines.append(f"{label}: ours_row_sums:{','.join(f'{v:.6f}' for v in ours.double().sum(1).tolist())}")
    torch.manual_seed(DRAW_SEED)  # #1855 draws A from the global generator; ours from its own, seeded alike
    theirs = peer_module.BatchedTTTLoRA(4, net, int(SHAPE["TTT_LORA_RANK"]))
    drawn = train_gpt.new_adapter(model, h, 4, torch.Generator().manual_seed(DRAW_SEED))
    equal = all(torch.equal(a, peer_adapter(theirs, key).A) for key, a in zip(drawn.index, drawn.a))
    lines.append(f"draws: seed={DRAW_SEED} adapters={len(drawn.a)} every A bitwise equal:{equal}")
    Path(args.log).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
