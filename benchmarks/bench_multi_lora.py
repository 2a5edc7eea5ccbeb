"""multi_lora_linear (every token with its own adapter) against PEFT's mixed-batch forward
(``adapter_names=`` per row: a masked sub-batch per adapter), the same tokens through a
single-adapter lora_linear (the floor the issue targets), the base linear alone, and, for the
low-rank path, the same work done as separate per-rank batches.

Shapes: the issue's CPU target (2048 tokens over 8 adapters, r = 16, 1024 -> 1024, fp32) and
GPU targets (LLaMA-7B 4096 -> 4096 bf16: prefill of 4096 tokens over 16 adapters, decode of
64 tokens each with its own adapter of 64, mixed ranks {8, 16, 64}), plus LLaMA-7B shapes on
CPU at a size that times in seconds.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .bench_lora import aten_path
from .harness import Case


def _make(T, din, dout, L, r_max, dtype, device, ranks=None, ids=None, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    t = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).to(dtype=dtype, device=device)  # noqa: E731
    if ids is None:
        ids = torch.randint(0, L, (T,), generator=g)  # unsorted, every adapter present
    d = dict(x=t(T, din), weight=t(dout, din, sc=1 / math.sqrt(din)), bias=t(dout),
             lora_a=t(L, r_max, din, sc=1 / math.sqrt(din)), lora_b=t(L, dout, r_max, sc=1 / math.sqrt(r_max)),
             gy=t(T, dout), ids=ids.to(device),
             scales=torch.full((L,), 2.0, device=device),
             ranks=None if ranks is None else torch.tensor(ranks, dtype=torch.int32, device=device))
    return d


def _peft_layer(d, L, r, device, dtype):
    import peft

    din, dout = d["weight"].shape[1], d["weight"].shape[0]
    base = nn.Linear(din, dout, device=device, dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(d["weight"])
        base.bias.copy_(d["bias"])
    holder = nn.Sequential()
    holder.add_module("proj", base)
    cfg = lambda: peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"])  # noqa: E731
    model = peft.get_peft_model(holder, cfg(), adapter_name="a0")
    for l in range(1, L):
        model.add_adapter(f"a{l}", cfg())
    model.eval()
    layer = model.base_model.model.proj
    with torch.no_grad():
        for l in range(L):
            layer.lora_A[f"a{l}"].weight.copy_(d["lora_a"][l, :r])
            layer.lora_B[f"a{l}"].weight.copy_(d["lora_b"][l, :, :r])
    return layer


def _forward_case(name, T, din, dout, L, r, device, dtype, targets, note="", peft_baseline=True):
    def build():
        import lrkernels

        d = _make(T, din, dout, L, r, dtype, device)
        x, w, b, la, lb, ids, sc = d["x"], d["weight"], d["bias"], d["lora_a"], d["lora_b"], d["ids"], d["scales"]
        nograd = torch.no_grad

        def ml():
            with nograd():
                return lrkernels.multi_lora_linear(x, w, b, la, lb, ids, scales=sc)

        la0, lb0 = la[0].contiguous(), lb[0].contiguous()

        def single():
            with nograd():
                return lrkernels.lora_linear(x, w, b, la0, lb0, scale=2.0)

        def base():
            with nograd():
                return F.linear(x, w, b)

        c = {"lrkernels": ml, "lora_linear_single_adapter": single, "base_linear": base}
        if device == "cpu":
            c["lrkernels_aten"] = aten_path(ml)  # the blocked kernels off, for the record
        if peft_baseline:
            try:
                layer = _peft_layer(d, L, r, device, dtype)
                names = [f"a{i}" for i in ids.tolist()]

                def peft_mixed():
                    with nograd():
                        return layer(x, adapter_names=names)

                c["peft_mixed_batch"] = peft_mixed
            except ImportError as e:
                c["peft_mixed_batch"] = f"peft not installed ({e})"
        return c

    flops = 2 * T * din * dout + 4 * T * r * (din + dout)
    by = d_bytes(T, din, dout, L, r, dtype)
    baselines = ["peft_mixed_batch", "lora_linear_single_adapter", "base_linear"] if peft_baseline else \
        ["lora_linear_single_adapter", "base_linear"]
    if device == "cpu":
        baselines.append("lrkernels_aten")
    return Case(name=name, setup=build, subject="lrkernels", baselines=baselines, flops=flops, bytes=by,
                targets=targets, note=note)


def d_bytes(T, din, dout, L, r, dtype):
    es = torch.tensor([], dtype=dtype).element_size()
    return es * (T * din + din * dout + T * dout + L * r * (din + dout))


def _train_case(name, T, din, dout, L, r, device, dtype):
    def build():
        import lrkernels

        d = _make(T, din, dout, L, r, dtype, device)
        x = d["x"].requires_grad_(True)
        la = d["lora_a"].clone().requires_grad_(True)
        lb = d["lora_b"].clone().requires_grad_(True)
        w, b, ids, sc, gy = d["weight"], d["bias"], d["ids"], d["scales"], d["gy"]

        def ml():
            x.grad = la.grad = lb.grad = None
            y = lrkernels.multi_lora_linear(x, w, b, la, lb, ids, scales=sc)
            torch.autograd.backward(y, gy)

        masks = [(ids == l) for l in range(L)]

        def eager_masked():
            # The straightforward training loop: a masked pass per adapter (PEFT's structure).
            x.grad = la.grad = lb.grad = None
            y = F.linear(x, w, b)
            for l in range(L):
                m = masks[l]
                y = y.index_put((m,), y[m] + 2.0 * F.linear(F.linear(x[m], la[l]), lb[l]))
            torch.autograd.backward(y, gy)

        return {"lrkernels": ml, "eager_masked_loop": eager_masked}

    return Case(name=name, setup=build, subject="lrkernels", baselines=["eager_masked_loop"],
                flops=2 * 2 * T * din * dout + 3 * 2 * T * r * (din + dout),  # x Wᵀ, dy W (W frozen) + adapters
                note="fwd+bwd, base weight frozen: grads for x, lora_a, lora_b")


class _ZeroBase(nn.Module):
    """Stands in for PEFT's base layer so that only its adapter path is timed."""

    def __init__(self, out_features):
        super().__init__()
        self.out_features = out_features

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


def _adapter_path_case(name, T, din, dout, L, r, device, dtype, note=""):
    """The part that differs between implementations: everything but the base GEMM. PEFT's
    layer gets a base layer that only allocates zeros; lrkernels groups the tokens and runs
    shrink + expand into a zero output."""
    def build():
        import lrkernels

        d = _make(T, din, dout, L, r, dtype, device)
        x, la, lb, ids, sc = d["x"], d["lora_a"], d["lora_b"], d["ids"], d["scales"]

        def ml():
            y = torch.zeros(T, dout, dtype=dtype, device=device)
            seg = lrkernels.multi_lora_segments(ids, L)
            lrkernels.lora_expand_(y, lrkernels.lora_shrink(x, la, ids, seg), lb, ids, seg, scales=sc)
            return y

        c = {"lrkernels": ml}
        try:
            layer = _peft_layer(d, L, r, device, dtype)
            layer.base_layer = _ZeroBase(dout)
            names = [f"a{i}" for i in ids.tolist()]

            def peft_mixed():
                with torch.no_grad():
                    return layer(x, adapter_names=names)

            c["peft_mixed_batch_adapter_path"] = peft_mixed
        except ImportError as e:
            c["peft_mixed_batch_adapter_path"] = f"peft not installed ({e})"
        return c

    return Case(name=name, setup=build, subject="lrkernels", baselines=["peft_mixed_batch_adapter_path"],
                flops=4 * T * r * (din + dout), targets={"peft_mixed_batch_adapter_path": 0.5}, note=note)


def _mixed_rank_case(name, T, din, dout, device, dtype, ranks_cycle=(8, 16, 64), note=""):
    """The low-rank path alone (shrink + expand) for a batch mixing ranks, against the same
    tokens split into one batch per rank, each padded only to its own rank. The baseline's
    batches are pre-grouped in set-up (contiguous x, own y), so the subject also pays the
    gather/scatter that the baseline does not."""
    def build():
        import lrkernels

        L = len(ranks_cycle)
        r_max = max(ranks_cycle)
        d = _make(T, din, dout, L, r_max, dtype, device, ranks=list(ranks_cycle))
        x, la, lb, ids, sc, rk = d["x"], d["lora_a"], d["lora_b"], d["ids"], d["scales"], d["ranks"]
        y = torch.zeros(T, dout, dtype=dtype, device=device)
        seg = lrkernels.multi_lora_segments(ids, L)

        def mixed():
            h = lrkernels.lora_shrink(x, la, ids, seg, ranks=rk)
            lrkernels.lora_expand_(y, h, lb, ids, seg, scales=sc, ranks=rk)

        parts = []
        for l, r in enumerate(ranks_cycle):
            rows = (ids == l).nonzero().flatten()
            xs = x[rows].contiguous()
            ids_l = torch.zeros(rows.numel(), dtype=torch.int64, device=device)
            seg_l = lrkernels.multi_lora_segments(ids_l, 1)
            parts.append((xs, la[l:l + 1, :r].contiguous(), lb[l:l + 1, :, :r].contiguous(), ids_l, seg_l,
                          sc[l:l + 1], torch.zeros(rows.numel(), dout, dtype=dtype, device=device)))

        def separate():
            for xs, a_l, b_l, ids_l, seg_l, s_l, y_l in parts:
                h = lrkernels.lora_shrink(xs, a_l, ids_l, seg_l)
                lrkernels.lora_expand_(y_l, h, b_l, ids_l, seg_l, scales=s_l)

        return {"lrkernels": mixed, "sum_of_own_rank_batches": separate}

    return Case(name=name, setup=build, subject="lrkernels", baselines=["sum_of_own_rank_batches"],
                targets={"sum_of_own_rank_batches": 1.0}, note=note)


def _decode_case(name, din, dout, L, r, device, dtype, targets, note):
    def build():
        import lrkernels

        d = _make(L, din, dout, L, r, dtype, device, ids=torch.randperm(L))
        x, la, lb, ids, sc = d["x"], d["lora_a"], d["lora_b"], d["ids"], d["scales"]
        y = torch.zeros(L, dout, dtype=dtype, device=device)
        seg = lrkernels.multi_lora_segments(ids, L)

        def lowrank():
            h = lrkernels.lora_shrink(x, la, ids, seg)
            lrkernels.lora_expand_(y, h, lb, ids, seg, scales=sc)

        def full():
            with torch.no_grad():
                return lrkernels.multi_lora_linear(x, d["weight"], d["bias"], la, lb, ids, scales=sc, segments=seg)

        return {"lrkernels": lowrank, "multi_lora_linear_with_base": full}

    es = torch.tensor([], dtype=dtype).element_size()
    adapter_bytes = L * r * (din + dout) * es  # every adapter's A and B read once: the floor
    return Case(name=name, setup=build, subject="lrkernels", baselines=["multi_lora_linear_with_base"],
                bytes=adapter_bytes, targets=targets, note=note)


def cases(device: str, quick: bool) -> list:
    tq, tt = (128, 256) if quick else (512, 1024)
    if device == "cpu":
        out = [
            _forward_case("issue-cpu 2048tok/8 adapters 1024->1024 r16 fp32 fwd", 2048, 1024, 1024, 8, 16, "cpu",
                          torch.float32, {"peft_mixed_batch": 0.5, "lora_linear_single_adapter": 1.3},
                          note="Targets: >= 2x faster than PEFT mixed batch; <= 1.3x a single-adapter lora_linear."),
            _adapter_path_case("issue-cpu adapter path only 2048tok/8 adapters 1024->1024 r16 fp32", 2048, 1024,
                               1024, 8, 16, "cpu", torch.float32,
                               note="Base GEMM excluded on both sides (PEFT's base layer returns zeros)."),
            # (the names say the token count run: --quick runs fewer)
            _forward_case(f"llama7b-q {tq}tok/16 adapters 4096->4096 r16 fp32 fwd", tq, 4096,
                          4096, 16, 16, "cpu", torch.float32, {}),
            _train_case(f"train {tt}tok/4 adapters 1024->1024 r16 fp32 fwd+bwd", tt, 1024,
                        1024, 4, 16, "cpu", torch.float32),
            _mixed_rank_case("mixed ranks {8,16,64} 1024tok 1024->1024 fp32 shrink+expand", 1024, 1024, 1024, "cpu",
                             torch.float32),
        ]
        for c in out:  # the named cases that are also points of the curves below
            if c.name.startswith("issue-cpu 2048tok/8 adapters") and c.name.endswith("fwd"):
                c.params, c.sweep = {"tokens": 2048, "adapters": 8, "rank": 16}, "adapters,rank"
            elif c.name.startswith("mixed ranks {8,16,64}"):
                c.params, c.sweep = {"rank mix": "8,16,64"}, "rank mix"
        return out + _cpu_sweep_cases(quick)
    bf16 = torch.bfloat16
    return [
        _forward_case("llama7b prefill 4096tok/16 adapters 4096->4096 r16 bf16 fwd", 4096, 4096, 4096, 16, 16,
                      "cuda", bf16, {"base_linear": 1.15},
                      note="Target: adds <= 15% to the base GEMM (lrkernels / base_linear <= 1.15)."),
        _decode_case("llama7b decode 64tok x 64 adapters 4096->4096 r16 bf16 shrink+expand", 4096, 4096, 64, 16,
                     "cuda", bf16, {},
                     note="Target: adapter weights moved at >= 60% of measured HBM bandwidth (see GB/s)."),
        _mixed_rank_case("llama7b mixed ranks {8,16,64} 4096tok 4096->4096 bf16 shrink+expand", 4096, 4096, 4096,
                         "cuda", bf16, note="Target: no more than the sum of the per-rank batches."),
    ]


def _cpu_sweep_cases(quick):
    """Extra points of the CPU curves (the issue's 2048-token forward case is their shared point):
    number of adapters at r 16, rank at 8 adapters, and the adapters' rank mix (shrink + expand)."""
    out = []
    adapters = (32,) if quick else (1, 4, 32)
    ranks = () if quick else (8, 64)
    for L, r in [(L, 16) for L in adapters] + [(8, r) for r in ranks]:
        sweep = "adapters" if r == 16 else "rank"
        c = _forward_case(f"{sweep} curve: 2048tok/{L} adapters 1024->1024 r{r} fp32 fwd", 2048, 1024, 1024, L, r,
                          "cpu", torch.float32, {})
        c.params, c.sweep, c.headline = {"tokens": 2048, "adapters": L, "rank": r}, sweep, False
        out.append(c)
    for mix in ([] if quick else [(16, 16, 16), (4, 32, 128)]):
        c = _mixed_rank_case(f"rank mix curve: {{{','.join(map(str, mix))}}} 1024tok 1024->1024 fp32 shrink+expand",
                             1024, 1024, 1024, "cpu", torch.float32, ranks_cycle=mix)
        c.params, c.sweep, c.headline = {"rank mix": ",".join(map(str, mix))}, "rank mix", False
        out.append(c)
    return out
