"""Representation autoencoder (RAE): a frozen DINOv2 encoder E and a ViT pixel decoder D.

Paper eq. 1, with the RAE statistics mu_rae, sigma_rae^2 (per channel, or per token):

    z_raw = E(x)                                     N tokens of width n
    z     = (z_raw - mu_rae) / sqrt(sigma_rae^2 + 1e-5)
    x^    = D(z_raw)

Both are written by hand, so the released files load from local paths without other libraries:
E is DINOV2_URL (DINOv2-B/14 with registers) or its Hugging Face snapshot DINOV2_HF; D and the
statistics come from `hf download nyu-visionx/RAE-collections` (decoders/dinov2/wReg_base/
ViTXL_n08/model.pt, stats/dinov2/wReg_base/imagenet1k/stat.pt), or the statistics are computed
channel-wise over images (common.channel_stats).
"""

import hashlib
import inspect
import json
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

DINOV2_URL = ("https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/"
              "dinov2_vitb14_reg4_pretrain.pth")
DINOV2_HF = "facebook/dinov2-with-registers-base"
RAE_HF = "nyu-visionx/RAE-collections"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Eq. 1 as RAE computes it: z = (z_raw - mean) / sqrt(var + STATS_EPS).
STATS_EPS = 1e-5
# LayerNorm epsilons of DINOv2 (timm's ViT) and of RAE's decoder (HF ViT-MAE).
ENCODER_LN_EPS = 1e-6
DECODER_LN_EPS = 1e-12
# Every DINOv2 has 64-wide heads.
HEAD_DIM = 64
# DINOv2 without registers resizes its positions by (h + 0.1) / pos_grid.
POS_OFFSET = 0.1
# The heads of RAE's decoders (configs/decoder/ViT{B,L,XL}), by width.
RAE_DECODER_HEADS = {768: 12, 1024: 16, 1152: 16}


# ---- DINOv2 encoder E (facebookresearch/dinov2, models/vision_transformer.py)

def multihead_attention(q, k, v, num_heads):
    """Softmax attention of (B, N, C) queries, keys and values in num_heads heads."""
    B, N, C = q.shape
    shape = (B, N, num_heads, C // num_heads)
    q = q.reshape(shape).transpose(1, 2)  # (B, heads, N, C / heads)
    k = k.reshape(shape).transpose(1, 2)
    v = v.reshape(shape).transpose(1, 2)
    x = F.scaled_dot_product_attention(q, k, v)
    return x.transpose(1, 2).reshape(B, N, C)


class Attention(nn.Module):
    """Multi-head self-attention, one fused qkv projection (q, k, v in that order)."""

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        assert dim % num_heads == 0, (dim, num_heads)
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        x = multihead_attention(q, k, v, self.num_heads)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class LayerScale(nn.Module):
    def __init__(self, dim, init_values):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    """Pre-LN ViT block, without LayerScale (ls1, ls2) when init_values is None:

        x = x + ls1(attn(norm1(x)));  x = x + ls2(mlp(norm2(x)))
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0, init_values=None,
                 eps=ENCODER_LN_EPS, qkv_bias=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DINOv2(nn.Module):
    """DINOv2 ViT: ImageNet-normalized images (B, 3, H, W) -> patch tokens (B, h*w, C).

    h, w = H / patch_size, W / patch_size. The tokens are read after the final LayerNorm
    *without* its affine, as RAE does (`norm.*` only keeps the official layout). The
    pos_grid^2 position table is resized as upstream: with registers, bicubic with
    antialias to (h, w); without, bicubic by (h + 0.1) / pos_grid, no antialias.
    """

    def __init__(self, embed_dim=768, depth=12, num_heads=12, patch_size=14,
                 num_registers=4, pos_grid=37, init_values=1.0, mlp_ratio=4.0):
        super().__init__()
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_registers = num_registers
        self.pos_grid = pos_grid
        self.init_values = init_values
        self.mlp_ratio = mlp_ratio
        C = embed_dim
        p = patch_size
        # The module names are the official checkpoint keys.
        proj = nn.Conv2d(3, C, kernel_size=p, stride=p)
        self.patch_embed = nn.ModuleDict(dict(proj=proj))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_grid**2, C))
        self.register_tokens = None
        if num_registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_registers, C))
        self.blocks = nn.ModuleList([
            Block(C, num_heads, mlp_ratio=mlp_ratio, init_values=init_values)
            for _ in range(depth)])
        self.norm = nn.LayerNorm(C, eps=ENCODER_LN_EPS)
        # iBOT's mask token, unused here.
        self.mask_token = nn.Parameter(torch.zeros(1, C))
        # Upstream's initialization (the weights are then loaded from a file).
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if num_registers:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def config(self):
        """The constructor arguments; stage 1 records them to refuse another encoder."""
        names = inspect.signature(type(self)).parameters
        return {name: getattr(self, name) for name in names}

    def interpolate_pos_encoding(self, h0, w0):
        """The position embeddings (1, 1 + h0*w0, C) for an h0 x w0 patch grid."""
        pos = self.pos_embed.float()  # (1, 1 + M*M, C)
        M = self.pos_grid
        if h0 == M and w0 == M:
            return pos
        if self.num_registers:
            resize = dict(size=(h0, w0), antialias=True)
        else:
            scale = ((h0 + POS_OFFSET) / M, (w0 + POS_OFFSET) / M)
            resize = dict(scale_factor=scale, antialias=False)
        grid = pos[:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, mode="bicubic", align_corners=False, **resize)
        assert grid.shape[-2:] == (h0, w0), grid.shape
        grid = grid.flatten(2).transpose(1, 2)  # (1, h0*w0, C)
        return torch.cat([pos[:, :1], grid], dim=1)

    def forward(self, x):
        B, _, H, W = x.shape
        p = self.patch_size
        assert H % p == 0 and W % p == 0, (x.shape, p)
        x = self.patch_embed.proj(x)  # (B, C, h, w)
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, C)
        cls = self.cls_token.expand(B, -1, -1)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + h*w, C)
        pos = self.interpolate_pos_encoding(H // p, W // p)
        x = x + pos.to(x.dtype)
        # The registers go after the class token, without position embeddings.
        if self.num_registers:
            regs = self.register_tokens.expand(B, -1, -1)
            x = torch.cat([x[:, :1], regs, x[:, 1:]], dim=1)
        for block in self.blocks:
            x = block(x)
        x = F.layer_norm(x, (self.embed_dim,), eps=ENCODER_LN_EPS)
        return x[:, 1 + self.num_registers:]  # (B, h*w, C)


# ---- RAE decoder D (bytetriper/RAE, src/stage1/decoders/decoder.py)

def sincos_pos_embed_2d(dim, grid):
    """MAE's fixed 2-D sin-cos table (grid*grid, dim) for tokens row * grid + col:

        [sin(col * omega), cos(col * omega), sin(row * omega), cos(row * omega)]

    with omega_i = 1 / 10000^(4i / dim), i < dim / 4.
    """
    if dim % 4:
        raise ValueError(f"sin-cos table: width {dim} not divisible by 4")
    omega = torch.arange(dim // 4, dtype=torch.float64) / (dim / 4)
    omega = 1.0 / 10000**omega
    token = torch.arange(grid * grid, dtype=torch.float64)
    col = (token % grid).reshape(-1, 1) * omega  # (grid*grid, dim/4)
    row = (token // grid).reshape(-1, 1) * omega
    table = [col.sin(), col.cos(), row.sin(), row.cos()]
    return torch.cat(table, dim=1).float()


class DecoderLayer(nn.Module):
    """Hugging Face's ViTMAELayer; the module names are RAE's checkpoint keys:

        x = x + attention(layernorm_before(x));  x = x + mlp(layernorm_after(x))
    """

    def __init__(self, dim, num_heads, mlp_dim, eps=DECODER_LN_EPS):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"RAEDecoder: width {dim} not divisible by {num_heads} heads")
        self.num_heads = num_heads
        qkv = {n: nn.Linear(dim, dim) for n in ("query", "key", "value")}
        out = nn.ModuleDict(dict(dense=nn.Linear(dim, dim)))
        self.attention = nn.ModuleDict(dict(attention=nn.ModuleDict(qkv), output=out))
        self.intermediate = nn.ModuleDict(dict(dense=nn.Linear(dim, mlp_dim)))
        self.output = nn.ModuleDict(dict(dense=nn.Linear(mlp_dim, dim)))
        self.layernorm_before = nn.LayerNorm(dim, eps=eps)
        self.layernorm_after = nn.LayerNorm(dim, eps=eps)

    def forward(self, x):
        h = self.layernorm_before(x)
        attn = self.attention.attention
        q = attn.query(h)
        k = attn.key(h)
        v = attn.value(h)
        h = multihead_attention(q, k, v, self.num_heads)
        x = x + self.attention.output.dense(h)
        h = self.intermediate.dense(self.layernorm_after(x))
        return x + self.output.dense(F.gelu(h))


class RAEDecoder(nn.Module):
    """D: tokens (B, N, in_dim) in the encoder's raw scale -> pixels (B, 3, H, W).

    The pixels are ImageNet-normalized, H = W = sqrt(N) * patch_size. decoder_embed,
    prepend trainable_cls_token, add decoder_pos_embed (fixed sin-cos, a zero row for the
    class token), ViT-MAE layers, decoder_norm, decoder_pred, drop the class token.
    """

    def __init__(self, in_dim=768, hidden=1152, depth=28, num_heads=16,
                 mlp_dim=4096, patch_size=16, num_patches=256):
        super().__init__()
        grid = math.isqrt(num_patches)
        if grid * grid != num_patches:
            raise ValueError(f"RAEDecoder: num_patches {num_patches} not a square")
        self.in_dim = in_dim
        self.hidden = hidden
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.patch_size = patch_size
        self.num_patches = num_patches
        self.grid = grid
        self.decoder_embed = nn.Linear(in_dim, hidden)
        # Fixed positions with a zero row for the class token; a buffer (RAE's key).
        pos = sincos_pos_embed_2d(hidden, grid)
        pos = torch.cat([torch.zeros(1, hidden), pos]).unsqueeze(0)
        self.register_buffer("decoder_pos_embed", pos)
        self.decoder_layers = nn.ModuleList([
            DecoderLayer(hidden, num_heads, mlp_dim) for _ in range(depth)])
        self.decoder_norm = nn.LayerNorm(hidden, eps=DECODER_LN_EPS)
        self.decoder_pred = nn.Linear(hidden, patch_size * patch_size * 3)
        # Zeros as in RAE; the layers keep PyTorch's default initialization.
        self.trainable_cls_token = nn.Parameter(torch.zeros(1, 1, hidden))

    def config(self):
        """The constructor arguments (stored in stage-1 checkpoints)."""
        names = inspect.signature(type(self)).parameters
        return {name: getattr(self, name) for name in names}

    def unpatchify(self, x):
        """(B, g*g, p*p*3) -> (B, 3, g*p, g*p); a token holds (p_row, p_col, channel)."""
        B = x.shape[0]
        p = self.patch_size
        g = self.grid
        x = x.reshape(B, g, g, p, p, 3)  # (B, row, col, p_row, p_col, 3)
        x = x.permute(0, 5, 1, 3, 2, 4)  # (B, 3, row, p_row, col, p_col)
        return x.reshape(B, 3, g * p, g * p)

    def forward(self, tokens):
        assert tokens.shape[1:] == (self.num_patches, self.in_dim)
        x = self.decoder_embed(tokens)  # (B, N, hidden)
        cls = self.trainable_cls_token.expand(len(x), -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)
        x = x + self.decoder_pos_embed.to(x.dtype)
        for layer in self.decoder_layers:
            x = layer(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)  # (B, 1 + N, p*p*3)
        return self.unpatchify(x[:, 1:])


# ---- RAE: E, D and the latent statistics of eq. 1

class RAE(nn.Module):
    """Frozen E and D with the statistics of eq. 1; images (B, 3, S, S) in [0, 1].

    S = image_size. The token grid and the pixel patch are the decoder's; the encoder
    sees the same grid at its own patch size (S = 256 -> 224 px for DINOv2). `mean` and
    `var` are (n,) (per channel, the paper) or (N, n) (per token, RAE's stat.pt), 0 and 1
    until set.
    """

    def __init__(self, encoder, decoder, image_size=256):
        super().__init__()
        S = image_size
        p = decoder.patch_size
        if S % p:
            raise ValueError(f"RAE: image_size {S} is not a multiple of {p}")
        grid = S // p
        n = encoder.embed_dim
        N = decoder.num_patches
        if N != grid * grid or decoder.in_dim != n:
            raise ValueError(f"RAE: decoder reads {N} tokens of width {decoder.in_dim}, "
                             f"not {grid * grid} of width {n}")
        self.encoder = encoder.eval().requires_grad_(False)
        self.decoder = decoder.requires_grad_(False)
        self.image_size = image_size
        self.encoder_size = grid * encoder.patch_size  # 256 -> 224
        pixel_mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        pixel_std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.register_buffer("pixel_mean", pixel_mean, persistent=False)
        self.register_buffer("pixel_std", pixel_std, persistent=False)
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("var", torch.ones(n))

    def set_stats(self, mean, var):
        """Set the mean and the variance of eq. 1, each (n,) or (N, n)."""
        mean = torch.as_tensor(mean).float()
        var = torch.as_tensor(var).float()
        n = self.encoder.embed_dim
        shapes = ((n,), (self.decoder.num_patches, n))
        got = (tuple(mean.shape), tuple(var.shape))
        if got[0] not in shapes or got[1] not in shapes:
            raise ValueError(f"RAE.set_stats: shapes {got}, not in {shapes}")
        finite = torch.isfinite(mean).all() and torch.isfinite(var).all()
        if not finite or (var < 0).any():
            raise ValueError("RAE.set_stats: non-finite statistics or var < 0")
        self.mean = mean.to(self.mean.device)
        self.var = var.to(self.var.device)

    def load_stats(self, path):
        """Set the statistics from RAE's stat.pt (see read_stats)."""
        n = self.encoder.embed_dim
        stats = read_stats(path, n, self.decoder.grid)
        self.set_stats(stats["mean"], stats["var"])

    def encode_raw(self, images):
        """z_raw = E(x) (B, N, n): resize to the encoder's input size (bicubic, no
        antialias, as RAE), ImageNet-normalize, encode."""
        S = self.image_size
        if images.shape[1:] != (3, S, S):
            raise ValueError(f"RAE: images {tuple(images.shape)}, not (B, 3, {S}, {S})")
        s = self.encoder_size
        x = images
        if s != S:
            x = F.interpolate(x, size=(s, s), mode="bicubic", align_corners=False)
        x = (x - self.pixel_mean) / self.pixel_std
        return self.encoder(x)  # (B, N, n)

    def normalize(self, z_raw):
        """Eq. 1: z = (z_raw - mean) / sqrt(var + 1e-5), tokens (B, N, n)."""
        self._check_tokens(z_raw)
        return normalize(z_raw, self.mean, self.var)

    def denormalize(self, z):
        """Eq. 1 inverted: z_raw = z * sqrt(var + 1e-5) + mean."""
        self._check_tokens(z)
        return denormalize(z, self.mean, self.var)

    def encode(self, images):
        """z = normalize(E(x)). The encoder noise of eq. 7/8 goes on E(x), before
        normalize; the training scripts draw it."""
        return self.normalize(self.encode_raw(images))

    def decode(self, z):
        """x^ = D(denormalize(z)), from ImageNet normalization to [0, 1], not clamped."""
        x = self.decoder(self.denormalize(z))
        return x * self.pixel_std + self.pixel_mean

    def _check_tokens(self, z):
        N = self.decoder.num_patches
        n = self.encoder.embed_dim
        if z.shape[1:] != (N, n):
            raise ValueError(f"RAE: tokens {tuple(z.shape)}, not (B, {N}, {n})")


# ---- Eq. 1, and the compact statistics norm2 of eq. 5

def normalize(z, mean, var, eps=STATS_EPS):
    """Eq. 1 with the RAE statistics; compact statistics norm2 of eq. 5 with the compressor's."""
    return (z - mean) / torch.sqrt(var + eps)


def denormalize(z, mean, var, eps=STATS_EPS):
    """Inverts eq. 1 with the RAE statistics; norm2 of eq. 5 with the compressor's."""
    return z * torch.sqrt(var + eps) + mean


# ---- Reading weight files: torch files and a small safetensors reader

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
    "BF16": torch.bfloat16, "BOOL": torch.bool, "U8": torch.uint8,
    "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
}


def _file_error(path, problem, expected):
    """The one-line error for a file that is not the expected one."""
    return ValueError(f"{path}: {problem}; expected {expected}")


def read_safetensors(path):
    """{name: tensor} from a .safetensors file, on a little-endian machine.

    The file: the header size n (8 bytes, little-endian), n bytes of JSON header
    {name: {dtype, shape, data_offsets}} (offsets into the data), then the data.
    """
    assert sys.byteorder == "little", "little-endian data"
    what = "a safetensors file"
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > size - 8:
            raise _file_error(path, "truncated", what)
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise _file_error(path, f"header not JSON ({e})", what) from None
        data = f.read()
    if not isinstance(header, dict):
        raise _file_error(path, "header not a JSON object", what)
    header.pop("__metadata__", None)
    tensors = {}
    for name, info in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _file_error(path, f"bad entry {name!r}", what) from None
        nbytes = math.prod(shape) * dtype.itemsize
        if begin < 0 or end - begin != nbytes:
            raise _file_error(path, f"{name!r} is not {nbytes} bytes", what)
        if end > len(data):
            raise _file_error(path, f"truncated ({name!r})", what)
        t = torch.empty(0, dtype=dtype)
        if nbytes:
            t = torch.frombuffer(bytearray(data[begin:end]), dtype=dtype)
        tensors[name] = t.reshape(shape)
    return tensors


def _one_line(e, line=0):
    """Line `line` of an exception's message, at most 160 characters."""
    lines = str(e).strip().splitlines() or [type(e).__name__]
    return lines[line].strip()[:160]


def _torch_load(path, what):
    """The tensors of a torch file, on the CPU."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _file_error(path, f"unreadable ({_one_line(e)})", what) from None


def read_state_dict(path, what):
    """A flat {name: tensor} dict from a torch or a safetensors file (known by its name
    or its header: 8 bytes, then '{'); `what` is the expected file, named in errors."""
    with open(path, "rb") as f:
        head = f.read(9)
    if str(path).endswith(".safetensors") or head[8:] == b"{":
        sd = read_safetensors(path)
    else:
        sd = _torch_load(path, what)
    if not isinstance(sd, dict) or not sd:
        raise _file_error(path, f"{type(sd).__name__}, not a dict", what)
    if not all(torch.is_tensor(v) for v in sd.values()):
        found = "non-tensors"
        if any(k in sd for k in ("model", "ema", "state_dict")):
            found = "a training checkpoint (see RAE's extract_decoder.py)"
        raise _file_error(path, f"holds {found}", what)
    return sd


def _load_weights(model, sd, path, what):
    """The model with the weights sd loaded, frozen. Errors name the first three wrong
    keys, or the tensor of a wrong shape (the last line of PyTorch's message)."""
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise _file_error(path, _one_line(e, -1), what) from None
    if missing or unexpected:
        keys = f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        raise _file_error(path, keys, what)
    return model.eval().requires_grad_(False)


def _existing_file(path, what):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file; expected {what}")
    return path


# ---- DINOv2 files: the official .pth, Hugging Face snapshots

DINOV2_FILE = (f"DINOv2 ViT-S/B/L weights ({DINOV2_URL}, or a {DINOV2_HF} "
               "snapshot with model.safetensors or pytorch_model.bin)")
# Hugging Face Dinov2(WithRegisters)Model names -> official names, in this order.
HF_NAMES = [
    ("embeddings.patch_embeddings.projection", "patch_embed.proj"),
    ("embeddings.position_embeddings", "pos_embed"),
    ("embeddings.", ""),  # cls_token, mask_token, register_tokens
    ("encoder.layer.", "blocks."),
    ("attention.output.dense", "attn.proj"),
    ("layer_scale1.lambda1", "ls1.gamma"),
    ("layer_scale2.lambda1", "ls2.gamma"),
    ("layernorm.", "norm."),
]
# The SwiGLU feed-forward of ViT-g (official and Hugging Face names).
SWIGLU = (".mlp.w12.", ".mlp.weights_in.")


def _hf_to_official(sd):
    """A state dict with Hugging Face names in the official layout."""
    out = {}
    for key, v in sd.items():
        for hf, official in HF_NAMES:
            key = key.replace(hf, official)
        out[key] = v
    # Hugging Face keeps q, k and v apart: fuse them into qkv.
    for q in [k for k in out if ".attention.attention.query." in k]:
        names = [q.replace("query", x) for x in ("query", "key", "value")]
        if all(name in out for name in names):
            qkv = torch.cat([out.pop(name) for name in names], 0)
            out[q.replace("attention.attention.query", "attn.qkv")] = qkv
    return out


def dinov2_from_state_dict(sd, path="state dict"):
    """A frozen DINOv2 from a state dict in the official or the Hugging Face layout.

    Its size is read from the tensors; its heads are width / 64, as in every DINOv2.
    """
    if any(k.startswith("decoder_") for k in sd):
        raise _file_error(path, "an RAE decoder", DINOV2_FILE)
    if any(s in k for k in sd for s in SWIGLU):
        raise _file_error(path, "SwiGLU MLPs (ViT-g)", "ViT-S/B/L")
    if "embeddings.position_embeddings" in sd:
        sd = _hf_to_official(sd)
    if "pos_embed" not in sd or "patch_embed.proj.weight" not in sd:
        raise _file_error(path, "no pos_embed or patch_embed", DINOV2_FILE)
    proj = sd["patch_embed.proj.weight"]  # (C, 3, p, p)
    pos = sd["pos_embed"]  # (1, 1 + M*M, C)
    grid = math.isqrt(pos.shape[1] - 1) if pos.dim() == 3 else 0
    if proj.dim() != 4 or grid == 0 or 1 + grid * grid != pos.shape[1]:
        raise _file_error(path, "bad patch_embed or pos_embed", DINOV2_FILE)
    C = proj.shape[0]
    blocks = {k.split(".")[1] for k in sd if k.startswith("blocks.")}
    fc1 = sd.get("blocks.0.mlp.fc1.weight")  # (mlp_ratio * C, C)
    registers = sd.get("register_tokens")  # (1, R, C)
    # Some exports lack the mask token; forward never uses it.
    sd = {"mask_token": torch.zeros(1, C), **sd}
    model = DINOv2(
        embed_dim=C, depth=len(blocks), num_heads=max(1, C // HEAD_DIM),
        patch_size=proj.shape[-1], pos_grid=grid,
        num_registers=registers.shape[1] if registers is not None else 0,
        init_values=1.0 if "blocks.0.ls1.gamma" in sd else None,
        mlp_ratio=fc1.shape[0] / C if fc1 is not None else 4.0)
    return _load_weights(model, sd, path, what=DINOV2_FILE)


def load_dinov2(path):
    """The frozen encoder E from an official .pth or a Hugging Face snapshot (its directory, with
    model.safetensors, its shards or pytorch_model.bin, or that file)."""
    path = os.fspath(path)
    files = [path]
    if os.path.isdir(path):
        files = [os.path.join(path, "model.safetensors")]
        index = os.path.join(path, "model.safetensors.index.json")
        if not os.path.isfile(files[0]) and os.path.isfile(index):  # a sharded snapshot
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            files = [os.path.join(path, shard) for shard in shards]
        elif not os.path.isfile(files[0]):
            files = [os.path.join(path, "pytorch_model.bin")]
    sd = {}
    for file in files:
        sd.update(read_state_dict(_existing_file(file, DINOV2_FILE), DINOV2_FILE))
    return dinov2_from_state_dict(sd, path)


# ---- RAE decoder files: RAE's model.pt, a plain state dict

DECODER_FILE = f"an RAE decoder model.pt (`hf download {RAE_HF}`)"
# The tensors that give the decoder's sizes.
DECODER_KEYS = ("decoder_embed.weight", "decoder_pos_embed", "decoder_pred.weight",
                "decoder_layers.0.intermediate.dense.weight")


def load_rae_decoder(path, num_heads=None):
    """The frozen decoder D from RAE's model.pt. Its sizes are read from the tensors,
    its heads (not in the file) from RAE's configs by width, unless given."""
    path = _existing_file(path, DECODER_FILE)
    sd = read_state_dict(path, DECODER_FILE)
    if "pos_embed" in sd or "embeddings.position_embeddings" in sd:
        raise _file_error(path, "a DINOv2 encoder", DECODER_FILE)
    absent = [k for k in DECODER_KEYS if k not in sd]
    if absent:
        raise _file_error(path, f"no {absent[0]}", DECODER_FILE)
    hidden, in_dim = sd["decoder_embed.weight"].shape
    out = sd["decoder_pred.weight"].shape[0]
    # D's own patch size p (RAE: decoder_patch_size): out = p * p * 3.
    patch = math.isqrt(out // 3)
    if out != patch * patch * 3:
        raise _file_error(path, f"decoder_pred gives {out} values", "p * p * 3")
    num_heads = num_heads or RAE_DECODER_HEADS.get(hidden)
    if num_heads is None:
        raise ValueError(f"{path}: width {hidden} is not RAE's; pass num_heads")
    layers = {k.split(".")[1] for k in sd if k.startswith("decoder_layers.")}
    mlp_dim = sd["decoder_layers.0.intermediate.dense.weight"].shape[0]
    num_patches = sd["decoder_pos_embed"].shape[1] - 1  # (1, 1 + N, hidden)
    decoder = RAEDecoder(
        in_dim=in_dim, hidden=hidden, depth=len(layers), num_heads=num_heads,
        mlp_dim=mlp_dim, patch_size=patch, num_patches=num_patches)
    return _load_weights(decoder, sd, path, what=DECODER_FILE)


def save_rae_decoder(decoder, path):
    """Write D as RAE's model.pt (a plain float32 state dict), atomically."""
    state = decoder.state_dict()
    sd = {k: v.detach().float().cpu() for k, v in state.items()}
    torch.save(sd, path + ".tmp")
    os.replace(path + ".tmp", path)


def fingerprint(model):
    """A short sha256 of a model's weights: sorted names, shapes and float32 values.

    The same weights give the same fingerprint whichever file held them (official .pth,
    Hugging Face safetensors or .bin); DINOv2's mask_token is left out (unused, absent
    from some exports). Stage 1 records the fingerprints of E and of a released D, so
    that another file of the same architecture is refused later.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name == "mask_token":
            continue
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy())
    return digest.hexdigest()[:16]


# ---- RAE's statistics file stat.pt

STATS_FILE = f"a stat.pt with 'var' (and optionally 'mean') (`hf download {RAE_HF}`)"


def read_stats(path, width, grid):
    """The statistics of eq. 1 in RAE's stat.pt: {"mean", "var"}, each (n,) or (N, n).

    The file holds 'var' and optionally 'mean', each (C,), (C, 1, 1) or (C, H, W); the
    last become tokens (H*W, C), row-major. C = width, H = W = grid. A missing or None
    mean is zero, as in RAE's loader (the DINOv2-B release holds only var).
    """
    path = _existing_file(path, STATS_FILE)
    stats = _torch_load(path, STATS_FILE)
    if not isinstance(stats, dict):
        raise _file_error(path, f"holds a {type(stats).__name__}", STATS_FILE)
    out = {}
    for name in ("mean", "var"):
        t = stats.get(name)
        if name == "mean" and t is None:
            continue
        if not torch.is_tensor(t):
            raise _file_error(path, f"{name} is no tensor", STATS_FILE)
        shape = tuple(t.shape)
        t = t.float()
        # (C, H, W) -> (H*W, C) and (C, 1, 1) -> (C,)
        if t.dim() == 3:
            t = t.flatten(1).t().squeeze(0)
        if tuple(t.shape) not in ((width,), (grid * grid, width)):
            raise _file_error(path, f"{name} is {shape}", f"C={width}, H=W={grid}")
        out[name] = t.contiguous()
    # As RAE's loader: no mean is a zero mean.
    if "mean" not in out:
        out["mean"] = torch.zeros_like(out["var"])
    return out
