"""What the scripts (train_src.py, train_flow.py, sample.py, invert.py, evaluate.py, fid.py)
share; no model lives here.

In reading order: data (ADM's centre crop, RAE's random crop, ImageFolder: the one reader of
image folders, training's and fid.py's; the resumable distributed sampler); per-example
randomness, drawn for the whole global batch so that N processes compute what one does
(encoder_noise: the noise of eq. 7 and 8); the torchrun set-up and collectives; training
helpers (EMA, the LR schedule, RNG state, atomic files, checkpoints, TrainLog, grids); the
command-line helpers (one-line errors). Images travel as uint8 (B, 3, S, S) from the loader and
become floats in [0, 1] on the device.
"""

import datetime
import errno
import json
import math
import os
import random
import re
import shutil
import sys
import time
import traceback

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

# the image files a folder is read for (pytorch-fid's nine, also fid.py's)
IMAGE_EXTENSIONS = (".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
# RAE's stage-1 crop: the short side to 1.5 x the image size (384 for 256), then a random square
RAE_RESIZE = 1.5

# Random streams: with the global seed (and a step or image index) each seeds its own generator.
# a training step's flips, eq. 7/8 noise, label drops and augmentation
STREAM_STEP = 0
STREAM_NLL = 1              # invert.py --nll: eq. 8's noise per image and draw
STREAM_RECON = 2            # evaluate.py --reconstruct --recon-noise
STREAM_CROP = 3             # train_src.py --crop random: image i's crop in epoch e
STREAM_DATA_ORDER = 0xDA7A  # EpochSampler: the permutation of each epoch
STREAM_CLASSES = 0x5EED     # sample.py --classes random


class UserError(ValueError):
    """Bad input from the command line or a file: printed as one line by run_cli."""


# ---- Data
def center_crop_arr(pil_image, image_size):
    """ADM's centre crop: halve with a box filter while the short side is >= 2x the target,
    resize bicubically so that the short side is image_size, then crop the centre square."""
    while min(*pil_image.size) >= 2 * image_size:
        half = tuple(s // 2 for s in pil_image.size)
        pil_image = pil_image.resize(half, resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    size = tuple(round(s * scale) for s in pil_image.size)
    pil_image = pil_image.resize(size, resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top:top + image_size, left:left + image_size])


def random_crop(pil_image, image_size, seed):
    """RAE's stage-1 crop (src/train_stage1.py): torchvision's Resize(1.5 x image_size), the short
    side resized bicubically, then RandomCrop(image_size): top, then left, each uniform over
    the valid offsets, drawn from seed. No flip."""
    w, h = pil_image.size
    short = int(image_size * RAE_RESIZE)
    long = int(short * max(w, h) / min(w, h))
    size = (short, long) if w <= h else (long, short)  # (width, height)
    pil_image = pil_image.resize(size, resample=Image.BICUBIC)
    gen = torch.Generator().manual_seed(seed)
    top = int(torch.randint(size[1] - image_size + 1, (), generator=gen))
    left = int(torch.randint(size[0] - image_size + 1, (), generator=gen))
    return pil_image.crop((left, top, left + image_size, top + image_size))


class ImageFolder(torch.utils.data.Dataset):
    """root/<class>/**/<image> as (uint8 (3, S, S), label), labelled by the sorted class folders
    (torchvision's order); flat=True: a folder without class folders is one class, label 0;
    labels=False: every image under root, label 0 (fid.py's REF and GEN). An item is ADM's
    centre crop to image_size (None: the image as stored, sizes may differ); with
    crop="random", an item asked for by (index, epoch), EpochSampler's key, is RAE's random crop
    seeded by (seed, STREAM_CROP, epoch, index): the same in any rank or loader worker. Flips are
    drawn in the training step. `exclude` leaves out known-bad files; an unreadable image is a
    one-line UserError naming it, `hint` appended (training_set: --skip-bad-images).
    """

    def __init__(self, root, image_size, exclude=(), flat=False, crop="center", seed=0,
                 labels=True, hint=""):
        if not os.path.isdir(root):
            layout = "an ImageFolder (one subfolder per class)"
            if flat or not labels:
                layout = "a folder of images"
            raise FileNotFoundError(f"{root}: no such folder; expected {layout}")
        self.root = root
        self.image_size = image_size
        self.crop = crop
        self.seed = seed
        self.hint = hint
        self.classes = []
        if labels:
            self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if labels and not self.classes and not flat:
            raise UserError(f"{root}: no class subfolders; expected root/<class>/<image>")
        folders = [os.path.join(root, c) for c in self.classes] or [root]
        self.samples = []
        for label, folder in enumerate(folders):
            for path in image_files(folder):
                if path not in exclude:
                    self.samples.append((path, label))
        if not self.samples:
            raise UserError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        """key: an index, or EpochSampler's (index, epoch) (the random crop needs the epoch)."""
        i, epoch = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if self.crop == "random" and epoch is not None:
                    seed = seed_of(self.seed, STREAM_CROP, epoch, i)
                    im = random_crop(im, self.image_size, seed)
                elif self.image_size:
                    im = center_crop_arr(im, self.image_size)
        # PIL raises many types: name the file and the cause in one line
        except Exception as e:
            cause = f"{type(e).__name__}: {' '.join(str(e).split())}"
            hint = f"; {self.hint}" if self.hint else ""
            raise UserError(f"{path}: unreadable image ({cause}){hint}") from None
        image = torch.from_numpy(np.asarray(im).copy())
        image = image.permute(2, 0, 1)  # (3, S, S) uint8
        return image, label


def image_files(folder):
    """The image files under folder, recursively (links followed), in ADM's order (its
    `_list_image_files_recursively`, guided-diffusion's image_datasets.py): each folder's entries
    sorted by name, a subfolder's images in the place of its name among the files."""
    paths = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_dir():
            paths += image_files(entry.path)
        elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
            paths.append(entry.path)
    return paths


def decodes(paths):
    """Whether each image decodes: training_set's collate_fn, so it runs in the loader workers."""
    flags = []
    for path in paths:
        try:
            with Image.open(path) as im:
                im.convert("RGB")
            flags.append(True)
        except Exception:
            flags.append(False)
    return flags


def training_set(args, image_size, rank=0, world=1, crop="center", seed=0):
    """The ImageFolder of --data (crop, seed: see ImageFolder). With --skip-bad-images every
    image is decoded first (split over ranks and loader workers) and the unreadable ones are
    left out, listed by rank 0."""
    hint = "remove it or pass --skip-bad-images"
    dataset = ImageFolder(args.data, image_size, crop=crop, seed=seed, hint=hint)
    if not args.skip_bad_images:
        return dataset
    paths = [p for p, _ in dataset.samples]
    mine = list(range(rank, len(paths), world))
    loader = torch.utils.data.DataLoader(
        [paths[i] for i in mine],
        batch_size=64,
        num_workers=args.num_workers,
        collate_fn=decodes,
    )
    good = [flag for batch in loader for flag in batch]
    bad = [paths[i] for i, ok in zip(mine, good) if not ok]
    bad = sorted(sum(all_gather(bad), []))
    if not bad:
        return dataset
    if rank == 0:
        more = " ..." if len(bad) > 5 else ""
        listed = ", ".join(bad[:5]) + more
        print(f"skipping {len(bad)} unreadable images: {listed}", file=sys.stderr)
    return ImageFolder(args.data, image_size, exclude=set(bad), crop=crop, seed=seed, hint=hint)


class EpochSampler(torch.utils.data.Sampler):
    """The distributed sampler: one permutation per epoch from (seed, epoch), cut to whole global
    batches. Rank r takes positions r, r + W, r + 2W, ..., so the ranks' k-th local batches
    together are exactly one process's k-th global batch. set_epoch(epoch, start_step) starts
    mid-epoch after a resume without reading the skipped images. It yields keys (index, epoch):
    the epoch reaches the dataset with each item, also in persistent loader workers."""

    def __init__(self, n, global_batch, rank=0, world=1, seed=0):
        if global_batch % world:
            raise UserError(f"--batch-size {global_batch} is not divisible by {world} processes")
        if n < global_batch:
            raise UserError(f"the dataset has {n} images, fewer than a batch of {global_batch}")
        self.n = n
        self.global_batch = global_batch
        self.rank = rank
        self.world = world
        self.seed = seed
        self.steps_per_epoch = n // global_batch
        self.epoch = 0
        self.start_step = 0

    def set_epoch(self, epoch, start_step=0):
        self.epoch = epoch
        self.start_step = start_step

    def __iter__(self):
        seed = seed_of(self.seed, STREAM_DATA_ORDER, self.epoch)
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed))
        start = self.start_step * self.global_batch
        end = self.steps_per_epoch * self.global_batch
        mine = order[start:end][self.rank::self.world].tolist()
        return iter([(i, self.epoch) for i in mine])

    def __len__(self):
        local_batch = self.global_batch // self.world
        return (self.steps_per_epoch - self.start_step) * local_batch


def make_loader(dataset, sampler, num_workers):
    """A DataLoader of local batches (global batch / world) in the sampler's order."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=sampler.global_batch // sampler.world,
        sampler=sampler,
        drop_last=True,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,  # not forked again every epoch
    )


def to_unit(images_uint8, device, flip=None):
    """uint8 (B, 3, S, S) -> float [0, 1] on device; flip (B,) bool mirrors those images."""
    x = images_uint8.to(device, non_blocking=True).float().div_(255)
    if flip is not None:
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    return x


# ---- Per-example randomness, independent of the number of ranks
def seed_of(*keys):
    """A well-mixed 63-bit seed for a tuple of integers (global seed, step or index, stream)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)
    return int(state[0] >> 1)


def step_generator(seed, step, stream, device):
    """A generator on device seeded by (seed, step, stream): the same numbers on every rank."""
    return torch.Generator(device=device).manual_seed(seed_of(seed, step, stream))


def global_rand(gen, global_batch, shape, rank, world, device, normal=False):
    """U[0, 1) (normal=True: N(0, 1)) of shape (global_batch, *shape), drawn on every rank;
    returns this rank's rows r, r + W, ...: the examples EpochSampler gave it."""
    draw = torch.randn if normal else torch.rand
    values = draw((global_batch, *shape), generator=gen, device=device)
    return values[rank::world]


def constant_scale(gen, global_batch, rank, world, device, sigma):
    """Eq. 8: the same sigma for every example (nothing drawn)."""
    return torch.full((global_batch,), float(sigma), device=device)[rank::world]


def uniform_scale(gen, global_batch, rank, world, device, sigma):
    """Eq. 7: sigma_i ~ U(0, sigma) per example (RAE's noise augmentation)."""
    return global_rand(gen, global_batch, (), rank, world, device) * sigma


# The noise modes: name -> this rank's per-example scale of eps. The one list: train_flow.py's
# --noise-mode choices, the mode a checkpoint records, and the modes invert.py's NLL accepts
# (a fork adds its distribution here).
NOISE_MODES = {"constant": constant_scale, "per-example": uniform_scale}


def encoder_noise(gen, global_batch, shape, rank, world, device, sigma, mode):
    """eps of eq. 7 and 8, added to the raw encoder output E(x), for this rank's rows:
    scale * N(0, I), the scale per example from NOISE_MODES[mode]. The one place it is drawn."""
    scale = NOISE_MODES[mode](gen, global_batch, rank, world, device, sigma)
    eps = global_rand(gen, global_batch, shape, rank, world, device, normal=True)
    return scale.view(-1, *[1] * len(shape)) * eps


def check_noise_mode(mode, where):
    """A recorded or given noise mode this code knows, or a one-line error naming `where`."""
    if mode not in NOISE_MODES:
        raise UserError(f"{where}: noise mode {mode!r} is unknown to this code "
                        f"(it knows {', '.join(NOISE_MODES)})")
    return mode


# ---- torchrun
def setup_ddp(device=None, timeout_min=60, group=False):
    """(rank, world, device). Under torchrun: one process per GPU (nccl) or per CPU slot
    (gloo); without torchrun one process, with a process group of one if `group` (FSDP needs
    one). device ('cpu', 'cuda', 'cuda:N') overrides the choice: 'cuda' is this rank's GPU
    (LOCAL_RANK), 'cuda:N' GPU N. timeout_min bounds a collective's wait: long enough for rank 0
    to write a checkpoint."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    dev = torch.device("cpu")
    if use_cuda:
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        if device and torch.device(device).index is not None:
            dev = torch.device(device)
        torch.cuda.set_device(dev)
    if world > 1:
        timeout = datetime.timedelta(minutes=timeout_min)
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                                timeout=timeout)
    elif group:
        dist.init_process_group("nccl" if use_cuda else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    return rank, world, dev


def precision_of(flag, device):
    """--precision, or bf16 on CUDA and fp32 elsewhere when it is not given."""
    precision = flag or ("bf16" if device.type == "cuda" else "fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--precision bf16: this GPU has no bfloat16; use fp32")
    return precision


def autocast(device, precision):
    """The context the passes run in: bf16 autocast for precision 'bf16', plain float32 else."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def cleanup_ddp():
    """The end of a successful run: wait for every rank, then leave the process group. Never on
    an error path (a `finally`): a failed rank must exit at once, so that torchrun stops the
    others instead of leaving them waiting in a barrier."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_(tensor, op="mean"):
    """In-place 'sum', 'mean' or 'max' over ranks (nothing for one process); returns tensor."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        reduce_op = dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM
        dist.all_reduce(tensor, op=reduce_op)
        if op == "mean":
            tensor /= dist.get_world_size()
    return tensor


def all_gather(obj):
    """Every rank's obj (any picklable object), in rank order."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def channel_stats(batches, fn, device, covariance=False):
    """Channel mean (C,) and population variance (C,) of fn(batch) (B, N, C) over all tokens of
    all batches of all ranks, summed in float64 (eq. 1 and 5). covariance=True: the (C, C)
    covariance instead of the variance (PCA)."""
    acc = None
    for batch in batches:
        t = fn(batch).double()
        t = t.reshape(-1, t.shape[-1])  # (tokens, C)
        count = torch.full_like(t[:1], t.shape[0])
        total = t.sum(0, keepdim=True)
        second = t.T @ t if covariance else t.pow(2).sum(0, keepdim=True)
        part = torch.cat([count, total, second])
        acc = part if acc is None else acc + part
    if acc is None:
        raise UserError("channel statistics: no images on this rank")
    all_reduce_(acc, op="sum")
    count = acc[0, 0]
    mean = acc[1] / count
    second = acc[2:] / count
    if covariance:
        return mean, second - torch.outer(mean, mean)
    var = (second[0] - mean.pow(2)).clamp_min(0)
    return mean.float(), var.float()


# ---- Training helpers
@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model for the parameters, in one fused call (also on
    FSDP's sharded parameters); floating buffers are copied, integer ones (orders) are constant."""
    params = [p.detach() for p in model.parameters()]
    if params:  # (pca and identity compressors have none)
        torch._foreach_lerp_(list(ema.parameters()), params, 1.0 - decay)
    pairs = zip(ema.buffers(), model.buffers())
    floats = [(e, b) for e, b in pairs if e.is_floating_point()]
    if floats:
        torch._foreach_copy_([e for e, _ in floats], [b for _, b in floats])


def lr_schedule(step, warmup, decay_start, total, base, final):
    """Linear warm-up from 0 ((step + 1) / warmup), `base` until decay_start, then cosine to
    `final` at `total`. Stage 1 (RAE's) decays right after its warm-up; the flow has none."""
    if step < warmup:
        return base * (step + 1) / warmup
    # t: the cosine's progress, 0 until decay_start, 1 from total on
    t = min(max(step - decay_start, 0) / max(total - decay_start, 1), 1.0)
    return base - (base - final) * 0.5 * (1.0 - math.cos(math.pi * t))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def capture_rng():
    """Every generator a training step could touch (torch CPU and CUDA, numpy, python)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return dict(torch=torch.get_rng_state(), numpy=np.random.get_state(),
                python=random.getstate(), cuda=cuda)


def restore_rng(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_write(path, write, mode="wb", size=None, sync=True):
    """write(f) into path + '.tmp', then rename it to path: a killed run never leaves half a
    file. sync: the file is flushed to disk before the rename and the folder after it, so that
    a crashed machine keeps either file whole; sync=False for many small files (sample.py's
    PNGs), which a crash may lose. A full disk is one line (UserError) naming the file, the
    space it needs (`size` bytes if known) and the space free; the partial file is removed and
    an earlier `path` is kept."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        if os.path.exists(tmp):
            os.remove(tmp)
        if not disk_full(e):
            raise
        kept = os.path.basename(path) if os.path.exists(path) else None
        raise UserError(no_space(path, size, written, kept)) from None
    if sync:
        sync_folder(folder)


def sync_folder(folder):
    """fsync a folder: a rename (or a new file) in it survives a crash."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_full(e):
    """Whether exception e, or one it was raised while handling, is a full disk or quota (a
    write inside torch.save surfaces as a RuntimeError raised during the OSError)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    return False


def no_space(path, size, written=0, kept=None):
    """The one line of a write to `path` that found the disk full, once its partial file is
    gone: the size it needs (`size` bytes, or more than `written`), the space free, and the
    earlier file that is kept (`kept`: its name, None if none)."""
    folder = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(folder).free
    need = f"needs ~{human_bytes(size)}" if size else f"needs more than {human_bytes(written)}"
    line = f"{path}: no space left on device (it {need}, {human_bytes(free)} free)"
    if kept:
        line += f"; the previous {kept} is kept"
    return line


def human_bytes(n):
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def tensor_bytes(obj):
    """The bytes of the tensors in obj (nested dicts, lists and tuples): a checkpoint's size."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_checkpoint(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f), size=tensor_bytes(obj))


def save_json(obj, path):
    text = json.dumps(obj, indent=2) + "\n"
    atomic_write(path, lambda f: f.write(text), mode="w", size=len(text.encode()))


def load_checkpoint(path, stage):
    """A checkpoint written by train_src.py (stage 'src') or train_flow.py (stage 'flow')."""
    if not os.path.isfile(path):
        script = dict(src="train_src.py", flow="train_flow.py")[stage]
        raise FileNotFoundError(f"{path}: no such file; expected {script}'s checkpoint.pt")
    try:  # memory-mapped: only the tensors a caller reads come into host memory
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        raise UserError(f"{path}: unreadable checkpoint ({type(e).__name__})") from None
    found = ckpt.get("stage") if isinstance(ckpt, dict) else type(ckpt).__name__
    if found != stage:
        raise UserError(f"{path}: expected a stage '{stage}' checkpoint, found {found!r}")
    return ckpt


# Flags that steer how a run goes, not what it trains: free to change on --resume. Paths to
# weights may move: what was read from them is compared by check_built (E's and D's
# fingerprints). The optimiser's schedule may change too (nanoGPT's rule: the model is forced,
# the optimisation is not), with a note. Every other flag must be what that run was given.
RUN_CONTROL = ("resume", "out", "max_steps", "log_every", "ckpt_every", "grid_every",
               "sample_cfg", "num_workers", "device", "dist_timeout", "skip_bad_images",
               "compile", "checkpoint_activations", "encoder", "decoder", "lpips_vgg",
               "lpips_lin", "disc_encoder")
RETUNABLE = ("lr", "min_lr", "warmup_epochs", "decay_start_epoch", "grad_clip", "ema_decay")


def resume_checkpoint(args, ckpt_path, stage, parser):
    """The checkpoint a --resume run continues (None without --resume), refused with one line if
    a flag outside RUN_CONTROL and RETUNABLE differs from that run's (a RETUNABLE one is noted);
    a flag its record lacks (an option added since) counts as the parser's default. Without
    --resume an existing checkpoint is refused."""
    if not args.resume:
        if os.path.exists(ckpt_path):
            raise UserError(f"{ckpt_path} exists; pass --resume to continue it, or another --out")
        return None
    ckpt = load_checkpoint(ckpt_path, stage)
    given = vars(args)
    changed = []
    retuned = []
    for key in sorted(set(given) | set(ckpt["args"])):
        flag = "--" + key.replace("_", "-")
        if key in RUN_CONTROL:
            continue
        if key not in given:
            changed.append(f"{flag} {ckpt['args'][key]!r} in that run is unknown to this code")
            continue
        was = ckpt["args"].get(key, parser.get_default(key))
        if was == given[key]:
            continue
        if key in RETUNABLE:
            retuned.append(f"{flag} {was!r} -> {given[key]!r}")
        else:
            changed.append(f"{flag} was {was!r} in that run, {given[key]!r} now")
    if changed:
        raise UserError(f"--resume {ckpt_path}: " + "; ".join(changed))
    if retuned and int(os.environ.get("RANK", 0)) == 0:
        print(f"note: --resume with a new schedule: {', '.join(retuned)}", file=sys.stderr)
    return ckpt


def check_built(ckpt_path, what, recorded, built):
    """Refuse to resume into a model that is not the one saved: `recorded` and `built` (configs:
    nested dicts, lists and numbers) must be equal; one line names the first key that differs."""
    difference = first_difference(recorded, built, what)
    if difference is not None:
        key, was, now = difference
        raise UserError(f"--resume {ckpt_path}: {key} was {short(was)} in that run, "
                        f"{short(now)} as built now")


def first_difference(a, b, key):
    """(key path, a's value, b's value) where a and b first differ, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                return f"{key}.{k}", a.get(k, "(absent)"), b.get(k, "(absent)")
            difference = first_difference(a[k], b[k], f"{key}.{k}")
            if difference is not None:
                return difference
        return None
    # a list of lists (token orders) is compared item by item, a list of numbers whole
    if nested_list(a) and nested_list(b) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            difference = first_difference(x, y, f"{key}[{i}]")
            if difference is not None:
                return difference
        return None
    if a != b:
        return key, a, b
    return None


def nested_list(value):
    """A list or tuple of containers."""
    if not isinstance(value, (list, tuple)):
        return False
    return all(isinstance(x, (dict, list, tuple)) for x in value)


def short(value, limit=60):
    """repr(value), cut to `limit` characters (a token order is 256 numbers)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class TrainLog:
    """Both training loops' bookkeeping: add() sums a step's metrics on the device (no host
    sync); write() syncs once, averages over steps and ranks and appends to log.jsonl, or returns
    False after a one-line error if the loss became non-finite; save() keeps the last good step.
    """

    def __init__(self, keys, out, step, total, batch_size, device, master, resumed, derive=None,
                 show=("loss",)):
        self.keys = list(keys)
        self.out = out
        self.batch_size = batch_size
        self.master = master
        self.show = show
        # derive: record -> dict of derived values (e.g. bits/dim from the loss)
        self.derive = derive
        # the sums of the metrics, then a count of steps
        self.sums = torch.zeros(len(self.keys) + 1, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.time = time.time()
        self.step = step
        self.last_good = step if resumed else None
        self.bar = tqdm(total=total, initial=step, disable=not master or total <= step,
                        dynamic_ncols=True, desc=os.path.basename(os.path.normpath(out)))

    def add(self, step, **values):
        """The metrics of step `step` (0-dim tensors; a missing key counts 0); keys[0] is the loss."""
        loss = values[self.keys[0]].detach()
        bad = ~torch.isfinite(loss) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, step + 1, self.first_bad)
        zero = torch.zeros((), device=self.sums.device)
        row = [values.get(k, zero).detach().float() for k in self.keys]
        self.sums += torch.stack(row + [zero + 1])
        self.bar.update(1)

    def write(self, step, **extra):
        """Average the sums over steps and ranks, append a log.jsonl record, reset; False when
        the loss became non-finite (after a one-line error)."""
        bad = int(all_reduce_(self.first_bad.clone(), op="max"))
        if bad >= 0:
            self.bar.close()
            where = "no checkpoint was written"
            if self.last_good is not None:
                path = os.path.join(self.out, "checkpoint.pt")
                where = f"last good checkpoint {path} (step {self.last_good})"
            print(f"error: loss became non-finite (nan/inf) at step {bad} (epoch "
                  f"{extra.get('epoch')}); stopping; {where}", file=sys.stderr)
            return False
        sums = all_reduce_(self.sums.clone())
        means = (sums[:-1] / sums[-1]).tolist()
        seconds = time.time() - self.time
        steps = step - self.step
        record = dict(step=step, **extra, **dict(zip(self.keys, means)))
        record["steps_per_s"] = steps / seconds
        record["images_per_s"] = steps * self.batch_size / seconds
        if self.derive:
            record.update(self.derive(record))
        if self.master:
            with open(os.path.join(self.out, "log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
        self.bar.set_postfix({k: f"{record[k]:.4g}" for k in self.show})
        self.sums.zero_()
        self.time = time.time()
        self.step = step
        return True

    def save(self, step, build):
        """build() makes the checkpoint; only rank 0 builds and writes it."""
        if self.master:
            save_checkpoint(build(), os.path.join(self.out, "checkpoint.pt"))
        self.last_good = step


def save_grid(images, path, nrow=8, labels=None, title=None, min_tile=64):
    """Images (B, 3, H, W) in [0, 1] (clamped) -> one PNG grid, written atomically; small tiles
    enlarged (nearest) to min_tile pixels, labels (str or None each) in the tiles' corners."""
    images = images.detach().float().clamp(0, 1).cpu()
    b, _, h, w = images.shape
    scale = max(1, math.ceil(min_tile / max(h, w)))
    images = images.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    h = h * scale
    w = w * scale
    nrow = min(nrow, b)
    top = 16 if title else 0  # room for the title
    rows = math.ceil(b / nrow)
    grid = torch.ones(3, top + rows * (h + 2) + 2, nrow * (w + 2) + 2)
    corners = []  # each tile's top-left pixel (x, y)
    for i in range(b):
        r, c = divmod(i, nrow)
        y0 = top + 2 + r * (h + 2)
        x0 = 2 + c * (w + 2)
        grid[:, y0:y0 + h, x0:x0 + w] = images[i]
        corners.append((x0, y0))
    pixels = grid.permute(1, 2, 0).numpy() * 255 + 0.5
    im = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default()
    if title:
        draw.text((4, 2), title, fill=(0, 0, 0), font=font)
    for (x0, y0), text in zip(corners, labels or []):
        if text:
            draw.text((x0 + 2, y0 + 1), str(text), fill=(255, 255, 255), font=font,
                      stroke_width=1, stroke_fill=(0, 0, 0))
    atomic_write(path, lambda f: im.save(f, format="PNG"))


# ---- Command line
def add_run_arguments(p):
    """The run-control flags of both training scripts (loading, seeding, resuming, logging)."""
    cores = os.cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):  # the cores this process may use
        cores = len(os.sched_getaffinity(0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    workers = min(8, cores // local_world)  # no more processes than this machine has
    p.add_argument("--num-workers", type=int, default=workers, help="loader workers per rank")
    p.add_argument("--seed", type=int, default=0, help="seeds weights, data order and noise")
    p.add_argument("--resume", action="store_true", help="continue OUT/checkpoint.pt exactly")
    p.add_argument("--max-steps", type=int, default=0,
                   help="stop (with a checkpoint) at this step; the schedule keeps --epochs")
    p.add_argument("--log-every", type=int, default=100, help="steps between log records")
    p.add_argument("--skip-bad-images", action="store_true", help="leave out unreadable images")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if any)")
    p.add_argument("--dist-timeout", type=int, default=60,
                   help="minutes a rank waits in a collective (e.g. for a checkpoint write)")


def run_cli(main, args):
    """Run main(args); a user error (bad file, argument, data) is one line on stderr, exit 2.
    Under torchrun a failing rank exits at once (os._exit: no barrier, no join of the process
    group's threads) and torchrun stops the job; a rank that only lost its peer says so in one
    line. Other exceptions keep their traceback."""
    rank = int(os.environ.get("RANK", 0))
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    try:
        return main(args)
    except (UserError, ValueError, FileNotFoundError) as e:
        newline = "\n" if rank > 0 else ""  # not glued to rank 0's progress bar
        # tqdm.write: a line of its own even under a progress bar
        tqdm.write(f"{newline}error: {error_line(e)}", file=sys.stderr)
        code = 2
    except Exception as e:
        if not distributed:
            raise
        if "closed by peer" in str(e):  # gloo, once the other rank has exited
            tqdm.write(f"error: rank {rank} lost another rank, which failed (see its error)",
                       file=sys.stderr)
        else:
            traceback.print_exc()
        code = 1
    if distributed:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def error_line(e):
    """A user error's one line: its message, or, raised in a DataLoader worker (the message is
    the worker's traceback), the traceback's last line without the exception's name."""
    lines = str(e).strip().splitlines() or [type(e).__name__]
    line = lines[-1]
    if len(lines) > 1:
        line = re.sub(r"^[\w.]*(Error|Exception): ", "", line)
    return line
