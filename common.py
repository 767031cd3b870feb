"""What train_src.py, train_flow.py and sample.py share, written once.

Contents, in order:
  data         center_crop_arr (ADM's crop), ImageFolder (labels from sorted folder names,
               uint8 tensors, unreadable files named by path), find_unreadable, EpochSampler
               (the per-epoch distributed sampler, resumable mid-epoch), make_loader
  randomness   step_generator / global_randn / global_rand: per-example randomness drawn for
               the whole global batch from a generator seeded by (seed, step, stream), then the
               rank's rows taken, so N processes compute what one process computes
  ddp          setup_ddp, cleanup_ddp, all_reduce_, broadcast_module, channel_stats
  training     update_ema, requires_grad, lr_warmup_cosine, lr_constant_cosine,
               capture_rng / restore_rng, save_checkpoint (atomic), JsonlLog, save_grid,
               UserError and run_cli (one-line errors, exit status 2)
  loaders      load_stage1(path) -> (rae, C, norm2), load_flow(path) -> (flow, cfg)

Images travel as uint8 (B, 3, S, S) from the loader and become floats in [0, 1] on the device.
"""

import json
import math
import os
import random
import re
import sys

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

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
    """root/<class>/**/<image>: labels are the sorted class-folder indices (torchvision's order).

    Returns (uint8 tensor (3, S, S) after the ADM centre crop, label). Flips are not done here:
    they are drawn per global example in the training step (see global_rand), so they do not
    depend on the number of ranks or loader workers. `exclude` removes known-bad files.
    """

    def __init__(self, root, image_size, exclude=()):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{root}: no such folder; expected an ImageFolder (one subfolder per class)")
        self.root, self.image_size = root, image_size
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not self.classes:
            raise UserError(f"{root}: no class subfolders; expected root/<class>/<image> (ImageFolder layout)")
        exclude = set(exclude)
        self.samples = []
        for label, name in enumerate(self.classes):
            for dirpath, dirnames, files in os.walk(os.path.join(root, name), followlinks=True):
                dirnames.sort()
                for f in sorted(files):
                    path = os.path.join(dirpath, f)
                    if f.lower().endswith(IMAGE_EXTENSIONS) and path not in exclude:
                        self.samples.append((path, label))
        if not self.samples:
            raise UserError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its {len(self.classes)} class folders")

    def __len__(self):
        return len(self.samples)

    def load(self, path):
        try:
            with Image.open(path) as im:
                im = center_crop_arr(im.convert("RGB"), self.image_size)
        except Exception as e:  # PIL raises many types; name the file and the cause in one line
            raise UserError(f"{path}: unreadable image ({type(e).__name__}: {e}); "
                            f"remove it or pass --skip-bad-images") from None
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return self.load(path), label


class _Readable(torch.utils.data.Dataset):
    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            with Image.open(self.paths[i]) as im:
                im.convert("RGB")
            return True
        except Exception:
            return False


def find_unreadable(paths, rank=0, world=1, num_workers=0):
    """Paths PIL cannot decode, checked in parallel (rank shard x loader workers), on every rank."""
    mine = list(range(rank, len(paths), world))
    loader = torch.utils.data.DataLoader(_Readable([paths[i] for i in mine]), batch_size=64,
                                         num_workers=num_workers, collate_fn=list)
    ok = [flag for batch in loader for flag in batch]
    bad = [paths[i] for i, good in zip(mine, ok) if not good]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, bad)
        bad = sorted(p for part in gathered for p in part)
    return bad


class EpochSampler(torch.utils.data.Sampler):
    """The distributed sampler: one permutation per epoch from (seed, epoch), cut to whole global
    batches; rank r takes positions r, r+W, r+2W, ... so the union of the ranks' k-th local
    batches is exactly the k-th global batch of a single process. set_epoch(epoch, start_step)
    starts mid-epoch after a resume without reading the skipped images."""

    def __init__(self, n, global_batch, rank=0, world=1, seed=0, shuffle=True):
        if global_batch % world:
            raise UserError(f"--batch-size {global_batch} is not divisible by the {world} processes")
        if n < global_batch:
            raise UserError(f"the dataset has {n} images, fewer than one global batch of {global_batch}")
        self.n, self.global_batch, self.rank, self.world = n, global_batch, rank, world
        self.seed, self.shuffle = seed, shuffle
        self.steps_per_epoch = n // global_batch
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
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

def step_generator(seed, step, stream, device):
    """A generator on `device` seeded by (seed, step, stream): the same numbers on every rank."""
    s = int(np.random.SeedSequence([seed, step, stream]).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(s)


def global_randn(gen, global_batch, shape, rank, world, device):
    """N(0, 1) of shape (global_batch, *shape) drawn on every rank; returns this rank's rows
    (r, r+W, ...), i.e. the examples EpochSampler gave it."""
    return torch.randn((global_batch, *shape), generator=gen, device=device)[rank::world]


def global_rand(gen, global_batch, shape, rank, world, device):
    """U[0, 1) counterpart of global_randn."""
    return torch.rand((global_batch, *shape), generator=gen, device=device)[rank::world]


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


def average_grads(params):
    """Average the .grad of `params` over ranks in one flat all-reduce (for modules not under DDP)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    flat = all_reduce_(torch.cat([g.reshape(-1) for g in grads]))
    for g, v in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(v.view_as(g))


def broadcast_module(module, src=0):
    """Copy rank `src`'s parameters and buffers to every rank."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src)


@torch.no_grad()
def channel_stats(batches, fn, device):
    """Channel-wise mean and (population) variance of fn(batch) (B, N, C) over all tokens of all
    batches of all ranks, accumulated in float64 (eq. 1 and eq. 5 statistics)."""
    acc = None
    for batch in batches:
        t = fn(batch).double()
        t = t.reshape(-1, t.shape[-1])
        part = torch.stack([t.sum(0), t.pow(2).sum(0), torch.full_like(t[0], t.shape[0])])
        acc = part if acc is None else acc + part
    if acc is None:
        raise UserError("channel statistics: no data on this rank (dataset smaller than the number of processes?)")
    all_reduce_(acc, op="sum")
    mean = acc[0] / acc[2]
    var = (acc[1] / acc[2] - mean.pow(2)).clamp_min(0)
    return mean.float(), var.float()


# -----------------------------------------------------------------------------
# Training utilities

@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers are copied."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def requires_grad(module, flag):
    for p in module.parameters():
        p.requires_grad_(flag)


def lr_warmup_cosine(step, warmup_steps, total_steps, base, final):
    """RAE's stage-1 schedule: linear warm-up from 0 ((step+1)/warmup), then cosine to `final`."""
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    if step >= total_steps:
        return final
    t = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * t))


def lr_constant_cosine(step, decay_start, total_steps, base, final):
    """The flow's schedule: constant `base` until `decay_start`, then cosine to `final`."""
    if step < decay_start:
        return base
    t = min((step - decay_start) / max(total_steps - decay_start, 1), 1.0)
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * t))


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


def stop_if_non_finite(first_bad, epoch, ckpt_path, last_good, bar):
    """Exit with status 3, naming the step, if any rank saw a non-finite loss (first_bad >= 0: the
    first such step). One host sync per call, so the scripts call it at log and checkpoint steps."""
    bad_step = int(all_reduce_(first_bad.clone(), op="max"))
    if bad_step < 0:
        return
    bar.close()
    where = f"; last good checkpoint {ckpt_path} (step {last_good})" if last_good is not None \
        else "; no checkpoint was written"
    print(f"error: loss became non-finite (nan/inf) at step {bad_step} (epoch {epoch}); stopping{where}",
          file=sys.stderr)
    cleanup_ddp()
    sys.exit(3)


def save_checkpoint(obj, path):
    """torch.save to path + '.tmp', then rename: a crash never leaves a half-written checkpoint."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path, stage):
    """A checkpoint written by train_src.py (stage 'src') or train_flow.py (stage 'flow')."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file; expected a {stage} checkpoint "
                                f"({'train_src.py' if stage == 'src' else 'train_flow.py'} --out DIR writes DIR/checkpoint.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"{path}: not a readable torch checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("stage") != stage:
        found = ckpt.get("stage") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"{path}: expected a stage '{stage}' checkpoint, found {found!r}")
    return ckpt


class JsonlLog:
    """Appends one JSON object per line to <out>/log.jsonl (rank 0 only)."""

    def __init__(self, path, enabled=True):
        self.path, self.enabled = path, enabled

    def write(self, **record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def save_grid(images, path, nrow=8, labels=None):
    """Images (B,3,H,W) in [0,1] (clamped) -> one PNG grid, written atomically; `labels` (strings,
    one per image) are printed in each tile's corner when given."""
    from PIL import ImageDraw
    images = images.detach().float().clamp(0, 1).cpu()
    b, _, h, w = images.shape
    nrow = min(nrow, b)
    rows = math.ceil(b / nrow)
    grid = torch.ones(3, rows * (h + 2) + 2, nrow * (w + 2) + 2)
    for i in range(b):
        r, c = divmod(i, nrow)
        grid[:, 2 + r * (h + 2):2 + r * (h + 2) + h, 2 + c * (w + 2):2 + c * (w + 2) + w] = images[i]
    im = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))
    if labels is not None:
        draw = ImageDraw.Draw(im)
        for i, text in enumerate(labels):
            r, c = divmod(i, nrow)
            draw.text((4 + c * (w + 2), 3 + r * (h + 2)), str(text), fill=(255, 255, 255))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    im.save(path + ".tmp", format="PNG")
    os.replace(path + ".tmp", path)


def add_run_arguments(p):
    """The run-control flags both training scripts share (data loading, seeding, resuming, logging)."""
    p.add_argument("--num-workers", type=int, default=8, help="data-loader processes per rank")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, data order and per-example noise")
    p.add_argument("--resume", action="store_true", help="continue OUT/checkpoint.pt exactly")
    p.add_argument("--max-steps", type=int, default=0, help="stop (with a checkpoint) at this global step; the schedule still follows --epochs (0: off)")
    p.add_argument("--log-every", type=int, default=100, help="steps between log.jsonl records")
    p.add_argument("--skip-bad-images", action="store_true", help="check every image first and leave out unreadable ones (listed on stderr)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def run_cli(main, args):
    """Run main(args); a user error (bad file, argument, data) is one line on stderr, exit 2."""
    try:
        return main(args)
    except (UserError, ValueError, FileNotFoundError) as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        line = lines[-1]
        if len(lines) > 1:  # raised in a DataLoader worker: the message is its traceback; keep the cause
            line = re.sub(r"^[\w.]*(Error|Exception): ", "", line)
        from tqdm import tqdm
        tqdm.write(f"error: {line}", file=sys.stderr)  # on its own line even under a progress bar
        sys.exit(2)


# -----------------------------------------------------------------------------
# Loading trained stages (used by train_flow.py and sample.py)

def build_rae(encoder_path, decoder_path, decoder_config, decoder_state, image_size, rae_stats):
    """The frozen RAE of a stage-1 run: E from encoder_path, D from the checkpoint's own state
    (when train_src.py trained it) or from decoder_path, statistics from rae_stats."""
    from rae import RAE, RAEDecoder, load_dinov2, load_rae_decoder
    if not os.path.exists(encoder_path):
        raise FileNotFoundError(f"{encoder_path}: the DINOv2 encoder named by the stage-1 checkpoint is missing")
    encoder = load_dinov2(encoder_path)
    if decoder_state is not None:
        decoder = RAEDecoder(**decoder_config)
        decoder.load_state_dict(decoder_state)
    else:
        if not os.path.exists(decoder_path):
            raise FileNotFoundError(f"{decoder_path}: the RAE decoder named by the stage-1 checkpoint is missing")
        decoder = load_rae_decoder(decoder_path, num_heads=decoder_config.get("num_heads"))
    rae = RAE(encoder, decoder, image_size=image_size)
    rae.set_stats(rae_stats["mean"], rae_stats["var"])
    return rae


def norm2_of(stats):
    """(mean, std) of eq. 5 from the stored {'mean', 'var'}: std = sqrt(var) (var floored at 1e-12)."""
    return stats["mean"].float(), stats["var"].float().clamp_min(1e-12).sqrt()


def load_stage1(path, device="cpu", ema=True):
    """(rae, C, norm2) of a train_src.py checkpoint: RAE with statistics, the SRC (EMA weights by
    default) and norm2 = (mean, std) of shape (d,) (eq. 5); eval mode, no gradients."""
    from src import SRC
    ckpt = load_checkpoint(path, "src")
    if ckpt.get("norm2") is None:
        raise UserError(f"{path}: stage-1 run has no compact statistics yet (norm2 is written when "
                        f"train_src.py finishes); finish or resume the run first")
    dec_state = ckpt.get("decoder_ema" if ema else "decoder")
    rae = build_rae(ckpt["encoder_path"], ckpt["decoder_path"], ckpt["decoder_config"], dec_state,
                    ckpt["image_size"], ckpt["rae_stats"])
    C = SRC(**ckpt["src_config"])
    C.load_state_dict(ckpt["src_ema" if ema else "src"])
    mean, std = norm2_of(ckpt["norm2"])
    for m in (rae, C):
        m.to(device).eval().requires_grad_(False)
    return rae, C, (mean.to(device), std.to(device))


def load_flow(path, device="cpu", ema=True):
    """(flow, cfg) of a train_flow.py checkpoint; cfg holds stage1, num_classes, noise_std,
    image_size, flow_config and the run's args."""
    from tarflow import TARFlow
    ckpt = load_checkpoint(path, "flow")
    flow = TARFlow(**ckpt["flow_config"])
    flow.load_state_dict(ckpt["flow_ema" if ema else "flow"])
    flow.to(device).eval().requires_grad_(False)
    cfg = dict(ckpt["args"])
    cfg.update(stage1=ckpt["stage1"], num_classes=ckpt["num_classes"], noise_std=ckpt["noise_std"],
               image_size=ckpt["image_size"], flow_config=ckpt["flow_config"], step=ckpt["step"],
               epoch=ckpt["epoch"])
    return flow, cfg
