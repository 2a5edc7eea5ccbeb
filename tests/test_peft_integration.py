"""lrkernels.integrations.peft: accelerate(model) keeps PEFT's results, parameters and API.

Every comparison runs the same PEFT model twice, once as PEFT runs it and once accelerated (a
deep copy, so the parameters start equal): outputs, every parameter's gradient and the losses
of a few AdamW steps must agree. Dropout comparisons pin the mask: the kernels draw their
Philox seed from the global generator, so reseeding and drawing the seed again gives the mask
(lrkernels.dropout_mask) that a PEFT copy then applies through a fixed-mask module.
"""
import copy

import pytest
import torch
from torch import nn

import lrkernels
from lrkernels.ops._util import new_seed

TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def _peft():
    return pytest.importorskip("peft")


def _pi():
    _peft()
    from lrkernels.integrations import peft as pi
    return pi


class _Tiny(nn.Module):
    def __init__(self, d=16, h=24, dtype=torch.float32):
        super().__init__()
        self.up = nn.Linear(d, h, dtype=dtype)
        self.down = nn.Linear(h, d, bias=False, dtype=dtype)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def _lora_model(dtype=torch.float32, **cfg):
    peft = _peft()
    torch.manual_seed(0)
    base = _Tiny(dtype=dtype)
    cfg.setdefault("r", 4)
    cfg.setdefault("lora_alpha", 8)
    cfg.setdefault("target_modules", ["up", "down"])
    cfg.setdefault("init_lora_weights", False)  # random B: every gradient is non-trivial
    return peft.get_peft_model(base, peft.LoraConfig(**cfg))


def _pair(model):
    pi = _pi()
    acc = copy.deepcopy(model)
    report = pi.accelerate(acc)
    return model, acc, report


def _trainable(m):
    return {n: p for n, p in m.named_parameters() if p.requires_grad}


def _compare_fwd_bwd(ref, acc, x, tol, autocast=None):
    def run(m):
        m.zero_grad(set_to_none=True)
        ctx = torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)
        with ctx:
            y = m(x)
        (y.float().square().mean()).backward()
        return y, {n: p.grad for n, p in _trainable(m).items()}

    y_ref, g_ref = run(ref)
    y_acc, g_acc = run(acc)
    assert y_acc.dtype == y_ref.dtype
    torch.testing.assert_close(y_acc, y_ref, **tol)
    assert g_ref.keys() == g_acc.keys() and g_ref
    for n in g_ref:
        assert g_acc[n] is not None, n
        assert g_acc[n].dtype == g_ref[n].dtype, n
        torch.testing.assert_close(g_acc[n], g_ref[n], **tol, msg=lambda m: f"{n}: {m}")


def _losses(m, x, steps=4, autocast=None):
    opt = torch.optim.AdamW(_trainable(m).values(), lr=1e-2)
    out = []
    for _ in range(steps):
        ctx = torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)
        with ctx:
            loss = m(x).float().square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out


def _check_all(model, x, dtype=torch.float32, autocast=None, kind="lora"):
    ref, acc, report = _pair(model)
    assert set(report.accelerated.values()) == {kind}, report
    assert not report.skipped, report
    tol = TOL[torch.bfloat16 if (dtype == torch.bfloat16 or autocast) else torch.float32]
    _compare_fwd_bwd(ref, acc, x, tol, autocast)
    l_ref = _losses(copy.deepcopy(ref), x, autocast=autocast)
    l_acc = _losses(copy.deepcopy(acc), x, autocast=autocast)
    torch.testing.assert_close(torch.tensor(l_acc), torch.tensor(l_ref), **tol)
    assert not report.fallbacks(), report.fallbacks()
    return ref, acc, report


# ---------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("opts", [{}, {"use_rslora": True}, {"lora_bias": True}, {"r": 1, "lora_alpha": 3}],
                         ids=["plain", "rslora", "lora_bias", "rank1"])
def test_lora_matches_peft_fp32(opts):
    model = _lora_model(**opts)
    x = torch.randn(3, 5, 16)
    _check_all(model, x)


def test_lora_fp32_adapters_on_bf16_base():
    model = _lora_model(dtype=torch.bfloat16)  # PEFT keeps the adapters in float32 (autocast_adapter_dtype)
    assert model.base_model.model.up.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(3, 5, 16, dtype=torch.bfloat16)
    _check_all(model, x, dtype=torch.bfloat16)


def test_lora_under_bf16_autocast():
    model = _lora_model()
    x = torch.randn(3, 5, 16)
    _check_all(model, x, autocast=torch.bfloat16)


def test_several_active_adapters_summed():
    model = _lora_model()
    peft = _peft()
    model.add_adapter("other", peft.LoraConfig(r=6, lora_alpha=3, target_modules=["up", "down"],
                                               init_lora_weights=False, use_rslora=True))
    model.base_model.set_adapter(["default", "other"])
    x = torch.randn(2, 7, 16)
    _check_all(model, x)


def test_set_adapter_and_disable_adapter():
    model = _lora_model()
    peft = _peft()
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["up"], init_lora_weights=False))
    ref, acc, _ = _pair(model)
    x = torch.randn(4, 16)
    for m in (ref, acc):
        m.set_adapter("other")  # on "down" no adapter of that name: the base layer alone
    torch.testing.assert_close(acc(x), ref(x), **TOL[torch.float32])
    with ref.disable_adapter(), acc.disable_adapter():
        y_ref, y_acc = ref(x), acc(x)
        torch.testing.assert_close(y_acc, y_ref)
        inner = acc.base_model.model
        torch.testing.assert_close(y_acc, inner.down.base_layer(torch.tanh(inner.up.base_layer(x))))


def test_parameters_state_dict_and_restore():
    pi = _pi()
    model = _lora_model()
    before = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict().keys())
    x = torch.randn(4, 16)
    y0 = model(x)
    report = pi.accelerate(model)
    assert sorted(report.accelerated) == ["base_model.model.down", "base_model.model.up"]
    after = {n: p for n, p in model.named_parameters()}
    assert before.keys() == after.keys() and all(before[n] is after[n] for n in before)
    assert list(model.state_dict().keys()) == keys
    lora_up = model.base_model.model.up
    assert pi.is_accelerated(lora_up) and "forward" in lora_up.__dict__
    torch.testing.assert_close(model(x), y0, **TOL[torch.float32])
    assert "lrkernels" in str(report)
    assert pi.accelerate(model).accelerated == report.accelerated  # idempotent
    assert sorted(pi.restore(model)) == sorted(report.accelerated)
    assert not pi.is_accelerated(lora_up) and "forward" not in lora_up.__dict__
    torch.testing.assert_close(model(x), y0)


def test_accelerated_forward_runs_lrkernels(monkeypatch):
    """The accelerated layers really call the lrkernels op (and PEFT's lora_A / lora_B do not run)."""
    pi = _pi()
    model = _lora_model()
    pi.accelerate(model)
    calls = []
    import lrkernels.ops.lora as lora_ops
    real = lora_ops.lora_linear
    monkeypatch.setattr(lora_ops, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    ran_peft = []
    model.base_model.model.up.lora_A["default"].register_forward_hook(lambda *a: ran_peft.append(1))
    model(torch.randn(2, 16))
    assert len(calls) == 2 and not ran_peft


def test_merge_unmerge_and_merge_and_unload():
    model = _lora_model(lora_bias=True, target_modules=["up"])  # "down" has no bias to merge one into
    ref, acc, _ = _pair(model)
    x = torch.randn(4, 16)
    for m in (ref, acc):
        m.merge_adapter()
    assert acc.base_model.model.up.merged
    torch.testing.assert_close(acc(x), ref(x))
    for m in (ref, acc):
        m.unmerge_adapter()
    torch.testing.assert_close(acc(x), ref(x), **TOL[torch.float32])
    merged_ref, merged_acc = ref.merge_and_unload(), acc.merge_and_unload()
    assert isinstance(merged_acc.up, nn.Linear)
    torch.testing.assert_close(merged_acc(x), merged_ref(x), **TOL[torch.float32])


class _FixedMask(nn.Module):
    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask.reshape(x.shape).to(x.dtype)


def _pinned_dropout_reference(model, x, p, seed_rng):
    """A PEFT copy whose lora_dropout modules apply the masks the kernels will draw after
    torch.manual_seed(seed_rng) (one seed per adapter layer, in forward order: up, down)."""
    ref = copy.deepcopy(model)
    torch.manual_seed(seed_rng)
    inner = ref.base_model.model
    t = x.shape[:-1].numel()
    for name, n_in in (("up", x.shape[-1]), ("down", inner.up.out_features)):
        seed = new_seed(x.device)
        mask = lrkernels.dropout_mask(t, n_in, p, seed)
        getattr(inner, name).lora_dropout["default"] = _FixedMask(mask)
    return ref


@pytest.mark.parametrize("use_dora, p, seed, small_c", [(False, 0.3, 123, False), (True, 0.25, 77, False),
                                                       (True, 0.25, 77, True)],
                         ids=["lora", "dora", "dora-small-magnitude"])
def test_dropout_equals_peft_with_the_same_mask(use_dora, p, seed, small_c, monkeypatch):
    """DoRA on CPU float32 takes the dropout-complement path (x_d Wᵀ from x Wᵀ and the dropped
    entries) in both layers; with magnitudes that make 1 + (c − 1)·keep_scale small in "up" that
    layer keeps the two-GEMM formula. Both equal PEFT's with the same masks."""
    import lrkernels.ops.dora as dora_ops

    pi = _pi()
    model = _lora_model(lora_dropout=p, use_dora=use_dora)
    if small_c:
        with torch.no_grad():
            mag = model.base_model.model.up.lora_magnitude_vector["default"].weight
            mag[::2] *= 0.2  # c ≈ 0.2: k = 1 + (c − 1)/(1 − p) ≈ −0.07
    calls = []
    real = dora_ops.dropout_complement_linear
    monkeypatch.setattr(dora_ops, "dropout_complement_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    model.train()
    x = torch.randn(3, 5, 16)
    ref = _pinned_dropout_reference(model, x, p, seed)
    acc = copy.deepcopy(model)
    pi.accelerate(acc)
    torch.manual_seed(seed)
    y_acc = acc(x)
    y_acc.square().mean().backward()
    y_ref = ref(x)
    y_ref.square().mean().backward()
    torch.testing.assert_close(y_acc, y_ref, **TOL[torch.float32])
    for (n, pa), (_, pr) in zip(_trainable(acc).items(), _trainable(ref).items()):
        torch.testing.assert_close(pa.grad, pr.grad, **TOL[torch.float32], msg=lambda m: f"{n}: {m}")
    assert len(calls) == (0 if not use_dora else 1 if small_c else 2)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_dropout_statistics(use_dora):
    """Inverted dropout on one layer: the mean over many training-mode calls is the eval
    output (the layer is linear in its dropped input), the spread is not zero; eval mode draws
    nothing."""
    pi = _pi()
    model = _lora_model(lora_dropout=0.5, use_dora=use_dora, target_modules=["up"])
    pi.accelerate(model)
    layer = model.base_model.model.up
    x = torch.randn(2, 16)
    model.eval()
    with torch.no_grad():
        y_eval = layer(x)
        torch.testing.assert_close(layer(x), y_eval)
        model.train()
        ys = torch.stack([layer(x) for _ in range(2000)])
    assert not torch.allclose(ys[0], ys[1])
    torch.testing.assert_close(ys.mean(0), y_eval, rtol=0, atol=4 * ys.std(0).max().item() / 2000 ** 0.5)


# ---------------------------------------------------------------------------- mixed batches


def _three_adapters(**extra):
    peft = _peft()
    model = _lora_model(r=4, lora_alpha=8, **extra)
    model.add_adapter("a8", peft.LoraConfig(r=8, lora_alpha=4, target_modules=["up", "down"],
                                            init_lora_weights=False, **extra))
    model.add_adapter("a2", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["up"], use_rslora=True,
                                            init_lora_weights=False, **extra))
    return model


@pytest.mark.parametrize("lora_bias", [False, True])
def test_mixed_batch_matches_peft(lora_bias):
    model = _three_adapters(lora_bias=lora_bias)
    ref, acc, report = _pair(model)
    ref.eval(), acc.eval()
    x = torch.randn(5, 3, 16)
    names = ["a8", "__base__", "default", "a2", "a8"]
    import lrkernels.ops.multi_lora as ml
    calls = []
    real = ml.multi_lora_linear
    ml.multi_lora_linear = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        y_acc = acc(x, adapter_names=names)
    finally:
        ml.multi_lora_linear = real
    y_ref = ref(x, adapter_names=names)
    torch.testing.assert_close(y_acc, y_ref, **TOL[torch.float32])
    assert calls  # the multi-LoRA kernels ran
    assert not report.fallbacks(), report.fallbacks()
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        acc(x, adapter_names=names[:2])


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


_LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_generate_with_adapter_names():
    peft = _peft()
    model = peft.get_peft_model(_tiny_llama(), peft.LoraConfig(r=4, lora_alpha=16, target_modules=_LLAMA_TARGETS,
                                                              init_lora_weights=False))
    model.add_adapter("b", peft.LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))
    ref, acc, report = _pair(model)
    ref.eval(), acc.eval()
    assert len(report.accelerated) == 2 * 7
    ids = torch.randint(3, 64, (3, 6))
    names = ["b", "__base__", "default"]
    kw = dict(max_new_tokens=5, do_sample=False, adapter_names=names, pad_token_id=0)
    out_ref = ref.generate(input_ids=ids, **kw)
    out_acc = acc.generate(input_ids=ids, **kw)
    assert torch.equal(out_acc, out_ref)
    torch.testing.assert_close(acc(input_ids=ids, adapter_names=names).logits,
                               ref(input_ids=ids, adapter_names=names).logits, **TOL[torch.float32])
    assert not report.fallbacks(), report.fallbacks()


def test_hf_gradient_checkpointing():
    """transformers' gradient checkpointing (non-reentrant) on an accelerated PeftModel, with
    adapter dropout: same loss and gradients as without it (the recomputation regenerates the
    kernels' masks from the same seeds)."""
    peft = _peft()
    pi = _pi()
    model = peft.get_peft_model(_tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2,
                                                              target_modules=_LLAMA_TARGETS, init_lora_weights=False))
    pi.accelerate(model)
    model.train()
    ids = torch.randint(3, 64, (2, 10))

    def run():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(11)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in _trainable(model).items()}

    loss0, g0 = run()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.base_model.model.model.gradient_checkpointing
    loss1, g1 = run()
    torch.testing.assert_close(loss1, loss0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], msg=lambda m: f"{n}: {m}")


# ---------------------------------------------------------------------------- what is not supported


class _WithEmbeddingAndConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 16)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.proj = nn.Linear(16, 16)

    def forward(self, ids):
        h = self.emb(ids)  # (B, S, 16)
        h = self.conv(h.unsqueeze(1)).sum(1)
        return self.proj(h)


def test_unsupported_layers_keep_peft_behaviour_and_are_reported():
    peft = _peft()
    pi = _pi()
    torch.manual_seed(0)
    model = peft.get_peft_model(_WithEmbeddingAndConv(), peft.LoraConfig(r=2, target_modules=["emb", "conv", "proj"],
                                                                         init_lora_weights=False))
    ids = torch.randint(0, 10, (2, 5))
    ref = copy.deepcopy(model)
    report = pi.accelerate(model)
    assert list(report.accelerated) == ["base_model.model.proj"]
    assert set(report.skipped) == {"base_model.model.emb", "base_model.model.conv"}
    assert "Embedding" in report.skipped["base_model.model.emb"]
    assert "Conv2d" in report.skipped["base_model.model.conv"]
    y_acc, y_ref = model(ids), ref(ids)
    torch.testing.assert_close(y_acc, y_ref, **TOL[torch.float32])
    y_acc.sum().backward()
    y_ref.sum().backward()
    for (n, pa), (_, pr) in zip(_trainable(model).items(), _trainable(ref).items()):
        torch.testing.assert_close(pa.grad, pr.grad, **TOL[torch.float32], msg=lambda m: f"{n}: {m}")


def test_unsupported_call_falls_back_and_counts():
    """A float16 computation on CPU (no CPU kernels for float16) runs PEFT's forward, counted."""
    pi = _pi()
    model = _lora_model()
    ref = copy.deepcopy(model).half()
    acc = copy.deepcopy(model).half()
    report = pi.accelerate(acc)
    x = torch.randn(2, 16, dtype=torch.float16)
    torch.testing.assert_close(acc(x), ref(x))
    fb = report.fallbacks()
    assert fb and all("float16" in why for d in fb.values() for why in d)


# ---------------------------------------------------------------------------- save, compile, checkpointing


def test_save_and_reload_round_trip(tmp_path):
    peft = _peft()
    pi = _pi()
    model = _lora_model(lora_bias=True)
    pi.accelerate(model)
    x = torch.randn(3, 16)
    _losses(model, x, steps=2)  # train through the accelerated layers
    y = model(x).detach()
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    base = _Tiny()
    loaded = peft.PeftModel.from_pretrained(base, tmp_path)
    torch.testing.assert_close(loaded(x), y, **TOL[torch.float32])
    report = pi.accelerate(loaded)
    assert len(report.accelerated) == 2
    torch.testing.assert_close(loaded(x), y, **TOL[torch.float32])
    sd_a, sd_b = model.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys()


def _compile_model(kind):
    peft = _peft()
    torch.manual_seed(0)
    if kind == "lora":
        return _lora_model(lora_dropout=0.1, lora_bias=True)
    if kind == "dora":
        return _lora_model(lora_dropout=0.1, use_dora=True)
    if kind == "vera":
        return peft.get_peft_model(_Tiny(d=16, h=16), peft.VeraConfig(r=4, vera_dropout=0.1,
                                                                        target_modules=["up", "down"]))
    return peft.get_peft_model(_Tiny(), peft.MissConfig(r=8, target_modules=["up", "down"]))


@pytest.mark.parametrize("kind", ["lora", "dora", "vera", "miss"])
def test_torch_compile_fullgraph(kind):
    """The accelerated layers trace without graph breaks (fullgraph), eval and training mode."""
    pi = _pi()
    model = _compile_model(kind)
    model.eval()
    pi.accelerate(model)
    inner = model.base_model.model
    x = torch.randn(3, 16)
    y_eager = inner(x)
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):  # records each traced graph, then runs it as aot_eager would
        graphs.append(gm.code)
        from torch._dynamo.backends.debugging import aot_eager
        return aot_eager(gm, example_inputs)

    compiled = torch.compile(inner, fullgraph=True, backend=backend)
    y = compiled(x)
    torch.testing.assert_close(y, y_eager)
    y.square().mean().backward()
    model.train()  # training mode with dropout: traced too
    compiled(x).sum().backward()
    assert graphs and all("lrkernels" in g for g in graphs)  # our ops, not PEFT's forward, were traced


def test_gradient_checkpointing_same_masks():
    """Recomputation under torch.utils.checkpoint regenerates the same dropout masks."""
    pi = _pi()
    model = _lora_model(lora_dropout=0.3)
    model.train()
    pi.accelerate(model)
    x = torch.randn(4, 16, requires_grad=True)

    def grads(checkpointed):
        model.zero_grad(set_to_none=True)
        x.grad = None
        torch.manual_seed(5)
        y = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False) if checkpointed else model(x)
        y.square().sum().backward()
        return [x.grad.clone()] + [p.grad.clone() for p in _trainable(model).values()]

    for a, b in zip(grads(False), grads(True)):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------- DoRA


def test_dora_weight_norm_formula_float64():
    pi = _pi()
    torch.manual_seed(1)
    w = torch.randn(37, 29, dtype=torch.float64)
    a = torch.randn(5, 29, dtype=torch.float64)
    b = torch.randn(37, 5, dtype=torch.float64)
    s = 0.7
    dense = torch.linalg.vector_norm(w + s * (b @ a), dim=1)
    torch.testing.assert_close(pi.dora_weight_norm(w, a, b, s), dense, rtol=1e-12, atol=1e-12)
    # a bfloat16 W with float32 factors: rows converted block by block, result in float32
    wb = w.to(torch.bfloat16)
    got = pi.dora_weight_norm(wb, a.float(), b.float(), s)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), torch.linalg.vector_norm(wb.double() + s * (b @ a), dim=1),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("opts", [{}, {"use_rslora": True}], ids=["plain", "rslora"])
def test_dora_matches_peft_fp32(opts):
    model = _lora_model(use_dora=True, **opts)
    x = torch.randn(3, 5, 16)
    model.train()
    _check_all(model, x)
    model.eval()
    _check_all(model, x)


def test_dora_fp32_adapters_on_bf16_base_and_autocast():
    model = _lora_model(dtype=torch.bfloat16, use_dora=True)
    _check_all(model, torch.randn(3, 5, 16, dtype=torch.bfloat16), dtype=torch.bfloat16)
    model = _lora_model(use_dora=True)
    _check_all(model, torch.randn(3, 5, 16), autocast=torch.bfloat16)


def test_dora_norm_cache_follows_merges():
    model = _lora_model(use_dora=True)
    ref, acc, _ = _pair(model)
    x = torch.randn(4, 16)
    torch.testing.assert_close(acc(x), ref(x), **TOL[torch.float32])
    for m in (ref, acc):
        m.merge_adapter()
    torch.testing.assert_close(acc(x), ref(x), **TOL[torch.float32])
    for m in (ref, acc):
        m.unmerge_adapter()
    torch.testing.assert_close(acc(x), ref(x), **TOL[torch.float32])
    with torch.no_grad():  # the frozen base weight changed in place: the cached ‖W‖² must follow
        for m in (ref, acc):
            m.base_model.model.up.base_layer.weight.mul_(1.5)
    torch.testing.assert_close(acc(x), ref(x), **TOL[torch.float32])
    torch.testing.assert_close(acc.merge_and_unload()(x), ref.merge_and_unload()(x), **TOL[torch.float32])


# ---------------------------------------------------------------------------- VeRA, C3A, MiSS


def _randomize(model, names):
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(k in n for k in names):
                p.copy_(torch.randn_like(p) * 0.1)


def test_vera_matches_peft():
    peft = _peft()
    torch.manual_seed(0)
    model = peft.get_peft_model(_Tiny(d=16, h=16), peft.VeraConfig(r=6, target_modules=["up", "down"]))
    _randomize(model, ["vera_lambda_b"])
    x = torch.randn(3, 5, 16)
    _check_all(model, x, kind="vera")


def test_c3a_matches_peft():
    # Only the first layer: PEFT's C3A backward (BlockCircularConvolution, peft 0.21) returns a
    # wrong input gradient (off by O(1) against the dense product's in float64), so a C3A layer
    # below another one gets wrong kernel gradients in PEFT; the next test checks both layers
    # against a float64 oracle instead.
    peft = _peft()
    torch.manual_seed(0)
    model = peft.get_peft_model(_Tiny(), peft.C3AConfig(block_size=8, target_modules=["up"]))
    x = torch.randn(3, 5, 16)
    _check_all(model, x, kind="c3a")


def test_c3a_two_layers_match_float64_oracle():
    from lrkernels.reference.c3a import c3a_linear as c3a_ref
    peft = _peft()
    pi = _pi()
    torch.manual_seed(0)
    model = peft.get_peft_model(_Tiny(), peft.C3AConfig(block_size=8, target_modules=["up", "down"]))
    pi.accelerate(model)
    inner = model.base_model.model
    x = torch.randn(3, 5, 16)
    y = inner(x)
    y.square().mean().backward()
    ks = [inner.up.c3a_kernel["default"], inner.down.c3a_kernel["default"]]
    k64 = [k.detach().double().requires_grad_() for k in ks]
    up, down = inner.up.base_layer, inner.down.base_layer
    h = torch.tanh(c3a_ref(x, up.weight, up.bias, k64[0], scale=1 / 16))
    y64 = c3a_ref(h, down.weight, None, k64[1], scale=1 / 24)
    y64.square().mean().backward()
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    for k, k_ref in zip(ks, k64):
        torch.testing.assert_close(k.grad.double(), k_ref.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("init", [True, "mini", "bat"], ids=["balance", "mini", "bat"])
def test_miss_matches_peft(init):
    peft = _peft()
    torch.manual_seed(0)
    kw = {"mini_r": 4} if init == "mini" else {}
    model = peft.get_peft_model(_Tiny(d=16, h=24), peft.MissConfig(r=8, init_weights=init, target_modules=["up", "down"],
                                                                   **kw))
    _randomize(model, ["miss_block"])
    x = torch.randn(3, 5, 16)
    _check_all(model, x, kind="miss")


# ---------------------------------------------------------------------------- HF Trainer, GaLore


def _trainer_losses(model, tmp_path, bf16=False, optimizers=(None, None), steps=3):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    data = [{"input_ids": ids, "labels": ids.clone()} for ids in torch.randint(3, 64, (8, 12))]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2,
                                          learning_rate=1e-3, logging_steps=1, report_to="none", use_cpu=True,
                                          save_strategy="no", seed=0, bf16=bf16, disable_tqdm=True,
                                          dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=optimizers)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_hf_trainer_same_losses(tmp_path, bf16):
    peft = _peft()
    pi = _pi()
    model = peft.get_peft_model(_tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=_LLAMA_TARGETS,
                                                              init_lora_weights=False))
    acc = copy.deepcopy(model)
    report = pi.accelerate(acc)
    assert len(report.accelerated) == 14
    l_ref = _trainer_losses(model, tmp_path / "ref", bf16=bf16)
    l_acc = _trainer_losses(acc, tmp_path / "acc", bf16=bf16)
    assert len(l_ref) == 3
    torch.testing.assert_close(torch.tensor(l_acc), torch.tensor(l_ref), **TOL[torch.bfloat16 if bf16 else torch.float32])
    assert not report.fallbacks()


def test_galore_param_groups_with_trainer(tmp_path):
    from lrkernels.optim import GaLoreAdamW, galore_param_groups
    model = _tiny_llama().train()
    groups = galore_param_groups(model, target_modules=["q_proj", "v_proj", "up_proj"], rank=4, update_proj_gap=2,
                                 scale=0.25)
    projected = groups[-1]
    assert projected["rank"] == 4 and projected["update_proj_gap"] == 2 and projected["scale"] == 0.25
    assert len(projected["params"]) == 2 * 3 and all(p.dim() == 2 for p in projected["params"])
    n_all = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups) == n_all
    with pytest.raises(ValueError, match="no trainable"):
        galore_param_groups(model, target_modules=["nope"], rank=4)
    assert len(galore_param_groups(model, target_modules=r".*\.q_proj", rank=2)[-1]["params"]) == 2
    opt = GaLoreAdamW(groups, lr=1e-3)
    losses = _trainer_losses(model, tmp_path, optimizers=(opt, None), steps=4)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))


def test_ddp_and_fsdp2_match_single_process(tmp_path):
    """An accelerated PEFT model (LoRA and DoRA) under DDP and under FSDP2 fully_shard (DTensor
    parameters, frozen base weights sharded too) on 2 gloo ranks on CPU, each rank on half the
    batch, against one process on the whole batch — and that process against PEFT's own path:
    the same losses and trainable parameters after 6 AdamW steps, with no layer falling back to
    PEFT's forward."""
    _peft()
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    from dist_common import run_worker

    proc = run_worker("peft_dist_worker.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    load = lambda name: torch.load(tmp_path / f"{name}.pt", weights_only=True)  # noqa: E731
    for config in ("lora", "dora"):
        ref, single = load(f"{config}.peft"), load(f"{config}.single")
        assert single["fallbacks"] == 0
        torch.testing.assert_close(single["losses"], ref["losses"], rtol=1e-10, atol=1e-12)
        for a, b in zip(single["params"], ref["params"]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
        for mode in ("ddp", "fsdp"):
            ranks = [load(f"{config}.{mode}.rank{r}") for r in (0, 1)]
            for r in ranks:
                assert r["fallbacks"] == 0, (config, mode)
            for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
                assert torch.equal(a, b), (config, mode)  # the same weights on every rank
            # each rank's loss is over its half of the batch; their mean is the full batch's
            torch.testing.assert_close((ranks[0]["losses"] + ranks[1]["losses"]) / 2, single["losses"],
                                       rtol=1e-9, atol=1e-12, msg=f"{config} {mode}")
            for a, b in zip(single["params"], ranks[0]["params"]):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"{config} {mode}")
