"""Tests for tarflow.py: exact log-det (eq. 2, 3), exact inverse, KV-cached sampling against a
recomputing reference (every block or only the deep one guided), every guidance rule of
GUIDANCE_RULES against its formula in tests/reference.py,
orderings given as permutations and rebuilt from the stored config, SimFlow's score step (its
eq. 6) against a closed form, precision under bf16 autocast, parameter counts of the sizes, and
that maximum likelihood (eq. 9) learns a density of known entropy."""

import math

import torch.nn.functional as F

import pytest
import torch

from tarflow import GUIDANCE_RULES, SIZES, TARFlow
from tests.reference import REFERENCE_RULES, reference_rule, starflow_guidance

N, D = 5, 3  # tokens, channels of the small test flows (D: token channels here, not the RAE decoder)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is fastest and does not stall on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_flow(num_classes=3, dtype=torch.float64, depths=(1, 2, 1), seed=0, permutations=None):
    """A tiny flow with every weight perturbed, the zero-initialised ones included, so it is non-trivial."""
    torch.manual_seed(seed)
    flow = TARFlow(D, N, channels=32, depths=list(depths), head_dim=16, num_classes=num_classes,
                   permutations=permutations).to(dtype)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return flow.eval()


def test_new_flow_is_identity():
    flow = TARFlow(D, N, channels=32, depths=[1, 1], head_dim=16, num_classes=4)
    x = torch.randn(3, N, D)
    z, logdet = flow(x, torch.tensor([0, 2, 4]))
    assert torch.equal(z, x) and torch.equal(logdet, torch.zeros(3))
    assert torch.equal(flow.reverse(x, torch.tensor([1, 2, 3]), guidance=2.0), x)


@pytest.mark.parametrize("num_classes", [0, 3])
def test_logdet_matches_autograd_jacobian(num_classes):
    flow = make_flow(num_classes)
    x = torch.randn(2, N, D, dtype=torch.float64)
    y = torch.tensor([0, 2]) if num_classes else None
    _, logdet = flow(x, y)
    for b in range(2):
        yb = None if y is None else y[b:b + 1]
        J = torch.autograd.functional.jacobian(
            lambda v: flow(v.view(1, N, D), yb)[0].reshape(-1), x[b].reshape(-1))
        sign, logabsdet = torch.linalg.slogdet(J)
        assert sign != 0
        torch.testing.assert_close(logdet[b], logabsdet, rtol=0, atol=1e-10)
    assert logdet.abs().min() > 0.1  # the check is not vacuous


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-8), (torch.float32, 1e-5)])
def test_reverse_inverts_forward(dtype, tol):
    flow = make_flow(dtype=dtype)
    x = torch.randn(4, N, D, dtype=dtype)
    y = torch.tensor([0, 1, 2, 3])
    z, _ = flow(x, y)
    assert (z - x).abs().max() > 0.1
    x_rec = flow.reverse(z, y)
    assert x_rec.dtype == dtype
    assert (x_rec - x).abs().max() < tol


def random_permutations(num_blocks, seed=0):
    """One random token order per block, none of them the identity or the reversed order."""
    g = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(N, generator=g).tolist() for _ in range(num_blocks)]
    assert all(p not in (list(range(N)), list(range(N))[::-1]) for p in perms)
    return perms


def reference_reverse(flow, z, y, w, guide_blocks='all', rule='starflow'):
    """Sampling without caches: every token re-runs each block's full causal forward pass.

    (mu, alpha) of a token come from the public forward: with that token set to 0 and to 1,
    z0 = -mu e^-alpha and z1 = (1 - mu) e^-alpha. CFG combines the conditional and null-label
    Gaussians with the rule's formula in tests/reference.py, sigma = exp(alpha). The tokens are
    visited in each block's permutation; with guide_blocks='deep' only the deep block
    (flow.blocks[-1]) is guided."""
    null = torch.full_like(y, flow.num_classes)
    combine = reference_rule(rule)

    def gaussian(block, x, labels, p):
        x0, x1 = x.clone(), x.clone()
        x0[:, p], x1[:, p] = 0, 1
        z0, z1 = block(x0, labels)[0][:, p], block(x1, labels)[0][:, p]
        scale = z1 - z0
        return -z0 / scale, 1 / scale  # mu, sigma

    x = z.clone()
    for block, order in zip(reversed(flow.blocks), reversed(flow.permutations)):
        wk = w if guide_blocks == 'all' or block is flow.blocks[-1] else 0.0  # this block's guidance
        u, x = x, x.clone()
        for p in order[1:]:
            mu_c, sigma_c = gaussian(block, x, y, p)
            mu, sigma = mu_c, sigma_c
            if wk > 0:
                mu_u, sigma_u = gaussian(block, x, null, p)
                mu, sigma = combine(mu_c, sigma_c, mu_u, sigma_u, wk)
            x[:, p] = u[:, p] * sigma + mu
    return x


@pytest.mark.parametrize("rule", list(GUIDANCE_RULES))
@pytest.mark.parametrize("w", [0.0, 1.5])
def test_kv_cached_reverse_matches_recompute(w, rule):
    flow = make_flow()
    z = torch.randn(3, N, D, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    fast = flow.reverse(z, y, guidance=w, rule=rule)
    ref = reference_reverse(flow, z, y, w, rule=rule)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-9)
    if w > 0:  # guidance really moved the samples
        assert (fast - flow.reverse(z, y)).abs().max() > 1e-2


@pytest.mark.parametrize("rule", list(GUIDANCE_RULES))
def test_guidance_rule_matches_its_reference(rule):
    """GUIDANCE_RULES[rule] (alpha = log sigma) equals its float64 formula in tests/reference.py;
    with w = 0 it is the conditional Gaussian, as reverse without guidance."""
    g = torch.Generator().manual_seed(0)
    mu_c, mu_u, a_c, a_u = torch.randn(4, 1000, generator=g, dtype=torch.float64)
    for w in (0.0, 0.5, 2.5):
        mu, sigma = GUIDANCE_RULES[rule](mu_c, a_c, mu_u, a_u, w)
        ref_mu, ref_sigma = reference_rule(rule)(mu_c, a_c.exp(), mu_u, a_u.exp(), w)
        torch.testing.assert_close(mu, ref_mu, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sigma, ref_sigma, rtol=1e-12, atol=1e-12)
    mu0, sigma0 = GUIDANCE_RULES[rule](mu_c, a_c, mu_u, a_u, 0.0)
    torch.testing.assert_close(mu0, mu_c)
    torch.testing.assert_close(sigma0, a_c.exp())


def test_starflow_reference_is_the_tempered_product():
    """The reference itself, another way: the Gaussian proportional to p_c^(1+w) / p_u^w where that
    is normalisable, with sigma_u replaced by sigma_c where sigma_c > sigma_u (s = 1)."""
    g = torch.Generator().manual_seed(0)
    mu_c, mu_u, a_c, a_u = torch.randn(4, 1000, generator=g, dtype=torch.float64)
    w = 2.5
    s_c, s_u = a_c.exp(), a_u.exp()
    mu, sigma = starflow_guidance(mu_c, s_c, mu_u, s_u, w)
    s_u = torch.maximum(s_u, s_c)
    prec = (1 + w) / s_c**2 - w / s_u**2
    torch.testing.assert_close(sigma, prec.rsqrt())
    torch.testing.assert_close(mu, ((1 + w) * mu_c / s_c**2 - w * mu_u / s_u**2) / prec)


def test_a_rule_without_reference_fails_naming_it():
    """A fork's rule in GUIDANCE_RULES but not in REFERENCE_RULES fails the guidance tests, not skips them."""
    assert set(GUIDANCE_RULES) <= set(REFERENCE_RULES)
    with pytest.raises(LookupError, match=r"guidance rule 'mine' .* add one to REFERENCE_RULES in tests/reference\.py"):
        reference_rule('mine')


def test_a_forks_rule_reaches_every_guided_block(monkeypatch):
    """A rule added to GUIDANCE_RULES and REFERENCE_RULES is sampled by reverse(rule=...) as its reference
    says, in every block or the deep one (here CFG on the mean only: mu_c + w (mu_c - mu_u), sigma_c)."""
    def mean_cfg(mu_c, alpha_c, mu_u, alpha_u, w):
        return mu_c + w * (mu_c - mu_u), torch.exp(alpha_c)

    def mean_cfg_reference(mu_c, sigma_c, mu_u, sigma_u, w):
        return (1 + w) * mu_c - w * mu_u, sigma_c
    monkeypatch.setitem(GUIDANCE_RULES, 'mean-cfg', mean_cfg)
    monkeypatch.setitem(REFERENCE_RULES, 'mean-cfg', mean_cfg_reference)
    test_kv_cached_reverse_matches_recompute(1.5, 'mean-cfg')
    test_guide_deep_block_matches_reference('mean-cfg')
    flow = make_flow()
    z, y = torch.randn(3, N, D, dtype=torch.float64), torch.tensor([0, 2, 1])
    assert (flow.reverse(z, y, guidance=1.5, rule='mean-cfg') - flow.reverse(z, y, guidance=1.5)).abs().max() > 1e-3


def test_null_label_and_guidance_zero():
    flow = make_flow()
    x = torch.randn(2, N, D, dtype=torch.float64)
    null = torch.full((2,), flow.null_label)
    z_none, ld_none = flow(x)
    z_null, ld_null = flow(x, null)
    assert torch.equal(z_none, z_null) and torch.equal(ld_none, ld_null)
    assert not torch.allclose(z_null, flow(x, torch.tensor([0, 1]))[0])
    assert torch.equal(flow.reverse(x), flow.reverse(x, null))
    # Guiding the null label towards itself changes nothing (s = 1, mu = mu_c, sigma = sigma_c).
    torch.testing.assert_close(flow.reverse(x, guidance=3.0), flow.reverse(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(flow.reverse(x, null, guidance=0.0), flow.reverse(x, null), rtol=0, atol=0)


def test_log_prob_is_gaussian_plus_logdet():
    flow = make_flow()
    x = torch.randn(4, N, D, dtype=torch.float64)
    y = torch.tensor([3, 0, 1, 2])
    z, logdet = flow(x, y)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(dim=(1, 2)) + logdet
    torch.testing.assert_close(flow.log_prob(x, y), expected, rtol=0, atol=1e-10)


def test_bf16_autocast_keeps_affine_in_float32():
    flow = make_flow(dtype=torch.float32)
    x = torch.randn(3, N, D)
    y = torch.tensor([0, 1, 2])
    z32, ld32 = flow(x, y)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        z, logdet = flow(x, y)
        x_rec = flow.reverse(z, y, guidance=1.0)
        x_plain = flow.reverse(z, y)
    assert z.dtype == logdet.dtype == x_rec.dtype == x_plain.dtype == torch.float32
    assert (z - z32).abs().max() < 0.1 and (z - z32).abs().max() > 0  # bf16 Transformer, close result
    assert (logdet - ld32).abs().max() < 0.5
    assert (x_plain - x).abs().max() < 0.1


def test_bf16_linear_weights_sample_the_same_under_autocast():
    """Sampling casts the frozen flow's Linear weights to bf16 once (autocast would re-cast them at
    every token step): the same samples and score step as the fp32 weights under bf16 autocast."""
    flow = make_flow(dtype=torch.float32).requires_grad_(False)
    cast = make_flow(dtype=torch.float32).requires_grad_(False).cast_linears(torch.bfloat16)
    assert {m.weight.dtype for m in cast.modules() if isinstance(m, torch.nn.Linear)} == {torch.bfloat16}
    assert cast.blocks[0].pos_embed.dtype == torch.float32            # embeddings keep theirs
    z, y = torch.randn(3, N, D), torch.tensor([0, 1, 2])
    with torch.autocast('cpu', dtype=torch.bfloat16):
        for blocks in ('all', 'deep'):
            a = flow.reverse(z, y, guidance=1.5, guide_blocks=blocks)
            b = cast.reverse(z, y, guidance=1.5, guide_blocks=blocks)
            assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b), blocks
        assert torch.equal(flow.score_step(a, y, 0.3), cast.score_step(a, y, 0.3))


def test_learns_known_entropy():
    """Maximum likelihood (eq. 9) on class-conditional Gaussian AR(1) tokens reaches the true NLL.

    Per channel j: x_0 ~ N(0, 1), x_i = a_j x_{i-1} + sqrt(1 - a_j^2) eps; class 1 flips the sign
    of a. Entropy per dimension: 0.5 log(2 pi e) + 0.5 (N-1)/N mean_j log(1 - a_j^2)."""
    torch.manual_seed(0)
    n_tok, d = 8, 4
    a0 = torch.tensor([0.9, 0.7, 0.5, 0.0])

    def sample(n, g):
        y = torch.randint(0, 2, (n,), generator=g)
        a = a0 * (1 - 2 * y[:, None].float())
        x = torch.empty(n, n_tok, d)
        x[:, 0] = torch.randn(n, d, generator=g)
        for i in range(1, n_tok):
            x[:, i] = a * x[:, i - 1] + (1 - a**2).sqrt() * torch.randn(n, d, generator=g)
        return x, y, a

    def true_nll(x, a):  # exact -log p(x | y) per dimension, per example
        normal = torch.distributions.Normal(0.0, 1.0)
        lp = normal.log_prob(x[:, 0]).sum(-1)
        sd = (1 - a**2).sqrt()[:, None]
        lp = lp + (normal.log_prob((x[:, 1:] - a[:, None] * x[:, :-1]) / sd) - sd.log()).sum((1, 2))
        return -lp / (n_tok * d)

    entropy = 0.5 * math.log(2 * math.pi * math.e) + 0.5 * (n_tok - 1) / n_tok * torch.log(1 - a0**2).mean().item()
    x_test, y_test, a_test = sample(4096, torch.Generator().manual_seed(2))
    nll_true = true_nll(x_test, a_test).mean().item()
    assert abs(nll_true - entropy) < 0.02  # the held-out set is typical

    flow = TARFlow(d, n_tok, channels=32, depths=[1, 1], head_dim=16, num_classes=2)
    steps, lr = 300, 3e-3
    opt = torch.optim.Adam(flow.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        nll_start = -flow.log_prob(x_test, y_test).mean().item() / (n_tok * d)
    for _ in range(steps):
        x, y, _ = sample(128, g)
        z, logdet = flow(x, y)
        loss = (0.5 * z.pow(2).sum((1, 2)) - logdet).mean() / (n_tok * d)  # eq. 9 per dimension
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        nll = -flow.log_prob(x_test, y_test).mean().item() / (n_tok * d)
    assert nll_start - entropy > 0.25  # there was something to learn
    assert abs(nll - nll_true) < 0.02, (nll, nll_true, entropy)


def test_sizes_match_simflow_table8():
    """Heads, depths and parameter counts (1000 classes, d = 32, 256 tokens) of SimFlow's sizes.

    XXL's deep block has 46 layers (SimFlow's text and its 1.4B count; its Table 8 prints 36, 1.12B).
    Counted on the meta device: no memory is allocated, so XXL costs nothing here."""
    heads = {'S': 6, 'B': 12, 'L': 16, 'XL': 16, 'XXL': 16, 'XXL-2048': 16}
    deep = {'S': 2, 'B': 2, 'L': 14, 'XL': 18, 'XXL': 46, 'XXL-2048': 46}
    params = {'S': 37e6, 'B': 141e6, 'L': 475e6, 'XL': 695e6, 'XXL': 1.36e9}
    for name in heads:
        cfg = SIZES[name]
        assert cfg['channels'] // cfg['head_dim'] == heads[name] and cfg['channels'] % cfg['head_dim'] == 0
        assert cfg['depths'] == [2, 2, 2, 2, 2, deep[name]]
    assert SIZES['XXL-2048']['channels'] == 2048 and SIZES['XXL']['channels'] == 1152  # paper Table 1's widths
    for name, count in params.items():
        with torch.device('meta'):
            flow = TARFlow(32, 256, num_classes=1000, **SIZES[name])
        assert abs(sum(p.numel() for p in flow.parameters()) / count - 1) < 0.01, name


def test_orderings_alternate_and_deep_block_last():
    flow = TARFlow(D, N, channels=32, depths=[1, 1, 1, 3], head_dim=16)
    natural = list(range(N))
    assert flow.permutations == [natural, natural[::-1], natural, natural[::-1]]
    assert [b.perm.tolist() for b in flow.blocks] == flow.permutations
    assert [b.order for b in flow.blocks] == ['identity', 'reversed', 'identity', 'reversed']  # no gather
    assert [len(b.layers) for b in flow.blocks] == [1, 1, 1, 3]
    assert TARFlow(**flow.config()).config() == flow.config()
    assert flow.config()['permutations'] == flow.permutations  # stored explicitly, not implied by a default


@pytest.mark.parametrize("call,match", [
    (lambda f: f(torch.randn(2, N + 1, D)), r"TARFlow\.forward: expected float tokens of shape \(B, 5, 3\)"),
    (lambda f: f(torch.randn(N, D)), r"TARFlow\.forward: expected"),
    (lambda f: f(torch.zeros(2, N, D, dtype=torch.long)), r"TARFlow\.forward: expected float"),
    (lambda f: f(torch.randn(2, N, D), torch.tensor([0.0, 1.0])), r"integer labels of shape \(2,\)"),
    (lambda f: f(torch.randn(2, N, D), torch.tensor([0, 1, 2])), r"integer labels of shape \(2,\)"),
    (lambda f: f(torch.randn(2, N, D), torch.tensor([0, 4])), r"labels must lie in \[0, 3\]"),
    (lambda f: f.log_prob(torch.randn(2, N, D), torch.tensor([-1, 0])), r"labels must lie in \[0, 3\]"),
    (lambda f: f.reverse(torch.randn(2, N, D, 1)), r"TARFlow\.reverse: expected"),
    (lambda f: f.reverse(torch.randn(2, N, D), guidance=-1.0), r"guidance must be a finite number >= 0"),
    (lambda f: f.reverse(torch.randn(2, N, D), guidance=float('nan')), r"guidance must be"),
    (lambda f: TARFlow(D, N, 30, [1], head_dim=16), r"channels=30 is not a multiple of head_dim=16"),
    (lambda f: TARFlow(D, N, 32, [], head_dim=16), r"depths must be a non-empty list"),
    (lambda f: TARFlow(D, N, 32, [1, 0], head_dim=16), r"depths must be"),
    (lambda f: TARFlow(0, N, 32, [1], head_dim=16), r"must be positive"),
    (lambda f: TARFlow(D, N, 32, [1], head_dim=16, num_classes=-1), r"num_classes must be >= 0"),
    (lambda f: f.reverse(torch.randn(2, N, D), guide_blocks='top'), r"guide_blocks must be 'all' or 'deep'"),
    (lambda f: f.reverse(torch.randn(2, N, D), guide_blocks=None), r"guide_blocks must be"),
    (lambda f: f.reverse(torch.randn(2, N, D), rule='nope'), r"rule must be one of GUIDANCE_RULES \(starflow"),
    (lambda f: f.reverse(torch.randn(2, N, D), rule=['starflow']), r"rule must be one of GUIDANCE_RULES"),
    (lambda f: TARFlow(D, N, 32, [1, 1], head_dim=16, permutations=[[0, 1, 2, 3, 4]]),
     r"permutations must be None or 2 lists of ints \(one per block\), each a permutation of range\(5\)"),
    (lambda f: TARFlow(D, N, 32, [1], head_dim=16, permutations=[[0, 1, 2, 3, 3]]), r"permutations must be"),
    (lambda f: TARFlow(D, N, 32, [1], head_dim=16, permutations=[[0, 1, 2, 3]]), r"permutations must be"),
    (lambda f: TARFlow(D, N, 32, [1], head_dim=16, permutations=[[0, 1, 2, 3, 4.0]]), r"permutations must be"),
    (lambda f: TARFlow(D, N, 32, [1], head_dim=16, permutations=[torch.arange(N)]), r"permutations must be"),
    (lambda f: f.score_step(torch.randn(2, N, D), None, float('inf')), r"gamma must be a finite number"),
    (lambda f: f.score_step(torch.randn(2, N), None, 0.1), r"TARFlow\.score_step: expected float tokens"),
])
def test_bad_inputs_raise_one_line_value_error(call, match):
    flow = TARFlow(D, N, channels=32, depths=[1], head_dim=16, num_classes=3)
    with pytest.raises(ValueError, match=match) as err:
        call(flow)
    assert '\n' not in str(err.value)


def test_unconditional_flow_accepts_only_null_label():
    flow = TARFlow(D, N, channels=32, depths=[1], head_dim=16)
    x = torch.randn(2, N, D)
    assert torch.equal(flow(x)[0], flow(x, torch.zeros(2, dtype=torch.long))[0])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 0\]"):
        flow(x, torch.ones(2, dtype=torch.long))


# ----------------------------------------------------------------------------- guidance of the deep block only

@pytest.mark.parametrize("rule", list(GUIDANCE_RULES))
def test_guide_deep_block_matches_reference(rule):
    """guide_blocks='deep': the deep block (run first) guided, the shallow ones conditional with w = 0."""
    flow = make_flow(depths=(1, 2, 1, 2))
    z = torch.randn(3, N, D, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    batch = {}  # batch size each block's Transformer runs at: 2B = [cond; null] for the deep block only

    def record(k):
        def hook(module, inputs, output):
            batch.setdefault(k, inputs[0].shape[0])  # returns None: the output is left as it is
        return hook
    hooks = [b.proj_in.register_forward_hook(record(k)) for k, b in enumerate(flow.blocks)]
    fast = flow.reverse(z, y, guidance=1.5, guide_blocks='deep', rule=rule)
    for h in hooks:
        h.remove()
    assert batch == {0: 3, 1: 3, 2: 3, 3: 6}
    ref = reference_reverse(flow, z, y, 1.5, guide_blocks='deep', rule=rule)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-9)
    assert (fast - flow.reverse(z, y, guidance=1.5, rule=rule)).abs().max() > 1e-2  # differs from guiding every block
    assert (fast - flow.reverse(z, y)).abs().max() > 1e-2  # and from no guidance
    assert torch.equal(flow.reverse(z, y, guidance=0.0, guide_blocks='deep', rule=rule), flow.reverse(z, y))


# ----------------------------------------------------------------------------- orderings as data

def test_random_permutations_are_exact():
    """A flow whose blocks read the tokens in random orders: exact log-det, inverse and cached sampling."""
    perms = random_permutations(3)
    flow = make_flow(permutations=perms)
    assert [b.order for b in flow.blocks] == ['gather'] * 3 and flow.permutations == perms
    x = torch.randn(2, N, D, dtype=torch.float64)
    y = torch.tensor([0, 2])
    z, logdet = flow(x, y)
    for b in range(2):
        J = torch.autograd.functional.jacobian(
            lambda v: flow(v.view(1, N, D), y[b:b + 1])[0].reshape(-1), x[b].reshape(-1))
        torch.testing.assert_close(logdet[b], torch.linalg.slogdet(J)[1], rtol=0, atol=1e-10)
        # Token perm[i] of the first block depends only on tokens perm[<i]: J is triangular in that order.
        order = torch.tensor(perms[0])
        J0 = torch.autograd.functional.jacobian(
            lambda v: flow.blocks[0](v.view(1, N, D), y[b:b + 1])[0][0], x[b:b + 1])[:, :, 0]  # (N, D, N, D)
        J0 = J0[order][:, :, order].abs().sum(dim=(1, 3))  # (N, N): output step i against input step j
        assert J0.triu(1).max() == 0 and J0.tril(-1).max() > 1e-3
    assert (flow.reverse(z, y) - x).abs().max() < 1e-9
    for w in (0.0, 1.5):
        torch.testing.assert_close(flow.reverse(z, y, guidance=w), reference_reverse(flow, z, y, w), rtol=0, atol=1e-9)


def test_config_and_state_rebuild_the_same_flow(tmp_path):
    """Save -> load through torch.save: TARFlow(**config) + load_state_dict gives identical outputs."""
    flow = make_flow(permutations=random_permutations(3, seed=1))
    torch.save(dict(flow_config=flow.config(), flow=flow.state_dict()), tmp_path / 'flow.pt')
    ckpt = torch.load(tmp_path / 'flow.pt')
    again = TARFlow(**ckpt['flow_config']).to(torch.float64).eval()
    again.load_state_dict(ckpt['flow'])
    x = torch.randn(3, N, D, dtype=torch.float64)
    y = torch.tensor([0, 1, 3])
    for a, b in zip(flow(x, y), again(x, y)):
        assert torch.equal(a, b)
    assert torch.equal(flow.reverse(x, y, guidance=1.0), again.reverse(x, y, guidance=1.0))
    # The orders come from the config: the same weights in the default orders give another flow.
    default = TARFlow(**{**ckpt['flow_config'], 'permutations': None}).to(torch.float64)
    default.load_state_dict(ckpt['flow'])
    assert (default(x, y)[0] - flow(x, y)[0]).abs().max() > 1e-2


# ----------------------------------------------------------------------------- SimFlow's score step (its eq. 6)

def class_affine_flow(dtype):
    """A flow whose every block moves each token by a class-only affine map, so p(x|y) is a known Gaussian.

    Closed layer gates (ada = 0) make the layers the identity; 1 + scale = 0 in the output modulation
    (scale bias -1) leaves the head proj_out(shift(y)): (mu, alpha) depend on the class only, and the
    first token each block reads is left as it is. Returns the flow and its per-token affine map
    z = a(y) * x + b(y) as two (num_classes + 1, N, D) float64 tensors."""
    flow = make_flow(num_classes=3, dtype=torch.float64, permutations=random_permutations(3, seed=2))
    C = flow.channels
    a = torch.ones(flow.num_classes + 1, N, D, dtype=torch.float64)
    b = torch.zeros_like(a)
    with torch.no_grad():
        for block in flow.blocks:
            for layer in block.layers:
                layer.ada.weight.zero_()
                layer.ada.bias.zero_()
            block.ada_out.weight[C:] = 0
            block.ada_out.bias[C:] = -1
            block.proj_out.weight.normal_(0, 0.3)
        flow.to(dtype).to(torch.float64)  # the weights as the flow will hold them in dtype
        for block in flow.blocks:
            shift = F.linear(F.silu(block.class_embed.weight), block.ada_out.weight[:C], block.ada_out.bias[:C])
            mu, alpha = F.linear(shift, block.proj_out.weight, block.proj_out.bias).chunk(2, dim=-1)  # (K + 1, D)
            moved = [p for p in range(N) if p != block.perm[0]]
            a[:, moved] = a[:, moved] * torch.exp(-alpha)[:, None]
            b[:, moved] = (b[:, moved] - mu[:, None]) * torch.exp(-alpha)[:, None]
    return flow.to(dtype), a, b


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_score_step_matches_closed_form(dtype, tol):
    flow, a, b = class_affine_flow(dtype)
    x = torch.randn(4, N, D, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    null = torch.full_like(y, flow.null_label)
    log_p = lambda labels: (torch.distributions.Normal(0.0, 1.0).log_prob(a[labels] * x + b[labels])
                            + a[labels].log()).sum(dim=(1, 2))
    torch.testing.assert_close(flow.to(torch.float64).log_prob(x, y), log_p(y), rtol=0, atol=1e-10)  # known density
    flow.to(dtype)
    score = lambda labels: -a[labels] * (a[labels] * x + b[labels])  # grad_x log N(a x + b; 0, I) + log a
    gamma = 0.3
    expected = x + gamma * (score(y) - score(null))
    with torch.no_grad():
        out = flow.score_step(x.to(dtype), y, gamma)
    assert out.dtype == dtype and not out.requires_grad and not flow.score_step(x.to(dtype), y, gamma).requires_grad
    assert (expected - x).abs().max() > 0.05  # the step really moves x
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    with torch.inference_mode():
        torch.testing.assert_close(flow.score_step(x.to(dtype), y, gamma), out, rtol=0, atol=0)
    assert torch.equal(flow.score_step(x.to(dtype), y, 0.0), x.to(dtype))  # gamma = 0: x unchanged
    # in chunks of images (the memory bound): the same step, each example on its own
    same = 1e-12 if dtype == torch.float64 else 1e-6   # batch composition may move float32's last bits
    torch.testing.assert_close(flow.score_step(x.to(dtype), y, gamma, chunk=3), out, rtol=0, atol=same)
    torch.testing.assert_close(flow.score_step(x.to(dtype), y, gamma, chunk=1), out, rtol=0, atol=same)


def test_loading_a_flow_reads_only_its_weights(tmp_path):
    """load_flow memory-maps the checkpoint: the host's peak memory grows by about the weights it
    loads, not by the optimizer state stored beside them (measured in a fresh process)."""
    import os
    import subprocess
    import sys
    import tarflow
    flow = TARFlow(32, 64, channels=256, depths=[2, 2], head_dim=64, num_classes=10)   # 4.8M: 19 MB
    optimizer = {f"state{i}": torch.randn(1 << 22) for i in range(24)}                 # 24 x 16 MB
    torch.save(dict(stage="flow", flow_kind="TARFlow", flow_config=flow.config(), flow=flow.state_dict(),
                    flow_ema=flow.state_dict(), optimizer=optimizer, rng=None), tmp_path / "flow.pt")
    # the peak resident memory (VmHWM), reset after the imports (clear_refs 5): a child process
    # would otherwise inherit the parent's peak
    script = (f"import sys; sys.path.insert(0, {os.path.dirname(tarflow.__file__)!r})\n"
              "import tarflow\n"
              "def peak():\n"
              "    line = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
              "    return int(line.split()[1]) / 1024  # MB\n"
              "open('/proc/self/clear_refs', 'w').write('5')\n"
              f"before = peak(); flow, record = tarflow.load_flow({str(tmp_path / 'flow.pt')!r}); "
              "print(peak() - before, sorted(record))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    grown, keys = out.stdout.split(" ", 1)
    assert float(grown) < 120, out.stdout               # ~2 x 19 MB of weights, not the 384 MB beside them
    assert "optimizer" not in keys and "flow_ema" not in keys
