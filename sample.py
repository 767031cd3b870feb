"""Sample images from a trained SRC-Flow (eq. 10); its exact likelihood (eq. 2); rFID inputs.

    python sample.py --ckpt runs/flow/checkpoint.pt --out samples/w0 --num-samples 64
    torchrun --nproc_per_node=8 sample.py --ckpt runs/flow/checkpoint.pt --out samples/w2 \\
        --num-samples 50000 --cfg 2.0 --no-png     # 50 per class, an ADM samples.npz for fid.py

Generation (eq. 10): u ~ N(0, I) -> f^{-1} with guidance (STARFlow's rule, every block or the
deep one: --guide-blocks) -> SimFlow's score step (--score-step; 0 is off) -> the decoders.
Where to guide is open: STARFlow's `reverse` guides every conditional block, but its released
config conditions only the deep (top) block (cond_top_only: 1), and SimFlow describes STARFlow's
CFG as applied to the last block. Sweep both: --cfg-sweep 1,2,3 --guide-blocks all,deep.
Sample i uses noise seeded by (seed, i) and label plan[i]: the images do not depend on ranks or
batch sizes. Outputs: images/*.png, samples.npz (ADM's layout), grid.png, info.json.

--cfg-sweep 1,2,3 --ref REF --fid-weights FILE samples each setting (--guide-blocks, --score-step:
lists too) into --out/cfg-<w>[-deep][-score<g>]/ and scores it with fid.py (sweep.json).

--nll DIR: -log p(z_c | label) / (N d ln 2) per image (eq. 2), "noisy" (eq. 8, the training
objective on held-out data, over --nll-draws draws) and "clean" (eq. 5). Densities of continuous
features: they can be negative, and are not comparable with bits/dim of pixels.

--nll-json FILE also writes the per-image values as a CSV beside it, and a grid (.png) of the
most and least likely images.

--reconstruct DIR --stage1 CKPT --out OUT: the images (ADM crop) and their eq. 7 reconstructions
(--recon-rae: the RAE's) as OUT/originals.npz and OUT/recon.npz, for fid.py's rFID.

What only a flow can do. --invert DIR --out OUT: each image's prior point u = f(z_c) (clean z_c,
eq. 5, under its class folder's label or --uncond's null label) and back, f^{-1}(u) (guidance 0:
the exact inverse). OUT/latents.npz holds u, z_c, labels, paths and error = max |f^{-1}(u) - z_c|
per image; OUT/grid.png the originals, their reconstructions D(z_c) and D(f^{-1}(u)). A round trip
worse than --invert-tol (default ROUND_TRIP_TOL) stops with one line naming the images.

--interpolate A B --out OUT: A and B are image files of the stage-1 size (a file is not cropped)
or, with --latents OUT/latents.npz, indices into an --invert result. Their prior points under one
label (--label) are joined by slerp() and decoded (eq. 10) without and with --cfg guidance:
OUT/interpolation.png, a row per setting, and interpolation.npz.
"""

import argparse
import collections
import csv
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import common
import fid
from common import UserError
from src import load_stage1
from tarflow import bits_per_dim, load_flow, nll_per_dim

# --reconstruct: grid.png shows the first GRID_PAIRS originals above their reconstructions
GRID_PAIRS = 8
INCEPTION = "pt_inception-2015-12-05-6726825d.pth"
# --invert: the largest round-trip error max |f^{-1}(f(z_c)) - z_c| accepted per image, by
# precision. Measured in float32: up to 1.2e-5 (random-weight flows of 4 to 256 tokens, the
# demo's flow); in float64: 1e-14. More means a broken inverse or an unstable flow.
ROUND_TRIP_TOL = {torch.float32: 1e-3, torch.float64: 1e-8}
# slerp(): below this sin(theta) two points count as parallel
SLERP_EPS = 1e-6
# This process: rank, number of ranks, device, the models' dtype, progress bars (rank 0 only)
Job = collections.namedtuple("Job", "rank world device dtype progress")


# ---- The sampling plan: labels and noise, fixed per global sample index
def prior_noise(seed, indices, shape):
    """u_i ~ N(0, I) of shape (N, d) for each global sample index i, from a generator seeded
    by (seed, i): the same on every rank and in every batch."""
    noise = []
    for i in indices:
        gen = torch.Generator().manual_seed(common.seed_of(seed, i))
        noise.append(torch.randn(shape, generator=gen))
    return torch.stack(noise) if noise else torch.empty(0, *shape)


def encoder_noise_of(seed, indices, shape, sigma, per_example, *stream):
    """eps of eq. 8 for each global image index i, seeded by (seed, i, *stream): the NLL and the
    reconstructions do not depend on ranks or batch sizes."""
    noise = []
    for i in indices:
        gen = torch.Generator().manual_seed(common.seed_of(seed, i, *stream))
        # a batch of one on one rank: common.encoder_noise, the draw of the training step
        eps = common.encoder_noise(gen, global_batch=1, shape=shape, rank=0, world=1,
                                   device="cpu", sigma=sigma, per_example=per_example)
        noise.append(eps)
    return torch.cat(noise)


def parse_classes(text, num_classes):
    """--classes: 'even', 'random' or a comma list of class indices (checked against the flow).
    An unconditional flow takes only the default, 'even' (its labels are then all -1)."""
    if num_classes == 0 and text != "even":
        raise UserError(f"--classes {text}: the flow is unconditional")
    if text in ("even", "random"):
        return text
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        classes = []
    if not classes or not all(0 <= c < num_classes for c in classes):
        raise UserError(f"--classes: expected even, random or classes 0..{num_classes - 1}, "
                        f"got {text!r}")
    return classes


def class_plan(num, num_classes, classes="even", seed=0):
    """The label of every global sample index, int64 (num,): 'even' cycles through all classes
    (50 each for 50k ImageNet samples, the paper's protocol), 'random' draws them from `seed`, a
    list is cycled through. An unconditional flow gets -1 everywhere (no label)."""
    if num_classes == 0:
        return np.full(num, -1, dtype=np.int64)
    if classes == "even":
        return np.arange(num, dtype=np.int64) % num_classes
    if classes == "random":
        rng = np.random.default_rng(common.seed_of(seed, common.STREAM_CLASSES))
        return rng.integers(0, num_classes, num)
    return np.asarray(classes, dtype=np.int64)[np.arange(num) % len(classes)]


def grid_order(labels, rows, cols):
    """The sample indices of grid.png: one row per class (the first `rows` classes in plan order)
    with its first `cols` samples; -1 pads a row with fewer samples."""
    order = []
    for c in list(dict.fromkeys(labels.tolist()))[:rows]:
        row = np.flatnonzero(labels == c)[:cols].tolist()
        order.append(row + [-1] * (cols - len(row)))
    return order


# ---- Models, batches and outputs
def load_models(args, job):
    """(flow, its checkpoint record, Stage1) of --ckpt in job.dtype, paths overridable
    (--reconstruct: only the Stage1, flow and record None)."""
    flow = None
    record = None
    ema = not args.no_ema
    if args.reconstruct is None:
        flow, record = load_flow(args.ckpt, device=job.device, ema=ema)
        flow.to(job.dtype)
    path = args.stage1
    if not path:
        path = (record or common.load_checkpoint(args.ckpt, "flow"))["stage1"]
        # (load_stage1 names a missing --stage1 itself)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: missing stage 1 of {args.ckpt}; pass --stage1")
    stage1 = load_stage1(path, job.device, ema=ema, encoder=args.encoder,
                         decoder=args.decoder)
    if flow is not None and flow.in_channels != stage1.C.d:
        raise UserError(f"{args.ckpt}: flow d={flow.in_channels}, stage 1 d={stage1.C.d}")
    return flow, record, stage1.to(job.dtype)


def uses_bf16(device, precision):
    """bf16 autocast on GPU by default ('auto'); float32 or float64 weights otherwise."""
    return precision == "bf16" or (precision == "auto" and torch.device(device).type == "cuda")


def autocast_for(device, precision):
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=uses_bf16(device, precision))


def to_uint8(images):
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8, rounded to nearest."""
    pixels = (images.float().clamp(0, 1) * 255 + 0.5).clamp(0, 255)
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def check_finite(images, idx, what):
    """Stop with one line when images are nan/inf (ADM's evaluator would fail much later)."""
    bad = ~torch.isfinite(images.flatten(1)).all(1).cpu()
    if bad.any():
        shown = idx[bad.numpy()].tolist()[:20]
        raise UserError(f"{int(bad.sum())} {what} not finite (nan/inf), indices {shown}; "
                        f"stopped before writing them")


def my_indices(n, args, job, desc):
    """This rank's global indices r, r + world, ... below n, --batch-size at a time."""
    mine = np.arange(job.rank, n, job.world)
    starts = range(0, len(mine), args.batch_size)
    for start in tqdm(starts, desc=desc, disable=not job.progress):
        yield mine[start:start + args.batch_size]


def folder_batches(folder, image_size, args, job):
    """(dataset, n, batches) of the first n = --limit images of a folder (ADM's centre crop); a
    batch is (global indices, images in [0, 1] on job.device)."""
    data = common.ImageFolder(folder, image_size, flat=True)
    n = min(args.limit or len(data), len(data))

    def batches():
        for idx in my_indices(n, args, job, folder):
            images = torch.stack([data[int(i)][0] for i in idx])
            yield idx, images.to(job.device, job.dtype) / 255
    return data, n, batches()


def gather_rows(parts, shape, num, job, out):
    """Rank 0 gets the (num, *shape) array whose rows r::world are rank r's `parts` (in rank 0's
    dtype: it holds row 0), the others None. The ranks meet through a shard file each: no size
    limit of a collective."""
    rows = np.concatenate(parts) if parts else np.zeros((0, *shape), np.uint8)
    if job.world == 1:
        return rows
    shard = os.path.join(out, f".shard{job.rank}.npy")
    common.atomic_write(shard, lambda f: np.save(f, rows))
    dist.barrier()
    full = None
    if job.rank == 0:
        full = np.empty((num, *shape), rows.dtype)
        for r in range(job.world):
            full[r::job.world] = np.load(os.path.join(out, f".shard{r}.npy"))
    dist.barrier()
    os.remove(shard)
    return full


def save_columns(columns, path, title, labels=None):
    """A grid of uint8 images (C, R, S, S, 3): column c holds image c's R versions, one per row
    (originals above their reconstructions, ...)."""
    rows = np.swapaxes(columns, 0, 1)
    tiles = torch.from_numpy(rows.reshape(-1, *rows.shape[2:]))
    tiles = tiles.permute(0, 3, 1, 2) / 255
    common.save_grid(tiles, path, nrow=len(columns), labels=labels, title=title)


def folder_labels(data, n, flow, args, flag):
    """The label of each of a folder's first n images: its class folder's (sorted, as in
    training), or the null label (num_classes) with --uncond or an unconditional flow."""
    uncond = args.uncond or not flow.num_classes
    classes = len(data.classes)
    if not uncond and classes != flow.num_classes:
        raise UserError(f"{flag}: {classes} class folders, the flow has "
                        f"{flow.num_classes} classes (or pass --uncond)")
    labels = [flow.null_label if uncond else y for _, y in data.samples[:n]]
    return torch.tensor(labels)


# ---- Modes: sample, NLL, reconstruct, guidance sweep
def sample_images(flow, stage1, out, plan, setting, args, job):
    """Generate len(plan) images into out: rank 0 writes samples.npz, grid.png and info.json.
    setting: the guidance, guide_blocks and score_step of Stage1.generate (eq. 10)."""
    num = len(plan)
    png_dir = os.path.join(out, "images")
    os.makedirs(out if args.no_png else png_dir, exist_ok=True)
    parts = []
    start = time.time()
    shape = (flow.num_tokens, flow.in_channels)
    desc = f"sampling w={setting['guidance']:g}"
    for idx in my_indices(num, args, job, desc):
        u = prior_noise(args.seed, idx, shape).to(job.device, job.dtype)
        labels = torch.from_numpy(plan[idx]).to(job.device)
        with autocast_for(job.device, args.precision):
            images = stage1.generate(flow, u, labels, **setting)
        check_finite(images, idx, "samples")
        parts.append(to_uint8(images))
        for i, img in zip(idx, [] if args.no_png else parts[-1]):
            png = Image.fromarray(img)
            path = os.path.join(png_dir, f"{i:06d}.png")
            common.atomic_write(path, lambda f: png.save(f, format="PNG"))
    seconds = time.time() - start
    size = stage1.image_size
    images = gather_rows(parts, (size, size, 3), num, job, out)
    if job.rank == 0:
        # class_counts: [] for an unconditional flow (every label -1)
        counts = np.bincount(plan[plan >= 0]).tolist()
        info = dict(num=num, **setting, seed=args.seed, world_size=job.world,
                    precision=args.precision, seconds=round(seconds, 2),
                    images_per_second=round(num / max(seconds, 1e-9), 3),
                    shape=list(images.shape), class_counts=counts)
        write_samples(images, plan, out, info, args)
    # every rank returns once samples.npz exists: the sweep scores it on every rank
    if job.world > 1:
        dist.barrier()
    return os.path.join(out, "samples.npz")


def write_samples(images, plan, out, info, args):
    """samples.npz (ADM's layout), grid.png (a row per class) and info.json of a run."""
    npz = os.path.join(out, "samples.npz")
    common.atomic_write(npz, lambda f: np.savez(f, arr_0=images, arr_1=plan))
    names = []
    if args.class_names:
        with open(args.class_names) as f:
            names = [line.strip() for line in f if line.strip()]
    order = grid_order(plan, args.grid_rows, args.grid_cols)
    blank = np.full_like(images[0], 255)
    cells = [i for row in order for i in row]
    tiles = np.stack([images[i] if i >= 0 else blank for i in cells])
    tiles = torch.from_numpy(tiles).permute(0, 3, 1, 2) / 255
    labels = []
    for row in order:
        c = int(plan[row[0]])
        name = "-" if c < 0 else str(c)
        if 0 <= c < len(names):
            name += f" {names[c]}"
        labels += [name] + [None] * (len(row) - 1)
    grid = os.path.join(out, "grid.png")
    w = info["guidance"]
    title = f"w={w:g} ({info['guide_blocks']}), seed {args.seed}"
    common.save_grid(tiles, grid, nrow=args.grid_cols, labels=labels, title=title)
    common.save_json(info, os.path.join(out, "info.json"))
    print(f"wrote {len(plan)} samples to {out}")


def evaluate_nll(flow, record, stage1, args, job):
    """The exact NLL of a folder in bits per compact dimension, noisy (eq. 8) and clean (eq. 5);
    rank 0 prints it and writes --nll-json."""
    data, n, batches = folder_batches(args.nll, stage1.image_size, args, job)
    uncond = args.uncond or not flow.num_classes
    labels = folder_labels(data, n, flow, args, "--nll")
    mode = record["noise_mode"]
    sigma = float(record["noise_std"])
    draws = args.nll_draws

    def bits(z_c, y):
        """-log p(z_c | y) / (N d ln 2): eq. 2 through eq. 9 and its constant."""
        u, logdet = flow(z_c, y if flow.num_classes else None)
        return bits_per_dim(nll_per_dim(u, logdet)).double()

    rows = []
    for idx, x in batches:
        y = labels[idx].to(job.device)
        # E(x) once for every draw; clean: eq. 5, noisy: eq. 8 averaged over the draws
        z_raw = stage1.encode_raw(x)
        clean = bits(stage1.compact(z_raw), y)
        noisy = 0
        for k in range(draws):
            eps = encoder_noise_of(args.seed, idx, z_raw.shape[1:], sigma,
                                   mode == "per-example", common.STREAM_NLL, k)
            noisy = noisy + bits(stage1.compact(z_raw, eps.to(x)), y)
        noisy = noisy / draws
        rows.extend(zip(idx.tolist(), clean.tolist(), noisy.tolist()))
    rows = sorted(sum(common.all_gather(rows), []))
    if job.rank > 0:
        return
    _, clean, noisy = zip(*rows)
    dims = flow.num_tokens * flow.in_channels
    noisy_bpd, noisy_sem = mean_sem(noisy)
    clean_bpd, clean_sem = mean_sem(clean)
    kind = "null label" if uncond else "conditional"
    print(f"NLL of {len(rows)} images in {args.nll} ({kind}), "
          f"bits/dim (N*d={dims}):")
    print(f"  noisy (eq. 8, {draws} draws): {noisy_bpd:.4f} +- {noisy_sem:.4f}")
    print(f"  clean (eq. 5): {clean_bpd:.4f} +- {clean_sem:.4f}")
    if args.nll_json:
        per_image = [dict(path=data.samples[i][0], clean=c, noisy=v)
                     for i, c, v in rows]
        res = dict(folder=args.nll, num_images=len(rows), conditional=not uncond,
                   noise_std=sigma, noise_mode=mode, noise_draws=draws, dims=dims,
                   nll_bpd_noisy=noisy_bpd, nll_bpd_noisy_sem=noisy_sem,
                   nll_bpd_clean=clean_bpd, nll_bpd_clean_sem=clean_sem,
                   per_image=per_image)
        common.save_json(res, args.nll_json)
        write_nll_table(rows, data, args)


def write_nll_table(rows, data, args):
    """Beside --nll-json: its per-image values as a CSV (path, clean, noisy) and a grid of the
    most likely (top row) and least likely (bottom row) images by the clean NLL (eq. 5: no noise
    draw, a fixed order): the first outlier detector of a flow. rows: (index, clean, noisy)."""
    stem = os.path.splitext(args.nll_json)[0]
    table = [[data.samples[i][0], c, v] for i, c, v in rows]

    def write(f):
        out = csv.writer(f, lineterminator="\n")
        out.writerow(["path", "clean", "noisy"])
        out.writerows(table)
    common.atomic_write(stem + ".csv", write, mode="w")
    ranked = np.argsort([c for _, c, _ in rows], kind="stable")
    k = min(GRID_PAIRS, len(rows))
    shown = np.concatenate([ranked[:k], ranked[::-1][:k]])
    tiles = torch.stack([data[i][0] for i in shown]) / 255
    labels = [f"{rows[i][1]:.2f}" for i in shown]
    title = "most likely / least likely (clean bits/dim)"
    common.save_grid(tiles, stem + ".png", nrow=k, labels=labels,
                     title=title)


def mean_sem(values):
    """The mean and its standard error (nan below two values), as floats."""
    sem = math.nan
    if len(values) > 1:
        sem = float(np.std(values, ddof=1) / math.sqrt(len(values)))
    return float(np.mean(values)), sem


def reconstruct(stage1, args, job):
    """originals.npz and recon.npz of a folder (ADM's npz, uint8 NHWC) for rFID."""
    size = stage1.image_size
    _, n, batches = folder_batches(args.reconstruct, size, args, job)
    os.makedirs(args.out, exist_ok=True)
    pairs = []
    for idx, x in batches:
        z_raw = stage1.encode_raw(x)
        if args.recon_noise > 0:
            eps = encoder_noise_of(args.seed, idx, z_raw.shape[1:], args.recon_noise,
                                   False, common.STREAM_RECON)
            z_raw = z_raw + eps.to(x)
        # eq. 7, or the RAE's own round trip without the compressor
        if args.recon_rae:
            recon = stage1.rae.decode(stage1.rae.normalize(z_raw))
        else:
            recon = stage1(z_raw)
        check_finite(recon, idx, "reconstructions")
        pairs.append(np.stack([to_uint8(x), to_uint8(recon)], axis=1))
    # (n, 2, S, S, 3): each original beside its reconstruction
    pairs = gather_rows(pairs, (2, size, size, 3), n, job, args.out)
    if job.rank > 0:
        return
    paths = [os.path.join(args.out, f"{k}.npz") for k in ("originals", "recon")]
    for k, path in enumerate(paths):
        common.atomic_write(path, lambda f: np.savez(f, arr_0=pairs[:, k]))
    save_columns(pairs[:GRID_PAIRS], os.path.join(args.out, "grid.png"),
                 "originals / reconstructions")
    print(f"wrote {n} image pairs; rFID: python fid.py {paths[0]} {paths[1]} "
          f"--weights {INCEPTION}")


def sweep(flow, stage1, plan, settings, args, job):
    """Sample every setting into --out/cfg-<w>[-deep][-score<g>]/ and score it against --ref
    with fid.py (on every rank, as fid.py asks); rank 0 writes sweep.json."""
    model = fid.load_inception(args.fid_weights).to(job.device)
    kwargs = dict(batch_size=args.batch_size, device=job.device,
                  progress=job.progress)
    # a folder --ref gets ADM's centre crop to the samples' size
    ref = fid.load_features(args.ref, model, image_size=stage1.image_size,
                            **kwargs)
    table = []
    names = []
    for s in settings:
        name = f"cfg-{s['guidance']:g}"
        if s["guide_blocks"] == "deep":
            name += "-deep"
        if s["score_step"]:
            name += f"-score{s['score_step']:g}"
        out = os.path.join(args.out, name)
        path = sample_images(flow, stage1, out, plan, s, args, job)
        res = fid.evaluate(ref, path, model, **kwargs)
        table.append(dict(**s, samples=path, **res))
        names.append(name)
        if job.rank == 0:
            scores = ", ".join(f"{k} {v:.4g}" for k, v in res.items())
            print(f"{name}: {scores}")
    if job.rank == 0:
        k = int(np.argmin([r["fid"] for r in table]))
        print(f"best: {names[k]} (FID {table[k]['fid']:.3f})")
        record = dict(ref=args.ref, num=args.num_samples, seed=args.seed,
                      results=table)
        common.save_json(record, os.path.join(args.out, "sweep.json"))


# ---- What only a flow can do: exact inversion, interpolation in the prior
def invert(flow, stage1, args, job):
    """--invert: each image's prior point u = f(z_c), z_c clean (eq. 5) under its label
    (folder_labels), and the round trip f^{-1}(u) (guidance 0: the exact inverse). Rank 0
    writes latents.npz and grid.png; a round trip worse than the tolerance stops the run."""
    data, n, batches = folder_batches(args.invert, stage1.image_size, args, job)
    labels = folder_labels(data, n, flow, args, "--invert")
    tol = args.invert_tol
    if tol is None:
        tol = ROUND_TRIP_TOL[job.dtype]
    latents = []
    errors = []
    tiles = []
    for idx, x in batches:
        y = labels[idx].to(job.device)
        z_c = stage1.compact(stage1.encode_raw(x))
        u, _ = flow(z_c, y)
        z_back = flow.reverse(u, y)
        error = (z_back - z_c).flatten(1).abs().amax(1).cpu()
        far = ~(error <= tol)  # nan too
        if far.any():
            paths = [data.samples[i][0] for i in idx[far.numpy()]]
            raise UserError(f"round trip off by {error.max():.2g} > "
                            f"--invert-tol {tol:g} for {len(paths)} "
                            f"images: {', '.join(paths[:3])}")
        errors.append(error.double().numpy())
        latents.append(torch.stack([u, z_c], 1).cpu().numpy())
        # grid.png shows the first images; idx ascends, so they open the batch
        shown = int((idx < GRID_PAIRS).sum())
        if shown:
            rows = [x, stage1.decode(z_c[:shown]), stage1.decode(z_back[:shown])]
            tiles.append(np.stack([to_uint8(r[:shown]) for r in rows], 1))
    size = stage1.image_size
    shape = (2, flow.num_tokens, flow.in_channels)
    latents = gather_rows(latents, shape, n, job, args.out)
    errors = gather_rows(errors, (), n, job, args.out)
    tiles = gather_rows(tiles, (3, size, size, 3), min(GRID_PAIRS, n),
                        job, args.out)
    if job.rank > 0:
        return
    paths = np.array([path for path, _ in data.samples[:n]])
    arrays = dict(u=latents[:, 0], z_c=latents[:, 1], paths=paths,
                  labels=labels.numpy(), error=errors)
    npz = os.path.join(args.out, "latents.npz")
    common.atomic_write(npz, lambda f: np.savez(f, **arrays))
    title = "originals / D(z_c) / D(f^-1(f(z_c)))"
    save_columns(tiles, os.path.join(args.out, "grid.png"), title)
    dtype = str(job.dtype).replace("torch.", "")
    print(f"round trip f^-1(f(z_c)) of {n} images ({dtype}): max error "
          f"{errors.max():.2e} (tolerance {tol:g}); wrote {npz}")


def slerp(a, b, t):
    """Spherical interpolation between prior points a and b (each one vector, of any shape) at
    the fractions t (T,) -> (T, *a.shape). The direction follows the great circle,

        a^ = a / |a|,  theta = angle(a^, b^),
        dir(t) = (sin((1 - t) theta) a^ + sin(t theta) b^) / sin(theta),

    and the norm goes linearly from |a| to |b|, so it stays constant between equal norms. A
    Gaussian vector of D dimensions has a norm near sqrt(D); the straight line between two
    independent ones passes at sqrt(D / 2) midway, where the prior has no mass. Nearly parallel
    points (sin(theta) < SLERP_EPS) take the weights' limit, 1 - t and t."""
    t = t[:, None]  # (T, 1)
    a_dir = a.flatten() / a.norm()
    b_dir = b.flatten() / b.norm()
    # Kahan's form of the angle: accurate for nearly parallel points too
    theta = 2 * torch.atan2((a_dir - b_dir).norm(), (a_dir + b_dir).norm())
    weight_a = 1 - t
    weight_b = t
    if torch.sin(theta) >= SLERP_EPS:
        weight_a = torch.sin((1 - t) * theta) / torch.sin(theta)
        weight_b = torch.sin(t * theta) / torch.sin(theta)
    norm = (1 - t) * a.norm() + t * b.norm()
    path = norm * (weight_a * a_dir + weight_b * b_dir)
    return path.view(len(t), *a.shape)


def read_file(path, size):
    """An --interpolate image file as uint8 (3, S, S). It must be S x S, the stage-1 size: a
    folder's images get ADM's centre crop, a single file is taken exactly as it is."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        with Image.open(path) as im:
            rgb = np.array(im.convert("RGB"))
    except OSError as e:  # PIL: not an image, truncated
        raise UserError(f"{path}: unreadable image ({e})") from None
    found = f"{rgb.shape[1]}x{rgb.shape[0]}"
    if found != f"{size}x{size}":
        raise UserError(f"{path}: {found} pixels, expected the "
                        f"stage-1 size {size}x{size}")
    return torch.from_numpy(rgb).permute(2, 0, 1)


def endpoints(stage1, args, job):
    """z_c (2, N, d) of --interpolate's A and B (clean, eq. 5) and their labels: those that
    --latents recorded for its indices, None for image files."""
    if not args.latents:
        x = [read_file(path, stage1.image_size) for path in args.interpolate]
        x = torch.stack(x).to(job.device, job.dtype) / 255
        return stage1.compact(stage1.encode_raw(x)), None
    with np.load(args.latents) as f:
        z_c = f["z_c"]
        labels = f["labels"]
    idx = [int(i) for i in args.interpolate if i.isdigit()]
    if len(idx) < 2 or max(idx) >= len(z_c):
        got = " ".join(args.interpolate)
        raise UserError(f"--interpolate {got}: expected indices "
                        f"0..{len(z_c) - 1} into --latents")
    return torch.from_numpy(z_c[idx]).to(job.device, job.dtype), labels[idx]


def path_label(text, own, flow):
    """--label: 'a' or 'b' (that endpoint's label in --latents), 'null' (num_classes) or a
    class index."""
    if text == "null":
        return flow.null_label
    if text in ("a", "b") and own is not None:
        return int(own["ab".index(text)])
    if text.isdigit() and int(text) < flow.num_classes:
        return int(text)
    raise UserError(f"--label {text}: expected null, a class below "
                    f"{flow.num_classes}, or a, b with --latents "
                    f"(files have no label)")


def interpolate(flow, stage1, setting, args, job):
    """--interpolate A B: the prior points u = f(z_c) of A and B under one label (--label), the
    slerp() path of --steps points between them, decoded (eq. 10) without guidance, so that its
    ends are A's and B's own decodings D(z_c), and with `setting` when it guides. Rank 0 writes
    interpolation.png (a row per setting) and interpolation.npz (images, t, guidance)."""
    z_c, own = endpoints(stage1, args, job)
    label = path_label(args.label, own, flow)
    u, _ = flow(z_c, torch.full((2,), label, device=job.device))
    t = torch.linspace(0, 1, args.steps, dtype=job.dtype)
    t = t.to(job.device)
    path = slerp(u[0], u[1], t)
    labels = torch.full((args.steps,), label, device=job.device)
    settings = [dict(setting, guidance=0.0, score_step=0.0)]
    if setting["guidance"] or setting["score_step"]:
        settings.append(setting)
    rows = []
    for s in settings:
        images = stage1.generate(flow, path, labels, **s)
        check_finite(images, np.arange(args.steps), "path images")
        rows.append(to_uint8(images))
    if job.rank > 0:
        return
    guidance = [s["guidance"] for s in settings]
    names = [f"w={w:g}" for w in guidance]
    tile_labels = [names[r] if k == 0 else None
                   for r in range(len(rows)) for k in range(args.steps)]
    ends = " -> ".join(os.path.basename(e) for e in args.interpolate)
    title = f"slerp {ends}, label {args.label}"
    path_png = os.path.join(args.out, "interpolation.png")
    save_columns(np.stack(rows, 1), path_png, title, tile_labels)
    arrays = dict(images=np.stack(rows), t=t.cpu().numpy(), guidance=guidance)
    npz = os.path.join(args.out, "interpolation.npz")
    common.atomic_write(npz, lambda f: np.savez(f, **arrays))
    print(f"wrote {path_png} ({len(rows)} x {args.steps} images)")


# ---- Command line
@torch.no_grad()
def main(args):
    """One mode per run. An error on one rank ends that process at once (no barrier on the way
    out): torchrun then stops the other ranks, so a failure never hangs the job."""
    settings = check_args(args)
    rank, world, device = common.setup_ddp(args.device)
    if args.batch_size is None:  # a GPU's batch: the flow's weights read once per token step
        args.batch_size = 256 if device.type == "cuda" else 32
    dtype = torch.float64 if args.precision == "fp64" else torch.float32
    progress = rank == 0 and not args.no_progress
    job = Job(rank=rank, world=world, device=device, dtype=dtype,
              progress=progress)
    flow, record, stage1 = load_models(args, job)
    if args.reconstruct is not None:
        # reconstructions for rFID in float32 unless --precision asks for bf16
        precision = "fp32" if args.precision == "auto" else args.precision
        with autocast_for(device, precision):
            reconstruct(stage1, args, job)
    elif args.nll is not None:
        evaluate_nll(flow, record, stage1, args, job)
    elif args.invert is not None:
        invert(flow, stage1, args, job)
    elif args.interpolate:
        interpolate(flow, stage1, settings[0], args, job)
    else:
        guided = any(s["guidance"] or s["score_step"] for s in settings)
        if guided and not flow.num_classes:
            raise UserError("guidance and --score-step need a conditional flow")
        classes = parse_classes(args.classes, flow.num_classes)
        plan = class_plan(args.num_samples, flow.num_classes, classes, args.seed)
        if uses_bf16(device, args.precision):
            flow.cast_linears(torch.bfloat16)  # the same samples, no cast per token step
        if args.cfg_sweep:
            sweep(flow, stage1, plan, settings, args, job)
        else:
            sample_images(flow, stage1, args.out, plan, settings[0], args, job)
    common.cleanup_ddp()


def floats(text, flag):
    """A comma list of finite numbers >= 0, or a one-line error naming the flag."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and v >= 0 for v in values):
        raise UserError(f"{flag}: expected finite numbers >= 0, got {text!r}")
    return values


def check_args(args):
    """One-line errors for flags wrong before any model loads; the Stage1.generate settings."""
    for flag in ("--num-samples", "--batch-size", "--nll-draws", "--steps"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and value < 1:
            raise UserError(f"{flag}: expected a positive integer, got {value}")
    floats(str(args.recon_noise), "--recon-noise")
    blocks = args.guide_blocks.split(",")
    if not set(blocks) <= {"all", "deep"}:
        raise UserError(f"--guide-blocks: all or deep, not {args.guide_blocks!r}")
    if args.cfg_sweep:
        ws = floats(args.cfg_sweep, "--cfg-sweep")
    else:
        ws = floats(str(args.cfg), "guidance scale --cfg")
    gammas = floats(args.score_step, "--score-step")
    if not args.cfg_sweep and len(blocks) * len(gammas) > 1:
        raise UserError("several --guide-blocks or --score-step need --cfg-sweep")
    for flag, path in (("--ref", args.ref), ("--fid-weights", args.fid_weights)):
        if args.cfg_sweep and not (path and os.path.exists(path)):
            raise UserError(f"--cfg-sweep needs an existing {flag}, got {path}")
    if args.ckpt is None and args.reconstruct is None:
        raise UserError("--ckpt: a train_flow.py checkpoint is needed")
    # from here on, no --ckpt means --reconstruct
    if args.ckpt is None and args.stage1 is None:
        raise UserError("--reconstruct needs --stage1 (or --ckpt)")
    if args.out is None and args.nll is None:
        raise UserError("--out: needed except with --nll")
    if args.class_names and not os.path.isfile(args.class_names):
        raise UserError(f"--class-names {args.class_names}: no such file")
    if args.latents and not os.path.isfile(args.latents):
        raise UserError(f"--latents {args.latents}: no such file "
                        f"(--invert's latents.npz)")
    exact = args.invert or args.interpolate
    if exact and args.precision == "bf16":
        raise UserError("--invert, --interpolate: fp32 or fp64 only")
    return [dict(guidance=w, guide_blocks=b, score_step=g)
            for w in ws for b in blocks for g in gammas]


def build_parser():
    """The flags; the README's commands and the tests use their names and defaults."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", help="train_flow.py checkpoint")
    p.add_argument("--stage1", help="stage 1 (default: --ckpt's)")
    p.add_argument("--encoder", help="DINOv2 weights, if moved")
    p.add_argument("--decoder", help="RAE decoder, if moved")
    p.add_argument("--out", help="output folder")
    p.add_argument("--num-samples", type=int, default=50_000, help="the paper: 50k")
    p.add_argument("--classes", default="even", help="even, random or a list: 1,7")
    p.add_argument("--cfg", type=float, default=0.0, help="guidance scale w")
    p.add_argument("--guide-blocks", default="all",
                   help="all: every block; deep: the deep one only (STARFlow's released "
                        "config); all,deep sweeps both")
    p.add_argument("--score-step", default="0", help="SimFlow's score step (0: off)")
    p.add_argument("--cfg-sweep", help="w list to sample and score")
    p.add_argument("--ref", help="FID reference (.npz or folder)")
    p.add_argument("--fid-weights", help="fid.py's Inception weights")
    p.add_argument("--seed", type=int, default=0, help="sample i's noise: (seed, i)")
    p.add_argument("--batch-size", type=int, help="per rank (default: 256 on GPU, 32 on CPU)")
    p.add_argument("--device", help="default: cuda if any")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp64"], default="auto",
                   help="auto: bf16 autocast on GPU, else fp32 (NLL: fp32)")
    p.add_argument("--no-ema", action="store_true", help="raw weights, not EMA")
    p.add_argument("--no-png", action="store_true", help="no images/ folder")
    p.add_argument("--class-names", help="a name per line, for grid.png")
    p.add_argument("--grid-rows", type=int, default=8, help="classes in grid.png")
    p.add_argument("--grid-cols", type=int, default=8, help="samples per class")
    p.add_argument("--nll", help="exact NLL of these images")
    p.add_argument("--uncond", "--nll-uncond", action="store_true",
                   help="--nll, --invert: the null label")
    p.add_argument("--nll-draws", type=int, default=4, help="noise draws per image")
    p.add_argument("--nll-json", help="also write the NLL here")
    p.add_argument("--reconstruct", help="rFID inputs of these images")
    p.add_argument("--recon-rae", action="store_true", help="the RAE alone")
    p.add_argument("--recon-noise", type=float, default=0.0, help="noise std on E(x)")
    p.add_argument("--invert", help="u = f(z_c) of these images")
    p.add_argument("--invert-tol", type=float, help="round-trip tolerance")
    p.add_argument("--interpolate", nargs=2, metavar=("A", "B"),
                   help="slerp between two images in the prior")
    p.add_argument("--latents", help="--invert's latents.npz")
    p.add_argument("--label", default="null", help="a, b, null or a class")
    p.add_argument("--steps", type=int, default=8, help="points on the path")
    p.add_argument("--limit", type=int, default=0, help="first N images (0: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


if __name__ == "__main__":
    common.run_cli(main, build_parser().parse_args())
