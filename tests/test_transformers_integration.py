"""attn_implementation="lrkernels" in HF transformers: small random-weight models of each
architecture in float64 against transformers' eager attention (an exact reference up to
rounding), and the real SmolLM2-135M / all-MiniLM-L6-v2 against sdpa (skipped without their
packages)."""
import contextlib

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lrkernels.integrations.transformers as lt  # noqa: E402  (registers "lrkernels")
from lrkernels.integrations import models  # noqa: E402
from conftest import tiny_decoder  # noqa: E402

VOCAB = 97


def _decoder(arch, attn, *, seed=0, **over):
    return tiny_decoder(arch, attn, seed=seed, vocab_size=VOCAB, **over)


def _pair(arch, **over):
    """(sdpa, lrkernels) models with the same weights, float64. The reference is sdpa: in
    float64 eager's additive mask (finfo.min) overflows to -inf on the fully padded query rows of
    a left-padded batch, whose NaNs then reach every row through the padded values."""
    ref = _decoder(arch, "sdpa", **over)
    lrk = _decoder(arch, "lrkernels", **over)
    lrk.load_state_dict(ref.state_dict())
    assert lrk.config._attn_implementation == "lrkernels"
    return ref, lrk


def _left_padded(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    ids = torch.zeros(len(lengths), S, dtype=torch.long)
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, S - n:] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[b, S - n:] = 1
    return ids, mask


ARCHS = [("llama", {}), ("mistral", {"sliding_window": 5}), ("qwen2", {}),
         ("llama", {"num_key_value_heads": 6}), ("llama", {"num_key_value_heads": 1, "head_dim": 16})]


@contextlib.contextmanager
def no_repeat_kv():
    """Inside, transformers' repeat_kv raises: the lrkernels path must read each KV head in place."""
    def forbidden(*a, **k):
        raise AssertionError("repeat_kv was called")
    import transformers.integrations.sdpa_attention as sdpa
    import transformers.models.llama.modeling_llama as llama
    import transformers.models.mistral.modeling_mistral as mistral
    import transformers.models.qwen2.modeling_qwen2 as qwen2
    mods = [m for m in (sdpa, llama, mistral, qwen2) if hasattr(m, "repeat_kv")]
    saved = [m.repeat_kv for m in mods]
    for m in mods:
        m.repeat_kv = forbidden
    try:
        yield
    finally:
        for m, f in zip(mods, saved):
            m.repeat_kv = f


@pytest.mark.parametrize("arch,over", ARCHS,
                         ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}{x}" for k, x in v.items()))
def test_logits_match_reference_padded_batch(arch, over):
    ref, lrk = _pair(arch, **over)
    ids, mask = _left_padded([9, 4, 1, 7])
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        with no_repeat_kv():
            got = lrk(input_ids=ids, attention_mask=mask).logits
            alone = lrk(input_ids=ids[:1]).logits  # no mask at all: the kernel runs causal=True
        keep = mask.bool()
        torch.testing.assert_close(got[keep], want[keep], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(alone, ref(input_ids=ids[:1]).logits, rtol=1e-10, atol=1e-10)


def test_causal_mask_is_applied():
    """Registering only the attention function would drop the causal mask silently; a later token
    must not change earlier logits."""
    _, lrk = _pair("llama")
    ids, _ = _left_padded([10])
    other = ids.clone()
    other[0, 6:] = (other[0, 6:] + 5) % VOCAB
    with torch.no_grad():
        a, b = lrk(input_ids=ids).logits, lrk(input_ids=other).logits
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=0)
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-3


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_matches_reference_and_each_prompt_alone(cache):
    ref, lrk = _pair("llama")
    ids, mask = _left_padded([8, 3, 5])
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    if cache == "static":
        kw["cache_implementation"] = "static"
    with no_repeat_kv():
        got = lrk.generate(input_ids=ids, attention_mask=mask, **kw)
        for b, n in enumerate([8, 3, 5]):
            alone = lrk.generate(input_ids=ids[b:b + 1, -n:], **kw)
            assert torch.equal(alone[0, n:], got[b, ids.shape[1]:]), b
    want = ref.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(got, want)


def test_backward_matches_reference():
    ref, lrk = _pair("qwen2")
    ref.train(), lrk.train()
    ids, mask = _left_padded([9, 6])
    labels = ids.masked_fill(mask == 0, -100)
    with no_repeat_kv():
        lrk(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    ref(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    for (name, p), q in zip(lrk.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-11, msg=name)


def test_bert_encoder_matches_reference():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, attention_probs_dropout_prob=0.0,
                                  hidden_dropout_prob=0.0)
    cfg._attn_implementation = "sdpa"
    ref = transformers.BertModel(cfg).to(torch.float64).eval()
    cfg2 = transformers.BertConfig(**cfg.to_dict())
    cfg2._attn_implementation = "lrkernels"
    lrk = transformers.BertModel(cfg2).to(torch.float64).eval()
    lrk.load_state_dict(ref.state_dict())
    ids, mask = _left_padded([7, 3, 5])
    mask = mask.flip(1)  # BERT batches are right padded
    ids = ids.flip(1)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        got = lrk(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-10, atol=1e-10)


def test_unsupported_options_raise():
    ref, lrk = _pair("llama", attention_dropout=0.1)
    lrk.train()
    ids, _ = _left_padded([5])
    with pytest.raises(ValueError, match="attention dropout"):
        lrk(input_ids=ids)
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="softcap"):
        lt.attention_forward(torch.nn.Module(), q, q, q, None, softcap=30.0)


def test_register_is_idempotent():
    assert lt.register() == "lrkernels"
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    assert AttentionInterface._global_mapping["lrkernels"] is lt.attention_forward
    assert "lrkernels" in AttentionMaskInterface._global_mapping


# ------------------------------------------------------------------------- the real models

@pytest.fixture(scope="module")
def smollm2():
    try:
        ref, tok = models.load_smollm2(attn_implementation="sdpa")
        lrk, _ = models.load_smollm2(attn_implementation="lrkernels")
    except models.ModelUnavailable as e:
        pytest.skip(str(e))
    tok.padding_side = "left"
    return ref, lrk, tok


PROMPTS = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           "Once upon a time, in a small village by the sea,"]


def test_smollm2_logits_and_generation(smollm2):
    ref, lrk, tok = smollm2
    assert lrk.config.num_attention_heads == 9 and lrk.config.num_key_value_heads == 3
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=16, do_sample=False)
    with no_repeat_kv():
        with torch.no_grad():
            got = lrk(**enc).logits
        out = lrk.generate(**enc, **kw)
        S = enc["input_ids"].shape[1]
        for b, p in enumerate(PROMPTS):  # a left-padded batch gives each prompt's own tokens
            e = tok([p], return_tensors="pt")
            alone = lrk.generate(**e, **kw)[0, e["input_ids"].shape[1]:]
            assert len(alone) >= 4, p  # (a prompt the model answers with EOS at once tests nothing)
            assert torch.equal(alone, out[b, S:S + len(alone)]), p
    with torch.no_grad():
        want = ref(**enc).logits
    keep = enc["attention_mask"].bool()
    # float32 through 30 layers: both sides round differently at every layer
    torch.testing.assert_close(got[keep], want[keep], rtol=0, atol=1e-4 * want[keep].abs().max().item())
    assert torch.equal(out, ref.generate(**enc, **kw))


def test_minilm_embeddings():
    try:
        ref, tok = models.load_minilm(attn_implementation="sdpa")
        lrk, _ = models.load_minilm(attn_implementation="lrkernels")
    except models.ModelUnavailable as e:
        pytest.skip(str(e))
    enc = tok(["A short sentence.", "A considerably longer sentence, padded batches included."],
              return_tensors="pt", padding=True)
    with torch.no_grad():
        want, got = ref(**enc).last_hidden_state, lrk(**enc).last_hidden_state
    keep = enc["attention_mask"].bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=0, atol=1e-5 * want[keep].abs().max().item())
