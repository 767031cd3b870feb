"""Stage 2 of SRC-Flow: train the normalizing flow on compact semantic features (paper §3.4, §4.1).

E, the RAE statistics, C_enc and norm2 come frozen from a stage-1 checkpoint (train_src.py). Each
image becomes the flow input of eq. 8 with constant noise sigma_flow = 0.4 on the raw encoder output,

    z_c = norm2(C_enc(norm(E(x) + eps))),   eps ~ N(0, 0.4^2 I),

and the flow f (TARFlow, SimFlow's deep-shallow XXL by default) is trained by maximum likelihood,
eq. 9: 0.5 ||f(z_c)||^2 + sum alpha, divided by N*d (logged as nats/dim `loss`; `bpd` adds the
Gaussian constant 0.5 ln(2 pi) per dim and converts to bits). Labels are replaced by the null
label with probability 0.1 (classifier-free guidance).

    python train_flow.py --data /data/imagenet/train --stage1 runs/src/checkpoint.pt --out runs/flow
    torchrun --nproc_per_node=8 train_flow.py --data /data/imagenet/train --stage1 runs/src/checkpoint.pt --out runs/flow
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-endpoint=HOST:PORT train_flow.py ...     # several nodes
    python train_flow.py ... --resume                 # continue runs/flow/checkpoint.pt exactly
    python train_flow.py --data toy/ --stage1 toy_src/checkpoint.pt --out toy_flow --model tiny \\
        --epochs 4 --batch-size 8 --device cpu       # toy run on a CPU

--batch-size is the global batch; per-example randomness (flip, eps, label drop) is drawn for the
whole global batch from a generator seeded by (seed, step) and each rank takes its rows, so N
processes follow the same trajectory as one process (up to float summation order).
Outputs in --out: checkpoint.pt (written atomically; what sample.py reads), log.jsonl, samples/*.png.
"""

import argparse
import copy
import math
import os
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import common
from common import UserError

try:  # the paper's sizes live with the model when tarflow.py provides them
    from tarflow import SIZES
except ImportError:  # pragma: no cover
    SIZES = {'XXL': dict(channels=1152, head_dim=72, depths=[2, 2, 2, 2, 2, 36])}

LN2 = math.log(2.0)
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


# -----------------------------------------------------------------------------

class CompactFeatures(torch.nn.Module):
    """x in [0, 1] -> z_c of eq. 8 with the frozen E, RAE statistics, C_enc and norm2."""

    def __init__(self, rae, C, mean2, std2):
        super().__init__()
        self.rae, self.C = rae, C
        self.register_buffer("mean2", mean2)
        self.register_buffer("std2", std2)

    @torch.no_grad()
    def forward(self, x, eps=None, noise_std=0.0):
        z_raw = self.rae.encode_raw(x)
        if eps is not None:
            z_raw = z_raw + noise_std * eps.to(z_raw.dtype)
        zc = self.C.encode(self.rae.normalize(z_raw))
        return (zc.float() - self.mean2) / self.std2


def nll_per_dim(z, logdet):
    """Eq. 9 per example divided by N*d, in nats: (0.5 ||z||^2 - log|det|) / (N d)."""
    D = z.shape[1] * z.shape[2]
    return (0.5 * z.float().pow(2).sum(dim=(1, 2)) - logdet.float()) / D


def checkpoint_layers(flow):
    """Recompute each Transformer layer in the backward pass (activation checkpointing)."""
    from torch.utils.checkpoint import checkpoint
    for block in flow.blocks:
        for layer in block.layers:
            fwd = layer.forward
            layer.forward = lambda h, mod, fwd=fwd: checkpoint(fwd, h, mod, use_reentrant=False)


@torch.no_grad()
def sample_grid(flow, features, C, rae, num_classes, n, guidance, seed, device, autocast, path):
    """n samples (eq. 10) from fixed prior noise, labels 0, 1, 2, ... (mod classes), saved as a grid."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, flow.num_tokens, flow.in_channels, generator=g).to(device)
    y = (torch.arange(n) % num_classes).to(device) if num_classes else None
    with autocast():
        zc = flow.reverse(u, y, guidance=guidance if num_classes else 0.0)
        z = C.decode((zc.float() * features.std2 + features.mean2).to(u.dtype))
        images = rae.decode(z)
    common.save_grid(images.float(), path, nrow=min(n, 8),
                     labels=[str(int(v)) for v in y] if y is not None else None)


def main(args):
    # ---- set-up
    rank, world, device = common.setup_ddp(args.device)
    master = rank == 0
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--precision bf16: this GPU does not support bfloat16; use --precision fp32")
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.model not in SIZES:
        raise UserError(f"--model {args.model}: unknown size; choose from {', '.join(SIZES)}")
    for name in ("epochs", "batch_size"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0 <= args.label_drop < 1:
        raise UserError(f"--label-drop must lie in [0, 1), got {args.label_drop}")
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    resume = None
    if args.resume:
        resume = common.load_checkpoint(ckpt_path, "flow")
        kept = {k: resume["args"][k] for k in ("data", "stage1", "model", "batch_size", "epochs", "seed",
                                               "noise_std", "label_drop", "unconditional")}
        changed = {k: (v, getattr(args, k)) for k, v in kept.items() if getattr(args, k) != v}
        if changed:
            raise UserError(f"--resume {ckpt_path}: these arguments differ from the run being resumed "
                            f"(was, now): {changed}")
    elif os.path.exists(ckpt_path):
        raise UserError(f"{ckpt_path} exists; pass --resume to continue it or choose another --out")

    # ---- frozen stage 1: E, RAE statistics, C_enc, norm2 (eq. 8)
    rae, C, (mean2, std2) = common.load_stage1(args.stage1, device=device, ema=True)
    s1 = common.load_checkpoint(args.stage1, "src")
    image_size = int(s1["image_size"])
    features = CompactFeatures(rae, C, mean2, std2).to(device)

    # ---- data
    exclude = []
    dataset = common.ImageFolder(args.data, image_size)
    if args.skip_bad_images:
        exclude = common.find_unreadable([p for p, _ in dataset.samples], rank, world, args.num_workers)
        if exclude:
            if master:
                print(f"skipping {len(exclude)} unreadable images: " + ", ".join(exclude[:5])
                      + (" ..." if len(exclude) > 5 else ""), file=sys.stderr)
            dataset = common.ImageFolder(args.data, image_size, exclude=exclude)
    num_classes = 0 if args.unconditional else len(dataset.classes)
    if s1.get("num_classes") not in (None, len(dataset.classes)) and master:
        print(f"note: stage 1 saw {s1['num_classes']} classes, --data has {len(dataset.classes)}", file=sys.stderr)
    sampler = common.EpochSampler(len(dataset), args.batch_size, rank, world, args.seed)
    loader = common.make_loader(dataset, sampler, args.num_workers)
    steps_per_epoch = sampler.steps_per_epoch
    total_steps = args.epochs * steps_per_epoch
    decay_start_epoch = args.epochs / 2 if args.decay_start_epoch is None else args.decay_start_epoch
    decay_start = int(round(decay_start_epoch * steps_per_epoch))

    # ---- flow, EMA, optimizer
    with torch.no_grad():
        probe = features(torch.zeros(1, 3, image_size, image_size, device=device))
    N, d = probe.shape[1], probe.shape[2]
    n_raw = rae.encode_raw(torch.zeros(1, 3, image_size, image_size, device=device)).shape[-1]
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    from tarflow import TARFlow
    flow_config = dict(in_channels=d, num_tokens=N, num_classes=num_classes, mlp_ratio=4.0, **SIZES[args.model])
    flow = TARFlow(**flow_config).to(device)
    ema = copy.deepcopy(flow).requires_grad_(False).eval()
    opt = torch.optim.AdamW(flow.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0,
                            fused=device.type == "cuda")
    step, start_epoch = 0, 0
    if resume is not None:
        flow.load_state_dict(resume["flow"])
        ema.load_state_dict(resume["flow_ema"])
        opt.load_state_dict(resume["optimizer"])
        common.restore_rng(resume["rng"])
        step, start_epoch = resume["step"], resume["step"] // steps_per_epoch
    if args.checkpoint_activations:
        checkpoint_layers(flow)
    model = torch.compile(flow) if args.compile else flow
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    n_params = sum(p.numel() for p in flow.parameters())

    def state(epoch):
        return dict(stage="flow", args=vars(args), step=step, epoch=epoch, flow=flow.state_dict(),
                    flow_ema=ema.state_dict(), optimizer=opt.state_dict(), scaler=None,  # bf16: no loss scaling
                    rng=common.capture_rng(), flow_config=flow_config, stage1=os.path.abspath(args.stage1),
                    noise_std=args.noise_std, num_classes=num_classes, image_size=image_size,
                    precision=precision, world_size=world, steps_per_epoch=steps_per_epoch)

    if master:
        os.makedirs(args.out, exist_ok=True)
        print(f"flow {args.model}: {n_params / 1e6:.2f}M parameters, tokens {N}x{d}, {num_classes} classes; "
              f"{len(dataset)} images, {steps_per_epoch} steps/epoch x {args.epochs} epochs, "
              f"global batch {args.batch_size} on {world} process(es), {device}, {precision}")
    log = common.JsonlLog(os.path.join(args.out, "log.jsonl"), enabled=master)
    last_good = step if resume is not None else None

    # ---- training loop
    B, null = args.batch_size, num_classes
    sums = torch.zeros(3, device=device)  # loss, grad norm, steps, summed on device between logs
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    bar = tqdm(total=total_steps, initial=step, disable=not master, dynamic_ncols=True, desc="flow")
    t_log, step_log = time.time(), step
    stop = args.max_steps if args.max_steps else total_steps
    flow.train()
    for epoch in range(start_epoch, args.epochs):
        if step >= stop:
            break
        sampler.set_epoch(epoch, step - epoch * steps_per_epoch)
        for images, labels in loader:
            gen = common.step_generator(args.seed, step, 0, device)
            flip = common.global_rand(gen, B, (), rank, world, device) < 0.5
            eps = common.global_randn(gen, B, (N, n_raw), rank, world, device)
            drop = common.global_rand(gen, B, (), rank, world, device) < args.label_drop
            x = common.to_unit(images, device, flip)
            y = None
            if num_classes:
                y = torch.where(drop, null, labels.to(device, non_blocking=True))
            with autocast():
                zc = features(x, eps, args.noise_std)           # eq. 8
                z, logdet = model(zc, y)
            loss = nll_per_dim(z, logdet).mean()                # eq. 9 / (N d)
            lr = common.lr_constant_cosine(step, decay_start, total_steps, args.lr, args.min_lr)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(flow.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
            opt.step()
            common.update_ema(ema, flow, args.ema)
            bad = ~torch.isfinite(loss.detach())
            first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, step + 1), first_bad)
            sums += torch.stack([loss.detach().float(), gnorm.detach().float(), torch.ones((), device=device)])
            step += 1
            bar.update(1)

            end_of_epoch = step % steps_per_epoch == 0
            ckpt_due = end_of_epoch or step >= stop or (args.ckpt_every and step % args.ckpt_every == 0)
            if step % args.log_every == 0 or ckpt_due:
                common.stop_if_non_finite(first_bad, epoch, ckpt_path, last_good, bar)  # one host sync per log
                common.all_reduce_(sums)
                loss_m, gn_m, _ = (sums / sums[2]).tolist()
                dt = time.time() - t_log
                rec = dict(step=step, epoch=epoch, loss=loss_m, bpd=(loss_m + HALF_LOG_2PI) / LN2, lr=lr,
                           grad_norm=gn_m, steps_per_s=(step - step_log) / dt, images_per_s=(step - step_log) * B / dt)
                log.write(**rec)
                bar.set_postfix(loss=f"{loss_m:.4f}", bpd=f"{rec['bpd']:.4f}", lr=f"{lr:.2e}")
                sums.zero_()
                t_log, step_log = time.time(), step
            if master and args.grid_every and (step % args.grid_every == 0 or step >= stop):
                sample_grid(ema, features, C, rae, num_classes, 8, args.sample_cfg, args.seed, device, autocast,
                            os.path.join(args.out, "samples", f"{step:07d}.png"))
            if ckpt_due:
                if master:
                    common.save_checkpoint(state(step // steps_per_epoch), ckpt_path)
                last_good = step
            if step >= stop:
                break
    bar.close()
    if master:
        print(f"done: step {step}, checkpoint {ckpt_path}")
    common.cleanup_ddp()


def build_parser():
    p = argparse.ArgumentParser(description="Stage 2 of SRC-Flow: train the flow on compact features (eq. 8, 9).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="training images as an ImageFolder (one subfolder per class)")
    p.add_argument("--stage1", required=True, help="stage-1 checkpoint from train_src.py (E, C_enc, statistics)")
    p.add_argument("--out", required=True, help="output folder: checkpoint.pt, log.jsonl, samples/")
    p.add_argument("--model", default="XXL", help=f"flow size: {', '.join(SIZES)} (XXL: width 1152, 16 heads, depths 2,2,2,2,2,36)")
    p.add_argument("--epochs", type=int, default=320, help="training epochs")
    p.add_argument("--batch-size", type=int, default=256, help="global batch size (split over processes)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (betas 0.9, 0.999; no weight decay)")
    p.add_argument("--min-lr", type=float, default=1e-6, help="learning rate at the end of the cosine decay")
    p.add_argument("--decay-start-epoch", type=float, default=None, help="epoch where the cosine decay starts (default: epochs / 2)")
    p.add_argument("--noise-std", type=float, default=0.4, help="sigma_flow: constant noise std on the raw encoder output (eq. 8)")
    p.add_argument("--label-drop", type=float, default=0.1, help="probability of replacing a label by the null label (CFG)")
    p.add_argument("--unconditional", action="store_true", help="train without class labels")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip (0: off)")
    p.add_argument("--ema", type=float, default=0.9999, help="EMA decay of the flow weights")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="autocast precision (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the flow")
    p.add_argument("--checkpoint-activations", action="store_true", help="recompute Transformer layers in backward to save memory")
    p.add_argument("--grid-every", type=int, default=5000, help="steps between sample grids of the EMA flow (0: off)")
    p.add_argument("--sample-cfg", type=float, default=1.0, help="guidance scale of the sample grids")
    p.add_argument("--ckpt-every", type=int, default=0, help="steps between checkpoints besides every epoch end (0: epoch ends only)")
    common.add_run_arguments(p)
    return p


if __name__ == "__main__":
    common.run_cli(main, build_parser().parse_args())
