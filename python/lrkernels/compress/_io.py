"""Loading a compressed checkpoint."""
from __future__ import annotations

from pathlib import Path


def load_compressed(path, *, model_class=None, dtype=None, **kwargs):
    """Load a checkpoint written by ``save_pretrained`` after :func:`compress_kv_heads`.

    Decoders are standard transformers GQA checkpoints (plain ``from_pretrained`` loads them;
    this does the same). BERT checkpoints carry ``num_key_value_heads`` in their config: the
    model is built from the config, its self-attentions replaced by GQABertSelfAttention, and
    the weights loaded with the same names (every key must match).
    """
    import torch
    import transformers

    from ._arch import ENCODER_TYPES, EncoderFamily

    path = Path(path)
    config = transformers.AutoConfig.from_pretrained(str(path))
    cls = model_class or transformers.AutoModel
    if config.model_type not in ENCODER_TYPES or not getattr(config, "num_key_value_heads", None):
        return cls.from_pretrained(str(path), dtype=dtype, **kwargs)
    from safetensors.torch import load_file

    model = cls.from_config(config, dtype=dtype or torch.float32, **kwargs)
    fam = EncoderFamily(model)
    kv, d = int(config.num_key_value_heads), fam.head_dim
    for layer in fam.layers():
        s = layer.attention.self
        for name in ("key", "value"):
            old = getattr(s, name)
            setattr(s, name, torch.nn.Linear(old.in_features, kv * d, bias=old.bias is not None,
                                              dtype=old.weight.dtype))
        fam.set_kv_heads(layer, kv)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"load_compressed: no *.safetensors in {path}")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    # checkpoints of a bare BertModel may be saved with or without the "bert." prefix
    own = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and not any(k in own for k in state) and any(k.startswith(prefix + ".") for k in state):
        state = {k[len(prefix) + 1:]: v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if unexpected or any(".attention." in k for k in missing):
        raise ValueError(f"load_compressed: checkpoint keys do not match the compressed model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if missing:  # e.g. a pooler the saved model did not have: left as initialised, as from_pretrained does
        import warnings

        warnings.warn(f"load_compressed: {len(missing)} weights not in the checkpoint were left as initialised: "
                      f"{missing[:5]}")
    return model.eval()
