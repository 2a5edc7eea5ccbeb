"""recover: a short LoRA fine-tune of a compressed model on lrkernels LoRA layers, optionally
distilling from the original model, merged back into plain linears at the end."""
from __future__ import annotations

import itertools
import sys
import time
from typing import Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._arch import family_of
from ._collect import as_batches

_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_DECODER_TARGETS = {"attention": _ATTN, "all": _ATTN + ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
_ENCODER_TARGETS = {"attention": ("attention.self.query", "attention.self.key", "attention.self.value",
                                  "attention.output.dense"),
                    "all": ("attention.self.query", "attention.self.key", "attention.self.value",
                            "attention.output.dense", "intermediate.dense", "output.dense")}


def _target_linears(fam, targets):
    table = _DECODER_TARGETS if fam.causal else _ENCODER_TARGETS
    names = table.get(targets, None) if isinstance(targets, str) else tuple(targets)
    if names is None:
        raise ValueError(f"recover: targets must be 'attention', 'all' or a list of module names inside a layer, "
                         f"got {targets!r}")
    found = []
    for layer in fam.layers():
        for name in names:
            parent_name, _, attr = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            lin = getattr(parent, attr, None)
            if not isinstance(lin, nn.Linear):
                raise ValueError(f"recover: target {name!r} is not an nn.Linear in {type(layer).__name__}")
            found.append((parent, attr, lin))
    return found


def _inputs(b, dev):
    return {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in b.items()}


def _loss(model, teacher, batch, fam, distill, temperature):
    out = model(**batch, **({"use_cache": False} if fam.causal else {}))
    if fam.causal:
        logits = out.logits[:, :-1].float()
        tgt = batch["input_ids"][:, 1:]
        mask = batch.get("attention_mask")
        keep = None if mask is None else (mask[:, 1:].bool() & mask[:, :-1].bool())
        flat = logits.reshape(-1, logits.shape[-1])
        ce = F.cross_entropy(flat, tgt.reshape(-1), reduction="none")
        ce = ce.mean() if keep is None else ce[keep.reshape(-1)].mean()
        if teacher is None or distill == 0:
            return ce
        with torch.no_grad():
            t = teacher(**batch, use_cache=False).logits[:, :-1].float()
        T = temperature
        kl = F.kl_div(F.log_softmax(flat / T, -1), F.log_softmax(t.reshape(-1, t.shape[-1]) / T, -1),
                      log_target=True, reduction="none").sum(-1) * (T * T)
        kl = kl.mean() if keep is None else kl[keep.reshape(-1)].mean()
        return (1 - distill) * ce + distill * kl
    # encoders: match the teacher's token states (no labels to train on)
    with torch.no_grad():
        t = teacher(**batch).last_hidden_state
    h = out.last_hidden_state
    mask = batch.get("attention_mask")
    keep = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device) if mask is None else mask.bool()
    return F.mse_loss(h[keep].float(), t[keep].float())


def recover(model: nn.Module, data, *, steps: int, r: int = 16, alpha: Optional[float] = None, lr: float = 5e-4,
            targets: Union[str, Iterable[str]] = "all", teacher: Optional[nn.Module] = None, distill: float = 0.5,
            temperature: float = 1.0, weight_decay: float = 0.0, max_grad_norm: float = 1.0,
            time_limit_s: Optional[float] = None, progress: bool = True) -> dict:
    """Fine-tune ``model`` (after :func:`compress_kv_heads`) with rank-``r`` LoRA adapters
    (:class:`lrkernels.nn.LoRALinear`) on the ``targets`` linears of every layer, then merge the
    adapters into the weights and put the plain ``nn.Linear`` modules back, so the model keeps its
    architecture and checkpoint format.

    Args:
        data: token ids ``(B, S)``, a dict of model inputs, or an iterable of them; cycled over.
        steps: optimizer steps (AdamW, ``lr``, linear warm-up over the first 10% then cosine decay).
        targets: ``"attention"`` (q/k/v/o), ``"all"`` (attention and MLP) or module names inside
            a layer (``"self_attn.q_proj"`` for decoders, ``"attention.self.query"`` for BERT).
        teacher: the original model. Decoders: the loss is ``(1 − distill)·CE + distill·KL(teacher
            ‖ student)`` at ``temperature``; without a teacher, CE alone. Encoders need a teacher:
            the loss is the mean squared error between the token states.
        time_limit_s: stop early when the fine-tune has run this long (the steps done are reported).
    Returns a dict: ``steps`` done, ``seconds``, ``loss_first`` / ``loss_last`` (means over the first
    and last 10% of steps), ``losses``.
    """
    from ..nn import LoRALinear

    fam = family_of(model)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"recover: steps must be a positive int, got {steps!r}")
    if not 0 <= distill <= 1:
        raise ValueError(f"recover: distill must be in [0, 1], got {distill}")
    if not fam.causal and teacher is None:
        raise ValueError("recover: an encoder has no labels to train on; pass teacher= (the original model)")
    batches = as_batches(data, who="recover", arg="data")
    dev = next(model.parameters()).device
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    if teacher is not None:
        teacher.eval()
    wrapped = []
    for parent, attr, lin in _target_linears(fam, targets):
        lora = LoRALinear.from_linear(lin, r, alpha)
        setattr(parent, attr, lora)
        wrapped.append((parent, attr, lin, lora))
    params = [p for *_, lora in wrapped for p in (lora.lora_a, lora.lora_b)]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warm = max(1, steps // 10)

    def lr_at(i):
        if i < warm:
            return (i + 1) / warm
        return 0.5 * (1 + torch.cos(torch.tensor((i - warm) / max(1, steps - warm) * torch.pi)).item())

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    was_training = model.training
    model.train()
    losses = []
    t0 = time.perf_counter()
    try:
        for i, b in zip(range(steps), itertools.cycle(batches)):
            loss = _loss(model, teacher, _inputs(b, dev), fam, distill, temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            sched.step()
            losses.append(float(loss))
            el = time.perf_counter() - t0
            if progress:
                print(f"recover: step {i + 1}/{steps} loss {losses[-1]:.4f} [{el:.0f} s]", file=sys.stderr, flush=True)
            if time_limit_s is not None and el >= time_limit_s:
                break
    finally:
        # merge ΔW into the shared base weight and put the plain linear back
        with torch.no_grad():
            for parent, attr, lin, lora in wrapped:
                lora.merge()
                setattr(parent, attr, lin)
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    k = max(1, len(losses) // 10)
    return {"steps": len(losses), "seconds": time.perf_counter() - t0, "loss_first": sum(losses[:k]) / k,
            "loss_last": sum(losses[-k:]) / k, "losses": losses}
