"""What train_src.py, train_flow.py and sample.py share, in this order: data (ADM's centre crop, ImageFolder,
the resumable distributed EpochSampler); per-example randomness, drawn for the whole global batch so that N
processes compute what one does (encoder_noise: the noise of eq. 7 / 8); DDP helpers and channel statistics;
training helpers (EMA, the LR schedule, RNG state, atomic files, TrainLog, grids, one-line errors); and the
trained stages: Stage1 (eq. 5, 8, 10), load_stage1, load_flow. Images travel as uint8 (B, 3, S, S) from the
loader and become floats in [0, 1] on the device.
"""

import json
import math
import os
import random
import re
import sys
import time
import traceback

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from rae import RAE, RAEDecoder, fingerprint, load_dinov2, load_rae_decoder
from src import COMPRESSORS
from tarflow import TARFlow

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class UserError(ValueError):
    """Bad input from the command line or a file: printed as one line by run_cli."""


# -----------------------------------------------------------------------------
# Data

def center_crop_arr(pil_image, image_size):
    """ADM's centre crop: halve with a box filter while the short side is >= 2x the target,
    resize bicubically so the short side equals image_size, then crop the centre square."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top:top + image_size, left:left + image_size])


class ImageFolder(torch.utils.data.Dataset):
    """root/<class>/**/<image>: labels are the sorted class-folder indices (torchvision's order);
    with flat=True a folder of images without class folders is read too (every label 0).

    Returns (uint8 tensor (3, S, S) after the ADM centre crop, label). Flips are not done here:
    they are drawn per global example in the training step (see global_rand), so they do not
    depend on the number of ranks or loader workers. `exclude` removes known-bad files.
    """

    def __init__(self, root, image_size, exclude=(), flat=False):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{root}: no such folder; expected "
                                    f"{'a folder of images' if flat else 'an ImageFolder (one subfolder per class)'}")
        self.root, self.image_size = root, image_size
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not self.classes and not flat:
            raise UserError(f"{root}: no class subfolders; expected root/<class>/<image> (ImageFolder layout)")
        exclude = set(exclude)
        self.samples = []
        for label, folder in enumerate([os.path.join(root, c) for c in self.classes] or [root]):
            for dirpath, dirnames, files in os.walk(folder, followlinks=True):
                dirnames.sort()
                for f in sorted(files):
                    path = os.path.join(dirpath, f)
                    if f.lower().endswith(IMAGE_EXTENSIONS) and path not in exclude:
                        self.samples.append((path, label))
        if not self.samples:
            raise UserError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in it or its class folders")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                im = center_crop_arr(im.convert("RGB"), self.image_size)
        except Exception as e:  # PIL raises many types; name the file and the cause in one line
            raise UserError(f"{path}: unreadable image ({type(e).__name__}: {e}); "
                            f"remove it or pass --skip-bad-images") from None
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1), label


def _decodes(paths):
    """Whether each image decodes (a list of bools): training_set's collate_fn, so it runs in the loader workers."""
    flags = []
    for path in paths:
        try:
            with Image.open(path) as im:
                im.convert("RGB")
            flags.append(True)
        except Exception:
            flags.append(False)
    return flags


def training_set(args, image_size, rank=0, world=1):
    """The ImageFolder of --data; with --skip-bad-images every image is decoded first (rank shard x loader
    workers) and the unreadable ones are left out, listed on stderr by rank 0."""
    dataset = ImageFolder(args.data, image_size)
    if not args.skip_bad_images:
        return dataset
    paths = [p for p, _ in dataset.samples]
    mine = list(range(rank, len(paths), world))
    loader = torch.utils.data.DataLoader([paths[i] for i in mine], batch_size=64, num_workers=args.num_workers,
                                         collate_fn=_decodes)
    bad = [paths[i] for i, good in zip(mine, [flag for batch in loader for flag in batch]) if not good]
    bad = sorted(sum(all_gather(bad), []))
    if bad and rank == 0:
        print(f"skipping {len(bad)} unreadable images: {', '.join(bad[:5])}{' ...' * (len(bad) > 5)}", file=sys.stderr)
    return ImageFolder(args.data, image_size, exclude=bad) if bad else dataset


class EpochSampler(torch.utils.data.Sampler):
    """The distributed sampler: one permutation per epoch from (seed, epoch), cut to whole global
    batches; rank r takes positions r, r+W, r+2W, ... so the union of the ranks' k-th local
    batches is exactly the k-th global batch of a single process. set_epoch(epoch, start_step)
    starts mid-epoch after a resume without reading the skipped images."""

    def __init__(self, n, global_batch, rank=0, world=1, seed=0):
        if global_batch % world:
            raise UserError(f"--batch-size {global_batch} is not divisible by the {world} processes")
        if n < global_batch:
            raise UserError(f"the dataset has {n} images, fewer than one global batch of {global_batch}")
        self.n, self.global_batch, self.rank, self.world = n, global_batch, rank, world
        self.seed = seed
        self.steps_per_epoch = n // global_batch
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self):
        g = torch.Generator().manual_seed(seed_of(self.seed, 0xDA7A, self.epoch))  # 0xDA7A: the data-order stream
        order = torch.randperm(self.n, generator=g)
        order = order[self.start_step * self.global_batch:self.steps_per_epoch * self.global_batch]
        return iter(order[self.rank::self.world].tolist())

    def __len__(self):
        return (self.steps_per_epoch - self.start_step) * (self.global_batch // self.world)


def make_loader(dataset, sampler, num_workers):
    """A DataLoader of local batches (global batch / world) in the sampler's order."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=sampler.global_batch // sampler.world, sampler=sampler, drop_last=True,
        num_workers=num_workers, pin_memory=torch.cuda.is_available(), persistent_workers=False)


def to_unit(images_uint8, device, flip=None):
    """uint8 (B,3,S,S) -> float [0,1] on device; `flip` (B,) bool mirrors those images left-right."""
    x = images_uint8.to(device, non_blocking=True).float().div_(255)
    if flip is not None:
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    return x


# -----------------------------------------------------------------------------
# Per-example randomness, independent of the number of ranks

def seed_of(*keys):
    """A well-mixed 63-bit generator seed for a tuple of integers (global seed, step or index, stream...)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 1)


def step_generator(seed, step, stream, device):
    """A generator on `device` seeded by (seed, step, stream): the same numbers on every rank."""
    return torch.Generator(device=device).manual_seed(seed_of(seed, step, stream))


def global_rand(gen, global_batch, shape, rank, world, device, normal=False):
    """U[0, 1) (normal=True: N(0, 1)) of shape (global_batch, *shape), drawn on every rank; returns this rank's rows
    (r, r+W, ...), i.e. the examples EpochSampler gave it."""
    draw = torch.randn if normal else torch.rand
    return draw((global_batch, *shape), generator=gen, device=device)[rank::world]


def encoder_noise(gen, global_batch, shape, rank, world, device, sigma, per_example):
    """eps of eq. 7 / 8, the noise added to the raw encoder output E(x), for this rank's rows:
    sigma * N(0, I) with a constant sigma (the flow's sigma_flow, eq. 8), or with sigma_i ~ U(0, sigma)
    drawn per example first (RAE's per-example noise, eq. 7). The one place this noise is drawn."""
    scale = torch.full((global_batch,), float(sigma), device=device)[rank::world]
    if per_example:
        scale = global_rand(gen, global_batch, (), rank, world, device) * sigma
    eps = global_rand(gen, global_batch, shape, rank, world, device, normal=True)
    return scale.view(-1, *[1] * len(shape)) * eps


# -----------------------------------------------------------------------------
# Distributed set-up

def setup_ddp(device=None):
    """(rank, world, device). Under torchrun: one process per GPU (nccl) or per CPU slot (gloo);
    without torchrun a single process. `device` ('cpu', 'cuda') overrides the automatic choice."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    dev = torch.device("cuda", local_rank % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return rank, world, dev


def cleanup_ddp():
    """The end of a successful run: wait for every rank, then leave the process group. Never call it on an error
    path (a `finally`): a rank that failed must exit at once, so that torchrun stops the others instead of
    leaving them waiting in a barrier."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_(tensor, op="mean"):
    """In-place 'sum', 'mean' or 'max' over ranks (a no-op for one process); returns the tensor."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            tensor /= dist.get_world_size()
    return tensor


def all_gather(obj):
    """Every rank's `obj` (any picklable object), in rank order."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def channel_stats(batches, fn, device, covariance=False):
    """Channel mean (C,) and population variance (C,) of fn(batch) (B, N, C) over all tokens of all batches of
    all ranks, accumulated in float64 (eq. 1 and eq. 5); covariance=True: the (C, C) covariance instead (PCA)."""
    acc = None
    for batch in batches:
        t = fn(batch).double()
        t = t.reshape(-1, t.shape[-1])
        part = torch.cat([torch.full_like(t[:1], t.shape[0]), t.sum(0, keepdim=True),
                          t.T @ t if covariance else t.pow(2).sum(0, keepdim=True)])
        acc = part if acc is None else acc + part
    if acc is None:
        raise UserError("channel statistics: no data on this rank (dataset smaller than the number of processes?)")
    all_reduce_(acc, op="sum")
    mean, second = acc[1] / acc[0, 0], acc[2:] / acc[0, 0]
    if covariance:
        return mean, second - torch.outer(mean, mean)
    return mean.float(), (second[0] - mean.pow(2)).clamp_min(0).float()


# -----------------------------------------------------------------------------
# Training utilities

@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers are copied."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def lr_schedule(step, warmup, decay_start, total, base, final):
    """Linear warm-up from 0 ((step + 1) / warmup), constant `base` until `decay_start`, then cosine to `final` at
    `total`. Stage 1 (RAE's) decays right after its warm-up (decay_start = warmup); the flow has no warm-up."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = min(max(step - decay_start, 0) / max(total - decay_start, 1), 1.0)
    return base - (base - final) * 0.5 * (1.0 - math.cos(math.pi * t))


def capture_rng():
    """Every generator a training step could touch (torch CPU and CUDA, numpy, python)."""
    return dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def restore_rng(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_write(path, write, mode="wb"):
    """write(f) into path + '.tmp', then rename: a killed run never leaves a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", mode) as f:
        write(f)
    os.replace(path + ".tmp", path)


def save_checkpoint(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def save_json(obj, path):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2) + "\n"), mode="w")


def load_checkpoint(path, stage):
    """A checkpoint written by train_src.py (stage 'src') or train_flow.py (stage 'flow')."""
    if not os.path.isfile(path):
        script = dict(src="train_src.py", flow="train_flow.py")[stage]
        raise FileNotFoundError(f"{path}: no such file; expected a {stage} checkpoint ({script} --out DIR writes "
                                f"DIR/checkpoint.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"{path}: not a readable torch checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("stage") != stage:
        found = ckpt.get("stage") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"{path}: expected a stage '{stage}' checkpoint, found {found!r}")
    return ckpt


def resume_checkpoint(args, ckpt_path, stage, kept):
    """The checkpoint a --resume run continues (None without --resume), refused when one of the `kept`
    arguments differs from the run being resumed; without --resume an existing checkpoint is refused."""
    if not args.resume:
        if os.path.exists(ckpt_path):
            raise UserError(f"{ckpt_path} exists; pass --resume to continue it or choose another --out")
        return None
    ckpt = load_checkpoint(ckpt_path, stage)
    changed = {k: (ckpt["args"].get(k), getattr(args, k)) for k in kept if ckpt["args"].get(k) != getattr(args, k)}
    if changed:
        raise UserError(f"--resume {ckpt_path}: these arguments differ from the run being resumed (was, now): "
                        f"{changed}")
    return ckpt


class TrainLog:
    """The loop bookkeeping of both training scripts: the progress bar; per step, add(step, loss=..., ...)
    sums the metrics on the device (no host sync) and remembers the first step whose loss was not finite;
    at log steps write(...) syncs once, averages over steps and ranks and appends a record to log.jsonl
    (rank 0), or returns None after a one-line error when the loss became non-finite on any rank; save(...)
    writes the checkpoint (rank 0) and remembers it as the last good one."""

    def __init__(self, keys, out, step, total, batch_size, device, master, resumed, derive=None, show=("loss",)):
        self.keys, self.out, self.batch_size, self.master, self.show = list(keys), out, batch_size, master, show
        self.derive = derive  # record -> dict of derived values (e.g. bits/dim from the loss)
        self.sums = torch.zeros(len(self.keys) + 1, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.t, self.step, self.last_good = time.time(), step, step if resumed else None
        self.bar = tqdm(total=total, initial=step, disable=not master or total <= step, dynamic_ncols=True,
                        desc=os.path.basename(os.path.normpath(out)))

    def add(self, step, **values):
        """Metrics of step `step` (0-dim tensors; missing keys count 0); the first one is the loss."""
        loss = values[self.keys[0]].detach()
        bad = ~torch.isfinite(loss) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, step + 1), self.first_bad)
        zero = torch.zeros((), device=self.sums.device)
        self.sums += torch.stack([values.get(k, zero).detach().float() for k in self.keys] + [zero + 1])
        self.bar.update(1)

    def write(self, step, **extra):
        """Average the sums over steps and ranks, append a log.jsonl record, reset; returns the record."""
        bad = int(all_reduce_(self.first_bad.clone(), op="max"))
        if bad >= 0:
            self.bar.close()
            where = f"last good checkpoint {self.out}/checkpoint.pt (step {self.last_good})" \
                if self.last_good is not None else "no checkpoint was written"
            print(f"error: loss became non-finite (nan/inf) at step {bad} (epoch {extra.get('epoch')}); stopping; "
                  f"{where}", file=sys.stderr)
            return None
        sums = all_reduce_(self.sums.clone())
        dt, steps = time.time() - self.t, step - self.step
        record = dict(step=step, **extra, **dict(zip(self.keys, (sums[:-1] / sums[-1]).tolist())),
                      steps_per_s=steps / dt, images_per_s=steps * self.batch_size / dt)
        record.update(self.derive(record) if self.derive else {})
        if self.master:
            with open(os.path.join(self.out, "log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
        self.bar.set_postfix({k: f"{record[k]:.4g}" for k in self.show})
        self.sums.zero_()
        self.t, self.step = time.time(), step
        return record

    def save(self, step, state):
        """state() builds the checkpoint; only rank 0 builds and writes it."""
        if self.master:
            save_checkpoint(state(), os.path.join(self.out, "checkpoint.pt"))
        self.last_good = step


def save_grid(images, path, nrow=8, labels=None, title=None, min_tile=64):
    """Images (B,3,H,W) in [0,1] (clamped) -> one PNG grid, written atomically. Small tiles are enlarged
    (nearest) to `min_tile` pixels; `labels` (one string per image, or None) are printed in each tile's
    corner and `title` above the grid."""
    images = images.detach().float().clamp(0, 1).cpu()
    b, _, h, w = images.shape
    scale = max(1, math.ceil(min_tile / max(h, w)))
    images = images.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    h, w, nrow, top = h * scale, w * scale, min(nrow, b), 16 if title else 0
    grid = torch.ones(3, top + math.ceil(b / nrow) * (h + 2) + 2, nrow * (w + 2) + 2)
    for i in range(b):
        r, c = divmod(i, nrow)
        grid[:, top + 2 + r * (h + 2):top + 2 + r * (h + 2) + h, 2 + c * (w + 2):2 + c * (w + 2) + w] = images[i]
    im = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))
    draw, font = ImageDraw.Draw(im), ImageFont.load_default()
    if title:
        draw.text((4, 2), title, fill=(0, 0, 0), font=font)
    for i, text in enumerate(labels or []):
        r, c = divmod(i, nrow)
        if text:
            xy = (4 + c * (w + 2), top + 3 + r * (h + 2))
            draw.text(xy, str(text), fill=(255, 255, 255), font=font, stroke_width=1, stroke_fill=(0, 0, 0))
    atomic_write(path, lambda f: im.save(f, format="PNG"))


def add_run_arguments(p):
    """The run-control flags both training scripts share (data loading, seeding, resuming, logging)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = min(8, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))  # no more than this machine has
    p.add_argument("--num-workers", type=int, default=workers, help="data-loader processes per rank")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, data order and per-example noise")
    p.add_argument("--resume", action="store_true", help="continue OUT/checkpoint.pt exactly")
    p.add_argument("--max-steps", type=int, default=0,
                   help="stop (with a checkpoint) at this global step; the schedule still follows --epochs (0: off)")
    p.add_argument("--log-every", type=int, default=100, help="steps between log.jsonl records")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="check every image first and leave out unreadable ones (listed on stderr)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def run_cli(main, args):
    """Run main(args); a user error (bad file, argument, data) is one line on stderr, exit 2.

    Under torchrun a failing rank leaves at once, without waiting for the others (os._exit: no barrier, no
    join of the process group's threads), and torchrun then stops the whole job within a second. A rank that
    only lost its peer (gloo's "Connection closed by peer") says so in one line instead of a traceback: the
    cause is the other rank's error above it. Other exceptions keep their traceback."""
    rank = int(os.environ.get("RANK", 0))
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    try:
        return main(args)
    except (UserError, ValueError, FileNotFoundError) as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        line = lines[-1]
        if len(lines) > 1:  # raised in a DataLoader worker: the message is its traceback; keep the cause
            line = re.sub(r"^[\w.]*(Error|Exception): ", "", line)
        newline = "\n" if rank > 0 else ""  # not glued to rank 0's progress bar on the shared terminal
        tqdm.write(f"{newline}error: {line}", file=sys.stderr)  # on its own line even under a progress bar
        code = 2
    except Exception as e:
        if not distributed:
            raise
        if "closed by peer" in str(e):  # gloo, once the other rank has exited
            tqdm.write(f"error: rank {rank} lost another rank, which failed (see its error)", file=sys.stderr)
        else:
            traceback.print_exc()
        code = 1
    if distributed:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


# -----------------------------------------------------------------------------
# The frozen stage 1 and the trained stages (used by train_src.py, train_flow.py and sample.py)

class Stage1(nn.Module):
    """The compact pipeline of a stage-1 run, written once: E, the RAE statistics (eq. 1), a
    compressor C and the compact statistics norm2 (eq. 5).

        compact(z_raw) = norm2(C_enc(norm(z_raw)))                      (eq. 5)
        encode(x, eps) = compact(E(x) + eps)                            (eq. 8; eps from encoder_noise)
        decode(z_c)    = D(denorm(C_dec(denorm2(z_c))))  in [0, 1]      (eq. 10; not clamped)

    With norm2 at its defaults (mean 0, std 1), forward(z_raw) = decode(compact(z_raw)) is the
    reconstruction path of eq. 7 that train_src.py trains.
    """

    def __init__(self, rae, compressor, mean2=None, std2=None):
        super().__init__()
        self.rae, self.C = rae, compressor
        d = compressor.d
        self.register_buffer("mean2", torch.zeros(d) if mean2 is None else torch.as_tensor(mean2).float())
        self.register_buffer("std2", torch.ones(d) if std2 is None else torch.as_tensor(std2).float())

    def compact(self, z_raw):
        return (self.C.encode(self.rae.normalize(z_raw)) - self.mean2) / self.std2

    def encode(self, images, noise=None):
        """Images in [0, 1] (B, 3, S, S) -> z_c (B, N, d); `noise` (B, N, n) is added to E(x)."""
        z_raw = self.rae.encode_raw(images)
        return self.compact(z_raw if noise is None else z_raw + noise.to(z_raw.dtype))

    def decode(self, zc):
        return self.rae.decode(self.C.decode((zc * self.std2 + self.mean2).to(zc.dtype)))

    def forward(self, z_raw):
        return self.decode(self.compact(z_raw))


def _recorded_part(ckpt_path, what, flag, path, load, record):
    """E or a released D of a stage-1 checkpoint: load(path), refused unless its config() and the fingerprint of
    its weights are the recorded ones (checkpoints written before fingerprints were recorded: config only)."""
    if not path or not os.path.exists(path):
        raise FileNotFoundError(f"{path}: the {what} named by {ckpt_path} is missing; pass {flag} PATH where it "
                                f"now lives")
    model = load(path)
    if model.config() != record["config"]:
        raise UserError(f"{path}: {what} {model.config()} differs from the one {ckpt_path} was trained with "
                        f"({record['config']})")
    recorded = record.get("fingerprint")
    if recorded is not None and fingerprint(model) != recorded:
        raise UserError(f"{path}: {what} weights (fingerprint {fingerprint(model)}) are not the ones {ckpt_path} was "
                        f"trained with ({recorded}); pass {flag} with the file stage 1 used")
    return model


def load_stage1(path, device="cpu", ema=True, encoder=None, decoder=None):
    """The frozen Stage1 of a train_src.py checkpoint (EMA weights by default), eval mode, no gradients.

    The checkpoint records what it was built from, and the same is rebuilt here or refused:
    encoder = {kind, path, config, fingerprint}, decoder = {path, config, fingerprint, state, state_ema} (states when
    train_src.py trained D), compressor = {kind, config, state, state_ema}, rae_stats and norm2
    ({mean, var}). The encoder and a released decoder are read from their files, which may have
    moved: `encoder` / `decoder` give their new paths (the scripts' --encoder / --decoder).
    """
    ckpt = load_checkpoint(path, "src")
    if "compressor" not in ckpt:
        raise UserError(f"{path}: stage-1 checkpoint of an older layout (no 'compressor' record); rerun train_src.py")
    if ckpt.get("norm2") is None:
        raise UserError(f"{path}: stage-1 run has no compact statistics norm2 yet (train_src.py writes them when "
                        f"it stops); resume it with --resume --max-steps N to write them")
    enc, dec, comp = ckpt["encoder"], ckpt["decoder"], ckpt["compressor"]
    E = _recorded_part(path, "DINOv2 encoder", "--encoder", encoder or enc["path"], load_dinov2, enc)
    if dec["state"] is not None:
        D = RAEDecoder(**dec["config"])
        D.load_state_dict(dec["state_ema" if ema else "state"])
    else:
        D = _recorded_part(path, "RAE decoder", "--decoder", decoder or dec["path"],
                           lambda p: load_rae_decoder(p, num_heads=dec["config"].get("num_heads")), dec)
    rae = RAE(E, D, image_size=ckpt["image_size"])
    rae.set_stats(ckpt["rae_stats"]["mean"], ckpt["rae_stats"]["var"])
    if comp["kind"] not in COMPRESSORS:
        raise UserError(f"{path}: compressor kind {comp['kind']!r} is not in src.COMPRESSORS "
                        f"({', '.join(COMPRESSORS)}); a fork's compressor must be added there")
    C = COMPRESSORS[comp["kind"]](**comp["config"])
    C.load_state_dict(comp["state_ema" if ema else "state"])
    norm2 = ckpt["norm2"]
    stage1 = Stage1(rae, C, norm2["mean"], norm2["var"].float().clamp_min(1e-12).sqrt())
    stage1.image_size, stage1.num_classes = int(ckpt["image_size"]), ckpt.get("num_classes")
    return stage1.to(device).eval().requires_grad_(False)


def load_flow(path, device="cpu", ema=True):
    """(flow, ckpt) of a train_flow.py checkpoint: the flow rebuilt from its stored kind and config()
    (EMA weights by default), eval mode; ckpt is the checkpoint without its weight and optimizer states."""
    ckpt = load_checkpoint(path, "flow")
    if ckpt.get("flow_kind") != TARFlow.__name__:
        raise UserError(f"{path}: flow kind {ckpt.get('flow_kind')!r}; this code builds {TARFlow.__name__}")
    flow = TARFlow(**ckpt["flow_config"])
    flow.load_state_dict(ckpt["flow_ema" if ema else "flow"])
    for k in ("flow", "flow_ema", "optimizer", "rng"):
        ckpt.pop(k, None)
    return flow.to(device).eval().requires_grad_(False), ckpt
