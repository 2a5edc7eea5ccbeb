"""recover: a short LoRA fine-tune of a compressed model on lrkernels LoRA layers, optionally
distilling from the original model, merged back into plain linears at the end."""
from __future__ import annotations

import itertools
import math
import sys
import time
from typing import Any, Callable, Iterable, Optional, Union

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


def lr_factor(progress: float, warmup: float = 0.1) -> float:
    """The learning-rate multiplier at ``progress`` ∈ [0, 1] of a run: linear warm-up from 0 to 1
    over ``[0, warmup]``, then a cosine decay from 1 to 0 over ``[warmup, 1]``."""
    p = min(max(progress, 0.0), 1.0)
    if p < warmup:
        return p / warmup
    return 0.5 * (1 + math.cos(math.pi * (p - warmup) / (1 - warmup)))


class _Evaluator:
    """The quality figure of the model being fine-tuned on held-out data: perplexity for decoders,
    the cosine of mean-pooled embeddings against the teacher's for encoders."""

    def __init__(self, model, teacher, fam, data):
        from . import quality

        self.model, self.fam, self.q = model, fam, quality
        self.batches = as_batches(data, who="recover", arg="evaluation")
        self.reference = None if fam.causal else quality.sentence_embeddings(teacher, self.batches)

    def __call__(self) -> dict:
        was = self.model.training
        self.model.eval()
        try:
            if self.fam.causal:
                return {"perplexity": self.q.perplexity(self.model, self.batches)}
            c = self.q.compare(self.model, self.fam, self.batches, self.reference)
            return {"embedding_cosine_mean": c["embedding_cosine_mean"], "embedding_cosine_min": c["embedding_cosine_min"]}
        finally:
            self.model.train(was)


def _fmt_eval(fig: dict) -> str:
    return " ".join(f"{k} {v:.4g}" for k, v in fig.items())


def recover(model: nn.Module, data, *, steps: int, r: int = 16, alpha: Optional[float] = None, lr: float = 5e-4,
            targets: Union[str, Iterable[str]] = "all", teacher: Optional[nn.Module] = None, distill: float = 0.5,
            temperature: float = 1.0, weight_decay: float = 0.0, max_grad_norm: float = 1.0,
            time_limit_s: Optional[float] = None, warmup: float = 0.1, evaluation=None, eval_every: int = 0,
            callback: Optional[Callable[[dict], Any]] = None, progress: bool = True) -> dict:
    """Fine-tune ``model`` (after :func:`compress_kv_heads`) with rank-``r`` LoRA adapters
    (:class:`lrkernels.nn.LoRALinear`) on the ``targets`` linears of every layer, then merge the
    adapters into the weights and put the plain ``nn.Linear`` modules back, so the model keeps its
    architecture and checkpoint format.

    Args:
        data: token ids ``(B, S)``, a dict of model inputs, or an iterable of them; cycled over.
        steps: at most this many optimizer steps (AdamW, peak learning rate ``lr``).
        time_limit_s: the run ends by this many seconds after its start: no step starts that
            would end past it (judged by the duration of the step before), and a step that did
            end past it is the last. The time of the evaluations below counts, the final
            evaluation of the merged model does not (``train_seconds`` in the result is the
            run's time without it; ``seconds`` includes it).
        warmup: the learning-rate schedule follows the run's progress
            ``p = max(step / steps, elapsed / time_limit_s)``, taken at the middle of each step
            (``(i + ½) / steps`` for step ``i``; the time term only with a time limit): linear
            warm-up to ``lr`` while ``p < warmup``, then a cosine decay to 0 at ``p = 1``
            (:func:`lr_factor`). So a run bounded by steps warms up over its first ``warmup``
            of the steps, and a time-limited run with a huge ``steps`` (say ``10**6``) over its
            first ``warmup`` of the time, decaying until the time is up.
        targets: ``"attention"`` (q/k/v/o), ``"all"`` (attention and MLP) or module names inside
            a layer (``"self_attn.q_proj"`` for decoders, ``"attention.self.query"`` for BERT).
        teacher: the original model. Decoders: the loss is ``(1 − distill)·CE + distill·KL(teacher
            ‖ student)`` at ``temperature``; without a teacher, CE alone. Encoders need a teacher:
            the loss is the mean squared error between the token states.
        evaluation: optional held-out data (as ``data``), evaluated before the first step, every
            ``eval_every`` steps (0: only then and at the end) and on the merged model at the end:
            ``perplexity`` for decoders; ``embedding_cosine_mean`` / ``_min`` (mean-pooled token
            states against the teacher's) for encoders.
        callback: called after every step with a dict: ``step`` (1-based), ``loss``, ``lr``,
            ``seconds``, and the evaluation figures when the step was evaluated.
        progress: print a line per step (and per evaluation) to stderr.
    Returns a dict: ``steps`` done, ``seconds``, ``train_seconds`` (without the final
    evaluation), ``loss_first`` / ``loss_last`` (means over the first and last 10% of steps), ``losses``, ``lrs`` (the learning rate of each step) and
    ``evaluations`` (a list of ``{"step", "seconds", figures...}``; empty without ``evaluation``).
    """
    from ..nn import LoRALinear

    fam = family_of(model)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"recover: steps must be a positive int, got {steps!r}")
    if not 0 <= distill <= 1:
        raise ValueError(f"recover: distill must be in [0, 1], got {distill}")
    if time_limit_s is not None and not time_limit_s > 0:
        raise ValueError(f"recover: time_limit_s must be positive (or None), got {time_limit_s!r}")
    if not 0 <= warmup < 1:
        raise ValueError(f"recover: warmup must be in [0, 1), got {warmup!r}")
    if not isinstance(eval_every, int) or isinstance(eval_every, bool) or eval_every < 0:
        raise ValueError(f"recover: eval_every must be a non-negative int, got {eval_every!r}")
    if not fam.causal and teacher is None:
        raise ValueError("recover: an encoder has no labels to train on; pass teacher= (the original model)")
    batches = as_batches(data, who="recover", arg="data")
    dev = next(model.parameters()).device
    if teacher is not None:
        teacher.eval()
    evaluate = None if evaluation is None else _Evaluator(model, teacher, fam, evaluation)
    evaluations = []
    t0 = time.perf_counter()

    def log(msg):
        if progress:
            print(f"recover: {msg} [{time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)

    def run_eval(step):
        fig = evaluate()
        evaluations.append({"step": step, "seconds": time.perf_counter() - t0, **fig})
        log(f"step {step} evaluation: {_fmt_eval(fig)}")
        return fig

    if evaluate is not None:
        run_eval(0)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    wrapped = []
    for parent, attr, lin in _target_linears(fam, targets):
        lora = LoRALinear.from_linear(lin, r, alpha)
        setattr(parent, attr, lora)
        wrapped.append((parent, attr, lin, lora))
    params = [p for *_, lora in wrapped for p in (lora.lora_a, lora.lora_b)]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    was_training = model.training
    model.train()
    losses, lrs = [], []
    last_eval = 0
    try:
        step_s = 0.0  # the last step's duration (without its evaluation)
        for i, b in zip(range(steps), itertools.cycle(batches)):
            el = time.perf_counter() - t0
            if time_limit_s is not None and i > 0 and el + step_s > time_limit_s:
                break
            p = (i + 0.5) / steps
            if time_limit_s is not None:
                p = max(p, el / time_limit_s)
            for g in opt.param_groups:
                g["lr"] = lr * lr_factor(p, warmup)
            lrs.append(opt.param_groups[0]["lr"])
            loss = _loss(model, teacher, _inputs(b, dev), fam, distill, temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            losses.append(float(loss.detach()))
            end = time.perf_counter() - t0
            step_s, el = end - el, end
            log(f"step {i + 1}/{steps} loss {losses[-1]:.4f} lr {lrs[-1]:.3g}")
            rec = {"step": i + 1, "loss": losses[-1], "lr": lrs[-1], "seconds": el}
            if evaluate is not None and eval_every and (i + 1) % eval_every == 0:
                rec.update(run_eval(i + 1))
                last_eval = i + 1
            if callback is not None:
                callback(rec)
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
    train_s = time.perf_counter() - t0
    if evaluate is not None:
        if last_eval == len(losses):  # the figure of the merged model replaces the adapters' one
            evaluations.pop()
        run_eval(len(losses))
    k = max(1, len(losses) // 10)
    return {"steps": len(losses), "seconds": time.perf_counter() - t0, "train_seconds": train_s,
            "loss_first": sum(losses[:k]) / k,
            "loss_last": sum(losses[-k:]) / k, "losses": losses, "lrs": lrs, "evaluations": evaluations}
