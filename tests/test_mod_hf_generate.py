"""MoD layers (add_mod) in every HF generation mode: greedy, sampling with a fixed seed, beam search,
beam sampling, assisted and prompt-lookup decoding (which crop the cache), a static cache, and a
compiled (fullgraph) decoding step. At capacity 1 (gate exactly 1) each mode returns what the
unwrapped model returns; below 1 the logits each step produced equal a step-by-step cached
recomputation of the returned sequence (the causal rule decides each token from its prefix)."""

import copy

import pytest
import torch

from helpers import TRANSFORMERS_MIN, TRANSFORMERS_REASON, skip_unsupported_transformers

pytest.importorskip("transformers", minversion=TRANSFORMERS_MIN, reason=TRANSFORMERS_REASON)
from transformers import DynamicCache, StaticCache

from mixops.integrations.mod import add_mod
from test_mod_hf import batch, tiny
from test_mod_hf_cache import routed_model, step_by_step_logprobs

skip_unsupported_transformers()

N = 5  # new tokens
COMMON = dict(max_new_tokens=N, min_new_tokens=N, pad_token_id=0, eos_token_id=None)
MODES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=0, temperature=1.0),
    "beam_search": dict(do_sample=False, num_beams=3, num_return_sequences=2),
    "beam_sampling": dict(do_sample=True, num_beams=2, top_k=0),
    "prompt_lookup": dict(do_sample=False, prompt_lookup_num_tokens=2),
    "static_cache": dict(do_sample=False, cache_implementation="static"),
    "static_beams": dict(do_sample=False, num_beams=2, cache_implementation="static"),
}


def generate(model, ids, am, mode, seed=0, **extra):
    torch.manual_seed(seed)
    return model.generate(ids, attention_mask=am, **COMMON, **MODES[mode], **extra)


@pytest.mark.parametrize("mode", list(MODES))
def test_capacity_one_generates_what_the_original_generates(mode):
    model = tiny()
    conv = copy.deepcopy(model)
    add_mod(conv, layers=[0, 2], capacity=1.0)  # gate "tanh", zero router: exactly the layer
    B = 1 if mode == "prompt_lookup" else 3  # HF's prompt lookup takes one sequence
    ids, am = batch(B=B)
    want, got = generate(model, ids, am, mode), generate(conv, ids, am, mode)
    assert torch.equal(got, want)


def test_assisted_decoding_at_capacity_one_equals_the_original():
    model, assistant = tiny(), tiny(layers=1)
    conv = copy.deepcopy(model)
    add_mod(conv, layers=[1, 2], capacity=1.0)
    ids, am = batch(B=1)
    kw = dict(do_sample=False, assistant_model=assistant)
    want = model.generate(ids, attention_mask=am, **COMMON, **kw)
    assert torch.equal(conv.generate(ids, attention_mask=am, **COMMON, **kw), want)


def step_logits(model, ids, am, generated):
    """The logits of each generated token's step [B, n, V], one token a step, with a cache."""
    cache = DynamicCache(config=model.config)
    out = []
    with torch.no_grad():
        o = model(ids, attention_mask=am, cache=cache, use_cache=True)
        for t in range(generated.shape[1]):
            out.append(o.logits[:, -1])
            am = torch.cat((am, torch.ones_like(am[:, :1])), 1)
            o = model(generated[:, t : t + 1], attention_mask=am, cache=cache, use_cache=True)
    return torch.stack(out, 1)


@pytest.mark.parametrize(
    "mode", ["greedy", "sampling", "prompt_lookup", "assisted", "static_cache"]
)
def test_below_capacity_one_each_step_equals_a_step_by_step_recomputation(mode):
    model, mods = routed_model(layers=(0, 1, 2))
    B = 1 if mode in ("prompt_lookup", "assisted") else 3
    ids, am = batch(B=B)
    extra = dict(return_dict_in_generate=True, output_logits=True)
    if mode == "assisted":  # candidates verified several at a time, rejected ones cropped
        mode, extra["assistant_model"] = "greedy", tiny(layers=1)
    out = generate(model, ids, am, mode, **extra)
    assert any((~m.chosen).any() for m in mods)  # tokens do skip layers while generating
    gen = out.sequences[:, ids.shape[1] :]
    torch.testing.assert_close(
        torch.stack(out.logits, 1), step_logits(model, ids, am, gen), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("mode", ["beam_search", "beam_sampling", "static_beams"])
def test_below_capacity_one_beam_scores_equal_a_step_by_step_recomputation(mode):
    model, _ = routed_model(layers=(0, 1, 2))
    ids, am = batch(B=2, S=7)
    out = generate(
        model, ids, am, mode, return_dict_in_generate=True, output_scores=True, length_penalty=0.0
    )
    gen = out.sequences[:, ids.shape[1] :]
    per = gen.shape[0] // 2
    want = step_by_step_logprobs(model, ids.repeat_interleave(per, 0),
                                 am.repeat_interleave(per, 0), gen)  # fmt: skip
    # (beam sampling at temperature 1 with no top-k scores the model's own log-probabilities)
    torch.testing.assert_close(out.sequences_scores.double(), want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("capacity", [1.0, 0.5])
def test_a_compiled_decoding_step_on_a_static_cache_equals_eager(capacity):
    """At capacity 1 against the unwrapped model in eager mode, below 1 against MoD's eager."""
    model = tiny(layers=1)  # one layer: inductor's CPU compile dominates the test's time
    plain = copy.deepcopy(model)
    if capacity == 1.0:
        mods = add_mod(model, layers=[0], capacity=1.0)
    else:
        mods = add_mod(model, layers=[0], capacity=0.5, causal_rule="router", gate="sigmoid")
        mods[0].router.weight.data.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    eager = plain if capacity == 1.0 else model
    ids, am = batch()
    nxt = torch.randint(0, 101, (3, 1), generator=torch.Generator().manual_seed(12))
    am2 = torch.cat((am, torch.ones_like(am[:, :1])), 1)
    step = torch.compile(model.forward, fullgraph=True)  # no graph break: no host sync either
    with torch.no_grad():
        cache = StaticCache(config=model.config, max_cache_len=16)
        model(ids, attention_mask=am, cache=cache, use_cache=True)
        ref_cache = StaticCache(config=model.config, max_cache_len=16)
        eager(ids, attention_mask=am, cache=ref_cache, use_cache=True)
        want = eager(nxt, attention_mask=am2, cache=ref_cache, use_cache=True).logits
        got = step(nxt, attention_mask=am2, cache=cache, use_cache=True).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        am3 = torch.cat((am2, torch.ones_like(am[:, :1])), 1)
        want = eager(nxt, attention_mask=am3, cache=ref_cache, use_cache=True).logits
        got = step(nxt, attention_mask=am3, cache=cache, use_cache=True).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert mods[0].chosen.shape == (3, 1)
