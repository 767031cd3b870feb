"""Self-contained FID / sFID / Inception Score / precision / recall, the metrics of the paper's §4, from TensorFlow's
2015-12-05 Inception-v3 graph as the ADM evaluator reads it (openai/guided-diffusion `evaluations/evaluator.py`,
behind the paper's numbers), rebuilt here by hand with its PyTorch port's weights.

    python fid.py VIRTUAL_imagenet256_labeled.npz samples.npz --weights W --json metrics.json
    python fid.py REF_DIR GEN_DIR --weights W --protocol pytorch-fid   # pytorch-fid's numbers
    python fid.py --save-stats imagenet_val/ val_stats.npz --weights W  # encode a reference once
    torchrun --nproc_per_node 8 fid.py REF GEN --weights W              # split across GPUs

REF/GEN: a folder of images, or an `.npz` of uint8 NHWC images `arr_0` and/or statistics `mu, sigma[, mu_s, sigma_s]`.
ADM reference batches hold both: as in ADM's evaluator the statistics give FID and sFID, the images P/R only.
Protocols: `adm` (default), the evaluator's 0..255 -> TF1 legacy ResizeBilinear to 299 -> (x - 128) / 128, or
`pytorch-fid`: x / 255 -> torch bilinear -> 2x - 1.

API (sample.py --cfg-sweep; under torchrun call it on every rank):
    model = load_inception(path)
    ref = load_features(source, model, protocol="adm", stats="stored", ...)   # a dict, reusable for several GENs
    evaluate(ref, gen, model=None, protocol="adm", ref_stats="stored", ...) -> {fid, sfid, inception_score, ...}
"""

import argparse
import json
import math
import os
import struct
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from tqdm import tqdm

from common import center_crop_arr

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
IMAGE_EXTENSIONS = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}
PROTOCOLS = ("adm", "pytorch-fid")
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")   # an npz's statistics (ADM reference batches)
INPUT_SIZE = 299            # the graph's input resolution
NUM_CLASSES = 1008          # TF's ImageNet classifier: 1000 classes + 8 unused outputs
POOL_DIM = 2048             # pool_3
SPATIAL_DIM = 17 * 17 * 7   # sFID: mixed_6/conv's first 7 channels on the 17x17 grid
IS_SPLIT_SIZE = 5000        # ADM: 50k samples -> 10 splits
PR_K = 3                    # nearest-neighbour size of the precision/recall manifolds
PR_BLOCK = 10000            # rows/columns per distance block (10k x 10k float32 = 400 MB)


# ---- The FID Inception-v3 (TF 2015-12-05 graph): torchvision's module names (the weights load by name), TF's blocks
class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU. `fold()` merges the BN into the conv."""

    def __init__(self, cin, cout, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)

    @torch.no_grad()
    def fold(self):
        """Inference only: w' = w * g / sqrt(var + eps), b' = beta - mean * g / sqrt(var + eps)."""
        c, bn = self.conv, self.bn
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        folded = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding).to(c.weight.device)
        folded.weight.copy_((c.weight.double() * scale[:, None, None, None]).to(c.weight.dtype))
        folded.bias.copy_((bn.bias.double() - bn.running_mean.double() * scale).to(c.weight.dtype))
        self.conv, self.bn = folded, nn.Identity()


def _pool3x3_same(x, kind):
    """The branch_pool paths' 3x3 stride-1 'SAME' pool; TF's average counts only real (non-padding) pixels."""
    return F.max_pool2d(x, 3, 1, 1) if kind == "max" else F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


def _chain(x, *convs):
    for conv in convs:
        x = conv(x)
    return x


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b5 = _chain(x, self.branch5x5_1, self.branch5x5_2)
        b3 = _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3)
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_pool3x3_same(x, "avg"))], 1)


class InceptionB(nn.Module):
    """Mixed_6a, grid 35 -> 17: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        bd = _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3)
        return torch.cat([self.branch3x3(x), bd, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """Mixed_6b..6e: 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1."""

    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = _chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3)
        bd = _chain(x, self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                    self.branch7x7dbl_5)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_pool3x3_same(x, "avg"))], 1)


class InceptionD(nn.Module):
    """Mixed_7a, grid 17 -> 8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = _chain(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4)
        return torch.cat([_chain(x, self.branch3x3_1, self.branch3x3_2), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """Mixed_7b/7c: 1x1 | 1x1-(1x3,3x1) | 1x1-3x3-(1x3,3x1) | pool-1x1; TF pools by average in 7b, by max in 7c."""

    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd),
                          self.branch_pool(_pool3x3_same(x, self.pool))], 1)


class InceptionV3(nn.Module):
    """The FID Inception-v3; random weights (conv He-normal, BN identity) until `load_inception` reads the real ones."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
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
        """images (B, 3, H, W) in [0, 1] -> pool3, logits, with pytorch-fid's preprocessing."""
        return self.features(_torch_resize(images))[:2]

    def features(self, x):
        """x (B, 3, 299, 299) from `preprocess` -> pool3 (B, 2048); logits (B, 1008) = pool3 @ fc.weight^T without
        bias (TF's `softmax/logits/MatMul`, as ADM's evaluator); spatial (B, 2023) for sFID = the evaluator's
        `mixed_6/conv`[..., :7] in H, W, C order (TF's mixed_6 is Mixed_6d, its `conv` the 1x1 branch)."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"InceptionV3.features: expected (B, 3, 299, 299), got {tuple(x.shape)}")
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))   # 149 -> 147
        x = F.max_pool2d(x, 3, stride=2)                                      # 73
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                        # 71
        x = F.max_pool2d(x, 3, stride=2)                                      # 35
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x))))   # 17
        spatial = x[:, :7].permute(0, 2, 3, 1).flatten(1)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))   # 8
        pool = x.mean(dim=(2, 3))                                             # pool_3: 8x8 average
        return pool, F.linear(pool, self.fc.weight), spatial


def load_inception(path, fold=True):
    """FID Inception weights (torchvision key names) -> InceptionV3 in eval mode, BatchNorm folded unless fold=False."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights {path} not found; download them from {FID_WEIGHTS_URL}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read as a torch checkpoint ({type(e).__name__})") from None
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (FID Inception weights)")
    model = InceptionV3()
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        hint = " (torchvision's ImageNet Inception? use the FID weights)" if any(
            k.startswith("AuxLogits") for k in unexpected) else ""
        raise ValueError(f"{path}: not the FID Inception weights{hint}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]} ({len(missing)}/{len(unexpected)} keys)")
    for k, v in sd.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"{path}: {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    model.load_state_dict(sd, strict=False)      # every key but num_batches_tracked checked above
    if fold:
        for m in model.modules():
            if isinstance(m, BasicConv2d):
                m.fold()
    return model.eval().requires_grad_(False)


# ---- Preprocessing: the two protocols ------------------------------------------------------------------------------
def _torch_resize(x):
    """pytorch-fid: [0, 1] -> torch bilinear (align_corners=False) to 299 -> [-1, 1]."""
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return 2 * x - 1


def tf_bilinear_resize(images, size):
    """TF1's legacy `ResizeBilinear` (align_corners=False, half_pixel_centers=False, no antialiasing) of float images
    (B, C, H, W) to size (int or (h, w)): pixel i reads s = i * in / out (float32) from floor(s), floor(s) + 1."""
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"tf_bilinear_resize: expected float (B, C, H, W), got {images.dtype} {tuple(images.shape)}")
    out_h, out_w = (size, size) if isinstance(size, int) else size

    def taps(n_in, n_out):
        s = torch.arange(n_out, dtype=torch.float32) * (torch.tensor(n_in, dtype=torch.float32) / n_out)
        lo = s.floor().long()
        return lo.to(images.device), (lo + 1).clamp(max=n_in - 1).to(images.device), (s - lo).to(images)
    (y0, y1, fy), (x0, x1, fx) = taps(images.shape[2], out_h), taps(images.shape[3], out_w)
    rows = images[..., x0] + (images[..., x1] - images[..., x0]) * fx        # TF: along x first, then along y
    return rows[..., y0, :] + (rows[..., y1, :] - rows[..., y0, :]) * fy[:, None]


def preprocess(images, protocol="adm"):
    """Images (B, 3, H, W) valued 0..255 -> the graph's input (B, 3, 299, 299), as the ADM evaluator or pytorch-fid."""
    x = images if images.is_floating_point() else images.float()
    if protocol == "pytorch-fid":
        return _torch_resize(x / 255)
    if protocol != "adm":
        raise ValueError(f"protocol: expected one of {PROTOCOLS}, got {protocol!r}")
    return (tf_bilinear_resize(x, INPUT_SIZE) - 128) / 128


# ---- Metrics -------------------------------------------------------------------------------------------------------
def statistics(features):
    """(N, D) features -> float64 mean (D,) and unbiased covariance (D, D)."""
    f = np.asarray(features.cpu() if torch.is_tensor(features) else features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"statistics: need features (N >= 2, D), got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}) in float64 as the ADM evaluator (scipy's sqrtm, eps on both
    diagonals only if the root is not finite, an imaginary diagonal over 1e-3 is an error), clamped at 0."""
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"frechet_distance: shapes differ: mu {mu1.shape}, {mu2.shape}; sigma {s1.shape}, {s2.shape}")
    with warnings.catch_warnings():          # singular products are expected (ADM: disp=False)
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(s1.shape[0]) * eps
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: sqrtm has an imaginary component {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return max(0.0, float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)))


def inception_score(logits, split_size=IS_SPLIT_SIZE):
    """Mean over consecutive splits of `split_size` (the last may be shorter, as ADM) of exp(E_x KL(p(y|x) || p(y)))."""
    logits = torch.as_tensor(logits)
    if logits.ndim != 2 or len(logits) == 0:
        raise ValueError(f"inception_score: need logits (N > 0, classes), got {tuple(logits.shape)}")
    logp = torch.log_softmax(logits.double().cpu(), dim=1)
    scores = []
    for part in logp.split(split_size):
        log_py = torch.logsumexp(part, 0) - math.log(len(part))        # log of the mean p(y|x)
        scores.append((part.exp() * (part - log_py)).sum(1).mean().exp().item())    # exp(mean KL)
    return float(np.mean(scores))


def _sq_dists(a, b):
    """Squared Euclidean distances (len(a), len(b)) by |a|^2 - 2ab + |b|^2, clamped at 0."""
    d = (a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None]
    return d.clamp_(min=0)


def precision_recall(ref_features, gen_features, k=PR_K, block=PR_BLOCK, device=None):
    """Improved precision/recall (Kynkäänniemi et al., as the ADM evaluator): precision = share of generated features
    inside the reference manifold (balls reaching each feature's k-th nearest neighbour), recall the converse."""
    ref, gen = (torch.as_tensor(f, dtype=torch.float32, device=device) for f in (ref_features, gen_features))
    if ref.ndim != 2 or gen.ndim != 2 or ref.shape[1] != gen.shape[1]:
        raise ValueError(f"precision_recall: need (N, D) features of equal D, got {tuple(ref.shape)}, "
                         f"{tuple(gen.shape)}")
    if min(len(ref), len(gen)) <= k:
        raise ValueError(f"precision_recall: need more than k={k} features per set, got {len(ref)} and {len(gen)}")
    # radii: squared distance to the k-th nearest other feature (self is the 0-th), one (block, N) slab at a time
    r_ref, r_gen = (torch.cat([_sq_dists(f[i:i + block], f).kthvalue(k + 1, dim=1).values
                               for i in range(0, len(f), block)]) for f in (ref, gen))
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=ref.device)   # recall
    gen_in = torch.zeros(len(gen), dtype=torch.bool, device=ref.device)   # precision
    for i in range(0, len(ref), block):
        for j in range(0, len(gen), block):
            d = _sq_dists(ref[i:i + block], gen[j:j + block])
            gen_in[j:j + block] |= (d <= r_ref[i:i + block, None]).any(0)
            ref_in[i:i + block] |= (d <= r_gen[None, j:j + block]).any(1)
    return gen_in.double().mean().item(), ref_in.double().mean().item()


# ---- Inputs: a folder of images, an npz of uint8 NHWC images (`arr_0`) and/or of statistics ------------------------
class ImageFiles(torch.utils.data.Dataset):
    """Images under a folder (recursive, sorted) as uint8 (3, H, W); an unreadable one as a one-line error.
    With image_size, each image is first brought to image_size x image_size by ADM's centre crop, as ADM made
    its reference batches from ImageNet (None: as stored)."""

    def __init__(self, root, image_size=None):
        self.files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        self.image_size = image_size
        if not self.files:
            raise ValueError(f"{root}: no images found (extensions {sorted(IMAGE_EXTENSIONS)})")

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            with Image.open(self.files[i]) as im:
                im = im.convert("RGB")
                a = np.asarray(center_crop_arr(im, self.image_size) if self.image_size else im)
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            return f"{self.files[i]}: unreadable image ({reason})"
        return torch.from_numpy(a.copy()).permute(2, 0, 1)


class ArrayImages(torch.utils.data.Dataset):
    """uint8 NHWC images from an array, maybe memory-mapped (extract_features reads it without workers)."""

    def __init__(self, array):
        self.array = array

    def __len__(self):
        return len(self.array)

    def __getitem__(self, i):
        return torch.from_numpy(np.array(self.array[i])).permute(2, 0, 1)


def _npz_member(path, name):
    """The array `name` of an npz (None if absent): memory-mapped when stored uncompressed (np.savez), else loaded."""
    with zipfile.ZipFile(path) as zf:
        if name + ".npy" not in zf.namelist():
            return None
        info = zf.getinfo(name + ".npy")
    if info.compress_type == zipfile.ZIP_STORED:
        with open(path, "rb") as f:                   # skip the local header to the .npy bytes
            f.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))
            f.seek(info.header_offset + 30 + name_len + extra_len)
            version = np.lib.format.read_magic(f)
            if version in ((1, 0), (2, 0)):
                shape, fortran, dtype = getattr(np.lib.format, f"read_array_header_{version[0]}_0")(f)
                if not dtype.hasobject and not fortran:
                    return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=f.tell())
    with np.load(path) as data:
        return data[name]


def open_source(path, image_size=None):
    """REF/GEN path -> (a Dataset of uint8 (3, H, W) images or None, stored float64 statistics or None); a folder's
    images are ADM-centre-cropped to image_size (None: as stored)."""
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found")
    if os.path.isdir(path):
        return ImageFiles(path, image_size), None
    if not path.endswith(".npz"):
        raise ValueError(f"{path}: expected a folder of images or an .npz (arr_0 images and/or mu/sigma statistics)")
    try:
        arr = _npz_member(path, "arr_0")
        with np.load(path) as data:
            keys = sorted(data.files)
            stats = {k: data[k].astype(np.float64) for k in STAT_KEYS if k in keys}
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read as npz ({type(e).__name__})") from None
    if arr is not None and (arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or len(arr) == 0):
        raise ValueError(f"{path}: arr_0 should be uint8 NHWC images with 3 channels, got {arr.dtype} {arr.shape}")
    if (arr is None and not stats) or (stats and sorted(stats) not in (["mu", "sigma"], sorted(STAT_KEYS))):
        raise ValueError(f"{path}: expected arr_0 (uint8 NHWC images) and/or statistics mu, sigma[, mu_s, "
                         f"sigma_s]; found {keys}")
    for m, s, d in (("mu", "sigma", POOL_DIM), ("mu_s", "sigma_s", SPATIAL_DIM)):
        if m in stats and (stats[m].shape != (d,) or stats[s].shape != (d, d)):
            raise ValueError(f"{path}: {m} {stats[m].shape} / {s} {stats[s].shape}, expected ({d},) / ({d}, {d})")
    return (None if arr is None else ArrayImages(arr)), (stats or None)


# ---- Feature extraction (one process or split across torchrun ranks) and the evaluation ---------------------------
def _collate(items):
    """uint8 (3, H, W) images -> [one batch], or one batch per image when sizes differ; passes an error string on."""
    error = next((t for t in items if isinstance(t, str)), None)
    return error or ([torch.stack(items)] if len({t.shape for t in items}) == 1 else [t[None] for t in items])


@torch.inference_mode()
def extract_features(model, dataset, batch_size=50, device="cpu", num_workers=0, progress=True, protocol="adm"):
    """A dataset of uint8 images -> pool (N, 2048), logits (N, 1008), spatial (N, 2023): float32 numpy in
    dataset order. Under torch.distributed each rank encodes a slice and all receive the gathered features."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    device, n = torch.device(device), len(dataset)
    per = -(-n // world)
    part = torch.utils.data.Subset(dataset, range(min(n, rank * per), min(n, (rank + 1) * per)))
    workers = 0 if isinstance(dataset, ArrayImages) else num_workers
    loader = torch.utils.data.DataLoader(part, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                                         pin_memory=device.type == "cuda")
    model = model.to(device).to(memory_format=torch.channels_last)
    outs, error = [], ""
    for x in tqdm(loader, desc="inception", unit="batch", disable=not progress or rank != 0):
        if isinstance(x, str):
            error = x
            break
        x = torch.cat([preprocess(t.to(device, non_blocking=True), protocol) for t in x])
        outs.append([f.float() for f in model.features(x.contiguous(memory_format=torch.channels_last))])
    feats = [torch.cat(f) for f in zip(*outs)] if outs else [
        torch.zeros(0, d, device=device) for d in (POOL_DIM, NUM_CLASSES, SPATIAL_DIM)]
    if world > 1:
        failed = torch.tensor([float(bool(error))], device=device)
        dist.all_reduce(failed)
        if failed.item():
            raise ValueError(error or "feature extraction failed on another rank")
        gathered = [[f.new_empty(per, f.shape[1]) for _ in range(world)] for f in feats]
        for f, out in zip(feats, gathered):     # equal-size (zero-padded) slices, the padding dropped below
            dist.all_gather(out, torch.cat([f, f.new_zeros(per - len(f), f.shape[1])]))
        feats = [torch.cat(out)[:n] for out in gathered]
    elif error:
        raise ValueError(error)
    return tuple(f.cpu().numpy() for f in feats)


def load_features(source, model=None, protocol="adm", stats="stored", batch_size=50, device="cpu",
                  num_workers=0, progress=True, image_size=None):
    """REF/GEN path -> a reusable dict of protocol, stats, stats_s (or None), pool, logits (or None) for `evaluate`.
    stats="stored" takes an npz's stored statistics (as ADM's evaluator), "images" recomputes them; a folder's
    images are ADM-centre-cropped to image_size first (None: as stored)."""
    if stats not in ("stored", "images"):
        raise ValueError(f"load_features: stats must be 'stored' or 'images', got {stats!r}")
    images, stored = open_source(source, image_size)
    if images is None and stats == "images":
        raise ValueError(f"{source}: holds only statistics; recomputing them needs images (arr_0)")
    out = dict(protocol=protocol, stats=None, stats_s=None, pool=None, logits=None)
    if stored is not None and stats == "stored":
        out["stats"] = stored["mu"], stored["sigma"]
        out["stats_s"] = (stored["mu_s"], stored["sigma_s"]) if "mu_s" in stored else None
    if images is not None:
        out["pool"], out["logits"], spatial = extract_features(model, images, batch_size, device, num_workers,
                                                               progress, protocol)
        if out["stats"] is None:
            out["stats"], out["stats_s"] = statistics(out["pool"]), statistics(spatial)
    return out


def evaluate(ref, gen, model=None, protocol="adm", ref_stats="stored", batch_size=50, device="cpu",
             num_workers=0, progress=True, image_size=None):
    """REF, GEN (paths or `load_features` dicts) -> {fid, and where they apply sfid (spatial statistics on
    both sides), inception_score (GEN images), precision, recall (images on both), num_ref, num_gen}."""
    kw = dict(protocol=protocol, batch_size=batch_size, device=device, num_workers=num_workers, progress=progress,
              image_size=image_size)
    ref = ref if isinstance(ref, dict) else load_features(ref, model, stats=ref_stats, **kw)
    gen = gen if isinstance(gen, dict) else load_features(gen, model, **kw)
    if ref["protocol"] != protocol or gen["protocol"] != protocol:
        raise ValueError(f"REF/GEN features use protocol {ref['protocol']}/{gen['protocol']}, not {protocol}")
    out = {"fid": frechet_distance(*gen["stats"], *ref["stats"])}
    if ref["stats_s"] is not None and gen["stats_s"] is not None:
        out["sfid"] = frechet_distance(*gen["stats_s"], *ref["stats_s"])
    if gen["logits"] is not None:
        out["inception_score"] = inception_score(gen["logits"])
    if ref["pool"] is not None and gen["pool"] is not None:
        out["precision"], out["recall"] = precision_recall(ref["pool"], gen["pool"], device=device)
    out.update({f"num_{k}": len(f["pool"]) for k, f in (("ref", ref), ("gen", gen)) if f["pool"] is not None})
    return out


# ---- Command line --------------------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description="FID / sFID / IS / precision / recall (FID Inception-v3).")
    p.add_argument("ref", help="reference: image folder, npz with arr_0 and/or mu, sigma[, mu_s, sigma_s]")
    p.add_argument("gen", help="generated: same kinds; with --save-stats, the output .npz")
    p.add_argument("--weights", required=True, help="pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--protocol", choices=PROTOCOLS, default="adm", help="preprocessing: ADM evaluator's (paper)")
    p.add_argument("--ref-stats", choices=("stored", "images"), default="stored",
                   help="REF npz with images and statistics: FID/sFID from the stored ones (ADM) or its images")
    p.add_argument("--image-size", type=int, default=256,
                   help="folders only: ADM's centre crop of each image to this size first, as the ADM reference "
                        "batches were made from ImageNet (512 for the 512 batch; 0: as stored)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default=None, help="default: cuda (cuda:LOCAL_RANK) if available")
    p.add_argument("--num-workers", type=int, default=None, help="default: 0 on CPU, min(8, cpus) on GPU")
    p.add_argument("--save-stats", action="store_true", help="write REF's mu, sigma, mu_s, sigma_s to GEN")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False   # float32, as TF
        torch.backends.cudnn.benchmark = True
    if world > 1:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    num_workers = args.num_workers
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1) if device.startswith("cuda") else 0
    try:
        if args.batch_size < 1 or num_workers < 0 or args.image_size < 0:
            raise ValueError("--batch-size must be >= 1, --num-workers and --image-size >= 0")
        for source in [args.ref] if args.save_stats else [args.ref, args.gen]:
            open_source(source)                       # check the inputs before the weights
        model = load_inception(args.weights)
        kw = dict(protocol=args.protocol, batch_size=args.batch_size, device=device, num_workers=num_workers,
                  progress=not args.no_progress, image_size=args.image_size or None)
        if args.save_stats:
            feats = load_features(args.ref, model, stats="images", **kw)
        else:
            metrics = evaluate(args.ref, args.gen, model, ref_stats=args.ref_stats, **kw)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2  # at once, without waiting for the other ranks: torchrun then stops them
    if world > 1:
        dist.destroy_process_group()
    if rank == 0 and args.save_stats:
        with open(args.gen + ".tmp", "wb") as f:
            np.savez(f, **dict(zip(STAT_KEYS, (*feats["stats"], *feats["stats_s"]))))
        os.replace(args.gen + ".tmp", args.gen)       # atomically, as the JSON below
        crop = f", ADM centre crop to {args.image_size} px" if os.path.isdir(args.ref) and args.image_size else ""
        print(f"saved statistics of {len(feats['pool'])} images{crop} to {args.gen}")
    elif rank == 0:
        names = {"fid": "FID", "sfid": "sFID", "inception_score": "IS", "precision": "Precision", "recall": "Recall"}
        print("\n".join(f"{name}: {metrics[key]}" for key, name in names.items() if key in metrics))
        if args.json:
            with open(args.json + ".tmp", "w") as f:
                json.dump(dict(metrics, ref=args.ref, gen=args.gen, protocol=args.protocol, ref_stats=args.ref_stats,
                               folder_image_size=args.image_size), f, indent=2)
            os.replace(args.json + ".tmp", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
