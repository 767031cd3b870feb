"""SRC (src.py): eq. 4 against an independent computation, global mixing, learning, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

from src import SRC


def reference_block(x, sd, prefix, heads):
    """A pre-LN ViT block written out with plain tensor ops from the raw state dict."""
    B, N, C = x.shape
    h = F.layer_norm(x, (C,), sd[prefix + "norm1.weight"], sd[prefix + "norm1.bias"], eps=1e-6)
    qkv = h @ sd[prefix + "attn.qkv.weight"].T + sd[prefix + "attn.qkv.bias"]
    q, k, v = qkv.view(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(C // heads), dim=-1)
    o = (att @ v).transpose(1, 2).reshape(B, N, C)
    x = x + o @ sd[prefix + "attn.proj.weight"].T + sd[prefix + "attn.proj.bias"]
    h = F.layer_norm(x, (C,), sd[prefix + "norm2.weight"], sd[prefix + "norm2.bias"], eps=1e-6)
    h = h @ sd[prefix + "mlp.fc1.weight"].T + sd[prefix + "mlp.fc1.bias"]
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
