"""Stage 2 of SRC-Flow: train the normalizing flow on compact semantic features (paper §3.4, §4.1).

E, the RAE statistics, C_enc and norm2 come frozen from a stage-1 checkpoint (train_src.py). Each
image becomes the flow input of eq. 8 with constant noise sigma_flow = 0.4 on the raw encoder output,

    z_c = norm2(C_enc(norm(E(x) + eps))),   eps ~ N(0, 0.4^2 I)      (common.Stage1.encode),

and the flow f (TARFlow, SimFlow's deep-shallow XXL by default) is trained by maximum likelihood,
eq. 9: 0.5 ||f(z_c)||^2 + sum alpha, divided by N*d (logged as nats/dim `loss`; `bpd` adds the
Gaussian constant 0.5 ln(2 pi) per dim and converts to bits). Labels are replaced by the null
label with probability 0.1 (classifier-free guidance).

    python train_flow.py --data /data/imagenet/train --stage1 runs/src/checkpoint.pt --out runs/flow
    torchrun --nproc_per_node=8 train_flow.py ...     # same arguments, 8 GPUs (--nnodes for more)
    python train_flow.py ... --resume                 # continue runs/flow/checkpoint.pt exactly

--batch-size is the global batch; per-example randomness (flip, eps, label drop) is drawn for the whole global
batch from a generator seeded by (seed, step) and each rank takes its rows, so N processes follow the same
trajectory as one process (up to float summation order). Ablations: --noise-mode per-example (sigma ~
U(0, sigma_flow) per image, as stage 1) and --noise-std 0. Outputs in --out: checkpoint.pt (written atomically;
what sample.py reads), log.jsonl, samples/*.png.
"""

import argparse
import copy
import math
import os
import sys

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

import common
from common import UserError
from tarflow import SIZES, TARFlow

RESUME_KEPT = ("data", "stage1", "model", "batch_size", "epochs", "seed", "noise_std", "noise_mode", "label_drop",
               "unconditional")


def nll_per_dim(z, logdet):
    """Eq. 9 per example divided by N*d, in nats: (0.5 ||z||^2 - log|det|) / (N d)."""
    return (0.5 * z.float().pow(2).sum(dim=(1, 2)) - logdet.float()) / (z.shape[1] * z.shape[2])


def checkpoint_layers(flow):
    """Recompute each Transformer layer in the backward pass (activation checkpointing)."""
    for block in flow.blocks:
        for layer in block.layers:
            fwd = layer.forward
            layer.forward = lambda h, mod, fwd=fwd: checkpoint(fwd, h, mod, use_reentrant=False)


@torch.no_grad()
def sample_grid(flow, stage1, n, guidance, seed, autocast, path):
    """n samples (eq. 10) from fixed prior noise, labels 0, 1, 2, ... (mod classes), saved as a grid."""
    z = torch.randn(n, flow.num_tokens, flow.in_channels, generator=torch.Generator().manual_seed(seed))
    y = torch.arange(n) % flow.num_classes if flow.num_classes else None
    with autocast():
        x = flow.reverse(z.to(stage1.mean2.device), y if y is None else y.to(z.device), guidance * (y is not None))
        images = stage1.decode(x)
    common.save_grid(images, path, nrow=min(n, 8), labels=None if y is None else [str(int(v)) for v in y])


def main(args):
    # Setup DDP and precision
    check_args(args)
    rank, world, device = common.setup_ddp(args.device)
    master = rank == 0
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--precision bf16: this GPU does not support bfloat16; use --precision fp32")
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    resume = common.resume_checkpoint(args, ckpt_path, "flow", RESUME_KEPT)

    # Frozen stage 1: E, RAE statistics, C_enc and norm2 (eq. 8)
    stage1 = common.load_stage1(args.stage1, device, encoder=args.encoder, decoder=args.decoder)
    image_size = stage1.image_size
    raw_shape = (stage1.rae.decoder.num_patches, stage1.rae.encoder.embed_dim)  # (N, n) of E(x)

    # Data
    dataset = common.training_set(args, image_size, rank, world)
    num_classes = 0 if args.unconditional else len(dataset.classes)
    if stage1.num_classes not in (None, len(dataset.classes)) and master:
        print(f"note: stage 1 saw {stage1.num_classes} classes, --data has {len(dataset.classes)}", file=sys.stderr)
    sampler = common.EpochSampler(len(dataset), args.batch_size, rank, world, args.seed)
    loader = common.make_loader(dataset, sampler, args.num_workers)
    spe = sampler.steps_per_epoch
    total_steps = args.epochs * spe
    decay_start = int(round((args.epochs / 2 if args.decay_start_epoch is None else args.decay_start_epoch) * spe))

    # Create the flow, its EMA and the optimiser
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    flow = TARFlow(in_channels=stage1.C.d, num_tokens=raw_shape[0], num_classes=num_classes,
                   **SIZES[args.model]).to(device)
    ema = copy.deepcopy(flow).requires_grad_(False).eval()
    opt = torch.optim.AdamW(flow.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0,
                            fused=device.type == "cuda")
    step = 0
    if resume is not None:
        flow.load_state_dict(resume["flow"])
        ema.load_state_dict(resume["flow_ema"])
        opt.load_state_dict(resume["optimizer"])
        common.restore_rng(resume["rng"])
        step = resume["step"]
    if args.checkpoint_activations:
        checkpoint_layers(flow)
    model = torch.compile(flow) if args.compile else flow
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    def state(epoch):
        return dict(stage="flow", args=vars(args), step=step, epoch=epoch, flow_kind=type(flow).__name__,
                    flow_config=flow.config(), flow=flow.state_dict(), flow_ema=ema.state_dict(),
                    optimizer=opt.state_dict(), rng=common.capture_rng(), stage1=os.path.abspath(args.stage1),
                    noise_std=args.noise_std, noise_mode=args.noise_mode, num_classes=num_classes,
                    image_size=image_size, precision=precision, world_size=world, steps_per_epoch=spe)

    if master:
        os.makedirs(args.out, exist_ok=True)
        print(f"flow {args.model}: {sum(p.numel() for p in flow.parameters()) / 1e6:.2f}M parameters, tokens "
              f"{flow.num_tokens}x{flow.in_channels}, {num_classes} classes; {len(dataset)} images, {spe} steps/epoch "
              f"x {args.epochs} epochs, global batch {args.batch_size} on {world} process(es), {device}, {precision}")

    # Train: eq. 8 features, eq. 9 loss
    B, stop = args.batch_size, min(args.max_steps or total_steps, total_steps)
    log = common.TrainLog(["loss", "grad_norm"], args.out, step, total_steps, B, device, master, resume is not None,
                          derive=lambda r: dict(bpd=(r["loss"] + 0.5 * math.log(2 * math.pi)) / math.log(2)),
                          show=("loss", "bpd", "lr"))  # bits/dim with the Gaussian constant
    flow.train()
    for epoch in range(step // spe, args.epochs):
        if step >= stop:
            break
        sampler.set_epoch(epoch, step - epoch * spe)
        for images, labels in loader:
            gen = common.step_generator(args.seed, step, 0, device)
            flip = common.global_rand(gen, B, (), rank, world, device) < 0.5
            eps = common.encoder_noise(gen, B, raw_shape, rank, world, device, args.noise_std,
                                       args.noise_mode == "per-example")
            drop = common.global_rand(gen, B, (), rank, world, device) < args.label_drop
            y = torch.where(drop, num_classes, labels.to(device, non_blocking=True)) if num_classes else None
            with autocast():
                with torch.no_grad():
                    zc = stage1.encode(common.to_unit(images, device, flip), eps)     # eq. 8
                z, logdet = model(zc.float(), y)
            loss = nll_per_dim(z, logdet).mean()                                        # eq. 9 / (N d)
            lr = common.lr_schedule(step, 0, decay_start, total_steps, args.lr, args.min_lr)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(flow.parameters(), args.grad_clip or float("inf"))
            opt.step()
            common.update_ema(ema, flow, args.ema)
            log.add(step, loss=loss, grad_norm=gnorm)
            step += 1

            ckpt_due = step % spe == 0 or step >= stop or (args.ckpt_every and step % args.ckpt_every == 0)
            if step % args.log_every == 0 or ckpt_due:                # one host sync per log
                if log.write(step, epoch=epoch, lr=lr) is None:       # the loss became non-finite
                    common.cleanup_ddp()
                    sys.exit(3)
            if master and args.grid_every and (step % args.grid_every == 0 or step >= stop):
                sample_grid(ema, stage1, 8, args.sample_cfg, args.seed, autocast,
                            os.path.join(args.out, "samples", f"{step:07d}.png"))
            if ckpt_due:
                log.save(step, lambda: state(step // spe))
            if step >= stop:
                break
    log.bar.close()
    if master:
        print(f"done: step {step}, checkpoint {ckpt_path}")
    common.cleanup_ddp()


def build_parser():
    p = argparse.ArgumentParser(description="Stage 2 of SRC-Flow: train the flow on compact features (eq. 8, 9).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="training images as an ImageFolder (one subfolder per class)")
    p.add_argument("--stage1", required=True, help="stage-1 checkpoint from train_src.py (E, C_enc, statistics)")
    p.add_argument("--encoder", default=None, help="DINOv2 weights, if they moved since stage 1 (default: its path)")
    p.add_argument("--decoder", default=None, help="released RAE decoder, if it moved since stage 1")
    p.add_argument("--out", required=True, help="output folder: checkpoint.pt, log.jsonl, samples/")
    p.add_argument("--model", default="XXL", choices=list(SIZES),
                   help="flow size (XXL: width 1152, 16 heads, depths 2,2,2,2,2,46: 1.36B parameters)")
    p.add_argument("--epochs", type=int, default=320, help="training epochs")
    p.add_argument("--batch-size", type=int, default=256, help="global batch size (split over processes)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (betas 0.9, 0.999; no weight decay)")
    p.add_argument("--min-lr", type=float, default=1e-6, help="learning rate at the end of the cosine decay")
    p.add_argument("--decay-start-epoch", type=float, default=None,
                   help="epoch where the cosine decay starts (default: epochs / 2)")
    p.add_argument("--noise-std", type=float, default=0.4,
                   help="sigma_flow: std of the noise on the raw encoder output (eq. 8; 0: no noise)")
    p.add_argument("--noise-mode", choices=["constant", "per-example"], default="constant",
                   help="constant sigma_flow (the paper), or sigma ~ U(0, sigma_flow) per image (RAE's ablation)")
    p.add_argument("--label-drop", type=float, default=0.1, help="probability of the null label (for CFG)")
    p.add_argument("--unconditional", action="store_true", help="train without class labels")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip (0: off)")
    p.add_argument("--ema", type=float, default=0.9999, help="EMA decay of the flow weights")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="autocast precision (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the flow")
    p.add_argument("--checkpoint-activations", action="store_true",
                   help="recompute Transformer layers in backward to save memory")
    p.add_argument("--grid-every", type=int, default=5000, help="steps between sample grids of the EMA flow (0: off)")
    p.add_argument("--sample-cfg", type=float, default=1.0, help="guidance scale of the sample grids")
    p.add_argument("--ckpt-every", type=int, default=0, help="steps between extra checkpoints (0: epoch ends only)")
    common.add_run_arguments(p)
    return p


def check_args(args):
    for name in ("epochs", "batch_size"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0 <= args.label_drop < 1:
        raise UserError(f"--label-drop must lie in [0, 1), got {args.label_drop}")
    if args.noise_std < 0:
        raise UserError(f"--noise-std must be >= 0, got {args.noise_std}")
    return args


if __name__ == "__main__":
    common.run_cli(main, build_parser().parse_args())
