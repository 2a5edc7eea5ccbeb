"""A BERT self-attention with fewer key/value heads than query heads, on lrkernels.gqa_attention.

transformers' BertSelfAttention assumes as many key/value heads as query heads. This module keeps
its state-dict names (``query``, ``key``, ``value``) so a compressed checkpoint saves and loads
with the same keys; only ``key`` and ``value`` have ``num_key_value_heads * head_dim`` rows.
Query head h uses KV head ``h // (num_attention_heads // num_key_value_heads)``.
"""
from __future__ import annotations

import torch
from torch import nn


class GQABertSelfAttention(nn.Module):
    def __init__(self, config, num_key_value_heads: int, *, device=None, dtype=None):
        super().__init__()
        H = config.num_attention_heads
        if num_key_value_heads < 1 or H % num_key_value_heads:
            raise ValueError(f"GQABertSelfAttention: num_key_value_heads ({num_key_value_heads}) must divide "
                             f"num_attention_heads ({H})")
        self.config = config
        self.num_attention_heads = H
        self.num_key_value_heads = int(num_key_value_heads)
        self.attention_head_size = config.hidden_size // H
        self.all_head_size = H * self.attention_head_size
        self.scaling = self.attention_head_size ** -0.5
        kv = self.num_key_value_heads * self.attention_head_size
        fk = {"device": device, "dtype": dtype}
        self.query = nn.Linear(config.hidden_size, self.all_head_size, **fk)
        self.key = nn.Linear(config.hidden_size, kv, **fk)
        self.value = nn.Linear(config.hidden_size, kv, **fk)
        self.dropout_p = float(config.attention_probs_dropout_prob)
        self.is_causal = False
        self.is_decoder = False

    @classmethod
    def from_bert(cls, attn: nn.Module, num_key_value_heads: int) -> "GQABertSelfAttention":
        """A module taking over ``attn``'s (already rewritten) query/key/value linears."""
        w = attn.query.weight
        m = cls(attn.config, num_key_value_heads, device=w.device, dtype=w.dtype)
        m.query, m.key, m.value = attn.query, attn.key, attn.value
        kv = m.num_key_value_heads * m.attention_head_size
        if m.key.out_features != kv or m.value.out_features != kv:
            raise ValueError(f"GQABertSelfAttention.from_bert: key/value must have {kv} rows for "
                             f"{num_key_value_heads} KV heads, got {m.key.out_features} and {m.value.out_features}")
        m.train(attn.training)
        return m

    def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):
        from ..integrations.transformers import attention_forward

        if cache is not None:
            raise ValueError("GQABertSelfAttention: a KV cache is not supported (encoder self-attention)")
        if kwargs.get("encoder_hidden_states") is not None:
            raise ValueError("GQABertSelfAttention: cross-attention is not supported")
        B, S, _ = hidden_states.shape
        d = self.attention_head_size
        q = self.query(hidden_states).view(B, S, -1, d).transpose(1, 2)
        k = self.key(hidden_states).view(B, S, -1, d).transpose(1, 2)
        v = self.value(hidden_states).view(B, S, -1, d).transpose(1, 2)
        if self.training and self.dropout_p > 0:
            # the lrkernels op has no attention dropout: train on SDPA with the heads repeated
            rep = self.num_attention_heads // self.num_key_value_heads
            mask = attention_mask
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask,
                dropout_p=self.dropout_p, scale=self.scaling).transpose(1, 2)
        else:
            out, _ = attention_forward(self, q, k, v, attention_mask, scaling=self.scaling, is_causal=False)
        return out.reshape(B, S, self.all_head_size), None
