"""Training-step throughput of both stages, as the scripts run them: steps/s, eager vs compile, fp32 vs bf16.

flow: one train_flow.py step: the frozen stage 1 makes eq. 8's z_c from images (E, norm, C_enc,
      norm2, under no_grad), then the flow's forward (eq. 9), backward, grad clip, AdamW, EMA.
src:  one train_src.py generator step (E frozen, eq. 7's noise, C_dec(C_enc), D, L1, backward,
      AdamW, EMA) with the GAN loss off, on with a fixed weight, or on with VQGAN's adaptive weight
      (two more backward passes through D to the last layer: the cost the issue asks about).
      LPIPS and the discriminator's own step are left out.
Run under torchrun to time DDP (gradients averaged over the ranks), as the scripts do:

    python bench/train_step.py                                   # small CPU-friendly sizes
    torchrun --nproc_per_node=2 bench/train_step.py --device cpu  # the same with DDP (gloo)
    python bench/train_step.py --device cuda --flow-model XXL --batch 32 --tokens 256 \\
        --encoder-width 768 --encoder-depth 12 --decoder-width 1152 --decoder-depth 28 --image-size 256

Prints one summary line and one JSON record per configuration (bf16 only where supported), rank 0.
"""

import argparse
import copy
import json
import os
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import losses  # noqa: E402
import rae  # noqa: E402
import train_src  # noqa: E402
from src import COMPRESSORS, SRC, Stage1  # noqa: E402
from tarflow import SIZES, TARFlow, nll_per_dim  # noqa: E402


def timed(step, warmup, iters, device):
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def wrap(module, device):
    """DDP as the scripts wrap their trained modules, when run under torchrun."""
    if not torch.distributed.is_initialized():
        return module
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None)


def frozen_rae(args, device):
    torch.manual_seed(0)
    grid = args.image_size // 16
    enc = rae.DINOv2(embed_dim=args.encoder_width, depth=args.encoder_depth,
                     num_heads=max(1, args.encoder_width // 64), num_registers=4, pos_grid=grid)
    dec = rae.RAEDecoder(in_dim=args.encoder_width, hidden=args.decoder_width, depth=args.decoder_depth,
                         num_heads=max(1, args.decoder_width // 72), mlp_dim=4 * args.decoder_width,
                         patch_size=16, num_patches=grid * grid)
    return rae.RAE(enc, dec, image_size=args.image_size).to(device).requires_grad_(False)


def flow_step_fn(args, device, precision, compile_, gan=None):
    model_rae = frozen_rae(args, device)
    depth = args.src_depth or 4
    stage1 = Stage1(model_rae, SRC(n=args.encoder_width, d=args.dim, depth=depth)).to(device)
    stage1.requires_grad_(False).eval()
    flow = TARFlow(in_channels=args.dim, num_tokens=model_rae.decoder.num_patches, num_classes=1000,
                   **SIZES[args.flow_model]).to(device)
    ema = copy.deepcopy(flow).requires_grad_(False)
    model = wrap(torch.compile(flow) if compile_ else flow, device)
    opt = torch.optim.AdamW(flow.parameters(), lr=1e-4, betas=(0.9, 0.999), fused=device.type == "cuda")
    x = torch.rand(args.batch, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 1001, (args.batch,), device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    raw_shape = (model_rae.decoder.num_patches, args.encoder_width)

    def step():
        eps = common.encoder_noise(gen, args.batch, raw_shape, 0, 1, device, 0.4, mode="constant")
        with common.autocast(device, precision):
            with torch.no_grad():
                z_c = stage1.encode(x, eps)  # eq. 8
            u, logdet = model(z_c.float(), y)
        loss = nll_per_dim(u, logdet).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flow.parameters(), 1.0)
        opt.step()
        common.update_ema(ema, flow, 0.9999)
    return step, sum(p.numel() for p in flow.parameters())


def src_step_fn(args, device, precision, compile_, gan="off"):
    model_rae = frozen_rae(args, device)
    C = train_src.build_compressor(args, args.encoder_width).to(device)
    C_ema = copy.deepcopy(C).requires_grad_(False)
    net = wrap(torch.compile(Stage1(model_rae, C)) if compile_ else Stage1(model_rae, C), device)
    opt = torch.optim.AdamW(C.parameters(), lr=2e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    disc = losses.PatchDiscriminator(16).to(device).requires_grad_(False) if gan != "off" else None
    x = torch.rand(args.batch, 3, args.image_size, args.image_size, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    raw_shape = (model_rae.decoder.num_patches, args.encoder_width)
    aug_draws = torch.rand(args.batch, 5, device=device)

    def step():
        eps = common.encoder_noise(gen, args.batch, raw_shape, 0, 1, device, 0.8, mode="per-example")
        with common.autocast(device, precision):
            with torch.no_grad():
                z_raw = model_rae.encode_raw(x).float()
            recon = net(z_raw, eps).float()  # eq. 7
            loss = (recon - x).abs().mean()
            if gan == "adaptive":  # VQGAN's weight: the two gradients at C_dec's last layer
                loss, _ = losses.generator_loss(recon, x, lpips=None, perceptual_weight=0, disc=disc,
                                                disc_weight=0.75, aug_draws=aug_draws, last_layer=C.last_layer())
            elif gan == "fixed":
                loss = loss - 0.75 * disc(losses.diff_augment(recon * 2 - 1, aug_draws)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        common.update_ema(C_ema, C, 0.9999)
    return step, sum(p.numel() for p in C.parameters())


def main(args):
    rank, world, device = common.setup_ddp(args.device)
    precisions = ["fp32"]
    if device.type == "cpu" or torch.cuda.is_bf16_supported():
        precisions.append("bf16")
    runs = []
    for stage in args.stages.split(","):
        for gan in (args.gan.split(",") if stage == "src" else [None]):
            for compile_ in ([False, True] if args.compile else [False]):
                runs += [(stage, gan, compile_, precision) for precision in precisions]
    for stage, gan, compile_, precision in runs:
        make = flow_step_fn if stage == "flow" else src_step_fn
        try:
            step, n_params = make(args, device, precision, compile_, gan)
            sec = timed(step, args.warmup, args.iters, device)
        except Exception as e:  # report and continue (e.g. compile unavailable)
            print(f"{stage} {precision} {gan}: failed ({type(e).__name__}: {e})")
            continue
        model = args.flow_model if stage == "flow" else f"{args.compressor} gan={gan}"
        rec = dict(bench="train_step", stage=stage, model=model, precision=precision, compile=compile_,
                   ranks=world, device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   batch_per_rank=args.batch, params=n_params, step_s=sec, steps_per_s=1 / sec,
                   images_per_s=world * args.batch / sec,
                   memory_gb=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)
        if rank == 0:
            mode = "compile" if compile_ else "eager"
            print(f"{stage:4s} {model:>18s} {precision} {mode} {world} rank(s) x batch {args.batch}: "
                  f"{rec['steps_per_s']:.2f} steps/s, {rec['images_per_s']:.1f} img/s")
            print(json.dumps(rec))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
    common.cleanup_ddp()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Training-step throughput of train_flow.py and train_src.py")
    p.add_argument("--stages", default="flow,src", help="comma list of stages to time: flow, src")
    p.add_argument("--gan", default="off,fixed,adaptive", help="src: GAN loss off, fixed or adaptive weight")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if any)")
    p.add_argument("--batch", type=int, default=8, help="batch size per rank")
    p.add_argument("--flow-model", default="tiny", help="flow size name (tarflow.SIZES)")
    p.add_argument("--dim", type=int, default=32, help="d, channels of z_c")
    p.add_argument("--image-size", type=int, default=64, help="image side (N = (side / 16)^2 tokens)")
    p.add_argument("--encoder-width", type=int, default=64, help="DINOv2 width n (random weights)")
    p.add_argument("--encoder-depth", type=int, default=2, help="DINOv2 depth")
    p.add_argument("--decoder-width", type=int, default=72, help="RAE decoder width")
    p.add_argument("--decoder-depth", type=int, default=2, help="RAE decoder depth")
    p.add_argument("--compressor", default="src", choices=list(COMPRESSORS), help="the trained compressor")
    p.add_argument("--src-dim", type=int, default=None, help="d (None: the kind's default)")
    p.add_argument("--src-depth", type=int, default=None, help="depth, for kinds that have one (SRC: 4)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps")
    p.add_argument("--iters", type=int, default=5, help="timed steps")
    main(p.parse_args())
