"""Generate images with a trained SRC-Flow (eq. 10), sharded over torchrun ranks.

    python sample.py --ckpt runs/flow/checkpoint.pt --out samples/w0 --num-samples 64
    torchrun --nproc_per_node=8 sample.py --ckpt runs/flow/checkpoint.pt --out samples/w2 \\
        --num-samples 50000 --cfg 2.0 --no-png     # 50 per class, an ADM samples.npz for fid.py

u ~ N(0, I) -> z_c = f^{-1}(u) with guidance w (--cfg; in every block or the deep one only:
--guide-blocks; --guidance-rule: a rule of tarflow.GUIDANCE_RULES) -> SimFlow's score step
(--score-step; 0 is off) -> the decoders (eq. 10).
Sample i uses noise seeded by (seed, i) and the label plan[i]: the images do not depend on ranks
or batch sizes. Writes OUT/images/*.png, OUT/samples.npz (ADM's layout), OUT/grid.png (a row
per class) and OUT/info.json. The flow's other direction (likelihood, inversion, interpolation)
is invert.py; rFID inputs and the guidance sweep are evaluate.py.
"""

import argparse
import collections
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import common
from common import UserError
from src import load_stage1
from tarflow import GUIDANCE_RULES, GUIDE_BLOCKS, load_flow

# --batch-size per rank by default: a GPU's batch reads the flow's weights once per token step
BATCH_SIZE = {"cuda": 256, "cpu": 32}
# invert.py's and evaluate.py's grid.png: the first GRID_PAIRS images and their versions
GRID_PAIRS = 8
# This process: rank, number of ranks, device, the models' dtype, the precision ('fp32', 'bf16':
# autocast, 'fp64'), progress bars (rank 0 only)
Job = collections.namedtuple("Job", "rank world device dtype precision progress")


# ---- The sampling plan: noise and labels, fixed per global sample index
def prior_noise(seed, indices, shape):
    """u_i ~ N(0, I) of shape (N, d) for each global sample index i, from a generator seeded
    by (seed, i): the same on every rank and in every batch."""
    noise = []
    for i in indices:
        gen = torch.Generator().manual_seed(common.seed_of(seed, i))
        noise.append(torch.randn(shape, generator=gen))
    return torch.stack(noise) if noise else torch.empty(0, *shape)


def class_plan(num, num_classes, classes="even", seed=0):
    """The label of every global sample index, int64 (num,): 'even' cycles through all classes
    (50 each for 50k ImageNet samples, the paper's protocol), 'random' draws them from `seed`, a
    list is cycled through. None for an unconditional flow (no labels)."""
    if num_classes == 0:
        return None
    if classes == "even":
        return np.arange(num, dtype=np.int64) % num_classes
    if classes == "random":
        rng = np.random.default_rng(common.seed_of(seed, common.STREAM_CLASSES))
        return rng.integers(0, num_classes, num)
    return np.asarray(classes, dtype=np.int64)[np.arange(num) % len(classes)]


@torch.no_grad()
def main(args):
    """Sample --num-samples images with one guidance setting into --out. An error on one rank
    ends that process at once (no barrier on the way out): torchrun then stops the others."""
    setting = check_args(args)
    # Set up torchrun: rank r samples the global indices r, r + world, ...
    rank, world, device = common.setup_ddp(args.device)
    # bf16 autocast on CUDA unless --precision says otherwise; fp64: float64 weights
    precision = common.precision_of(args.precision, device)
    dtype = torch.float64 if precision == "fp64" else torch.float32
    args.batch_size = args.batch_size or BATCH_SIZE[device.type]
    job = Job(rank=rank, world=world, device=device, dtype=dtype, precision=precision,
              progress=rank == 0 and not args.no_progress)

    # Load the flow f and stage 1 (E, C, D and norm2)
    flow, _, stage1 = load_models(args, job)
    if (setting["guidance"] or setting["score_step"]) and not flow.num_classes:
        raise UserError("guidance and --score-step need a conditional flow")
    if precision == "bf16":
        flow.cast_linears(torch.bfloat16)  # the same samples, no cast per token step

    # The class plan: sample i gets the label plan[i] (no plan: an unconditional flow)
    classes = parse_classes(args.classes, flow.num_classes)
    plan = class_plan(args.num_samples, flow.num_classes, classes, seed=args.seed)
    sample_images(flow, stage1, args.out, plan, setting, args, job)
    common.cleanup_ddp()


# ---- One guidance setting into one folder (evaluate.py's sweep calls it per setting)
def sample_images(flow, stage1, out, plan, setting, args, job):
    """Generate --num-samples images (eq. 10) with `setting` (Stage1.generate's guidance,
    guide_blocks, score_step and rule) into the folder `out`: each rank its indices, rank 0 writes
    samples.npz, grid.png and info.json. Returns samples.npz's path once it exists, on every
    rank (evaluate.py's sweep scores it on every rank)."""
    num = args.num_samples
    png_dir = os.path.join(out, "images")
    os.makedirs(out if args.no_png else png_dir, exist_ok=True)
    shape = (flow.num_tokens, flow.in_channels)  # u: N tokens of d channels
    parts = []
    start = time.time()
    for idx in my_indices(num, args, job, f"sampling w={setting['guidance']:g}"):
        u = prior_noise(args.seed, idx, shape).to(job.device, job.dtype)
        labels = None
        if plan is not None:
            labels = torch.from_numpy(plan[idx]).to(job.device)
        # x = D(denorm(C_dec(denorm2(z_c)))), z_c = f^{-1}(u) guided, then the score step
        with common.autocast(job.device, job.precision):
            images = stage1.generate(flow, u, labels, **setting)
        check_finite(images, idx, "samples")
        pixels = to_uint8(images)  # (B, S, S, 3)
        parts.append(pixels)
        if args.no_png:
            continue
        for i, img in zip(idx, pixels):
            png = Image.fromarray(img)
            path = os.path.join(png_dir, f"{i:06d}.png")
            # no fsync per image: a crash may lose some, a kill leaves none half-written
            common.atomic_write(path, lambda f: png.save(f, format="PNG"), sync=False)
    seconds = time.time() - start
    size = stage1.image_size
    images = gather_rows(parts, (size, size, 3), num, job, out)
    if job.rank == 0:
        # ADM's layout: arr_0 the images (uint8 NHWC), arr_1 the labels of a conditional flow
        arrays = dict(arr_0=images)
        if plan is not None:
            arrays["arr_1"] = plan
        npz = os.path.join(out, "samples.npz")
        common.atomic_write(npz, lambda f: np.savez(f, **arrays))
        title = f"w={setting['guidance']:g} ({setting['guide_blocks']}), seed {args.seed}"
        save_class_grid(images, plan, os.path.join(out, "grid.png"), title, args)
        counts = [] if plan is None else np.bincount(plan).tolist()
        info = dict(num=num, **setting, seed=args.seed, world_size=job.world,
                    precision=job.precision, seconds=round(seconds, 2),
                    images_per_second=round(num / max(seconds, 1e-9), 3),
                    shape=list(images.shape), class_counts=counts)
        common.save_json(info, os.path.join(out, "info.json"))
        print(f"wrote {num} samples to {out}")
    if job.world > 1:
        dist.barrier()  # the other ranks return once samples.npz exists
    return os.path.join(out, "samples.npz")


def save_class_grid(images, plan, path, title, args):
    """grid.png of uint8 images (num, S, S, 3): a row per class (the first --grid-rows classes
    in plan order, their first --grid-cols samples, named with --class-names), or without a
    plan the first rows x cols samples."""
    cells = list(range(min(len(images), args.grid_rows * args.grid_cols)))
    labels = None
    if plan is not None:
        names = []
        if args.class_names:
            with open(args.class_names) as f:
                names = [line.strip() for line in f if line.strip()]
        order = grid_order(plan, args.grid_rows, args.grid_cols)
        cells = [i for row in order for i in row]
        labels = []
        for row in order:
            c = int(plan[row[0]])
            name = str(c)
            if c < len(names):
                name += f" {names[c]}"
            labels += [name] + [None] * (len(row) - 1)
    blank = np.full_like(images[0], 255)
    tiles = np.stack([images[i] if i >= 0 else blank for i in cells])
    tiles = torch.from_numpy(tiles).permute(0, 3, 1, 2) / 255
    common.save_grid(tiles, path, nrow=args.grid_cols, labels=labels, title=title)


def grid_order(labels, rows, cols):
    """The sample indices of grid.png: one row per class (the first `rows` classes in plan order)
    with its first `cols` samples; -1 pads a row with fewer samples."""
    order = []
    for c in list(dict.fromkeys(labels.tolist()))[:rows]:
        row = np.flatnonzero(labels == c)[:cols].tolist()
        order.append(row + [-1] * (cols - len(row)))
    return order


# ---- Models, ranks and images (invert.py and evaluate.py use them too)
def load_models(args, job):
    """(flow, its checkpoint record, Stage1) of --ckpt in job.dtype on job.device."""
    flow, record = load_flow(args.ckpt, device=job.device, ema=not args.no_ema)
    flow.to(job.dtype)
    stage1 = load_stage1_of(args, job, record)
    if flow.in_channels != stage1.C.d:
        raise UserError(f"{args.ckpt}: flow d={flow.in_channels}, stage 1 d={stage1.C.d}")
    return flow, record, stage1


def load_stage1_of(args, job, record=None):
    """The Stage1 of --stage1, else the one --ckpt's record names, in job.dtype; --encoder and
    --decoder give E's and D's files if they moved."""
    path = args.stage1
    if not path:
        path = (record or common.load_checkpoint(args.ckpt, "flow"))["stage1"]
        # (load_stage1 names a missing --stage1 itself)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: missing stage 1 of {args.ckpt}; pass --stage1")
    stage1 = load_stage1(path, job.device, ema=not args.no_ema, encoder=args.encoder,
                         decoder=args.decoder)
    return stage1.to(job.dtype)


def my_indices(n, args, job, desc):
    """This rank's global indices r, r + world, ... below n, --batch-size at a time."""
    mine = np.arange(job.rank, n, job.world)
    starts = range(0, len(mine), args.batch_size)
    for start in tqdm(starts, desc=desc, disable=not job.progress):
        yield mine[start:start + args.batch_size]


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


def encoder_noise_of(seed, indices, shape, sigma, mode="constant", stream=()):
    """eps of eq. 8 for each global image index i, seeded by (seed, i, *stream): the NLL and the
    reconstructions do not depend on ranks or batch sizes."""
    noise = []
    for i in indices:
        gen = torch.Generator().manual_seed(common.seed_of(seed, i, *stream))
        # a batch of one on one rank: common.encoder_noise, the draw of the training step
        eps = common.encoder_noise(gen, global_batch=1, shape=shape, rank=0, world=1,
                                   device="cpu", sigma=sigma, mode=mode)
        noise.append(eps)
    return torch.cat(noise)


def save_columns(columns, path, title, labels=None):
    """A grid of uint8 images (C, R, S, S, 3): column c holds image c's R versions, one per row
    (originals above their reconstructions, ...)."""
    rows = np.swapaxes(columns, 0, 1)
    tiles = torch.from_numpy(rows.reshape(-1, *rows.shape[2:]))
    tiles = tiles.permute(0, 3, 1, 2) / 255
    common.save_grid(tiles, path, nrow=len(columns), labels=labels, title=title)


# ---- Command line
def parse_classes(text, num_classes):
    """--classes: 'even', 'random' or a comma list of class indices (checked against the flow).
    An unconditional flow takes only the default, 'even' (it has no labels)."""
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


def floats(text, flag):
    """A comma list of finite numbers >= 0, or a one-line error naming the flag."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and v >= 0 for v in values):
        raise UserError(f"{flag}: expected finite numbers >= 0, got {text!r}")
    return values


def guidance_settings(ws, blocks, gammas, rules, w_flag):
    """The settings of Stage1.generate (its keyword arguments guidance, guide_blocks, score_step
    and rule) that comma lists of w (named by w_flag), of --guide-blocks, --score-step and
    --guidance-rule give, every combination."""
    guide_blocks = blocks.split(",")
    if not set(guide_blocks) <= set(GUIDE_BLOCKS):
        raise UserError(f"--guide-blocks: {' or '.join(GUIDE_BLOCKS)}, not {blocks!r}")
    rule_names = rules.split(",")
    if not set(rule_names) <= set(GUIDANCE_RULES):
        raise UserError(f"--guidance-rule: {' or '.join(GUIDANCE_RULES)} "
                        f"(tarflow.GUIDANCE_RULES), not {rules!r}")
    ws = floats(ws, w_flag)
    gammas = floats(gammas, "--score-step")
    return [dict(guidance=w, guide_blocks=b, score_step=g, rule=r)
            for w in ws for b in guide_blocks for g in gammas for r in rule_names]


def guidance_setting(args):
    """The one setting of --cfg, --guide-blocks, --score-step and --guidance-rule (invert.py's
    too)."""
    settings = guidance_settings(str(args.cfg), args.guide_blocks, args.score_step,
                                 args.guidance_rule, w_flag="guidance scale --cfg")
    if len(settings) > 1:
        raise UserError("several --guide-blocks, --score-step or --guidance-rule need "
                        "evaluate.py --cfg-sweep")
    return settings[0]


def check_positive(args, flags):
    """One-line errors for integer flags given below 1."""
    for flag in flags:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and value < 1:
            raise UserError(f"{flag}: expected a positive integer, got {value}")


def check_args(args):
    """One-line errors for flags wrong before any model loads; the Stage1.generate setting."""
    check_positive(args, ("--num-samples", "--batch-size"))
    setting = guidance_setting(args)
    if args.ckpt is None:
        raise UserError("--ckpt: a train_flow.py checkpoint is needed")
    if args.out is None:
        raise UserError("--out: the output folder is needed")
    if args.class_names and not os.path.isfile(args.class_names):
        raise UserError(f"--class-names {args.class_names}: no such file")
    return setting


def add_model_arguments(p):
    """The flags of sample.py, invert.py and evaluate.py: checkpoints, output, ranks, batches."""
    p.add_argument("--ckpt", help="train_flow.py checkpoint")
    p.add_argument("--stage1", help="stage 1; None: --ckpt's")
    p.add_argument("--encoder", help="DINOv2 weights, if moved")
    p.add_argument("--decoder", help="RAE decoder, if moved")
    p.add_argument("--out", help="output folder")
    p.add_argument("--no-ema", action="store_true", help="raw weights, not EMA")
    p.add_argument("--seed", type=int, default=0, help="image i's noise: (seed, i)")
    p.add_argument("--batch-size", type=int, help="PER RANK; None: 256 on GPU, 32 on CPU")
    p.add_argument("--device", help="cpu or cuda; None: cuda if any")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_sampling_arguments(p):
    """The flags of sample.py and evaluate.py's --cfg-sweep: how many samples, which labels."""
    p.add_argument("--num-samples", type=int, default=50_000, help="the paper: 50k")
    p.add_argument("--classes", default="even", help="even, random or a list: 1,7")
    p.add_argument("--no-png", action="store_true", help="no images/ folder")
    p.add_argument("--class-names", help="a name per line, for grid.png")
    p.add_argument("--grid-rows", type=int, default=8, help="classes in grid.png")
    p.add_argument("--grid-cols", type=int, default=8, help="samples per class")


def build_parser():
    """The flags; the README's commands and the tests use their names and defaults."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_arguments(p)
    add_sampling_arguments(p)
    p.add_argument("--cfg", type=float, default=0.0, help="guidance scale w")
    p.add_argument("--guide-blocks", default="all",
                   help="all: every block; deep: the deep one only (STARFlow's guide_top)")
    p.add_argument("--score-step", default="0", help="SimFlow's score step (0: off)")
    p.add_argument("--guidance-rule", default="starflow",
                   help=f"tarflow.GUIDANCE_RULES: {', '.join(GUIDANCE_RULES)}")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp64"],
                   help="None: bf16 autocast on CUDA, else fp32")
    return p


if __name__ == "__main__":
    common.run_cli(main, build_parser().parse_args())
