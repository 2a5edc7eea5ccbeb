"""Philox4x32-10 and the dropout mask in pure PyTorch: an independent implementation of
include/lrkernels/common/philox.h, used by the float64 oracles and to check the kernels'
masks bit for bit.

uint32 arithmetic is done in int64 tensors: products of two 32-bit values wrap modulo 2**64
in int64, which keeps their low 64 bits exact, so masking recovers the high and low words.
"""

import torch

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF
DROPOUT_STREAM_TAG = 0x4C524B44  # "LRKD"


def _mulhilo(a: int, b: torch.Tensor):
    p = b * a  # wraps modulo 2**64; low 64 bits exact
    return (p >> 32) & _MASK32, p & _MASK32


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 on int64 tensors holding uint32 values (broadcast together)."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & _MASK32 for c in (c0, c1, c2, c3))
    k0, k1 = k0 & _MASK32, k1 & _MASK32
    for _ in range(10):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
    return c0, c1, c2, c3


def dropout_threshold(p: float) -> int:
    return int(min(max(p * 65536.0 + 0.5, 0.0), 65535.0))


def dropout_keep_scale(p: float) -> float:
    """1 / (1 - p_eff), p_eff = threshold / 65536: the scale the kernels apply (in float32)."""
    t = dropout_threshold(p)
    return float(torch.tensor(65536.0 / (65536.0 - t), dtype=torch.float32))


def dropout_mask(seed: int, rows: int, cols: int, p: float, dtype=torch.float64) -> torch.Tensor:
    """The (rows, cols) inverted-dropout mask of the fused ops: 0 or 1/(1 - p_eff)."""
    if p == 0.0 or rows == 0 or cols == 0:
        return torch.ones(rows, cols, dtype=dtype)
    seed &= (1 << 64) - 1
    groups = (cols + 7) // 8
    row = torch.arange(rows, dtype=torch.int64).unsqueeze(1)
    grp = torch.arange(groups, dtype=torch.int64).unsqueeze(0)
    words = philox4x32_10(grp, row, row >> 32, DROPOUT_STREAM_TAG, seed & _MASK32, seed >> 32)
    halves = []
    for w in words:  # lane e takes word e // 2, half e % 2
        halves += [w & 0xFFFF, (w >> 16) & 0xFFFF]
    u16 = torch.stack(halves, dim=-1).reshape(rows, groups * 8)[:, :cols]
    keep = u16 >= dropout_threshold(p)
    return keep.to(dtype) * dropout_keep_scale(p)
