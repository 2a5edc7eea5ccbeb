"""Shared plumbing of the distributed tests (DDP / FSDP2 on 2 gloo ranks on CPU): the test side
starts a worker script in a fresh process (`run_worker`), the worker spawns its ranks
(`spawn_ranks`). Imported by the workers too, so it imports nothing from pytest."""

import os
import socket
import subprocess
import sys

WORLD = 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(script, outdir, timeout=240):
    """Runs tests/<script> PORT OUTDIR with one thread per process; returns the CompletedProcess."""
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), script)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, worker, str(free_port()), str(outdir)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _rank_entry(rank, port, fn, args):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        fn(rank, *args)
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()
    # Skip the interpreter's teardown: under load, a rank exiting normally was seen to abort
    # ("terminate called without an active exception", a joinable thread destroyed by a static
    # destructor) after all its work was done and saved.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_ranks(fn, port, *args):
    """fn(rank, *args) on WORLD processes joined in one gloo group on 127.0.0.1:port."""
    import torch.multiprocessing as mp

    mp.spawn(_rank_entry, args=(port, fn, args), nprocs=WORLD, join=True)


def full_params(params):
    """Clones of the parameters, DTensors (FSDP2 shards) gathered to full tensors."""
    out = []
    for p in params:
        p = p.detach()
        if hasattr(p, "full_tensor"):
            p = p.full_tensor()
        out.append(p.clone())
    return out
