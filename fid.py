"""Self-contained FID / Inception Score / precision / recall, the metrics of the paper's §4.

gFID, IS, precision and recall are computed on 50k samples against the ADM ImageNet reference
batch, and rFID on ImageNet val, all with the Inception-v3 graph TensorFlow released on
2015-12-05 (the network of the original FID and IS code and of the ADM evaluator). This file
rebuilds that graph by hand, as ported to PyTorch for FID, and reads its weights
`pt_inception-2015-12-05-6726825d.pth` (torchvision key names).

    python fid.py REF GEN --weights pt_inception-2015-12-05-6726825d.pth
    python fid.py VIRTUAL_imagenet256_labeled.npz samples.npz --weights W --json metrics.json
    python fid.py --save-stats imagenet_val/ val_stats.npz --weights W   # encode a reference once
    torchrun --nproc_per_node 8 fid.py REF GEN --weights W                # split across GPUs

REF and GEN are each a folder of images (searched recursively), an `.npz` of uint8 NHWC images
under `arr_0` (ADM reference batches, `sample.py` output) or an `.npz` of statistics `mu`/`sigma`.
FID is always printed; IS needs GEN images, precision/recall need images on both sides.

Numerics follow the reference implementations: features in float32 (TF32 off on GPU), statistics
and the Fréchet distance in float64 with scipy's sqrtm; IS from the softmax of the 1008 logits
in splits of 5000 (10 splits for 50k); improved precision/recall (Kynkäänniemi et al. 2019) with
k = 3 nearest-neighbour radii, from squared Euclidean distances computed in blocks.
Two differences from ADM's TensorFlow evaluator, both as in pytorch-fid: images are resized by
torch's bilinear interpolation and scaled by 2x - 1 (TF: (x - 128) / 128), and pairwise
distances are float32 (ADM: float16 when finite).
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

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
IMAGE_EXTENSIONS = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}
INPUT_SIZE = 299        # the graph's input resolution
NUM_CLASSES = 1008      # TF's ImageNet classifier: 1000 classes + 8 unused outputs
IS_SPLIT_SIZE = 5000    # ADM: 50k samples -> 10 splits
PR_K = 3                # nearest-neighbour size of the precision/recall manifolds
PR_BLOCK = 10000        # rows/columns per distance block (10k x 10k float32 = 400 MB)


# ----------------------------------------------------------------------------------------------
# The FID Inception-v3 (TF 2015-12-05 graph). Module names follow torchvision so the weights
# load by name; the blocks differ from torchvision's where the TF graph does.

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
        if isinstance(self.bn, nn.Identity):
            return
        c, bn = self.conv, self.bn
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        folded = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding,
                           bias=True).to(c.weight.device)
        folded.weight.copy_((c.weight.double() * scale[:, None, None, None]).to(c.weight.dtype))
        folded.bias.copy_((bn.bias.double() - bn.running_mean.double() * scale).to(c.weight.dtype))
        self.conv, self.bn = folded, nn.Identity()


def _pool3x3_same(x, kind):
    """The 3x3 stride-1 'SAME' pool of the branch_pool paths. TF's average pool divides by the
    number of real (non-padding) pixels, hence count_include_pad=False."""
    if kind == "max":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


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
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_pool3x3_same(x, "avg"))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """Mixed_6a, grid 35 -> 17: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, 3, stride=2)], 1)


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
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            bd = conv(bd)
        bp = self.branch_pool(_pool3x3_same(x, "avg"))
        return torch.cat([b1, b7, bd, bp], 1)


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
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """Mixed_7b/7c: 1x1 | 1x1-(1x3,3x1) | 1x1-3x3-(1x3,3x1) | pool-1x1. The TF graph pools
    by average in Mixed_7b but by max in Mixed_7c (pool='max'), unlike the paper and torchvision."""

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
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        bp = self.branch_pool(_pool3x3_same(x, self.pool))
        return torch.cat([b1, b3, bd, bp], 1)


class InceptionV3(nn.Module):
    """The FID Inception-v3: images in [0, 1] -> (pool3 (B, 2048), logits (B, 1008)).

    Built with random weights (conv He-normal, BN identity) so a toy run can calibrate the
    BatchNorm statistics itself; `load_inception` reads the real weights.
    """

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
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, images):
        """images (B, 3, H, W) in [0, 1] -> pool3 (B, 2048), logits (B, 1008).

        The logits are pool3 @ fc.weight^T *without* fc.bias: TF's `softmax/logits/MatMul`,
        which the original Inception Score code and the ADM evaluator read (torch-fidelity's
        'logits_unbiased'). fc.bias is kept so the checkpoint round-trips.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"InceptionV3: expected images (B, 3, H, W), got "
                             f"{tuple(images.shape)}")
        x = images
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear",
                              align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))   # 149 -> 147
        x = F.max_pool2d(x, 3, stride=2)                                      # 73
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                        # 71
        x = F.max_pool2d(x, 3, stride=2)                                      # 35
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6a(x)                                                  # 17
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))                    # 8
        pool = x.mean(dim=(2, 3))                    # pool_3: 8x8 VALID average pool
        return pool, F.linear(pool, self.fc.weight)

    def fold_batchnorm(self):
        """Merge every BatchNorm into its conv (inference only; the state dict loses bn.*)."""
        self.eval()
        for m in self.modules():
            if isinstance(m, BasicConv2d):
                m.fold()
        return self


def load_inception(path, fold=True):
    """Read the FID Inception weights (torchvision key names) -> InceptionV3 in eval mode,
    gradients off, BatchNorm folded into the convs unless fold=False."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights {path} not found; download "
                                f"pt_inception-2015-12-05-6726825d.pth from {FID_WEIGHTS_URL}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot read as a torch checkpoint "
                         f"({type(e).__name__})") from None
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (FID Inception weights)")
    model = InceptionV3()
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        hint = " (torchvision's ImageNet Inception? use the FID weights)" if any(
            k.startswith("AuxLogits") for k in unexpected) else ""
        raise ValueError(f"{path}: not the FID Inception weights{hint}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]} ({len(missing)}/{len(unexpected)} keys)")
    for k, v in expected.items():
        if sd[k].shape != v.shape:
            raise ValueError(f"{path}: {k} has shape {tuple(sd[k].shape)}, expected "
                             f"{tuple(v.shape)} (FID Inception: 1008-way fc)")
    model.load_state_dict(sd)
    model.eval().requires_grad_(False)
    return model.fold_batchnorm() if fold else model


# ----------------------------------------------------------------------------------------------
# Metrics.

def statistics(features):
    """(N, D) features -> float64 mean (D,) and unbiased covariance (D, D)."""
    f = np.asarray(features.cpu() if torch.is_tensor(features) else features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"statistics: need features (N >= 2, D), got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}) in float64. The product's square root
    is scipy's sqrtm; only when it is not finite (singular product) is eps added to both
    diagonals; an imaginary residue larger than 1e-3 on the diagonal is an error."""
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"frechet_distance: shapes differ: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {s1.shape} vs {s2.shape}")
    with warnings.catch_warnings():          # singular products are expected (ADM: disp=False)
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(s1.shape[0]) * eps
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: sqrtm has an imaginary component "
                             f"{np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def inception_score(logits, split_size=IS_SPLIT_SIZE):
    """exp(E_x KL(p(y|x) || p(y))) per consecutive split of `split_size` samples (the last may
    be shorter, as ADM), averaged over splits. p(y|x) = softmax of the 1008 logits."""
    logits = torch.as_tensor(np.asarray(logits) if not torch.is_tensor(logits) else logits)
    if logits.ndim != 2 or len(logits) == 0:
        raise ValueError(f"inception_score: need logits (N > 0, classes), got "
                         f"{tuple(logits.shape)}")
    logp = torch.log_softmax(logits.double().cpu(), dim=1)
    scores = []
    for part in logp.split(split_size):
        log_py = torch.logsumexp(part, 0) - math.log(len(part))        # log of the mean p(y|x)
        kl = (part.exp() * (part - log_py)).sum(1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores))


def _sq_dists(a, b):
    """Squared Euclidean distances (len(a), len(b)) by |a|^2 - 2ab + |b|^2, clamped at 0."""
    d = (a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None]
    return d.clamp_(min=0)


def _manifold_radii(x, k, block):
    """Squared distance from each row of x to its k-th nearest other row (self is the 0-th)."""
    radii = torch.empty(len(x), dtype=x.dtype, device=x.device)
    for i in range(0, len(x), block):
        best = None                                         # running k+1 smallest per row
        for j in range(0, len(x), block):
            d = _sq_dists(x[i:i + block], x[j:j + block])
            if best is not None:
                d = torch.cat([best, d], 1)
            best = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values
        radii[i:i + block] = best[:, k]
    return radii


def precision_recall(ref_features, gen_features, k=PR_K, block=PR_BLOCK, device=None):
    """Improved precision/recall: the reference (generated) manifold is the union of balls
    around each reference (generated) feature reaching its k-th nearest neighbour. precision =
    share of generated features inside the reference manifold, recall = share of reference
    features inside the generated one (distance <= radius). Blocks of `block` rows/columns."""
    def as_tensor(f):
        f = torch.as_tensor(np.asarray(f) if not torch.is_tensor(f) else f)
        return f.to(device or f.device, torch.float32)
    ref, gen = as_tensor(ref_features), as_tensor(gen_features)
    if ref.ndim != 2 or gen.ndim != 2 or ref.shape[1] != gen.shape[1]:
        raise ValueError(f"precision_recall: need (N, D) features of equal D, got "
                         f"{tuple(ref.shape)} and {tuple(gen.shape)}")
    if min(len(ref), len(gen)) <= k:
        raise ValueError(f"precision_recall: need more than k={k} features per set, got "
                         f"{len(ref)} and {len(gen)}")
    r_ref, r_gen = _manifold_radii(ref, k, block), _manifold_radii(gen, k, block)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=ref.device)   # recall
    gen_in = torch.zeros(len(gen), dtype=torch.bool, device=ref.device)   # precision
    for i in range(0, len(ref), block):
        for j in range(0, len(gen), block):
            d = _sq_dists(ref[i:i + block], gen[j:j + block])
            gen_in[j:j + block] |= (d <= r_ref[i:i + block, None]).any(0)
            ref_in[i:i + block] |= (d <= r_gen[None, j:j + block]).any(1)
    return gen_in.double().mean().item(), ref_in.double().mean().item()


# ----------------------------------------------------------------------------------------------
# Inputs: a folder of images, an npz of uint8 NHWC images (`arr_0`), an npz of `mu`/`sigma`.

class ImageFiles(torch.utils.data.Dataset):
    """Images under a folder (recursive, sorted), as uint8 (3, H, W) tensors. An unreadable file
    comes back as an error string so the caller can stop with one line naming it."""

    def __init__(self, root):
        self.files = sorted(p for p in Path(root).rglob("*")
                            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not self.files:
            raise ValueError(f"{root}: no images found (extensions {sorted(IMAGE_EXTENSIONS)})")

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            with Image.open(self.files[i]) as im:
                a = np.asarray(im.convert("RGB"))
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            return f"{self.files[i]}: unreadable image ({reason})"
        return torch.from_numpy(a.copy()).permute(2, 0, 1)


class ArrayImages(torch.utils.data.Dataset):
    """uint8 NHWC images from an array (memory-mapped for uncompressed npz)."""

    def __init__(self, array):
        self.array = array

    def __len__(self):
        return len(self.array)

    def __getitem__(self, i):
        return torch.from_numpy(np.array(self.array[i])).permute(2, 0, 1)

    def __getstate__(self):
        """Data-loader workers reopen a memory map instead of receiving a pickled copy."""
        a = self.array
        if isinstance(a, np.memmap):
            return {"memmap": (a.filename, a.dtype, a.shape, a.offset)}
        return {"array": a}

    def __setstate__(self, state):
        if "memmap" in state:
            filename, dtype, shape, offset = state["memmap"]
            state = {"array": np.memmap(filename, dtype=dtype, mode="r", shape=shape, offset=offset)}
        self.array = state["array"]


def _npz_member(path, name):
    """The array `name` of an npz: memory-mapped when stored uncompressed (np.savez), so 50k
    images need not fit in RAM; else loaded. None if the npz has no such member."""
    with zipfile.ZipFile(path) as zf:
        if name + ".npy" not in zf.namelist():
            return None
        info = zf.getinfo(name + ".npy")
    if info.compress_type == zipfile.ZIP_STORED:
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            head = f.read(30)
            if head[:4] == b"PK\x03\x04":
                name_len, extra_len = struct.unpack("<HH", head[26:30])
                f.seek(info.header_offset + 30 + name_len + extra_len)
                version = np.lib.format.read_magic(f)
                if version in ((1, 0), (2, 0)):
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    shape, fortran, dtype = read(f)
                    if not dtype.hasobject and not fortran:
                        return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=f.tell())
    with np.load(path) as data:
        return data[name]


def open_source(path):
    """REF/GEN -> ('images', Dataset) or ('stats', (mu, sigma)). An npz holding both images and
    statistics (ADM reference batches) is read as images, so both sides share this network."""
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found")
    if os.path.isdir(path):
        return "images", ImageFiles(path)
    if not path.endswith(".npz"):
        raise ValueError(f"{path}: expected a folder of images or an .npz "
                         f"(arr_0 images or mu/sigma)")
    try:
        with zipfile.ZipFile(path) as zf:
            keys = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
        arr = _npz_member(path, "arr_0")
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read as npz ({type(e).__name__})") from None
    if arr is not None:
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or len(arr) == 0:
            raise ValueError(f"{path}: arr_0 should be uint8 NHWC images with 3 channels, got "
                             f"{arr.dtype} {arr.shape}")
        return "images", ArrayImages(arr)
    if "mu" in keys and "sigma" in keys:
        with np.load(path) as data:
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise ValueError(f"{path}: mu {mu.shape} / sigma {sigma.shape} are not (D,) / (D, D)")
        return "stats", (mu, sigma)
    raise ValueError(f"{path}: npz holds neither arr_0 (uint8 NHWC images) nor mu and sigma "
                     f"(statistics); found {keys}")


def save_stats(path, mu, sigma):
    """Write an npz with mu/sigma (read back by open_source), atomically."""
    path = str(path)
    with open(path + ".tmp", "wb") as f:
        np.savez(f, mu=mu, sigma=sigma)
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------------------------
# Feature extraction, one process or split across torchrun ranks.

def _dist():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _collate(items):
    """A list of uint8 images -> uint8 (B, 3, H, W). Mixed sizes are each resized to 299 with
    the model's own interpolation, giving floats in [0, 1] (the model's 299 -> 299 resize is
    then skipped), so features do not depend on how images are batched. An error string (an
    unreadable file) is passed on to be raised as one line."""
    for item in items:
        if isinstance(item, str):
            return item
    if any(t.shape != items[0].shape for t in items):
        items = [F.interpolate(t[None].float() / 255, size=(INPUT_SIZE, INPUT_SIZE),
                               mode="bilinear", align_corners=False)[0] for t in items]
    return torch.stack(items)


@torch.inference_mode()
def extract_features(model, dataset, batch_size=50, device="cpu", num_workers=0, progress=True):
    """Run the Inception over a dataset of uint8 images -> (pool (N, 2048), logits (N, 1008)),
    float32 numpy in dataset order. Under torch.distributed each rank encodes a contiguous
    slice and all ranks receive the gathered features."""
    rank, world = _dist()
    device = torch.device(device)
    n = len(dataset)
    per = -(-n // world)
    part = torch.utils.data.Subset(dataset, range(min(n, rank * per), min(n, (rank + 1) * per)))
    loader = torch.utils.data.DataLoader(part, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=_collate, pin_memory=device.type == "cuda")
    model = model.to(device).to(memory_format=torch.channels_last)
    pools, logits, error = [], [], ""
    for x in tqdm(loader, desc="inception", unit="batch", disable=not progress or rank != 0):
        if isinstance(x, str):
            error = x
            break
        x = x.to(device, non_blocking=True).to(memory_format=torch.channels_last)
        x = x.float() / 255 if x.dtype == torch.uint8 else x
        p, l = model(x)
        pools.append(p.float())
        logits.append(l.float())
    pool = torch.cat(pools) if pools else torch.zeros(0, 2048, device=device)
    logit = torch.cat(logits) if logits else torch.zeros(0, NUM_CLASSES, device=device)
    if world > 1:
        failed = torch.tensor([float(bool(error))], device=device)
        dist.all_reduce(failed)
        if failed.item():
            raise ValueError(error or "feature extraction failed on another rank")
        pool, logit = _gather(pool, per, n), _gather(logit, per, n)
    elif error:
        raise ValueError(error)
    return pool.cpu().numpy(), logit.cpu().numpy()


def _gather(x, per, n):
    """all_gather equal-size (padded) slices and drop the padding -> (n, D) in dataset order."""
    padded = torch.zeros(per, x.shape[1], device=x.device, dtype=x.dtype)
    padded[:len(x)] = x
    out = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
    dist.all_gather(out, padded)
    return torch.cat(out)[:n]


def evaluate(ref, gen, model, batch_size=50, device="cpu", num_workers=0, progress=True):
    """REF, GEN (paths, or what open_source returned for them) -> dict with fid, and
    inception_score, precision, recall where they apply (IS: GEN images; P/R: images on both)."""
    ref, gen = [open_source(s) if isinstance(s, (str, Path)) else s for s in (ref, gen)]

    def encode(source):
        kind, src = source
        if kind == "stats":
            return src, None
        pool, logit = extract_features(model, src, batch_size, device, num_workers, progress)
        return statistics(pool), (pool, logit)
    ref_stats, ref_feats = encode(ref)
    gen_stats, gen_feats = encode(gen)
    out = {"fid": frechet_distance(*gen_stats, *ref_stats)}
    if gen_feats is not None:
        out["inception_score"] = inception_score(gen_feats[1])
        out["num_gen"] = len(gen_feats[0])
    if ref_feats is not None:
        out["num_ref"] = len(ref_feats[0])
    if ref_feats is not None and gen_feats is not None:
        out["precision"], out["recall"] = precision_recall(ref_feats[0], gen_feats[0],
                                                           device=device)
    return out


# ----------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description="FID / IS / precision / recall (FID Inception-v3).")
    p.add_argument("ref", help="reference: image folder, npz with arr_0, or npz with mu/sigma")
    p.add_argument("gen", help="generated: same kinds; with --save-stats, the output .npz")
    p.add_argument("--weights", required=True, help="pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default=None, help="default: cuda (cuda:LOCAL_RANK) if available")
    p.add_argument("--num-workers", type=int, default=None,
                   help="data loader workers (default: 0 on CPU, min(8, cpus) on GPU)")
    p.add_argument("--save-stats", action="store_true",
                   help="encode REF and write its mu/sigma to the path given as GEN")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
        torch.backends.cudnn.allow_tf32 = False       # float32 features, as the TF graph
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    if world > 1:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank = _dist()[0]
    num_workers = args.num_workers
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1) if device.startswith("cuda") else 0
    try:
        if args.batch_size < 1 or num_workers < 0:
            raise ValueError("--batch-size must be >= 1 and --num-workers >= 0")
        ref = open_source(args.ref)                  # check the inputs before the weights
        gen = None if args.save_stats else open_source(args.gen)
        if args.save_stats and ref[0] == "stats":
            raise ValueError(f"{args.ref}: already statistics; --save-stats needs images")
        model = load_inception(args.weights)
        kw = dict(batch_size=args.batch_size, device=device, num_workers=num_workers,
                  progress=not args.no_progress)
        if args.save_stats:
            mu, sigma = statistics(extract_features(model, ref[1], **kw)[0])
            if rank == 0:
                save_stats(args.gen, mu, sigma)
                print(f"saved statistics of {len(ref[1])} images to {args.gen}")
            return 0
        metrics = evaluate(ref, gen, model, **kw)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        names = [("fid", "FID"), ("inception_score", "IS"), ("precision", "Precision"),
                 ("recall", "Recall")]
        for key, name in names:
            if key in metrics:
                print(f"{name}: {metrics[key]}")
        if args.json:
            with open(args.json + ".tmp", "w") as f:
                json.dump(dict(metrics, ref=args.ref, gen=args.gen), f, indent=2)
            os.replace(args.json + ".tmp", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
