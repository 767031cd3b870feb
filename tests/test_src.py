"""src.py: SRC (eq. 4) against an independent computation, global mixing, learning, bad input; the Table 5 variants:
PCA against an independent numpy SVD, Linear token-wise against its formula, Identity exact; config round trips
and the GAN layer of every compressor; Stage1's num_classes and image_size."""

import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from src import COMPRESSORS, PCA, SRC, Conv, Identity, Linear


def reference_block(x, sd, prefix, heads, tanh_gelu=False):
    """A pre-LN ViT block written out with plain tensor ops from the raw state dict; the MLP's GELU exact, or its
    tanh approximation (RAE's DINO discriminator: GELU(approximate='tanh'))."""
    B, N, C = x.shape
    h = F.layer_norm(x, (C,), sd[prefix + "norm1.weight"], sd[prefix + "norm1.bias"], eps=1e-6)
    qkv = h @ sd[prefix + "attn.qkv.weight"].T + sd[prefix + "attn.qkv.bias"]
    q, k, v = qkv.view(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(C // heads), dim=-1)
    o = (att @ v).transpose(1, 2).reshape(B, N, C)
    x = x + o @ sd[prefix + "attn.proj.weight"].T + sd[prefix + "attn.proj.bias"]
    h = F.layer_norm(x, (C,), sd[prefix + "norm2.weight"], sd[prefix + "norm2.bias"], eps=1e-6)
    h = h @ sd[prefix + "mlp.fc1.weight"].T + sd[prefix + "mlp.fc1.bias"]
    if tanh_gelu:
        h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    else:
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
    return x + h @ sd[prefix + "mlp.fc2.weight"].T + sd[prefix + "mlp.fc2.bias"]


def reference_src(z, sd, depth, heads, n, d):
    for i in range(depth):
        z = reference_block(z, sd, f"enc_blocks.{i}.", heads)
    z = F.layer_norm(z, (n,), sd["enc_norm.weight"], sd["enc_norm.bias"], eps=1e-6)
    zc = z @ sd["enc_proj.weight"].T + sd["enc_proj.bias"]
    x = zc @ sd["dec_proj.weight"].T + sd["dec_proj.bias"]
    for i in range(depth):
        x = reference_block(x, sd, f"dec_blocks.{i}.", heads)
    x = F.layer_norm(x, (n,), sd["dec_norm.weight"], sd["dec_norm.bias"], eps=1e-6)
    return zc, x


def randomized(model, seed=0):
    """Perturb every parameter (LayerNorms included) so the comparison exercises them all."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def test_shapes_and_defaults():
    C = SRC(n=128, d=32)
    assert C.depth == 4 and C.d == 32 and C.num_heads == 2
    z = torch.randn(2, 16, 128)
    zc = C.encode(z)
    assert zc.shape == (2, 16, 32)
    assert C.decode(zc).shape == (2, 16, 128)
    assert len(C.enc_blocks) == len(C.dec_blocks) == 4


@pytest.mark.parametrize("depth", [1, 3])
def test_matches_independent_computation_float64(depth):
    n, d, heads = 64, 8, 4
    C = randomized(SRC(n=n, d=d, depth=depth, num_heads=heads)).double().eval()
    z = torch.randn(3, 10, n, dtype=torch.float64)
    zc_ref, zhat_ref = reference_src(z, C.state_dict(), depth, heads, n, d)
    torch.testing.assert_close(C.encode(z), zc_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(C(z), zhat_ref, rtol=1e-10, atol=1e-10)


def test_compression_mixes_tokens_globally():
    """Transformer compression (paper §3.2): changing one input token moves every compact token,
    which a token-wise projection would not."""
    C = randomized(SRC(n=64, d=8, depth=1, num_heads=4)).eval()
    z = torch.randn(1, 12, 64)
    z2 = z.clone()
    z2[0, 5] += torch.randn(64)
    delta = (C.encode(z2) - C.encode(z)).abs().amax(-1)[0]
    assert (delta > 1e-6).all(), delta


def test_config_round_trip():
    C = SRC(n=96, d=16, depth=2, num_heads=3, mlp_ratio=2.0)
    C2 = SRC(**C.config())
    C2.load_state_dict(C.state_dict(), strict=True)
    z = torch.randn(1, 4, 96)
    torch.testing.assert_close(C.eval()(z), C2.eval()(z))


def test_learns_to_reconstruct_low_rank_tokens():
    """Tokens with d degrees of freedom can pass the n -> d bottleneck: a few hundred Adam steps
    must bring the reconstruction error far below the data variance. The tokens are shaped like
    RAE tokens (eq. 1): a LayerNorm output without affine, standardised per channel."""
    torch.manual_seed(0)
    n, d, N = 32, 4, 8
    A = torch.randn(d, n) / math.sqrt(d)
    gamma, beta = 0.5 + torch.rand(n), torch.randn(n)
    data = lambda b: F.layer_norm(torch.randn(b, N, d) @ A, (n,)) * gamma + beta
    C = SRC(n=n, d=d, depth=1, num_heads=2)
    opt = torch.optim.Adam(C.parameters(), lr=3e-3)
    for _ in range(300):
        z = data(64)
        loss = F.mse_loss(C(z), z)
        opt.zero_grad()
        loss.backward()
        opt.step()
    z = data(256)
    with torch.no_grad():
        err = F.mse_loss(C(z), z) / z.var()
    assert err < 0.05, float(err)


@pytest.mark.parametrize("bad", [torch.randn(2, 16, 100), torch.randn(16, 128)])
def test_encode_refuses_wrong_shape(bad):
    C = SRC(n=128, d=32, depth=1)
    with pytest.raises(ValueError, match=r"SRC.encode: expected \(B, N, 128\)"):
        C.encode(bad)


def test_decode_refuses_wrong_shape():
    C = SRC(n=128, d=32, depth=1)
    with pytest.raises(ValueError, match=r"SRC.decode: expected \(B, N, 32\)"):
        C.decode(torch.randn(1, 4, 128))


def test_constructor_refuses_bad_heads():
    with pytest.raises(ValueError, match="not divisible"):
        SRC(n=100, d=8, num_heads=3)


# -----------------------------------------------------------------------------
# All compressors: COMPRESSORS, shapes, config round trip, GAN layer, input checks

def build(kind, n=64, d=8, **extra):
    """A compressor of `kind` for n = 64 tokens, d = 8 where its constructor takes d (identity: d = n)."""
    make = COMPRESSORS[kind]
    if "d" in inspect.signature(make).parameters:
        extra["d"] = d
    return make(n=n, **extra)


@pytest.mark.parametrize("kind", list(COMPRESSORS))
def test_compressor_shapes_config_round_trip_and_checks(kind):
    C = build(kind)
    if hasattr(C, "fit"):   # a fitted compressor (PCA, random covariance): the round trip carries real buffers
        A = torch.randn(64, 64, dtype=torch.float64)
        C.fit(torch.randn(64), A @ A.T / 64)
    randomized(C, seed=1)
    d = 8 if "d" in inspect.signature(type(C)).parameters else 64
    assert COMPRESSORS[kind] is type(C) and C.kind == kind and (C.n, C.d) == (64, d)
    z = torch.randn(2, 9, 64)                                   # a 3 x 3 grid of tokens
    assert C.encode(z).shape == (2, 9, d) and C.decode(C.encode(z)).shape == (2, 9, 64)
    C2 = type(C)(**C.config())
    assert C2.config() == C.config()
    C2.load_state_dict(C.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(C2.eval()(z), C.eval()(z)) and torch.equal(C(z), C.decode(C.encode(z)))
    name = type(C).__name__
    for method, width, bad in (("encode", 64, torch.randn(2, 9, 63)), ("encode", 64, torch.randn(9, 64)),
                               ("decode", d, torch.randn(2, 9, d + 1))):
        with pytest.raises(ValueError, match=rf"^{name}.{method}: expected \(B, N, {width}\) tokens, got"):
            getattr(C, method)(bad)
    if isinstance(C, Conv):                                     # a grid of tokens: N must be a square
        for method, width in (("encode", 64), ("decode", d)):
            with pytest.raises(ValueError, match=rf"^Conv.{method}: expected a square grid of N tokens, got N=10$"):
                getattr(C, method)(torch.randn(2, 10, width))


@pytest.mark.parametrize("kind,extra", [(kind, {}) for kind in COMPRESSORS] + [("src", dict(depth=0))])
def test_last_layer_is_the_last_trained_weight_of_the_decoder(kind, extra):
    """The adaptive GAN weight needs C_dec's last layer: the gradient of the output reaches it, and it is C_dec's
    final weight (the last block's fc2; the d -> n projection when there are no blocks). None when nothing trains
    (a fork's None with parameters: train_src.py refuses a GAN on it, tests/test_fork.py). The choice is VQGAN's
    and RAE's, the generator's last weight *matrix*: only 1-D parameters (fc2's bias, the final LayerNorm's
    per-channel affine) come after it."""
    C = build(kind, **extra)
    W = C.last_layer()
    params = list(C.parameters())                   # in forward order: C_enc, then C_dec
    if not params:
        assert W is None
    if W is None:
        return
    if extra.get("depth") == 0:
        assert W is C.dec_proj.weight
    elif isinstance(C, (SRC, Conv)):
        assert W is C.dec_blocks[-1].mlp.fc2.weight
    assert W.shape[0] == 64
    matrices = [p for p in params if p.dim() >= 2]
    assert W is matrices[-1]
    after = params[[p is W for p in params].index(True) + 1:]
    assert all(p.dim() == 1 for p in after)
    C(torch.randn(2, 4, 64)).square().sum().backward()
    assert W.grad is not None and W.grad.abs().sum() > 0


def test_compressor_constructors_refuse_bad_sizes():
    for make in (lambda: Linear(n=64, d=0), lambda: PCA(n=0, d=8), lambda: PCA(n=8, d=16), lambda: Identity(n=0),
                 lambda: SRC(n=64, d=8, depth=-1, num_heads=2), lambda: Conv(n=64, d=8, kernel=2),
                 lambda: Conv(n=64, d=8, depth=-1), lambda: Conv(n=64, d=0)):
        with pytest.raises(ValueError) as e:
            make()
        assert "\n" not in str(e.value)


def test_conv_compressor_is_local_and_sized_near_the_src():
    """Changing one token of the 7 x 7 grid moves exactly the codes within depth * (kernel // 2) grid steps of it
    (Chebyshev distance, zero padding at the borders); the round trip reaches twice as far. At the paper's sizes
    (n = 768, d = 32) the default Conv has about the parameters of the SRC with L = 4."""
    C = randomized(Conv(n=32, d=4, depth=2, kernel=3, mlp_ratio=2.0)).double().eval()
    g, row, col = 7, 2, 4
    z = torch.randn(1, g * g, 32, dtype=torch.float64)
    z2 = z.clone()
    z2[0, row * g + col] += torch.randn(32, dtype=torch.float64)
    r, c = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    steps = torch.maximum((r - row).abs(), (c - col).abs()).flatten()
    with torch.no_grad():
        for fn, reach in ((C.encode, 2), (C, 4)):
            delta = (fn(z2) - fn(z)).abs().amax(-1)[0]
            assert (delta[steps <= reach] > 1e-9).all() and (delta[steps > reach] == 0).all(), (reach, delta)
    count = lambda m: sum(p.numel() for p in m.parameters())
    with torch.device("meta"):                                              # shapes only, no memory
        assert count(Conv()) == 60_261_152 and count(SRC()) == 56_756_000   # n = 768, d = 32: within 7%


# -----------------------------------------------------------------------------
# PCA, Linear, Identity

def correlated_tokens(M, n, seed=0):
    """M tokens of width n with a known spread of variances (distinct eigenvalues, so components are unique up to
    sign), a non-zero mean, in float64."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    Q, _ = torch.linalg.qr(randn(n, n))
    return randn(M, n) * torch.logspace(1, -2, n, dtype=torch.float64) @ Q.T + randn(n)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pca_matches_numpy_svd(dtype):
    """Projection, reconstruction and explained variance against numpy's SVD of the same centred feature matrix."""
    n, d, B, N = 48, 6, 20, 25
    X = correlated_tokens(B * N, n)
    mean, Xc = X.mean(0), X - X.mean(0)
    P = PCA(n=n, d=d).to(dtype).fit(mean, Xc.T @ Xc / len(X))     # population covariance
    _, S, Vt = np.linalg.svd(Xc.numpy(), full_matrices=False)
    ref = torch.from_numpy(Vt[:d])                                  # rows: principal directions, any sign
    comps = P.components.double()
    sign = torch.sign((comps * ref).sum(1, keepdim=True))           # align signs, then compare exactly
    assert (sign.abs() == 1).all()
    torch.testing.assert_close(comps, sign * ref, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-10)
    big = comps.gather(1, comps.abs().argmax(1, keepdim=True))      # the deterministic sign convention
    assert (big > 0).all()
    torch.testing.assert_close(comps @ comps.T, torch.eye(d, dtype=torch.float64), rtol=0, atol=1e-6)
    z = X.reshape(B, N, n).to(dtype)
    with torch.no_grad():
        zc, zhat = P.encode(z), P(z)
    proj_ref = (Xc @ ref.T * sign.T).reshape(B, N, d)
    recon_ref = (Xc @ ref.T @ ref + mean).reshape(B, N, n)
    torch.testing.assert_close(zc.double(), proj_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(zhat.double(), recon_ref, rtol=0, atol=1e-5)
    assert abs(float(P.explained) - float((S[:d] ** 2).sum() / (S ** 2).sum())) < 1e-6
    assert 0.5 < float(P.explained) < 1


def test_pca_fit_refuses_bad_statistics():
    P = PCA(n=8, d=2)
    assert math.isnan(float(P.explained))
    for mean, cov in ((torch.zeros(7), torch.eye(8)), (torch.zeros(8), torch.eye(7)),
                      (torch.zeros(8), torch.full((8, 8), float("nan")))):
        with pytest.raises(ValueError, match="PCA.fit: expected"):
            P.fit(mean, cov)


def test_linear_is_token_wise():
    """Changing one token changes only that token's code; the code is W z + b from the raw state dict."""
    C = randomized(Linear(n=64, d=8)).double()
    z = torch.randn(2, 12, 64, dtype=torch.float64)
    z2 = z.clone()
    z2[1, 5] += torch.randn(64, dtype=torch.float64)
    with torch.no_grad():
        delta = (C.encode(z2) - C.encode(z)).abs().amax(-1)
        sd = C.state_dict()
        torch.testing.assert_close(C.encode(z), z @ sd["enc_proj.weight"].T + sd["enc_proj.bias"], rtol=0, atol=1e-12)
        zc = torch.randn(2, 12, 8, dtype=torch.float64)
        torch.testing.assert_close(C.decode(zc), zc @ sd["dec_proj.weight"].T + sd["dec_proj.bias"], rtol=0, atol=1e-12)
    assert delta[1, 5] > 1e-3
    delta[1, 5] = 0
    assert (delta == 0).all()


def test_identity_is_exact():
    C = Identity(n=64)
    z = torch.randn(2, 12, 64)
    assert C.d == C.n == 64 and C.config() == {"n": 64} and not list(C.parameters())
    assert torch.equal(C.encode(z), z) and torch.equal(C.decode(z), z) and torch.equal(C(z), z)


# -----------------------------------------------------------------------------
# Stage1: what it is given, not set from outside

def test_stage1_takes_num_classes_and_reads_image_size_from_the_rae():
    """num_classes is a constructor argument; image_size is the RAE's, read-only; a new Stage1's norm2 is the
    identity (eq. 7 has none)."""
    import rae
    from src import Stage1
    torch.manual_seed(0)
    E = rae.DINOv2(embed_dim=32, depth=1, num_heads=1, num_registers=0, pos_grid=2)
    D = rae.RAEDecoder(in_dim=32, hidden=32, depth=1, num_heads=1, mlp_dim=64, patch_size=16, num_patches=4)
    s1 = Stage1(rae.RAE(E, D, image_size=32), Linear(n=32, d=4), num_classes=3)
    assert s1.image_size == 32 and s1.num_classes == 3 and Stage1(s1.rae, s1.C).num_classes is None
    with pytest.raises(AttributeError):
        s1.image_size = 64
    z_raw = s1.encode_raw(torch.rand(2, 3, 32, 32))
    assert torch.equal(s1.compact(z_raw), s1.C.encode(s1.rae.normalize(z_raw)))   # norm2 = identity until set
