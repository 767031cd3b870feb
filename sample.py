"""Sample images from a trained SRC-Flow (eq. 10), measure its exact likelihood (eq. 2, 9) and its stage-1
reconstructions (rFID).

Generation: z ~ N(0, I) -> z_c = f^-1(z; y, w) -> Stage1.decode (denorm2, C_dec, denorm, D) -> clamp -> uint8,
with STARFlow's classifier-free guidance in every flow block (--guide-blocks all) or the deep block only (deep),
then optionally SimFlow's score step (--score-step GAMMA, SimFlow eq. 6; 0, the paper's setting, is off). Sample
i uses prior noise seeded by (seed, i) and label plan[i]: the images do not depend on ranks or batch size.

    python sample.py --ckpt runs/flow/checkpoint.pt --out samples/w0 --num-samples 64
    torchrun --nproc_per_node=8 sample.py --ckpt runs/flow/checkpoint.pt --out samples/w2 \\
        --num-samples 50000 --cfg 2.0 --no-png          # 50 per class, ADM-style samples.npz for fid.py

Outputs in --out: images/000000.png ..., samples.npz (`arr_0` uint8 NHWC, `arr_1` int64 labels, as the ADM
evaluator reads it), grid.png (a row per class) and info.json. --cfg-sweep 1,2,3 --ref REF --fid-weights FILE
(--guide-blocks and --score-step may be lists too) samples each setting into --out/cfg-<w>[-deep][-score<g>]/
and scores it with fid.evaluate (sweep.json).

--nll DIR: -log p(z_c | y) / (N d ln 2) per image (eq. 2), mean and standard error, "noisy" (z_c built as in
training, eq. 8, averaged over --nll-draws noise draws: the training objective on held-out data) and "clean" (no
noise). Densities of continuous features: they can be negative and are not comparable with pixel bits/dim.

--reconstruct DIR --stage1 CKPT --out OUT: each image (ADM centre crop) and Stage1(E(x) + eps) (--recon-rae: the
RAE alone; --recon-noise SIGMA: eps ~ N(0, SIGMA^2)) go to OUT/originals.npz and OUT/recon.npz, for
`python fid.py OUT/originals.npz OUT/recon.npz` (paper: SRC 0.62, RAE 0.57 rFID on ImageNet val).
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


# -----------------------------------------------------------------------------
# The sampling plan: labels and noise, fixed per global sample index.

def prior_noise(seed, indices, shape):
    """z_i ~ N(0, I) of `shape` (N, d) for each global sample index i, from a generator seeded by (seed, i)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(common.seed_of(seed, i)))
                        for i in indices]) if len(indices) else torch.empty(0, *shape)


def encoder_noise_of(seed, indices, shape, sigma, per_example, *stream):
    """eps of eq. 8 for each global image index i (common.encoder_noise with a generator seeded by (seed, i,
    *stream)), so the NLL and the reconstructions do not depend on ranks or batch sizes."""
    return torch.cat([common.encoder_noise(torch.Generator().manual_seed(common.seed_of(seed, i, *stream)), 1, shape,
                                           0, 1, "cpu", sigma, per_example) for i in indices])


def parse_classes(text, num_classes):
    """--classes: 'even', 'random' or a comma list of class indices (checked against the model)."""
    if text in ("even", "random"):
        if num_classes == 0:
            raise UserError(f"--classes {text}: the flow is unconditional (num_classes=0); drop --classes")
        return text
    try:
        classes = [int(c) for c in text.split(",") if c.strip() != ""]
    except ValueError:
        classes = []
    if not classes or not all(0 <= c < num_classes for c in classes):
        raise UserError(f"--classes: expected 'even', 'random' or a comma list of the model's classes "
                        f"0..{num_classes - 1}, got {text!r}")
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
        return np.random.default_rng(common.seed_of(seed, 0x5EED)).integers(0, num_classes, num).astype(np.int64)
    return np.asarray(classes, dtype=np.int64)[np.arange(num) % len(classes)]


def grid_order(labels, rows, cols):
    """Indices for grid.png: one row per class (the first `rows` classes in plan order), its first `cols`
    samples; -1 pads a row with fewer samples."""
    order = list(dict.fromkeys(labels.tolist()))[:rows]
    return [[*np.flatnonzero(labels == c)[:cols].tolist(), *[-1] * cols][:cols] for c in order]


# -----------------------------------------------------------------------------
# Generation

def load_models(args, device):
    """(flow, its checkpoint record, Stage1) of --ckpt (only the Stage1 with --reconstruct), paths overridable."""
    flow = ckpt = None
    if args.reconstruct is None:
        flow, ckpt = common.load_flow(args.ckpt, device=device, ema=not args.no_ema)
    stage1 = args.stage1 or (ckpt or common.load_checkpoint(args.ckpt, "flow"))["stage1"]
    if not args.stage1 and not os.path.isfile(stage1):  # a missing --stage1 is named by load_stage1
        raise FileNotFoundError(f"{stage1}: the stage-1 checkpoint named by {args.ckpt} is missing; pass --stage1 PATH")
    stage1 = common.load_stage1(stage1, device, ema=not args.no_ema, encoder=args.encoder, decoder=args.decoder)
    if flow is not None and flow.in_channels != stage1.C.d:
        raise UserError(f"{args.ckpt}: the flow models d={flow.in_channels} channels, the stage 1 gives {stage1.C.d}")
    return flow, ckpt, stage1


@torch.no_grad()
def generate(flow, stage1, z, y, guidance=0.0, guide_blocks="all", score_step=0.0):
    """Eq. 10: prior noise z (B, N, d) -> images in [0, 1] (B, 3, S, S), not clamped."""
    y = y if flow.num_classes else None
    x = flow.reverse(z, y, guidance=guidance, guide_blocks=guide_blocks)
    if score_step:
        x = flow.score_step(x, y, score_step)                     # SimFlow eq. 6
    return stage1.decode(x).float()


def to_uint8(images):
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8, rounded to nearest."""
    return (images.float().clamp(0, 1) * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def check_finite(images, idx, what):
    """Stop with one line when samples are nan/inf (ADM's evaluator would fail on them much later)."""
    bad = ~torch.isfinite(images.flatten(1)).all(1).cpu()
    if bad.any():
        raise UserError(f"{int(bad.sum())} {what} not finite (nan/inf), indices {idx[bad.numpy()].tolist()[:20]}; "
                        f"stopped before writing them")


def autocast_for(device, precision):
    """bf16 autocast on GPU by default ('auto'); float32 or float64 weights otherwise."""
    dev_type = torch.device(device).type
    return torch.autocast(dev_type, dtype=torch.bfloat16,
                          enabled=precision == "bf16" or (precision == "auto" and dev_type == "cuda"))


def gather_rows(parts, shape, num, rank, world, out):
    """Rank 0 gets the (num, *shape) uint8 array whose rows r::world are rank r's `parts` (a shard file per rank)."""
    rows = np.concatenate(parts) if parts else np.zeros((0, *shape), np.uint8)
    if world == 1:
        return rows
    shard = os.path.join(out, f".shard{rank}.npy")
    common.atomic_write(shard, lambda f: np.save(f, rows))
    dist.barrier()
    full = None
    if rank == 0:
        for r in range(world):
            part = np.load(os.path.join(out, f".shard{r}.npy"))
            full = np.empty((num,) + part.shape[1:], part.dtype) if full is None else full
            full[r::world] = part
    dist.barrier()
    os.remove(shard)
    return full


# -----------------------------------------------------------------------------
# Modes: sample, NLL, reconstruct, guidance sweep.

def sample_images(flow, stage1, out, num, plan, guidance, seed, batch_size, rank, world, device, precision,
                  guide_blocks="all", score_step=0.0, write_png=True, class_names=None, grid=(8, 8), progress=True):
    """Generate `num` images into `out`; rank 0 writes samples.npz, grid.png and info.json."""
    dtype = torch.float64 if precision == "fp64" else torch.float32
    os.makedirs(os.path.join(out, "images") if write_png else out, exist_ok=True)
    mine, parts, t0 = np.arange(rank, num, world), [], time.time()
    for s in tqdm(range(0, len(mine), batch_size), desc=f"sampling w={guidance:g}", disable=rank != 0 or not progress):
        idx = mine[s:s + batch_size]
        z = prior_noise(seed, idx, (flow.num_tokens, flow.in_channels)).to(device, dtype)
        with autocast_for(device, precision):
            images = generate(flow, stage1, z, torch.from_numpy(plan[idx]).to(device), guidance, guide_blocks,
                              score_step)
        check_finite(images, idx, "samples")
        parts.append(to_uint8(images))
        for i, img in zip(idx, parts[-1] if write_png else []):
            common.atomic_write(os.path.join(out, "images", f"{i:06d}.png"),
                                lambda f: Image.fromarray(img).save(f, format="PNG"))
    seconds = time.time() - t0
    images = gather_rows(parts, (stage1.image_size, stage1.image_size, 3), num, rank, world, out)
    if rank == 0:
        common.atomic_write(os.path.join(out, "samples.npz"), lambda f: np.savez(f, arr_0=images, arr_1=plan))
        order = grid_order(plan, *grid)
        tiles = torch.from_numpy(np.stack([images[i] if i >= 0 else np.full_like(images[0], 255)
                                           for row in order for i in row])).permute(0, 3, 1, 2) / 255
        names = [("-" if c < 0 else str(c)) + (f" {class_names[c]}" if class_names and 0 <= c < len(class_names)
                                               else "") for c in dict.fromkeys(plan.tolist())]
        labels = [names[r] if k == 0 else None for r, row in enumerate(order) for k in range(len(row))]
        common.save_grid(tiles, os.path.join(out, "grid.png"), nrow=grid[1], labels=labels,
                         title=f"SRC-Flow samples, w={guidance:g} ({guide_blocks}), seed={seed}")
        info = dict(num=num, guidance=guidance, guide_blocks=guide_blocks, score_step=score_step, seed=seed,
                    world_size=world, precision=precision, seconds=round(seconds, 2),
                    images_per_second=round(num / max(seconds, 1e-9), 3), shape=list(images.shape),
                    class_counts=np.bincount(plan[plan >= 0]).tolist() if flow.num_classes else [])
        common.save_json(info, os.path.join(out, "info.json"))
        print(f"wrote {num} samples ({seconds:.1f}s): {os.path.join(out, 'samples.npz')}, "
              f"{os.path.join(out, 'grid.png')}" + (f", {os.path.join(out, 'images')}/" if write_png else ""))
    if world > 1:
        dist.barrier()  # every rank returns once samples.npz exists (the sweep reads it on all ranks)
    return os.path.join(out, "samples.npz")


def batches(data, n, batch_size, rank, world, device, dtype, desc, progress):
    """This rank's images r, r + world, ... of the first n: (global indices, images in [0, 1]) per batch."""
    mine = np.arange(rank, n, world)
    for s in tqdm(range(0, len(mine), batch_size), desc=desc, disable=rank != 0 or not progress):
        idx = mine[s:s + batch_size]
        yield idx, torch.stack([data[int(i)][0] for i in idx]).to(device, dtype) / 255


def evaluate_nll(flow, ckpt, stage1, root, uncond, draws, seed, batch_size, limit, rank, world, device, dtype,
                 progress=True):
    """Exact NLL of a folder in bits/dim of the compact space, noisy (eq. 8) and clean; see the module doc."""
    data = common.ImageFolder(root, stage1.image_size, flat=True)
    n = min(limit or len(data), len(data))
    if flow.num_classes and not uncond and len(data.classes) != flow.num_classes:
        raise UserError(f"--nll {root}: {len(data.classes)} class subfolders but the flow has {flow.num_classes} "
                        f"classes (or pass --nll-uncond for the null-label likelihood)")
    labels = np.array([flow.num_classes if uncond else label for _, label in data.samples[:n]], dtype=np.int64)
    sigma, per_example = float(ckpt["noise_std"]), ckpt["noise_mode"] == "per-example"
    dims = flow.num_tokens * flow.in_channels

    def nll(x, y):  # -log p(z_c | y) / (N d ln 2), eq. 2
        return -flow.log_prob(x, y if flow.num_classes else None).double() / (dims * math.log(2))

    rows = []
    for idx, x in batches(data, n, batch_size, rank, world, device, dtype, "nll", progress):
        y = torch.from_numpy(labels[idx]).to(device)
        z_raw = stage1.rae.encode_raw(x)                                                    # E(x)
        clean = nll(stage1.compact(z_raw), y)
        noisy = sum(nll(stage1.compact(z_raw + encoder_noise_of(seed, idx, z_raw.shape[1:], sigma, per_example, 1, k)
                                       .to(device, dtype)), y) for k in range(draws)) / draws
        rows += list(zip(idx.tolist(), clean.tolist(), noisy.tolist()))
    rows = sorted(sum(common.all_gather(rows), []))
    mean_sem = lambda v: (float(np.mean(v)), float(np.std(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan)
    (clean_m, clean_s), (noisy_m, noisy_s) = mean_sem([r[1] for r in rows]), mean_sem([r[2] for r in rows])
    return dict(folder=root, num_images=len(rows), conditional=not uncond and flow.num_classes > 0,
                noise_std=sigma, noise_mode=ckpt["noise_mode"], noise_draws=draws, dims=dims,
                nll_bpd_noisy=noisy_m, nll_bpd_noisy_sem=noisy_s, nll_bpd_clean=clean_m, nll_bpd_clean_sem=clean_s,
                per_image=[dict(path=data.samples[i][0], clean=c, noisy=v) for i, c, v in rows])


def reconstruct(stage1, root, out, rae_only, noise, seed, batch_size, limit, rank, world, device, dtype, progress):
    """originals.npz and recon.npz of a folder (ADM npz, uint8 NHWC) for rFID; see the module doc."""
    data = common.ImageFolder(root, stage1.image_size, flat=True)
    n = min(limit or len(data), len(data))
    originals, recons = [], []
    os.makedirs(out, exist_ok=True)
    for idx, x in batches(data, n, batch_size, rank, world, device, dtype, "reconstruct", progress):
        z_raw = stage1.rae.encode_raw(x)
        if noise > 0:
            z_raw = z_raw + encoder_noise_of(seed, idx, z_raw.shape[1:], noise, False, 2).to(device, dtype)
        recon = stage1.rae.decode(stage1.rae.normalize(z_raw)) if rae_only else stage1(z_raw)
        check_finite(recon, idx, "reconstructions")
        originals.append(to_uint8(x))
        recons.append(to_uint8(recon))
    originals, recons = [gather_rows(p, (stage1.image_size, stage1.image_size, 3), n, rank, world, out)
                         for p in (originals, recons)]
    if rank == 0:
        for name, arr in (("originals", originals), ("recon", recons)):
            common.atomic_write(os.path.join(out, f"{name}.npz"), lambda f: np.savez(f, arr_0=arr))
        pair = torch.from_numpy(np.concatenate([originals[:8], recons[:8]])).permute(0, 3, 1, 2) / 255
        common.save_grid(pair, os.path.join(out, "grid.png"), nrow=min(8, n), title="originals / reconstructions")
        print(f"wrote {n} originals and reconstructions ({'RAE' if rae_only else 'SRC'}, noise {noise:g}) to {out}; "
              f"rFID: python fid.py {os.path.join(out, 'originals.npz')} {os.path.join(out, 'recon.npz')} "
              f"--weights pt_inception-2015-12-05-6726825d.pth")


def sweep(flow, stage1, args, plan, settings, class_names, rank, world, device):
    """Sample every (w, guide_blocks, score step) setting and score it with fid.evaluate against --ref."""
    progress = rank == 0 and not args.no_progress
    model = fid.load_inception(args.fid_weights).to(device)
    ref = fid.load_features(args.ref, model, batch_size=args.batch_size, device=device, progress=progress,
                            image_size=stage1.image_size)  # a folder: ADM's crop at the samples' size
    table = []
    for w, blocks, gamma in settings:
        name = f"cfg-{w:g}" + ("-deep" if blocks == "deep" else "") + (f"-score{gamma:g}" if gamma else "")
        path = sample_images(flow, stage1, os.path.join(args.out, name), args.num_samples, plan, w, args.seed,
                             args.batch_size, rank, world, device, args.precision, blocks, gamma, not args.no_png,
                             class_names, (args.grid_rows, args.grid_cols), not args.no_progress)
        res = fid.evaluate(ref, path, model, batch_size=args.batch_size, device=device, progress=progress)
        table.append(dict(guidance=w, guide_blocks=blocks, score_step=gamma, samples=path, **res))
        if rank == 0:
            print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in res.items()))
    if rank == 0:
        best = min(table, key=lambda r: r["fid"])
        print(f"best: w={best['guidance']:g}, {best['guide_blocks']}, score step {best['score_step']:g} "
              f"(FID {best['fid']:.3f})")
        common.save_json(dict(ref=args.ref, num=args.num_samples, seed=args.seed, results=table),
                         os.path.join(args.out, "sweep.json"))


# -----------------------------------------------------------------------------

def floats(text, flag):
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise UserError(f"{flag}: expected finite numbers >= 0, got {text!r}")
    return values


def check_args(args):
    """Argument checks that need no file: one line naming the flag."""
    for flag, v in (("--num-samples", args.num_samples), ("--batch-size", args.batch_size),
                    ("--nll-draws", args.nll_draws)):
        if v < 1:
            raise UserError(f"{flag}: expected a positive integer, got {v}")
    if not args.recon_noise >= 0:
        raise UserError(f"--recon-noise: expected a noise std >= 0, got {args.recon_noise}")
    blocks = [b for b in args.guide_blocks.split(",") if b]
    if not blocks or any(b not in ("all", "deep") for b in blocks):
        raise UserError(f"--guide-blocks: expected all, deep or a comma list of them, got {args.guide_blocks!r}")
    ws = floats(args.cfg_sweep, "--cfg-sweep") if args.cfg_sweep else floats(str(args.cfg), "guidance scale --cfg")
    gammas = floats(args.score_step, "--score-step")
    if not args.cfg_sweep and (len(blocks) > 1 or len(gammas) > 1):
        raise UserError("--guide-blocks / --score-step: several values need --cfg-sweep")
    if args.cfg_sweep:
        for flag, path in (("--ref", args.ref), ("--fid-weights", args.fid_weights)):
            if path is None or not os.path.exists(path):
                raise UserError(f"--cfg-sweep needs {flag} (an existing file or folder), got {path}")
    if args.reconstruct is None and args.ckpt is None:
        raise UserError("--ckpt: a stage-2 checkpoint from train_flow.py is needed (except with --reconstruct)")
    if args.reconstruct is not None and args.ckpt is None and args.stage1 is None:
        raise UserError("--reconstruct needs --stage1 (or --ckpt, whose stage 1 is used)")
    if args.nll is None and args.out is None:
        raise UserError("--out: needed to write samples or reconstructions (or use --nll FOLDER)")
    class_names = None
    if args.class_names:
        if not os.path.isfile(args.class_names):
            raise UserError(f"--class-names {args.class_names}: no such file (expected one class name per line)")
        class_names = [line.strip() for line in open(args.class_names) if line.strip()]
    return [(w, b, g) for w in ws for b in blocks for g in gammas], class_names


@torch.no_grad()
def main(args):
    """One mode per run. An error on one rank ends that process at once (no barrier on the way out);
    torchrun then stops the other ranks, so a failure never hangs the job."""
    settings, class_names = check_args(args)
    rank, world, device = common.setup_ddp(args.device)
    dtype = torch.float64 if args.precision == "fp64" else torch.float32
    flow, ckpt, stage1 = load_models(args, device)
    stage1.to(dtype)
    if args.reconstruct is not None:
        with autocast_for(device, "fp32" if args.precision == "auto" else args.precision):
            reconstruct(stage1, args.reconstruct, args.out, args.recon_rae, args.recon_noise, args.seed,
                        args.batch_size, args.limit, rank, world, device, dtype, not args.no_progress)
    elif args.nll is not None:
        flow.to(dtype)
        res = evaluate_nll(flow, ckpt, stage1, args.nll, args.nll_uncond, args.nll_draws, args.seed,
                           args.batch_size, args.limit, rank, world, device, dtype, not args.no_progress)
        if rank == 0:
            print(f"NLL of {res['num_images']} images in {args.nll} (bits per compact dimension, "
                  f"N*d={res['dims']}, {'conditional' if res['conditional'] else 'null label'}):")
            print(f"  noisy (sigma_flow={res['noise_std']:g} {res['noise_mode']}, {res['noise_draws']} draws): "
                  f"{res['nll_bpd_noisy']:.4f} +- {res['nll_bpd_noisy_sem']:.4f}")
            print(f"  clean (no noise): {res['nll_bpd_clean']:.4f} +- {res['nll_bpd_clean_sem']:.4f}")
            if args.nll_json:
                common.save_json(res, args.nll_json)
    else:
        flow.to(dtype)
        if flow.num_classes == 0 and any(w > 0 or g > 0 for w, _, g in settings):
            raise UserError(f"guidance and --score-step need a class-conditional flow; {args.ckpt} is unconditional")
        plan = class_plan(args.num_samples, flow.num_classes, parse_classes(args.classes, flow.num_classes),
                          args.seed)
        if args.cfg_sweep:
            sweep(flow, stage1, args, plan, settings, class_names, rank, world, device)
        else:
            (w, blocks, gamma), = settings
            sample_images(flow, stage1, args.out, args.num_samples, plan, w, args.seed, args.batch_size, rank,
                          world, device, args.precision, blocks, gamma, not args.no_png, class_names,
                          (args.grid_rows, args.grid_cols), not args.no_progress)
    common.cleanup_ddp()


def build_parser():
    p = argparse.ArgumentParser(description="Sample from SRC-Flow (eq. 10), evaluate its exact NLL (eq. 2) or "
                                            "write stage-1 reconstructions for rFID.")
    p.add_argument("--ckpt", default=None, help="stage-2 checkpoint written by train_flow.py")
    p.add_argument("--stage1", default=None, help="stage-1 checkpoint (default: the path stored in --ckpt)")
    p.add_argument("--encoder", default=None, help="DINOv2 weights, if they moved since stage 1")
    p.add_argument("--decoder", default=None, help="released RAE decoder model.pt, if it moved since stage 1")
    p.add_argument("--out", default=None, help="output folder for images/, samples.npz, grid.png, info.json")
    p.add_argument("--num-samples", type=int, default=50_000, help="number of images (the paper evaluates 50k)")
    p.add_argument("--classes", default="even",
                   help="'even' (all classes equally, 50 each for 50k), 'random', or a list such as 207,360,387")
    p.add_argument("--cfg", type=float, default=0.0, help="classifier-free guidance scale w (0 = none)")
    p.add_argument("--guide-blocks", default="all",
                   help="guide every flow block (all; STARFlow's default) or the deep block only (deep)")
    p.add_argument("--score-step", default="0", help="SimFlow's score step gamma after guidance (eq. 6; 0 = off)")
    p.add_argument("--cfg-sweep", default=None, help="comma list of w: sample each and score it (needs --ref, "
                                                     "--fid-weights); --guide-blocks and --score-step may be lists")
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
    p.add_argument("--nll-json", default=None, help="also write the NLL results (and per-image values) here")
    p.add_argument("--reconstruct", default=None, metavar="FOLDER", help="write originals.npz and recon.npz of "
                                                                         "these images (rFID) instead")
    p.add_argument("--recon-rae", action="store_true", help="--reconstruct through the RAE alone (no compressor)")
    p.add_argument("--recon-noise", type=float, default=0.0, help="--reconstruct: std of the noise on E(x)")
    p.add_argument("--limit", type=int, default=0, help="--nll / --reconstruct: only the first N images (0 = all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


if __name__ == "__main__":
    common.run_cli(main, build_parser().parse_args())
