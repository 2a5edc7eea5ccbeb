"""Pure-PyTorch oracles for every op, evaluated in float64 by the tests."""

from . import c3a, galore, gqa, lora, miss, multi_lora, philox, sparse_lowrank  # noqa: F401
