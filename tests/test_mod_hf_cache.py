"""MoD's skip history follows the KV cache's edits (mixops.nn.mod_history): every edit HF's
DynamicCache and StaticCache make (reorder for beams, batch select / repeat, crop) gives the
logits of a cache built directly in the edited state; beam search's scores equal a step-by-step
recomputation of the returned beams; a cache class MoD cannot follow raises on an edit."""

import copy
import pickle

import pytest
import torch

from helpers import TRANSFORMERS_MIN, TRANSFORMERS_REASON, skip_unsupported_transformers

pytest.importorskip("transformers", minversion=TRANSFORMERS_MIN, reason=TRANSFORMERS_REASON)
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import Cache, DynamicLayer

from mixops.integrations.mod import add_mod
from test_mod_hf import V, batch, tiny

skip_unsupported_transformers()


def routed_model(layers=(0, 2), attn="sdpa"):
    """A decoder whose MoD layers keep some tokens and skip others under the causal rule."""
    model = tiny(attn=attn)
    mods = add_mod(model, layers=list(layers), capacity=0.5, causal_rule="router", gate="sigmoid")
    g = torch.Generator().manual_seed(3)
    for m in mods:
        m.router.weight.data = torch.randn(m.router.weight.shape, generator=g) * 0.5
    return model, mods


def new_cache(kind, model):
    if kind == "static":
        return StaticCache(config=model.config, max_cache_len=24)
    return DynamicCache(config=model.config)


EDITS = {
    "reorder": (lambda c: c.reorder_cache(torch.tensor([2, 0, 1])), lambda t: t[[2, 0, 1]]),
    "select": (lambda c: c.batch_select_indices(torch.tensor([2, 0])), lambda t: t[[2, 0]]),
    "repeat": (lambda c: c.batch_repeat_interleave(2), lambda t: t.repeat_interleave(2, 0)),
    "crop": (lambda c: c.crop(-3), lambda t: t[:, :-3]),
}


# HF's StaticCache has no batch_select_indices / batch_repeat_interleave.
CASES = [("dynamic", e) for e in EDITS] + [("static", "reorder"), ("static", "crop")]


@pytest.mark.parametrize("kind,edit", CASES)
def test_an_edited_cache_decodes_as_a_cache_built_in_the_edited_state(kind, edit):
    model, mods = routed_model()
    ids = torch.randint(0, V, (3, 9), generator=torch.Generator().manual_seed(5))
    do, same = EDITS[edit]
    want_ids = same(ids)
    nxt = torch.randint(0, V, (want_ids.shape[0], 2), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        cache = new_cache(kind, model)
        model(ids, cache=cache, use_cache=True)
        assert all(m.chosen.any() and not m.chosen.all() for m in mods)  # tokens do skip
        do(cache)
        got = model(nxt, cache=cache, use_cache=True).logits
        ref_cache = new_cache(kind, model)
        model(want_ids, cache=ref_cache, use_cache=True)
        want = model(nxt, cache=ref_cache, use_cache=True).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_reset_static_cache_starts_a_fresh_history():
    model, _ = routed_model()
    ids = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        cache = new_cache("static", model)
        model(ids.flip(0), cache=cache, use_cache=True)
        cache.reset()
        got = model(ids, cache=cache, use_cache=True).logits
        want = model(ids, cache=new_cache("static", model), use_cache=True).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def step_by_step_logprobs(model, prompt, prompt_mask, generated):
    """Sum of log-probabilities of ``generated`` [B, n] after ``prompt``, one token a step."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(prompt, attention_mask=prompt_mask, cache=cache, use_cache=True)
        total, mask = torch.zeros(prompt.shape[0], dtype=torch.float64), prompt_mask
        for t in range(generated.shape[1]):
            logp = torch.log_softmax(out.logits[:, -1].double(), -1)
            total += logp.gather(1, generated[:, t : t + 1]).squeeze(1)
            mask = torch.cat((mask, torch.ones_like(mask[:, :1])), 1)
            out = model(generated[:, t : t + 1], attention_mask=mask, cache=cache, use_cache=True)
    return total


@pytest.mark.parametrize("beams,returned", [(2, 1), (3, 2)])
def test_beam_scores_equal_a_step_by_step_recomputation(beams, returned):
    model, _ = routed_model(layers=(0, 1, 2))
    ids, am = batch(B=2, S=7)
    n = 5
    out = model.generate(
        ids, attention_mask=am, max_new_tokens=n, min_new_tokens=n, num_beams=beams,
        num_return_sequences=returned, do_sample=False, length_penalty=0.0, pad_token_id=0,
        eos_token_id=None, return_dict_in_generate=True, output_scores=True,
    )  # fmt: skip
    gen = out.sequences[:, ids.shape[1] :]
    assert gen.shape == (2 * returned, n)
    prompt = ids.repeat_interleave(returned, 0)
    pmask = am.repeat_interleave(returned, 0)
    want = step_by_step_logprobs(model, prompt, pmask, gen)
    torch.testing.assert_close(out.sequences_scores.double(), want, rtol=0, atol=1e-4)


def test_a_cache_class_mod_cannot_follow_raises_on_an_edit():
    model, _ = routed_model()
    ids = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(8))
    cache = Cache(layer_class_to_replicate=DynamicLayer)  # not a DynamicCache / StaticCache
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    keys = cache.layers[0].keys.clone()
    with pytest.raises(NotImplementedError, match="MoD: Cache.reorder_cache .* cannot follow"):
        cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(cache.layers[0].keys, keys)  # refused before the edit
    cache.reset()  # a reset is always followed
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)


def test_an_edited_cache_keeps_its_class_and_copies_with_its_history():
    model, _ = routed_model()
    ids = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(9))
    nxt = torch.randint(0, V, (2, 1), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(ids, cache=cache, use_cache=True)
        assert isinstance(cache, DynamicCache) and type(cache).__name__ == "DynamicCache"
        copies = [copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))]
        cache.reorder_cache(torch.tensor([1, 0]))
        want = model(nxt[[1, 0]], cache=cache, use_cache=True).logits
        for c in copies:  # each copy follows its own edits
            c.reorder_cache(torch.tensor([1, 0]))
            got = model(nxt[[1, 0]], cache=c, use_cache=True).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_sliding_window_static_cache_is_a_clear_error():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=4, attn_implementation="sdpa",
    )  # fmt: skip
    model = MistralForCausalLM(cfg).eval()
    add_mod(model, layers=[1], capacity=0.5, causal_rule="router")
    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(11))
    with torch.no_grad(), pytest.raises(NotImplementedError, match="MoD: layer 1's static cache"):
        model(ids, cache=StaticCache(config=cfg, max_cache_len=16), use_cache=True)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_a_cache_filled_without_mod_is_a_clear_error(kind):
    model, _ = routed_model()
    plain = tiny()  # the same weights without MoD
    ids = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        cache = new_cache(kind, model)
        plain(ids, cache=cache, use_cache=True)
        with pytest.raises(ValueError, match="MoD: the (static )?cache (already )?holds 6 tokens"):
            model(ids[:, :1], cache=cache, use_cache=True)
