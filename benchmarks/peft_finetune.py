"""A real fine-tune on CPU: PEFT vs accelerate(PEFT) vs the frozen model's forward + backward.

    python -m benchmarks.peft_finetune [--steps 3] [--loss-steps 20] [--only lora,bf16,dora,minilm,losses]

SmolLM2-135M-Instruct (lrkernels.integrations.models.load_smollm2) trained on 256-token windows
of CPython's pydoc_data.topics text (the calibration half), batch 4, LoRA r = 16 (alpha 32) on
q, k, v, o, gate, up and down, AdamW. Groups of candidates (each a full training step):

* ``lora``: LoRA in float32 with dropout 0.05: ``peft``, ``lrkernels`` (accelerate(peft)),
  ``floor`` (the frozen model's forward + backward: no adapter, no optimizer);
* ``bf16``: the same under ``torch.autocast("cpu", torch.bfloat16)`` (float32 weights);
* ``dora``: DoRA (use_dora=True, dropout 0.05);
* ``minilm``: all-MiniLM-L6-v2 LoRA r16 on query/key/value/dense, batch 4 × 256, an MSE loss
  on the mean-pooled embedding.
* ``losses``: the losses of ``--loss-steps`` steps of PEFT and accelerate(PEFT) with dropout 0
  from the same start, compared.

Steps take seconds here, so candidates of a group are interleaved (A B C A B C ...) for
``--steps`` timed steps after one warm-up step, and the median is reported. Peak memory: one
fresh process per candidate (benchmarks.peak's method: VmHWM of one step minus VmRSS after the
warm-up step). The run pauses between steps while /tmp/lrk_quiet exists. Not part of the
default suite (``python -m benchmarks``): it takes minutes.
"""
import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

import torch

QUIET = "/tmp/lrk_quiet"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQ, BATCH, RANK = 256, 4, 16


def _wait_quiet():
    while os.path.exists(QUIET):
        time.sleep(30)


class _StopDetector:
    """Notices when the process was stopped (SIGSTOP while another benchmark is measured) or
    starved for over a second: a thread that wakes every 50 ms records any longer gap. A timed
    step during which that happened is discarded and run again."""

    def __init__(self, gap_s=1.0):
        import threading

        self.gap_s, self.hit = gap_s, False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            t = time.monotonic()
            time.sleep(0.05)
            if time.monotonic() - t > self.gap_s:
                self.hit = True


def _batch(tok, n_batches=1, offset=0):
    from lrkernels.integrations.models import pydoc_topics

    calib, _ = pydoc_topics()
    ids = tok("\n\n".join(calib), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    need = (offset + n_batches) * BATCH * SEQ
    ids = ids[:need + SEQ]
    windows = ids[:(len(ids) // SEQ) * SEQ].reshape(-1, SEQ)
    return [windows[(offset + i) * BATCH:(offset + i + 1) * BATCH] for i in range(n_batches)]


def _smollm2():
    from lrkernels.integrations.models import load_smollm2

    model, tok = load_smollm2(dtype=torch.float32)
    model.config.use_cache = False
    return model.train(), tok


def _peft_model(base, dropout, use_dora=False):
    import peft

    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=dropout, target_modules=TARGETS,
                          use_dora=use_dora, init_lora_weights=True)
    return peft.get_peft_model(base, cfg)


def _train_step(model, ids, autocast):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
        with ctx:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def _floor_step(model, ids, autocast):
    """Forward + backward of the frozen model: the gradient flows back to the embeddings' output
    (as in LoRA training) but no weight gets one."""
    for p in model.parameters():
        p.requires_grad_(False)
    emb = model.get_input_embeddings()
    emb.register_forward_hook(lambda m, i, o: o.requires_grad_(True))

    def step():
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
        with ctx:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item()
    return step


def _group(name, only=None):
    """{candidate: step fn} for a group, built fresh (each candidate its own model copy); `only`:
    build just that candidate."""
    from lrkernels.integrations.peft import accelerate

    if name == "minilm":
        return _minilm_group()
    base, tok = _smollm2()
    ids = _batch(tok)[0]
    autocast = name == "bf16"
    out = {}
    if only in (None, "peft", "lrkernels"):
        peft_m = _peft_model(copy.deepcopy(base), 0.05, use_dora=name == "dora")
        if only in (None, "lrkernels"):
            acc = copy.deepcopy(peft_m) if only is None else peft_m
            report = accelerate(acc)
            assert len(report.accelerated) == 7 * base.config.num_hidden_layers and not report.skipped, report
            out["lrkernels"] = _train_step(acc, ids, autocast)
        if only in (None, "peft"):
            out["peft"] = _train_step(peft_m, ids, autocast)
    if only in (None, "floor"):
        out["floor"] = _floor_step(base, ids, autocast)
    return {k: out[k] for k in ("floor", "peft", "lrkernels") if k in out}


def _minilm_group():
    import peft
    from lrkernels.integrations.models import load_minilm, pydoc_topics
    from lrkernels.integrations.peft import accelerate

    model, tok = load_minilm(dtype=torch.float32)
    model.train()
    calib, _ = pydoc_topics()
    enc = tok(calib[:BATCH], truncation=True, max_length=SEQ, padding="max_length", return_tensors="pt")
    torch.manual_seed(0)
    target = torch.randn(BATCH, model.config.hidden_size)
    cfg = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.05, target_modules=["query", "key", "value",
                                                                                           "dense"])
    peft_m = peft.get_peft_model(copy.deepcopy(model), cfg)
    acc = copy.deepcopy(peft_m)
    accelerate(acc)

    def step_of(m, train=True):
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4) if train else None
        if not train:
            for p in m.parameters():
                p.requires_grad_(False)
            m.get_input_embeddings().register_forward_hook(lambda mod, i, o: o.requires_grad_(True))

        def step():
            h = m(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            pooled = (h * mask).sum(1) / mask.sum(1)
            loss = torch.nn.functional.mse_loss(pooled, target)
            loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            return loss.item()
        return step

    return {"floor": step_of(model, train=False), "peft": step_of(peft_m), "lrkernels": step_of(acc)}


def _time_group(fns, steps):
    for fn in fns.values():  # warm-up
        _wait_quiet()
        fn()
    times = {k: [] for k in fns}
    det = _StopDetector()
    for i in range(steps):
        order = list(fns.items()) if i % 2 == 0 else list(reversed(list(fns.items())))
        for name, fn in order:
            for _attempt in range(6):
                _wait_quiet()
                det.hit = False
                t0 = time.perf_counter()
                fn()
                took = time.perf_counter() - t0
                if not det.hit:
                    break
                print(f"   ({name}: step interrupted, {took:.1f} s discarded)", flush=True)
            times[name].append(took)
    return {k: statistics.median(v) for k, v in times.items()}, times


def _peak_child(group, candidate):
    """In a fresh process: build the group, warm the candidate up, then VmHWM − VmRSS of one step."""
    from benchmarks.peak import _release_frees_to_the_os, _reset_hwm, _status_kb
    import gc

    _release_frees_to_the_os()
    fns = _group(group, only=candidate)
    fn = fns[candidate]
    for other in list(fns):
        if other != candidate:
            del fns[other]
    gc.collect()
    fn()
    gc.collect()
    base = _status_kb("VmRSS")
    if not _reset_hwm():
        print("PEAK_MB nan")
        return
    fn()
    print(f"PEAK_MB {(_status_kb('VmHWM') - base) / 1024:.1f}", flush=True)


def _peak(group, candidate):
    _wait_quiet()
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-m", "benchmarks.peft_finetune", "--peak", group, candidate],
                         capture_output=True, text=True, env=env, timeout=1800)
    for line in out.stdout.splitlines():
        if line.startswith("PEAK_MB"):
            return float(line.split()[1])
    print(out.stderr[-2000:], file=sys.stderr)
    return None


def _losses(steps):
    """Losses of `steps` steps (dropout 0), PEFT and accelerate(PEFT), on successive batches."""
    from lrkernels.integrations.peft import accelerate

    base, tok = _smollm2()
    batches = _batch(tok, n_batches=steps)
    peft_m = _peft_model(base, 0.0)
    torch.manual_seed(0)
    with torch.no_grad():  # a non-zero B so the first steps already differ from the base model
        for n, p in peft_m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1e-3)
    acc = copy.deepcopy(peft_m)
    accelerate(acc)
    out = {}
    for name, m in (("peft", peft_m), ("lrkernels", acc)):
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        ls = []
        for ids in batches:
            _wait_quiet()
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            ls.append(loss.item())
        out[name] = ls
    diff = max(abs(a - b) for a, b in zip(out["peft"], out["lrkernels"]))
    return {"steps": steps, "peft": out["peft"], "lrkernels": out["lrkernels"], "max_abs_diff": diff,
            "max_rel_diff": max(abs(a - b) / abs(a) for a, b in zip(out["peft"], out["lrkernels"]))}


LABELS = {"lora": "SmolLM2-135M LoRA r16 fp32 dropout 0.05", "bf16": "SmolLM2-135M LoRA r16 bf16 autocast dropout 0.05",
          "dora": "SmolLM2-135M DoRA r16 fp32 dropout 0.05", "minilm": "all-MiniLM-L6-v2 LoRA r16 fp32 dropout 0.05"}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--peak":
        return _peak_child(argv[1], argv[2])
    ap = argparse.ArgumentParser(prog="python -m benchmarks.peft_finetune", description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per candidate (after one warm-up step)")
    ap.add_argument("--loss-steps", type=int, default=20)
    ap.add_argument("--only", default="lora,bf16,dora,minilm,losses")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    import lrkernels  # noqa: F401
    from benchmarks.harness import environment

    env = environment("cpu")
    results = {"env": env, "groups": {}}
    for group in [g for g in args.only.split(",") if g != "losses"]:
        print(f"== {LABELS[group]} (batch {BATCH} x {SEQ} tokens)", flush=True)
        fns = _group(group)
        med, all_times = _time_group(fns, args.steps)
        del fns
        peaks = {c: (None if args.no_memory else _peak(group, c)) for c in med}
        rows = {c: {"step_s": med[c], "times_s": all_times[c], "peak_mb": peaks[c]} for c in med}
        rows["ratios"] = {"lrkernels/peft": med["lrkernels"] / med["peft"], "peft/floor": med["peft"] / med["floor"],
                          "lrkernels/floor": med["lrkernels"] / med["floor"]}
        results["groups"][group] = rows
        for c in med:
            pk = "n/a" if peaks[c] is None else f"{peaks[c]:.0f} MB"
            print(f"   {c:>10}: {med[c]:7.2f} s/step  peak {pk}", flush=True)
        print("   " + ", ".join(f"{k} {v:.3f}x" for k, v in rows["ratios"].items()), flush=True)
    if "losses" in args.only.split(","):
        print(f"== losses of {args.loss_steps} steps, dropout 0, PEFT vs accelerate(PEFT)", flush=True)
        res = _losses(args.loss_steps)
        results["losses"] = res
        print(f"   peft      {[round(v, 5) for v in res['peft']]}\n   lrkernels {[round(v, 5) for v in res['lrkernels']]}"
              f"\n   max |diff| {res['max_abs_diff']:.2e} (relative {res['max_rel_diff']:.2e})", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
