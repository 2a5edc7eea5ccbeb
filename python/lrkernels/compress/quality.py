"""Quality figures of a compressed model: perplexity (decoders) and the cosine similarity of
mean-pooled sentence embeddings (encoders, as sentence-transformers pools)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _inputs(b, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in b.items()}


@torch.no_grad()
def perplexity(model, batches) -> float:
    """exp(mean next-token NLL) over every predicted token of the batches (padding left out)."""
    from ._collect import as_batches

    dev = next(model.parameters()).device
    nll, n = 0.0, 0
    for b in as_batches(batches, who="perplexity", arg="batches"):
        ids = b["input_ids"].to(dev)
        logits = model(**_inputs(b, dev), use_cache=False).logits[:, :-1].double()
        tgt = ids[:, 1:]
        lp = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none")
        mask = b.get("attention_mask")
        if mask is not None:
            keep = (mask[:, 1:].bool() & mask[:, :-1].bool()).reshape(-1).to(dev)
            lp = lp[keep]
        nll += float(lp.sum())
        n += lp.numel()
    return math.exp(nll / max(n, 1))


@torch.no_grad()
def sentence_embeddings(model, batches) -> torch.Tensor:
    """(sentences, hidden) float64: the last hidden state averaged over each sentence's tokens."""
    from ._collect import as_batches

    dev = next(model.parameters()).device
    out = []
    for b in as_batches(batches, who="sentence_embeddings", arg="batches"):
        h = model(**_inputs(b, dev)).last_hidden_state.double()
        mask = b.get("attention_mask")
        mask = torch.ones(h.shape[:2], dtype=torch.float64) if mask is None else mask.double()
        mask = mask.to(h.device)[..., None]
        out.append(((h * mask).sum(1) / mask.sum(1).clamp_min(1)).cpu())
    return torch.cat(out)


def evaluate(model, fam, batches):
    return perplexity(model, batches) if fam.causal else sentence_embeddings(model, batches)


def compare(model, fam, batches, reference) -> dict:
    if fam.causal:
        return {"perplexity_before": reference, "perplexity_after": perplexity(model, batches)}
    emb = sentence_embeddings(model, batches)
    cos = F.cosine_similarity(emb, reference, dim=-1)
    return {"embedding_cosine_mean": float(cos.mean()), "embedding_cosine_min": float(cos.min())}
