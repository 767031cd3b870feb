"""Tests for tarflow.py: exact log-det (eq. 2, 3), exact inverse, KV-cached sampling against a
recomputing reference, STARFlow's guided Gaussian, precision under bf16 autocast, and that
maximum likelihood (eq. 9) learns a density of known entropy."""

import math

import pytest
import torch

from tarflow import SIZES, TARFlow, guided_gaussian

N, D = 5, 3  # tokens, channels of the small test flows


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is fastest and does not stall on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_flow(num_classes=3, dtype=torch.float64, depths=(1, 2, 1), seed=0):
    """A tiny flow with every weight perturbed, the zero-initialised ones included, so it is non-trivial."""
    torch.manual_seed(seed)
    flow = TARFlow(D, N, channels=32, depths=list(depths), head_dim=16, num_classes=num_classes).to(dtype)
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


def reference_reverse(flow, z, y, w):
    """Sampling without caches: every token re-runs each block's full causal forward pass.

    (mu, alpha) of a token come from the public forward: with that token set to 0 and to 1,
    z0 = -mu e^-alpha and z1 = (1 - mu) e^-alpha. CFG combines the conditional and null-label
    Gaussians as SPEC §2 writes it, sigma = exp(alpha)."""
    null = torch.full_like(y, flow.num_classes)

    def gaussian(block, x, labels, p):
        x0, x1 = x.clone(), x.clone()
        x0[:, p], x1[:, p] = 0, 1
        z0, z1 = block(x0, labels)[0][:, p], block(x1, labels)[0][:, p]
        scale = z1 - z0
        return -z0 / scale, 1 / scale  # mu, sigma

    x = z.clone()
    for block in reversed(flow.blocks):
        order = list(range(N))[::-1] if block.flip else list(range(N))
        u, x = x, x.clone()
        for p in order[1:]:
            mu_c, sigma_c = gaussian(block, x, y, p)
            mu, sigma = mu_c, sigma_c
            if w > 0:
                mu_u, sigma_u = gaussian(block, x, null, p)
                s = torch.minimum(sigma_c / sigma_u, torch.ones_like(sigma_c)) ** 2
                sigma = sigma_c / torch.sqrt(1 + w - w * s)
                mu = ((1 + w) * mu_c - w * s * mu_u) / (1 + w - w * s)
            x[:, p] = u[:, p] * sigma + mu
    return x


@pytest.mark.parametrize("w", [0.0, 1.5])
def test_kv_cached_reverse_matches_recompute(w):
    flow = make_flow()
    z = torch.randn(3, N, D, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    fast = flow.reverse(z, y, guidance=w)
    ref = reference_reverse(flow, z, y, w)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-9)
    if w > 0:  # guidance really moved the samples
        assert (fast - flow.reverse(z, y)).abs().max() > 1e-2


def test_guided_gaussian_formula():
    g = torch.Generator().manual_seed(0)
    mu_c, mu_u, a_c, a_u = torch.randn(4, 1000, generator=g, dtype=torch.float64)
    w = 2.5
    mu, sigma = guided_gaussian(mu_c, a_c, mu_u, a_u, w)
    # Direct: the Gaussian proportional to p_c^(1+w) / p_u^w where that is normalisable, and
    # sigma_u replaced by sigma_c where sigma_c > sigma_u (s = 1).
    s_c, s_u = a_c.exp(), a_u.exp()
    s_u = torch.maximum(s_u, s_c)
    prec = (1 + w) / s_c**2 - w / s_u**2
    torch.testing.assert_close(sigma, prec.rsqrt())
    torch.testing.assert_close(mu, ((1 + w) * mu_c / s_c**2 - w * mu_u / s_u**2) / prec)
    mu0, sigma0 = guided_gaussian(mu_c, a_c, mu_u, a_u, 0.0)  # w = 0: the conditional Gaussian
    torch.testing.assert_close(mu0, mu_c)
    torch.testing.assert_close(sigma0, s_c)


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
    heads = {'S': 6, 'B': 12, 'L': 16, 'XL': 16, 'XXL': 16}
    deep = {'S': 2, 'B': 2, 'L': 14, 'XL': 18, 'XXL': 36}
    for name in heads:
        cfg = SIZES[name]
        assert cfg['channels'] // cfg['head_dim'] == heads[name] and cfg['channels'] % cfg['head_dim'] == 0
        assert cfg['depths'] == [2, 2, 2, 2, 2, deep[name]]
    with torch.device('meta'):  # SimFlow-S: 37M parameters with 1000 classes
        flow = TARFlow(32, 256, num_classes=1000, **SIZES['S'])
    assert abs(sum(p.numel() for p in flow.parameters()) / 37e6 - 1) < 0.02


def test_orderings_alternate_and_deep_block_last():
    flow = TARFlow(D, N, channels=32, depths=[1, 1, 1, 3], head_dim=16)
    assert [b.flip for b in flow.blocks] == [False, True, False, True]
    assert [len(b.layers) for b in flow.blocks] == [1, 1, 1, 3]
    assert TARFlow(**flow.config()).config() == flow.config()


@pytest.mark.parametrize("call,match", [
    (lambda f: f(torch.randn(2, N + 1, D)), r"TARFlow\.forward: expected float tokens of shape \(B, 5, 3\)"),
    (lambda f: f(torch.randn(N, D)), r"TARFlow\.forward: expected"),
    (lambda f: f(torch.zeros(2, N, D, dtype=torch.long)), r"TARFlow\.forward: expected float"),
    (lambda f: f(torch.randn(2, N, D), torch.tensor([0.0, 1.0])), r"integer labels y of shape \(2,\)"),
    (lambda f: f(torch.randn(2, N, D), torch.tensor([0, 1, 2])), r"integer labels y of shape \(2,\)"),
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
