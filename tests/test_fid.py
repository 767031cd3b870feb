"""fid.py: the FID Inception graph and TF1's resize against independent implementations, pytorch-fid's
preprocessing against pytorch-fid itself, the metrics against closed forms and brute force, ADM reference
batches (stored statistics), CLI = Python API (one process and torchrun), bad input."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from scipy import linalg
from scipy.spatial.distance import cdist

import common
import fid
from common import ImageFolder

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# Random weights in the real file layout: the keys of torchvision's inception_v3 with a 1008-way
# fc and no aux head, which is how pytorch-fid's pt_inception-2015-12-05 file is keyed.

def random_fid_weights(seed=0):
    tv = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008,
                                         init_weights=False)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in tv.state_dict().items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(0)
        elif k.endswith("conv.weight"):
            fan_in = v[0].numel()
            sd[k] = torch.randn(v.shape, generator=g) * math.sqrt(2.0 / fan_in)
        elif k.endswith("bn.weight") or k.endswith("running_var"):
            sd[k] = 0.6 + 0.8 * torch.rand(v.shape, generator=g)
        elif k == "fc.weight":
            sd[k] = torch.randn(v.shape, generator=g) * 0.05
        else:                                            # bn.bias, running_mean, fc.bias
            sd[k] = 0.1 * torch.randn(v.shape, generator=g)
    return sd


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    sd = random_fid_weights()
    path = tmp_path_factory.mktemp("w") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(sd, path)
    return sd, path


@pytest.fixture(scope="module")
def sparse_weights(weights):
    """The same network with all but 3 pool3 channels switched off (large negative BN shifts in
    Mixed_7c) and the sFID tap (Mixed_6d's first 7 channels) off entirely. With few images the
    covariances are singular whatever the weights; confined to 3 channels (or zero) they keep
    scipy's sqrtm on its real path (seconds instead of a minute) for tests of a full FID / sFID."""
    sd = dict(weights[0])
    for name in ("branch1x1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_3a",
                 "branch3x3dbl_3b", "branch_pool"):
        bias = torch.full_like(sd[f"Mixed_7c.{name}.bn.bias"], -1e4)
        if name == "branch1x1":
            bias[:3] = 0.5
        sd[f"Mixed_7c.{name}.bn.bias"] = bias
    sd["Mixed_6d.branch1x1.bn.bias"] = sd["Mixed_6d.branch1x1.bn.bias"].clone()
    sd["Mixed_6d.branch1x1.bn.bias"][:7] = -1e4
    path = weights[1].with_name("sparse.pth")
    torch.save(sd, path)
    return path


# ------------------------------------------------------------------------------------------------
# The TF 2015-12-05 graph written again with plain functional ops on the raw state dict, float64.

def conv(x, sd, name, stride=1, same=True):
    w = sd[name + ".conv.weight"]
    pad = (w.shape[2] // 2, w.shape[3] // 2) if same else 0
    y = F.conv2d(x, w, stride=stride, padding=pad)
    y = F.batch_norm(y, sd[name + ".bn.running_mean"], sd[name + ".bn.running_var"],
                     sd[name + ".bn.weight"], sd[name + ".bn.bias"], False, 0.0, 1e-3)
    return F.relu(y)


def chain(x, sd, names):
    for n in names:
        x = conv(x, sd, n)
    return x


def tf_avg_pool(x):
    """TF 'SAME' 3x3 average: the sum over the window divided by the count of real pixels."""
    ones = torch.ones_like(x[:1, :1])
    window_sum = F.avg_pool2d(x, 3, 1, 1, divisor_override=1)
    return window_sum / F.avg_pool2d(ones, 3, 1, 1, divisor_override=1)


def block_a(x, sd, p):
    return torch.cat([conv(x, sd, p + "branch1x1"),
                      chain(x, sd, [p + "branch5x5_1", p + "branch5x5_2"]),
                      chain(x, sd, [p + f"branch3x3dbl_{i}" for i in (1, 2, 3)]),
                      conv(tf_avg_pool(x), sd, p + "branch_pool")], 1)


def block_b(x, sd, p):
    d = chain(x, sd, [p + "branch3x3dbl_1", p + "branch3x3dbl_2"])
    return torch.cat([conv(x, sd, p + "branch3x3", stride=2, same=False),
                      conv(d, sd, p + "branch3x3dbl_3", stride=2, same=False),
                      F.max_pool2d(x, 3, 2)], 1)


def block_c(x, sd, p):
    return torch.cat([conv(x, sd, p + "branch1x1"),
                      chain(x, sd, [p + f"branch7x7_{i}" for i in (1, 2, 3)]),
                      chain(x, sd, [p + f"branch7x7dbl_{i}" for i in (1, 2, 3, 4, 5)]),
                      conv(tf_avg_pool(x), sd, p + "branch_pool")], 1)


def block_d(x, sd, p):
    a = conv(x, sd, p + "branch3x3_1")
    b = chain(x, sd, [p + f"branch7x7x3_{i}" for i in (1, 2, 3)])
    return torch.cat([conv(a, sd, p + "branch3x3_2", stride=2, same=False),
                      conv(b, sd, p + "branch7x7x3_4", stride=2, same=False),
                      F.max_pool2d(x, 3, 2)], 1)


def block_e(x, sd, p, max_pool):
    a = conv(x, sd, p + "branch3x3_1")
    b = chain(x, sd, [p + "branch3x3dbl_1", p + "branch3x3dbl_2"])
    pooled = F.max_pool2d(x, 3, 1, 1) if max_pool else tf_avg_pool(x)
    return torch.cat([conv(x, sd, p + "branch1x1"),
                      conv(a, sd, p + "branch3x3_2a"), conv(a, sd, p + "branch3x3_2b"),
                      conv(b, sd, p + "branch3x3dbl_3a"), conv(b, sd, p + "branch3x3dbl_3b"),
                      conv(pooled, sd, p + "branch_pool")], 1)


def reference_inception(x, sd):
    """The graph on its 299x299 input -> pool3, logits and the sFID tap: Mixed_6d's 1x1 branch (TF's
    mixed_6/conv: blocks mixed, mixed_1, ... are Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d), first 7 channels,
    flattened in H, W, C order as TF's NHWC tensor."""
    sd = {k: v.double() for k, v in sd.items()}
    x = conv(x.double(), sd, "Conv2d_1a_3x3", stride=2, same=False)
    x = conv(x, sd, "Conv2d_2a_3x3", same=False)
    x = F.max_pool2d(conv(x, sd, "Conv2d_2b_3x3"), 3, 2)
    x = conv(conv(x, sd, "Conv2d_3b_1x1"), sd, "Conv2d_4a_3x3", same=False)
    x = F.max_pool2d(x, 3, 2)
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        x = block_a(x, sd, name + ".")
    x = block_b(x, sd, "Mixed_6a.")
    for name in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        if name == "Mixed_6d":
            tap = conv(x, sd, "Mixed_6d.branch1x1")[:, :7]
            assert tap.shape[1:] == (7, 17, 17)
            spatial = tap.permute(0, 2, 3, 1).reshape(len(x), -1)
        x = block_c(x, sd, name + ".")
    x = block_d(x, sd, "Mixed_7a.")
    x = block_e(x, sd, "Mixed_7b.", max_pool=False)
    x = block_e(x, sd, "Mixed_7c.", max_pool=True)
    assert x.shape[-2:] == (8, 8)
    pool = F.avg_pool2d(x, 8).flatten(1)                 # pool_3
    return pool, pool @ sd["fc.weight"].T, spatial      # softmax/logits/MatMul (no bias)


def tf_resize_reference(images, out_h, out_w):
    """TF1 legacy ResizeBilinear written from its definition, one output pixel at a time: with the
    float32 scale in / out (TF's CalculateResizeScale), source y = float32(i) * scale, rows floor(y)
    and min(floor(y) + 1, in - 1), weight y - floor(y); the same along x; interpolate along x
    within the two rows, then between them. images: (B, C, H, W) numpy, computed in float64."""
    img = np.asarray(images, np.float64)
    in_h, in_w = img.shape[-2:]
    out = np.empty(img.shape[:2] + (out_h, out_w))
    sy, sx = np.float32(in_h) / np.float32(out_h), np.float32(in_w) / np.float32(out_w)
    for i in range(out_h):
        y = float(np.float32(i) * sy)
        y0 = math.floor(y)
        y1, wy = min(y0 + 1, in_h - 1), y - y0
        for j in range(out_w):
            x = float(np.float32(j) * sx)
            x0 = math.floor(x)
            x1, wx = min(x0 + 1, in_w - 1), x - x0
            top = img[:, :, y0, x0] + (img[:, :, y0, x1] - img[:, :, y0, x0]) * wx
            bottom = img[:, :, y1, x0] + (img[:, :, y1, x1] - img[:, :, y1, x0]) * wx
            out[:, :, i, j] = top + (bottom - top) * wy
    return out


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_inception_matches_independent_graph(weights):
    sd, path = weights
    torch.manual_seed(0)
    images = torch.rand(1, 3, 48, 40)                    # non-square, resized to 299 inside
    x = 2 * F.interpolate(images.double(), size=(299, 299), mode="bilinear", align_corners=False) - 1
    ref_pool, ref_logits, _ = reference_inception(x, sd)
    assert ref_pool.std() > 1e-3 and ref_logits.std() > 1e-3
    folded = fid.load_inception(path)                    # BN folded into the convs
    plain = fid.load_inception(path, fold=False)         # the checkpoint's own layout
    assert set(plain.state_dict()) == set(sd)
    with torch.inference_mode():
        for model in (folded, plain):
            pool, logits = model(images)
            assert pool.shape == (1, 2048) and logits.shape == (1, 1008)
            assert rel_err(pool, ref_pool) < 1e-4
            assert rel_err(logits, ref_logits) < 1e-4
        # The parity check sees the TF-specific pieces: Mixed_7c's max pool, for one.
        folded.Mixed_7c.pool = "avg"
        assert rel_err(folded(images)[0], ref_pool) > 1e-3


def test_adm_protocol_and_sfid_tap_match_independent_graph(weights):
    """uint8 -> float 0..255 -> TF1 resize (the reference above) -> (x - 128) / 128 -> the graph: pool3,
    logits and the 2023-dim spatial features of `features`, as the float64 functional graph."""
    sd, path = weights
    u8 = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 3, 48, 40), dtype=np.uint8))
    x = (torch.from_numpy(tf_resize_reference(u8.numpy(), 299, 299)) - 128) / 128
    ref_pool, ref_logits, ref_spatial = reference_inception(x, sd)
    assert ref_spatial.shape == (1, 2023) and ref_spatial.std() > 1e-3
    assert torch.allclose(fid.preprocess(u8, "adm").double(), x, atol=1e-5)
    with torch.inference_mode():
        for model in (fid.load_inception(path), fid.load_inception(path, fold=False)):
            pool, logits, spatial = model.features(fid.preprocess(u8))
            assert rel_err(pool, ref_pool) < 1e-4 and rel_err(logits, ref_logits) < 1e-4
            assert spatial.shape == (1, 2023) and rel_err(spatial, ref_spatial) < 1e-4
        # The two protocols differ (resize and scaling): a real choice, not a relabelling.
        other = model.features(fid.preprocess(u8, "pytorch-fid"))[0]
    assert rel_err(other, ref_pool) > 1e-3


def test_random_init_and_batch_consistency():
    torch.manual_seed(0)
    model = fid.InceptionV3().eval()
    images = torch.rand(2, 3, 299, 299)
    with torch.inference_mode():
        pool, logits = model(images)
        one = model(images[1:2])[0]
    assert torch.isfinite(pool).all() and pool.std() > 0 and (pool >= 0).all()   # post-ReLU mean
    assert rel_err(one, pool[1:2]) < 1e-4


# ------------------------------------------------------------------------------------------------
# TF1 legacy resize (the adm protocol) and pytorch-fid's preprocessing (the pytorch-fid protocol).

@pytest.mark.parametrize("shape,size", [((256, 256), 299), ((64, 64), 299), ((512, 512), 299),
                                        ((128, 96), 299), ((128, 96), (50, 70))])
def test_tf_bilinear_resize_matches_tf_definition(shape, size):
    rng = np.random.default_rng(shape[0] + shape[1])
    images = rng.integers(0, 256, (1, 2) + shape).astype(np.float64) - 100   # any value range
    out = (size, size) if isinstance(size, int) else size
    expected = tf_resize_reference(images, *out)
    got = fid.tf_bilinear_resize(torch.from_numpy(images), size)
    assert got.shape == (1, 2) + out and got.dtype == torch.float64
    assert np.abs(got.numpy() - expected).max() < 1e-9
    got32 = fid.tf_bilinear_resize(torch.from_numpy(images).float(), size)
    assert np.abs(got32.double().numpy() - expected).max() < 1e-3
    # Not torch's half-pixel-centred bilinear (align_corners=False): a different resize.
    torch_resized = F.interpolate(torch.from_numpy(images), size=out, mode="bilinear", align_corners=False)
    assert (torch_resized - got).abs().max() > 1


def test_tf_bilinear_resize_by_hand():
    """s = i * in / out, no half-pixel shift, the right neighbour clamped at the border."""
    row = torch.tensor([[[[0.0, 10.0, 20.0]]]])
    up = fid.tf_bilinear_resize(row, (1, 5))               # s = 0, 0.6, 1.2, 1.8, 2.4
    assert torch.allclose(up.flatten(), torch.tensor([0.0, 6.0, 12.0, 18.0, 20.0]))
    down = fid.tf_bilinear_resize(torch.tensor([[[[0.0, 10.0, 20.0, 30.0]]]]), (1, 3))   # s = 0, 4/3, 8/3
    assert torch.allclose(down.flatten(), torch.tensor([0.0, 40 / 3, 80 / 3]))
    with pytest.raises(ValueError, match="float"):
        fid.tf_bilinear_resize(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), 8)


def test_pytorch_fid_protocol_matches_pytorch_fid(weights, monkeypatch):
    """pytorch-fid itself (a test-only peer) with our random weights: its resize and 2x - 1 equal
    `preprocess(..., "pytorch-fid")` bit for bit, and its pool3 equals ours on that protocol."""
    pfid = pytest.importorskip("pytorch_fid.inception")
    sd, path = weights
    monkeypatch.setattr(pfid, "load_state_dict_from_url", lambda *a, **k: sd)
    theirs = pfid.InceptionV3([pfid.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    u8 = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (2, 3, 48, 40), dtype=np.uint8))
    images01 = u8.float() / 255                             # pytorch-fid's ToTensor
    blocks, theirs.blocks = theirs.blocks, torch.nn.ModuleList([torch.nn.Identity()])
    theirs.output_blocks, theirs.last_needed_block = [0], 0
    with torch.inference_mode():
        their_input = theirs(images01)[0]
        assert torch.equal(fid.preprocess(u8, "pytorch-fid"), their_input)
        theirs.blocks, theirs.output_blocks, theirs.last_needed_block = blocks, [3], 3
        their_pool = theirs(images01)[0].flatten(1)
        model = fid.load_inception(path)
        ours = fid.extract_features(model, fid.ArrayImages(u8.permute(0, 2, 3, 1).numpy()), batch_size=2,
                                    progress=False, protocol="pytorch-fid")[0]
        assert rel_err(torch.from_numpy(ours), their_pool) < 1e-4
        assert rel_err(model(images01)[0], their_pool) < 1e-4      # forward keeps this meaning
# ------------------------------------------------------------------------------------------------
# Metrics.

def test_statistics_is_mean_and_unbiased_covariance():
    x = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    mu, sigma = fid.statistics(torch.from_numpy(x))
    xd = x.astype(np.float64)
    assert mu.dtype == np.float64 and np.allclose(mu, xd.sum(0) / 50)
    c = xd - xd.mean(0)
    assert np.allclose(sigma, c.T @ c / 49)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 2, d), rng.uniform(0.1, 2, d)
    # Commuting covariances (shared eigenvectors): ||mu1-mu2||^2 + sum (sqrt a - sqrt b)^2.
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    # General covariances: tr (S1 S2)^1/2 = tr (S1^1/2 S2 S1^1/2)^1/2, via symmetric eigh.
    m1, m2 = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(d), m2 @ m2.T + 0.1 * np.eye(d)
    w, v = np.linalg.eigh(s1)
    r1 = v @ np.diag(np.sqrt(w)) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    # Singular covariances (fewer samples than dimensions) still give a finite, close value.
    s1[:, 0] = s1[0, :] = 0
    s2[:, 0] = s2[0, :] = 0
    w, v = np.linalg.eigh(s1)
    r1 = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="shapes"):
        fid.frechet_distance(mu1, s1, mu2[:-1], s2[:-1, :-1])


def test_inception_score_direct_and_closed_forms():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((25, 1008)).astype(np.float32) * 3
    p = np.exp(logits.astype(np.float64))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in (0, 10, 20):                                   # splits of 10, 10, 5 (ADM's slicing)
        part = p[i:i + 10]
        py = part.mean(0)
        scores.append(np.exp(np.mean([np.sum(q * np.log(q / py)) for q in part])))
    assert fid.inception_score(logits, split_size=10) == pytest.approx(np.mean(scores), rel=1e-9)
    assert fid.inception_score(torch.from_numpy(logits), split_size=10) == pytest.approx(
        np.mean(scores), rel=1e-9)
    # Constant predictions: IS = 1. Confident and distinct within each split of m: IS = m.
    assert fid.inception_score(np.zeros((8, 1008))) == pytest.approx(1.0)
    confident = np.full((12, 1008), -1e4)
    confident[np.arange(12), np.arange(12)] = 0
    assert fid.inception_score(confident, split_size=4) == pytest.approx(4.0)


def brute_force_pr(ref, gen, k):
    def radii(x):
        d = cdist(x, x)
        np.fill_diagonal(d, np.inf)
        return np.sort(d, 1)[:, k - 1]                      # k-th nearest *other* point
    d = cdist(gen, ref)                                     # (gen, ref)
    precision = np.mean((d <= radii(ref)[None]).any(1))
    recall = np.mean((d <= radii(gen)[:, None]).any(0))
    return precision, recall


@pytest.mark.parametrize("k,block", [(3, 10000), (3, 7), (1, 5), (5, 16)])
def test_precision_recall_matches_brute_force(k, block):
    rng = np.random.default_rng(k * 100 + block)
    ref = rng.standard_normal((60, 8))
    gen = 0.8 * rng.standard_normal((45, 8)) + 0.7          # partly overlapping manifolds
    expected = brute_force_pr(ref, gen, k)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    got = fid.precision_recall(ref.astype(np.float32), torch.from_numpy(gen).float(), k=k,
                               block=block)
    assert got == pytest.approx(expected, abs=1e-12)
    assert fid.precision_recall(ref, ref, k=k, block=block) == (1.0, 1.0)




def test_frechet_distance_is_clamped_at_zero():
    """Identical inputs: the exact value is 0, but sqrtm's rounding can leave a tiny negative one."""
    rng = np.random.default_rng(0)
    for seed in range(50):
        f = np.random.default_rng(seed).standard_normal((40, 12))
        mu, sigma = f.mean(0), np.cov(f, rowvar=False)
        raw = 2 * np.trace(sigma) - 2 * np.trace(linalg.sqrtm(sigma @ sigma).real)   # unclamped
        if raw < 0:
            break
    assert raw < 0, "no input with a negative unclamped value found"
    assert fid.frechet_distance(mu, sigma, mu, sigma) == 0.0
    mu2 = mu + 1e-3 * rng.standard_normal(12)
    assert fid.frechet_distance(mu, sigma, mu2, sigma) > 0


# ------------------------------------------------------------------------------------------------
# Inputs, ADM reference batches, CLI = API, torchrun, errors.

def write_pngs(folder, n, seed, size=32, high=256, same=False):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    pixels = rng.integers(0, high, (size, size, 3), dtype=np.uint8)
    for i in range(n):
        sub = folder / ("a" if i % 2 else "b")              # recursive search
        sub.mkdir(exist_ok=True)
        if not same:
            pixels = rng.integers(0, high, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(sub / f"{i}.png")
    return folder


def run_cli(*args, torchrun=False, wait=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29517"] if torchrun else [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd + [str(ROOT / "fid.py"), *map(str, args), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=env)
    if not wait:
        return proc
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def block_fd(mu1, s1, mu2, s2, dims):
    """Fréchet distance of covariances that vanish outside `dims`, by a symmetric square root:
    tr (S1 S2)^1/2 = tr (S1^1/2 S2 S1^1/2)^1/2."""
    a, b = s1[np.ix_(dims, dims)], s2[np.ix_(dims, dims)]
    assert np.allclose(np.delete(s1, dims, 0), 0) and np.allclose(np.delete(s2, dims, 0), 0)
    w, v = np.linalg.eigh(a)
    r = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(r @ b @ r), 0, None)).sum()
    return np.sum((mu1 - mu2) ** 2) + np.trace(a) + np.trace(b) - 2 * tr_covmean


def zero_cov_fd_bounds(mu1, sigma1, mu2, eps=1e-6):
    """The Fréchet distance to statistics (mu2, 0): ||mu1 - mu2||^2 + tr S1 when scipy's sqrtm of the zero
    product is finite (0); scipy versions that find it singular take the ADM fallback (eps on both diagonals),
    which lowers it by 2 sqrt(eps) sum_i sqrt(lambda_i(S1) + eps). -> (low, high)."""
    high = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1)
    lam = np.clip(np.linalg.eigvalsh(sigma1), 0, None)
    return high - 2 * np.sqrt(eps) * np.sqrt(lam + eps).sum(), high


def test_sources_folder_and_npz_agree(weights, tmp_path):
    _, path = weights
    folder = write_pngs(tmp_path / "imgs", 3, seed=1)
    ds = ImageFolder(folder, None, labels=False)
    arr = np.stack([np.asarray(Image.open(f)) for f, _ in ds.samples])
    np.savez(tmp_path / "imgs.npz", arr_0=arr)              # stored: read by memory map
    np.savez_compressed(tmp_path / "imgs_c.npz", arr_0=arr)  # deflated: loaded
    model = fid.load_inception(path)
    feats = [fid.extract_features(model, fid.open_source(p)[0], batch_size=2, progress=False)
             for p in (folder, tmp_path / "imgs.npz", tmp_path / "imgs_c.npz")]
    images, stats = fid.open_source(tmp_path / "imgs.npz")
    assert stats is None and isinstance(images.array, np.memmap) and np.array_equal(images.array, arr)
    for other in feats[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(other, feats[0]))
    # The features are the model's on the adm protocol, image by image.
    with torch.inference_mode():
        direct = model.features(fid.preprocess(torch.from_numpy(arr).permute(0, 3, 1, 2)))
    for got, want, dim in zip(feats[0], direct, (2048, 1008, 2023)):
        assert got.shape == (3, dim) and rel_err(torch.from_numpy(got), want) < 1e-5
    # Images of different sizes in one batch: each is preprocessed alone, same features.
    Image.fromarray(arr[0, :20]).save(folder / "b" / "short.png")
    mixed = ImageFolder(folder, None, labels=False)
    pool, _, _ = fid.extract_features(model, mixed, batch_size=4, progress=False)
    with torch.inference_mode():
        one = model.features(fid.preprocess(torch.from_numpy(arr[0, :20].copy()).permute(2, 0, 1)[None]))[0]
    k = [f for f, _ in mixed.samples].index(str(folder / "b" / "short.png"))
    assert rel_err(torch.from_numpy(pool[k:k + 1]), one) < 1e-5
    assert rel_err(torch.from_numpy(np.delete(pool, k, 0)), torch.from_numpy(feats[0][0])) < 1e-5
    # An npz of statistics only.
    mu, sigma = fid.statistics(feats[0][0])
    np.savez(tmp_path / "s.npz", mu=mu, sigma=sigma)
    images, stats = fid.open_source(tmp_path / "s.npz")
    assert images is None and sorted(stats) == ["mu", "sigma"]
    assert np.array_equal(stats["mu"], mu) and np.array_equal(stats["sigma"], sigma)


def test_tf32_is_off_inside_feature_extraction_and_restored(monkeypatch):
    """evaluate.py --cfg-sweep calls extract_features (and precision_recall) in a process that
    turned TF32 on, as training does: the network and the P/R distances must still run in full
    float32, as TF and the CLI, and the caller's settings come back afterwards. torch >= 2.9 keeps
    TF32 per op, cuDNN conv and CUDA matmul, and its kernels read those settings, so fid.py sets
    and records them; older torch has only the legacy allow_tf32 flags, which fid.py sets instead.
    Both ways a caller turns TF32 on are covered, and the legacy branch runs on any torch (fid.py
    told the per-op API is absent)."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    per_op = fid._PER_OP_TF32
    legacy_before = (cudnn.allow_tf32, matmul.allow_tf32)
    per_op_before = (cudnn.conv.fp32_precision, matmul.fp32_precision) if per_op else None
    seen = []

    def flags():
        if fid._PER_OP_TF32:
            return cudnn.conv.fp32_precision, matmul.fp32_precision
        return cudnn.allow_tf32, matmul.allow_tf32

    class Recorder(torch.nn.Module):
        def features(self, x):
            seen.append(flags())
            n = len(x)
            return torch.zeros(n, 2048), torch.zeros(n, 1008), torch.zeros(n, 2023)

    sq_dists = fid._sq_dists

    def recording_sq_dists(a, b):
        seen.append(flags())
        return sq_dists(a, b)

    monkeypatch.setattr(fid, "_sq_dists", recording_sq_dists)
    images = fid.ArrayImages(np.zeros((3, 8, 8, 3), np.uint8))
    features = np.random.default_rng(0).standard_normal((6, 4))
    # (how the caller turns TF32 on, whether fid.py uses the per-op settings)
    cases = [("legacy", False)] + ([("legacy", True), ("per-op", True)] if per_op else [])
    try:
        for api, fid_per_op in cases:
            monkeypatch.setattr(fid, "_PER_OP_TF32", fid_per_op)
            if api == "legacy":                          # as train_src.py / train_flow.py
                cudnn.allow_tf32 = True
                matmul.allow_tf32 = True
            else:
                cudnn.conv.fp32_precision = "tf32"
                matmul.fp32_precision = "tf32"
            on = flags()
            off = ("ieee", "ieee") if fid_per_op else (False, False)
            assert on == (("tf32", "tf32") if fid_per_op else (True, True))
            seen.clear()
            pool, logits, spatial = fid.extract_features(Recorder(), images, batch_size=2, progress=False)
            assert pool.shape == (3, 2048) and len(seen) == 2       # two batches
            fid.precision_recall(features, features, k=1)
            assert len(seen) > 2 and set(seen) == {off}, seen
            assert flags() == on
            if api == "legacy":
                assert (cudnn.allow_tf32, matmul.allow_tf32) == (True, True)
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = legacy_before
        if per_op:
            cudnn.conv.fp32_precision, matmul.fp32_precision = per_op_before


def test_adm_reference_batch_uses_stored_statistics(sparse_weights, tmp_path):
    """An ADM-style batch: arr_0 images plus stored mu/sigma/mu_s/sigma_s that differ from them. FID and
    sFID come from the stored statistics, precision/recall from arr_0; --ref-stats images recomputes."""
    model = fid.load_inception(sparse_weights)              # pool3 lives on channels 0-2, no sFID tap
    rng = np.random.default_rng(7)
    arr = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    mu, mu_s = rng.standard_normal(2048), rng.standard_normal(2023)
    sigma, m = np.zeros((2048, 2048)), rng.standard_normal((3, 3))
    sigma[:3, :3] = m @ m.T + 0.1 * np.eye(3)
    sigma_s = np.diag(rng.uniform(0.5, 2, 2023))
    np.savez(tmp_path / "VIRTUAL_ref.npz", arr_0=arr, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    gen = fid.load_features(write_pngs(tmp_path / "gen", 4, seed=8, high=120), model, progress=False)
    pool = gen["pool"]
    spatial = fid.extract_features(model, ImageFolder(tmp_path / "gen", None, labels=False), progress=False)[2]
    assert not spatial.any()                                 # see sparse_weights
    mu_g, sigma_g = fid.statistics(pool)
    ref = fid.load_features(tmp_path / "VIRTUAL_ref.npz", model, progress=False)   # extracted once, reused
    assert ref["stats"][0] is not None and np.array_equal(ref["stats"][0], mu) and len(ref["pool"]) == 4
    stored = fid.evaluate(ref, gen)
    assert stored["fid"] == pytest.approx(block_fd(mu_g, sigma_g, mu, sigma, [0, 1, 2]), rel=1e-6)
    low, high = zero_cov_fd_bounds(mu_s, sigma_s, np.zeros(2023))
    assert low - 1e-9 * high <= stored["sfid"] <= high * (1 + 1e-9)
    assert (stored["precision"], stored["recall"]) == fid.precision_recall(ref["pool"], pool)
    assert stored["num_ref"] == 4 and stored["num_gen"] == 4
    recomputed = fid.evaluate(tmp_path / "VIRTUAL_ref.npz", gen, model, ref_stats="images", progress=False)
    mu_r, sigma_r = fid.statistics(ref["pool"])
    assert recomputed["fid"] == pytest.approx(block_fd(mu_g, sigma_g, mu_r, sigma_r, [0, 1, 2]), rel=1e-6)
    assert recomputed["sfid"] == 0.0                         # no sFID tap on either side (clamped at 0)
    assert abs(recomputed["fid"] - stored["fid"]) > 1 and stored["sfid"] > 1
    assert (recomputed["precision"], recomputed["recall"]) == (stored["precision"], stored["recall"])
    with pytest.raises(ValueError, match="protocol"):
        fid.evaluate(ref, gen, protocol="pytorch-fid")


def test_cli_equals_api(weights, tmp_path):
    """REF holds one image four times: its covariances are exactly zero, so FID and sFID have a closed form
    (zero_cov_fd_bounds) and scipy's sqrtm stays on its fast path."""
    _, path = weights
    ref = write_pngs(tmp_path / "ref", 4, seed=2, same=True)
    gen = write_pngs(tmp_path / "gen", 4, seed=3, high=100)
    cli = run_cli(ref, gen, "--weights", path, "--batch-size", "4", "--json", tmp_path / "m.json", "--image-size",
                  "0", wait=False)                          # the API side runs meanwhile
    model = fid.load_inception(path)
    pr, lr, sr = fid.extract_features(model, ImageFolder(ref, None, labels=False), batch_size=4, progress=False)
    pg, lg, sg = fid.extract_features(model, ImageFolder(gen, None, labels=False), batch_size=4, progress=False)
    bounds = {}
    for key, f_ref, f_gen in (("FID", pr, pg), ("sFID", sr, sg)):
        (mu_r, sigma_r), (mu_g, sigma_g) = fid.statistics(f_ref), fid.statistics(f_gen)
        assert not sigma_r.any()
        bounds[key] = zero_cov_fd_bounds(mu_g, sigma_g, mu_r)
    stdout, stderr = cli.communicate(timeout=300)
    assert cli.returncode == 0, stderr
    printed = dict(line.split(": ") for line in stdout.strip().splitlines())
    assert list(printed) == ["FID", "sFID", "IS", "Precision", "Recall"]
    for key, (low, high) in bounds.items():
        assert low * (1 - 1e-5) <= float(printed[key]) <= high * (1 + 1e-5) and low > 1e-3
    assert float(printed["IS"]) == pytest.approx(fid.inception_score(lg), rel=1e-5)
    assert (float(printed["Precision"]), float(printed["Recall"])) == fid.precision_recall(pr, pg)
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["fid"] == float(printed["FID"]) and metrics["sfid"] == float(printed["sFID"])
    assert metrics["num_gen"] == 4 and metrics["protocol"] == "adm" and metrics["ref_stats"] == "stored"


def test_torchrun_split_gathers_the_same_statistics(weights, tmp_path):
    _, path = weights
    folder = write_pngs(tmp_path / "imgs", 3, seed=4)        # 3 images over 2 ranks: 2 + 1
    out = run_cli("--save-stats", folder, tmp_path / "s.npz", "--weights", path, "--batch-size", "2",
                  "--device", "cpu", "--image-size", "0", torchrun=True)   # gloo: also where one GPU is visible
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("saved statistics") == 1        # rank 0 only
    with np.load(tmp_path / "s.npz") as saved:
        assert sorted(saved.files) == ["mu", "mu_s", "sigma", "sigma_s"]
        saved = dict(saved)
    pool, _, spatial = fid.extract_features(fid.load_inception(path), ImageFolder(folder, None, labels=False),
                                            progress=False)
    for features, names in ((pool, ("mu", "sigma")), (spatial, ("mu_s", "sigma_s"))):
        (mu, sigma), (mu1, sigma1) = (saved[k] for k in names), fid.statistics(features)
        # Same features up to float32 summation order (1 thread per rank here).
        assert np.allclose(mu, mu1, rtol=1e-5, atol=1e-6 * np.abs(mu1).max())
        assert np.allclose(sigma, sigma1, rtol=1e-4, atol=1e-5 * np.abs(sigma1).max())
    images, stats = fid.open_source(tmp_path / "s.npz")     # and fid.py reads the file back
    assert images is None and sorted(stats) == ["mu", "mu_s", "sigma", "sigma_s"]


def test_folders_are_adm_centre_cropped_by_default(weights, tmp_path):
    """ADM made its reference batches with its centre crop (box halving, bicubic resize, centre square): a folder
    of raw photos is read the same way by default under --protocol adm (256 px), as stored with --image-size 0."""
    from common import center_crop_arr
    _, path = weights
    rng = np.random.default_rng(9)
    (tmp_path / "raw").mkdir()
    shapes = [(300, 540), (600, 280)]                        # (H, W): landscape and portrait, one >= 2x 256
    for i, (h, w) in enumerate(shapes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "raw" / f"{i}.png")
    files = ImageFolder(tmp_path / "raw", 256, labels=False)
    for i in range(2):
        want = np.asarray(center_crop_arr(Image.open(files.samples[i][0]).convert("RGB"), 256))
        assert want.shape == (256, 256, 3) and np.array_equal(files[i][0].permute(1, 2, 0).numpy(), want)
        assert tuple(ImageFolder(tmp_path / "raw", None, labels=False)[i][0].shape[1:]) == shapes[i]   # as stored
    out = run_cli("--save-stats", tmp_path / "raw", tmp_path / "s.npz", "--weights", path, "--batch-size", "2")
    assert out.returncode == 0 and "2 images, ADM centre crop to 256 px" in out.stdout, out.stderr
    model = fid.load_inception(path)
    pool, _, spatial = fid.extract_features(model, files, batch_size=2, progress=False)
    with np.load(tmp_path / "s.npz") as saved:
        assert np.allclose(saved["mu"], pool.mean(0), rtol=1e-5, atol=1e-6 * np.abs(pool).max())
        assert np.allclose(saved["mu_s"], spatial.mean(0), rtol=1e-5, atol=1e-6 * np.abs(spatial).max())


def test_pytorch_fid_protocol_cli_equals_calculate_fid_given_paths(sparse_weights, tmp_path, monkeypatch):
    """`fid.py A B --weights W --protocol pytorch-fid` as a user types it (no --image-size), on two folders of
    64x64 PNGs, is pytorch-fid's own number: its calculate_fid_given_paths with the same weights (a folder's
    top-level images, sorted, each as stored: ToTensor, bilinear resize to 299, 2x - 1). The adm protocol's
    centre crop to 256 px, applied here, would move it by far more than the agreement."""
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    import pytorch_fid.inception
    sd = torch.load(sparse_weights)
    monkeypatch.setattr(pytorch_fid.inception, "load_state_dict_from_url", lambda *a, **k: sd)
    rng = np.random.default_rng(12)
    folders = [tmp_path / "a", tmp_path / "b"]
    for folder, high in zip(folders, (256, 120)):            # pytorch-fid reads a folder's top level only
        folder.mkdir()
        for i in range(10):
            Image.fromarray(rng.integers(0, high, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    theirs = fid_score.calculate_fid_given_paths([str(f) for f in folders], batch_size=50, device="cpu",
                                                 dims=2048, num_workers=0)
    found = {}
    for extra in ([], ["--image-size", "256"]):
        out = run_cli(*folders, "--weights", sparse_weights, "--protocol", "pytorch-fid", *extra)
        assert out.returncode == 0, out.stderr
        found[len(extra)] = float(dict(line.split(": ") for line in out.stdout.strip().splitlines())["FID"])
    # float32 features of two implementations (here 4e-6 apart); the crop moves the FID by 38%
    assert found[0] == pytest.approx(theirs, rel=1e-4) and theirs > 1e-4
    assert abs(found[2] - theirs) > 0.1 * theirs, (found, theirs)


def test_load_inception_accepts_missing_batch_counters_and_refuses_others(weights, tmp_path):
    sd, path = weights
    old = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}   # as older PyTorch saved
    assert len(old) < len(sd)
    torch.save(old, tmp_path / "old.pth")
    x = fid.preprocess(torch.zeros(1, 3, 299, 299, dtype=torch.uint8) + 100)
    with torch.inference_mode():
        a, b = fid.load_inception(path), fid.load_inception(tmp_path / "old.pth")
        assert all(torch.equal(u, v) for u, v in zip(a.features(x), b.features(x)))
    cases = [({k: v for k, v in sd.items() if k != "fc.weight"}, "fc.weight"),
             (dict(sd, **{"fc.weight": torch.zeros(1000, 2048)}), "fc.weight has shape"),
             (dict(sd, **{"AuxLogits.fc.weight": torch.zeros(1000, 768)}), "torchvision's ImageNet Inception")]
    for bad, needle in cases:
        torch.save(bad, tmp_path / "bad.pth")
        with pytest.raises(ValueError, match=needle):
            fid.load_inception(tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match="pt_inception"):
        fid.load_inception(tmp_path / "missing.pth")


def test_errors_are_one_line(weights, tmp_path, capsys):
    _, path = weights
    good = write_pngs(tmp_path / "good", 2, seed=5)
    (tmp_path / "empty").mkdir()
    bad = write_pngs(tmp_path / "bad", 1, seed=6)
    (bad / "b" / "broken.png").write_bytes(b"not a png")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    np.savez(tmp_path / "small.npz", mu=np.zeros(5), sigma=np.eye(5))
    np.savez(tmp_path / "half.npz", mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(2023))
    cases = [
        ([good, good, "--weights", tmp_path / "missing.pth"], "missing.pth"),
        ([tmp_path / "empty", good, "--weights", path], "no images"),
        ([good, bad, "--weights", path], "broken.png"),
        ([good, tmp_path / "other.npz", "--weights", path], "arr_0"),
        ([good, tmp_path / "nowhere", "--weights", path], "nowhere"),
        ([good, good, "--weights", tmp_path / "other.npz"], "other.npz"),
        ([tmp_path / "small.npz", good, "--weights", path], "small.npz: mu (5,)"),
        ([tmp_path / "half.npz", good, "--weights", path], "half.npz: expected arr_0"),
        ([tmp_path / "stats.npz", good, "--weights", path, "--ref-stats", "images"], "stats.npz: holds only"),
        (["--save-stats", tmp_path / "stats.npz", tmp_path / "out.npz", "--weights", path], "stats.npz: holds only"),
    ]
    for args, needle in cases:
        argv = [str(a) for a in args] + ["--no-progress"]
        with pytest.raises(SystemExit) as stop:                 # fid.py's __main__: run_cli exits 2
            common.run_cli(fid.main, fid.build_parser().parse_args(argv))
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err and "\n" not in err, err
    with pytest.raises(ValueError, match="protocol"):
        fid.preprocess(torch.zeros(1, 3, 8, 8), "tf")
    with pytest.raises(ValueError, match="stats"):
        fid.load_features(good, None, stats="both")
