"""Where the attention projections of a supported transformers model live, and how to change a
layer's KV-head count in place.

Two families:

- LLaMA-family decoders (``llama``, ``mistral``, ``qwen2``; SmolLM is ``llama``): ``self_attn``
  with ``q_proj``/``k_proj``/``v_proj``/``o_proj``, rotate-half RoPE over the whole head (pair
  ``i`` is dims ``(i, i + head_dim/2)``), GQA native in transformers, so only the config's
  ``num_key_value_heads`` and the module's ``num_key_value_groups`` change.
- BERT-family encoders (``bert``): ``attention.self.{query,key,value}`` and
  ``attention.output.dense``, no RoPE; transformers has no GQA for them, so the self-attention is
  replaced by :class:`lrkernels.compress._bert.GQABertSelfAttention` (same state-dict names).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

DECODER_TYPES = ("llama", "mistral", "qwen2")
ENCODER_TYPES = ("bert",)
SUPPORTED = DECODER_TYPES + ENCODER_TYPES


@dataclass
class AttentionParts:
    """One layer's attention: the four projections and the module that owns q/k/v."""
    module: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear


class Family:
    """Adapter over one model: its config, layers and attention projections."""

    rope: bool
    causal: bool

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # ---- shape of the attention
    @property
    def num_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.num_heads)

    @property
    def head_dim(self) -> int:
        return int(getattr(self.config, "head_dim", None) or self.config.hidden_size // self.num_heads)

    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def attention(self, layer: nn.Module) -> AttentionParts:
        raise NotImplementedError

    def mlp_output(self, layer: nn.Module):
        """(the MLP's output linear, the module whose input ``arg`` is the residual the MLP's output
        is added to, ``arg``)."""
        raise NotImplementedError

    def set_kv_heads(self, layer: nn.Module, kv_heads: int) -> None:
        """After the projections of ``layer`` were rewritten: make its module run them."""
        raise NotImplementedError

    def set_config_kv_heads(self, kv_heads: int) -> None:
        self.config.num_key_value_heads = int(kv_heads)

    def forward_kwargs(self) -> dict:
        return {}

    def attention_window(self, layer_index: int):
        """The sliding-window length of layer ``layer_index``'s attention, or None (full)."""
        return None


class DecoderFamily(Family):
    rope = True
    causal = True

    def __init__(self, model):
        super().__init__(model)
        prf = getattr(self.config, "partial_rotary_factor", 1.0)
        if prf not in (None, 1, 1.0):
            raise ValueError(f"compress_kv_heads: partial rotary embeddings (partial_rotary_factor={prf}) are not "
                             f"supported")
        if self.head_dim % 2:
            raise ValueError(f"compress_kv_heads: rotary head_dim must be even, got {self.head_dim}")

    def layers(self):
        base = self.model.base_model
        if not hasattr(base, "layers"):
            raise ValueError(f"compress_kv_heads: {type(self.model).__name__} has no decoder layers "
                             f"(base_model.layers)")
        return base.layers

    def attention(self, layer):
        a = layer.self_attn
        return AttentionParts(a, a.q_proj, a.k_proj, a.v_proj, a.o_proj)

    def mlp_output(self, layer):
        # h = r + down(act(gate(LN(r))) * up(LN(r))), r the input of post_attention_layernorm
        return layer.mlp.down_proj, layer.post_attention_layernorm, 0

    def set_kv_heads(self, layer, kv_heads):
        a = layer.self_attn
        a.num_key_value_groups = self.num_heads // kv_heads
        if hasattr(a, "num_key_value_heads"):
            a.num_key_value_heads = kv_heads

    def forward_kwargs(self):
        return {"use_cache": False}

    def attention_window(self, layer_index):
        c = self.config
        win = getattr(c, "sliding_window", None)
        if not win:
            return None
        if c.model_type == "mistral":
            return int(win)
        types = getattr(c, "layer_types", None)
        if getattr(c, "use_sliding_window", False) and types and types[layer_index] == "sliding_attention":
            return int(win)
        return None


class EncoderFamily(Family):
    rope = False
    causal = False

    def layers(self):
        base = self.model.base_model
        if not hasattr(base, "encoder"):
            raise ValueError(f"compress_kv_heads: {type(self.model).__name__} has no encoder (base_model.encoder)")
        return base.encoder.layer

    def attention(self, layer):
        s = layer.attention.self
        return AttentionParts(s, s.query, s.key, s.value, layer.attention.output.dense)

    def mlp_output(self, layer):
        # BertOutput(f, r) = LayerNorm(dense(f) + r), r the attention block's output
        return layer.output.dense, layer.output, 1

    def set_kv_heads(self, layer, kv_heads):
        from ._bert import GQABertSelfAttention

        s = layer.attention.self
        if isinstance(s, GQABertSelfAttention):
            s.num_key_value_heads = kv_heads
        else:
            layer.attention.self = GQABertSelfAttention.from_bert(s, kv_heads)


def family_of(model) -> Family:
    """The adapter for ``model``; ValueError naming the architecture when it is not supported."""
    config = getattr(model, "config", None)
    mtype = getattr(config, "model_type", None)
    if mtype in DECODER_TYPES:
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError(f"compress_kv_heads: encoder-decoder {mtype} models are not supported")
        return DecoderFamily(model)
    if mtype in ENCODER_TYPES:
        if getattr(config, "add_cross_attention", False):
            raise ValueError("compress_kv_heads: BERT models with cross-attention are not supported")
        return EncoderFamily(model)
    name = type(model).__name__
    raise ValueError(f"compress_kv_heads: unsupported architecture {name} (model_type={mtype!r}); supported "
                     f"model types: {', '.join(SUPPORTED)}")
