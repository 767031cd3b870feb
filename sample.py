"""Sample images from a trained SRC-Flow (eq. 10); its exact likelihood (eq. 2); rFID inputs.

    python sample.py --ckpt runs/flow/checkpoint.pt --out samples/w0 --num-samples 64
    torchrun --nproc_per_node=8 sample.py --ckpt runs/flow/checkpoint.pt --out samples/w2 \\
        --num-samples 50000 --cfg 2.0 --no-png     # 50 per class, an ADM samples.npz for fid.py

Generation: u ~ N(0, I) -> z_c = f^{-1}(u) with classifier-free guidance (STARFlow's rule, in
every flow block with --guide-blocks all or the deep block only with deep) -> optionally
SimFlow's score step (--score-step GAMMA; 0, the paper's setting, is off) -> the decoders
(denorm2, C_dec, denorm, D) -> uint8. Sample i uses prior noise seeded by (seed, i) and label
plan[i]: the images do not depend on the number of ranks or the batch size. Outputs in --out:
images/000000.png ..., samples.npz (`arr_0` uint8 NHWC, `arr_1` int64 labels, as ADM's
evaluator reads it), grid.png (a row per class) and info.json.

--cfg-sweep 1,2,3 --ref REF --fid-weights FILE (--guide-blocks and --score-step may be lists
too) samples each setting into --out/cfg-<w>[-deep][-score<g>]/ and scores it with fid.py
(sweep.json).

--nll DIR: -log p(z_c | label) / (N d ln 2) per image (eq. 2), mean and standard error, "noisy"
(z_c made as in training, eq. 8, averaged over --nll-draws noise draws: the training objective on
held-out data) and "clean" (eq. 5, no noise). Densities of continuous features: they can be
negative and are not comparable with bits/dim of pixels.

--reconstruct DIR --stage1 CKPT --out OUT: each image (ADM centre crop) and its eq. 7
reconstruction (--recon-rae: the RAE alone; --recon-noise SIGMA: eps ~ N(0, SIGMA^2) on E(x))
go to OUT/originals.npz and OUT/recon.npz, for `python fid.py OUT/originals.npz OUT/recon.npz`
(the paper: rFID 0.62 for the SRC, 0.57 for the RAE alone, on ImageNet val).
"""

import argparse
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

GRID_PAIRS = 8  # --reconstruct: originals above reconstructions in grid.png


# ---- The sampling plan: labels and noise, fixed per global sample index

def prior_noise(seed, indices, shape):
    """u_i ~ N(0, I) of shape (N, d) for each global sample index i, seeded by (seed, i)."""
    noise = []
    for i in indices:
        gen = torch.Generator().manual_seed(common.seed_of(seed, i))
        noise.append(torch.randn(shape, generator=gen))
    if not noise:
        return torch.empty(0, *shape)
    return torch.stack(noise)


def encoder_noise_of(seed, indices, shape, sigma, per_example, *stream):
    """eps of eq. 8 for each global image index i, from a generator seeded by (seed, i, *stream):
    the NLL and the reconstructions do not depend on ranks or batch sizes."""
    noise = []
    for i in indices:
        gen = torch.Generator().manual_seed(common.seed_of(seed, i, *stream))
        noise.append(common.encoder_noise(gen, 1, shape, 0, 1, "cpu", sigma, per_example))
    return torch.cat(noise)


def parse_classes(text, num_classes):
    """--classes: 'even', 'random' or a comma list of class indices (checked against the flow)."""
    if text in ("even", "random"):
        if num_classes == 0:
            raise UserError(f"--classes {text}: the flow is unconditional (num_classes=0); "
                            f"drop --classes")
        return text
    try:
        classes = [int(c) for c in text.split(",") if c.strip() != ""]
    except ValueError:
        classes = []
    if not classes or not all(0 <= c < num_classes for c in classes):
        raise UserError(f"--classes: expected 'even', 'random' or a comma list of the flow's "
                        f"classes 0..{num_classes - 1}, got {text!r}")
    return classes


def class_plan(num, num_classes, classes="even", seed=0):
    """The label of every global sample index, int64 (num,).

    'even' cycles through all classes (50 per class for 50k ImageNet samples, the paper's
    protocol; the first num % K classes get one more when num is not a multiple of K),
    'random' draws uniformly with a generator seeded by `seed`, a list is cycled through. An
    unconditional flow gets -1 everywhere (no label).
    """
    if num_classes == 0:
        return np.full(num, -1, dtype=np.int64)
    if classes == "even":
        return np.arange(num, dtype=np.int64) % num_classes
    if classes == "random":
        rng = np.random.default_rng(common.seed_of(seed, common.STREAM_CLASSES))
        return rng.integers(0, num_classes, num).astype(np.int64)
    cycle = np.arange(num) % len(classes)
    return np.asarray(classes, dtype=np.int64)[cycle]


def grid_order(labels, rows, cols):
    """The sample indices of grid.png: one row per class (the first `rows` classes in plan order)
    with its first `cols` samples; -1 pads a row with fewer samples."""
    order = []
    for c in list(dict.fromkeys(labels.tolist()))[:rows]:
        row = np.flatnonzero(labels == c)[:cols].tolist()
        order.append(row + [-1] * (cols - len(row)))
    return order


# ---- Models, precision and outputs

def load_models(args, device):
    """(flow, its checkpoint record, Stage1) of --ckpt, paths overridable (--reconstruct: only the
    Stage1, flow and record None)."""
    flow = None
    record = None
    if args.reconstruct is None:
        flow, record = load_flow(args.ckpt, device=device, ema=not args.no_ema)
    stage1_path = args.stage1
    if not stage1_path:
        stage1_path = (record or common.load_checkpoint(args.ckpt, "flow"))["stage1"]
        if not os.path.isfile(stage1_path):  # a missing --stage1 is named by load_stage1 itself
            raise FileNotFoundError(f"{stage1_path}: the stage-1 checkpoint named by {args.ckpt} "
                                    f"is missing; pass --stage1 PATH")
    stage1 = load_stage1(stage1_path, device, ema=not args.no_ema, encoder=args.encoder,
                         decoder=args.decoder)
    if flow is not None and flow.in_channels != stage1.C.d:
        raise UserError(f"{args.ckpt}: the flow models d={flow.in_channels} channels, the stage 1 "
                        f"gives {stage1.C.d}")
    return flow, record, stage1


def autocast_for(device, precision):
    """bf16 autocast on GPU by default ('auto'); float32 or float64 weights otherwise."""
    device_type = torch.device(device).type
    bf16 = precision == "bf16" or (precision == "auto" and device_type == "cuda")
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16)


def to_uint8(images):
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8, rounded to nearest."""
    pixels = (images.float().clamp(0, 1) * 255 + 0.5).clamp(0, 255)
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def check_finite(images, idx, what):
    """Stop with one line when images are nan/inf (ADM's evaluator would fail much later)."""
    bad = ~torch.isfinite(images.flatten(1)).all(1).cpu()
    if bad.any():
        raise UserError(f"{int(bad.sum())} {what} not finite (nan/inf), indices "
                        f"{idx[bad.numpy()].tolist()[:20]}; stopped before writing them")


def gather_rows(parts, shape, num, rank, world, out):
    """Rank 0 gets the (num, *shape) uint8 array whose rows r::world are rank r's `parts`; the
    ranks meet through one shard file each (no size limit of a collective)."""
    rows = np.zeros((0, *shape), np.uint8)
    if parts:
        rows = np.concatenate(parts)
    if world == 1:
        return rows
    shard = os.path.join(out, f".shard{rank}.npy")
    common.atomic_write(shard, lambda f: np.save(f, rows))
    dist.barrier()
    full = None
    if rank == 0:
        for r in range(world):
            part = np.load(os.path.join(out, f".shard{r}.npy"))
            if full is None:
                full = np.empty((num,) + part.shape[1:], part.dtype)
            full[r::world] = part
    dist.barrier()
    os.remove(shard)
    return full


def batches(data, n, batch_size, rank, world, device, dtype, desc, progress):
    """This rank's images r, r + world, ... of the first n: (global indices, images in [0, 1])."""
    mine = np.arange(rank, n, world)
    for start in tqdm(range(0, len(mine), batch_size), desc=desc, disable=not progress):
        idx = mine[start:start + batch_size]
        images = torch.stack([data[int(i)][0] for i in idx])  # uint8 (B, 3, S, S)
        yield idx, images.to(device, dtype) / 255


# ---- Modes: sample, NLL, reconstruct, guidance sweep

def sample_images(flow, stage1, out, plan, setting, args, rank, world, device, class_names=None):
    """Generate len(plan) images into out: rank 0 writes samples.npz, grid.png and info.json.
    setting = (guidance w, guide_blocks, score-step gamma)."""
    guidance, guide_blocks, score_step = setting
    num = len(plan)
    dtype = torch.float64 if args.precision == "fp64" else torch.float32
    write_png = not args.no_png
    os.makedirs(os.path.join(out, "images") if write_png else out, exist_ok=True)
    mine = np.arange(rank, num, world)
    parts = []
    start_time = time.time()
    progress = rank == 0 and not args.no_progress
    starts = range(0, len(mine), args.batch_size)
    for start in tqdm(starts, desc=f"sampling w={guidance:g}", disable=not progress):
        idx = mine[start:start + args.batch_size]
        shape = (flow.num_tokens, flow.in_channels)
        u = prior_noise(args.seed, idx, shape).to(device, dtype)
        labels = torch.from_numpy(plan[idx]).to(device)
        with autocast_for(device, args.precision):
            images = stage1.generate(flow, u, labels, guidance=guidance,
                                     guide_blocks=guide_blocks, score_step=score_step)  # eq. 10
        check_finite(images, idx, "samples")
        parts.append(to_uint8(images))
        for i, img in zip(idx, parts[-1] if write_png else []):
            path = os.path.join(out, "images", f"{i:06d}.png")
            common.atomic_write(path, lambda f: Image.fromarray(img).save(f, format="PNG"))
    seconds = time.time() - start_time
    size = stage1.image_size
    images = gather_rows(parts, (size, size, 3), num, rank, world, out)
    if rank == 0:
        write_samples(images, plan, out, setting, args, class_names, seconds, world, flow)
    if world > 1:
        dist.barrier()  # every rank returns once samples.npz exists (the sweep reads it on all)
    return os.path.join(out, "samples.npz")


def write_samples(images, plan, out, setting, args, class_names, seconds, world, flow):
    """samples.npz (ADM's layout), grid.png (a row per class) and info.json of a sampling run."""
    guidance, guide_blocks, score_step = setting
    num = len(plan)
    npz = os.path.join(out, "samples.npz")
    common.atomic_write(npz, lambda f: np.savez(f, arr_0=images, arr_1=plan))
    order = grid_order(plan, args.grid_rows, args.grid_cols)
    blank = np.full_like(images[0], 255)
    tiles = np.stack([images[i] if i >= 0 else blank for row in order for i in row])
    tiles = torch.from_numpy(tiles).permute(0, 3, 1, 2) / 255
    labels = []
    for row in order:
        c = int(plan[row[0]])
        name = "-" if c < 0 else str(c)
        if class_names and 0 <= c < len(class_names):
            name += f" {class_names[c]}"
        labels += [name] + [None] * (len(row) - 1)
    title = f"SRC-Flow samples, w={guidance:g} ({guide_blocks}), seed={args.seed}"
    grid = os.path.join(out, "grid.png")
    common.save_grid(tiles, grid, nrow=args.grid_cols, labels=labels, title=title)
    info = dict(
        num=num,
        guidance=guidance,
        guide_blocks=guide_blocks,
        score_step=score_step,
        seed=args.seed,
        world_size=world,
        precision=args.precision,
        seconds=round(seconds, 2),
        images_per_second=round(num / max(seconds, 1e-9), 3),
        shape=list(images.shape),
        class_counts=np.bincount(plan[plan >= 0]).tolist() if flow.num_classes else [],
    )
    common.save_json(info, os.path.join(out, "info.json"))
    pngs = f", {os.path.join(out, 'images')}/" if not args.no_png else ""
    print(f"wrote {num} samples ({seconds:.1f}s): {npz}, {grid}{pngs}")


def evaluate_nll(flow, record, stage1, args, rank, world, device, dtype):
    """The exact NLL of a folder in bits per compact dimension, noisy (eq. 8) and clean (eq. 5)."""
    data = common.ImageFolder(args.nll, stage1.image_size, flat=True)
    n = min(args.limit or len(data), len(data))
    uncond = args.nll_uncond
    if flow.num_classes and not uncond and len(data.classes) != flow.num_classes:
        raise UserError(f"--nll {args.nll}: {len(data.classes)} class subfolders but the flow has "
                        f"{flow.num_classes} classes (or pass --nll-uncond: the null label)")
    labels = [flow.num_classes if uncond else label for _, label in data.samples[:n]]
    labels = np.array(labels, dtype=np.int64)
    sigma = float(record["noise_std"])
    per_example = record["noise_mode"] == "per-example"
    draws = args.nll_draws

    def bits(z_c, y):  # -log p(z_c | y) / (N d ln 2): eq. 2 through eq. 9 and its constant
        u, logdet = flow(z_c, y if flow.num_classes else None)
        return bits_per_dim(nll_per_dim(u, logdet)).double()

    rows = []
    progress = rank == 0 and not args.no_progress
    for idx, x in batches(data, n, args.batch_size, rank, world, device, dtype, "nll", progress):
        y = torch.from_numpy(labels[idx]).to(device)
        z_raw = stage1.encode_raw(x)  # E(x), once for every draw
        clean = bits(stage1.compact(z_raw), y)  # eq. 5
        noisy = 0
        for k in range(draws):
            eps = encoder_noise_of(args.seed, idx, z_raw.shape[1:], sigma, per_example,
                                   common.STREAM_NLL, k)
            noisy = noisy + bits(stage1.compact(z_raw, eps.to(device, dtype)), y)  # eq. 8
        noisy = noisy / draws
        rows += list(zip(idx.tolist(), clean.tolist(), noisy.tolist()))
    rows = sorted(sum(common.all_gather(rows), []))
    clean = [r[1] for r in rows]
    noisy = [r[2] for r in rows]
    return dict(
        folder=args.nll,
        num_images=len(rows),
        conditional=not uncond and flow.num_classes > 0,
        noise_std=sigma,
        noise_mode=record["noise_mode"],
        noise_draws=draws,
        dims=flow.num_tokens * flow.in_channels,
        nll_bpd_noisy=float(np.mean(noisy)),
        nll_bpd_noisy_sem=standard_error(noisy),
        nll_bpd_clean=float(np.mean(clean)),
        nll_bpd_clean_sem=standard_error(clean),
        per_image=[dict(path=data.samples[i][0], clean=c, noisy=v) for i, c, v in rows],
    )


def standard_error(values):
    if len(values) < 2:
        return math.nan
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))


def print_nll(res, args):
    kind = "conditional" if res["conditional"] else "null label"
    print(f"NLL of {res['num_images']} images in {args.nll} (bits per compact dimension, "
          f"N*d={res['dims']}, {kind}):")
    print(f"  noisy (sigma_flow={res['noise_std']:g} {res['noise_mode']}, {res['noise_draws']} "
          f"draws): {res['nll_bpd_noisy']:.4f} +- {res['nll_bpd_noisy_sem']:.4f}")
    print(f"  clean (no noise): {res['nll_bpd_clean']:.4f} +- {res['nll_bpd_clean_sem']:.4f}")
    if args.nll_json:
        common.save_json(res, args.nll_json)


def reconstruct(stage1, args, rank, world, device, dtype):
    """originals.npz and recon.npz of a folder (ADM's npz, uint8 NHWC) for rFID."""
    data = common.ImageFolder(args.reconstruct, stage1.image_size, flat=True)
    n = min(args.limit or len(data), len(data))
    out = args.out
    originals = []
    recons = []
    os.makedirs(out, exist_ok=True)
    progress = rank == 0 and not args.no_progress
    for idx, x in batches(data, n, args.batch_size, rank, world, device, dtype, "reconstruct",
                          progress):
        z_raw = stage1.encode_raw(x)
        if args.recon_noise > 0:
            eps = encoder_noise_of(args.seed, idx, z_raw.shape[1:], args.recon_noise, False,
                                   common.STREAM_RECON)
            z_raw = z_raw + eps.to(device, dtype)
        if args.recon_rae:
            recon = stage1.rae.decode(stage1.rae.normalize(z_raw))  # the RAE's own round trip
        else:
            recon = stage1(z_raw)  # eq. 7
        check_finite(recon, idx, "reconstructions")
        originals.append(to_uint8(x))
        recons.append(to_uint8(recon))
    shape = (stage1.image_size, stage1.image_size, 3)
    originals = gather_rows(originals, shape, n, rank, world, out)
    recons = gather_rows(recons, shape, n, rank, world, out)
    if rank == 0:
        for name, arr in (("originals", originals), ("recon", recons)):
            path = os.path.join(out, f"{name}.npz")
            common.atomic_write(path, lambda f: np.savez(f, arr_0=arr))
        pairs = np.concatenate([originals[:GRID_PAIRS], recons[:GRID_PAIRS]])
        pairs = torch.from_numpy(pairs).permute(0, 3, 1, 2) / 255
        common.save_grid(pairs, os.path.join(out, "grid.png"), nrow=min(GRID_PAIRS, n),
                         title="originals / reconstructions")
        what = "RAE" if args.recon_rae else "SRC"
        print(f"wrote {n} originals and reconstructions ({what}, noise {args.recon_noise:g}) to "
              f"{out}; rFID: python fid.py {os.path.join(out, 'originals.npz')} "
              f"{os.path.join(out, 'recon.npz')} --weights pt_inception-2015-12-05-6726825d.pth")


def sweep(flow, stage1, args, plan, settings, class_names, rank, world, device):
    """Sample every (w, guide_blocks, score step) setting and score it against --ref (fid.py)."""
    progress = rank == 0 and not args.no_progress
    model = fid.load_inception(args.fid_weights).to(device)
    ref = fid.load_features(args.ref, model, batch_size=args.batch_size, device=device,
                            progress=progress, image_size=stage1.image_size)  # a folder: ADM's crop
    table = []
    for setting in settings:
        w, blocks, gamma = setting
        name = f"cfg-{w:g}"
        if blocks == "deep":
            name += "-deep"
        if gamma:
            name += f"-score{gamma:g}"
        out = os.path.join(args.out, name)
        path = sample_images(flow, stage1, out, plan, setting, args, rank, world, device,
                             class_names)
        res = fid.evaluate(ref, path, model, batch_size=args.batch_size, device=device,
                           progress=progress)
        table.append(dict(guidance=w, guide_blocks=blocks, score_step=gamma, samples=path, **res))
        if rank == 0:
            print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in res.items()))
    if rank == 0:
        best = min(table, key=lambda r: r["fid"])
        print(f"best: w={best['guidance']:g}, {best['guide_blocks']}, score step "
              f"{best['score_step']:g} (FID {best['fid']:.3f})")
        record = dict(ref=args.ref, num=args.num_samples, seed=args.seed, results=table)
        common.save_json(record, os.path.join(args.out, "sweep.json"))


# ---- Command line

@torch.no_grad()
def main(args):
    """One mode per run. An error on one rank ends that process at once (no barrier on the way
    out): torchrun then stops the other ranks, so a failure never hangs the job."""
    settings, class_names = check_args(args)
    rank, world, device = common.setup_ddp(args.device)
    dtype = torch.float64 if args.precision == "fp64" else torch.float32
    flow, record, stage1 = load_models(args, device)
    stage1.to(dtype)
    if args.reconstruct is not None:
        precision = "fp32" if args.precision == "auto" else args.precision
        with autocast_for(device, precision):
            reconstruct(stage1, args, rank, world, device, dtype)
        common.cleanup_ddp()
        return
    flow.to(dtype)
    if args.nll is not None:
        res = evaluate_nll(flow, record, stage1, args, rank, world, device, dtype)
        if rank == 0:
            print_nll(res, args)
        common.cleanup_ddp()
        return
    if flow.num_classes == 0 and any(w > 0 or g > 0 for w, _, g in settings):
        raise UserError(f"guidance and --score-step need a class-conditional flow; {args.ckpt} "
                        f"is unconditional")
    classes = parse_classes(args.classes, flow.num_classes)
    plan = class_plan(args.num_samples, flow.num_classes, classes, args.seed)
    if args.cfg_sweep:
        sweep(flow, stage1, args, plan, settings, class_names, rank, world, device)
    else:
        sample_images(flow, stage1, args.out, plan, settings[0], args, rank, world, device,
                      class_names)
    common.cleanup_ddp()


def floats(text, flag):
    """A comma list of finite numbers >= 0."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise UserError(f"{flag}: expected finite numbers >= 0, got {text!r}")
    return values


def check_args(args):
    """Checks that need no file, one line naming the flag; returns the (w, guide_blocks, gamma)
    settings and the class names."""
    counts = dict(num_samples=args.num_samples, batch_size=args.batch_size,
                  nll_draws=args.nll_draws)
    for name, value in counts.items():
        if value < 1:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag}: expected a positive integer, got {value}")
    if not args.recon_noise >= 0:
        raise UserError(f"--recon-noise: expected a noise std >= 0, got {args.recon_noise}")
    blocks = [b for b in args.guide_blocks.split(",") if b]
    if not blocks or any(b not in ("all", "deep") for b in blocks):
        raise UserError(f"--guide-blocks: expected all, deep or a comma list of them, "
                        f"got {args.guide_blocks!r}")
    if args.cfg_sweep:
        ws = floats(args.cfg_sweep, "--cfg-sweep")
    else:
        ws = floats(str(args.cfg), "guidance scale --cfg")
    gammas = floats(args.score_step, "--score-step")
    if not args.cfg_sweep and (len(blocks) > 1 or len(gammas) > 1):
        raise UserError("--guide-blocks / --score-step: several values need --cfg-sweep")
    if args.cfg_sweep:
        for flag, path in (("--ref", args.ref), ("--fid-weights", args.fid_weights)):
            if path is None or not os.path.exists(path):
                raise UserError(f"--cfg-sweep needs {flag} (an existing file or folder), "
                                f"got {path}")
    if args.reconstruct is None and args.ckpt is None:
        raise UserError("--ckpt: a stage-2 checkpoint from train_flow.py is needed (except with "
                        "--reconstruct)")
    if args.reconstruct is not None and args.ckpt is None and args.stage1 is None:
        raise UserError("--reconstruct needs --stage1 (or --ckpt, whose stage 1 is used)")
    if args.nll is None and args.out is None:
        raise UserError("--out: needed to write samples or reconstructions (or use --nll FOLDER)")
    class_names = None
    if args.class_names:
        if not os.path.isfile(args.class_names):
            raise UserError(f"--class-names {args.class_names}: no such file (expected one class "
                            f"name per line)")
        with open(args.class_names) as f:
            class_names = [line.strip() for line in f if line.strip()]
    settings = [(w, b, g) for w in ws for b in blocks for g in gammas]
    return settings, class_names


def build_parser():
    p = argparse.ArgumentParser(
        description="Sample from SRC-Flow (eq. 10), evaluate its exact NLL (eq. 2) or write "
                    "stage-1 reconstructions for rFID.")
    p.add_argument("--ckpt", default=None, help="stage-2 checkpoint written by train_flow.py")
    p.add_argument("--stage1", default=None,
                   help="stage-1 checkpoint (default: the path stored in --ckpt)")
    p.add_argument("--encoder", default=None, help="DINOv2 weights, if they moved since stage 1")
    p.add_argument("--decoder", default=None,
                   help="released RAE decoder model.pt, if it moved since stage 1")
    p.add_argument("--out", default=None,
                   help="output folder for images/, samples.npz, grid.png, info.json")
    p.add_argument("--num-samples", type=int, default=50_000,
                   help="number of images (the paper evaluates 50k)")
    p.add_argument("--classes", default="even",
                   help="'even' (all classes equally: 50 each for 50k), 'random', or a list "
                        "such as 207,360,387")
    p.add_argument("--cfg", type=float, default=0.0,
                   help="classifier-free guidance scale w (0 = none)")
    p.add_argument("--guide-blocks", default="all",
                   help="guide every flow block (all; STARFlow's default) or the deep block "
                        "only (deep)")
    p.add_argument("--score-step", default="0",
                   help="SimFlow's score step gamma after guidance (its eq. 6; 0 = off)")
    p.add_argument("--cfg-sweep", default=None,
                   help="comma list of w: sample each and score it (needs --ref, --fid-weights); "
                        "--guide-blocks and --score-step may be lists")
    p.add_argument("--ref", default=None,
                   help="FID reference: ADM .npz batch, .npz with mu/sigma, or image folder")
    p.add_argument("--fid-weights", default=None,
                   help="pt_inception-2015-12-05-6726825d.pth for fid.py")
    p.add_argument("--seed", type=int, default=0,
                   help="global seed; sample i uses noise seeded by (seed, i)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass per rank")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp64"], default="auto",
                   help="auto = bf16 autocast on GPU, fp32 on CPU; NLL always runs in fp32 "
                        "(or fp64)")
    p.add_argument("--no-ema", action="store_true",
                   help="use the raw weights instead of the EMA weights")
    p.add_argument("--no-png", action="store_true", help="write only samples.npz and grid.png")
    p.add_argument("--class-names", default=None,
                   help="text file with one class name per line, for the grid")
    p.add_argument("--grid-rows", type=int, default=8, help="classes shown in grid.png")
    p.add_argument("--grid-cols", type=int, default=8, help="samples per class in grid.png")
    p.add_argument("--nll", default=None, metavar="FOLDER",
                   help="evaluate the exact NLL of these images instead")
    p.add_argument("--nll-uncond", action="store_true",
                   help="NLL under the null label (a folder without classes)")
    p.add_argument("--nll-draws", type=int, default=4,
                   help="noise draws per image for the noisy NLL")
    p.add_argument("--nll-json", default=None,
                   help="also write the NLL results (and per-image values) here")
    p.add_argument("--reconstruct", default=None, metavar="FOLDER",
                   help="write originals.npz and recon.npz of these images (rFID) instead")
    p.add_argument("--recon-rae", action="store_true",
                   help="--reconstruct through the RAE alone (no compressor)")
    p.add_argument("--recon-noise", type=float, default=0.0,
                   help="--reconstruct: std of the noise on E(x)")
    p.add_argument("--limit", type=int, default=0,
                   help="--nll / --reconstruct: only the first N images (0 = all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


if __name__ == "__main__":
    common.run_cli(main, build_parser().parse_args())
