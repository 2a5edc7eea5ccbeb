"""Pure-PyTorch oracles for every op, evaluated in float64 by the tests."""

from . import lora, philox  # noqa: F401
from . import c3a  # noqa: F401
