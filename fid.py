"""FID, sFID, Inception Score, precision and recall: the metrics of the paper's §4.

A self-contained rebuild of ADM's evaluator (openai/guided-diffusion `evaluations/evaluator.py`,
behind the paper's numbers): TensorFlow's 2015-12-05 Inception-v3 graph written by hand, run
with its PyTorch port's weights (pytorch-fid's, FID_WEIGHTS_URL) in float32, TF32 off, as TF.

    python fid.py VIRTUAL_imagenet256_labeled.npz samples.npz --weights W --json metrics.json
    python fid.py REF_DIR GEN_DIR --weights W --protocol pytorch-fid   # pytorch-fid's numbers
    python fid.py --save-stats imagenet_val/ val_stats.npz --weights W  # encode a reference once
    torchrun --nproc_per_node 8 fid.py REF GEN --weights W              # split across GPUs

REF, GEN: a folder of images, or an `.npz` of uint8 NHWC images `arr_0` and/or statistics
`mu, sigma[, mu_s, sigma_s]`; as in ADM's evaluator, stored statistics give FID and sFID, images
precision and recall. A folder: every image under it, in ADM's order. Under `--protocol adm` an
image is brought to 256 px by ADM's centre crop, as ADM made its reference batches; under
`pytorch-fid` it is read as stored, as pytorch-fid reads a folder (its top level only; ours also
reads subfolders). `--image-size S` crops to S px under either, 0: never.
Protocols: `adm` (TF1's legacy resize, (x - 128) / 128: ADM's, the paper's) or `pytorch-fid`
(torch's bilinear resize, 2x - 1). `--batch-size` is per rank.
API (on every rank under torchrun): evaluate(load_features(REF, model), GEN, model, ...).

In reading order: the network, the preprocessing and the metrics; then, in marked sections, the
TF32 switch, the inputs (weights, folders, npz memory maps), feature extraction across ranks,
evaluation, the command line.
"""

import argparse
import contextlib
import math
import os
import struct
import warnings
import zipfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from scipy import linalg
from tqdm import tqdm

from common import (ImageFolder, UserError, atomic_write, cleanup_ddp, error_line, run_cli,
                    save_json, setup_ddp)

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
PROTOCOLS = ("adm", "pytorch-fid")
# --protocol adm's folders: ADM's centre crop to 256 px, as its ImageNet 256 reference batches
ADM_IMAGE_SIZE = 256
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
# the input size; the logits (1000 classes + 8 unused), pool_3, sFID's mixed_6/conv[..., :7]
INPUT_SIZE = 299
NUM_CLASSES = 1008
POOL_DIM = 2048
SPATIAL_DIM = 17 * 17 * 7
# IS: 10 splits of 50k samples; P/R: balls reach the k-th neighbour, 10k x 10k distances a block
IS_SPLIT_SIZE = 5000
PR_K = 3
PR_BLOCK = 10000
METRIC_NAMES = dict(
    fid="FID", sfid="sFID", inception_score="IS", precision="Precision", recall="Recall")


# ---- The FID Inception-v3: TF's 2015-12-05 graph under torchvision's module names (the weights
# load by name). `_same` builds TF's 'SAME' convs, BasicConv2d alone the 'VALID' ones; /2: stride 2.
class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU; `fold()` merges the BN into the conv."""

    def __init__(self, cin, cout, kernel_size, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)

    @torch.no_grad()
    def fold(self):
        """For inference the conv takes the BN's affine map, computed in float64:
        s = gamma / sqrt(var + eps), w' = w * s, b' = beta - mean * s."""
        bn = self.bn
        w = self.conv.weight
        s = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        b = bn.bias.double() - bn.running_mean.double() * s
        w.copy_((w.double() * s[:, None, None, None]).to(w.dtype))
        self.conv.bias = nn.Parameter(b.to(w.dtype))
        self.bn = nn.Identity()


def _same(cin, cout, kh, kw=None):
    """A stride-1 BasicConv2d with a kh x kw kernel (kw = kh by default), padded as TF's 'SAME'."""
    kw = kw or kh
    return BasicConv2d(cin, cout, (kh, kw), padding=(kh // 2, kw // 2))


def _pool3x3(x, kind="avg"):
    """A 3x3 stride-1 'SAME' pool, "max" or "avg" (TF's divides by the real pixels, not by 9)."""
    if kind == "max":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _chain(x, *layers):
    """x through each layer in turn: one branch of a block, or a stretch of the network."""
    for layer in layers:
        x = layer(x)
    return x


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = _same(cin, 64, 1)
        self.branch5x5_1 = _same(cin, 48, 1)
        self.branch5x5_2 = _same(48, 64, 5)
        self.branch3x3dbl_1 = _same(cin, 64, 1)
        self.branch3x3dbl_2 = _same(64, 96, 3)
        self.branch3x3dbl_3 = _same(96, 96, 3)
        self.branch_pool = _same(cin, pool_features, 1)

    def forward(self, x):
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3)
        return torch.cat([self.branch1x1(x), b, c, self.branch_pool(_pool3x3(x))], dim=1)


class InceptionB(nn.Module):
    """Mixed_6a, grid 35 -> 17: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _same(cin, 64, 1)
        self.branch3x3dbl_2 = _same(64, 96, 3)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b = _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3)
        return torch.cat([self.branch3x3(x), b, F.max_pool2d(x, 3, stride=2)], dim=1)


class InceptionC(nn.Module):
    """Mixed_6b..6e: 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1."""

    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = _same(cin, 192, 1)
        self.branch7x7_1 = _same(cin, c7, 1)
        self.branch7x7_2 = _same(c7, c7, 1, 7)
        self.branch7x7_3 = _same(c7, 192, 7, 1)
        self.branch7x7dbl_1 = _same(cin, c7, 1)
        self.branch7x7dbl_2 = _same(c7, c7, 7, 1)
        self.branch7x7dbl_3 = _same(c7, c7, 1, 7)
        self.branch7x7dbl_4 = _same(c7, c7, 7, 1)
        self.branch7x7dbl_5 = _same(c7, 192, 1, 7)
        self.branch_pool = _same(cin, 192, 1)

    def forward(self, x):
        b = _chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3)
        c = _chain(x, self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                   self.branch7x7dbl_4, self.branch7x7dbl_5)
        return torch.cat([self.branch1x1(x), b, c, self.branch_pool(_pool3x3(x))], dim=1)


class InceptionD(nn.Module):
    """Mixed_7a, grid 17 -> 8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = _same(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _same(cin, 192, 1)
        self.branch7x7x3_2 = _same(192, 192, 1, 7)
        self.branch7x7x3_3 = _same(192, 192, 7, 1)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = _chain(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                   self.branch7x7x3_4)
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], dim=1)


class InceptionE(nn.Module):
    """Mixed_7b/7c: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1, the pairs in
    parentheses side by side. TF pools by average in Mixed_7b, by max in Mixed_7c."""

    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = _same(cin, 320, 1)
        self.branch3x3_1 = _same(cin, 384, 1)
        self.branch3x3_2a = _same(384, 384, 1, 3)
        self.branch3x3_2b = _same(384, 384, 3, 1)
        self.branch3x3dbl_1 = _same(cin, 448, 1)
        self.branch3x3dbl_2 = _same(448, 384, 3)
        self.branch3x3dbl_3a = _same(384, 384, 1, 3)
        self.branch3x3dbl_3b = _same(384, 384, 3, 1)
        self.branch_pool = _same(cin, 192, 1)

    def forward(self, x):
        b = self.branch3x3_1(x)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = self.branch_pool(_pool3x3(x, self.pool))
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b), self.branch3x3_2b(b),
                          self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c), d], dim=1)


class InceptionV3(nn.Module):
    """The FID Inception-v3; random weights (He-normal convs, identity BatchNorms) until loaded."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = _same(32, 64, 3)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, NUM_CLASSES)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, images):
        """images (B, 3, H, W) in [0, 1] -> pool, logits, on pytorch-fid's preprocessing."""
        pool, logits, _ = self.features(_torch_resize(images))
        return pool, logits

    def features(self, x):
        """x (B, 3, 299, 299) from `preprocess` -> three feature sets:
        pool (B, 2048), pool_3: the 8x8 average of Mixed_7c, for FID and precision/recall;
        logits (B, 1008) = pool @ fc.weight^T without the bias, TF's `softmax/logits/MatMul`
            that ADM's evaluator reads, for the Inception Score;
        spatial (B, 2023) for sFID: the evaluator's `mixed_6/conv`[..., :7] in H, W, C order
            (TF's mixed_6 is Mixed_6d, its `conv` the 1x1 branch, the first 192 channels)."""
        if x.ndim != 4 or x.shape[1:] != (3, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"InceptionV3.features: need (B, 3, 299, 299), got {tuple(x.shape)}")
        # the stem: (B, 32, 149, 149), (B, 64, 147, 147), pool, (B, 192, 71, 71), pool
        x = _chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)
        x = _chain(F.max_pool2d(x, 3, stride=2), self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)
        x = F.max_pool2d(x, 3, stride=2)
        # (B, 288, 35, 35) after Mixed_5d, (B, 768, 17, 17) after Mixed_6a..6e
        x = _chain(x, self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a)
        x = _chain(x, self.Mixed_6b, self.Mixed_6c, self.Mixed_6d)
        # sFID's tap: the 1x1 branch's first 7 channels, flattened as TF's NHWC
        spatial = x[:, :7].permute(0, 2, 3, 1).flatten(1)
        # (B, 2048, 8, 8) after Mixed_7c, then its 8x8 average
        x = _chain(x, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c)
        pool = x.mean(dim=(2, 3))
        return pool, F.linear(pool, self.fc.weight), spatial


# ---- Preprocessing: 0..255 images -> the graph's input, by either protocol.
def preprocess(images, protocol="adm"):
    """Images (B, 3, H, W) valued 0..255 -> (B, 3, 299, 299) in [-1, 1]:
    "adm": x -> (tf_resize(x) - 128) / 128, as ADM's evaluator feeds TF's graph;
    "pytorch-fid": x -> 2 * torch_resize(x / 255) - 1, as pytorch-fid."""
    x = images if images.is_floating_point() else images.float()
    if protocol == "pytorch-fid":
        return _torch_resize(x / 255)
    if protocol != "adm":
        raise ValueError(f"protocol: expected one of {PROTOCOLS}, got {protocol!r}")
    return (tf_bilinear_resize(x, INPUT_SIZE) - 128) / 128


def tf_bilinear_resize(images, size):
    """TF1's legacy `ResizeBilinear` of float images (B, C, H, W) to size (int or (h, w)), without
    align_corners, half_pixel_centers or antialiasing: output pixel i reads s = i * (in / out)
    (float32) from floor(s) and floor(s) + 1, along x, then along y. [0, 10, 20] to 5 reads
    s = 0, 0.6, 1.2, 1.8, 2.4 -> 0, 6, 12, 18, 20."""
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"tf_bilinear_resize: need float (B, C, H, W), got {images.dtype}")
    if isinstance(size, int):
        size = (size, size)
    y0, y1, wy = _tf_taps(images.shape[2], size[0], images)
    x0, x1, wx = _tf_taps(images.shape[3], size[1], images)
    # along x within the source rows, (B, C, H, w), then along y between them, (B, C, h, w)
    left = images[..., x0]
    rows = left + (images[..., x1] - left) * wx
    top = rows[..., y0, :]
    return top + (rows[..., y1, :] - top) * wy[:, None]


def _tf_taps(n_in, n_out, like):
    """One axis of TF's resize: for each output pixel i, s = i * (in / out) in float32 (TF's
    scale, then a product), its source pixels lo = floor(s), hi = min(lo + 1, in - 1) and hi's
    weight s - lo."""
    scale = torch.tensor(n_in, dtype=torch.float32) / n_out
    s = torch.arange(n_out, dtype=torch.float32) * scale
    lo = s.floor().long()
    hi = (lo + 1).clamp(max=n_in - 1)
    return lo.to(like.device), hi.to(like.device), (s - lo).to(like)


def _torch_resize(x):
    """pytorch-fid: [0, 1] -> torch's bilinear resize to 299 (half-pixel centres) -> [-1, 1]."""
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=INPUT_SIZE, mode="bilinear", align_corners=False)
    return 2 * x - 1


# ---- Metrics: statistics, Fréchet distance, Inception Score, precision and recall.
def statistics(features):
    """(N, D) features -> float64 mean (D,) and unbiased covariance (D, D)."""
    f = features.cpu() if torch.is_tensor(features) else features
    f = np.asarray(f, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"statistics: need (N >= 2, D) features, got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}), the Fréchet distance of two Gaussians,
    clamped at 0, in float64 as ADM's evaluator: scipy's sqrtm; eps added to both diagonals only
    if the root is not finite; an imaginary diagonal over 1e-3 is an error, less is dropped."""
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        got = f"{mu1.shape} {s1.shape}, {mu2.shape} {s2.shape}"
        raise ValueError(f"frechet_distance: mu, sigma shapes differ: {got}")
    # with fewer samples than dimensions the product is singular (ADM: disp=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            # ADM's fallback: a small ridge on both diagonals
            offset = np.eye(len(s1)) * eps
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError("frechet_distance: sqrtm has an imaginary diagonal")
        covmean = covmean.real
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    return max(0.0, float(fd))


def inception_score(logits, split_size=IS_SPLIT_SIZE):
    """exp(E_x KL(p(y|x) || p(y))) with p(y) the mean p(y|x), averaged over consecutive splits
    of `split_size` images (the last may be shorter, as in ADM)."""
    logits = torch.as_tensor(logits)
    if logits.ndim != 2 or len(logits) == 0:
        raise ValueError(f"inception_score: need (N > 0, C) logits, got {tuple(logits.shape)}")
    # log p(y|x), (N, C); per split, log p(y) (C,), the log of its mean p(y|x), and the KLs (n,)
    logp = torch.log_softmax(logits.double().cpu(), dim=1)
    scores = []
    for part in logp.split(split_size):
        log_py = torch.logsumexp(part, 0) - math.log(len(part))
        kl = (part.exp() * (part - log_py)).sum(1)
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores))


def _sq_dists(a, b):
    """Squared distances (len(a), len(b)), |a|^2 - 2ab + |b|^2 clamped at 0: one matmul, as ADM."""
    d = (a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None]
    return d.clamp_(min=0)


def _kth_radii(f, k, block):
    """Squared distance from each row of f (N, D) to its k-th nearest other row, by blocks."""
    radii = []
    for i in range(0, len(f), block):
        d = _sq_dists(f[i:i + block], f)
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def precision_recall(ref_features, gen_features, k=PR_K, block=PR_BLOCK, device=None):
    """Improved precision and recall (Kynkäänniemi et al. 2019, as ADM's evaluator), distances in
    float32, TF32 off. A set's manifold is the union of balls around its features, each reaching
    the k-th nearest neighbour; precision: GEN's share inside REF's manifold, recall: conversely."""
    ref = torch.as_tensor(ref_features, dtype=torch.float32, device=device)
    gen = torch.as_tensor(gen_features, dtype=torch.float32, device=device)
    if ref.ndim != 2 or ref.shape[1:] != gen.shape[1:]:
        got = f"{tuple(ref.shape)}, {tuple(gen.shape)}"
        raise ValueError(f"precision_recall: need (N, D) features, got {got}")
    if min(len(ref), len(gen)) <= k:
        raise ValueError(f"precision_recall: need more than k={k} features per set")
    with _no_tf32():
        r_ref = _kth_radii(ref, k, block)
        r_gen = _kth_radii(gen, k, block)
        ref_in = torch.zeros_like(r_ref, dtype=torch.bool)
        gen_in = torch.zeros_like(r_gen, dtype=torch.bool)
        # a GEN feature is in REF's manifold if in some REF ball, and conversely; d: a tile
        for i in range(0, len(ref), block):
            for j in range(0, len(gen), block):
                d = _sq_dists(ref[i:i + block], gen[j:j + block])
                gen_in[j:j + block] |= (d <= r_ref[i:i + block, None]).any(0)
                ref_in[i:i + block] |= (d <= r_gen[None, j:j + block]).any(1)
    return gen_in.double().mean().item(), ref_in.double().mean().item()


# ---- TF32 off: what the network and the P/R distances run under, whatever the caller set.
# torch >= 2.9 sets TF32 per op (cuDNN conv, CUDA matmul), older torch by allow_tf32 flags
_PER_OP_TF32 = hasattr(torch.backends.cudnn, "conv")


@contextlib.contextmanager
def _no_tf32():
    """cuDNN convolutions and CUDA matmuls in full float32 (TF32 off), as TF ran them, then the
    caller's settings back: the per-op ones ("ieee") where torch has them (there the legacy
    `cudnn.allow_tf32 = False` only resets conv to "none", which inherits the global setting, and
    the legacy flags cannot be read once a caller used the per-op API), else the legacy flags."""
    cudnn = torch.backends.cudnn
    matmul = torch.backends.cuda.matmul
    # (object, attribute, its TF32-off value): the convolutions', then the matmuls'
    if _PER_OP_TF32:
        flags = [(cudnn.conv, "fp32_precision", "ieee"), (matmul, "fp32_precision", "ieee")]
    else:
        flags = [(cudnn, "allow_tf32", False), (matmul, "allow_tf32", False)]
    before = [getattr(obj, name) for obj, name, _ in flags]
    for obj, name, off in flags:
        setattr(obj, name, off)
    try:
        yield
    finally:
        for (obj, name, _), value in zip(flags, before):
            setattr(obj, name, value)


# ---- Inputs: the Inception weights; a folder of images, or an npz of images (`arr_0`) and/or
# statistics, its images memory-mapped.
def load_inception(path, fold=True):
    """FID Inception weights (torchvision's key names) -> InceptionV3, eval mode, BatchNorms folded
    unless fold=False. Keys and shapes are checked first: another Inception is refused in a line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; download {FID_WEIGHTS_URL}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise ValueError(f"{path}: not a torch checkpoint") from None
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    model = InceptionV3()
    want = model.state_dict()
    # older PyTorch saved no BatchNorm batch counters: they may be missing
    missing = [k for k in want if k not in sd and not k.endswith("num_batches_tracked")]
    extra = [k for k in sd if k not in want]
    if missing or extra:
        aux = any(k.startswith("AuxLogits") for k in extra)
        hint = " (torchvision's ImageNet Inception?)" if aux else ""
        keys = f"missing {missing[:3]}, extra {extra[:3]}"
        raise ValueError(f"{path}: not the FID weights{hint}; {keys}")
    for k, v in sd.items():
        if v.shape != want[k].shape:
            raise ValueError(f"{path}: {k} has shape {tuple(v.shape)}, not {tuple(want[k].shape)}")
    model.load_state_dict(sd, strict=False)
    if fold:
        for m in model.modules():
            if isinstance(m, BasicConv2d):
                m.fold()
    return model.eval().requires_grad_(False)


def open_source(path, image_size=None):
    """REF/GEN path -> (a Dataset of (uint8 (3, H, W) image, label) items or None, its stored
    float64 statistics or None). A folder: common.ImageFolder(labels=False), every image under
    it in ADM's order, ADM's centre crop to image_size (None: as stored, sizes may differ). An
    npz holds arr_0 and/or the statistics mu, sigma (FID) and maybe mu_s, sigma_s (sFID), their
    dimensions checked."""
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found")
    if os.path.isdir(path):
        return ImageFolder(path, image_size, labels=False), None
    if not path.endswith(".npz"):
        raise ValueError(f"{path}: expected a folder of images or an .npz")
    try:
        arr = _npz_member(path, "arr_0")
        with np.load(path) as data:
            keys = sorted(data.files)
            stats = {k: data[k].astype(np.float64) for k in STAT_KEYS if k in keys}
    except (zipfile.BadZipFile, OSError, ValueError):
        raise ValueError(f"{path}: not a readable npz") from None
    if arr is not None:
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or len(arr) == 0:
            raise ValueError(f"{path}: arr_0 is {arr.dtype} {arr.shape}, not uint8 NHWC RGB")
    complete = sorted(stats) in (["mu", "sigma"], sorted(STAT_KEYS))
    if (arr is None and not stats) or (stats and not complete):
        raise ValueError(f"{path}: expected arr_0 and/or mu, sigma[, mu_s, sigma_s]; found {keys}")
    for mu, sigma, d in (("mu", "sigma", POOL_DIM), ("mu_s", "sigma_s", SPATIAL_DIM)):
        if mu in stats and (stats[mu].shape, stats[sigma].shape) != ((d,), (d, d)):
            got = f"{mu} {stats[mu].shape}, {sigma} {stats[sigma].shape}"
            raise ValueError(f"{path}: {got}; expected D = {d}")
    return None if arr is None else ArrayImages(arr), stats or None


class ArrayImages(torch.utils.data.Dataset):
    """uint8 NHWC images from an array, maybe memory-mapped (so read without workers), as
    ImageFolder's items: (uint8 (3, H, W), label 0)."""

    def __init__(self, array):
        self.array = array

    def __len__(self):
        return len(self.array)

    def __getitem__(self, i):
        return torch.from_numpy(np.array(self.array[i])).permute(2, 0, 1), 0


def _npz_member(path, name):
    """The array `name` of an npz, or None if absent. np.savez stores it uncompressed: then it is
    memory-mapped (50k 256x256 samples are 9.8 GB), otherwise loaded."""
    with zipfile.ZipFile(path) as zf:
        if name + ".npy" not in zf.namelist():
            return None
        info = zf.getinfo(name + ".npy")
    stored = info.compress_type == zipfile.ZIP_STORED
    array = _memmap_npy(path, info.header_offset) if stored else None
    if array is None:
        with np.load(path) as data:
            array = data[name]
    return array


def _memmap_npy(path, offset):
    """The .npy of the zip member whose local header starts at `offset`, memory-mapped; None for
    a format version, dtype or layout that cannot be mapped."""
    fmt = np.lib.format
    with open(path, "rb") as f:
        # a zip local header is 30 bytes, the last 4 the name's and extra field's lengths
        f.seek(offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        f.seek(offset + 30 + name_len + extra_len)
        version = fmt.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            return None
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        start = f.tell()
    if dtype.hasobject or fortran:
        return None
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=start)


# ---- Feature extraction (in one process or split across torchrun ranks).
@torch.inference_mode()
@_no_tf32()
def extract_features(model, dataset, batch_size=50, device="cpu", num_workers=0,
                     progress=True, protocol="adm"):
    """A dataset of (uint8 image, label) items -> pool (N, 2048), logits (N, 1008), spatial
    (N, 2023): float32 numpy arrays in dataset order, computed with TF32 off whatever the
    caller's setting. Under torch.distributed each rank encodes one contiguous slice and all get
    the gathered features; an unreadable image stops every rank with its one line."""
    ddp = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if ddp else 0
    world = dist.get_world_size() if ddp else 1
    device = torch.device(device)
    n = len(dataset)
    # rank r encodes images [r * per_rank, (r + 1) * per_rank), per_rank = ceil(n / world)
    per_rank = -(-n // world)
    first = min(n, rank * per_rank)
    part = torch.utils.data.Subset(dataset, range(first, min(n, first + per_rank)))
    # an array, maybe a memory map, is read in this process
    if isinstance(dataset, ArrayImages):
        num_workers = 0
    loader = torch.utils.data.DataLoader(part, batch_size, num_workers=num_workers,
                                         collate_fn=_collate, pin_memory=device.type == "cuda")
    model = model.to(device).to(memory_format=torch.channels_last)
    outs = []
    error = ""
    try:
        for batch in tqdm(loader, desc="inception", unit="batch", disable=not progress or rank > 0):
            # (B, 3, 299, 299), channels-last as the model: cuDNN's faster layout
            x = [preprocess(t.to(device, non_blocking=True), protocol) for t in batch]
            x = torch.cat(x).contiguous(memory_format=torch.channels_last)
            outs.append([f.float() for f in model.features(x)])
    except UserError as e:
        # ImageFolder's unreadable image, raised here or in a loader worker: told to every rank
        error = error_line(e)
    # a rank may get no images (fewer than ranks) or fail at once: empty features
    feats = [torch.zeros(0, d, device=device) for d in (POOL_DIM, NUM_CLASSES, SPATIAL_DIM)]
    if outs:
        feats = [torch.cat(f) for f in zip(*outs)]
    if world > 1:
        feats = _gather(feats, error, per_rank, n)
    elif error:
        raise ValueError(error)
    return tuple(f.cpu().numpy() for f in feats)


def _collate(items):
    """(uint8 (3, H, W) image, label) items -> [one batch of images], or one batch per image when
    their sizes differ (each is then resized alone)."""
    images = [image for image, _ in items]
    if len({t.shape for t in images}) == 1:
        return [torch.stack(images)]
    return [t[None] for t in images]


def _gather(feats, error, per_rank, n):
    """Each rank's features, zero-padded to per_rank rows -> all n rows, on every rank. If one
    failed, all raise (its own message, the others a generic one), not wait in all_gather."""
    failed = torch.tensor([float(bool(error))], device=feats[0].device)
    dist.all_reduce(failed)
    if failed.item():
        raise ValueError(error or "feature extraction failed on another rank")
    world = dist.get_world_size()
    gathered = []
    # rank order is dataset order; the last rank's padding is dropped
    for f in feats:
        pad = f.new_zeros(per_rank - len(f), f.shape[1])
        parts = [f.new_empty(per_rank, f.shape[1]) for _ in range(world)]
        dist.all_gather(parts, torch.cat([f, pad]))
        gathered.append(torch.cat(parts)[:n])
    return gathered


# ---- Evaluation: features (or stored statistics) of REF and GEN -> the metrics.
def load_features(source, model=None, protocol="adm", stats="stored", batch_size=50,
                  device="cpu", num_workers=0, progress=True, image_size=None):
    """REF/GEN path -> a dict for `evaluate`, reusable for several GENs: protocol; stats, stats_s,
    each (mean, covariance) or None; pool and logits, arrays or None. stats="stored" takes an npz's
    stored statistics, as ADM's evaluator, "images" recomputes them. Folders: see open_source."""
    if stats not in ("stored", "images"):
        raise ValueError(f"load_features: stats is 'stored' or 'images', not {stats!r}")
    images, stored = open_source(source, image_size)
    if images is None and stats == "images":
        raise ValueError(f"{source}: holds only statistics, no images (arr_0)")
    out = dict(protocol=protocol, stats=None, stats_s=None, pool=None, logits=None)
    if stored is not None and stats == "stored":
        out["stats"] = (stored["mu"], stored["sigma"])
        if "mu_s" in stored:
            out["stats_s"] = (stored["mu_s"], stored["sigma_s"])
    if images is None:
        return out
    pool, logits, spatial = extract_features(
        model, images, batch_size=batch_size, device=device, num_workers=num_workers,
        progress=progress, protocol=protocol)
    out.update(pool=pool, logits=logits)
    if out["stats"] is None:
        out.update(stats=statistics(pool), stats_s=statistics(spatial))
    return out


def evaluate(ref, gen, model=None, protocol="adm", ref_stats="stored", batch_size=50,
             device="cpu", num_workers=0, progress=True, image_size=None):
    """REF, GEN (paths or `load_features` dicts) -> {fid; where they apply: sfid (spatial
    statistics on both sides), inception_score (GEN's images), precision and recall (images on
    both sides); num_ref, num_gen}. ref_stats is REF's `stats` choice."""
    kw = dict(protocol=protocol, batch_size=batch_size, device=device, num_workers=num_workers,
              progress=progress, image_size=image_size)
    if not isinstance(ref, dict):
        ref = load_features(ref, model, stats=ref_stats, **kw)
    if not isinstance(gen, dict):
        gen = load_features(gen, model, **kw)
    used = (ref["protocol"], gen["protocol"])
    if used != (protocol, protocol):
        raise ValueError(f"REF/GEN features use protocol {used}, not {protocol!r}")
    out = dict(fid=frechet_distance(*gen["stats"], *ref["stats"]))
    if ref["stats_s"] is not None and gen["stats_s"] is not None:
        out["sfid"] = frechet_distance(*gen["stats_s"], *ref["stats_s"])
    if gen["logits"] is not None:
        out["inception_score"] = inception_score(gen["logits"])
    if ref["pool"] is not None and gen["pool"] is not None:
        out["precision"], out["recall"] = precision_recall(ref["pool"], gen["pool"], device=device)
    for key, side in (("num_ref", ref), ("num_gen", gen)):
        if side["pool"] is not None:
            out[key] = len(side["pool"])
    return out


# ---- Command line.
def main(args):
    """GEN's metrics against REF printed (and written to --json), or with --save-stats REF's
    statistics saved to GEN; every rank under torchrun encodes its share of the images."""
    if args.batch_size < 1 or (args.num_workers or 0) < 0 or (args.image_size or 0) < 0:
        raise UserError("--batch-size must be >= 1; --num-workers, --image-size >= 0")
    # Setup DDP: one process per GPU (nccl) or per CPU slot (gloo) under torchrun
    rank, _, device = setup_ddp(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    workers = args.num_workers
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if cuda else 0
    # --image-size unset: ADM's centre crop to 256 under adm, the images as stored under pytorch-fid
    image_size = args.image_size
    if image_size is None and args.protocol == "adm":
        image_size = ADM_IMAGE_SIZE
    image_size = image_size or None

    # Inputs, checked before the weights are read; the network
    for source in [args.ref] if args.save_stats else [args.ref, args.gen]:
        open_source(source)
    model = load_inception(args.weights)

    # Features and metrics, on every rank
    kw = dict(protocol=args.protocol, batch_size=args.batch_size, device=device,
              num_workers=workers, progress=not args.no_progress, image_size=image_size)
    if args.save_stats:
        feats = load_features(args.ref, model, stats="images", **kw)
    else:
        metrics = evaluate(args.ref, args.gen, model, ref_stats=args.ref_stats, **kw)
    cleanup_ddp()
    if rank != 0:
        return

    # Rank 0 reports
    if args.save_stats:
        stats = dict(zip(STAT_KEYS, (*feats["stats"], *feats["stats_s"])))
        atomic_write(args.gen, lambda f: np.savez(f, **stats))
        crop = ""
        if os.path.isdir(args.ref) and image_size:
            crop = f", ADM centre crop to {image_size} px"
        print(f"saved statistics of {len(feats['pool'])} images{crop} to {args.gen}")
        return
    for key, name in METRIC_NAMES.items():
        if key in metrics:
            print(f"{name}: {metrics[key]}")
    if args.json:
        record = dict(metrics, ref=args.ref, gen=args.gen, protocol=args.protocol,
                      ref_stats=args.ref_stats, folder_image_size=image_size or 0)
        save_json(record, args.json)


def build_parser():
    p = argparse.ArgumentParser(description="FID, sFID, IS, precision, recall (ADM's evaluator).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("ref", help="image folder, or npz of arr_0 and/or statistics")
    p.add_argument("gen", help="the same kinds; with --save-stats, the output .npz")
    p.add_argument("--weights", required=True, help="pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--protocol", choices=PROTOCOLS, default="adm",
                   help="adm: ADM's evaluator, the paper's; pytorch-fid: pytorch-fid's")
    p.add_argument("--ref-stats", choices=("stored", "images"), default="stored",
                   help="npz REF: FID from its stored statistics (ADM) or images")
    p.add_argument("--image-size", type=int, default=None,
                   help="folders: ADM's centre crop to this size, 0: none; unset: "
                        f"{ADM_IMAGE_SIZE} under adm, none under pytorch-fid")
    p.add_argument("--batch-size", type=int, default=50, help="images per batch, per rank")
    p.add_argument("--device", help="cpu, cuda (this rank's GPU) or cuda:N; unset: cuda if any")
    p.add_argument("--num-workers", type=int,
                   help="loader workers per rank; unset: 0 on CPU, min(8, cores) on GPU")
    p.add_argument("--save-stats", action="store_true", help="save REF's statistics as GEN")
    p.add_argument("--json", help="also write the metrics to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


if __name__ == "__main__":
    run_cli(main, build_parser().parse_args())
