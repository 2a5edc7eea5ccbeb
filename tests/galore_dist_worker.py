"""Worker for the GaLore distributed tests. Run as
    python galore_dist_worker.py PORT OUTDIR
It trains a small MLP with each optimizer configuration of CONFIGS, once in this process on
the full batch (OUTDIR/<config>.single.pt), then on 2 CPU ranks (gloo, 127.0.0.1) under DDP and
under FSDP2 fully_shard, each rank on half the batch (OUTDIR/<config>.<mode>.rank<r>.pt).
Kept out of the test module so the spawned ranks import nothing from pytest; one process
start for everything keeps the test fast (importing torch dominates on a loaded CI box)."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_common import WORLD, full_params, spawn_ranks  # noqa: E402

STEPS, BATCH = 8, 16
CONFIGS = [("GaLoreAdamW", "svd"), ("FiraAdamW", "randomized")]


def build(optim, method):
    import lrkernels.optim as lo
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 21), torch.nn.Tanh(), torch.nn.Linear(21, 9), torch.nn.Tanh(),
                                torch.nn.Linear(9, 4)).double()  # odd sizes: uneven FSDP shards
    return model, (lambda m: getattr(lo, optim)(
        [{"params": [m[0].bias, m[2].bias, m[4].weight, m[4].bias]},
         {"params": [m[0].weight, m[2].weight], "rank": 3, "update_proj_gap": 3, "proj_method": method}],
        lr=1e-2, weight_decay=0.01))


def data():
    g = torch.Generator().manual_seed(123)
    return [(torch.randn(BATCH, 12, generator=g, dtype=torch.float64),
             torch.randn(BATCH, 4, generator=g, dtype=torch.float64)) for _ in range(STEPS)]


def train(model, opt, rank, world):
    for x, y in data():
        lo, hi = rank * BATCH // world, (rank + 1) * BATCH // world
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[lo:hi]), y[lo:hi]).backward()
        opt.step()


def rank_main(rank, outdir):
    for mode in ("ddp", "fsdp"):
        run_mode(rank, mode, outdir)


def run_mode(rank, mode, outdir):
    for optim, method in CONFIGS:
        model, make_opt = build(optim, method)
        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel
            wrapped = DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard
            for i in (0, 2, 4):
                fully_shard(model[i])
            wrapped = fully_shard(model)
            assert all(hasattr(p, "placements") for p in model.parameters()), "expected DTensor parameters"
        train(wrapped, make_opt(model), rank, WORLD)
        torch.save(full_params(model.parameters()), os.path.join(outdir, f"{optim}-{method}.{mode}.rank{rank}.pt"))


def main():
    port, outdir = int(sys.argv[1]), sys.argv[2]
    for optim, method in CONFIGS:
        model, make_opt = build(optim, method)
        train(model, make_opt(model), 0, 1)
        torch.save(full_params(model.parameters()), os.path.join(outdir, f"{optim}-{method}.single.pt"))
    spawn_ranks(rank_main, port, outdir)


if __name__ == "__main__":
    main()
