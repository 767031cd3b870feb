"""Representation autoencoder (RAE): a frozen DINOv2 encoder E and a ViT pixel decoder D (paper §2, eq. 1).

    z_raw = E(x) in R^{N x n},    z = (z_raw - mu_rae) / sqrt(var_rae + 1e-5),    x^ = D(z_raw)

E and D (RAE's decoder, ViT-MAE layer names) are written by hand, so official DINOv2 checkpoints, Hugging Face
snapshots and RAE's `model.pt` load without other libraries. Statistics: channel-wise over images (the paper;
common.channel_stats) or RAE's `stat.pt` (per position, variance only). Weights (local paths, no downloads):
  DINOv2-B/14 + 4 registers  DINOV2_URL (official .pth) or the Hugging Face snapshot DINOV2_HF
  RAE decoder and stat.pt    `hf download nyu-visionx/RAE-collections` (decoders/dinov2/wReg_base/ViTXL_n08/model.pt,
                             stats/dinov2/wReg_base/imagenet1k/stat.pt)
"""

import hashlib
import inspect
import json
import math
import os
import re
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth"
DINOV2_HF = "facebook/dinov2-with-registers-base"
RAE_HF = "nyu-visionx/RAE-collections"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STATS_EPS = 1e-5                                  # RAE: z = (z_raw - mean) / sqrt(var + eps)
RAE_DECODER_HEADS = {768: 12, 1024: 16, 1152: 16}  # RAE configs/decoder/ViT{B,L,XL}: width -> heads
RAE_DECODER_EXPECTED = f"an RAE decoder model.pt (a plain decoder state dict, `hf download {RAE_HF}`)"
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


# ---- DINOv2 encoder E (official layout: facebookresearch/dinov2 dinov2/models/vision_transformer.py)

def multihead_attention(q, k, v, num_heads):
    """Softmax attention of (B, N, width) queries, keys and values split into num_heads heads."""
    B, N, width = q.shape
    q, k, v = (t.reshape(B, N, num_heads, width // num_heads).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, width)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (q, k, v stacked in that order)."""

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        return self.proj(multihead_attention(*self.qkv(x).chunk(3, dim=-1), self.num_heads))


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
    """Pre-LN ViT block: x += ls1(attn(norm1(x))); x += ls2(mlp(norm2(x))). No LayerScale when init_values is None."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, init_values=None, eps=1e-6, qkv_bias=True):
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
    """DINOv2 ViT with patch 14: images (B,3,H,W), ImageNet-normalized -> patch tokens (B, H/14 * W/14, C).

    Tokens are read after the final LayerNorm *without* its affine (RAE); `norm.*` only keeps the official layout.
    The pos_grid x pos_grid position embeddings are resized as upstream: with registers, bicubic with antialias;
    without, the historical bicubic with scale_factor (h0 + 0.1) / M and no antialias.
    """

    def __init__(self, embed_dim=768, depth=12, num_heads=12, patch_size=14, num_registers=4, pos_grid=37,
                 init_values=1.0, mlp_ratio=4.0):
        super().__init__()
        self.embed_dim, self.depth, self.num_heads, self.patch_size = embed_dim, depth, num_heads, patch_size
        self.num_registers, self.pos_grid, self.init_values = num_registers, pos_grid, init_values
        self.mlp_ratio = mlp_ratio
        self.patch_embed = nn.ModuleDict(dict(proj=nn.Conv2d(3, embed_dim, patch_size, patch_size)))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_grid * pos_grid, embed_dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_registers, embed_dim)) if num_registers else None
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, init_values) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # unused (iBOT masking), kept for the layout
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def config(self):
        """The constructor arguments: a stage-1 checkpoint records them to refuse a different encoder file later."""
        return {name: getattr(self, name) for name in inspect.signature(type(self)).parameters}

    def interpolate_pos_encoding(self, h0, w0):
        """(1, 1 + h0*w0, C) position embeddings for an h0 x w0 patch grid."""
        pos, M = self.pos_embed.float(), self.pos_grid
        if h0 == M and w0 == M:  # upstream skips the resize when the grid already matches (and H == W)
            return pos
        grid = pos[:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2)
        target = dict(size=(h0, w0)) if self.num_registers else dict(scale_factor=((h0 + 0.1) / M, (w0 + 0.1) / M))
        grid = F.interpolate(grid, mode="bicubic", antialias=bool(self.num_registers), align_corners=False, **target)
        if grid.shape[-2:] != (h0, w0):
            raise ValueError(f"DINOv2: resized position grid {tuple(grid.shape[-2:])} != {(h0, w0)}")
        return torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, x):
        p = self.patch_size
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] % p or x.shape[3] % p:
            raise ValueError(f"DINOv2: expected images (B, 3, H, W) with H, W multiples of {p}, got {tuple(x.shape)}")
        B, _, H, W = x.shape
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        x = x + self.interpolate_pos_encoding(H // p, W // p).to(x.dtype)
        if self.register_tokens is not None:  # registers go after the class token, without position embedding
            x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]], dim=1)
        for block in self.blocks:
            x = block(x)
        x = F.layer_norm(x, (self.embed_dim,), eps=1e-6)  # final LN without affine (RAE)
        return x[:, 1 + self.num_registers:]


# ---- Reading checkpoints (torch files, a small safetensors reader) and load_dinov2

def read_safetensors(path):
    """{name: tensor} from a .safetensors file: u64 little-endian header size, JSON header, raw little-endian data."""
    if sys.byteorder != "little":
        raise ValueError(f"{path}: the safetensors reader needs a little-endian machine")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > size - 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes, too short for its header)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
        data = f.read()
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    tensors = {}
    for name, info in header.items():
        try:
            dtype, shape = SAFETENSORS_DTYPES[info["dtype"]], [int(s) for s in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name!r} has an unsupported dtype or a malformed header entry") from None
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes or begin < 0:
            raise ValueError(f"{path}: tensor {name!r} spans {end - begin} bytes, its shape {shape} needs {nbytes}")
        if end > len(data):
            raise ValueError(f"{path}: truncated safetensors file (tensor {name!r} ends at byte {end} of {len(data)})")
        t = torch.frombuffer(bytearray(data[begin:end]), dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)
        tensors[name] = t.reshape(shape)
    return tensors


def _one_line(e, line):  # line 0 (first) or -1 (last) of an exception's message
    return (str(e).strip().splitlines() or [type(e).__name__])[line].strip()[:160]


def _torch_load(path, what):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip/pickle errors from truncated or foreign files
        raise ValueError(f"{path}: cannot be read as a PyTorch checkpoint (truncated or corrupt?); expected {what} "
                         f"({_one_line(e, 0)})") from None


def read_state_dict(path, what):
    """A flat {name: tensor} dict from a torch file or a safetensors file (by name or by its JSON header)."""
    with open(path, "rb") as f:
        head = f.read(9)
    safetensors = str(path).endswith(".safetensors") or (len(head) == 9 and head[8:9] == b"{")
    sd = read_safetensors(path) if safetensors else _torch_load(path, what)
    if not isinstance(sd, dict) or not sd:
        raise ValueError(f"{path}: expected {what} (a dict of tensors), got {type(sd).__name__}")
    if not all(torch.is_tensor(v) for v in sd.values()):
        found = ("a training checkpoint (model/ema entries): extract the weights first (RAE: src/extract_decoder.py)"
                 if any(k in sd for k in ("model", "ema", "state_dict")) else "non-tensor entries")
        raise ValueError(f"{path}: holds {found}; expected {what}")
    return sd


def _load_weights(model, sd, path, what, expected):
    """The frozen model with sd loaded; one-line errors for wrong shapes and for missing or unexpected keys."""
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise ValueError(f"{path}: {what} tensors have unexpected shapes ({_one_line(e, -1)}); "
                         f"expected {expected}") from None
    if missing or unexpected:
        raise ValueError(f"{path}: {what} keys do not match (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                         f"expected {expected}")
    return model.eval().requires_grad_(False)


def _hf_snapshot_files(directory):
    """The weight file(s) of a Hugging Face snapshot directory."""
    single, index, binary = (os.path.join(directory, f) for f in
                             ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"))
    if os.path.isfile(index) and not os.path.isfile(single):  # sharded safetensors
        with open(index) as f:
            shards = set(json.load(f).get("weight_map", {}).values())
        return [os.path.join(directory, name) for name in sorted(shards)]
    found = [f for f in (single, binary) if os.path.isfile(f)]
    if found:
        return found[:1]
    raise FileNotFoundError(f"{directory}: no model.safetensors or pytorch_model.bin in this directory; expected a "
                            f"Hugging Face {DINOV2_HF} snapshot")


DINOV2_EXPECTED = (f"a DINOv2 ViT-S/B/L checkpoint (official {os.path.basename(DINOV2_URL)} from {DINOV2_URL}, "
                   f"or a Hugging Face {DINOV2_HF} snapshot)")
HF_TOP = {"embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
          "embeddings.position_embeddings": "pos_embed", "embeddings.register_tokens": "register_tokens",
          "embeddings.patch_embeddings.projection.": "patch_embed.proj.", "layernorm.": "norm."}
HF_LAYER = {"attention.output.dense.": "attn.proj.", "layer_scale1.lambda1": "ls1.gamma",
            "layer_scale2.lambda1": "ls2.gamma"}  # norm1, norm2, mlp.fc1, mlp.fc2 keep their names
HF_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)")


def _rename(key, table):
    return next((new + key[len(old):] for old, new in table.items() if key.startswith(old)), key)


def _hf_to_official(sd):
    """Hugging Face Dinov2(WithRegisters)Model names -> official names; q, k, v fused into qkv."""
    out, qkv = {}, {}
    for k, v in sd.items():
        m = HF_QKV.fullmatch(k)
        if m:
            qkv.setdefault((m[1], m[3]), {})[m[2]] = v
        elif k.startswith("encoder.layer."):
            i, rest = k[len("encoder.layer."):].split(".", 1)
            out[f"blocks.{i}.{_rename(rest, HF_LAYER)}"] = v
        else:
            out[_rename(k, HF_TOP)] = v  # unknown keys are left for the strict load to report
    for (i, leaf), parts in qkv.items():
        if set(parts) == {"query", "key", "value"}:
            out[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat([parts["query"], parts["key"], parts["value"]], 0)
        else:
            out.update({f"encoder.layer.{i}.attention.attention.{p}.{leaf}": t for p, t in parts.items()})
    return out


def dinov2_from_state_dict(sd, path="state dict"):
    """Build a DINOv2 from an official- or Hugging-Face-layout state dict, inferring its size."""
    keys = list(sd)
    if any(k.startswith(("decoder_embed.", "decoder_layers.", "decoder_pred.")) for k in keys):
        raise ValueError(f"{path}: this is an RAE decoder checkpoint (decoder_embed/decoder_layers keys), "
                         f"not a DINOv2 encoder; expected {DINOV2_EXPECTED}")
    if any(s in k for k in keys for s in (".mlp.w12.", ".mlp.w3.", ".mlp.weights_in.", ".mlp.weights_out.")):
        raise ValueError(f"{path}: SwiGLU feed-forward weights (a ViT-g/giant model) are not supported; expected "
                         f"{DINOV2_EXPECTED}")
    if "embeddings.position_embeddings" in sd:
        sd = _hf_to_official(sd)
    if "pos_embed" not in sd or "patch_embed.proj.weight" not in sd:
        raise ValueError(f"{path}: no pos_embed / patch_embed.proj.weight (first keys: {keys[:3]}); "
                         f"expected {DINOV2_EXPECTED}")
    if any(k.startswith("blocks.") and len(k.split(".")) > 2 and k.split(".")[2].isdigit() for k in sd):
        raise ValueError(f"{path}: chunked blocks (blocks.C.N.*) are not supported; expected {DINOV2_EXPECTED}")
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    proj, pos = sd["patch_embed.proj.weight"], sd["pos_embed"]
    if proj.dim() != 4 or proj.shape[1] != 3 or proj.shape[2] != proj.shape[3]:
        raise ValueError(f"{path}: patch_embed.proj.weight has shape {tuple(proj.shape)}, expected (C, 3, p, p)")
    if pos.dim() != 3 or pos.shape[1] < 2 or math.isqrt(pos.shape[1] - 1) ** 2 + 1 != pos.shape[1]:
        raise ValueError(f"{path}: pos_embed has shape {tuple(pos.shape)}, expected (1, 1 + M*M, C)")
    dim, grid, fc1 = proj.shape[0], math.isqrt(pos.shape[1] - 1), sd.get("blocks.0.mlp.fc1.weight")
    sd.setdefault("mask_token", torch.zeros(1, dim))  # absent from some exports; never used in forward
    model = DINOv2(embed_dim=dim, depth=len({k.split(".")[1] for k in sd if k.startswith("blocks.")}),
                   num_heads=max(1, dim // 64), patch_size=proj.shape[-1],
                   num_registers=sd["register_tokens"].shape[1] if "register_tokens" in sd else 0, pos_grid=grid,
                   init_values=1.0 if "blocks.0.ls1.gamma" in sd else None,
                   mlp_ratio=fc1.shape[0] / dim if fc1 is not None else 4.0)
    return _load_weights(model, sd, path, "DINOv2", DINOV2_EXPECTED)


def load_dinov2(path):
    """The frozen DINOv2 encoder E from an official .pth or a Hugging Face snapshot (dir or weight file)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        sd = {}
        for f in _hf_snapshot_files(path):
            if not os.path.isfile(f):
                raise FileNotFoundError(f"{f}: missing shard of the Hugging Face snapshot {path}")
            sd.update(read_state_dict(f, DINOV2_EXPECTED))
    elif os.path.isfile(path):
        sd = read_state_dict(path, DINOV2_EXPECTED)
    else:
        raise FileNotFoundError(f"{path}: no such file or directory; expected {DINOV2_EXPECTED}")
    return dinov2_from_state_dict(sd, path)


# ---- RAE decoder D (bytetriper/RAE src/stage1/decoders/decoder.py: GeneralDecoder with ViT-MAE layers)

def sincos_pos_embed_2d(dim, grid):
    """MAE's fixed 2-D sin-cos table (grid*grid, dim): [sin, cos](column * omega), [sin, cos](row * omega)."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    token = torch.arange(grid * grid, dtype=torch.float64)  # row-major: token = row * grid + column
    angles = [pos.reshape(-1, 1) * omega for pos in (token % grid, token // grid)]
    return torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1).float()


class DecoderLayer(nn.Module):
    """Hugging Face ViTMAELayer: x += attn(layernorm_before(x)); x += mlp(layernorm_after(x)), LN eps 1e-12."""

    def __init__(self, dim, num_heads, mlp_dim, eps=1e-12):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"RAEDecoder: width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.attention = nn.ModuleDict(dict(
            attention=nn.ModuleDict({n: nn.Linear(dim, dim) for n in ("query", "key", "value")}),
            output=nn.ModuleDict(dict(dense=nn.Linear(dim, dim)))))
        self.intermediate = nn.ModuleDict(dict(dense=nn.Linear(dim, mlp_dim)))
        self.output = nn.ModuleDict(dict(dense=nn.Linear(mlp_dim, dim)))
        self.layernorm_before = nn.LayerNorm(dim, eps=eps)
        self.layernorm_after = nn.LayerNorm(dim, eps=eps)

    def forward(self, x):
        h = self.layernorm_before(x)
        a = multihead_attention(*(self.attention.attention[n](h) for n in ("query", "key", "value")), self.num_heads)
        x = x + self.attention.output.dense(a)
        return x + self.output.dense(F.gelu(self.intermediate.dense(self.layernorm_after(x))))


class RAEDecoder(nn.Module):
    """D: tokens (B, N, in_dim) in raw encoder scale -> ImageNet-normalized pixels (B, 3, H, W).

    decoder_embed -> prepend trainable_cls_token -> + decoder_pos_embed (fixed sin-cos, zero cls row) -> ViT-MAE
    layers -> decoder_norm -> decoder_pred -> drop cls -> unpatchify. H = W = sqrt(num_patches) * patch_size.
    """

    def __init__(self, in_dim=768, hidden=1152, depth=28, num_heads=16, mlp_dim=4096, patch_size=16, num_patches=256):
        super().__init__()
        grid = math.isqrt(num_patches)
        if grid * grid != num_patches:
            raise ValueError(f"RAEDecoder: num_patches={num_patches} is not a square")
        self.in_dim, self.hidden, self.depth, self.num_heads = in_dim, hidden, depth, num_heads
        self.mlp_dim, self.patch_size, self.num_patches, self.grid = mlp_dim, patch_size, num_patches, grid
        self.decoder_embed = nn.Linear(in_dim, hidden)
        pos = torch.cat([torch.zeros(1, hidden), sincos_pos_embed_2d(hidden, grid)]).unsqueeze(0)
        self.register_buffer("decoder_pos_embed", pos)  # a buffer (RAE's key): fixed even if D is unfrozen
        self.decoder_layers = nn.ModuleList([DecoderLayer(hidden, num_heads, mlp_dim) for _ in range(depth)])
        self.decoder_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.decoder_pred = nn.Linear(hidden, patch_size * patch_size * 3)
        self.trainable_cls_token = nn.Parameter(torch.zeros(1, 1, hidden))  # RAE: zeros, PyTorch default init elsewhere

    def config(self):
        """The constructor arguments (stored in stage-1 checkpoints)."""
        return {name: getattr(self, name) for name in inspect.signature(type(self)).parameters}

    def unpatchify(self, x):
        """(B, h*w, p*p*3) -> (B, 3, h*p, w*p) with the token vector laid out as (p_row, p_col, channel)."""
        B, p, g = x.shape[0], self.patch_size, self.grid
        return x.reshape(B, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(B, 3, g * p, g * p)

    def forward(self, tokens):
        if tokens.dim() != 3 or tokens.shape[1:] != (self.num_patches, self.in_dim):
            raise ValueError(f"RAEDecoder: expected tokens (B, {self.num_patches}, {self.in_dim}), "
                             f"got {tuple(tokens.shape)}")
        x = self.decoder_embed(tokens)
        x = torch.cat([self.trainable_cls_token.expand(len(x), -1, -1).to(x.dtype), x], dim=1)
        x = x + self.decoder_pos_embed.to(x.dtype)
        for layer in self.decoder_layers:
            x = layer(x)
        return self.unpatchify(self.decoder_pred(self.decoder_norm(x))[:, 1:])


def _existing_file(path, expected):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file; expected {expected}")
    return path


def load_rae_decoder(path, num_heads=None):
    """D from the RAE release model.pt; sizes inferred from the tensors, heads from RAE's configs unless given."""
    path = _existing_file(path, RAE_DECODER_EXPECTED)
    sd = read_state_dict(path, RAE_DECODER_EXPECTED)
    if any(k in sd for k in ("pos_embed", "embeddings.position_embeddings", "patch_embed.proj.weight")):
        raise ValueError(f"{path}: this is a DINOv2 encoder checkpoint, not an RAE decoder; expected "
                         f"{RAE_DECODER_EXPECTED}")
    required = ("decoder_embed.weight", "decoder_pos_embed", "trainable_cls_token", "decoder_norm.weight",
                "decoder_pred.weight", "decoder_layers.0.intermediate.dense.weight")
    absent = [k for k in required if k not in sd]
    if absent:
        raise ValueError(f"{path}: missing {absent[:3]} (first keys: {list(sd)[:3]}); expected {RAE_DECODER_EXPECTED}")
    sd = {k: v.float() for k, v in sd.items()}
    hidden, in_dim = sd["decoder_embed.weight"].shape
    out = sd["decoder_pred.weight"].shape[0]
    patch = math.isqrt(out // 3)  # the patch size is the decoder's own (RAE: decoder_patch_size), not the encoder's
    if 3 * patch * patch != out:
        raise ValueError(f"{path}: decoder_pred predicts {out} values per token, not 3 * p * p")
    num_heads = num_heads or RAE_DECODER_HEADS.get(hidden)
    if num_heads is None:
        raise ValueError(f"{path}: decoder width {hidden} is none of RAE's ({sorted(RAE_DECODER_HEADS)}), so the head "
                         f"count is unknown; pass num_heads")
    decoder = RAEDecoder(in_dim=in_dim, hidden=hidden, num_heads=num_heads, patch_size=patch,
                         depth=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("decoder_layers.")),
                         mlp_dim=sd["decoder_layers.0.intermediate.dense.weight"].shape[0],
                         num_patches=sd["decoder_pos_embed"].shape[1] - 1)
    return _load_weights(decoder, sd, path, "RAE decoder", RAE_DECODER_EXPECTED)


def fingerprint(model):
    """A short sha256 of a model's weights (sorted names, shapes, float32 values): the same weights give the same
    fingerprint whichever file held them (official .pth, Hugging Face safetensors or .bin). DINOv2's mask_token is
    left out: unused by forward, and absent from some exports. A stage-1 checkpoint records the fingerprints of E and
    of a released D, so that another file of the same architecture is refused later."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name == "mask_token":
            continue
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy())
    return digest.hexdigest()[:16]


def save_rae_decoder(decoder, path):
    """Write D as RAE's model.pt (a plain float32 state dict), atomically."""
    torch.save({k: v.detach().float().cpu() for k, v in decoder.state_dict().items()}, path + ".tmp")
    os.replace(path + ".tmp", path)


# ---- RAE: E, D and the latent statistics (eq. 1)

class RAE(nn.Module):
    """Frozen E and D with the statistics of eq. 1; images in [0, 1], (B, 3, S, S), S = image_size. The token grid
    and pixel patch come from the decoder (the encoder sees the same grid at its own patch size). `mean` / `var`
    are (n,) (channel-wise, the paper) or (N, n) (per token, RAE's stat.pt); 0 and 1 until set."""

    def __init__(self, encoder, decoder, image_size=256):
        super().__init__()
        if image_size % decoder.patch_size:
            raise ValueError(f"RAE: image_size {image_size} is not a multiple of decoder patch {decoder.patch_size}")
        grid = image_size // decoder.patch_size
        if grid * grid != decoder.num_patches or decoder.in_dim != encoder.embed_dim:
            raise ValueError(f"RAE: decoder reads {decoder.num_patches} tokens of width {decoder.in_dim}, but "
                             f"image_size {image_size} and the encoder give {grid * grid} of width {encoder.embed_dim}")
        self.encoder, self.decoder = encoder.eval().requires_grad_(False), decoder.requires_grad_(False)
        self.image_size, self.encoder_size = image_size, grid * encoder.patch_size  # 256 -> 224, 512 -> 448
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("mean", torch.zeros(encoder.embed_dim))
        self.register_buffer("var", torch.ones(encoder.embed_dim))

    def set_stats(self, mean, var):
        """Latent mean / variance shaped (n,) or (N, n)."""
        mean, var = torch.as_tensor(mean).float(), torch.as_tensor(var).float()
        n, N = self.encoder.embed_dim, self.decoder.num_patches
        for name, t in (("mean", mean), ("var", var)):
            if tuple(t.shape) not in ((n,), (N, n)):
                raise ValueError(f"RAE.set_stats: {name} has shape {tuple(t.shape)}, expected ({n},) or ({N}, {n})")
        if (var < 0).any() or not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
            raise ValueError("RAE.set_stats: statistics must be finite with var >= 0")
        self.mean, self.var = mean.to(self.mean.device), var.to(self.var.device)

    def load_stats(self, path):
        """RAE's stat.pt: 'var' and optional 'mean', each (C,), (C, 1, 1) or (C, H, W) -> tokens (H*W, C) row-major.
        A missing or None mean is zero (RAE's loader; the DINOv2-B release holds only var): z_raw / sqrt(var + 1e-5)."""
        expected = f"RAE latent statistics stat.pt with 'var' (and optionally 'mean') (`hf download {RAE_HF}`)"
        path = _existing_file(path, expected)
        stats = _torch_load(path, expected)
        ok = isinstance(stats, dict) and torch.is_tensor(stats.get("var"))
        if not ok or not (stats.get("mean") is None or torch.is_tensor(stats["mean"])):
            raise ValueError(f"{path}: expected {expected}")
        n, N, g = self.encoder.embed_dim, self.decoder.num_patches, self.decoder.grid
        out = {}
        for name in [k for k in ("mean", "var") if stats.get(k) is not None]:
            t = stats[name].float()
            t = t.flatten(1).t().squeeze(0) if t.dim() == 3 else t  # (C, H, W) -> (H*W, C); (C, 1, 1) -> (C,)
            if tuple(t.shape) not in ((n,), (N, n)):
                raise ValueError(f"{path}: {name} has shape {tuple(stats[name].shape)}; this encoder/decoder needs "
                                 f"({n},), ({n}, 1, 1) or ({n}, {g}, {g})")
            out[name] = t.contiguous()
        self.set_stats(out.get("mean", torch.zeros_like(out["var"])), out["var"])

    def encode_raw(self, images):
        """z_raw = E(x): resize to the encoder input (bicubic, no antialias, as RAE), ImageNet-normalize, encode."""
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2:] != (self.image_size, self.image_size):
            raise ValueError(f"RAE: expected images (B, 3, {self.image_size}, {self.image_size}) in [0, 1], "
                             f"got {tuple(images.shape)}")
        s = self.encoder_size
        x = F.interpolate(images, size=(s, s), mode="bicubic", align_corners=False) if s != self.image_size else images
        return self.encoder((x - self.pixel_mean) / self.pixel_std)

    def normalize(self, z_raw):
        """Eq. 1: z = (z_raw - mean) / sqrt(var + 1e-5)."""
        self._check_tokens(z_raw)
        return (z_raw - self.mean) / torch.sqrt(self.var + STATS_EPS)

    def denormalize(self, z):
        self._check_tokens(z)
        return z * torch.sqrt(self.var + STATS_EPS) + self.mean

    def encode(self, images):
        """z = norm(E(x)). The noise of eq. 7/8 goes on E(x) before normalize, drawn by the training scripts."""
        return self.normalize(self.encode_raw(images))

    def decode(self, z):
        """x^ = D(denorm(z)) mapped back from ImageNet normalization to [0, 1] (not clamped)."""
        return self.decoder(self.denormalize(z)) * self.pixel_std + self.pixel_mean

    def _check_tokens(self, z):
        N, n = self.decoder.num_patches, self.encoder.embed_dim
        if z.dim() != 3 or z.shape[1:] != (N, n):
            raise ValueError(f"RAE: expected tokens (B, {N}, {n}), got {tuple(z.shape)}")
