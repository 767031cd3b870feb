"""The Semantic Representation Compressor and the compact space it makes (paper §3.2-3.4).

A compressor maps each normalized RAE token (n = 768) to a compact one (d = 32) from which the
frozen RAE decoder D still rebuilds the image: z_c~ = C_enc(z), z^ = C_dec(z_c~) (eq. 4).
COMPRESSORS, below the classes, is the one list of them (--compressor, the checkpoints' kind,
the tests): the rows of the paper's Table 5 and the full-representation baseline of Table 1,
each described by its class. A fork adds its class there; train_src.py passes --src-dim and
--src-depth to the constructor's d and depth (a kind without one refuses the flag), and a
checkpoint records the kind and config().

Stage1 then writes the compact space once, with E, the RAE statistics (eq. 1) and norm2:

    x^  = D(denorm(C_dec(C_enc(norm(E(x) + eps_src)))))             (eq. 7, stage 1 trains it)
    z_c = norm2(C_enc(norm(E(x) + eps_flow)))                       (eq. 5 without noise, eq. 8)
    x^  = D(denorm(C_dec(denorm2(f^{-1}(u)))))                      (eq. 10, sampling)

load_stage1 rebuilds it from a train_src.py checkpoint.
"""

import inspect
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError, load_checkpoint
from rae import (RAE, STATS_EPS, Block, RAEDecoder, denormalize, fingerprint, load_dinov2,
                 load_rae_decoder, normalize)

LN_EPS = 1e-6


# ---- The compressors of Table 5 (eq. 4)
def init_linear(module):
    """ViT initialisation of every Linear: truncated normal (std 0.02) weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)


class Compressor(nn.Module):
    """What every compressor has: n, d, kind, encode (C_enc), decode (C_dec), forward (eq. 4's
    round trip), config() (type(c)(**c.config()) rebuilds it) and last_layer(). One with a
    fit(mean, cov) method (PCA) is fitted by train_src.py to the normalized tokens."""

    def __init__(self, n, d):
        super().__init__()
        if n <= 0 or d <= 0:
            raise ValueError(f"{type(self).__name__}: need n > 0 and d > 0, got n={n}, d={d}")
        self.n = n
        self.d = d

    def config(self):
        params = inspect.signature(type(self)).parameters
        return {name: getattr(self, name) for name in params}

    def check(self, x, width, name):
        """x unchanged if it is tokens (B, N, width), else a one-line error."""
        if x.dim() != 3 or x.shape[-1] != width:
            raise ValueError(f"{type(self).__name__}.{name}: expected (B, N, {width}) tokens, "
                             f"got {tuple(x.shape)}")
        return x

    def forward(self, z):
        """z^ = C_dec(C_enc(z)) (eq. 4)."""
        return self.decode(self.encode(z))

    def last_layer(self):
        """The weight of stage 1's adaptive GAN weight: C_dec's last weight matrix, as VQGAN and
        RAE take the generator's last (RAE: D's decoder_pred). A LayerNorm after it is skipped:
        its per-channel affine is no layer's matrix. None when nothing trains."""
        return None


class BlockCompressor(Compressor):
    """C_enc: blocks, a LayerNorm, Linear n -> d; C_dec: Linear d -> n, blocks, a LayerNorm
    (eq. 4). The blocks map tokens (B, N, n) to tokens and end with an MLP (mlp.fc2)."""

    def __init__(self, n, d, enc_blocks, dec_blocks):
        super().__init__(n, d)
        self.enc_blocks = nn.Sequential(*enc_blocks)
        self.enc_norm = nn.LayerNorm(n, eps=LN_EPS)
        self.enc_proj = nn.Linear(n, d)
        self.dec_proj = nn.Linear(d, n)
        self.dec_blocks = nn.Sequential(*dec_blocks)
        self.dec_norm = nn.LayerNorm(n, eps=LN_EPS)
        init_linear(self)

    def last_layer(self):
        """The last block's fc2, before dec_norm (the d -> n projection without blocks)."""
        if len(self.dec_blocks) == 0:
            return self.dec_proj.weight
        return self.dec_blocks[-1].mlp.fc2.weight

    def encode(self, z):
        """C_enc: normalized RAE tokens (B, N, n) -> compact tokens (B, N, d)."""
        h = self.enc_blocks(self.check(z, self.n, "encode"))
        return self.enc_proj(self.enc_norm(h))

    def decode(self, z_c):
        """C_dec: compact tokens (B, N, d) -> reconstructed normalized RAE tokens (B, N, n)."""
        h = self.dec_proj(self.check(z_c, self.d, "decode"))
        return self.dec_norm(self.dec_blocks(h))


class SRC(BlockCompressor):
    """C_enc (B, N, n) -> (B, N, d) and C_dec (B, N, d) -> (B, N, n), L blocks each (eq. 4):
    DINOv2's pre-LN ViT blocks without LayerScale, each stack ending in a LayerNorm. On the
    decoder side that matches the target, an affine map of a LayerNorm output (an RAE token).
    """
    kind = "src"

    def __init__(self, n=768, d=32, depth=4, num_heads=None, mlp_ratio=4.0):
        num_heads = num_heads or max(1, n // 64)
        if depth < 0 or n % num_heads:
            raise ValueError(f"SRC: depth={depth} < 0 or n={n} not divisible by heads={num_heads}")
        enc_blocks = [Block(n, num_heads, mlp_ratio) for _ in range(depth)]
        dec_blocks = [Block(n, num_heads, mlp_ratio) for _ in range(depth)]
        super().__init__(n, d, enc_blocks, dec_blocks)
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio


class ConvBlock(nn.Module):
    """SRC's block with a k x k convolution over the g x g token grid in place of attention:
    x = x + conv(norm1(x)); x = x + fc2(gelu(fc1(norm2(x)))), zero padding at the borders."""

    def __init__(self, n, kernel, mlp_ratio):
        super().__init__()
        hidden = int(n * mlp_ratio)
        self.norm1 = nn.LayerNorm(n, eps=LN_EPS)
        self.conv = nn.Conv2d(n, n, kernel, padding=kernel // 2)
        self.norm2 = nn.LayerNorm(n, eps=LN_EPS)
        self.mlp = nn.ModuleDict(dict(fc1=nn.Linear(n, hidden), fc2=nn.Linear(hidden, n)))

    def forward(self, x):
        B, N, n = x.shape
        g = math.isqrt(N)
        # (B, N, n) -> (B, n, g, g): the tokens are the grid's rows, one after the other
        h = self.norm1(x).transpose(1, 2).reshape(B, n, g, g)
        x = x + self.conv(h).flatten(2).transpose(1, 2)
        h = F.gelu(self.mlp.fc1(self.norm2(x)))
        return x + self.mlp.fc2(h)


class Conv(BlockCompressor):
    """Table 5's convolutional compressor as we read it: the paper says only "local convolution",
    so this is the SRC with ConvBlocks, and a token sees only the tokens depth * (kernel // 2)
    grid steps around it. 3 blocks of 3 x 3 per side by default, so that it has about the SRC's
    parameters at L = 4 (60.3M vs 56.8M at n = 768, d = 32): a 3 x 3 convolution holds 9 n^2
    weights where attention holds 4 n^2, so 3 ConvBlocks (51 n^2) weigh about 4 blocks (48 n^2).
    """
    kind = "conv"

    def __init__(self, n=768, d=32, depth=3, kernel=3, mlp_ratio=4.0):
        if depth < 0 or kernel % 2 == 0:
            raise ValueError(f"Conv: depth {depth} < 0 or even kernel {kernel}")
        enc_blocks = [ConvBlock(n, kernel, mlp_ratio) for _ in range(depth)]
        dec_blocks = [ConvBlock(n, kernel, mlp_ratio) for _ in range(depth)]
        super().__init__(n, d, enc_blocks, dec_blocks)
        self.depth = depth
        self.kernel = kernel
        self.mlp_ratio = mlp_ratio

    def check(self, x, width, name):
        """x unchanged if it is tokens (B, N, width) on a square grid, else a one-line error."""
        N = super().check(x, width, name).shape[1]
        if math.isqrt(N) ** 2 != N:
            raise ValueError(f"Conv.{name}: expected a square grid of N tokens, got N={N}")
        return x


class Linear(Compressor):
    """Token-wise C_enc = Linear n -> d and C_dec = Linear d -> n: no token sees another."""
    kind = "linear"

    def __init__(self, n=768, d=32):
        super().__init__(n, d)
        self.enc_proj = nn.Linear(n, d)
        self.dec_proj = nn.Linear(d, n)
        init_linear(self)

    def last_layer(self):
        return self.dec_proj.weight

    def encode(self, z):
        return self.enc_proj(self.check(z, self.n, "encode"))

    def decode(self, z_c):
        return self.dec_proj(self.check(z_c, self.d, "decode"))


class PCA(Compressor):
    """C_enc(z) = (z - mean) @ components^T and C_dec(z_c) = z_c @ components + mean: fitted,
    not trained (99.06% of the variance at d = 32).

    components (d, n) holds the top-d principal directions as orthonormal rows; `explained` is
    the share of the variance they capture (NaN until fit).
    """
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
        """Components from the channel mean (n,) and covariance (n, n) of the normalized RAE
        tokens: the eigenvectors of the d largest eigenvalues (float64), each signed so that its
        largest-magnitude entry is positive."""
        mean = torch.as_tensor(mean).double().cpu()
        cov = torch.as_tensor(cov).double().cpu()
        n = self.n
        if mean.shape != (n,) or cov.shape != (n, n) or not cov.isfinite().all():
            raise ValueError(f"PCA.fit: expected a mean ({n},) and a finite covariance "
                             f"({n}, {n}), got {tuple(mean.shape)} and {tuple(cov.shape)}")
        evals, evecs = torch.linalg.eigh((cov + cov.T) / 2)  # ascending eigenvalues
        evals = evals.flip(0).clamp_min(0)
        comps = evecs.flip(1)[:, :self.d].T  # (d, n), the largest first
        largest = comps.gather(1, comps.abs().argmax(1, keepdim=True))
        comps = comps * largest.sign()
        self.mean.copy_(mean)
        self.components.copy_(comps)
        self.explained.fill_(float(evals[:self.d].sum() / evals.sum()))
        return self

    def encode(self, z):
        return (self.check(z, self.n, "encode") - self.mean) @ self.components.T

    def decode(self, z_c):
        return self.check(z_c, self.d, "decode") @ self.components + self.mean


class Identity(Compressor):
    """No compression (d = n): the naive full-representation baseline of Table 1."""
    kind = "identity"

    def __init__(self, n=768):
        super().__init__(n, n)

    def encode(self, z):
        return self.check(z, self.n, "encode")

    def decode(self, z_c):
        return self.check(z_c, self.d, "decode")


# the one list of the compressors, by kind: --compressor's choices, what load_stage1 rebuilds
COMPRESSORS = {
    "src": SRC,
    "conv": Conv,
    "linear": Linear,
    "pca": PCA,
    "identity": Identity,
}


# ---- The compact space: eq. 5, 7, 8, 10
class Stage1(nn.Module):
    """E and D with the RAE statistics (rae.RAE), a compressor C and the compact statistics norm2:
    the channel-wise standardisation of C_enc's output (eq. 5), written as eq. 1 is. It is the
    identity until train_src.py measures it at its end; eq. 7, which stage 1 trains, has none.
    num_classes: the classes of the data stage 1 was trained on (None: not given); image_size is
    the RAE's.
    """

    def __init__(self, rae, compressor, mean2=None, var2=None, eps2=STATS_EPS, num_classes=None):
        super().__init__()
        d = compressor.d
        self.rae = rae
        self.C = compressor
        if mean2 is None:
            mean2 = torch.zeros(d)
            var2 = torch.ones(d)
            eps2 = 0.0
        self.register_buffer("mean2", torch.as_tensor(mean2).float())
        self.register_buffer("var2", torch.as_tensor(var2).float())
        self.eps2 = float(eps2)
        self.num_classes = num_classes

    @property
    def image_size(self):
        """S: the images are (B, 3, S, S), the RAE's size."""
        return self.rae.image_size

    def encode_raw(self, images):
        """z_raw = E(x): images in [0, 1] (B, 3, S, S) -> (B, N, n)."""
        return self.rae.encode_raw(images)

    def forward(self, z_raw, eps=None):
        """Eq. 7: x^ = D(denorm(C_dec(C_enc(norm(E(x) + eps))))) in [0, 1], from z_raw = E(x)."""
        if eps is not None:
            z_raw = z_raw + eps.to(z_raw.dtype)
        z_hat = self.C(self.rae.normalize(z_raw))  # C_dec(C_enc(z)), eq. 4
        return self.rae.decode(z_hat)

    def compact(self, z_raw, eps=None):
        """Eq. 8: z_c = norm2(C_enc(norm(E(x) + eps))) (B, N, d) from z_raw = E(x); eq. 5 when eps
        is None. eps is drawn by common.encoder_noise."""
        if eps is not None:
            z_raw = z_raw + eps.to(z_raw.dtype)
        z_c = self.C.encode(self.rae.normalize(z_raw))
        return normalize(z_c, self.mean2, self.var2, self.eps2)

    def encode(self, images, eps=None):
        """Images in [0, 1] (B, 3, S, S) -> z_c (eq. 8; eq. 5 without eps)."""
        return self.compact(self.encode_raw(images), eps)

    def decode(self, z_c):
        """The decoders of eq. 10: D(denorm(C_dec(denorm2(z_c)))) in [0, 1] (not clamped)."""
        z_c_tilde = denormalize(z_c, self.mean2, self.var2, self.eps2).to(z_c.dtype)
        return self.rae.decode(self.C.decode(z_c_tilde))

    def generate(self, flow, u, labels=None, guidance=0.0, guide_blocks="all", score_step=0.0,
                 rule="starflow"):
        """Eq. 10: prior noise u (B, N, d) -> images in [0, 1] (B, 3, S, S), not clamped.

        z_c = f^{-1}(u) with classifier-free guidance (tarflow.GUIDANCE_RULES[rule], STARFlow's
        by default; every block or the deep one), then SimFlow's score step when score_step > 0,
        then the decoders. labels (B,) or None (no label: the flow's null_label; an
        unconditional flow gets None).
        """
        if not flow.num_classes:
            labels = None
        z_c = flow.reverse(u, labels, guidance=guidance, guide_blocks=guide_blocks, rule=rule)
        if score_step:
            z_c = flow.score_step(z_c, labels, score_step)  # SimFlow eq. 6
        return self.decode(z_c).float()


# ---- Loading a stage-1 checkpoint, and its checks
def load_stage1(path, device="cpu", ema=True, encoder=None, decoder=None):
    """The frozen Stage1 of a train_src.py checkpoint (EMA weights by default), in eval mode.
    The checkpoint records what it was built from, rebuilt here exactly or refused: encoder
    {kind, path, config, fingerprint}, decoder {path, config, fingerprint, state, state_ema},
    compressor {kind, config, state, state_ema}, rae_stats and norm2 {mean, var, eps}. E and a
    released D are read from their files; `encoder`, `decoder` give their paths if they moved.
    """
    ckpt = load_checkpoint(path, "src")
    norm2 = ckpt.get("norm2")
    if norm2 is None:
        raise UserError(f"{path}: no norm2 yet (train_src.py writes it when it stops); resume "
                        f"it with --resume --max-steps N")
    enc = ckpt["encoder"]
    dec = ckpt["decoder"]
    comp = ckpt["compressor"]
    E = recorded_part(path, "DINOv2 encoder", flag="--encoder", file=encoder or enc["path"],
                      load=load_dinov2, record=enc)
    # D trained with C: its weights are in the checkpoint; else RAE's released file
    if dec["state"] is not None:
        D = RAEDecoder(**dec["config"])
        D.load_state_dict(dec["state_ema" if ema else "state"])
    else:
        heads = dec["config"]["num_heads"]
        D = recorded_part(path, "RAE decoder", flag="--decoder", file=decoder or dec["path"],
                          load=lambda p: load_rae_decoder(p, num_heads=heads), record=dec)
    rae = RAE(E, D, image_size=ckpt["image_size"])
    rae.set_stats(ckpt["rae_stats"]["mean"], ckpt["rae_stats"]["var"])
    if comp["kind"] not in COMPRESSORS:
        raise UserError(f"{path}: compressor kind {comp['kind']!r} is not in src.COMPRESSORS "
                        f"({', '.join(COMPRESSORS)}); a fork's compressor must be added there")
    C = COMPRESSORS[comp["kind"]](**comp["config"])
    C.load_state_dict(comp["state_ema" if ema else "state"])
    stage1 = Stage1(rae, C, mean2=norm2["mean"], var2=norm2["var"], eps2=norm2["eps"],
                    num_classes=ckpt["num_classes"])
    return stage1.to(device).eval().requires_grad_(False)


def recorded_part(ckpt_path, what, flag, file, load, record):
    """E or a released D of a stage-1 checkpoint: load(file), refused unless its config() and
    its weights' fingerprint are the recorded ones."""
    if not file or not os.path.exists(file):
        raise FileNotFoundError(f"{file}: the {what} of {ckpt_path} is missing; pass {flag} PATH")
    model = load(file)
    if model.config() != record["config"]:
        raise UserError(f"{file}: {what} {model.config()} is not the one {ckpt_path} was trained "
                        f"with ({record['config']})")
    recorded = record["fingerprint"]
    found = fingerprint(model)
    if found != recorded:
        raise UserError(f"{file}: {what} weights (fingerprint {found}) are not the ones "
                        f"{ckpt_path} was trained with ({recorded}); pass {flag} with that file")
    return model
