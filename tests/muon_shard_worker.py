"""Run under torchrun with 2 ranks (gloo): the sharded Muon step must equal the unsharded one.

Each rank gets a different gradient for the same banks; the 2-rank BankMuon (reduce-scatter -> per-shard
momentum + Newton-Schulz -> all-gather) must match a 1-rank BankMuon fed the mean gradient. Banks have an
odd leading dim, so the padding path runs. Rank 0 writes the max abs difference to argv[1] as JSON.
"""

import json
import sys

import torch
import torch.distributed as dist

import train_gpt


def make_banks(seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in ((3, 24, 16), (5, 8, 32))]


def gradients(rank, step):
    generator = torch.Generator().manual_seed(100 * step + rank)
    return [torch.randn(shape, generator=generator) for shape in ((3, 24, 16), (5, 8, 32))]


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    sharded, reference = make_banks(0), make_banks(0)
    parallel = train_gpt.BankMuon(sharded, 0.05, 0.9, 5, 0.1, torch.float32, rank, world)
    single = train_gpt.BankMuon(reference, 0.05, 0.9, 5, 0.1, torch.float32, 0, 1)
    for step in range(3):
        per_rank = [gradients(r, step) for r in range(world)]
        for bank, grad in zip(sharded, per_rank[rank]):
            bank.grad = grad.clone()
        for index, bank in enumerate(reference):
            bank.grad = sum(g[index] for g in per_rank) / world
        parallel.step()
        single.step()
    difference = max((a - b).abs().max().item() for a, b in zip(sharded, reference))
    shard_rows = [parallel.state[bank]["momentum_buffer"].size(0) for bank in parallel.order]
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump({"max_abs_difference": difference, "shard_rows": shard_rows}, f)
    train_gpt.end_distributed_run(0)


if __name__ == "__main__":
    main()
