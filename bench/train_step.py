"""Training-step throughput of both stages: steps/s and tokens/s, eager vs torch.compile, fp32 vs bf16.

flow: one train_flow.py step on compact tokens (B, N, d) (forward eq. 9, backward, grad clip,
      fused AdamW on CUDA, EMA), the frozen encoder excluded (it is measured by the src stage).
src:  one train_src.py generator step without LPIPS/GAN (E frozen, eq. 7 noise, C_dec(C_enc), D, L1,
      backward, AdamW, EMA) for --compressor at the given size, with a frozen D of --decoder-* size.

    python bench/train_step.py                                   # small CPU-friendly sizes
    python bench/train_step.py --device cuda --flow-model XXL --batch 64 --tokens 256 \\
        --encoder-width 768 --encoder-depth 12 --decoder-width 1152 --decoder-depth 28 --image-size 256

Prints one summary line and one JSON record per configuration (bf16 only where supported).
"""

import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import train_src  # noqa: E402
from src import Stage1  # noqa: E402
from tarflow import nll_per_dim  # noqa: E402


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


def flow_step_fn(args, device, precision, compile_):
    from tarflow import SIZES, TARFlow
    torch.manual_seed(0)
    flow = TARFlow(in_channels=args.dim, num_tokens=args.tokens, num_classes=1000, **SIZES[args.flow_model]).to(device)
    ema = copy.deepcopy(flow).requires_grad_(False)
    model = torch.compile(flow) if compile_ else flow
    opt = torch.optim.AdamW(flow.parameters(), lr=1e-4, betas=(0.9, 0.999), fused=device.type == "cuda")
    zc = torch.randn(args.batch, args.tokens, args.dim, device=device)
    y = torch.randint(0, 1001, (args.batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            z, logdet = model(zc, y)
        loss = nll_per_dim(z, logdet).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flow.parameters(), 1.0)
        opt.step()
        common.update_ema(ema, flow, 0.9999)
    return step, sum(p.numel() for p in flow.parameters())


def src_step_fn(args, device, precision, compile_):
    import rae
    torch.manual_seed(0)
    grid = args.image_size // 16
    enc = rae.DINOv2(embed_dim=args.encoder_width, depth=args.encoder_depth, num_heads=max(1, args.encoder_width // 64),
                     num_registers=4, pos_grid=grid)
    dec = rae.RAEDecoder(in_dim=args.encoder_width, hidden=args.decoder_width, depth=args.decoder_depth,
                         num_heads=max(1, args.decoder_width // 72), mlp_dim=4 * args.decoder_width,
                         patch_size=16, num_patches=grid * grid)
    model_rae = rae.RAE(enc, dec, image_size=args.image_size).to(device)
    model_rae.requires_grad_(False)
    C = train_src.build_compressor(args, args.encoder_width).to(device)
    C_ema = copy.deepcopy(C).requires_grad_(False)
    net = Stage1(model_rae, C).to(device)  # its forward is eq. 7
    fwd = torch.compile(net) if compile_ else net
    opt = torch.optim.AdamW(C.parameters(), lr=2e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    x = torch.rand(args.batch, 3, args.image_size, args.image_size, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    raw_shape = (grid * grid, args.encoder_width)

    def step():
        eps = common.encoder_noise(gen, args.batch, raw_shape, 0, 1, device, 0.8, per_example=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            with torch.no_grad():
                z_raw = model_rae.encode_raw(x).float()
            loss = (fwd(z_raw + eps).float() - x).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        common.update_ema(C_ema, C, 0.9999)
    return step, sum(p.numel() for p in C.parameters())


def main(args):
    device = torch.device(args.device)
    precisions = ["fp32"]
    if device.type == "cpu" or torch.cuda.is_bf16_supported():
        precisions.append("bf16")
    tokens_src = (args.image_size // 16) ** 2
    for stage in args.stages.split(","):
        for compile_ in ([False, True] if args.compile else [False]):
            for precision in precisions:
                make = flow_step_fn if stage == "flow" else src_step_fn
                try:
                    step, n_params = make(args, device, precision, compile_)
                    sec = timed(step, args.warmup, args.iters, device)
                except Exception as e:  # report and continue (e.g. compile unavailable)
                    print(f"{stage} {precision} {'compile' if compile_ else 'eager'}: failed ({type(e).__name__}: {e})")
                    continue
                n_tok = args.batch * (args.tokens if stage == "flow" else tokens_src)
                rec = dict(bench="train_step", stage=stage, precision=precision, compile=compile_,
                           device=str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
                           batch=args.batch, tokens_per_example=n_tok // args.batch, params=n_params,
                           model=args.flow_model if stage == "flow" else
                           f"{args.compressor} n={args.encoder_width} d={args.src_dim} L={args.src_depth}",
                           step_s=sec, steps_per_s=1 / sec, tokens_per_s=n_tok / sec, images_per_s=args.batch / sec,
                           memory_gb=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)
                mode = "compile" if compile_ else "eager  "
                print(f"{stage:4s} {rec['model']:>22s} {precision} {mode} batch {args.batch}: {rec['steps_per_s']:.2f} "
                      f"steps/s, {rec['tokens_per_s']:.0f} tokens/s, {rec['images_per_s']:.1f} img/s")
                print(json.dumps(rec))
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Training-step throughput of train_flow.py and train_src.py")
    p.add_argument("--stages", default="flow,src", help="comma list of stages to time: flow, src")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--batch", type=int, default=8, help="batch size per step")
    p.add_argument("--flow-model", default="tiny", help="flow size name (tarflow.SIZES)")
    p.add_argument("--tokens", type=int, default=64, help="flow: tokens per example (N)")
    p.add_argument("--dim", type=int, default=32, help="flow: channels per token (d)")
    p.add_argument("--image-size", type=int, default=64, help="src: image side")
    p.add_argument("--encoder-width", type=int, default=64, help="src: DINOv2 width n (random weights)")
    p.add_argument("--encoder-depth", type=int, default=2, help="src: DINOv2 depth")
    p.add_argument("--decoder-width", type=int, default=72, help="src: RAE decoder width")
    p.add_argument("--decoder-depth", type=int, default=2, help="src: RAE decoder depth")
    p.add_argument("--compressor", default="src", choices=["src", "linear"], help="src: the trained compressor")
    p.add_argument("--src-dim", type=int, default=32, help="src: d")
    p.add_argument("--src-depth", type=int, default=4, help="src: L")
    p.add_argument("--compile", action="store_true", help="also time torch.compile")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps")
    p.add_argument("--iters", type=int, default=5, help="timed steps")
    main(p.parse_args())
