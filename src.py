"""Semantic Representation Compressor (SRC), paper §3.2, eq. 4.

The SRC squeezes each normalized RAE token z_i in R^n (n = 768 for DINOv2-B) to a compact
token in R^d (d = 32) while a frozen RAE decoder can still rebuild the image from the
reconstruction:

    z_c~ = C_enc(z) in R^{N x d},      z^ = C_dec(z_c~) in R^{N x n}          (eq. 4)

C_enc is L Transformer blocks at width n followed by a Linear n -> d; C_dec mirrors it with a
Linear d -> n followed by L blocks. The blocks are the same pre-LN ViT blocks as the DINOv2
encoder (rae.Block, without LayerScale): self-attention lets every compact token draw on the
whole image, which the paper found better than token-wise or convolutional compressors.

Each side ends its block stack with a LayerNorm, as ViTs do. On the decoder side this also
matches the target's form: RAE tokens are LayerNorm outputs (without affine) standardised per
channel, i.e. an affine map of a LayerNorm output, which a LayerNorm with affine represents
exactly.
"""

import torch
import torch.nn as nn

from rae import Block


class SRC(nn.Module):
    """C_enc: (B, N, n) -> (B, N, d) and C_dec: (B, N, d) -> (B, N, n) (eq. 4)."""

    def __init__(self, n=768, d=32, depth=4, num_heads=None, mlp_ratio=4.0):
        super().__init__()
        if n <= 0 or d <= 0 or depth < 0:
            raise ValueError(f"SRC: need n > 0, d > 0, depth >= 0, got n={n}, d={d}, depth={depth}")
        num_heads = num_heads or max(1, n // 64)
        if n % num_heads:
            raise ValueError(f"SRC: width n={n} is not divisible by num_heads={num_heads}")
        self.n, self.d, self.depth, self.num_heads, self.mlp_ratio = n, d, depth, num_heads, mlp_ratio
        # C_enc: L blocks at width n, then n -> d.
        self.enc_blocks = nn.ModuleList([Block(n, num_heads, mlp_ratio) for _ in range(depth)])
        self.enc_norm = nn.LayerNorm(n, eps=1e-6)
        self.enc_proj = nn.Linear(n, d)
        # C_dec: d -> n, then L blocks at width n.
        self.dec_proj = nn.Linear(d, n)
        self.dec_blocks = nn.ModuleList([Block(n, num_heads, mlp_ratio) for _ in range(depth)])
        self.dec_norm = nn.LayerNorm(n, eps=1e-6)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def config(self):
        """The constructor arguments, as stored in stage-1 checkpoints."""
        return dict(n=self.n, d=self.d, depth=self.depth, num_heads=self.num_heads,
                    mlp_ratio=self.mlp_ratio)

    def _check(self, x, width, name):
        if x.dim() != 3 or x.shape[-1] != width:
            raise ValueError(f"SRC.{name}: expected (B, N, {width}) tokens, got {tuple(x.shape)}")

    def encode(self, z):
        """C_enc: normalized RAE tokens z (B, N, n) -> compact tokens (B, N, d)."""
        self._check(z, self.n, "encode")
        for block in self.enc_blocks:
            z = block(z)
        return self.enc_proj(self.enc_norm(z))

    def decode(self, zc):
        """C_dec: compact tokens (B, N, d) -> reconstructed normalized RAE tokens (B, N, n)."""
        self._check(zc, self.d, "decode")
        z = self.dec_proj(zc)
        for block in self.dec_blocks:
            z = block(z)
        return self.dec_norm(z)

    def forward(self, z):
        """z^ = C_dec(C_enc(z)) (eq. 4)."""
        return self.decode(self.encode(z))
