"""Patched JetMoE (patch_model) in HF's runtime modes, each against HF's own model: bf16 autocast
(the tolerance rule against a run without autocast, fp32 master gradients), flex attention (HF's
BlockMask, against HF's sdpa on the same weights),
packed (padding-free) batches (position_ids restarting per document, ``cu_seq_lens_q/k``) against
each document run alone, ``output_attentions`` (eager: one tensor per layer, HF's head order) and
assisted / prompt-lookup decoding with attention outputs.

Models: the tiny random JetMoE of test_moa_hf.py (2 layers, 4 attention experts, top-2, 2 kv heads).
"""

import copy

import pytest
import torch

from helpers import (
    TRANSFORMERS_MIN,
    TRANSFORMERS_REASON,
    assert_close_to_ref,
    skip_unsupported_transformers,
)

transformers = pytest.importorskip(
    "transformers", minversion=TRANSFORMERS_MIN, reason=TRANSFORMERS_REASON
)
from mixops.integrations.transformers import patch_model  # noqa: E402
from test_moa_hf import batch, model  # noqa: E402

skip_unsupported_transformers()


def patched(hf):
    ours = copy.deepcopy(hf)
    patch_model(ours)
    return ours


# --- autocast -------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_autocast_bf16_loss_within_the_rule_and_fp32_master_grads(attn):
    # The reference runs without autocast, in fp64 (eager: fp32 and no padding, as in
    # test_moa_hf.py: HF's eager gives NaN in fp64 with padding, and its padding rows pass
    # gradient where SDPA's and mixops' do not).
    hf = model(attn).float()
    ours = patched(hf)
    ref = copy.deepcopy(hf).to(torch.float64 if attn == "sdpa" else torch.float32)
    ids, mask, labels = batch()
    if attn == "eager":
        mask, labels = torch.ones_like(mask), ids
    kw = dict(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
    want = ref(**kw)
    want.loss.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o_hf = hf(**kw)
        o = ours(**kw)
    o_hf.loss.backward()
    o.loss.backward()
    assert o.loss.dtype == o_hf.loss.dtype == torch.float32
    assert_close_to_ref(o.loss.detach(), want.loss, o_hf.loss.detach(), "loss under autocast")
    valid = mask.bool()
    assert_close_to_ref(o.logits[valid].detach(), want.logits[valid], o_hf.logits[valid].detach(),
                        "logits under autocast")  # fmt: skip
    named = zip(ours.named_parameters(), hf.parameters(), ref.parameters())
    for (n, p), p_hf, p_ref in named:
        assert p.dtype == torch.float32 and p.grad is not None, n
        assert p.grad.dtype == torch.float32, f"grad of {n}: {p.grad.dtype}"
        assert_close_to_ref(p.grad, p_ref.grad, p_hf.grad, f"grad of {n}")


# --- flex attention -------------------------------------------------------------------------


@torch.no_grad()
def test_flex_attention_block_mask_equals_sdpa():
    # The same weights (same seed) under HF's sdpa (the reference) and, patched, under
    # flex_attention (HF passes a BlockMask). Flex has no CPU backward (torch), so no_grad.
    ref = model("sdpa").eval()
    ours = patched(model("flex_attention")).eval()
    ids, mask, _ = batch()
    valid = mask.bool()
    want = ref(input_ids=ids, attention_mask=mask).logits
    got = ours(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-6, atol=1e-6)
    # generation: a BlockMask per decoding step, over the cache
    g1 = ref.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    g2 = ours.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    assert torch.equal(g1, g2)
    # packed documents (with use_cache, HF's BlockMask lacks them: mixops adds them)
    docs, ids, kw = packed_inputs("position_ids")
    want = torch.cat([ref(input_ids=d).logits for d in docs], dim=1)
    torch.testing.assert_close(ours(input_ids=ids, **kw).logits, want, rtol=1e-6, atol=1e-6)


# --- packed (padding-free) batches ----------------------------------------------------------

DOCS = (4, 3, 5)


def packed_inputs(how):
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(0, 97, (1, n), generator=g) for n in DOCS]
    ids = torch.cat(docs, dim=1)
    kw = {}
    if how in ("position_ids", "both"):
        kw["position_ids"] = torch.cat([torch.arange(n) for n in DOCS])[None]
    if how in ("cu_seq_lens", "both"):
        cu = torch.tensor([0, *torch.tensor(DOCS).cumsum(0).tolist()], dtype=torch.int32)
        kw.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(DOCS),
                  max_length_k=max(DOCS))  # fmt: skip
    return docs, ids, kw


@pytest.mark.parametrize("how", ["position_ids", "cu_seq_lens", "both"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_documents_equal_each_document_alone(attn, how):
    # use_cache (the config's default) means HF builds no packed-sequence mask; with cu_seq_lens
    # alone the positions run on across documents (RoPE is relative: the same attention scores).
    hf = model(attn)
    if attn == "eager":
        hf = hf.float()
    ours = patched(hf).eval()
    docs, ids, kw = packed_inputs(how)
    got = ours(input_ids=ids, **kw).logits
    want = torch.cat([ours(input_ids=d).logits for d in docs], dim=1)
    tol = dict(rtol=1e-9, atol=1e-9) if attn == "sdpa" else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)
    # and the same with HF's own model, document by document
    hf_want = torch.cat([hf(input_ids=d).logits for d in docs], dim=1)
    torch.testing.assert_close(
        got, hf_want, **(dict(rtol=1e-6, atol=1e-6) if attn == "sdpa" else tol)
    )
    if how == "position_ids":  # without a cache, HF's own mask holds the documents
        torch.testing.assert_close(ours(input_ids=ids, use_cache=False, **kw).logits, got, **tol)


def test_packed_documents_gradients_equal_each_document_alone():
    ours = patched(model())
    docs, ids, kw = packed_inputs("cu_seq_lens")
    ours(input_ids=ids, **kw).logits.square().sum().backward()
    g_packed = [p.grad.clone() for p in ours.parameters()]
    ours.zero_grad()
    sum(ours(input_ids=d).logits.square().sum() for d in docs).backward()
    for p, g in zip(ours.parameters(), g_packed):
        torch.testing.assert_close(g, p.grad, rtol=1e-8, atol=1e-9)


def test_cu_seq_lens_errors_are_clear():
    ours = patched(model()).eval()
    docs, ids, kw = packed_inputs("cu_seq_lens")
    bad = torch.tensor([0, 4, 7, 11], dtype=torch.int32)  # covers 11 of 12 tokens
    with pytest.raises(ValueError, match="cu_seq_lens"):
        ours(input_ids=ids, cu_seq_lens_q=bad, cu_seq_lens_k=bad)
    # after a prefill, a call whose keys include earlier tokens cannot be split by cu_seq_lens
    out = ours(input_ids=ids[:, :3], use_cache=True)
    cu = torch.tensor([0, 2, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seq_lens"):
        ours(input_ids=ids[:, 3:7], cache=out.cache, cu_seq_lens_q=cu, cu_seq_lens_k=cu)


# --- attention outputs and assisted decoding ------------------------------------------------


def test_output_attentions_eager_equal_hf():
    hf = model("eager").float()
    ours = patched(hf)
    ids, mask, _ = batch()
    o1 = hf(input_ids=ids, attention_mask=mask, output_attentions=True)
    o2 = ours(input_ids=ids, attention_mask=mask, output_attentions=True)
    a1, a2 = o1.attentions, o2.attentions
    assert len(a2) == len(a1) == 2
    for x, y in zip(a2, a1):
        assert x.shape == y.shape == (3, 4, 9, 9)  # [batch, top_k * kv_heads, q, kv]
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
        x.retain_grad(), y.retain_grad()
    # the weights are those the output is made of: the same gradient reaches them
    o1.logits[mask.bool()].sum().backward()
    o2.logits[mask.bool()].sum().backward()
    for x, y in zip(a2, a1):
        assert x.grad is not None
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-5)
    # and without the flag, none (as HF's)
    assert ours(input_ids=ids, attention_mask=mask).attentions is None


@pytest.mark.parametrize("mode", ["prompt_lookup", "assistant"])
def test_assisted_decoding_with_attentions_equals_hf(mode):
    hf = model("eager").float().eval()
    ours = patched(hf)
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    kw = dict(max_new_tokens=5, do_sample=False, output_attentions=True,
              return_dict_in_generate=True)  # fmt: skip
    if mode == "prompt_lookup":
        kw["prompt_lookup_num_tokens"] = 3
    else:
        kw["assistant_model"] = model("eager", seed=1).float().eval()
    g1 = hf.generate(ids, **kw)
    g2 = ours.generate(ids, **kw)
    assert torch.equal(g1.sequences, g2.sequences)
    assert len(g2.attentions) == len(g1.attentions)
    for step1, step2 in zip(g1.attentions, g2.attentions):
        for x, y in zip(step2, step1):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
