"""DynMoE (nn/dynmoe.py, issue 28) against a dense float64 layer written from the authors' code
(tests/dynmoe_reference.py: LINs-lab/DynMoE's DeepSpeed GAMoEGateT, topanygating_opt and
diverse_and_simple_gate_loss): the output, l_aux and every gradient in training (tokens with no
expert) and eval (their argmax fallback), with an inactive expert, with a bound top_k < E (the k
largest margins), under torch.compile(fullgraph=True), and with a capacity."""

import pytest
import torch

from dynmoe_reference import dynmoe_forward
from mixops.nn import DynMoE

H, FF, E, T = 16, 12, 8, 48
F64 = torch.float64
COEF = 0.5  # aux_loss_coef: large enough that l_aux's gradients weigh in the checks
TOL = dict(rtol=1e-9, atol=1e-12)


def _close(ours, ref, what):
    torch.testing.assert_close(ours, ref, **TOL, msg=lambda s: f"{what}: {s}")


def _layer(gates, k=None, init_t=1.0, **kw):
    torch.manual_seed(0)
    m = DynMoE(H, FF, E, k, aux_loss_coef=COEF, init_t=init_t, dtype=F64, **kw)
    with torch.no_grad():
        m.gate.gates.copy_(torch.as_tensor(gates, dtype=F64).expand(E))
    return m


def _state(m):
    return {**dict(m.named_parameters()), **dict(m.named_buffers())}


def _grads(loss, inputs):
    gs = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for g, i in zip(gs, inputs, strict=True)]


def _run_layer(m, x, r):
    """The layer's output, l_aux (unweighted) and the gradients of sum(y * r) and of l_aux with
    respect to (x, *parameters)."""
    x = x.clone().requires_grad_()
    y = m(x)
    aux = m.aux_loss / COEF
    inputs = [x, *m.parameters()]
    return y, aux, _grads((y * r).sum(), inputs), _grads(aux, inputs)


def _run_reference(m, x, r, k=None):
    p = {n: t.detach().clone().requires_grad_(t.requires_grad) for n, t in _state(m).items()}
    x = x.clone().requires_grad_()
    y, aux, K = dynmoe_forward(x, p, m.training, k)
    inputs = [x, *[p[n] for n, _ in m.named_parameters()]]
    return y, aux, _grads((y * r).sum(), inputs), _grads(aux, inputs), K


def _assert_matches(m, x, k=None, what=""):
    """Layer == reference (output, l_aux, both sets of gradients); returns the reference's K."""
    r = torch.randn_like(x)
    y, aux, gy, ga = _run_layer(m, x, r)
    y_ref, aux_ref, gy_ref, ga_ref, K = _run_reference(m, x, r, k)
    names = ["x", *[n for n, _ in m.named_parameters()]]
    _close(y, y_ref, f"{what} output")
    _close(aux, aux_ref, f"{what} l_aux")
    for n, a, b in zip(names, gy, gy_ref, strict=True):
        _close(a, b, f"{what} d sum(y r) / d {n}")
    for n, a, b in zip(names, ga, ga_ref, strict=True):
        _close(a, b, f"{what} d l_aux / d {n}")
    return K, y


# Thresholds G = sigmoid(gates * scale) from 0.5 to ~0.98: some tokens choose no expert, some
# several (each test asserts its data has both).
SPREAD = torch.linspace(0.0, 4.0, E)


@pytest.mark.parametrize("init_t", [1.0, 0.25])
def test_training_matches_authors_code(init_t):
    m = _layer(SPREAD * init_t, init_t=init_t).train()
    x = torch.randn(T, H, dtype=F64)
    K, y = _assert_matches(m, x, what=f"train init_t={init_t}")
    assert (K == 0).any() and (K >= 2).any(), f"K per token {K.tolist()}"
    assert torch.equal(y[K == 0], torch.zeros_like(y[K == 0])), "a token with no expert: 0"


@pytest.mark.parametrize("init_t", [1.0, 0.25])
def test_eval_matches_authors_code(init_t):
    """Eval: a token with no expert takes the expert of its largest masked score, weight 1."""
    m = _layer(SPREAD * init_t, init_t=init_t)
    x = torch.randn(T, H, dtype=F64)
    with torch.no_grad():
        none = (m.train()(x).abs().sum(-1) == 0).sum().item()
    assert none > 0, "the data should have tokens that choose no expert"
    K, y = _assert_matches(m.eval(), x, what=f"eval init_t={init_t}")
    assert (K >= 1).all() and (K >= 2).any() and (y.abs().sum(-1) > 0).all()


def test_all_tokens_choose_nothing():
    """Every threshold above every score (G ~ 1): training gives zeros and zero gradients to the
    experts; eval falls back to the argmax for every token."""
    m = _layer(20.0).train()
    x = torch.randn(T, H, dtype=F64)
    K, y = _assert_matches(m, x, what="train, no expert")
    assert (K == 0).all() and torch.equal(y, torch.zeros_like(y))
    K, _ = _assert_matches(m.eval(), x, what="eval, no expert")
    assert (K == 1).all()


@pytest.mark.parametrize("training", [True, False])
def test_score_equal_to_threshold_is_not_chosen(training):
    """Their sign(relu(s - G)) is strict: s == G (here cos = 0 exactly, so s = G = 1/2) is not a
    choice. Even tokens tie with every expert (none in training; eval: the argmax, expert 0), odd
    ones with expert 0 only."""
    m = _layer(0.0).train(training)
    with torch.no_grad():
        m.gate.sim_matrix.copy_(torch.eye(H, E, dtype=F64))
    x = torch.randn(T, H, dtype=F64)
    x[::2, :E] = 0.0
    x[1::2, 0] = 0.0
    K, _ = _assert_matches(m, x, what=f"ties (training={training})")
    assert (K[::2] == (0 if training else 1)).all()


@pytest.mark.parametrize("training", [True, False])
def test_inactive_expert(training):
    """experts_mask[e] = 0: never chosen (even with the lowest threshold and as the fallback), no
    gradient to its expert weights."""
    gates = SPREAD.clone()
    gates[3] = -10.0  # G_3 ~ 0: it would be chosen by every token were it active
    m = _layer(gates).train(training)
    m.gate.experts_mask[3] = 0.0
    x = torch.randn(T, H, dtype=F64)
    _assert_matches(m, x, what=f"inactive expert (training={training})")
    # the expert's own weights: no gradient at all, from the output or l_aux
    y = m(x)
    gu, dn = torch.autograd.grad((y.square().sum() + m.aux_loss), m.experts.parameters())
    assert gu[3].abs().max() == 0 and dn[3].abs().max() == 0
    assert gu.abs().sum() > 0 and dn.abs().sum() > 0
    with torch.no_grad():  # and it would change the output were it chosen
        m.experts.down_proj[3].fill_(1e6)
        torch.testing.assert_close(m(x), y.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("training", [True, False])
def test_bound_top_k_keeps_largest_margins(training):
    """top_k = 2 < E with low thresholds: tokens choosing more keep their 2 largest s - G and weigh
    1/2 each (the reference truncates the authors' gate the same way)."""
    k = 2
    m = _layer(torch.linspace(-1.0, 3.0, E), k=k).train(training)
    x = torch.randn(T, H, dtype=F64)
    with torch.no_grad():  # the authors' unbounded gate on the same data
        _, _, K_free = dynmoe_forward(x, _state(m), training)
    assert (K_free > k).any() and (K_free <= k).any(), f"unbounded K {K_free.tolist()}"
    K, _ = _assert_matches(m, x, k=k, what=f"top_k={k} (training={training})")
    assert K.max() == k


@pytest.mark.parametrize("training", [True, False])
def test_compile_fullgraph_matches_eager(training):
    """fullgraph (no graph break) through aot_eager: the same Dynamo/AOTAutograd tracing as
    inductor without its code generation (~20 s on CPU for fp64), as tests/test_moe.py does."""
    m = _layer(SPREAD).train(training)
    x = torch.randn(T, H, dtype=F64)
    r = torch.randn_like(x)
    eager = _run_layer(m, x, r)
    torch._dynamo.reset()
    compiled = _run_layer(torch.compile(m, fullgraph=True, backend="aot_eager"), x, r)
    _close(compiled[0], eager[0], "compiled output")
    _close(compiled[1], eager[1], "compiled l_aux")
    for i, (a, b) in enumerate(zip(eager[2] + eager[3], compiled[2] + compiled[3], strict=True)):
        _close(b, a, f"compiled gradient {i}")


def test_capacity_factor():
    """A capacity that holds every choice (capacity_factor 1 with top_k = E: T slots per expert)
    equals the reference; a small one runs, drops some choices and trains."""
    x = torch.randn(T, H, dtype=F64)
    m = _layer(torch.linspace(-1.0, 2.0, E), capacity_factor=1.0).train()
    _assert_matches(m, x, what="capacity_factor=1")
    small = _layer(torch.linspace(-1.0, 2.0, E), capacity_factor=0.1).train()
    y_full = m(x).detach()
    y = small(x)
    assert torch.isfinite(y).all() and not torch.allclose(y, y_full)
    (y.square().sum() + small.aux_loss).backward()
    assert all(torch.isfinite(p.grad).all() for p in small.parameters())


def test_bf16_layer_keeps_the_gate_fp32():
    """Their gate runs in fp32 (fp32_gate=True): a bf16 layer keeps the gate's parameters and
    buffers fp32 and unrounded, and routes bf16 tokens through it."""
    torch.manual_seed(0)
    m = DynMoE(16, 24, 8, aux_loss_coef=0.01)
    gate = {n: t.clone() for n, t in m.gate.state_dict().items()}
    m = m.to(torch.bfloat16)
    for n, t in m.gate.state_dict().items():
        assert t.dtype == torch.float32 and torch.equal(t, gate[n]), n
    assert m.experts.gate_up_proj.dtype == torch.bfloat16
    x = torch.randn(20, 16, dtype=torch.bfloat16, requires_grad=True)
    y = m(x)
    assert y.dtype == torch.bfloat16
    (y.float().square().sum() + m.aux_loss).backward()
    assert m.gate.gates.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
