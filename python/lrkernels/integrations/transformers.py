"""HF transformers attention backend: ``attn_implementation="lrkernels"``.

Importing this module registers the name ``"lrkernels"`` with both of transformers'
registries::

    import lrkernels.integrations.transformers  # noqa: F401  (registers "lrkernels")
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="lrkernels")

- ``AttentionInterface``: every attention layer of the model calls :func:`attention_forward`,
  which runs :func:`lrkernels.gqa_attention` on the layer's query, key and value heads as they
  are. A GQA model's key/value heads are read once per group, never copied Hq/Hkv times
  (transformers' sdpa path calls ``repeat_kv`` whenever a mask is present).
- ``AttentionMaskInterface``: transformers builds the mask per attention implementation and
  silently drops it for a name registered only as an attention function, so the same name is
  registered with transformers' boolean (batch, 1, q_len, kv_len) mask builder. That mask is
  broadcast over the heads inside the kernel, never expanded. Where transformers can skip the
  mask (no padding, and a pure causal or bidirectional pattern) the kernel gets ``causal=`` and
  no mask at all.

Works for LLaMA-family decoders (Llama, Mistral, Qwen2, SmolLM, ...: RoPE, GQA, padded batches,
``generate()`` with a dynamic or static cache) and encoders such as BERT. Not supported, with a
clear error: attention dropout during training, soft-capping, position biases and attention
sinks.
"""
from __future__ import annotations

import torch

NAME = "lrkernels"

_UNSUPPORTED_KWARGS = ("softcap", "position_bias", "s_aux", "sinks")


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention-function signature, on :func:`lrkernels.gqa_attention`.

    ``query`` (batch, q_heads, q_len, head_dim); ``key``, ``value`` (batch, kv_heads, kv_len,
    head_dim); ``attention_mask`` None or broadcastable to (batch, q_heads, q_len, kv_len),
    boolean (True = attend) or additive. Returns ``(output (batch, q_len, q_heads, head_dim),
    None)``: no attention weights are formed.
    """
    from ..ops.gqa import gqa_attention

    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise ValueError(f"lrkernels attention: `{name}` is not supported; use attn_implementation='eager' "
                             f"for this model")
    if dropout:
        raise ValueError(f"lrkernels attention: attention dropout ({dropout}) is not supported; set the config's "
                         f"attention dropout to 0 to train with attn_implementation='lrkernels'")
    q_len, kv_len = query.shape[2], key.shape[2]
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    causal = False
    if attention_mask is None and is_causal and q_len > 1:
        # transformers leaves the mask out only where SDPA's top-left aligned `is_causal` is
        # right. That equals our bottom-right alignment once the keys past q_len (the empty rest
        # of a static cache at prefill) are dropped.
        causal = True
        if kv_len > q_len:
            key, value = key[:, :, :q_len], value[:, :, :q_len]
    out = gqa_attention(query, key, value, causal=causal, scale=scaling, attn_mask=attention_mask)
    return out.transpose(1, 2).contiguous(), None


def register(name: str = NAME) -> str:
    """Register :func:`attention_forward` and the boolean mask builder under ``name`` with
    transformers (idempotent). Returns the name to pass as ``attn_implementation``."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as e:
        raise ImportError("lrkernels.integrations.transformers needs the transformers package") from e
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


register()
