"""Representation autoencoder (RAE): a frozen DINOv2 encoder E and a ViT pixel decoder D.
Paper eq. 1, with the RAE statistics mu_rae, sigma_rae^2 (per channel, or per token):

    z_raw = E(x)                                     N tokens of width n
    z     = (z_raw - mu_rae) / sqrt(sigma_rae^2 + 1e-5)
    x^    = D(z_raw)
Both are written by hand, loading the released files (DINOV2_URL or its Hugging Face snapshot;
RAE_HF's decoders/dinov2/wReg_base/ViTXL_n08/model.pt) from local paths, no other library."""

import hashlib
import inspect
import json
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth"
DINOV2_HF = "facebook/dinov2-with-registers-base"
RAE_HF = "nyu-visionx/RAE-collections"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Eq. 1 as RAE computes it: z = (z_raw - mean) / sqrt(var + STATS_EPS).
STATS_EPS = 1e-5
# LayerNorm epsilons of DINOv2 (timm's ViT) and of RAE's decoder (HF ViT-MAE).
ENCODER_LN_EPS = 1e-6
DECODER_LN_EPS = 1e-12
# The heads of RAE's decoders (configs/decoder/ViT{B,L,XL}), by width.
RAE_DECODER_HEADS = {768: 12, 1024: 16, 1152: 16}


def rgb(values):
    """Per-channel constants, shaped (1, 3, 1, 1) for images."""
    return torch.tensor(values).view(1, 3, 1, 1)


# ---- DINOv2 encoder E (facebookresearch/dinov2, models/vision_transformer.py)
def multihead_attention(q, k, v, num_heads):
    """Softmax attention of (B, N, C) queries, keys and values in num_heads heads."""
    # Each (B, N, C) -> (B, heads, N, C / heads), and back.
    heads = [t.unflatten(-1, (num_heads, -1)).transpose(1, 2) for t in (q, k, v)]
    x = F.scaled_dot_product_attention(*heads)
    return x.transpose(1, 2).flatten(2)


class LayerScale(nn.Module):
    def __init__(self, dim, init_values):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    """Pre-LN ViT block x = x + ls1(attn(norm1(x))); x = x + ls2(mlp(norm2(x))), without
    ls1, ls2 (LayerScale) when init_values is None. attn: a fused qkv (q, k, v in that order),
    then proj; mlp: fc1, GELU, fc2. The GELU is exact (erf: DINOv2's, the SRC's); gelu="tanh"
    is its tanh approximation, used by RAE's DINO discriminator (losses.DINOBackbone)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, init_values=None, gelu="none"):
        super().__init__()
        assert dim % num_heads == 0, (dim, num_heads)
        self.num_heads = num_heads
        self.gelu = gelu  # F.gelu's `approximate`
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=ENCODER_LN_EPS)
        self.attn = nn.ModuleDict(dict(qkv=nn.Linear(dim, 3 * dim), proj=nn.Linear(dim, dim)))
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=ENCODER_LN_EPS)
        self.mlp = nn.ModuleDict(dict(fc1=nn.Linear(dim, hidden), fc2=nn.Linear(hidden, dim)))
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x):
        q, k, v = self.attn.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = x + self.ls1(self.attn.proj(multihead_attention(q, k, v, self.num_heads)))
        h = F.gelu(self.mlp.fc1(self.norm2(x)), approximate=self.gelu)
        return x + self.ls2(self.mlp.fc2(h))


class DINOv2(nn.Module):
    """DINOv2 ViT: ImageNet-normalized images (B, 3, H, W) -> patch tokens (B, h*w, C),
    h, w = H / patch_size, W / patch_size, read after the final LayerNorm *without* its
    affine, as RAE does (`norm.*` only keeps the official layout). The pos_grid^2 position
    table is resized as upstream: with registers, bicubic with antialias to (h, w); without,
    bicubic by (h + 0.1) / pos_grid, no antialias. Module names: the official keys."""

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
        self.patch_embed = nn.ModuleDict(dict(proj=nn.Conv2d(3, C, patch_size, stride=patch_size)))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_grid**2, C))
        R = num_registers
        self.register_tokens = nn.Parameter(torch.zeros(1, R, C)) if R else None
        blocks = [Block(C, num_heads, mlp_ratio, init_values=init_values) for _ in range(depth)]
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(C, eps=ENCODER_LN_EPS)
        # iBOT's mask token, unused here.
        self.mask_token = nn.Parameter(torch.zeros(1, C))
        # Upstream's initialization (the weights are then loaded from a file).
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if R:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def config(self):
        """The constructor arguments; stage 1 records them to refuse another encoder."""
        return {k: getattr(self, k) for k in inspect.signature(type(self)).parameters}

    def interpolate_pos_encoding(self, h0, w0):
        """The position embeddings (1, 1 + h0*w0, C) for an h0 x w0 patch grid."""
        pos = self.pos_embed.float()
        M = self.pos_grid
        if h0 == M and w0 == M:
            return pos
        resize = dict(size=(h0, w0), antialias=True)
        # Without registers, upstream resizes by (h0 + 0.1) / M.
        if not self.num_registers:
            resize = dict(scale_factor=((h0 + 0.1) / M, (w0 + 0.1) / M))
        grid = pos[:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, mode="bicubic", align_corners=False, **resize)
        assert grid.shape[-2:] == (h0, w0), grid.shape
        return torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, x):
        B, _, H, W = x.shape
        p = self.patch_size
        assert H % p == 0 and W % p == 0, (x.shape, p)
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        x = x + self.interpolate_pos_encoding(H // p, W // p).to(x.dtype)
        # The registers go after the class token, without position embeddings.
        if self.num_registers:
            x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]], dim=1)
        for block in self.blocks:
            x = block(x)
        x = F.layer_norm(x, x.shape[-1:], eps=ENCODER_LN_EPS)
        return x[:, 1 + self.num_registers:]


# ---- RAE decoder D (bytetriper/RAE, src/stage1/decoders/decoder.py)
def sincos_pos_embed_2d(dim, grid):
    """MAE's fixed 2-D sin-cos table (grid*grid, dim) for tokens row * grid + col:
    [sin(col * omega), cos(col * omega), sin(row * omega), cos(row * omega)],
    omega_i = 1 / 10000^(4i / dim), i < dim / 4."""
    if dim % 4:
        raise ValueError(f"sin-cos table: width {dim} not divisible by 4")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    token = torch.arange(grid * grid, dtype=torch.float64)
    col = (token % grid)[:, None] * omega
    row = (token // grid)[:, None] * omega
    return torch.cat([col.sin(), col.cos(), row.sin(), row.cos()], dim=1).float()


class DecoderLayer(nn.Module):
    """Hugging Face's ViTMAELayer, with RAE's checkpoint keys as module names:
    x = x + attention(layernorm_before(x)); x = x + mlp(layernorm_after(x))."""

    def __init__(self, dim, num_heads, mlp_dim):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"RAEDecoder: width {dim} not divisible by {num_heads} heads")
        self.num_heads = num_heads
        qkv = nn.ModuleDict({n: nn.Linear(dim, dim) for n in ("query", "key", "value")})
        out = nn.ModuleDict(dict(dense=nn.Linear(dim, dim)))
        self.attention = nn.ModuleDict(dict(attention=qkv, output=out))
        self.intermediate = nn.ModuleDict(dict(dense=nn.Linear(dim, mlp_dim)))
        self.output = nn.ModuleDict(dict(dense=nn.Linear(mlp_dim, dim)))
        self.layernorm_before = nn.LayerNorm(dim, eps=DECODER_LN_EPS)
        self.layernorm_after = nn.LayerNorm(dim, eps=DECODER_LN_EPS)

    def forward(self, x):
        a = self.attention.attention
        h = self.layernorm_before(x)
        h = multihead_attention(a.query(h), a.key(h), a.value(h), self.num_heads)
        x = x + self.attention.output.dense(h)
        h = F.gelu(self.intermediate.dense(self.layernorm_after(x)))
        return x + self.output.dense(h)


class RAEDecoder(nn.Module):
    """D: tokens (B, N, in_dim) in the encoder's raw scale -> ImageNet-normalized pixels
    (B, 3, H, W), H = W = sqrt(N) * patch_size. decoder_embed, prepend trainable_cls_token,
    add decoder_pos_embed (fixed sin-cos, a zero row for the class token), ViT-MAE layers,
    decoder_norm, decoder_pred, drop the class token."""

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
        pos = torch.cat([torch.zeros(1, hidden), sincos_pos_embed_2d(hidden, grid)])
        self.register_buffer("decoder_pos_embed", pos[None])
        self.decoder_layers = nn.ModuleList(
            [DecoderLayer(hidden, num_heads, mlp_dim) for _ in range(depth)])
        self.decoder_norm = nn.LayerNorm(hidden, eps=DECODER_LN_EPS)
        self.decoder_pred = nn.Linear(hidden, patch_size**2 * 3)
        # Zeros as in RAE; the layers keep PyTorch's default initialization.
        self.trainable_cls_token = nn.Parameter(torch.zeros(1, 1, hidden))

    def config(self):
        return {k: getattr(self, k) for k in inspect.signature(type(self)).parameters}

    def unpatchify(self, x):
        """(B, g*g, p*p*3) -> (B, 3, g*p, g*p); a token holds (p_row, p_col, channel)."""
        p = self.patch_size
        g = self.grid
        # (B, row, col, p_row, p_col, 3) -> (B, 3, row, p_row, col, p_col)
        x = x.reshape(len(x), g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(len(x), 3, g * p, g * p)

    def forward(self, tokens):
        assert tokens.shape[1:] == (self.num_patches, self.in_dim)
        x = self.decoder_embed(tokens)
        cls = self.trainable_cls_token.expand(len(x), -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + self.decoder_pos_embed.to(x.dtype)
        for layer in self.decoder_layers:
            x = layer(x)
        return self.unpatchify(self.decoder_pred(self.decoder_norm(x))[:, 1:])


# ---- RAE: E, D and the latent statistics of eq. 1
class RAE(nn.Module):
    """Frozen E and D with the statistics of eq. 1; images (B, 3, S, S) in [0, 1], S =
    image_size. The token grid and the pixel patch are the decoder's; the encoder sees the
    same grid at its own patch size (S = 256 -> 224 px for DINOv2). `mean` and `var` are
    (n,) (per channel, the paper) or (N, n) (per token, RAE's stat.pt), 0 and 1 until set."""

    def __init__(self, encoder, decoder, image_size=256):
        super().__init__()
        n = encoder.embed_dim
        g = decoder.grid
        S = g * decoder.patch_size
        if S != image_size or decoder.in_dim != n:
            got = f"{g * g} tokens of width {decoder.in_dim} into {S} px"
            raise ValueError(f"RAE: decoder reads {got}, not width {n} into {image_size} px")
        self.encoder = encoder.eval().requires_grad_(False)
        self.decoder = decoder.requires_grad_(False)
        self.image_size = image_size
        self.encoder_size = g * encoder.patch_size
        self.register_buffer("pixel_mean", rgb(IMAGENET_MEAN), persistent=False)
        self.register_buffer("pixel_std", rgb(IMAGENET_STD), persistent=False)
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("var", torch.ones(n))

    def set_stats(self, mean, var):
        """Set the mean and the variance of eq. 1, each (n,) or (N, n)."""
        mean = torch.as_tensor(mean).float()
        var = torch.as_tensor(var).float()
        n = self.encoder.embed_dim
        shapes = ((n,), (self.decoder.num_patches, n))
        if mean.shape not in shapes or var.shape not in shapes:
            got = f"mean {list(mean.shape)}, var {list(var.shape)}"
            raise ValueError(f"RAE.set_stats: {got}, not in {shapes}")
        finite = torch.isfinite(mean).all() and torch.isfinite(var).all()
        if not finite or (var < 0).any():
            raise ValueError("RAE.set_stats: non-finite statistics or var < 0")
        self.mean = mean.to(self.mean.device)
        self.var = var.to(self.var.device)

    def load_stats(self, path):
        """Set the statistics from RAE's stat.pt (see read_stats)."""
        self.set_stats(**read_stats(path, self.encoder.embed_dim, self.decoder.grid))

    def encode_raw(self, images):
        """z_raw = E(x) (B, N, n): bicubic resize (no antialias, as RAE), ImageNet-normalize, E."""
        S = self.image_size
        s = self.encoder_size
        if images.shape[1:] != (3, S, S):
            raise ValueError(f"RAE: images {tuple(images.shape)}, not (B, 3, {S}, {S})")
        if s != S:
            images = F.interpolate(images, (s, s), mode="bicubic", align_corners=False)
        return self.encoder((images - self.pixel_mean) / self.pixel_std)

    def normalize(self, z_raw):
        """Eq. 1: z = (z_raw - mean) / sqrt(var + 1e-5), tokens (B, N, n)."""
        return normalize(self._checked(z_raw), self.mean, self.var)

    def denormalize(self, z):
        """Eq. 1 inverted: z_raw = z * sqrt(var + 1e-5) + mean."""
        return denormalize(self._checked(z), self.mean, self.var)

    def encode(self, images):
        """z = normalize(E(x)), eq. 1 without noise; src.Stage1 adds eq. 7/8's noise to E(x)."""
        return self.normalize(self.encode_raw(images))

    def decode(self, z):
        """x^ = D(denormalize(z)), from ImageNet normalization to [0, 1], not clamped."""
        x = self.decoder(self.denormalize(z))
        return x * self.pixel_std + self.pixel_mean

    def _checked(self, z):
        N = self.decoder.num_patches
        n = self.encoder.embed_dim
        if z.shape[1:] != (N, n):
            raise ValueError(f"RAE: tokens {tuple(z.shape)}, not (B, {N}, {n})")
        return z


# ---- Eq. 1, and the compact statistics norm2 of eq. 5
def normalize(z, mean, var, eps=STATS_EPS):
    """Eq. 1 with the RAE statistics; compact statistics norm2 of eq. 5 with the compressor's."""
    return (z - mean) / torch.sqrt(var + eps)


def denormalize(z, mean, var, eps=STATS_EPS):
    """Inverts eq. 1 with the RAE statistics; norm2 of eq. 5 with the compressor's."""
    return z * torch.sqrt(var + eps) + mean


# ---- Reading weight files: torch files and a small safetensors reader
SAFETENSORS_DTYPES = dict(
    F64=torch.float64, F32=torch.float32, F16=torch.float16, BF16=torch.bfloat16, BOOL=torch.bool,
    U8=torch.uint8, I8=torch.int8, I16=torch.int16, I32=torch.int32, I64=torch.int64)


def _file_error(path, problem, expected):
    """The one-line error for a file that is not the expected one."""
    return ValueError(f"{path}: {problem}; expected {expected}")


def read_safetensors(path, what="a safetensors file"):
    """{name: tensor} from a .safetensors file (`what`, named in errors), on a little-endian
    machine. The file: the header size n (8 bytes, little-endian), n bytes of JSON header
    {name: {dtype, shape, data_offsets}} (offsets into the data), then the data."""
    assert sys.byteorder == "little", "little-endian data"
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > os.path.getsize(path) - 8:
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
        if begin < 0 or end - begin != nbytes or end > len(data):
            raise _file_error(path, f"truncated or bad {name!r}", what)
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
    with open(need_file(path, what), "rb") as f:
        head = f.read(9)
    safetensors = str(path).endswith(".safetensors") or head[8:] == b"{"
    sd = read_safetensors(path, what) if safetensors else _torch_load(path, what)
    if not isinstance(sd, dict) or not sd:
        raise _file_error(path, f"{type(sd).__name__}, not a dict", what)
    if not all(torch.is_tensor(v) for v in sd.values()):
        found = "non-tensors"
        if any(k in sd for k in ("model", "ema", "state_dict")):
            found = "a training checkpoint (see RAE's extract_decoder.py)"
        raise _file_error(path, f"holds {found}", what)
    return sd


def load_weights(model, sd, path, what):
    """The model with the weights sd loaded, frozen. Errors name the first three wrong
    keys, or the tensor of a wrong shape (the last line of PyTorch's message)."""
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise _file_error(path, _one_line(e, -1), what) from None
    if missing or unexpected:
        raise _file_error(path, f"missing {missing[:3]}, unexpected {unexpected[:3]}", what)
    return model.eval().requires_grad_(False)


def need_file(path, what):
    """The path of a file that exists; else a one-line error naming `what`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file; expected {what}")
    return path


# ---- DINOv2 files: the official .pth, Hugging Face snapshots
DINOV2_FILE = (f"DINOv2 ViT-S/B/L weights ({DINOV2_URL}, or a {DINOV2_HF} "
               "snapshot with model.safetensors or pytorch_model.bin)")
# Hugging Face Dinov2(WithRegisters)Model names -> official names, in this order.
HF_NAMES = {
    "embeddings.patch_embeddings.projection": "patch_embed.proj",
    "embeddings.position_embeddings": "pos_embed", "embeddings.": "",
    "encoder.layer.": "blocks.", "attention.output.dense": "attn.proj",
    "attention.attention.": "attn.", "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma", "layernorm.": "norm."}
# The SwiGLU feed-forward of ViT-g (official and Hugging Face names).
SWIGLU = (".mlp.w12.", ".mlp.weights_in.")


def _hf_to_official(sd):
    """A state dict with Hugging Face names in the official layout."""
    out = {}
    for key, v in sd.items():
        for hf, official in HF_NAMES.items():
            key = key.replace(hf, official)
        out[key] = v
    # Hugging Face keeps q, k and v apart: fuse them into qkv.
    for q in [k for k in out if ".attn.query." in k]:
        names = [q.replace("query", x) for x in ("query", "key", "value")]
        if all(n in out for n in names):
            out[q.replace("query", "qkv")] = torch.cat([out.pop(n) for n in names])
    return out


def dinov2_from_state_dict(sd, path="state dict"):
    """A frozen DINOv2 from a state dict in the official or the Hugging Face layout. Its
    size is read from the tensors (patch_embed.proj.weight (C, 3, p, p), pos_embed (1, 1 +
    M*M, C)); its heads are width / 64, as in every DINOv2."""
    if any(k.startswith("decoder_") for k in sd):
        raise _file_error(path, "an RAE decoder", DINOV2_FILE)
    if any(s in k for k in sd for s in SWIGLU):
        raise _file_error(path, "SwiGLU MLPs (ViT-g)", "ViT-S/B/L")
    if "embeddings.position_embeddings" in sd:
        sd = _hf_to_official(sd)
    proj = sd.get("patch_embed.proj.weight")
    pos = sd.get("pos_embed")
    if proj is None or pos is None or proj.dim() != 4 or pos.dim() != 3:
        raise _file_error(path, "no or bad patch_embed, pos_embed", DINOV2_FILE)
    # A non-square grid (M*M < pos_embed's rows - 1) fails in load_weights.
    grid = math.isqrt(pos.shape[1] - 1)
    C = proj.shape[0]
    blocks = {k.split(".")[1] for k in sd if k.startswith("blocks.")}
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    registers = sd.get("register_tokens")
    # Some exports lack the mask token; forward never uses it.
    sd = {"mask_token": torch.zeros(1, C), **sd}
    model = DINOv2(
        embed_dim=C,
        depth=len(blocks),
        num_heads=max(1, C // 64),
        patch_size=proj.shape[-1],
        pos_grid=grid,
        num_registers=registers.shape[1] if registers is not None else 0,
        init_values=1.0 if "blocks.0.ls1.gamma" in sd else None,
        mlp_ratio=fc1.shape[0] / C if fc1 is not None else 4.0,
    )
    return load_weights(model, sd, path, what=DINOV2_FILE)


def load_dinov2(path):
    """The frozen encoder E from an official .pth or a Hugging Face snapshot: its folder (with
    model.safetensors, shards in model.safetensors.index.json or pytorch_model.bin), or a file."""
    files = [path]
    if os.path.isdir(path):
        index = os.path.join(path, "model.safetensors.index.json")
        files = ["pytorch_model.bin"]
        if os.path.isfile(os.path.join(path, "model.safetensors")):
            files = ["model.safetensors"]
        elif os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(path, name) for name in files]
    sd = {}
    for file in files:
        sd.update(read_state_dict(file, DINOV2_FILE))
    return dinov2_from_state_dict(sd, path)


# ---- RAE decoder files: RAE's model.pt, a plain state dict
DECODER_FILE = f"an RAE decoder model.pt (`hf download {RAE_HF}`)"
# The tensors that give the decoder's sizes.
DECODER_KEYS = ("decoder_embed.weight", "decoder_pos_embed", "decoder_pred.weight",
                "decoder_layers.0.intermediate.dense.weight")


def load_rae_decoder(path, num_heads=None):
    """The frozen decoder D from RAE's model.pt. Its sizes are read from the tensors,
    its heads (not in the file) from RAE's configs by width, unless given."""
    sd = read_state_dict(path, DECODER_FILE)
    if "pos_embed" in sd or "embeddings.position_embeddings" in sd:
        raise _file_error(path, "a DINOv2 encoder", DECODER_FILE)
    absent = [k for k in DECODER_KEYS if k not in sd]
    if absent:
        raise _file_error(path, f"no {absent[0]}", DECODER_FILE)
    hidden, in_dim = sd["decoder_embed.weight"].shape
    out = sd["decoder_pred.weight"].shape[0]
    # D's patch size p (RAE: decoder_patch_size): out = p * p * 3, else load_weights fails.
    patch = math.isqrt(out // 3)
    num_heads = num_heads or RAE_DECODER_HEADS.get(hidden)
    if num_heads is None:
        raise ValueError(f"{path}: width {hidden} is not RAE's; pass num_heads")
    layers = {k.split(".")[1] for k in sd if k.startswith("decoder_layers.")}
    decoder = RAEDecoder(
        in_dim=in_dim,
        hidden=hidden,
        depth=len(layers),
        num_heads=num_heads,
        mlp_dim=sd[DECODER_KEYS[3]].shape[0],
        patch_size=patch,
        num_patches=sd["decoder_pos_embed"].shape[1] - 1,
    )
    return load_weights(decoder, sd, path, what=DECODER_FILE)


def save_rae_decoder(decoder, path):
    """Write D as RAE's model.pt (a plain float32 state dict), atomically."""
    sd = {k: v.float().cpu() for k, v in decoder.state_dict().items()}
    torch.save(sd, path + ".tmp")
    os.replace(path + ".tmp", path)


# ---- Weight fingerprints: stage 1 records them, load_stage1 compares them
def fingerprint(model):
    """A short sha256 of a model's weights (sorted names, shapes, float32 values): the same
    whichever file held them (official .pth, Hugging Face safetensors or .bin); DINOv2's unused
    mask_token, absent from some exports, is left out. Stage 1 records the prints of E and of a
    released D, to refuse another file of the same architecture later."""
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if name != "mask_token":
            digest.update(f"{name}{tuple(t.shape)}".encode())
            digest.update(t.float().cpu().contiguous().numpy())
    return digest.hexdigest()[:16]


# ---- RAE's statistics file stat.pt
STATS_FILE = f"a stat.pt with 'var' (and optionally 'mean') (`hf download {RAE_HF}`)"


def read_stats(path, width, grid):
    """The statistics of eq. 1 in RAE's stat.pt: {"mean", "var"}, each (n,) or (N, n). The
    file holds 'var' and optionally 'mean', each (C,), (C, 1, 1) or (C, H, W); the last
    become tokens (H*W, C), row-major. C = width, H = W = grid. A missing or None mean is
    zero, as in RAE's loader (the DINOv2-B release holds only var)."""
    stats = _torch_load(need_file(path, STATS_FILE), STATS_FILE)
    if not isinstance(stats, dict):
        raise _file_error(path, f"holds a {type(stats).__name__}", STATS_FILE)
    out = {}
    for name in ("mean", "var"):
        t = stats.get(name)
        if name == "mean" and t is None:
            continue
        if not torch.is_tensor(t):
            raise _file_error(path, f"{name} is no tensor", STATS_FILE)
        if t.dim() == 3:
            t = t.flatten(1).t().squeeze(0)
        if t.shape not in ((width,), (grid * grid, width)):
            shape = list(stats[name].shape)
            raise _file_error(path, f"{name} is {shape}", f"C={width}, H=W={grid}")
        out[name] = t.float().contiguous()
    out.setdefault("mean", torch.zeros_like(out["var"]))
    return out
