"""train_src.py, train_flow.py and common.py at toy scale: one step lowers each stage's loss,
LPIPS / discriminator / augmentation against independent computations, the sampler and the
schedules, resume == uninterrupted, 2 processes (torchrun, gloo) == 1 process, norm2
normalises the compact features, the other compressors (linear, identity, PCA = an SVD) feed
stage 2 through their checkpoints, one-line data errors and the NaN stop."""

import argparse
import inspect
import json
import math
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import common
import losses
import train_flow
import train_src
from src import COMPRESSORS, Stage1, load_stage1
from tarflow import load_flow, nll_per_dim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLORS = [(220, 40, 40), (40, 200, 60)]
TINY_DECODER = ["--train-decoder", "--decoder-width", "64", "--decoder-depth", "1", "--decoder-heads", "1",
                "--decoder-mlp", "128"]
TINY_DISC = ["--disc", "patch", "--disc-width", 8]


def run(script, args, nproc=1, check=True):
    pre = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(pre + [script] + [str(a) for a in args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    if check and res.returncode != 0:
        raise AssertionError(f"{script} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    return res


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def max_diff(a, b):
    return max((torch.as_tensor(a[k]).double() - torch.as_tensor(b[k]).double()).abs().max().item()
               for k in a)


def assert_equal_states(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), k


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """2 classes x 6 images of assorted sizes (the ADM crop must cope) and a tiny random DINOv2."""
    import rae
    tmp = tmp_path_factory.mktemp("toy")
    rng = np.random.default_rng(0)
    for k, color in enumerate(COLORS):
        os.makedirs(tmp / "data" / f"class{k}")
        for i in range(6):
            h, w = [(40, 48), (64, 36), (32, 32)][i % 3]
            img = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
            img[h // 4:h // 2, w // 4:3 * w // 4] = color
            Image.fromarray(img).save(tmp / "data" / f"class{k}" / f"{i}.png")
    torch.manual_seed(0)
    torch.save(rae.DINOv2(embed_dim=64, depth=1, num_heads=1, num_registers=4, pos_grid=2).state_dict(),
               tmp / "dinov2.pth")
    return tmp


def src_args(toy, out, extra=(), decoder=TINY_DECODER, kind="src", d=8, disc=TINY_DISC):
    return ["--data", toy / "data", "--out", out, "--encoder", toy / "dinov2.pth", *decoder,
            "--image-size", 32, *compressor_flags(kind, d), "--perceptual-weight", 0, *disc, "--disc-start", 1,
            "--disc-upd-start", 0, "--epochs", 2, "--batch-size", 4, "--num-workers", 0, "--grid-every", 3,
            "--log-every", 1, "--device", "cpu", *extra]


def compressor_flags(kind, d):
    """--compressor kind with the toy sizes its constructor takes: --src-dim d, --src-depth 1 (train_src.py
    refuses a flag whose argument the kind lacks: identity has no d, linear no depth)."""
    params = inspect.signature(COMPRESSORS[kind]).parameters
    flags = ["--compressor", kind]
    if "d" in params:
        flags += ["--src-dim", d]
    if "depth" in params:
        flags += ["--src-depth", 1]
    return flags


def flow_args(toy, stage1, out, extra=()):
    return ["--data", toy / "data", "--stage1", stage1, "--out", out, "--model", "tiny", "--epochs", 3,
            "--batch-size", 4, "--num-workers", 0, "--grid-every", 5, "--log-every", 1, "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def stage1(toy):
    """One uninterrupted single-process stage-1 run (GAN on from epoch 1, D updates from epoch 0)."""
    run("train_src.py", src_args(toy, toy / "s1"))
    return toy / "s1" / "checkpoint.pt"


@pytest.fixture(scope="module")
def stage2(toy, stage1):
    run("train_flow.py", flow_args(toy, stage1, toy / "s2"))
    return toy / "s2" / "checkpoint.pt"


# -----------------------------------------------------------------------------
# One optimisation step lowers each stage's loss on a fixed batch

def tiny_rae():
    import rae
    torch.manual_seed(0)
    enc = rae.DINOv2(embed_dim=64, depth=1, num_heads=1, num_registers=4, pos_grid=2).eval().requires_grad_(False)
    dec = rae.RAEDecoder(in_dim=64, hidden=64, depth=1, num_heads=1, mlp_dim=128, patch_size=16, num_patches=4)
    model = rae.RAE(enc, dec, image_size=32)
    model.requires_grad_(False)
    return model


def test_one_src_step_lowers_the_loss_on_a_fixed_batch():
    from src import SRC
    model = tiny_rae()
    C = SRC(n=64, d=8, depth=1)
    lpips = losses.LPIPS()
    for lin in lpips.lins:  # LPIPS heads are non-negative
        lin.weight.data.abs_()
    lpips.requires_grad_(False)
    x = torch.rand(4, 3, 32, 32)
    z_raw = model.encode_raw(x)
    sigma = torch.rand(4) * 0.8
    z_noisy = z_raw + sigma.view(-1, 1, 1) * torch.randn_like(z_raw)   # eq. 7: noise on E(x)
    net = Stage1(model, C)                                              # its forward is eq. 7
    opt = torch.optim.AdamW(C.parameters(), lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0)

    def loss():
        return losses.generator_loss(net(z_noisy), x, lpips, 1.0)[0]
    before = loss()
    opt.zero_grad()
    before.backward()
    opt.step()
    after = loss().item()
    assert after < before.item() - 1e-4, (before.item(), after)


def test_one_flow_step_lowers_the_loss_on_a_fixed_batch():
    from tarflow import SIZES, TARFlow
    torch.manual_seed(0)
    flow = TARFlow(in_channels=8, num_tokens=4, num_classes=2, **SIZES["tiny"])
    zc = torch.randn(6, 4, 8) * torch.linspace(0.3, 2.0, 8) + 0.5
    y = torch.tensor([0, 1, 2, 0, 1, 2])            # 2 = null label
    opt = torch.optim.AdamW(flow.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)
    before = nll_per_dim(*flow(zc, y)).mean()
    # eq. 9 per dim is the exact NLL minus the Gaussian constant
    exact = -flow.log_prob(zc, y).mean().item() / 32
    assert before.item() == pytest.approx(exact - 0.5 * math.log(2 * math.pi), abs=1e-5)
    opt.zero_grad()
    before.backward()
    torch.nn.utils.clip_grad_norm_(flow.parameters(), 1.0)
    opt.step()
    after = nll_per_dim(*flow(zc, y)).mean().item()
    assert after < before.item() - 1e-4, (before.item(), after)


# -----------------------------------------------------------------------------
# Loss components against independent computations

def test_lpips_matches_an_independent_vgg16_computation(tmp_path):
    torch.manual_seed(0)
    feats = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])  # torchvision's vgg16().features
    torch.save({f"features.{k}": v for k, v in feats.state_dict().items()}, tmp_path / "vgg16.pth")
    chans = (64, 128, 256, 512, 512)
    lins = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(chans)}
    torch.save(lins, tmp_path / "lin.pth")
    lp = losses.load_lpips(str(tmp_path / "vgg16.pth"), str(tmp_path / "lin.pth"))
    a, b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1

    def reference(a, b):  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 = outputs of features[3, 8, 15, 22, 29]
        shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
        scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
        ha, hb, total, k = (a - shift) / scale, (b - shift) / scale, 0, 0
        for i, layer in enumerate(feats):
            ha, hb = layer(ha), layer(hb)
            if i in (3, 8, 15, 22, 29):
                na = ha / (ha.norm(dim=1, keepdim=True) + 1e-10)
                nb = hb / (hb.norm(dim=1, keepdim=True) + 1e-10)
                total = total + ((na - nb) ** 2 * lins[f"lin{k}.model.1.weight"]).sum(1).mean((1, 2))
                k += 1
        return total

    with torch.no_grad():
        assert torch.allclose(lp(a, b), reference(a, b), rtol=1e-4, atol=1e-6)
        assert lp(a, a).abs().max() < 1e-6
    with pytest.raises(ValueError, match="lin.pth: expected torchvision VGG16"):
        losses.load_lpips(str(tmp_path / "lin.pth"), str(tmp_path / "lin.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        losses.load_lpips(str(tmp_path / "vgg16.pth"), str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="LPIPS linear heads"):
        losses.load_lpips(str(tmp_path / "vgg16.pth"), str(tmp_path / "vgg16.pth"))


def test_adaptive_weight_is_the_gradient_norm_ratio():
    w = torch.randn(5, 3, requires_grad=True)
    x = torch.randn(7, 5)
    rec, gan = (x @ w).abs().mean(), -(x @ w).sin().mean()
    g_rec, = torch.autograd.grad(rec, w, retain_graph=True)
    g_gan, = torch.autograd.grad(gan, w, retain_graph=True)
    lam = losses.adaptive_weight(rec, gan, w)
    assert lam.item() == pytest.approx((g_rec.norm() / (g_gan.norm() + 1e-6)).item(), rel=1e-6)


def test_diff_augment_identity_and_translation():
    x = torch.rand(2, 3, 16, 16)
    neutral = torch.full((2, 5), 0.5)          # no shift, brightness +0, saturation x1, contrast x1
    assert torch.allclose(losses.diff_augment(x, neutral), x, atol=1e-6)
    draws = neutral.clone()
    draws[0, 0] = 0.99                         # max downward read offset: +2 rows (16 * 1/8 = 2)
    out = losses.diff_augment(x, draws)
    expect = torch.zeros_like(x[0])
    expect[:, :14] = x[0, :, 2:]               # output row i reads input row i + 2, zero beyond the edge
    assert torch.allclose(out[0], expect, atol=1e-6)
    assert torch.allclose(out[1], x[1], atol=1e-6)


def test_dino_discriminator_reads_the_official_dino_layout(tmp_path, toy):
    import rae
    torch.manual_seed(0)
    dim, depth, patch, grid = 64, 3, 8, 2
    sd = {"cls_token": torch.randn(1, 1, dim), "pos_embed": torch.randn(1, 1 + grid * grid, dim),
          "patch_embed.proj.weight": torch.randn(dim, 3, patch, patch) * 0.05,
          "patch_embed.proj.bias": torch.zeros(dim), "norm.weight": torch.ones(dim), "norm.bias": torch.zeros(dim)}
    for i in range(depth):
        sd.update({f"blocks.{i}.{k}": v for k, v in rae.Block(dim, 1).state_dict().items()})
    torch.save(sd, tmp_path / "dino.pth")
    disc = losses.DINODiscriminator(losses.load_dino_backbone(str(tmp_path / "dino.pth")))
    logits = disc(torch.rand(3, 3, 32, 32) * 2 - 1)
    assert logits.shape == (3, grid * grid * 2)     # tokens x heads (taps 2 (< depth 3) + the output)
    logits.mean().backward()
    heads = [p for p in disc.parameters() if p.requires_grad]
    assert heads and all(p.grad is not None for p in heads)
    assert all(p.grad is None and not p.requires_grad for p in disc.backbone.parameters())  # frozen
    state = disc.state_dict()
    assert state and not any(k.startswith("backbone") for k in state)   # heads only
    disc.load_state_dict(state)                                         # ... and they load strictly
    with pytest.raises(ValueError, match="DINO \\(v1\\)"):   # a DINOv2 file is refused with the reason
        losses.load_dino_backbone(str(toy / "dinov2.pth"))


def test_dino_backbone_features_are_raes_with_the_tanh_gelu(tmp_path):
    """The discriminator's DINO features against plain tensor ops on the raw state dict, as RAE computes them
    (src/disc/dinodisc.py): [-1, 1] -> bilinear to 224 (here grid * patch) -> ImageNet normalisation -> patch
    embedding, class token, positions -> pre-LN blocks whose MLP uses GELU(approximate='tanh'); tokens at the output
    and after the tapped blocks, final norm unused. The exact GELU (DINO's own) misses by far more than the tolerance;
    RAE's zeroing of the qkv key bias on load changes nothing (a constant per query under the softmax)."""
    from test_src import reference_block
    torch.manual_seed(0)
    dim, depth, patch, grid = 64, 4, 8, 3
    sd = {"cls_token": torch.randn(1, 1, dim), "pos_embed": torch.randn(1, 1 + grid * grid, dim),
          "patch_embed.proj.weight": torch.randn(dim, 3, patch, patch) * 0.1,
          "patch_embed.proj.bias": torch.randn(dim) * 0.1, "norm.weight": torch.randn(dim),
          "norm.bias": torch.randn(dim)}
    for i in range(depth):
        for k, v in losses.Block(dim, 1).state_dict().items():
            scale = 0.3 if "fc1" in k else 0.02                          # large MLP inputs: the GELUs differ there
            sd[f"blocks.{i}.{k}"] = v + scale * torch.randn(v.shape)
    torch.save(sd, tmp_path / "dino.pth")
    backbone = losses.load_dino_backbone(str(tmp_path / "dino.pth"))
    assert all(block.gelu == "tanh" for block in backbone.blocks) and backbone.taps == [2]
    x = torch.rand(2, 3, 40, 40) * 2 - 1

    def reference(tanh_gelu, zero_key_bias=False):     # in float64
        sd64 = {k: v.double() for k, v in sd.items()}
        for i in range(depth * zero_key_bias):          # as RAE's loader does: the softmax ignores it
            sd64[f"blocks.{i}.attn.qkv.bias"][dim:2 * dim] = 0
        h = torch.nn.functional.interpolate(x.double(), (grid * patch,) * 2, mode="bilinear", align_corners=False)
        mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
        h = ((h + 1) / 2 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
        h = torch.nn.functional.conv2d(h, sd64["patch_embed.proj.weight"], sd64["patch_embed.proj.bias"], stride=patch)
        h = torch.cat([sd64["cls_token"].expand(2, -1, -1), h.flatten(2).transpose(1, 2)], 1) + sd64["pos_embed"]
        taps = []
        for i in range(depth):
            h = reference_block(h, sd64, f"blocks.{i}.", 1, tanh_gelu=tanh_gelu)
            if i == 2:
                taps.append(h[:, 1:].transpose(1, 2))
        return [h[:, 1:].transpose(1, 2)] + taps

    with torch.no_grad():
        feats = backbone(x)
    for tanh_gelu in (True, False):
        errors = [((f - r).abs().max() / r.abs().max()).item() for f, r in zip(feats, reference(tanh_gelu))]
        assert len(errors) == 2
        if tanh_gelu:
            assert max(errors) < 1e-5, errors             # relative to the largest feature
        else:
            assert min(errors) > 5e-5, errors             # the exact GELU would fail this test
    for a, b in zip(reference(True), reference(True, zero_key_bias=True)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# -----------------------------------------------------------------------------
# common.py: schedules, sampler, data

def test_learning_rate_schedules_closed_form():
    f = lambda step, warmup, *rest: common.lr_schedule(step, warmup, warmup, *rest)   # stage 1: no plateau
    assert f(0, 10, 110, 2e-4, 2e-5) == pytest.approx(2e-5)          # (step + 1) / warmup * base
    assert f(9, 10, 110, 2e-4, 2e-5) == pytest.approx(2e-4)
    assert f(60, 10, 110, 2e-4, 2e-5) == pytest.approx(1.1e-4)        # half-way: (base + final) / 2
    assert f(110, 10, 110, 2e-4, 2e-5) == pytest.approx(2e-5)
    g = lambda step, *rest: common.lr_schedule(step, 0, *rest)                        # flow: no warm-up
    assert g(0, 50, 100, 1e-4, 1e-6) == g(49, 50, 100, 1e-4, 1e-6) == 1e-4
    assert g(75, 50, 100, 1e-4, 1e-6) == pytest.approx((1e-4 + 1e-6) / 2)
    assert g(100, 50, 100, 1e-4, 1e-6) == pytest.approx(1e-6)


def test_sampler_ranks_split_each_global_batch_and_resume_mid_epoch():
    one = common.EpochSampler(23, 6, seed=3)
    one.set_epoch(2)
    order = list(one)
    assert len(order) == 18 and len(set(order)) == 18               # whole global batches only
    for world in (2, 3):
        parts = []
        for r in range(world):
            s = common.EpochSampler(23, 6, r, world, seed=3)
            s.set_epoch(2)
            parts.append(list(s))
        for k in range(3):                                          # k-th local batches = k-th global batch
            local = [i for p in parts for i in p[k * 6 // world:(k + 1) * 6 // world]]
            assert sorted(local) == sorted(order[k * 6:(k + 1) * 6])
    one.set_epoch(2, start_step=2)
    assert list(one) == order[12:]
    one.set_epoch(3)
    assert list(one) != order
    # keys: (index, epoch)
    assert [i for i, _ in list(one)] != [i for i, _ in order] and {e for _, e in list(one)} == {3}


def window_offset(crop, ref):
    """The one (top, left) at which crop (S, S, 3) is a window of ref (H, W, 3), unflipped; else an AssertionError."""
    S, (H, W) = crop.shape[0], ref.shape[:2]
    first = np.argwhere((ref[:H - S + 1, :W - S + 1] == crop[0, 0]).all(-1))      # candidates: the corner pixel
    found = [tuple(int(v) for v in p) for p in first if (ref[p[0]:p[0] + S, p[1]:p[1] + S] == crop).all()]
    assert len(found) == 1, found
    return found[0]


def test_stage1_crop_is_raes_resize_then_uniform_random_crop(tmp_path):
    """--crop random is RAE's stage-1 transform: torchvision's Resize(1.5 S, bicubic) on the short side (384 for
    S = 256), then RandomCrop(S) with no flip. Each crop is found, unflipped, in torchvision's resize of the image; its
    offsets over 2,000 epochs are uniform over every valid value (chi-square, fixed seeds: not flaky). An index
    without an epoch (the statistics passes) is ADM's centre crop."""
    from scipy import stats
    from torchvision.transforms import InterpolationMode, Resize
    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / "a")
    Image.fromarray(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)).save(tmp_path / "a" / "0.png")
    Image.fromarray(rng.integers(0, 256, (64, 40, 3), dtype=np.uint8)).save(tmp_path / "a" / "1.png")
    big = common.ImageFolder(str(tmp_path), 256, crop="random", seed=1)
    ref = np.asarray(Resize(384, InterpolationMode.BICUBIC)(Image.open(tmp_path / "a" / "0.png")))
    assert ref.shape == (384, 640, 3)                                   # the short side to 384
    offsets = {window_offset(big[(0, epoch)][0].permute(1, 2, 0).numpy(), ref) for epoch in range(3)}
    assert len(offsets) == 3 and all(t <= 128 and l <= 384 for t, l in offsets)
    centre = common.center_crop_arr(Image.open(tmp_path / "a" / "0.png"), 256)
    assert (big[0][0].permute(1, 2, 0).numpy() == np.asarray(centre)).all()
    small = common.ImageFolder(str(tmp_path), 32, crop="random", seed=1)   # image 1: 40 x 64 -> 48 x 76
    ref = np.asarray(Resize(48, InterpolationMode.BICUBIC)(Image.open(tmp_path / "a" / "1.png")))
    assert ref.shape == (76, 48, 3)
    tops, lefts = zip(*[window_offset(small[(1, e)][0].permute(1, 2, 0).numpy(), ref) for e in range(2000)])
    for values, count in ((tops, 76 - 32 + 1), (lefts, 48 - 32 + 1)):
        histogram = np.bincount(values, minlength=count)
        assert len(histogram) == count and histogram.min() > 0          # every valid offset, none beyond
        assert stats.chisquare(histogram).pvalue > 1e-3
    assert stats.pearsonr(tops, lefts)[1] > 1e-3                        # top and left drawn independently


def test_stage1_crops_follow_one_process_whatever_the_ranks_and_workers(toy):
    """The crop of an example depends on (seed, epoch, image) only: the ranks' local batches of a 2-process run,
    interleaved as EpochSampler deals them, are one process's global batches image for image, with or without
    loader workers, persistent ones included (the epoch travels in the sampler's keys)."""
    ds = common.ImageFolder(str(toy / "data"), 32, crop="random", seed=0)

    def epochs(rank, world, workers):
        sampler = common.EpochSampler(len(ds), 4, rank, world, seed=0)
        loader = torch.utils.data.DataLoader(ds, batch_size=4 // world, sampler=sampler, num_workers=workers,
                                             persistent_workers=workers > 0)
        out = []
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            out.append(torch.stack([images for images, _ in loader]))   # (steps, local batch, 3, 32, 32)
        return torch.stack(out)

    one = epochs(0, 1, 0)
    assert not torch.equal(one[0], one[1])                              # new crops (and order) each epoch
    two = torch.empty_like(one)
    two[:, :, 0::2] = epochs(0, 2, 2)
    two[:, :, 1::2] = epochs(1, 2, 0)
    assert torch.equal(two, one)
    assert torch.equal(epochs(0, 1, 2), one)


def test_stage1_flips_only_with_the_centre_crop():
    """RAE's stage 1 does not flip: with --crop random a step has no flips; its eq. 7 noise and DiffAug draws are
    those of --crop center (ADM's crop, flipped per global example)."""
    args = argparse.Namespace(batch_size=8, seed=0, noise_max=0.8, crop="random")
    flip, eps, aug = train_src.step_randomness(args, 3, (4, 16), 0, 1, torch.device("cpu"))
    args.crop = "center"
    flip_c, eps_c, aug_c = train_src.step_randomness(args, 3, (4, 16), 0, 1, torch.device("cpu"))
    assert flip is None and flip_c.dtype == torch.bool and 0 < flip_c.sum() < 8
    assert torch.equal(eps, eps_c) and all(torch.equal(a, b) for a, b in zip(aug, aug_c))


def test_image_folder_errors_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        common.ImageFolder(str(tmp_path / "missing"), 32)
    os.makedirs(tmp_path / "empty" / "a")
    with pytest.raises(ValueError, match="no images"):
        common.ImageFolder(str(tmp_path / "empty"), 32)
    root = tmp_path / "d"
    for k in ("b", "a"):
        os.makedirs(root / k)
        Image.fromarray(np.full((40, 50, 3), 100 if k == "a" else 200, np.uint8)).save(root / k / "x.png")
    (root / "a" / "broken.png").write_bytes(b"not an image")
    ds = common.ImageFolder(str(root), 32)
    assert ds.classes == ["a", "b"] and [l for _, l in ds.samples] == [0, 0, 1]
    with pytest.raises(ValueError, match="broken.png: unreadable image"):
        ds[0]
    img, label = ds[1]
    assert img.shape == (3, 32, 32) and img.dtype == torch.uint8 and label == 0 and (img == 100).all()
    bad = str(root / "a" / "broken.png")
    args = argparse.Namespace(data=str(root), skip_bad_images=True, num_workers=0)
    assert [p for p, _ in common.training_set(args, 32).samples] == [p for p, _ in ds.samples if p != bad]
    assert len(common.ImageFolder(str(root), 32, exclude=[bad])) == 2


def cli(module, args, capsys, stream="err"):
    """module.main through common.run_cli in this process, on one thread as run() (the same numbers, without
    an interpreter start-up): (exit status, stderr, stdout or both (stdout, stderr))."""
    code, threads = 0, torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = common.run_cli(module.main, module.build_parser().parse_args([str(a) for a in args])) or 0
    except SystemExit as e:
        code = e.code
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    return code, captured if stream == "both" else getattr(captured, stream)


def test_cli_errors_are_one_line(tmp_path, toy, stage1, capsys):
    code, err = cli(train_flow, flow_args(toy, stage1, tmp_path / "o", ["--data", tmp_path / "nothing"]), capsys)
    errors = [l for l in err.splitlines() if l.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "nothing: no such folder" in errors[0]
    code, err = cli(train_flow, flow_args(toy, stage1, tmp_path / "o", ["--sample-cfg", -1]), capsys)
    assert code == 2 and err.strip() == "error: --sample-cfg must be >= 0, got -1.0"
    data = tmp_path / "data"
    for k in ("a", "b"):
        os.makedirs(data / k)
        for i in range(3):
            Image.fromarray(np.full((32, 32, 3), 50 * i, np.uint8)).save(data / k / f"{i}.png")
    (data / "b" / "zz_broken.png").write_bytes(b"junk")
    args = flow_args(toy, stage1, tmp_path / "o2", ["--data", data, "--epochs", 1, "--batch-size", 7,
                                                    "--num-workers", 1])
    code, err = cli(train_flow, args, capsys)       # raised inside a loader worker: still one line
    errors = [l for l in err.splitlines() if l.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err
    assert "zz_broken.png: unreadable image" in errors[0]
    args = flow_args(toy, stage1, tmp_path / "o3", ["--data", data, "--epochs", 1, "--skip-bad-images",
                                                    "--grid-every", 0])
    code, err = cli(train_flow, args, capsys)
    assert code == 0 and "skipping 1 unreadable images" in err and "zz_broken.png" in err
    assert load(tmp_path / "o3" / "checkpoint.pt")["step"] == 1       # 6 readable images, one batch of 4
    code, err = cli(train_src, src_args(toy, tmp_path / "o4", ["--perceptual-weight", 1]), capsys)
    assert code == 2 and "--lpips-vgg" in err and "Traceback" not in err
    # Truncated weight files of the losses: one line naming the file, before the long statistics pass
    torch.save({f"features.{i}.weight": torch.zeros(64, 64, 3, 3) for i in range(4)}, tmp_path / "full.pth")
    cut = tmp_path / "full.pth"
    (tmp_path / "cut.pth").write_bytes(cut.read_bytes()[:len(cut.read_bytes()) // 2])
    lpips_flags = ["--perceptual-weight", 1, "--lpips-vgg", tmp_path / "cut.pth", "--lpips-lin", cut]
    for flags, disc in ((lpips_flags, TINY_DISC), (["--disc", "dino", "--disc-encoder", tmp_path / "cut.pth"], [])):
        code, (out, err) = cli(train_src, src_args(toy, tmp_path / "o5", flags, disc=disc), capsys, "both")
        errors = [l for l in err.splitlines() if l.startswith("error: ")]
        assert code == 2 and len(errors) == 1 and "cut.pth" in errors[0] and "Traceback" not in err, err
        assert "computing the RAE statistics" not in out, out


def test_every_argument_has_help_and_paper_defaults():
    for parser in (train_src.build_parser(), train_flow.build_parser()):
        for action in parser._actions:
            assert action.help, action.dest
    s = train_src.build_parser().parse_args(["--data", "d", "--out", "o", "--encoder", "e"])
    assert (s.lr, s.min_lr, s.epochs, s.batch_size, s.noise_max) == (2e-4, 2e-5, 16, 256, 0.8)
    assert (s.disc_weight, s.disc_start, s.disc_upd_start, s.perceptual_weight) == (0.75, 8, 6, 1.0)
    # --src-dim and --src-depth not given: the compressor's own defaults, the paper's d = 32, L = 4 for the SRC
    assert s.compressor == "src" and s.src_dim is None and s.src_depth is None
    with torch.device("meta"):                                              # shapes only, no memory
        C = train_src.build_compressor(s, 768)
    assert (C.d, C.depth) == (32, 4)
    # RAE's stage 1 (configs/stage1/training/DINOv2-B_decXL.yaml); the flow's is the paper's
    assert s.ema_decay == 0.9978
    assert s.crop == "random"           # RAE's stage-1 crop
    f = train_flow.build_parser().parse_args(["--data", "d", "--out", "o", "--stage1", "s"])
    assert (f.lr, f.min_lr, f.epochs, f.batch_size, f.noise_std, f.label_drop, f.grad_clip, f.ema_decay) == \
        (1e-4, 1e-6, 320, 256, 0.4, 0.1, 1.0, 0.9999)
    assert train_flow.SIZES[f.model]["channels"] == 1152 and train_flow.SIZES[f.model]["depths"] == [2] * 5 + [46]
    assert train_flow.SIZES[f.model]["channels"] // train_flow.SIZES[f.model]["head_dim"] == 16


# -----------------------------------------------------------------------------
# Whole runs: resume, 2 processes, statistics, logs, NaN

def test_stage1_resume_and_two_processes_match_one_uninterrupted_run(toy, stage1, capsys):
    code, out = cli(train_src, src_args(toy, toy / "s1r", ["--max-steps", 2]), capsys, stream="out")
    assert code == 0
    # --disc-start counts epochs (one here): a --max-steps trial that stops before it is told so
    assert re.search(r"its loss trains C from step \d+ \(not in this run\)", out), out
    mid = load(toy / "s1r" / "checkpoint.pt")
    assert mid["step"] == 2 and mid["norm2"] is not None          # a --max-steps stop writes norm2 too
    assert cli(train_src, src_args(toy, toy / "s1r", ["--resume"]), capsys)[0] == 0
    res = run("train_src.py", src_args(toy, toy / "s1p"), nproc=2)
    assert "FutureWarning" not in res.stderr, res.stderr[-2000:]  # DDP built without deprecated arguments
    a, r, p = load(stage1), load(toy / "s1r" / "checkpoint.pt"), load(toy / "s1p" / "checkpoint.pt")
    assert a["step"] == r["step"] == p["step"] == 6
    wa, wr, wp = (dict(src=c["compressor"]["state"], src_ema=c["compressor"]["state_ema"],
                       decoder=c["decoder"]["state"], decoder_ema=c["decoder"]["state_ema"],
                       discriminator=c["discriminator"]) for c in (a, r, p))
    for key in ("src", "src_ema", "decoder", "decoder_ema", "discriminator"):
        assert_equal_states(wa[key], wr[key])                     # resume == uninterrupted, bit for bit
        assert max_diff(wa[key], wp[key]) < 1e-4, key             # 2 processes == 1 (summation order only)
    assert_equal_states(a["norm2"], r["norm2"])
    assert max_diff(a["norm2"], p["norm2"]) < 1e-4
    logs = [json.loads(l) for l in open(toy / "s1" / "log.jsonl")]
    logp = [json.loads(l) for l in open(toy / "s1p" / "log.jsonl")]
    assert [l["step"] for l in logs] == list(range(1, 7))
    assert np.allclose([l["loss"] for l in logs], [l["loss"] for l in logp], atol=1e-4)
    assert logs[0]["gan_on"] is False and logs[-1]["gan_on"] is True and logs[0]["disc_loss"] > 0
    assert os.path.exists(toy / "s1" / "recon" / "0000006.png")


def test_stage1_checkpoint_and_norm2_reproduce_the_normalisation(toy, stage1):
    ckpt = load(stage1)
    assert set(ckpt) == {"stage", "args", "step", "epoch", "image_size", "num_classes", "encoder", "decoder",
                         "compressor", "rae_stats", "norm2", "optimizer", "discriminator", "disc_optimizer", "rng",
                         "world_size", "steps_per_epoch"}
    assert set(ckpt["encoder"]) == {"kind", "path", "config", "fingerprint"} and ckpt["encoder"]["kind"] == "dinov2"
    assert set(ckpt["decoder"]) == {"path", "config", "fingerprint", "state", "state_ema"}
    assert ckpt["decoder"]["path"] is None and ckpt["decoder"]["fingerprint"] is None     # D trained: states kept
    import rae
    assert ckpt["encoder"]["fingerprint"] == rae.fingerprint(rae.load_dinov2(str(toy / "dinov2.pth")))
    assert set(ckpt["compressor"]) == {"kind", "config", "state", "state_ema"} and ckpt["compressor"]["kind"] == "src"
    assert ckpt["stage"] == "src" and ckpt["num_classes"] == 2 and ckpt["image_size"] == 32
    s1 = load_stage1(str(stage1))
    rae_model, C, mean2, std2 = s1.rae, s1.C, s1.mean2, (s1.var2 + s1.eps2).sqrt()
    assert s1.eps2 == ckpt["norm2"]["eps"] == 1e-5                      # norm2 as eq. 1: sqrt(var + 1e-5)
    assert mean2.shape == std2.shape == (8,)
    ds = common.ImageFolder(str(toy / "data"), 32)
    x = torch.stack([ds[i][0] for i in range(len(ds))]).float() / 255
    with torch.no_grad():
        raw = rae_model.encode_raw(x).reshape(-1, 64).double()
        zc = C.encode(rae_model.encode(x)).reshape(-1, 8).double()
    # RAE statistics (eq. 1) computed at the start are those of the raw tokens of the training set
    assert torch.allclose(raw.mean(0).float(), rae_model.mean.reshape(-1), atol=1e-4)
    assert torch.allclose(raw.var(0, unbiased=False).float(), rae_model.var.reshape(-1), rtol=1e-3, atol=1e-5)
    # norm2 (eq. 5): the compact features of the training set come out zero-mean, unit-variance
    zn = (zc - mean2.double()) / std2.double()
    assert torch.allclose(zn.mean(0), torch.zeros(8, dtype=torch.double), atol=1e-4)
    assert torch.allclose(zn.var(0, unbiased=False), torch.ones(8, dtype=torch.double), atol=1e-3)


# -----------------------------------------------------------------------------
# Other compressors (the paper's Table 5); short stage-1 runs feed stage 2

def training_images(toy):
    ds = common.ImageFolder(str(toy / "data"), 32)
    return torch.stack([ds[i][0] for i in range(len(ds))]).float() / 255


# every kind of src.COMPRESSORS (a fork's too) but the SRC, which the stage1 and stage2 fixtures run
@pytest.mark.parametrize("kind", [kind for kind in COMPRESSORS if kind != "src"])
def test_other_compressors_train_round_trip_and_drive_stage2(toy, kind, capsys):
    """Each kind at d = 4 (identity: d = n = 64), D trained with it: one step (a --max-steps stop writes norm2),
    then save -> load_stage1 gives the pipeline rebuilt by hand, a 2-step flow runs on it and sample.py samples
    from that flow."""
    import sample
    import rae
    out, ckpt_path = toy / f"s1_{kind}", toy / f"s1_{kind}" / "checkpoint.pt"
    args = src_args(toy, out, ["--max-steps", 1, "--grid-every", 0], kind=kind, d=4)
    code, stdout = cli(train_src, args, capsys, "out")
    assert code == 0 and f"--stage1 {ckpt_path}" in stdout                  # tells what stage 2 needs
    ckpt = load(ckpt_path)
    assert ckpt["step"] == 1 and ckpt["norm2"] is not None and ckpt["compressor"]["kind"] == kind
    assert [json.loads(l)["step"] for l in open(out / "log.jsonl")] == [1]
    s1 = load_stage1(str(ckpt_path))
    d = 4 if "d" in inspect.signature(COMPRESSORS[kind]).parameters else 64     # identity: d = n
    assert s1.C.kind == kind and s1.C.d == d and s1.mean2.shape == s1.var2.shape == (d,)
    # the same pipeline rebuilt by hand from the stored states (EMA weights)
    D = rae.RAEDecoder(**ckpt["decoder"]["config"])
    D.load_state_dict(ckpt["decoder"]["state_ema"])
    R = rae.RAE(rae.load_dinov2(str(toy / "dinov2.pth")), D, image_size=32)
    R.set_stats(ckpt["rae_stats"]["mean"], ckpt["rae_stats"]["var"])
    C = COMPRESSORS[kind](**ckpt["compressor"]["config"])
    C.load_state_dict(ckpt["compressor"]["state_ema"])
    mean2, std2 = ckpt["norm2"]["mean"], (ckpt["norm2"]["var"] + ckpt["norm2"]["eps"]).sqrt()
    x = training_images(toy)
    with torch.no_grad():
        zc = s1.encode(x)                                                    # eq. 5 / 8 without noise
        assert torch.equal(zc, (C.encode(R.normalize(R.encode_raw(x))) - mean2) / std2)
        assert torch.equal(s1.decode(zc), R.decode(C.decode(zc * std2 + mean2)))     # eq. 10
    args = flow_args(toy, ckpt_path, toy / f"s2_{kind}", ["--max-steps", 2, "--grid-every", 0])
    assert cli(train_flow, args, capsys)[0] == 0
    assert load(toy / f"s2_{kind}" / "checkpoint.pt")["step"] == 2
    args = ["--ckpt", toy / f"s2_{kind}" / "checkpoint.pt", "--out", toy / f"samples_{kind}", "--num-samples", 2,
            "--device", "cpu", "--no-progress"]
    assert cli(sample, args, capsys)[0] == 0
    assert np.load(toy / f"samples_{kind}" / "samples.npz")["arr_0"].shape == (2, 32, 32, 3)


def test_pca_compressor_is_the_svd_of_the_training_features(toy, tmp_path, capsys):
    import rae
    torch.manual_seed(1)   # a released-style decoder file: RAE's width 768 gives its head count (12)
    dec = rae.RAEDecoder(in_dim=64, hidden=768, depth=1, num_heads=12, mlp_dim=128, patch_size=16, num_patches=4)
    torch.save(dec.state_dict(), tmp_path / "model.pt")
    out = tmp_path / "s1_pca"
    args = src_args(toy, out, ["--perceptual-weight", 1], ["--decoder", tmp_path / "model.pt"], kind="pca")
    code, stdout = cli(train_src, args, capsys, "out")
    assert code == 0 and "nothing to train" in stdout                  # C and D frozen: no loop, no LPIPS needed
    ckpt = load(out / "checkpoint.pt")
    assert ckpt["step"] == 0 and ckpt["decoder"]["state"] is None and ckpt["norm2"] is not None
    assert os.path.samefile(ckpt["decoder"]["path"], tmp_path / "model.pt")
    s1 = load_stage1(str(out / "checkpoint.pt"))
    with torch.no_grad():
        z = s1.rae.normalize(s1.rae.encode_raw(training_images(toy))).reshape(-1, 64)
        recon = s1.C.decode(s1.C.encode(z[None]))[0].double()
    # an independent float64 SVD of the same tokens: the projection onto the top d = 8 principal directions
    z = z.double()
    mean = z.mean(0)
    v = torch.linalg.svd(z - mean, full_matrices=False)[2][:8].T
    assert torch.allclose(recon, mean + (z - mean) @ v @ v.T, atol=1e-4)


def test_flow_resume_and_two_processes_match_one_uninterrupted_run(toy, stage1, stage2, capsys):
    assert cli(train_flow, flow_args(toy, stage1, toy / "s2r", ["--max-steps", 4]), capsys)[0] == 0
    assert load(toy / "s2r" / "checkpoint.pt")["step"] == 4
    assert cli(train_flow, flow_args(toy, stage1, toy / "s2r", ["--resume"]), capsys)[0] == 0
    run("train_flow.py", flow_args(toy, stage1, toy / "s2p"), nproc=2)
    a, r, p = load(stage2), load(toy / "s2r" / "checkpoint.pt"), load(toy / "s2p" / "checkpoint.pt")
    assert a["step"] == r["step"] == p["step"] == 9
    for key in ("flow", "flow_ema"):
        assert_equal_states(a[key], r[key])
        assert max_diff(a[key], p[key]) < 1e-4, key
    assert_equal_states(a["optimizer"]["state"][0], r["optimizer"]["state"][0])
    for key in ("stage", "args", "step", "epoch", "flow", "flow_ema", "flow_kind", "flow_config", "stage1",
                "noise_std", "num_classes", "image_size", "optimizer", "rng"):
        assert key in a, key
    flow, cfg = load_flow(str(stage2))
    assert cfg["noise_std"] == 0.4 and cfg["num_classes"] == 2 and cfg["image_size"] == 32
    assert os.path.samefile(cfg["stage1"], stage1)
    logs = [json.loads(l) for l in open(toy / "s2" / "log.jsonl")]
    for l in logs:
        assert l["bpd"] == pytest.approx((l["loss"] + 0.5 * math.log(2 * math.pi)) / math.log(2))
        assert {"lr", "grad_norm", "images_per_s"} <= l.keys()
    assert logs[0]["lr"] == 1e-4 and logs[-1]["lr"] < logs[4]["lr"]      # constant, then cosine from epoch 1.5
    assert os.path.exists(toy / "s2" / "samples" / "0000005.png")


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(toy, stage1, capsys):
    out = toy / "s2nan"
    assert cli(train_flow, flow_args(toy, stage1, out, ["--max-steps", 2, "--grid-every", 0]), capsys)[0] == 0
    code, err = cli(train_flow, flow_args(toy, stage1, out, ["--resume", "--lr", 1e30, "--grid-every", 0]), capsys)
    assert code == 3, err[-2000:]
    msg = [l for l in err.splitlines() if "non-finite" in l]
    assert msg and "at step " in msg[0]
    bad_step = int(msg[0].split("at step ")[1].split()[0])
    ckpt = load(out / "checkpoint.pt")
    assert ckpt["step"] < bad_step and f"(step {ckpt['step']})" in msg[0]
    assert all(torch.isfinite(v).all() for v in ckpt["flow"].values())


def test_per_example_noise_distribution_is_fixed_per_global_example():
    """--noise-mode per-example: sigma_i ~ U(0, sigma_flow) per image, then eps_i = sigma_i * N(0, I); drawn for the
    global batch from the step's generator, so the ranks' rows together are exactly one process's draw."""
    from scipy import stats
    B, shape, mode = 400, (16, 32), "per-example"
    full = common.encoder_noise(common.step_generator(3, 7, 0, "cpu"), B, shape, 0, 1, "cpu", 0.4, mode)
    for world in (2, 4):
        parts = [common.encoder_noise(common.step_generator(3, 7, 0, "cpu"), B, shape, r, world, "cpu", 0.4, mode)
                 for r in range(world)]
        for r, part in enumerate(parts):
            assert torch.equal(part, full[r::world])
    # each image's std estimates its sigma: uniform on (0, 0.4) (Kolmogorov-Smirnov), zero mean, Gaussian shape
    sigma = full.std(dim=(1, 2)).double().numpy()
    assert stats.kstest(sigma / 0.4, "uniform").pvalue > 1e-3
    z = (full / full.std(dim=(1, 2), keepdim=True)).flatten().numpy()
    assert abs(z.mean()) < 0.01 and stats.kstest(z[:20000], "norm").pvalue > 1e-3
    const = common.encoder_noise(common.step_generator(3, 7, 0, "cpu"), B, shape, 0, 1, "cpu", 0.4, "constant")
    assert (const.std(dim=(1, 2)) - 0.4).abs().max() < 0.05


def test_default_loader_workers_fit_the_machine(monkeypatch):
    """--num-workers defaults to min(8, cores per rank): never more processes than the machine has."""
    cores = len(os.sched_getaffinity(0))
    for local_world in (1, 2, 64):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
        for module, needed in ((train_src, ["--encoder", "e"]), (train_flow, ["--stage1", "s"])):
            args = module.build_parser().parse_args(["--data", "d", "--out", "o"] + needed)
            assert args.num_workers == min(8, cores // local_world)


# -----------------------------------------------------------------------------
# An error on one rank ends the whole torchrun job at once

INJECT = """
import os, sys
sys.path.insert(0, {root!r})
import common, fid, {module}
owner = {owner}
real = getattr(owner, {name!r})

def fail(*args, **kwargs):
    if os.environ["RANK"] == "1":
        raise common.UserError("injected failure on rank 1")
    return real(*args, **kwargs)

setattr(owner, {name!r}, fail)
argv = {argv!r}
common.run_cli({module}.main, {module}.build_parser().parse_args(argv))
"""


@pytest.mark.parametrize("script", ["train_src", "train_flow", "evaluate", "fid"])
def test_an_error_on_one_rank_ends_the_job_within_seconds(toy, stage1, stage2, script, tmp_path):
    """Rank 1 raises while rank 0 goes on into a collective (DDP's gradient all-reduce, the sweep's feature
    gather, fid's failure check): the job must end with rank 1's one-line error, not wait in a barrier."""
    import fid
    weights = tmp_path / "inception.pth"
    torch.save(fid.InceptionV3().state_dict(), weights)
    sweep = ["--ckpt", stage2, "--out", tmp_path / "sweep", "--num-samples", 4, "--batch-size", 2, "--cfg-sweep",
             "1,2", "--ref", toy / "data", "--fid-weights", weights, "--no-png", "--no-progress", "--device", "cpu"]
    cases = {  # where rank 1 fails: (object, attribute), arguments
        "train_src": ("common.TrainLog", "add", src_args(toy, tmp_path / "s1", ["--grid-every", 0])),
        "train_flow": ("common.TrainLog", "add", flow_args(toy, stage1, tmp_path / "s2", ["--grid-every", 0])),
        "evaluate": ("fid", "evaluate", sweep),
        "fid": ("fid.InceptionV3", "features", [toy / "data", toy / "data", "--weights", weights, "--batch-size", 2,
                                                "--image-size", 0, "--no-progress", "--device", "cpu"]),
    }
    owner, name, argv = cases[script]
    wrapper = tmp_path / "inject.py"
    wrapper.write_text(INJECT.format(root=ROOT, module=script, owner=owner, name=name,
                                     argv=[str(a) for a in argv]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(wrapper)]
    start = time.time()
    res = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                         text=True, timeout=240)
    seconds = time.time() - start
    assert res.returncode != 0, res.stderr[-2000:]
    assert "error: injected failure on rank 1" in res.stderr.splitlines(), res.stderr[-2000:]
    assert not [l for l in res.stderr.splitlines() if l.startswith("[rank")], res.stderr[-2000:]  # no traceback
    assert seconds < 90, seconds      # start-up, the runs up to the failure and torchrun's stop; no timeout wait


# -----------------------------------------------------------------------------
# --fsdp: FSDP2 sharding of the flow, its optimizer and its EMA

def test_fsdp_matches_one_process_resumes_exactly_and_samples(toy, stage1, stage2, capsys):
    """train_flow.py --fsdp with 2 processes (gloo) == 1 plain process with the same global batch,
    its --resume == an uninterrupted --fsdp run bit for bit, and sample.py reads its checkpoint
    (the EMA's full state dict with the plain layout's keys) as the same weights saved without
    FSDP. The flow and AdamW are in the shards (tests/test_ckpt.py)."""
    import sample
    from tarflow import TARFlow
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    def states(out):  # checkpoint.pt's record, its shards as one process reads them
        record = load(out / "checkpoint.pt")
        dcp_to_torch_save(out / record["shards"], out / "shards.pt")
        return dict(record, flow=load(out / "shards.pt")["flow"])

    run("train_flow.py", flow_args(toy, stage1, toy / "s2f", ["--fsdp"]), nproc=2)
    plain = load(stage2)
    fsdp = states(toy / "s2f")
    assert fsdp["step"] == plain["step"] == 9 and fsdp["args"]["fsdp"]
    for key in ("flow", "flow_ema"):
        assert {k: v.shape for k, v in fsdp[key].items()} == {k: v.shape for k, v in plain[key].items()}
        assert max_diff(plain[key], fsdp[key]) < 1e-4, key           # summation order only
    run("train_flow.py", flow_args(toy, stage1, toy / "s2fr", ["--fsdp", "--max-steps", 4]), nproc=2)
    run("train_flow.py", flow_args(toy, stage1, toy / "s2fr", ["--fsdp", "--resume"]), nproc=2)
    resumed = states(toy / "s2fr")
    for key in ("flow", "flow_ema"):
        assert_equal_states(fsdp[key], resumed[key])
    code, err = cli(train_flow, flow_args(toy, stage1, toy / "s2fr", ["--resume"]), capsys)
    assert code == 2 and "--fsdp" in err                                # no silent mode switch
    flow = TARFlow(**fsdp["flow_config"])
    flow.load_state_dict(fsdp["flow_ema"])
    torch.save(dict(fsdp, flow_ema=flow.state_dict()), toy / "s2f" / "plain.pt")
    outs = {}
    for name in ("checkpoint.pt", "plain.pt"):
        argv = ["--ckpt", toy / "s2f" / name, "--out", toy / "s2f" / name[:-3], "--num-samples", 3,
                "--cfg", 1.5, "--no-png", "--no-progress", "--device", "cpu"]
        assert common.run_cli(sample.main, sample.build_parser().parse_args([str(a) for a in argv])) is None
        outs[name] = np.load(toy / "s2f" / name[:-3] / "samples.npz")["arr_0"]
    assert (outs["checkpoint.pt"] == outs["plain.pt"]).all()
    # bf16 through the script (layers gathered in bf16, the blocks' own weights, the residual stream and the
    # gradient reduction in float32; tests/test_fsdp.py compares its numbers with autocast's)
    run("train_flow.py", flow_args(toy, stage1, toy / "s2fb", ["--fsdp", "--precision", "bf16",
                                                               "--max-steps", 2]), nproc=2)
    record = [json.loads(line) for line in open(toy / "s2fb" / "log.jsonl")][-1]
    assert math.isfinite(record["loss"]) and abs(record["loss"] - json.loads(
        open(toy / "s2" / "log.jsonl").readlines()[1])["loss"]) < 0.05


# -----------------------------------------------------------------------------
# Fork safety: --resume continues what was built, or refuses in one line; noise modes are one list

def test_flow_resume_refuses_a_changed_setting_or_build_and_defaults_a_new_flag(toy, stage1, capsys, monkeypatch):
    """--resume compares every flag but the run controls with the checkpoint's, then the rebuilt flow's config()
    (token orders included) and stage 1's fingerprint with the recorded ones: a difference is one line naming the
    key, the recorded value and the given one. A flag the record lacks (an option added since) takes its default."""
    import tarflow
    out = toy / "s2fork"
    assert cli(train_flow, flow_args(toy, stage1, out, ["--max-steps", 2, "--grid-every", 0]), capsys)[0] == 0
    code, err = cli(train_flow, flow_args(toy, stage1, out, ["--resume", "--noise-std", 0.2]), capsys)
    assert code == 2 and "--noise-std was 0.4 in that run, 0.2 now" in err and len(err.splitlines()) == 1
    code, err = cli(train_flow, flow_args(toy, stage1, out, ["--resume", "--noise-mode", "per-example"]), capsys)
    assert code == 2 and "--noise-mode was 'constant' in that run, 'per-example' now" in err

    class TARFlow(tarflow.TARFlow):  # a fork whose default token orders start reversed
        def __init__(self, in_channels, num_tokens, **kw):
            natural = list(range(num_tokens))
            orders = [natural[::-1] if k % 2 == 0 else natural for k in range(len(kw["depths"]))]
            super().__init__(in_channels, num_tokens, permutations=orders, **kw)

    with monkeypatch.context() as m:
        m.setattr(train_flow, "TARFlow", TARFlow)
        code, err = cli(train_flow, flow_args(toy, stage1, out, ["--resume", "--grid-every", 0]), capsys)
    assert code == 2 and "flow_config.permutations[0] was [0, 1, 2, 3] in that run, [3, 2, 1, 0]" in err, err

    # an option the record lacks resumes with its default; one this code lacks is refused
    ckpt = load(out / "checkpoint.pt")
    del ckpt["args"]["label_drop"]
    torch.save(ckpt, out / "checkpoint.pt")
    resumed = flow_args(toy, stage1, out, ["--resume", "--max-steps", 3, "--grid-every", 0, "--lr", 2e-4])
    code, err = cli(train_flow, resumed, capsys)
    assert code == 0 and "note: --resume with a new schedule: --lr 0.0001 -> 0.0002" in err
    assert load(out / "checkpoint.pt")["step"] == 3
    ckpt = load(out / "checkpoint.pt")
    ckpt["args"]["token_shuffle"] = True
    ckpt["stage1_fingerprint"] = "0" * 16
    torch.save(ckpt, out / "checkpoint.pt")
    code, err = cli(train_flow, flow_args(toy, stage1, out, ["--resume"]), capsys)
    assert code == 2 and "--token-shuffle True in that run is unknown to this code" in err
    del ckpt["args"]["token_shuffle"]
    torch.save(ckpt, out / "checkpoint.pt")
    code, err = cli(train_flow, flow_args(toy, stage1, out, ["--resume"]), capsys)
    assert code == 2 and "stage1 was '0000000000000000' in that run" in err


def test_a_forks_noise_mode_trains_and_scores_and_an_unknown_one_is_refused(toy, stage1, capsys, monkeypatch):
    """A noise mode added to common.NOISE_MODES is a --noise-mode choice, trains, is recorded, and invert.py's NLL
    draws it: its noisy NLL equals an independent computation with that noise. A checkpoint recording a mode this
    code does not know is refused by the NLL in one line."""
    import invert
    from tarflow import bits_per_dim

    def half_scale(gen, global_batch, rank, world, device, sigma):  # a fork's mode: sigma / 2, constant
        return torch.full((global_batch,), sigma / 2, device=device)[rank::world]

    monkeypatch.setitem(common.NOISE_MODES, "half", half_scale)
    out = toy / "s2half"
    args = flow_args(toy, stage1, out, ["--max-steps", 2, "--grid-every", 0, "--noise-mode", "half"])
    assert cli(train_flow, args, capsys)[0] == 0
    ckpt_path = out / "checkpoint.pt"
    assert load(ckpt_path)["noise_mode"] == "half"
    nll = ["--ckpt", ckpt_path, "--nll", toy / "data", "--nll-json", out / "nll.json", "--nll-draws", 2,
           "--limit", 3, "--batch-size", 2, "--no-progress", "--device", "cpu"]
    assert cli(invert, nll, capsys)[0] == 0
    res = json.load(open(out / "nll.json"))
    assert res["noise_mode"] == "half" and res["noise_std"] == 0.4
    # independent: eps = (0.4 / 2) * N(0, I) from image i's generator for draw k, through eq. 8 and eq. 2
    flow, _ = load_flow(str(ckpt_path))
    s1 = load_stage1(str(stage1))
    data = common.ImageFolder(str(toy / "data"), 32, flat=True)
    for i, row in enumerate(res["per_image"]):
        x = data[i][0][None].float() / 255
        y = torch.tensor([data[i][1]])
        bits = []
        with torch.no_grad():
            z_raw = s1.encode_raw(x)
            for k in range(2):
                gen = torch.Generator().manual_seed(common.seed_of(0, i, common.STREAM_NLL, k))
                eps = 0.2 * torch.randn(z_raw.shape, generator=gen)
                u, logdet = flow(s1.compact(z_raw, eps), y)
                bits.append(bits_per_dim(nll_per_dim(u, logdet)).item())
        assert row["noisy"] == pytest.approx(sum(bits) / 2, rel=1e-5, abs=1e-5)
        assert row["noisy"] != pytest.approx(row["clean"], rel=1e-5, abs=1e-5)
    monkeypatch.delitem(common.NOISE_MODES, "half")
    code, err = cli(invert, nll, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{ckpt_path} (its noise_mode): noise mode 'half' is unknown to this code" in err
