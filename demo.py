"""`make demo`: the whole SRC-Flow pipeline at toy size, on a CPU, in about ten minutes.

No pretrained weights or datasets can be fetched here, so the demo makes its own and then runs
the real scripts exactly as a user would, two ranks each (torchrun --nproc_per_node=2):

  1. data      six classes of 128x128 coloured shapes and textures anyone can tell apart
               (red circles, green squares, ...), a train split and a held-out split
               (ImageFolder layout);
  2. E         a small randomly initialised DINOv2 written in the official checkpoint layout,
               kept frozen as the RAE encoder (random features still carry the image);
  3. stage 1   train_src.py trains a tiny RAE decoder D and the SRC together (eq. 7; pixel and
               adversarial losses with the weight-free discriminator, no perceptual loss);
  4. stage 2   train_flow.py trains a tiny class-conditional TARFlow on z_c (eq. 8, 9);
  5. samples   sample.py draws a class-labelled grid without and with guidance (eq. 10);
  6. NLL       invert.py --nll: exact held-out NLL of the compact features (eq. 2), per image
               in nll.csv and the most / least likely images in nll.png;
  7. inverse   invert.py --invert: one held-out image per class to its prior point u = f(z_c)
               and back (the round-trip error is printed); invert.py --interpolate: a slerp
               path in the prior between two of them, without and with guidance;
  8. toy FID   fid.py's Inception-v3 with *seeded random weights* and BatchNorm statistics
               calibrated on the demo images, for samples (w = 0 and w > 0) and reconstructions
               (evaluate.py --reconstruct) against the held-out images. A sanity signal for
               this toy run only: it is NOT comparable to published FIDs, which use the
               trained TF Inception weights.

    python demo.py --out runs/demo            # what `make demo` runs

Writes OUT/metrics.json and prints where the pictures are (OUT/samples_w0/grid.png, ...).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageDraw

import fid
import rae
from common import save_grid

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# Toy configuration: sized so the whole demo takes ~10 minutes on 2 CPU cores.

CLASSES = ["red circle", "green square", "blue triangle", "yellow stripes", "white cross", "cyan checkers"]
IMAGE_SIZE = 128                # encoder sees 112 px -> 8x8 = 64 tokens; decoder patch 16 -> 128 px
TRAIN_PER_CLASS = 400
HELDOUT_PER_CLASS = 10          # 60 held-out images: FID reference and NLL set
ENCODER = dict(embed_dim=128, depth=2, num_heads=2, patch_size=14, num_registers=4, pos_grid=8, init_values=1.0)
# crop: ADM's centre crop with flips, as in the runs the README reports; RAE's random crop (the default) keeps
# 2/3 of a side and would cut the shapes that sit near the edges
STAGE1 = dict(decoder_width=128, decoder_depth=2, decoder_heads=4, decoder_mlp=512, src_dim=8, src_depth=1,
              epochs=22, lr=1e-3, min_lr=1e-4, ema_decay=0.99, disc="patch", disc_width=16, disc_start=21,
              disc_upd_start=20,
              crop="center")
STAGE2 = dict(model="tiny", epochs=28, lr=1e-3, min_lr=1e-5, ema_decay=0.99)
BATCH = 64                      # global batch (2 ranks x 32)
NUM_SAMPLES = 60                # per guidance scale: 10 per class (Inception on 2 CPU cores is slow)
GUIDANCE = 2.0
SEED = 0
INTERPOLATE = (0, 3)            # the path's ends: indices into the inverted images (one per class)


# -----------------------------------------------------------------------------
# 1. The toy dataset.

def _jitter(rng, rgb, amount=30):
    return tuple(int(v) for v in np.clip(np.asarray(rgb) + rng.integers(-amount, amount + 1, 3), 0, 255))


def draw_example(k, rng, size=IMAGE_SIZE):
    """One uint8 (size, size, 3) image of class k: a large coloured shape or a bold texture with
    random position, size, colour and a noisy dark background. Shapes span several 16 px tokens
    so that their outlines survive the 8x8 token grid."""
    s = size
    bg = rng.integers(10, 90, 3)
    im = Image.fromarray(np.clip(bg + rng.normal(0, 8, (s, s, 3)), 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    r = rng.uniform(0.28, 0.40) * s
    cx, cy = rng.uniform(r * 1.15 + 1, s - r * 1.15 - 1, 2)
    if k == 0:                                                     # red circle
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_jitter(rng, (230, 40, 40)))
    elif k == 1:                                                   # green square
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=_jitter(rng, (40, 210, 60)))
    elif k == 2:                                                   # blue triangle, any rotation
        a = rng.uniform(0, 2 * np.pi)
        d.polygon([(cx + 1.15 * r * np.cos(a + t), cy + 1.15 * r * np.sin(a + t))
                   for t in (0, 2 * np.pi / 3, 4 * np.pi / 3)], fill=_jitter(rng, (50, 80, 240)))
    elif k == 3:                                                   # yellow horizontal stripes
        period = rng.uniform(0.2, 0.3) * s
        y, c = -rng.uniform(0, period), _jitter(rng, (240, 220, 40))
        while y < s:
            d.rectangle([0, y, s, y + period / 2 - 1], fill=c)
            y += period
    elif k == 4:                                                   # white cross
        t, c = 0.35 * r, _jitter(rng, (235, 235, 235), 20)
        d.rectangle([cx - r, cy - t, cx + r, cy + t], fill=c)
        d.rectangle([cx - t, cy - r, cx + t, cy + r], fill=c)
    elif k == 5:                                                   # cyan checkerboard
        cell, c = int(rng.uniform(0.18, 0.26) * s), _jitter(rng, (40, 220, 230))
        ox, oy = rng.integers(0, cell, 2)
        for i in range(-1, s // cell + 1):
            for j in range(-1, s // cell + 1):
                if (i + j) % 2 == 0:
                    d.rectangle([ox + i * cell, oy + j * cell, ox + (i + 1) * cell - 1,
                                 oy + (j + 1) * cell - 1], fill=c)
    else:
        raise ValueError(f"draw_example: class {k} outside 0..{len(CLASSES) - 1}")
    return np.asarray(im)


def class_folder(k):
    """Folder names sort in class order, as ImageFolder assigns labels."""
    return f"{k:02d}_{CLASSES[k].replace(' ', '_')}"


def make_dataset(root, per_class, seed):
    """Write an ImageFolder tree root/<class>/<i>.png; returns (uint8 NHWC images, labels)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for k in range(len(CLASSES)):
        os.makedirs(os.path.join(root, class_folder(k)), exist_ok=True)
        for i in range(per_class):
            img = draw_example(k, rng)
            Image.fromarray(img).save(os.path.join(root, class_folder(k), f"{i:05d}.png"))
            images.append(img)
            labels.append(k)
    return np.stack(images), np.asarray(labels)


# -----------------------------------------------------------------------------
# 2. A random frozen encoder in the official DINOv2 layout.

def write_random_dinov2(path, seed):
    torch.manual_seed(seed)
    encoder = rae.DINOv2(**ENCODER)
    torch.save(encoder.state_dict(), path)


# -----------------------------------------------------------------------------
# Running the real scripts.

def flags(config):
    """dict(decoder_width=128) -> ['--decoder-width', '128']."""
    return [a for k, v in config.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def torchrun(script, args, log_path, nproc=2):
    """python -m torch.distributed.run --standalone --nproc_per_node=2 script args; log to a file."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(HERE, script)] + [str(a) for a in args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    t0 = time.time()
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=HERE)
    if rc != 0:
        with open(log_path) as f:
            tail = f.read().splitlines()[-25:]
        print("\n".join(tail), file=sys.stderr)
        raise SystemExit(f"error: {script} failed (exit {rc}); full log: {log_path}")
    return time.time() - t0


# -----------------------------------------------------------------------------
# 7. Toy FID: fid.py's network with seeded random weights, BatchNorm calibrated on demo images.

@torch.no_grad()
def toy_inception(calibration_images, seed, batch_size=50):
    """fid.InceptionV3 with random weights from `seed`; every BatchNorm's running mean/var set to
    the exact average over `calibration_images` (train mode, momentum None), then eval mode."""
    torch.manual_seed(seed)
    model = fid.InceptionV3()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None                    # cumulative average over all calibration batches
    model.train()
    for s in range(0, len(calibration_images), batch_size):
        x = torch.from_numpy(calibration_images[s:s + batch_size]).permute(0, 3, 1, 2).float() / 255
        model(x)
    return model.eval().requires_grad_(False)


def toy_fid(model, ref_images, gen_images):
    stats = [fid.statistics(fid.extract_features(model, fid.ArrayImages(a), batch_size=50, progress=False)[0])
             for a in (ref_images, gen_images)]
    return float(fid.frechet_distance(*stats[1], *stats[0]))


def small_copy(src, dst, colors=64):
    """A README-sized copy of a picture: half the size, a palette of `colors` (tens of KB)."""
    im = Image.open(src).convert("RGB").reduce(2).quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    im.save(dst, optimize=True)


def load_npz_images(path):
    with np.load(path) as f:
        return f["arr_0"], f["arr_1"]


# -----------------------------------------------------------------------------

def main(args):
    t_start = time.time()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(2)
    timings = {}

    def step(name, t0):
        timings[name] = round(time.time() - t0, 1)
        print(f"[{time.time() - t_start:6.0f}s] {name}: {timings[name]:.0f}s", flush=True)

    # 1-2. data and encoder
    t0 = time.time()
    train_dir, heldout_dir = os.path.join(out, "data", "train"), os.path.join(out, "data", "heldout")
    train_images, _ = make_dataset(train_dir, TRAIN_PER_CLASS, SEED)
    heldout_images, heldout_labels = make_dataset(heldout_dir, HELDOUT_PER_CLASS, SEED + 1)
    names_path = os.path.join(out, "data", "class_names.txt")
    with open(names_path, "w") as f:
        f.write("\n".join(CLASSES) + "\n")
    encoder_path = os.path.join(out, "dinov2_random.pth")
    write_random_dinov2(encoder_path, SEED)
    step("data + random encoder", t0)

    # 3. stage 1: RAE decoder + SRC
    t0 = time.time()
    stage1_dir = os.path.join(out, "stage1")
    torchrun("train_src.py", [
        "--data", train_dir, "--encoder", encoder_path, "--out", stage1_dir, "--train-decoder",
        "--image-size", IMAGE_SIZE, "--batch-size", BATCH, "--perceptual-weight", 0,
        "--num-workers", 0, "--device", "cpu", "--grid-every", 0, "--ckpt-every", 0, "--log-every", 10,
    ] + flags(STAGE1), os.path.join(out, "stage1.log"))
    stage1 = os.path.join(stage1_dir, "checkpoint.pt")
    step("stage 1 (train_src.py)", t0)

    # 4. stage 2: flow
    t0 = time.time()
    stage2_dir = os.path.join(out, "stage2")
    torchrun("train_flow.py", [
        "--data", train_dir, "--stage1", stage1, "--out", stage2_dir, "--batch-size", BATCH,
        "--num-workers", 0, "--device", "cpu", "--grid-every", 0, "--log-every", 10,
    ] + flags(STAGE2), os.path.join(out, "stage2.log"))
    flow = os.path.join(stage2_dir, "checkpoint.pt")
    step("stage 2 (train_flow.py)", t0)

    # 5. samples without and with guidance (same seed: same noise, same layout)
    grids = {}
    for w in (0.0, GUIDANCE):
        t0 = time.time()
        sdir = os.path.join(out, f"samples_w{w:g}")
        torchrun("sample.py", ["--ckpt", flow, "--out", sdir, "--num-samples", NUM_SAMPLES, "--cfg", w, "--seed", SEED,
                               "--batch-size", 30, "--class-names", names_path, "--grid-cols", 10, "--no-progress"],
                 os.path.join(out, f"sample_w{w:g}.log"))
        grids[f"w={w:g}"] = os.path.join(sdir, "grid.png")
        step(f"sampling w={w:g}", t0)

    # 6. exact held-out NLL
    t0 = time.time()
    nll_json = os.path.join(out, "nll.json")
    torchrun("invert.py", ["--ckpt", flow, "--nll", heldout_dir, "--nll-json", nll_json, "--seed", SEED,
                           "--batch-size", 30, "--no-progress"], os.path.join(out, "nll.log"))
    with open(nll_json) as f:
        nll = json.load(f)
    step("held-out NLL", t0)

    # 7. what only a flow can do: exact inversion, interpolation in the prior
    t0 = time.time()
    showcase = os.path.join(out, "data", "showcase")         # the first held-out image of each class
    for k in range(len(CLASSES)):
        os.makedirs(os.path.join(showcase, class_folder(k)), exist_ok=True)
        shutil.copy(os.path.join(heldout_dir, class_folder(k), "00000.png"), os.path.join(showcase, class_folder(k)))
    inv_dir = os.path.join(out, "inversion")
    torchrun("invert.py", ["--ckpt", flow, "--invert", showcase, "--out", inv_dir, "--batch-size", 30, "--no-progress"],
             os.path.join(out, "invert.log"))
    latents = os.path.join(inv_dir, "latents.npz")
    with np.load(latents) as f:
        round_trip = float(f["error"].max())
    interp_dir = os.path.join(out, "interpolation")
    torchrun("invert.py", ["--ckpt", flow, "--interpolate", *INTERPOLATE, "--latents", latents, "--label", "a",
                           "--cfg", GUIDANCE, "--steps", 8, "--out", interp_dir, "--no-progress"],
             os.path.join(out, "interpolate.log"), nproc=1)
    flow_pictures = {"inversion": os.path.join(inv_dir, "grid.png"),
                     "interpolation": os.path.join(interp_dir, "interpolation.png"),
                     "likelihood": os.path.splitext(nll_json)[0] + ".png"}   # most / least likely images
    for name, path in flow_pictures.items():                 # the README's pictures (docs/)
        small_copy(path, os.path.join(out, "docs", f"{name}.png"))
    step("inversion + interpolation", t0)

    # 8. reconstructions (the rFID command) and toy FIDs against the held-out images
    t0 = time.time()
    rdir = os.path.join(out, "reconstructions")
    torchrun("evaluate.py", ["--reconstruct", heldout_dir, "--stage1", stage1, "--out", rdir, "--batch-size", 30,
                             "--no-progress"], os.path.join(out, "reconstruct.log"))
    with np.load(os.path.join(rdir, "originals.npz")) as f:
        assert (f["arr_0"] == heldout_images).all()         # same folder order as make_dataset
    with np.load(os.path.join(rdir, "recon.npz")) as f:
        recon = f["arr_0"]
    first = np.concatenate([np.flatnonzero(heldout_labels == k)[:5] for k in range(len(CLASSES))])
    pairs = torch.from_numpy(np.stack([heldout_images[first], recon[first]], 1).reshape(-1, *recon.shape[1:]))
    recon_grid = os.path.join(out, "reconstructions.png")
    save_grid(pairs.permute(0, 3, 1, 2) / 255, recon_grid, nrow=10,
              labels=[CLASSES[heldout_labels[i]] if j % 5 == t == 0 else None
                      for j, i in enumerate(first) for t in (0, 1)],
              title="held-out images: original | reconstruction pairs")
    rng = np.random.default_rng(SEED)
    calib = np.concatenate([heldout_images, train_images[rng.choice(len(train_images), 60, replace=False)]])
    model = toy_inception(calib, SEED)
    fids = {"reconstructions": toy_fid(model, heldout_images, recon)}
    for w in (0.0, GUIDANCE):
        fids[f"samples_w{w:g}"] = toy_fid(model, heldout_images, load_npz_images(
            os.path.join(out, f"samples_w{w:g}", "samples.npz"))[0])
    step("toy FID", t0)

    metrics = dict(
        note="toy metrics: FID from fid.py's Inception-v3 with seeded random weights and BatchNorm "
             "calibrated on the demo images; NOT comparable to published FIDs",
        toy_fid=fids, guidance=GUIDANCE, num_samples=NUM_SAMPLES, num_heldout=len(heldout_images),
        heldout_nll_bits_per_dim=dict(noisy=nll["nll_bpd_noisy"], noisy_sem=nll["nll_bpd_noisy_sem"],
                                      clean=nll["nll_bpd_clean"], clean_sem=nll["nll_bpd_clean_sem"],
                                      dims=nll["dims"], noise_std=nll["noise_std"]),
        round_trip_max_error=round_trip,
        timings_s=dict(timings, total=round(time.time() - t_start, 1)),
        paths=dict(grids=grids, reconstructions=recon_grid, **flow_pictures, stage1=stage1, flow=flow,
                   data=os.path.join(out, "data")),
    )
    with open(os.path.join(out, "metrics.json.tmp"), "w") as f:
        json.dump(metrics, f, indent=2)
    os.replace(os.path.join(out, "metrics.json.tmp"), os.path.join(out, "metrics.json"))
    print(f"\ndone in {time.time() - t_start:.0f}s. toy FID (not comparable to published numbers): "
          + ", ".join(f"{k} {v:.1f}" for k, v in fids.items()))
    print(f"held-out NLL: {nll['nll_bpd_noisy']:.3f} +- {nll['nll_bpd_noisy_sem']:.3f} bits/dim (noisy z_c), "
          f"{nll['nll_bpd_clean']:.3f} +- {nll['nll_bpd_clean_sem']:.3f} (clean)")
    print(f"round trip f^-1(f(z_c)) of {len(CLASSES)} held-out images (float32): max |error| {round_trip:.1e}")
    print("pictures:")
    for k, v in grids.items():
        print(f"  samples {k}: {v}")
    print(f"  reconstructions: {recon_grid}")
    for k, v in flow_pictures.items():
        print(f"  {k}: {v}")
    print(f"  small copies for the README: {os.path.join(out, 'docs')}")
    print(f"metrics (toy FIDs, held-out NLL, round trip, timings, paths): {os.path.join(out, 'metrics.json')}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Toy end-to-end SRC-Flow run on a CPU (make demo).")
    p.add_argument("--out", default="runs/demo", help="output folder (data, checkpoints, grids, metrics.json)")
    main(p.parse_args())
