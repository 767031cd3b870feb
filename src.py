"""Semantic representation compressors: the SRC of paper §3.2 (eq. 4) and the variants of its Table 5.

A compressor maps each normalized RAE token z_i in R^n (n = 768 for DINOv2-B) to a compact token in R^d (d = 32)
from which the frozen RAE decoder still rebuilds the image: z_c~ = C_enc(z) in R^{N x d}, z^ = C_dec(z_c~) (eq. 4).
COMPRESSORS maps train_src.py's --compressor value to the class (Table 5's convolutional variant is not provided):
  src       the paper's SRC: L Transformer blocks at width n, then Linear n -> d; C_dec mirrors it. Self-attention
            lets every compact token draw on the whole image: the best of Table 5.
  linear    token-wise Linear n -> d and d -> n, trained with the same stage-1 losses (Table 5).
  pca       fitted, not trained: the top-d principal directions of the normalized RAE tokens (§3.2, Fig. 3: 99.06%
            of the variance at d = 32; Table 5).
  identity  no compression, d = n: the full-representation baseline that the flow struggles with (§3.1, Table 1).
"""

import inspect

import torch
import torch.nn as nn

from rae import Block


def init_linear(module):
    """ViT initialisation of every Linear in module: truncated normal (std 0.02) weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)


class Compressor(nn.Module):
    """Every compressor has n, d, kind, encode, decode, forward = decode(encode(.)), config() (type(c)(**c.config())
    rebuilds it) and last_layer(): the weight whose gradient sets stage 1's adaptive GAN weight, or None."""

    def __init__(self, n, d):
        super().__init__()
        if n <= 0 or d <= 0:
            raise ValueError(f"{type(self).__name__}: need n > 0 and d > 0, got n={n}, d={d}")
        self.n, self.d = n, d

    def config(self):
        return {name: getattr(self, name) for name in inspect.signature(type(self)).parameters}

    def _check(self, x, width, name):
        if x.dim() != 3 or x.shape[-1] != width:
            raise ValueError(f"{type(self).__name__}.{name}: expected (B, N, {width}) tokens, got {tuple(x.shape)}")
        return x

    def forward(self, z):
        """z^ = C_dec(C_enc(z)) (eq. 4)."""
        return self.decode(self.encode(z))

    def last_layer(self):
        return None


class SRC(Compressor):
    """C_enc: (B, N, n) -> (B, N, d) and C_dec: (B, N, d) -> (B, N, n) with L Transformer blocks each (eq. 4).

    The blocks are the DINOv2 encoder's pre-LN ViT blocks (rae.Block, without LayerScale). Each side ends its stack
    with a LayerNorm; on the decoder side this matches the target: RAE tokens are LayerNorm outputs (without affine)
    standardised per channel, an affine map of a LayerNorm output, which a LayerNorm with affine represents exactly.
    """
    kind = "src"

    def __init__(self, n=768, d=32, depth=4, num_heads=None, mlp_ratio=4.0):
        super().__init__(n, d)
        num_heads = num_heads or max(1, n // 64)
        if n % num_heads or depth < 0:
            raise ValueError(f"SRC: need depth >= 0 (got {depth}) and a width n={n} divisible by num_heads={num_heads}"
                             f"{' (it is not divisible)' if n % num_heads else ''}")
        self.depth, self.num_heads, self.mlp_ratio = depth, num_heads, mlp_ratio
        self.enc_blocks = nn.Sequential(*[Block(n, num_heads, mlp_ratio) for _ in range(depth)])
        self.enc_norm, self.enc_proj = nn.LayerNorm(n, eps=1e-6), nn.Linear(n, d)
        self.dec_proj = nn.Linear(d, n)
        self.dec_blocks = nn.Sequential(*[Block(n, num_heads, mlp_ratio) for _ in range(depth)])
        self.dec_norm = nn.LayerNorm(n, eps=1e-6)
        init_linear(self)

    def last_layer(self):
        """C_dec's last linear layer: the last block's fc2, or the d -> n projection when L = 0."""
        return self.dec_blocks[-1].mlp.fc2.weight if self.depth else self.dec_proj.weight

    def encode(self, z):
        """C_enc: normalized RAE tokens z (B, N, n) -> compact tokens (B, N, d)."""
        return self.enc_proj(self.enc_norm(self.enc_blocks(self._check(z, self.n, "encode"))))

    def decode(self, zc):
        """C_dec: compact tokens (B, N, d) -> reconstructed normalized RAE tokens (B, N, n)."""
        return self.dec_norm(self.dec_blocks(self.dec_proj(self._check(zc, self.d, "decode"))))


class Linear(Compressor):
    """Token-wise C_enc = Linear n -> d and C_dec = Linear d -> n: no token sees another (Table 5)."""
    kind = "linear"

    def __init__(self, n=768, d=32):
        super().__init__(n, d)
        self.enc_proj, self.dec_proj = nn.Linear(n, d), nn.Linear(d, n)
        init_linear(self)

    def last_layer(self):
        return self.dec_proj.weight

    def encode(self, z):
        return self.enc_proj(self._check(z, self.n, "encode"))

    def decode(self, zc):
        return self.dec_proj(self._check(zc, self.d, "decode"))


class PCA(Compressor):
    """C_enc(z) = (z - mean) @ components^T, C_dec(zc) = zc @ components + mean; components (d, n) holds the top-d
    principal directions as orthonormal rows, `explained` the share of the variance they capture (NaN until fit)."""
    kind = "pca"

    def __init__(self, n=768, d=32):
        super().__init__(n, d)
        if d > n:
            raise ValueError(f"PCA: need d <= n, got n={n}, d={d}")
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("components", torch.eye(d, n))
        self.register_buffer("explained", torch.tensor(float("nan")))

    @torch.no_grad()
    def fit(self, mean, cov):
        """Set the components from the channel mean (n,) and the n x n covariance of the normalized RAE tokens:
        eigenvectors of the d largest eigenvalues (eigh in float64), each signed so its largest-|.| entry is > 0."""
        mean, cov = (torch.as_tensor(t).double().cpu() for t in (mean, cov))
        if mean.shape != (self.n,) or cov.shape != (self.n, self.n) or not cov.isfinite().all():
            raise ValueError(f"PCA.fit: expected a mean ({self.n},) and a finite covariance ({self.n}, {self.n}), "
                             f"got {tuple(mean.shape)} and {tuple(cov.shape)}")
        evals, evecs = torch.linalg.eigh((cov + cov.T) / 2)  # ascending eigenvalues
        evals, comps = evals.flip(0).clamp_min(0), evecs.flip(1)[:, :self.d].T
        comps = comps * comps.gather(1, comps.abs().argmax(1, keepdim=True)).sign()
        self.mean.copy_(mean)
        self.components.copy_(comps)
        self.explained.fill_(float(evals[:self.d].sum() / evals.sum()))
        return self

    def encode(self, z):
        return (self._check(z, self.n, "encode") - self.mean) @ self.components.T

    def decode(self, zc):
        return self._check(zc, self.d, "decode") @ self.components + self.mean


class Identity(Compressor):
    """No compression (d = n): the naive full-representation baseline."""
    kind = "identity"

    def __init__(self, n=768):
        super().__init__(n, n)

    def encode(self, z):
        return self._check(z, self.n, "encode")

    def decode(self, zc):
        return self._check(zc, self.d, "decode")


COMPRESSORS = {"src": SRC, "linear": Linear, "pca": PCA, "identity": Identity}
