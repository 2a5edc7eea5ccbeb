import os
import tempfile

# Inductor caches compiled graphs across processes (by default under /tmp/torchinductor_$USER)
# and its cache key does not cover our ops' schemas: a graph compiled by another checkout with
# a different lrkernels schema would be replayed here. Each test session compiles afresh.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="lrkernels-inductor-"))

import pytest  # noqa: E402
import torch  # noqa: E402

import lrkernels  # noqa: F401  (registers the ops)

HAS_CUDA = torch.cuda.is_available() and lrkernels.build_info()["cuda"]


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device and a CUDA build of lrkernels")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


HAS_AVX512 = lrkernels.build_info()["cpu_avx512"]

# The CPU instruction sets the vectorised kernels can run with here: compiled by this build and
# run by this CPU (e.g. ["default", "avx2"] on an AVX2 machine).
_ORDER = ("default", "avx2", "avx512")
CPU_CAPABILITIES = [c for c in _ORDER if c in lrkernels.build_info()["cpu_capabilities_compiled"]
                    and _ORDER.index(c) <= _ORDER.index(lrkernels.build_info()["cpu_capability_detected"])]


@pytest.fixture(params=["aten", "blocked"])
def cpu_kernels(request):
    """Runs a test once with the ATen-composition CPU path and once with the blocked kernels
    forced on at every size (over at::vec: they run with every instruction set)."""
    with lrkernels.use_cpu_kernels(request.param):
        yield request.param


@pytest.fixture(params=_ORDER)
def cpu_capability(request):
    """Runs a test once per CPU instruction set the vectorised kernels can use here; the ones
    this CPU or build lacks are skipped (and say so)."""
    if request.param not in CPU_CAPABILITIES:
        pytest.skip(f"the {request.param} kernels cannot run here (available: {CPU_CAPABILITIES})")
    with lrkernels.use_cpu_capability(request.param):
        yield request.param


def cpu_dtypes():
    return [torch.float32, torch.float64, torch.bfloat16]


def cuda_dtypes():
    return [torch.float32, torch.float16, torch.bfloat16]


def assert_close_to_oracle(out, oracle64, low_prec, name="output", floor=None, mag=None):
    """FlashAttention's rule: the kernel's error against the float64 oracle is at most twice
    that of the same formula evaluated in the input's low precision. Prints max and mean errors
    on failure.

    With ``mag`` (the elementwise magnitude the rounding errors scale with: for a sum of
    products, the same formula evaluated on the inputs' absolute values, e.g. |x| |W|ᵀ + |b|),
    the rule is applied per element: |out − ref| ≤ 2·c·mag + floor·mag, with c the low-precision
    reference's worst error relative to mag. So a small element is held to its own scale and
    cannot be entirely wrong under a bound set by the largest one. Without ``mag`` the bound is
    one absolute bound over the whole tensor (2·max reference error + floor·max|ref|).
    ``floor`` (relative) allows for exact-arithmetic cases where the reference has no error.
    """
    out64 = out.detach().to(torch.float64).cpu()
    ref = oracle64.detach().to(torch.float64).cpu()
    low = low_prec.detach().to(torch.float64).cpu()
    assert out64.shape == ref.shape, f"{name}: shape {tuple(out64.shape)} != oracle {tuple(ref.shape)}"
    assert torch.isfinite(out64).all(), f"{name}: non-finite values"
    if not ref.numel():
        return
    err = (out64 - ref).abs()
    ref_err = (low - ref).abs()
    if floor is None:
        floor = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}.get(out.dtype, 1e-6)
    if mag is not None:
        # an output stored in a low precision may differ from the reference by its own rounding
        if out.dtype.is_floating_point:
            floor = max(floor, torch.finfo(out.dtype).eps)
        m = mag.detach().to(torch.float64).cpu().abs().expand_as(ref)
        tiny = torch.finfo(torch.float64).tiny
        c = (ref_err / m.clamp_min(tiny)).masked_fill(m == 0, 0).max().item()
        bound = (2 * c + floor) * m
        bad = err > bound
        if bad.any():
            i = int(torch.argmax((err - bound).reshape(-1)))
            raise AssertionError(
                f"{name}: {int(bad.sum())} of {err.numel()} elements exceed their bound; worst at flat index {i}: "
                f"err {err.reshape(-1)[i].item():.3e} > bound {bound.reshape(-1)[i].item():.3e} "
                f"(|ref| {ref.reshape(-1)[i].abs().item():.3e}, mag {m.reshape(-1)[i].item():.3e}); "
                f"max err {err.max().item():.3e} (mean {err.mean().item():.3e}); low-precision reference's "
                f"worst error relative to mag {c:.3e}")
        return
    scale = ref.abs().max().item()
    bound = 2 * ref_err.max().item() + floor * max(scale, 1.0)
    assert err.max().item() <= bound, (
        f"{name}: max err {err.max().item():.3e} (mean {err.mean().item():.3e}) > bound {bound:.3e}; "
        f"low-precision reference max err {ref_err.max().item():.3e} (mean {ref_err.mean().item():.3e})")


def abs_inputs(inputs):
    """The same dict of inputs with every floating tensor replaced by its absolute value (float64,
    detached): evaluate an oracle on it to get the ``mag`` of assert_close_to_oracle."""
    return {k: (v.detach().abs().to(torch.float64) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in inputs.items()}


def env_flag(name):
    return os.environ.get(name, "0") == "1"


def tiny_decoder(arch, attn, *, seed=0, **config):
    """A small random-weight float64 LLaMA-family decoder ("llama", "mistral" or "qwen2") with
    attn_implementation `attn`; `config` overrides the config's fields (sizes included).
    Needs transformers (callers importorskip it first)."""
    import transformers

    torch.manual_seed(seed)
    fields = dict(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=128, attention_dropout=0.0, pad_token_id=0,
                  eos_token_id=1, bos_token_id=2)
    fields.update(config)
    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    cfg = cfg_cls(**fields)
    cfg._attn_implementation = attn
    return model_cls(cfg).to(torch.float64).eval()
