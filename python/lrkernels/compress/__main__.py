"""python -m lrkernels.compress: compress the KV heads of a local transformers checkpoint."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m lrkernels.compress",
        description="Compress the KV heads of a local transformers checkpoint (Llama / Mistral / Qwen2 decoders, "
                    "BERT encoders) and write the result: the model, its tokenizer and compress_report.json.")
    p.add_argument("checkpoint", help="directory of the checkpoint (config.json, weights, tokenizer)")
    p.add_argument("output", help="directory to write the compressed checkpoint to")
    p.add_argument("--kv-heads", type=int, required=True, help="KV heads per layer after compression")
    p.add_argument("--method", default="svd-a", choices=("mean", "svd-a"))
    p.add_argument("--key-objective", default="query", choices=("plain", "query", "attention"))
    p.add_argument("--value-objective", default="output", choices=("plain", "output"))
    p.add_argument("--grouping", default="similarity", choices=("contiguous", "similarity"))
    p.add_argument("--no-refit-output", action="store_true", help="do not refit o_proj by least squares")
    p.add_argument("--refit-target", default="layer", choices=("layer", "original"),
                   help="what the o_proj refit matches: the original layer's attention output on the same inputs, "
                        "or the original model's residual stream (see compress_kv_heads)")
    p.add_argument("--refit-mlp", action=argparse.BooleanOptionalAction, default=None,
                   help="refit each MLP's output linear onto the original model's layer output (default: on for "
                        "encoders, off for decoders)")
    p.add_argument("--ridge", type=float, default=1e-2, help="ridge of the o_proj refit (default 1e-2)")
    p.add_argument("--mlp-ridge", type=float, default=1e-1, help="ridge of the MLP refit (default 1e-1)")
    p.add_argument("--calibration", nargs="*", default=None,
                   help="text files to calibrate on (default: the even-indexed topics of CPython's reference "
                        "manual, pydoc_data.topics)")
    p.add_argument("--evaluation", nargs="*", default=None,
                   help="text files for the quality figures (default: none; 'pydoc' for the odd-indexed topics)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window (default 256)")
    p.add_argument("--max-windows", type=int, default=128, help="calibration windows at most (default 128)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "float64"))
    p.add_argument("--quiet", action="store_true", help="no per-layer progress")
    return p


def _texts(files, which):
    if files is None or files == ["pydoc"]:
        from ..integrations.models import pydoc_topics

        cal, ev = pydoc_topics()
        return cal if which == "calibration" else ev
    return [Path(f).read_text(encoding="utf-8") for f in files]


def _windows(tok, texts, seq_len, max_windows, batch_size, encoder):
    import torch

    if encoder:
        # an encoder sees sentences, not a stream: one window per text (truncated), padded
        texts = texts[:max_windows]
        return [dict(tok(texts[i:i + batch_size], return_tensors="pt", truncation=True, max_length=seq_len,
                         padding=True)) for i in range(0, len(texts), batch_size)]
    ids = tok("\n\n".join(texts), return_tensors="pt")["input_ids"][0]
    n = ids.numel() // seq_len
    if n == 0:
        raise SystemExit(f"the text has {ids.numel()} tokens, fewer than --seq-len {seq_len}")
    w = ids[: n * seq_len].reshape(n, seq_len)
    if n > max_windows:  # spread over the whole text
        w = w[torch.linspace(0, n - 1, max_windows).round().long()]
    return list(w.split(batch_size))


def main(argv=None):
    args = _parser().parse_args(argv)
    import torch
    import transformers

    from . import compress_kv_heads

    dtype = getattr(torch, args.dtype)
    config = transformers.AutoConfig.from_pretrained(args.checkpoint)
    encoder = config.model_type == "bert"
    cls = transformers.AutoModel if encoder else transformers.AutoModelForCausalLM
    model = cls.from_pretrained(args.checkpoint, dtype=dtype).eval()
    tok = transformers.AutoTokenizer.from_pretrained(args.checkpoint)
    cal = _windows(tok, _texts(args.calibration, "calibration"), args.seq_len, args.max_windows, args.batch_size,
                   encoder)
    ev = None
    if args.evaluation is not None:
        ev = _windows(tok, _texts(args.evaluation or ["pydoc"], "evaluation"), args.seq_len, args.max_windows,
                      args.batch_size, encoder)
    rep = compress_kv_heads(model, cal, kv_heads=args.kv_heads, method=args.method,
                            key_objective=args.key_objective, value_objective=args.value_objective,
                            grouping=args.grouping, refit_output=not args.no_refit_output,
                            refit_target=args.refit_target, refit_mlp=args.refit_mlp, ridge=args.ridge,
                            mlp_ridge=args.mlp_ridge, evaluation=ev,
                            progress=not args.quiet)
    out = Path(args.output)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "compress_report.json").write_text(json.dumps(rep.as_dict(), indent=1))
    print(rep.summary())
    print(f"wrote {out}" + (" (load it with lrkernels.compress.load_compressed)" if encoder else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
