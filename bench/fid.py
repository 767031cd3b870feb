"""Inception feature-extraction throughput: fid.py against a straightforward torchvision pipeline.

    python bench/fid.py [--images 48] [--size 64] [--batch-size 16] [--device cpu]

Both sides encode the same folder of PNGs with the same random weights (written in the real
`pt_inception-2015-12-05` key layout) and must agree on the pool3 features. The baseline is what
one writes first: torchvision's inception_v3 with the FID blocks patched in, PIL loading +
transforms.ToTensor through a DataLoader, resize to 299 and 2x - 1, NCHW, BatchNorm unfused: the
pytorch-fid protocol, which fid.py runs for the comparison. fid.py folds BatchNorm into the convs
at load time and runs channels_last; its default protocol (adm: TF1's resize, which also yields
the sFID features) is timed too. Prints a summary line and a JSON record (images/s of each,
speed-up, max relative feature difference).
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision.models import inception as tvi

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fid  # noqa: E402
from common import ImageFolder  # noqa: E402


# The FID graph's blocks as patches of torchvision's: TF's average pools skip the padding, and
# Mixed_7c pools by max.
class PatchedA(tvi.InceptionA):
    def _forward(self, x):
        return [self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False))]


class PatchedC(tvi.InceptionC):
    def _forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for m in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
            bd = m(bd)
        return [self.branch1x1(x), b7, bd,
                self.branch_pool(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False))]


class PatchedE(tvi.InceptionE):
    def __init__(self, cin, max_pool):
        super().__init__(cin)
        self.max_pool = max_pool

    def _forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        p = (F.max_pool2d(x, 3, 1, 1) if self.max_pool
             else F.avg_pool2d(x, 3, 1, 1, count_include_pad=False))
        return [self.branch1x1(x), torch.cat([self.branch3x3_2a(a), self.branch3x3_2b(a)], 1),
                torch.cat([self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b)], 1),
                self.branch_pool(p)]


def torchvision_fid_inception(state_dict):
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008,
                                          init_weights=False)
    net.Mixed_5b, net.Mixed_5c = PatchedA(192, 32), PatchedA(256, 64)
    net.Mixed_5d = PatchedA(288, 64)
    net.Mixed_6b, net.Mixed_6c = PatchedC(768, 128), PatchedC(768, 160)
    net.Mixed_6d, net.Mixed_6e = PatchedC(768, 160), PatchedC(768, 192)
    net.Mixed_7b, net.Mixed_7c = PatchedE(1280, max_pool=False), PatchedE(2048, max_pool=True)
    net.load_state_dict(state_dict)
    fc, net.fc = net.fc, torch.nn.Identity()                 # the net now returns pool3
    return net.eval(), fc.weight


class PILFolder(torch.utils.data.Dataset):
    def __init__(self, files):
        self.files = files
        self.to_tensor = torchvision.transforms.ToTensor()

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return self.to_tensor(Image.open(self.files[i]).convert("RGB"))


@torch.inference_mode()
def run_torchvision(net, fc_weight, files, batch_size, device):
    loader = torch.utils.data.DataLoader(PILFolder(files), batch_size=batch_size)
    pools = []
    for x in loader:
        x = F.interpolate(x.to(device), size=(299, 299), mode="bilinear", align_corners=False)
        pool = net(2 * x - 1)
        pools.append(pool)
        _ = pool @ fc_weight.T                               # logits, as fid.py computes them
    return torch.cat(pools).cpu().numpy()


def timed(fn, repeats):
    fn()                                                      # warm-up (allocator, oneDNN)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        state = fid.InceptionV3().state_dict()
        weights = os.path.join(tmp, "pt_inception-2015-12-05-6726825d.pth")
        torch.save(state, weights)
        rng = np.random.default_rng(0)
        files = []
        for i in range(args.images):
            files.append(os.path.join(tmp, f"{i:05d}.png"))
            pixels = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(files[-1])

        ours = fid.load_inception(weights)
        dataset = ImageFolder(tmp, None, labels=False)          # as stored: fid.py's folder reader
        t_ours, (pool_ours, _, _) = timed(lambda: fid.extract_features(
            ours, dataset, args.batch_size, device, num_workers=0, progress=False, protocol="pytorch-fid"),
            args.repeats)
        t_adm, _ = timed(lambda: fid.extract_features(
            ours, dataset, args.batch_size, device, num_workers=0, progress=False, protocol="adm"), args.repeats)

        net, fc_weight = torchvision_fid_inception(state)
        net, fc_weight = net.to(device), fc_weight.to(device)
        t_tv, pool_tv = timed(lambda: run_torchvision(net, fc_weight, files, args.batch_size,
                                                      device), args.repeats)

    diff = float(np.abs(pool_ours - pool_tv).max() / np.abs(pool_tv).max())
    record = {
        "bench": "fid_inception_features", "device": str(device),
        "threads": torch.get_num_threads(),
        "images": args.images, "image_size": args.size, "batch_size": args.batch_size,
        "ours_images_per_s": args.images / t_ours, "torchvision_images_per_s": args.images / t_tv,
        "speedup": t_tv / t_ours, "max_rel_feature_diff": diff, "ours_adm_images_per_s": args.images / t_adm,
    }
    print(f"fid.py {record['ours_images_per_s']:.2f} img/s vs torchvision pipeline "
          f"{record['torchvision_images_per_s']:.2f} img/s ({record['speedup']:.2f}x) on {device}, "
          f"{torch.get_num_threads()} threads, {args.images} images {args.size}px -> 299, "
          f"batch {args.batch_size}; features agree to {diff:.1e} relative; adm protocol "
          f"{record['ours_adm_images_per_s']:.2f} img/s")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
