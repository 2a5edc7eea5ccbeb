"""The README's usage examples run as written, in order, in one namespace."""

import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 4, "README usage examples not found"
    namespace = {}
    torch.manual_seed(0)
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as e:  # the block's number makes the failure easy to find
            raise AssertionError(f"README python block {i + 1} failed: {e!r}\n{code}") from e
    assert namespace["y"].shape == (64, 1024)
