"""Sample images from a trained SRC-Flow (eq. 10) and measure its exact likelihood (eq. 2, 9).

Generation (paper §3.4, eq. 10):

    u ~ N(0, I)  ->  z_c = f^-1(u; y, w)  ->  denorm2  ->  C_dec  ->  RAE decode (denorm, D)
      ->  clamp to [0, 1]  ->  uint8

with classifier-free guidance of scale w by STARFlow's guided-Gaussian rule (done inside
TARFlow.reverse). Sample i always uses the prior noise of a generator seeded by (seed, i) and
the label plan[i] of a plan fixed by (seed, num, classes), so the images do not depend on the
number of ranks or on the batch size.

    python sample.py --ckpt runs/flow/checkpoint.pt --out samples/w0 --num-samples 64
    torchrun --nproc_per_node=8 sample.py --ckpt runs/flow/checkpoint.pt --out samples/w2 \\
        --num-samples 50000 --cfg 2.0                  # 50 per class, ADM-style samples.npz for fid.py
    python fid.py VIRTUAL_imagenet256_labeled.npz samples/w2/samples.npz --weights pt_inception.pth

Outputs in --out: images/000000.png ... (named by global index), samples.npz (`arr_0` uint8
NHWC, `arr_1` int64 labels, as the ADM evaluator and fid.py read it), grid.png (rows = classes,
labelled) and info.json.

Exact likelihood (--nll DIR): the flow gives log p(z_c | y) exactly (eq. 2); over a folder of
images (class subfolders as in training, or --nll-uncond for the null label) it reports the
negative log-likelihood of the compact features in bits per dimension of the compact space,
-log p(z_c | y) / (N * d * ln 2), Gaussian constant included, mean and standard error over images:
  - "noisy": z_c built as in training, eq. 8, with eps ~ N(0, sigma_flow^2) on the raw encoder
    output; per image the NLL is averaged over --nll-draws noise draws (a Monte-Carlo estimate
    of E_eps[-log p(z_c)], the flow's training objective on held-out data).
  - "clean": z_c from the noise-free encoding (eps = 0), a point the flow never saw exactly.
These are densities of continuous features (differential entropies), so they can be negative
and are not comparable with pixel-space bits/dim.

    torchrun --nproc_per_node=8 sample.py --ckpt runs/flow/checkpoint.pt --nll /data/imagenet/val

Guidance sweep (--cfg-sweep 0,1,2,3 --ref REF --fid-weights FILE): samples --num-samples images per w
into --out/cfg-<w>/ and prints FID (and IS, precision, recall) per w, written to --out/sweep.json.
"""

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from common import (IMAGE_EXTENSIONS, UserError, center_crop_arr, cleanup_ddp, load_flow, load_stage1,
                    run_cli, setup_ddp)


# -----------------------------------------------------------------------------
# The sampling plan: labels and prior noise, fixed per global sample index.

def sample_seed(seed, *index):
    """A 63-bit generator seed for (global seed, sample index, ...), well mixed by SeedSequence."""
    return int(np.random.SeedSequence([seed, *index]).generate_state(1, np.uint64)[0] >> 1)


def per_index_randn(shape, seed, indices, *stream):
    """One standard-normal tensor of `shape` per global index i, from a generator seeded by
    (seed, i, *stream), drawn on the CPU in float32: (len(indices), *shape)."""
    out = torch.empty(len(indices), *shape)
    g = torch.Generator()
    for row, i in enumerate(indices):
        g.manual_seed(sample_seed(seed, int(i), *stream))
        out[row] = torch.randn(shape, generator=g)
    return out


def prior_noise(seed, indices, shape):
    """u_i ~ N(0, I) of `shape` (N, d) for each global sample index i."""
    return per_index_randn(shape, seed, indices)


def parse_classes(text, num_classes):
    """--classes: 'even', 'random' or a comma list of class indices (checked against the model)."""
    if text in ("even", "random"):
        if num_classes == 0:
            raise UserError(f"--classes {text}: the flow is unconditional (num_classes=0); drop --classes")
        return text
    try:
        classes = [int(c) for c in text.split(",") if c.strip() != ""]
    except ValueError:
        raise UserError(f"--classes: expected 'even', 'random' or comma-separated integers, got {text!r}")
    if not classes:
        raise UserError("--classes: empty class list")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise UserError(f"--classes: {bad} outside the model's classes 0..{num_classes - 1}")
    return classes


def class_plan(num, num_classes, classes="even", seed=0):
    """Label of every global sample index, int64 (num,).

    'even' cycles through all classes (50 per class for 50k ImageNet samples, the paper's
    protocol; the first num % K classes get one more when num is not a multiple of K),
    'random' draws uniformly with a generator seeded by `seed`, a list is cycled through.
    An unconditional flow gets -1 everywhere (no label).
    """
    if num_classes == 0:
        return np.full(num, -1, dtype=np.int64)
    if classes == "even":
        return np.arange(num, dtype=np.int64) % num_classes
    if classes == "random":
        return np.random.default_rng([seed, 0x5EED]).integers(0, num_classes, num).astype(np.int64)
    return np.asarray(classes, dtype=np.int64)[np.arange(num) % len(classes)]


# -----------------------------------------------------------------------------
# The pipeline: frozen RAE (E, D), SRC (C_enc, C_dec), compact normalisation (norm2) and flow.

class Pipeline:
    """Everything eq. 8 and eq. 10 need, loaded from a stage-2 checkpoint and its stage-1 checkpoint."""

    def __init__(self, flow_ckpt, stage1=None, device="cpu", ema=True):
        if not os.path.isfile(flow_ckpt):
            raise FileNotFoundError(f"--ckpt {flow_ckpt}: no such file; expected a stage-2 checkpoint from train_flow.py")
        self.flow, self.cfg = load_flow(flow_ckpt, device=device, ema=ema)
        stage1 = stage1 or self.cfg["stage1"]
        if not os.path.isfile(stage1):
            raise FileNotFoundError(f"{stage1}: stage-1 checkpoint named by {flow_ckpt} not found; "
                                    f"pass --stage1 PATH")
        self.rae, self.C, (mean2, std2) = load_stage1(stage1, device=device, ema=ema)
        self.mean2, self.std2 = mean2, std2
        self.stage1 = stage1
        self.num_classes = int(self.cfg["num_classes"])
        self.noise_std = float(self.cfg["noise_std"])
        self.image_size = int(self.cfg["image_size"])
        fc = self.cfg.get("flow_config") or {}
        self.num_tokens = int(fc.get("num_tokens", getattr(self.flow, "num_tokens", 0)))
        self.d = int(fc.get("in_channels", getattr(self.flow, "in_channels", 0)))
        if not self.num_tokens or not self.d:
            raise ValueError(f"{flow_ckpt}: cannot tell the flow's token shape (num_tokens, in_channels)")
        if self.d != self.C.d:
            raise ValueError(f"{flow_ckpt}: flow models d={self.d} channels but the SRC in {stage1} has d={self.C.d}")

    def to(self, dtype):
        for m in (self.flow, self.rae, self.C):
            m.to(dtype)
        self.mean2, self.std2 = self.mean2.to(dtype), self.std2.to(dtype)
        return self

    def labels(self, y):
        """Class labels for the flow: None for an unconditional model."""
        return None if self.num_classes == 0 else y

    @torch.no_grad()
    def generate(self, u, y, guidance=0.0):
        """Eq. 10: prior noise u (B, N, d) -> images in [0, 1] (B, 3, S, S), clamped."""
        zc = self.flow.reverse(u, self.labels(y), guidance=guidance)
        z = self.C.decode(zc * self.std2 + self.mean2)           # denorm2, C_dec
        return self.rae.decode(z).float().clamp(0, 1)            # denorm, D

    @torch.no_grad()
    def compact(self, z_raw):
        """Eq. 8 from the raw encoder output: E(x) + eps (B, N, n) -> z_c = norm2(C_enc(norm(.))) (B, N, d)."""
        return (self.C.encode(self.rae.normalize(z_raw)) - self.mean2) / self.std2

    @torch.no_grad()
    def nll_bpd(self, zc, y):
        """-log p(z_c | y) / (N d ln 2) per example (eq. 2), from the flow's exact log-density."""
        return -self.flow.log_prob(zc, self.labels(y)).double() / (zc.shape[1] * zc.shape[2] * math.log(2))


def to_uint8(images):
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8, rounded to nearest."""
    x = (images.float().clamp(0, 1) * 255 + 0.5).clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


# -----------------------------------------------------------------------------
# Output files, all written atomically (path.tmp, then os.replace).

def save_png(image, path):
    """A uint8 HWC array or a PIL image -> PNG file."""
    with open(path + ".tmp", "wb") as f:
        (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(f, format="PNG")
    os.replace(path + ".tmp", path)


def save_npz(path, **arrays):
    with open(path + ".tmp", "wb") as f:
        np.savez(f, **arrays)
    os.replace(path + ".tmp", path)


def save_json(obj, path):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)


def read_class_names(path):
    if not os.path.isfile(path):
        raise UserError(f"--class-names {path}: no such file (expected one class name per line)")
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def make_grid(images, labels, class_names=None, rows=8, cols=8, title=None, min_tile=64):
    """A PIL grid: one row per class (first `rows` classes in plan order), its first `cols`
    samples, the class index (and name) written left of each row, an optional title on top."""
    order = []
    for c in labels.tolist():
        if c not in order:
            order.append(c)
    order = order[:rows]
    H, W = images.shape[1:3]
    scale = max(1, math.ceil(min_tile / max(H, W)))             # small toy images: enlarge (nearest)
    th, tw, pad = H * scale, W * scale, 2
    font = ImageFont.load_default()
    names = [("-" if c < 0 else str(c)) + (f" {class_names[c]}" if class_names and 0 <= c < len(class_names) else "")
             for c in order]
    label_w = 8 + max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(n, font=font)) for n in names)
    top = 16 if title else 0
    grid = Image.new("RGB", (label_w + cols * (tw + pad) + pad, top + len(order) * (th + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((4, 2), title, fill="black", font=font)
    for r, c in enumerate(order):
        y0 = top + pad + r * (th + pad)
        draw.text((4, y0 + th // 2 - 6), names[r], fill="black", font=font)
        for k, i in enumerate(np.flatnonzero(labels == c)[:cols]):
            tile = Image.fromarray(images[i]).resize((tw, th), Image.NEAREST)
            grid.paste(tile, (label_w + pad + k * (tw + pad), y0))
    return grid


# -----------------------------------------------------------------------------
# Distributed helpers (set-up is common.setup_ddp): each rank takes the global indices r::world.

def barrier(world):
    if world > 1:
        dist.barrier()


def gather_objects(obj, world):
    """All ranks' `obj` in rank order (every rank gets the list)."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def autocast_for(device, precision):
    """bf16 autocast on GPU by default ('auto'); float32 or float64 weights otherwise."""
    dev_type = torch.device(device).type
    if precision == "bf16" or (precision == "auto" and dev_type == "cuda"):
        return torch.autocast(dev_type, dtype=torch.bfloat16)
    return torch.autocast(dev_type, enabled=False)


# -----------------------------------------------------------------------------
# Modes: sample, NLL, guidance sweep.

def sample_images(pipe, out, num, plan, guidance, seed, batch_size, rank, world, device, precision,
                  write_png=True, class_names=None, grid_rows=8, grid_cols=8, progress=True):
    """Generate `num` images into `out`; rank 0 writes samples.npz, grid.png and info.json."""
    dtype = torch.float64 if precision == "fp64" else torch.float32
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    mine = np.arange(rank, num, world)
    parts = []
    t0 = time.time()
    batches = range(0, len(mine), batch_size)
    for s in tqdm(batches, desc=f"sampling w={guidance:g}", disable=rank != 0 or not progress):
        idx = mine[s:s + batch_size]
        u = prior_noise(seed, idx, (pipe.num_tokens, pipe.d)).to(device, dtype)
        y = torch.from_numpy(plan[idx]).to(device)
        with autocast_for(device, precision):
            x = to_uint8(pipe.generate(u, y, guidance))
        if write_png:
            for i, img in zip(idx, x):
                save_png(img, os.path.join(out, "images", f"{i:06d}.png"))
        parts.append(x)
    mine_images = np.concatenate(parts) if parts else None
    shard = os.path.join(out, f".shard{rank}.npy")           # hand this rank's images to rank 0
    if world > 1:
        with open(shard + ".tmp", "wb") as f:
            np.save(f, mine_images if mine_images is not None else np.zeros((0,), np.uint8))
        os.replace(shard + ".tmp", shard)
    barrier(world)
    seconds = time.time() - t0
    if rank == 0:
        images = None
        for r in range(world):
            part = mine_images if r == 0 else np.load(os.path.join(out, f".shard{r}.npy"))
            if part.size == 0:
                continue
            if images is None:
                images = np.empty((num,) + part.shape[1:], np.uint8)
            images[r::world] = part
        for r in range(1, world):
            os.remove(os.path.join(out, f".shard{r}.npy"))
        save_npz(os.path.join(out, "samples.npz"), arr_0=images, arr_1=plan)
        title = f"SRC-Flow samples, w={guidance:g}, seed={seed}"
        save_png(make_grid(images, plan, class_names, grid_rows, grid_cols, title), os.path.join(out, "grid.png"))
        info = dict(num=num, guidance=guidance, seed=seed, world_size=world, precision=precision,
                    seconds=round(seconds, 2), images_per_second=round(num / max(seconds, 1e-9), 3),
                    shape=list(images.shape), class_counts=np.bincount(plan[plan >= 0]).tolist() if pipe.num_classes else [])
        save_json(info, os.path.join(out, "info.json"))
        print(f"wrote {num} samples ({seconds:.1f}s): {os.path.join(out, 'samples.npz')}, "
              f"{os.path.join(out, 'grid.png')}" + (f", {os.path.join(out, 'images')}/" if write_png else ""))
    barrier(world)
    return os.path.join(out, "samples.npz")


def list_image_folder(root, num_classes, uncond):
    """(paths, labels) of a folder: class subfolders (sorted, as ImageFolder) or flat with --nll-uncond."""
    if not os.path.isdir(root):
        raise UserError(f"--nll {root}: no such folder")
    subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir())
    paths, labels = [], []
    if subdirs:
        if not uncond and num_classes and len(subdirs) != num_classes:
            raise UserError(f"--nll {root}: {len(subdirs)} class subfolders but the flow has "
                            f"{num_classes} classes (or pass --nll-uncond)")
        for k, name in enumerate(subdirs):
            for dirpath, _, files in sorted(os.walk(os.path.join(root, name))):
                for f in sorted(files):
                    if f.lower().endswith(IMAGE_EXTENSIONS):
                        paths.append(os.path.join(dirpath, f))
                        labels.append(k)
    else:
        if num_classes and not uncond:
            raise UserError(f"--nll {root}: no class subfolders; a class-conditional flow needs them "
                            f"(or pass --nll-uncond for the null-label likelihood)")
        paths = [os.path.join(root, f) for f in sorted(os.listdir(root)) if f.lower().endswith(IMAGE_EXTENSIONS)]
        labels = [0] * len(paths)
    if not paths:
        raise UserError(f"--nll {root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    return paths, np.asarray(labels, dtype=np.int64)


def load_image(path, image_size):
    """[0, 1] tensor (3, S, S) with ADM's centre crop (the training pre-processing, without flips)."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(center_crop_arr(im.convert("RGB"), image_size))
    except Exception as e:  # PIL raises many types: name the file in one line
        raise UserError(f"{path}: unreadable image ({type(e).__name__})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255


def mean_sem(values):
    values = np.asarray(values, dtype=np.float64)
    sem = values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return float(values.mean()), float(sem)


def evaluate_nll(pipe, root, uncond, draws, seed, batch_size, limit, rank, world, device, precision, progress=True):
    """Exact NLL of a folder in bits/dim of the compact space, noisy (eq. 8) and clean; see module doc."""
    dtype = torch.float64 if precision == "fp64" else torch.float32
    paths, labels = list_image_folder(root, pipe.num_classes, uncond)
    if limit:
        paths, labels = paths[:limit], labels[:limit]
    if uncond:
        labels = np.full(len(paths), pipe.num_classes, dtype=np.int64)   # the null label
    mine = np.arange(rank, len(paths), world)
    rows = []
    for s in tqdm(range(0, len(mine), batch_size), desc="nll", disable=rank != 0 or not progress):
        idx = mine[s:s + batch_size]
        x = torch.stack([load_image(paths[i], pipe.image_size) for i in idx]).to(device, dtype)
        y = torch.from_numpy(labels[idx]).to(device)
        z_raw = pipe.rae.encode_raw(x)                                   # E(x)
        clean = pipe.nll_bpd(pipe.compact(z_raw), y)
        noisy = torch.zeros_like(clean)
        for k in range(draws):            # eps of image i, draw k: generator seeded by (seed, i, 1, k)
            eps = per_index_randn(z_raw.shape[1:], seed, idx, 1, k).to(device, dtype) * pipe.noise_std
            noisy += pipe.nll_bpd(pipe.compact(z_raw + eps), y)
        noisy /= draws
        rows += list(zip(idx.tolist(), clean.tolist(), noisy.tolist()))
    rows = sorted(sum(gather_objects(rows, world), []))
    clean_m, clean_s = mean_sem([r[1] for r in rows])
    noisy_m, noisy_s = mean_sem([r[2] for r in rows])
    return dict(folder=root, num_images=len(rows), conditional=not uncond and pipe.num_classes > 0,
                noise_std=pipe.noise_std, noise_draws=draws, dims=pipe.num_tokens * pipe.d,
                nll_bpd_noisy=noisy_m, nll_bpd_noisy_sem=noisy_s, nll_bpd_clean=clean_m, nll_bpd_clean_sem=clean_s,
                per_image=[dict(path=paths[i], clean=c, noisy=n) for i, c, n in rows])


def inception_features(source, model, batch_size, device, progress):
    """fid.py's features of a folder / images npz, or its statistics npz (then features=None).
    Called on every rank together: fid.extract_features splits the images across ranks."""
    import fid
    kind, src = fid.open_source(source)
    if kind == "stats":
        return dict(stats=src, pool=None, logits=None)
    pool, logits = fid.extract_features(model, src, batch_size=batch_size, device=device, progress=progress)
    return dict(stats=fid.statistics(pool), pool=pool, logits=logits)


def fid_metrics(ref, gen, device):
    """FID, IS, precision/recall (where both sides have images) from inception_features outputs."""
    import fid
    res = dict(fid=fid.frechet_distance(*gen["stats"], *ref["stats"]),
               inception_score=fid.inception_score(gen["logits"]))
    if ref["pool"] is not None:
        res["precision"], res["recall"] = fid.precision_recall(ref["pool"], gen["pool"], device=device)
    return res


# -----------------------------------------------------------------------------

@torch.no_grad()
def main(args):
    if args.num_samples < 1:
        raise UserError(f"--num-samples: expected a positive number of images, got {args.num_samples}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    sweep = None
    if args.cfg_sweep:
        try:
            sweep = [float(w) for w in args.cfg_sweep.split(",") if w.strip()]
        except ValueError:
            raise UserError(f"--cfg-sweep: expected comma-separated guidance scales, got {args.cfg_sweep!r}")
        if not sweep:
            raise UserError("--cfg-sweep: empty list")
        for flag, path in (("--ref", args.ref), ("--fid-weights", args.fid_weights)):
            if path is None:
                raise UserError(f"--cfg-sweep needs {flag}")
            if not os.path.exists(path):
                raise UserError(f"{flag} {path}: no such file or folder")
    if args.nll is None and args.out is None:
        raise UserError("--out: needed to write samples (or use --nll FOLDER)")
    class_names = read_class_names(args.class_names) if args.class_names else None

    rank, world, device = setup_ddp(args.device)
    try:
        pipe = Pipeline(args.ckpt, args.stage1, device=device, ema=not args.no_ema)
        if args.precision == "fp64":
            pipe.to(torch.float64)
        if args.nll is not None:
            if args.nll_draws < 1:
                raise UserError(f"--nll-draws: expected >= 1 noise draws per image, got {args.nll_draws}")
            res = evaluate_nll(pipe, args.nll, args.nll_uncond, args.nll_draws, args.seed, args.batch_size,
                               args.nll_limit, rank, world, device,
                               "fp64" if args.precision == "fp64" else "fp32", not args.no_progress)
            if rank == 0:
                print(f"NLL of {res['num_images']} images in {args.nll} (bits per compact dimension, "
                      f"N*d={res['dims']}, {'conditional' if res['conditional'] else 'null label'}):")
                print(f"  noisy (sigma_flow={res['noise_std']:g}, {res['noise_draws']} draws): "
                      f"{res['nll_bpd_noisy']:.4f} +- {res['nll_bpd_noisy_sem']:.4f}")
                print(f"  clean (no noise): {res['nll_bpd_clean']:.4f} +- {res['nll_bpd_clean_sem']:.4f}")
                if args.nll_json:
                    save_json(res, args.nll_json)
            return
        classes = parse_classes(args.classes, pipe.num_classes)
        plan = class_plan(args.num_samples, pipe.num_classes, classes, args.seed)
        for w in (sweep or [args.cfg]):
            if w < 0:
                raise UserError(f"guidance scale must be >= 0, got {w}")
            if w > 0 and pipe.num_classes == 0:
                raise UserError(f"guidance {w} needs a class-conditional flow; {args.ckpt} is unconditional")
        if sweep is None:
            sample_images(pipe, args.out, args.num_samples, plan, args.cfg, args.seed, args.batch_size, rank, world,
                          device, args.precision, not args.no_png, class_names, args.grid_rows, args.grid_cols,
                          not args.no_progress)
            return
        import fid
        model = fid.load_inception(args.fid_weights).to(device)
        ref = inception_features(args.ref, model, args.batch_size, device, rank == 0 and not args.no_progress)
        table = []
        for w in sweep:
            out = os.path.join(args.out, f"cfg-{w:g}")
            path = sample_images(pipe, out, args.num_samples, plan, w, args.seed, args.batch_size, rank, world, device,
                                 args.precision, not args.no_png, class_names, args.grid_rows, args.grid_cols,
                                 not args.no_progress)
            gen = inception_features(path, model, args.batch_size, device, rank == 0 and not args.no_progress)
            if rank == 0:
                table.append(dict(guidance=w, samples=path, **fid_metrics(ref, gen, device)))
                print(f"w={w:g}: FID {table[-1]['fid']:.3f}")
        if rank == 0:
            print(f"{'w':>6} {'FID':>9} {'IS':>9}" + (f" {'prec':>6} {'recall':>6}" if "precision" in table[0] else ""))
            for r in table:
                print(f"{r['guidance']:>6g} {r['fid']:>9.3f} {r['inception_score']:>9.2f}"
                      + (f" {r['precision']:>6.3f} {r['recall']:>6.3f}" if "precision" in r else ""))
            best = min(table, key=lambda r: r["fid"])
            print(f"best: w={best['guidance']:g} (FID {best['fid']:.3f})")
            save_json(dict(ref=args.ref, num=args.num_samples, seed=args.seed, results=table), os.path.join(args.out, "sweep.json"))
    finally:
        cleanup_ddp()


def build_parser():
    p = argparse.ArgumentParser(description="Sample from SRC-Flow (eq. 10) or evaluate its exact NLL (eq. 2).")
    p.add_argument("--ckpt", required=True, help="stage-2 checkpoint written by train_flow.py")
    p.add_argument("--stage1", default=None, help="stage-1 checkpoint (default: the path stored in --ckpt)")
    p.add_argument("--out", default=None, help="output folder for images/, samples.npz, grid.png, info.json")
    p.add_argument("--num-samples", type=int, default=50_000, help="number of images (the paper evaluates 50k)")
    p.add_argument("--classes", default="even",
                   help="'even' (all classes equally, 50 each for 50k), 'random', or a list such as 207,360,387")
    p.add_argument("--cfg", type=float, default=0.0, help="classifier-free guidance scale w (0 = none)")
    p.add_argument("--cfg-sweep", default=None, help="comma list of w: sample each and report FID (needs --ref, --fid-weights)")
    p.add_argument("--ref", default=None, help="FID reference: ADM .npz batch, .npz with mu/sigma, or image folder")
    p.add_argument("--fid-weights", default=None, help="pt_inception-2015-12-05-6726825d.pth for fid.py")
    p.add_argument("--seed", type=int, default=0, help="global seed; sample i uses noise seeded by (seed, i)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass per rank")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp64"], default="auto",
                   help="auto = bf16 autocast on GPU, fp32 on CPU; NLL always runs in fp32 (or fp64)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--no-png", action="store_true", help="write only samples.npz and grid.png")
    p.add_argument("--class-names", default=None, help="text file with one class name per line, for the grid")
    p.add_argument("--grid-rows", type=int, default=8, help="classes shown in grid.png")
    p.add_argument("--grid-cols", type=int, default=8, help="samples per class in grid.png")
    p.add_argument("--nll", default=None, metavar="FOLDER", help="evaluate the exact NLL of these images instead")
    p.add_argument("--nll-uncond", action="store_true", help="NLL under the null label (folder without classes)")
    p.add_argument("--nll-draws", type=int, default=4, help="noise draws per image for the noisy NLL")
    p.add_argument("--nll-limit", type=int, default=0, help="use only the first N images (0 = all)")
    p.add_argument("--nll-json", default=None, help="also write the NLL results (and per-image values) here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


if __name__ == "__main__":
    run_cli(main, build_parser().parse_args())
