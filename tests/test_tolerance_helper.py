"""The shared oracle comparison: per-element bounds catch a wrong small element that one
absolute bound over the whole tensor lets through."""

import pytest
import torch

from conftest import abs_inputs, assert_close_to_oracle


def _case():
    torch.manual_seed(0)
    x = torch.randn(64, 256, dtype=torch.float64)
    w = torch.randn(32, 256, dtype=torch.float64)
    w[0] *= 1e-6  # one output column of tiny values
    ref = x @ w.T
    low = (x.float() @ w.float().T).double()
    mag = abs_inputs({"x": x})["x"] @ w.abs().T
    return ref, low, mag


def test_correct_result_passes_per_element():
    ref, low, mag = _case()
    out = low.clone()  # the same formula in float32 as the "kernel"
    assert_close_to_oracle(out.float(), ref, low, mag=mag)


def test_wrong_small_element_fails_per_element_but_not_globally():
    ref, low, mag = _case()
    out = low.clone()
    out[:, 0] = 0.0  # the tiny column entirely wrong: far below the global bound
    assert_close_to_oracle(out.float(), ref, low)  # the old global bound does not notice
    with pytest.raises(AssertionError, match="exceed their bound"):
        assert_close_to_oracle(out.float(), ref, low, mag=mag)
