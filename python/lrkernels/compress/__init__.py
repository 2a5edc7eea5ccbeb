"""KV-head compression: turn a trained MHA/GQA model into one with fewer key/value heads.

:func:`compress_kv_heads` merges each group of KV heads into one (mean-pooling, or the
calibrated SVD-a of arXiv 2406.07056 with RoPE-commuting key merges) and folds the merges into
q_proj / o_proj, so a LLaMA-family decoder stays a standard transformers GQA model; BERT's
self-attention runs on :func:`lrkernels.gqa_attention`. :func:`recover` fine-tunes the result
with LoRA (optionally distilling from the original) and merges the adapters back.
"""
from ._compress import compress_kv_heads
from ._report import CompressionReport, LayerReport
from ._bert import GQABertSelfAttention
from ._io import load_compressed
from .quality import perplexity, sentence_embeddings
from .recover import recover

__all__ = ["compress_kv_heads", "CompressionReport", "LayerReport", "GQABertSelfAttention", "load_compressed",
           "perplexity", "sentence_embeddings", "recover"]
