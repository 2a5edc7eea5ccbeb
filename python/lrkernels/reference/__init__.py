"""Pure-PyTorch oracles for every op, evaluated in float64 by the tests."""

from . import galore, lora, philox  # noqa: F401
