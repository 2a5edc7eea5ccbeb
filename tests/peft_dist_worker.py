"""Worker for the distributed test of lrkernels.integrations.peft. Run as
    python peft_dist_worker.py PORT OUTDIR
A small PEFT model (LoRA and DoRA on two linears, float64) is accelerated and trained with
AdamW: as PEFT runs it and accelerated, in this process on the full batch
(OUTDIR/<config>.<peft|single>.pt), then accelerated on 2 CPU ranks (gloo, 127.0.0.1) under DDP
and under FSDP2 fully_shard (DTensor parameters, the frozen base weights sharded too), each rank
on half the batch (OUTDIR/<config>.<mode>.rank<r>.pt). Each file holds the trainable
parameters after the last step and the per-step losses."""

import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_common import WORLD, full_params, spawn_ranks  # noqa: E402

STEPS, BATCH = 6, 16
CONFIGS = ("lora", "dora")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(12, 21)      # odd sizes: uneven FSDP shards
        self.down = nn.Linear(21, 9)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def build(config, accelerated=True):
    import peft

    from lrkernels.integrations import peft as pi
    torch.manual_seed(0)
    model = peft.get_peft_model(Tiny().double(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=False, use_dora=config == "dora"))
    report = None
    if accelerated:
        report = pi.accelerate(model)
        assert len(report.accelerated) == 2, str(report)
    return model, report


def data():
    g = torch.Generator().manual_seed(123)
    return [(torch.randn(BATCH, 12, generator=g, dtype=torch.float64),
             torch.randn(BATCH, 9, generator=g, dtype=torch.float64)) for _ in range(STEPS)]


def train(model, wrapped, report, rank, world):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    losses = []
    for x, y in data():
        lo, hi = rank * BATCH // world, (rank + 1) * BATCH // world
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(wrapped(x[lo:hi]), y[lo:hi])
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
    # layers that ran PEFT's own forward instead of the kernels (the comparison would then be
    # PEFT's against PEFT's)
    fallbacks = sum(sum(v.values()) for v in report.fallbacks().values()) if report is not None else 0
    return {"params": full_params(params), "losses": torch.stack(losses), "fallbacks": fallbacks}


def rank_main(rank, outdir):
    for config in CONFIGS:
        for mode in ("ddp", "fsdp"):
            model, report = build(config)
            if mode == "ddp":
                from torch.nn.parallel import DistributedDataParallel
                wrapped = DistributedDataParallel(model)
            else:
                from torch.distributed.fsdp import fully_shard
                inner = model.base_model.model
                for name in ("up", "down"):
                    fully_shard(getattr(inner, name))
                wrapped = fully_shard(model)
                assert all(hasattr(p, "placements") for p in model.parameters()), "expected DTensor parameters"
            torch.save(train(model, wrapped, report, rank, WORLD), os.path.join(outdir, f"{config}.{mode}.rank{rank}.pt"))


def main():
    port, outdir = int(sys.argv[1]), sys.argv[2]
    for config in CONFIGS:
        for kind, accelerated in (("peft", False), ("single", True)):
            model, report = build(config, accelerated)
            torch.save(train(model, model, report, 0, 1), os.path.join(outdir, f"{config}.{kind}.pt"))
    spawn_ranks(rank_main, port, outdir)


if __name__ == "__main__":
    main()
