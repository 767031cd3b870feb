"""rae.py: DINOv2 in three checkpoint layouts against an independent computation, the RAE decoder against an
independent computation, stat.pt layouts (with and without a mean), channel statistics and normalization (eq. 1),
the encoder noise of eq. 7/8 (drawn by common.encoder_noise) through normalization, configs and refusals.

Weights are small and random but written in the real file formats with the real 37x37 position grid
(518 px checkpoints) and the real 256 -> 224 resize."""

import json
import math
import os
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import rae

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


# -----------------------------------------------------------------------------
# Independent helpers: random checkpoints, HF renaming, safetensors writer, reference computations

def official_state_dict(dim=128, depth=2, registers=4, grid=37, patch=14, seed=0, layerscale=True):
    """Random weights in the facebookresearch/dinov2 layout, built key by key."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=1.0, mean=0.0):
        return torch.randn(*shape, generator=g) * s + mean

    sd = {"cls_token": r(1, 1, dim), "pos_embed": r(1, 1 + grid * grid, dim),
          "mask_token": r(1, dim), "patch_embed.proj.weight": r(dim, 3, patch, patch, s=0.05),
          "patch_embed.proj.bias": r(dim, s=0.1)}
    if registers:
        sd["register_tokens"] = r(1, registers, dim)
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": r(dim, s=0.2, mean=1.0), b + "norm1.bias": r(dim, s=0.1),
                   b + "attn.qkv.weight": r(3 * dim, dim, s=dim ** -0.5), b + "attn.qkv.bias": r(3 * dim, s=0.1),
                   b + "attn.proj.weight": r(dim, dim, s=dim ** -0.5), b + "attn.proj.bias": r(dim, s=0.1),
                   b + "norm2.weight": r(dim, s=0.2, mean=1.0), b + "norm2.bias": r(dim, s=0.1),
                   b + "mlp.fc1.weight": r(4 * dim, dim, s=dim ** -0.5), b + "mlp.fc1.bias": r(4 * dim, s=0.1),
                   b + "mlp.fc2.weight": r(dim, 4 * dim, s=(4 * dim) ** -0.5), b + "mlp.fc2.bias": r(dim, s=0.1)})
        if layerscale:
            sd.update({b + "ls1.gamma": r(dim, s=0.3, mean=0.5), b + "ls2.gamma": r(dim, s=0.3, mean=0.5)})
    sd.update({"norm.weight": r(dim, s=0.5, mean=1.0), "norm.bias": r(dim, s=0.5)})
    return sd


def to_hf(sd):
    """Official names -> Hugging Face Dinov2Model / Dinov2WithRegistersModel names (qkv split q, k, v)."""
    top = {"cls_token": "embeddings.cls_token", "mask_token": "embeddings.mask_token",
           "pos_embed": "embeddings.position_embeddings", "register_tokens": "embeddings.register_tokens",
           "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
           "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
           "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
    sub = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.output.dense", "mlp.fc1": "mlp.fc1",
           "mlp.fc2": "mlp.fc2", "ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1"}
    out = {}
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v
            continue
        _, i, rest = k.split(".", 2)
        pre = f"encoder.layer.{i}."
        if rest.startswith("attn.qkv."):
            leaf = rest.split(".")[-1]
            for name, part in zip(("query", "key", "value"), v.chunk(3, dim=0)):
                out[pre + f"attention.attention.{name}.{leaf}"] = part.clone()
        elif rest.endswith("gamma"):
            out[pre + sub[rest]] = v
        else:
            name, leaf = rest.rsplit(".", 1)
            out[pre + f"{sub[name]}.{leaf}"] = v
    return out


def write_safetensors(path, tensors):
    names = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        b = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb + b"".join(blobs))


def cubic_matrix(n_in, n_out, scale):
    """PyTorch bicubic (align_corners=False, no antialias): A = -0.75, src = scale (i + 0.5) - 0.5, clamped taps."""
    A = -0.75
    c1 = lambda x: ((A + 2) * x - (A + 3)) * x * x + 1
    c2 = lambda x: ((A * x - 5 * A) * x + 8 * A) * x - 4 * A
    Wm = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = scale * (i + 0.5) - 0.5
        i0 = math.floor(src)
        t = src - i0
        for k, w in enumerate((c2(t + 1), c1(t), c1(1 - t), c2(2 - t))):
            Wm[i, min(max(i0 - 1 + k, 0), n_in - 1)] += w
    return Wm


def antialias_matrix(n_in, n_out):
    """PIL-style antialiased bicubic (a = -0.5), kernel widened by the downscale factor, weights normalized."""
    a = -0.5

    def f(x):
        x = abs(x)
        if x < 1:
            return ((a + 2) * x - (a + 3)) * x * x + 1
        if x < 2:
            return (((x - 5) * x + 8) * x - 4) * a
        return 0.0

    scale = n_in / n_out
    support, inv = 2 * max(scale, 1.0), 1 / max(scale, 1.0)
    Wm = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        w = torch.tensor([f((j - center + 0.5) * inv) for j in range(lo, hi)], dtype=torch.float64)
        Wm[i, lo:hi] = w / w.sum()
    return Wm


def reference_pos(sd, h, w, registers):
    pos = sd["pos_embed"][0].double()
    M = math.isqrt(pos.shape[0] - 1)
    if (h, w) == (M, M):
        return pos
    grid = pos[1:].reshape(M, M, -1)
    if registers:
        Wh, Ww = antialias_matrix(M, h), antialias_matrix(M, w)
    else:
        Wh, Ww = cubic_matrix(M, h, M / (h + 0.1)), cubic_matrix(M, w, M / (w + 0.1))
    grid = torch.einsum("ai,bj,ijc->abc", Wh, Ww, grid).reshape(h * w, -1)
    return torch.cat([pos[:1], grid])


def layer_norm(x, w=None, b=None, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps)
    return y * w + b if w is not None else y


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def attention(q, k, v, heads):
    B, N, C = q.shape
    q, k, v = (t.reshape(B, N, heads, C // heads).transpose(1, 2) for t in (q, k, v))
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(C // heads), dim=-1)
    return (a @ v).transpose(1, 2).reshape(B, N, C)


def reference_dinov2(sd, x, affine=False):
    """DINOv2 patch tokens from the raw official state dict with plain tensor ops, in float64."""
    s = {k: v.double() for k, v in sd.items()}
    B, _, H, W = x.shape
    C, _, p, _ = s["patch_embed.proj.weight"].shape
    h, w = H // p, W // p
    R = s["register_tokens"].shape[1] if "register_tokens" in s else 0
    patches = x.double().reshape(B, 3, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, 3 * p * p)
    t = patches @ s["patch_embed.proj.weight"].reshape(C, -1).T + s["patch_embed.proj.bias"]
    pos = reference_pos(sd, h, w, R)
    t = torch.cat([s["cls_token"].expand(B, 1, C) + pos[:1], t + pos[1:]], dim=1)
    if R:
        t = torch.cat([t[:, :1], s["register_tokens"].expand(B, R, C), t[:, 1:]], dim=1)
    depth = 1 + max(int(k.split(".")[1]) for k in s if k.startswith("blocks."))
    for i in range(depth):
        g = lambda n: s[f"blocks.{i}.{n}"]
        y = layer_norm(t, g("norm1.weight"), g("norm1.bias"))
        q, k, v = (y @ g("attn.qkv.weight").T + g("attn.qkv.bias")).chunk(3, dim=-1)
        y = attention(q, k, v, max(1, C // 64)) @ g("attn.proj.weight").T + g("attn.proj.bias")
        t = t + y * g("ls1.gamma")
        y = layer_norm(t, g("norm2.weight"), g("norm2.bias"))
        y = gelu(y @ g("mlp.fc1.weight").T + g("mlp.fc1.bias")) @ g("mlp.fc2.weight").T + g("mlp.fc2.bias")
        t = t + y * g("ls2.gamma")
    t = layer_norm(t, s["norm.weight"], s["norm.bias"]) if affine else layer_norm(t)
    return t[:, 1 + R:]


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def one_line_error(excinfo, path):
    msg = str(excinfo.value)
    assert "\n" not in msg and os.fspath(path) in msg, msg
    return msg


# -----------------------------------------------------------------------------
# DINOv2: three checkpoint layouts vs the independent computation

@pytest.fixture(scope="module", params=[4, 0], ids=["registers", "no-registers"])
def dinov2_files(request, tmp_path_factory):
    """The same random weights as official .pth, HF model.safetensors snapshot and HF pytorch_model.bin."""
    registers = request.param
    tmp = tmp_path_factory.mktemp(f"dinov2_r{registers}")
    sd = official_state_dict(registers=registers, seed=registers)
    torch.save(sd, tmp / "official.pth")
    (tmp / "hf_st").mkdir()
    write_safetensors(tmp / "hf_st" / "model.safetensors", to_hf(sd))
    (tmp / "hf_st" / "config.json").write_text("{}")
    (tmp / "hf_bin").mkdir()
    torch.save(to_hf(sd), tmp / "hf_bin" / "pytorch_model.bin")
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        official = rae.load_dinov2(tmp / "official.pth")(x)
    return sd, tmp, x, reference_dinov2(sd, x), official


def test_dinov2_official_layout_matches_reference(dinov2_files):
    sd, tmp, x, ref, _ = dinov2_files
    model = rae.load_dinov2(tmp / "official.pth")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.num_registers == (4 if "register_tokens" in sd else 0) and model.pos_grid == 37
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 256, 128)
    assert rel_err(out, ref) < 1e-4


@pytest.mark.parametrize("layout", ["hf_st", "hf_st/model.safetensors", "hf_bin", "hf_bin/pytorch_model.bin"])
def test_dinov2_hf_layouts_match_reference(dinov2_files, layout):
    sd, tmp, x, ref, official = dinov2_files
    with torch.no_grad():
        out = rae.load_dinov2(tmp / layout)(x)
    assert rel_err(out, ref) < 1e-4
    assert rel_err(out, official) < 1e-6


def test_dinov2_final_layernorm_has_no_affine(dinov2_files):
    sd, tmp, x, ref, out = dinov2_files
    out = out.double()
    # Closed form of a LayerNorm without affine: every token has mean 0 and variance 1 over channels.
    assert out.mean(-1).abs().max() < 1e-5
    assert (out.var(-1, unbiased=False) - 1).abs().max() < 1e-4
    # The checkpoint's norm.weight/bias are far from identity, so applying them would be caught.
    assert rel_err(reference_dinov2(sd, x, affine=True), ref) > 0.1


def test_pos_embed_interpolation_follows_the_model_family():
    """Registers: resize to size with antialias; no registers: scale_factor (h0+0.1)/M, no antialias."""
    for registers in (4, 0):
        sd = official_state_dict(dim=64, depth=1, registers=registers)
        model = rae.dinov2_from_state_dict(sd)
        for h, w in ((16, 16), (32, 32), (16, 24)):
            ours = model.interpolate_pos_encoding(h, w)[0].detach()
            assert rel_err(ours, reference_pos(sd, h, w, registers)) < 1e-5
            other = reference_pos(sd, h, w, 4 - registers)
            assert rel_err(other, ours) > 1e-3  # the two families differ: the check above can fail
        assert torch.equal(model.interpolate_pos_encoding(37, 37), sd["pos_embed"])  # upstream skips the resize


def test_dinov2_at_518_uses_checkpoint_grid_directly():
    sd = official_state_dict(dim=64, depth=1, registers=0, seed=3)
    x = torch.randn(1, 3, 518, 518)
    with torch.no_grad():
        out = rae.dinov2_from_state_dict(sd).eval()(x)
    assert out.shape == (1, 37 * 37, 64)
    assert rel_err(out, reference_dinov2(sd, x)) < 1e-4


def test_dinov2_state_dict_is_the_official_layout(tmp_path):
    for registers in (4, 0):
        model = rae.DINOv2(embed_dim=64, depth=2, num_heads=1, num_registers=registers, pos_grid=37)
        expected = official_state_dict(dim=64, depth=2, registers=registers)
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == \
               {k: tuple(v.shape) for k, v in expected.items()}
        torch.save(model.state_dict(), tmp_path / "m.pth")
        x = torch.randn(1, 3, 28, 42)
        with torch.no_grad():
            assert torch.allclose(rae.load_dinov2(tmp_path / "m.pth")(x), model.eval()(x), atol=1e-6)


def test_dinov2_config_rebuilds_the_encoder(dinov2_files, tmp_path):
    """config() records what E was built with: it rebuilds the same network and tells encoders apart."""
    sd, tmp, x, ref, official = dinov2_files
    enc = rae.load_dinov2(tmp / "official.pth")
    rebuilt = rae.DINOv2(**enc.config())
    rebuilt.load_state_dict(enc.state_dict(), strict=True)
    assert rebuilt.config() == enc.config()
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), official)
    cfg = enc.config()
    assert cfg == dict(embed_dim=128, depth=2, num_heads=2, patch_size=14, num_registers=cfg["num_registers"],
                       pos_grid=37, init_values=1.0, mlp_ratio=4.0)
    sd_other = official_state_dict(dim=64, depth=1, registers=cfg["num_registers"], layerscale=False)
    torch.save(sd_other, tmp_path / "o.pth")
    other = rae.load_dinov2(tmp_path / "o.pth").config()
    assert other != cfg and other["init_values"] is None and other["num_registers"] == cfg["num_registers"]


def test_dinov2_sharded_hf_snapshot(dinov2_files, tmp_path):
    """A snapshot whose safetensors are split in shards (model.safetensors.index.json) reads as one."""
    sd, tmp, x, ref, official = dinov2_files
    hf = to_hf(sd)
    keys = sorted(hf)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for part, name in enumerate(names):
        write_safetensors(tmp_path / name, {k: hf[k] for k in keys[part::2]})
    weight_map = {k: names[i % 2] for i, k in enumerate(keys)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with torch.no_grad():
        assert rel_err(rae.load_dinov2(tmp_path)(x), official) < 1e-6


def test_fingerprint_is_the_weights_not_the_file(dinov2_files, tmp_path):
    """The fingerprint a stage-1 checkpoint records: equal for the same weights in every layout (official .pth,
    HF safetensors and .bin, an export without the unused mask_token), different for other weights of the same
    shape; the RAE decoder's likewise."""
    sd, tmp, x, ref, official = dinov2_files
    prints = {layout: rae.fingerprint(rae.load_dinov2(tmp / layout)) for layout in ("official.pth", "hf_st", "hf_bin")}
    torch.save({k: v for k, v in sd.items() if k != "mask_token"}, tmp_path / "no_mask.pth")
    prints["no_mask"] = rae.fingerprint(rae.load_dinov2(tmp_path / "no_mask.pth"))
    assert len(set(prints.values())) == 1, prints
    other = dict(sd, **{"blocks.1.mlp.fc2.bias": sd["blocks.1.mlp.fc2.bias"] + 1e-3})   # one tensor moved a little
    torch.save(other, tmp_path / "other.pth")
    assert rae.fingerprint(rae.load_dinov2(tmp_path / "other.pth")) != prints["official.pth"]
    dec = rae.RAEDecoder(in_dim=32, hidden=32, depth=1, num_heads=1, mlp_dim=64, patch_size=4, num_patches=4)
    rae.save_rae_decoder(dec, str(tmp_path / "model.pt"))
    assert rae.fingerprint(rae.load_rae_decoder(tmp_path / "model.pt", num_heads=1)) == rae.fingerprint(dec)
    torch.nn.init.normal_(dec.decoder_pred.bias)
    assert rae.fingerprint(dec) != rae.fingerprint(rae.load_rae_decoder(tmp_path / "model.pt", num_heads=1))


def test_block_submodule_names():
    assert set(rae.Block(64, 1).state_dict()) == {
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
        "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"}
    assert {"ls1.gamma", "ls2.gamma"} <= set(rae.Block(64, 1, init_values=1.0).state_dict())


# -----------------------------------------------------------------------------
# safetensors reader and refusals

def test_safetensors_reader_dtypes_and_truncation(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"f64": torch.randn(3, 2, generator=g, dtype=torch.float64), "f32": torch.randn(5, generator=g),
               "f16": torch.randn(2, 3, generator=g).half(), "bf16": torch.randn(4, 1, generator=g).bfloat16(),
               "i64": torch.arange(-3, 3), "u8": torch.arange(7, dtype=torch.uint8), "b": torch.tensor([True, False]),
               "scalar": torch.tensor(2.5)}
    write_safetensors(tmp_path / "t.safetensors", tensors)
    back = rae.read_safetensors(tmp_path / "t.safetensors")
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    data = (tmp_path / "t.safetensors").read_bytes()
    for cut in (5, 40, len(data) - 3):
        (tmp_path / "cut.safetensors").write_bytes(data[:cut])
        with pytest.raises(ValueError) as e:
            rae.read_safetensors(tmp_path / "cut.safetensors")
        assert "truncated" in one_line_error(e, tmp_path / "cut.safetensors")


def test_load_dinov2_refuses_bad_inputs(tmp_path):
    sd = official_state_dict(dim=64, depth=1, grid=4)
    with pytest.raises(FileNotFoundError) as e:
        rae.load_dinov2(tmp_path / "nope.pth")
    one_line_error(e, tmp_path / "nope.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        rae.load_dinov2(tmp_path / "empty")
    assert "model.safetensors" in one_line_error(e, tmp_path / "empty")
    torch.save(sd, tmp_path / "full.pth")
    (tmp_path / "trunc.pth").write_bytes((tmp_path / "full.pth").read_bytes()[:2000])
    with pytest.raises(ValueError) as e:
        rae.load_dinov2(tmp_path / "trunc.pth")
    one_line_error(e, tmp_path / "trunc.pth")
    (tmp_path / "st").mkdir()
    write_safetensors(tmp_path / "st" / "model.safetensors", to_hf(sd))
    data = (tmp_path / "st" / "model.safetensors").read_bytes()
    (tmp_path / "st" / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError) as e:
        rae.load_dinov2(tmp_path / "st")
    one_line_error(e, tmp_path / "st" / "model.safetensors")
    torch.save(rae.RAEDecoder(in_dim=64, hidden=64, depth=1, num_heads=1, mlp_dim=64, patch_size=2,
                              num_patches=4).state_dict(), tmp_path / "model.pt")
    with pytest.raises(ValueError) as e:
        rae.load_dinov2(tmp_path / "model.pt")
    assert "decoder" in one_line_error(e, tmp_path / "model.pt")
    giant = {k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3"): v for k, v in sd.items()}
    torch.save(giant, tmp_path / "giant.pth")
    with pytest.raises(ValueError) as e:
        rae.load_dinov2(tmp_path / "giant.pth")
    assert "SwiGLU" in one_line_error(e, tmp_path / "giant.pth")
    (tmp_path / "hf_giant").mkdir()
    write_safetensors(tmp_path / "hf_giant" / "model.safetensors",
                      {k.replace("mlp.fc1", "mlp.weights_in").replace("mlp.fc2", "mlp.weights_out"): v
                       for k, v in to_hf(sd).items()})
    with pytest.raises(ValueError) as e:
        rae.load_dinov2(tmp_path / "hf_giant")
    assert "SwiGLU" in one_line_error(e, tmp_path / "hf_giant")
    torch.save({"a.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError) as e:
        rae.load_dinov2(tmp_path / "other.pth")
    one_line_error(e, tmp_path / "other.pth")
    torch.save(dict(sd, pos_embed=sd["pos_embed"][:, :-1]), tmp_path / "grid.pth")   # 1 + 15 rows: no M x M grid
    with pytest.raises(ValueError) as e:
        rae.load_dinov2(tmp_path / "grid.pth")
    assert "pos_embed" in one_line_error(e, tmp_path / "grid.pth")


# -----------------------------------------------------------------------------
# RAE decoder

def rae_decoder_state_dict(in_dim=32, hidden=64, depth=2, mlp=128, patch=4, grid=4, seed=0, scale=1.0):
    """Random weights in the RAE release model.pt layout (GeneralDecoder with ViT-MAE layers)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=1.0, mean=0.0: torch.randn(*shape, generator=g) * s + mean
    sd = {"decoder_embed.weight": r(hidden, in_dim, s=scale * in_dim ** -0.5), "decoder_embed.bias": r(hidden, s=scale),
          "decoder_pos_embed": r(1, 1 + grid * grid, hidden, s=scale), "trainable_cls_token": r(1, 1, hidden, s=scale)}
    for i in range(depth):
        b = f"decoder_layers.{i}."
        for n in ("query", "key", "value"):
            sd[b + f"attention.attention.{n}.weight"] = r(hidden, hidden, s=hidden ** -0.5)
            sd[b + f"attention.attention.{n}.bias"] = r(hidden, s=0.1)
        sd.update({b + "attention.output.dense.weight": r(hidden, hidden, s=scale * hidden ** -0.5),
                   b + "attention.output.dense.bias": r(hidden, s=scale * 0.1),
                   b + "intermediate.dense.weight": r(mlp, hidden, s=hidden ** -0.5),
                   b + "intermediate.dense.bias": r(mlp, s=0.1),
                   b + "output.dense.weight": r(hidden, mlp, s=scale * mlp ** -0.5),
                   b + "output.dense.bias": r(hidden, s=scale * 0.1),
                   b + "layernorm_before.weight": r(hidden, s=0.2, mean=1.0),
                   b + "layernorm_before.bias": r(hidden, s=0.1),
                   b + "layernorm_after.weight": r(hidden, s=0.2, mean=1.0),
                   b + "layernorm_after.bias": r(hidden, s=0.1)})
    sd.update({"decoder_norm.weight": r(hidden, s=0.2, mean=1.0), "decoder_norm.bias": r(hidden, s=0.1),
               "decoder_pred.weight": r(patch * patch * 3, hidden, s=hidden ** -0.5),
               "decoder_pred.bias": r(patch * patch * 3, s=0.1)})
    return sd


def reference_decoder(sd, tokens, heads, eps=1e-12):
    s = {k: v.double() for k, v in sd.items()}
    t = tokens.double() @ s["decoder_embed.weight"].T + s["decoder_embed.bias"]
    B, N, C = t.shape
    t = torch.cat([s["trainable_cls_token"].expand(B, 1, C), t], 1) + s["decoder_pos_embed"]
    depth = 1 + max(int(k.split(".")[1]) for k in s if k.startswith("decoder_layers."))
    lin = lambda x, n: x @ s[n + ".weight"].T + s[n + ".bias"]
    for i in range(depth):
        b = f"decoder_layers.{i}."
        y = layer_norm(t, s[b + "layernorm_before.weight"], s[b + "layernorm_before.bias"], eps)
        a = attention(*(lin(y, b + f"attention.attention.{n}") for n in ("query", "key", "value")), heads)
        t = t + lin(a, b + "attention.output.dense")
        y = layer_norm(t, s[b + "layernorm_after.weight"], s[b + "layernorm_after.bias"], eps)
        t = t + lin(gelu(lin(y, b + "intermediate.dense")), b + "output.dense")
    out = lin(layer_norm(t, s["decoder_norm.weight"], s["decoder_norm.bias"], eps), "decoder_pred")[:, 1:]
    p, g = math.isqrt(out.shape[-1] // 3), math.isqrt(N)
    img = torch.empty(B, 3, g * p, g * p, dtype=torch.float64)
    for i in range(g):
        for j in range(g):
            img[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p] = out[:, i * g + j].reshape(B, p, p, 3).permute(0, 3, 1, 2)
    return img


def test_rae_decoder_model_pt_matches_reference(tmp_path):
    # Small activations (std ~ 3e-3) make the LayerNorm eps visible: 1e-6 instead of 1e-12 would fail the check.
    sd = rae_decoder_state_dict(scale=3e-3)
    torch.save(sd, tmp_path / "model.pt")
    dec = rae.load_rae_decoder(tmp_path / "model.pt", num_heads=2)
    assert (dec.in_dim, dec.hidden, dec.depth, dec.mlp_dim, dec.patch_size, dec.num_patches) == (32, 64, 2, 128, 4, 16)
    assert not dec.training and not any(p.requires_grad for p in dec.parameters())
    tokens = torch.randn(3, 16, 32) * 3e-3
    with torch.no_grad():
        out = dec(tokens)
    assert out.shape == (3, 3, 16, 16)
    ref = reference_decoder(sd, tokens, heads=2)
    assert rel_err(out, ref) < 1e-4
    assert rel_err(reference_decoder(sd, tokens, heads=2, eps=1e-6), ref) > 1e-3
    assert rel_err(reference_decoder(sd, tokens, heads=1), ref) > 1e-3  # the head count matters too


def test_rae_decoder_fresh_init_save_load_and_sincos(tmp_path):
    dec = rae.RAEDecoder(in_dim=32, hidden=64, depth=1, num_heads=4, mlp_dim=96, patch_size=2, num_patches=36)
    assert set(dec.state_dict()) == set(rae_decoder_state_dict(hidden=64, depth=1, mlp=96, patch=2, grid=6))
    # MAE get_2d_sincos_pos_embed(add_cls_token=True): zero row, then [emb(col), emb(row)], emb = [sin, cos].
    D, grid = 64, 6
    omega = 1.0 / 10000 ** (np.arange(D // 4, dtype=np.float64) / (D / 4.0))
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    outer = lambda pos: np.outer(pos.reshape(-1), omega)
    emb = lambda pos: np.concatenate([np.sin(outer(pos)), np.cos(outer(pos))], 1)
    expected = np.concatenate([np.zeros((1, D)), np.concatenate([emb(gw), emb(gh)], 1)])
    assert np.allclose(dec.decoder_pos_embed[0].numpy(), expected, atol=1e-6)
    assert torch.equal(dec.trainable_cls_token, torch.zeros(1, 1, 64))
    with torch.no_grad():
        dec.trainable_cls_token.normal_()
    rae.save_rae_decoder(dec, str(tmp_path / "model.pt"))
    assert not os.path.exists(tmp_path / "model.pt.tmp")
    back = rae.load_rae_decoder(tmp_path / "model.pt", num_heads=4)
    x = torch.randn(2, 36, 32)
    with torch.no_grad():
        assert torch.allclose(back(x), dec.eval()(x), atol=1e-6)
    assert back.config() == dec.config()


def test_rae_decoder_default_heads_and_refusals(tmp_path):
    torch.save(rae_decoder_state_dict(in_dim=8, hidden=768, depth=1, mlp=16, patch=2, grid=2), tmp_path / "b.pt")
    assert rae.load_rae_decoder(tmp_path / "b.pt").num_heads == 12        # RAE ViT-B decoder config
    torch.save(rae_decoder_state_dict(), tmp_path / "tiny.pt")
    with pytest.raises(ValueError) as e:
        rae.load_rae_decoder(tmp_path / "tiny.pt")                          # width 64: heads unknown
    assert "num_heads" in one_line_error(e, tmp_path / "tiny.pt")
    with pytest.raises(FileNotFoundError) as e:
        rae.load_rae_decoder(tmp_path / "missing.pt")
    one_line_error(e, tmp_path / "missing.pt")
    (tmp_path / "trunc.pt").write_bytes((tmp_path / "tiny.pt").read_bytes()[:1000])
    with pytest.raises(ValueError) as e:
        rae.load_rae_decoder(tmp_path / "trunc.pt", num_heads=2)
    one_line_error(e, tmp_path / "trunc.pt")
    torch.save(official_state_dict(dim=64, depth=1, grid=4), tmp_path / "dinov2.pth")
    with pytest.raises(ValueError) as e:
        rae.load_rae_decoder(tmp_path / "dinov2.pth", num_heads=2)
    assert "DINOv2" in one_line_error(e, tmp_path / "dinov2.pth")
    torch.save({"model": rae_decoder_state_dict(), "ema": rae_decoder_state_dict()}, tmp_path / "train.pt")
    with pytest.raises(ValueError) as e:
        rae.load_rae_decoder(tmp_path / "train.pt", num_heads=2)
    assert "training checkpoint" in one_line_error(e, tmp_path / "train.pt")
    bad = rae_decoder_state_dict()
    bad["decoder_pred.weight"] = bad["decoder_pred.weight"][:-1]                # 47 outputs: not p * p * 3
    torch.save(bad, tmp_path / "pred.pt")
    with pytest.raises(ValueError) as e:
        rae.load_rae_decoder(tmp_path / "pred.pt", num_heads=2)
    assert "decoder_pred" in one_line_error(e, tmp_path / "pred.pt")


# -----------------------------------------------------------------------------
# RAE: resize, statistics, noise, normalization

@pytest.fixture(scope="module")
def tiny_rae(tmp_path_factory):
    """DINOv2 (width 64, real 37x37 grid, registers) + decoder for 256 px (16x16 tokens of patch 16)."""
    tmp = tmp_path_factory.mktemp("rae")
    torch.save(official_state_dict(dim=64, depth=1, registers=4, seed=5), tmp / "dinov2.pth")
    enc = rae.load_dinov2(tmp / "dinov2.pth")
    torch.manual_seed(0)
    dec = rae.RAEDecoder(in_dim=64, hidden=64, depth=1, num_heads=2, mlp_dim=128, patch_size=16, num_patches=256)
    return rae.RAE(enc, dec, image_size=256)


def test_encode_decode_shapes_and_resize_256_to_224(tiny_rae):
    m = tiny_rae
    assert m.encoder_size == 224
    x = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        z_raw = m.encode_raw(x)
        z = m.encode(x)
        out = m.decode(z)
        # The resize is bicubic, align_corners=False, without antialias (RAE): built here from its weights.
        Wr = cubic_matrix(256, 224, 256 / 224).float()
        x224 = Wr @ x @ Wr.T
        expected = m.encoder((x224 - MEAN) / STD)
    assert z_raw.shape == z.shape == (2, 256, 64) and out.shape == (2, 3, 256, 256)
    assert rel_err(z_raw, expected) < 1e-4
    with pytest.raises(ValueError):
        m.encode(torch.rand(1, 3, 224, 224))


def test_decoder_patch_size_comes_from_the_decoder(tmp_path):
    """A decoder with 8 px patches (not RAE's 16): 128 px images are 16x16 tokens, the encoder sees 16 * 14 = 224."""
    torch.save(official_state_dict(dim=64, depth=1, registers=4, seed=5), tmp_path / "dinov2.pth")
    sd = rae_decoder_state_dict(in_dim=64, hidden=64, depth=1, mlp=128, patch=8, grid=16)
    torch.save(sd, tmp_path / "model.pt")
    dec = rae.load_rae_decoder(tmp_path / "model.pt", num_heads=2)
    assert (dec.patch_size, dec.num_patches, dec.grid) == (8, 256, 16)
    m = rae.RAE(rae.load_dinov2(tmp_path / "dinov2.pth"), dec, image_size=128)
    assert m.encoder_size == 224
    with torch.no_grad():
        z = m.encode(torch.rand(1, 3, 128, 128))
        out = m.decode(z)
    assert z.shape == (1, 256, 64) and out.shape == (1, 3, 128, 128)
    assert rel_err((out - MEAN) / STD, reference_decoder(sd, m.denormalize(z), heads=2)) < 1e-4
    with pytest.raises(ValueError, match="decoder reads 256 tokens"):
        rae.RAE(m.encoder, dec, image_size=256)


def test_stat_pt_layouts(tiny_rae, tmp_path):
    """stat.pt with a mean (C,), (C,1,1), (C,H,W), and without one (missing or None: RAE's DINOv2-B release holds only
    var (768, 16, 16)), against RAE's own normalization in (B, C, H, W) with a zero mean where there is none."""
    m = tiny_rae
    C, Hs = 64, 16
    g = torch.Generator().manual_seed(0)
    z_raw = torch.randn(2, Hs * Hs, C, generator=g)
    mean_chw, var_chw = torch.randn(C, Hs, Hs, generator=g), torch.rand(C, Hs, Hs, generator=g) + 0.5
    zero = torch.zeros(C, 1, 1)
    layouts = [({"mean": mean_chw[:, 0, 0], "var": var_chw[:, 0, 0]}, mean_chw[:, :1, :1], var_chw[:, :1, :1]),
               ({"mean": mean_chw[:, :1, :1], "var": var_chw[:, :1, :1]}, mean_chw[:, :1, :1], var_chw[:, :1, :1]),
               ({"mean": mean_chw, "var": var_chw}, mean_chw, var_chw),
               ({"var": var_chw}, zero, var_chw),
               ({"mean": None, "var": var_chw}, zero, var_chw),
               ({"var": var_chw[:, 0, 0]}, zero, var_chw[:, :1, :1]),
               ({"var": torch.full((C,), 1e-5)}, zero, torch.full((C, 1, 1), 1e-5))]   # here eq. 1's eps matters
    for stats, mean, var in layouts:
        torch.save(stats, tmp_path / "stat.pt")
        m.load_stats(tmp_path / "stat.pt")
        # RAE normalizes in (B, C, H, W): tokens -> transpose -> view(b, c, h, w), row-major.
        z2d = z_raw.transpose(1, 2).reshape(2, C, Hs, Hs)
        expected = ((z2d - mean) / torch.sqrt(var + 1e-5)).reshape(2, C, Hs * Hs).transpose(1, 2)
        assert torch.allclose(m.normalize(z_raw), expected, atol=1e-5), list(stats)
        assert torch.allclose(m.denormalize(expected), z_raw, atol=1e-5)
        if stats.get("mean") is None:
            assert not m.mean.any()
        if stats["var"].dim() == 3 and stats["var"].shape[1] > 1:     # per position: token 5*16+3 is (row 5, col 3)
            assert m.var.shape == (256, 64) and m.var[5 * 16 + 3, 7] == var_chw[7, 5, 3]
            if stats.get("mean") is not None:
                assert m.mean.shape == (256, 64) and m.mean[5 * 16 + 3, 7] == mean_chw[7, 5, 3]
    torch.save({"mean": torch.zeros(C, 8, 8), "var": torch.ones(C, 8, 8)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError) as e:
        m.load_stats(tmp_path / "bad.pt")
    one_line_error(e, tmp_path / "bad.pt")
    for name, bad in (("novar", {"mean": torch.zeros(C)}), ("varnone", {"mean": torch.zeros(C), "var": None}),
                      ("meanlist", {"mean": [0.0] * C, "var": torch.ones(C)}), ("tensor", torch.ones(C))):
        torch.save(bad, tmp_path / f"{name}.pt")
        with pytest.raises(ValueError) as e:
            m.load_stats(tmp_path / f"{name}.pt")
        assert "'var' (and optionally 'mean')" in one_line_error(e, tmp_path / f"{name}.pt")
    with pytest.raises(FileNotFoundError) as e:
        m.load_stats(tmp_path / "none.pt")
    one_line_error(e, tmp_path / "none.pt")


def test_channel_stats_and_normalize_roundtrip(tiny_rae):
    """The paper's channel-wise statistics (common.channel_stats over E(x)) set on the RAE, then eq. 1."""
    m = tiny_rae
    batches = [torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    m.set_stats(*common.channel_stats(batches, m.encode_raw, "cpu"))
    mean, var = m.mean, m.var
    with torch.no_grad():
        raw = torch.cat([m.encode_raw(b) for b in batches]).reshape(-1, 64).double()
        assert mean.shape == var.shape == (64,)
        assert torch.allclose(mean.double(), raw.mean(0), atol=1e-5)
        assert torch.allclose(var.double(), raw.var(0, unbiased=False), rtol=1e-4, atol=1e-7)
        z = m.normalize(raw.float().reshape(4, 256, 64))
        assert torch.allclose(z, (raw.float().reshape(4, 256, 64) - mean) / torch.sqrt(var + 1e-5))   # eq. 1
        assert torch.allclose(z.reshape(-1, 64).var(0, unbiased=False).double(), var.double() / (var.double() + 1e-5),
                              rtol=1e-3)
        assert torch.allclose(m.denormalize(z), raw.float().reshape(4, 256, 64), atol=1e-5)
        assert torch.allclose(m.encode(batches[0]), m.normalize(m.encode_raw(batches[0])))
    with pytest.raises(ValueError):
        m.set_stats(torch.zeros(63), torch.ones(63))


def test_encoder_noise_constant_and_per_example(tiny_rae):
    """Eq. 8: one sigma for every example; eq. 7 / RAE: sigma_i ~ U(0, sigma) per example. The noise goes on E(x)
    before eq. 1, so denormalizing the noisy latent gives back exactly clean + eps."""
    m = tiny_rae
    m.set_stats(torch.randn(64), torch.rand(64) + 0.5)
    x = torch.rand(8, 3, 256, 256)
    with torch.no_grad():
        clean = m.encode_raw(x)
        noise = {}
        for per_example in (False, True):
            gen = common.step_generator(0, 0, 0, "cpu")
            mode = "per-example" if per_example else "constant"
            eps = common.encoder_noise(gen, 8, tuple(clean.shape[1:]), 0, 1, "cpu", 0.4, mode)
            noise[per_example] = m.denormalize(m.normalize(clean + eps)) - clean
            assert torch.allclose(noise[per_example], eps, atol=1e-5)
        assert torch.equal(m.encode(x), m.normalize(clean))
    const, per = noise[False], noise[True]
    s_const, s_per = const.std(dim=(1, 2)), per.std(dim=(1, 2))
    assert (s_const - 0.4).abs().max() < 0.02
    assert (s_per < 0.42).all() and s_per.max() / s_per.min() > 1.5
    assert const.mean().abs() < 0.01


def test_decode_undoes_imagenet_normalization(tiny_rae):
    m = tiny_rae
    m.set_stats(torch.randn(64), torch.rand(64) + 0.5)
    dec = m.decoder
    saved = (dec.decoder_pred.weight.clone(), dec.decoder_pred.bias.clone())
    try:
        with torch.no_grad():
            dec.decoder_pred.weight.zero_()
            dec.decoder_pred.bias.copy_(torch.tensor([1.0, -2.0, 0.5]).repeat(256))   # (p, p, 3): channel last
            out = m.decode(torch.randn(2, 256, 64))
        expected = torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1) * STD + MEAN
        assert torch.allclose(out, expected.expand(2, 3, 256, 256), atol=1e-6)
    finally:
        with torch.no_grad():
            dec.decoder_pred.weight.copy_(saved[0])
            dec.decoder_pred.bias.copy_(saved[1])
