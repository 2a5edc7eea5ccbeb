"""Ops shared by the families: the dropout mask."""

import torch

from ._util import new_seed, register_fake, seed_tensor


@register_fake("dropout_mask")
def _dropout_mask_fake(seed, rows, cols, p, dtype):
    return seed.new_empty((rows, cols), dtype=dtype)


def dropout_mask(rows: int, cols: int, p: float, seed=None, *, device="cpu", dtype=torch.float32):
    """The inverted-dropout mask the fused ops apply to a (rows, cols) input.

    Element (r, c) is 0 (dropped) or 1/(1 - p_eff) (kept), where p_eff is p rounded to a
    multiple of 2**-16: each element gets a 16-bit Philox4x32-10 draw, so the rescale is exact
    for the probability actually used. ``seed`` is an int or a one-element int64 tensor; the same
    seed gives the same mask on CPU and CUDA. Materialised only for tests and debugging: the
    fused ops never store it.
    """
    if seed is None:
        seed = new_seed(device)
    elif not isinstance(seed, torch.Tensor):
        seed = seed_tensor(seed, device)
    return torch.ops.lrkernels.dropout_mask.default(seed, rows, cols, float(p), dtype)


def dropout_keep_scale(p: float) -> float:
    """The nonzero value of :func:`dropout_mask` (and of every fused dropout) for probability p:
    ``1 / (1 - p_eff)`` with p_eff = p rounded to a multiple of 2**-16, as float32 holds it."""
    t = min(max(int(float(p) * 65536.0 + 0.5), 0), 65535)
    return float(torch.tensor(65536.0 / (65536.0 - t), dtype=torch.float32))

