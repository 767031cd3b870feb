"""Sampling speed of TARFlow.reverse (KV caches, batched CFG) against a naive reference.

    python bench/sampling.py                                  # CPU, small realistic config, CFG 1.5
    python bench/sampling.py --device cuda --dtype bfloat16 --width 1152 --head-dim 72 \\
        --depths 2,2,2,2,2,46 --batch 64                       # paper-size flow (XXL) on a GPU

The naive reference lives here, not in tarflow.py: it samples the same weights the way
ml-tarflow does, growing each key/value cache by concatenation every step, recomputing the
class modulation every step and running the conditional and null-label passes of CFG one
after the other (in every block, or with --guide-blocks deep in the deep block only), their
Gaussians combined by the rule's formula in tests/reference.py (REFERENCE_RULES). Both paths
run in the same process on the same prior noise; their outputs are compared. Prints one summary
line and one JSON record. On CUDA it also prints the floor of a token step: bytes of
weights and caches read over the measured copy bandwidth, and FLOPs over the measured bf16
matmul rate.
"""

import argparse
import json
import math
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tarflow import GUIDANCE_RULES, GUIDE_BLOCKS, TARFlow, modulate  # noqa: E402
from tests.reference import reference_rule  # noqa: E402


# ----------------------------------------------------------------------------- naive reference

def naive_block_params(block, x_t, t, c, caches):
    """One step of one conditioning pass: token t (B, 1, d) -> (mu, alpha) of token t + 1, caches grown by cat."""
    h = block.proj_in(x_t.to(block.proj_in.weight.dtype)) + block.pos_embed[t]
    for layer, cache in zip(block.layers, caches):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = layer.modulation(c)  # every step
        a = layer.attn
        B = h.shape[0]
        qkv = a.qkv(modulate(layer.norm1(h), shift_msa, scale_msa))
        q, k, v = qkv.view(B, 1, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        cache['k'] = k if cache['k'] is None else torch.cat([cache['k'], k], dim=2)
        cache['v'] = v if cache['v'] is None else torch.cat([cache['v'], v], dim=2)
        o = F.scaled_dot_product_attention(q, cache['k'], cache['v'])
        h = h + gate_msa * a.proj(o.transpose(1, 2).reshape(B, 1, -1))
        h = h + gate_mlp * layer.mlp(modulate(layer.norm2(h), shift_mlp, scale_mlp))
    shift, scale = block.ada_out(c).unsqueeze(1).chunk(2, dim=-1)
    out = block.proj_out(modulate(block.norm(h), shift, scale))
    return out[:, 0].to(x_t.dtype).chunk(2, dim=-1)


@torch.no_grad()
def naive_reverse(flow, z, y, w, guide_blocks='all', rule='starflow'):
    x = z.to(torch.promote_types(z.dtype, torch.float32))
    combine = reference_rule(rule)  # tests/reference.py: (mu_c, sigma_c, mu_u, sigma_u, w)
    null = torch.full_like(y, flow.null_label)
    for k, block in enumerate(reversed(flow.blocks)):
        wk = w if k == 0 or guide_blocks == 'all' else 0.0  # 'deep': only the first block run is guided
        u = block.permute(x)  # natural order -> the block's reading order
        x = u.clone()
        passes = [(F.silu(block.class_embed(y)), [dict(k=None, v=None) for _ in block.layers])]
        if wk > 0:
            passes.append((F.silu(block.class_embed(null)), [dict(k=None, v=None) for _ in block.layers]))
        for t in range(u.shape[1] - 1):
            outs = [naive_block_params(block, x[:, t:t + 1], t, c, caches) for c, caches in passes]
            mu, alpha = outs[0]
            sigma = alpha.exp()
            if wk > 0:
                mu_u, alpha_u = outs[1]
                mu, sigma = combine(mu, sigma, mu_u, alpha_u.exp(), wk)
            x[:, t + 1] = u[:, t + 1] * sigma + mu
        x = block.permute(x, inverse=True)
    return x


# ----------------------------------------------------------------------------- measurements

def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fn, device, repeats):
    """Best wall time of `repeats` runs after one warm-up run; returns (seconds, last output)."""
    out = fn()
    best = math.inf
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def token_step_cost(flow, batch, cfg, bytes_per_el):
    """Average bytes read and FLOPs of one token step of one block (weights + KV-cache prefix)."""
    C, N, d = flow.channels, flow.num_tokens, flow.in_channels
    hidden = int(C * flow.mlp_ratio)
    Bp = batch * (2 if cfg else 1)
    total_bytes = total_flops = 0
    for L in flow.depths:
        weights = L * (4 * C * C + 2 * C * hidden) + d * C + C * 2 * d
        cache = L * 2 * Bp * C * (N / 2)  # keys + values, average prefix length N / 2
        total_bytes += (weights + cache) * bytes_per_el
        total_flops += 2 * Bp * weights + L * 4 * Bp * C * (N / 2)
    return total_bytes / len(flow.depths), total_flops / len(flow.depths)


def measure_floor_rates(device):
    """Copy bandwidth (bytes/s, read + write) and bf16 matmul rate (FLOP/s) on this GPU."""
    a = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    t, _ = timed(lambda: b.copy_(a), device, 5)
    bandwidth = 2 * a.numel() / t
    m = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    t, _ = timed(lambda: m @ m, device, 5)
    return bandwidth, 2 * 8192**3 / t


# ----------------------------------------------------------------------------- main

def main(args):
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    depths = [int(v) for v in args.depths.split(',')]
    dtype = {'float32': torch.float32, 'float64': torch.float64, 'bfloat16': torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    flow = TARFlow(args.channels, args.tokens, args.width, depths, head_dim=args.head_dim,
                   num_classes=args.num_classes)
    with torch.no_grad():  # non-trivial weights, so both paths really compute something
        for block in flow.blocks:
            for m in [block.ada_out, block.proj_out] + [layer.ada for layer in block.layers]:
                m.weight.normal_(0, 0.02)
    # frozen as sample.py holds it (autocast re-casts frozen weights per call; sample.py casts
    # the Linear weights to bf16 once, as here, to avoid that)
    flow = flow.to(device, torch.float64 if dtype == torch.float64 else torch.float32).eval()
    flow.requires_grad_(False)
    if dtype == torch.bfloat16:
        flow.cast_linears(torch.bfloat16)
    if args.compile:
        for block in flow.blocks:
            block.step = torch.compile(block.step, dynamic=True)
    z = torch.randn(args.batch, args.tokens, args.channels, device=device,
                    dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    y = torch.randint(0, args.num_classes, (args.batch,), device=device) if args.num_classes else None
    if args.cfg > 0 and y is None:
        raise ValueError("--cfg needs --num-classes > 0")
    y_naive = y if y is not None else torch.full((args.batch,), flow.null_label, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def fast():
        with autocast:
            return flow.reverse(z, y, guidance=args.cfg, guide_blocks=args.guide_blocks,
                                rule=args.guidance_rule)

    def naive():
        with autocast:
            return naive_reverse(flow, z, y_naive, args.cfg, args.guide_blocks, args.guidance_rule)

    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    t_fast, x_fast = timed(fast, device, args.repeats)
    mem_fast = torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else None
    t_naive, x_naive = timed(naive, device, args.repeats) if not args.skip_naive else (math.nan, x_fast)
    steps = len(depths) * (args.tokens - 1)
    rec = dict(
        device=str(device), dtype=args.dtype, compile=args.compile, width=args.width, depths=depths,
        head_dim=args.head_dim, tokens=args.tokens, channels=args.channels, batch=args.batch, cfg=args.cfg,
        guide_blocks=args.guide_blocks, guidance_rule=args.guidance_rule,
        threads=torch.get_num_threads(),
        fast_s=t_fast, fast_images_per_s=args.batch / t_fast, fast_ms_per_token_step=1e3 * t_fast / steps,
        naive_s=t_naive, naive_images_per_s=args.batch / t_naive, naive_ms_per_token_step=1e3 * t_naive / steps,
        speedup=t_naive / t_fast, max_abs_diff=(x_fast - x_naive).abs().max().item(),
    )
    if device.type == 'cuda':
        rec['peak_mem_fast_bytes'] = mem_fast
        rec['peak_mem_bytes'] = torch.cuda.max_memory_allocated(device)
        bandwidth, flops_rate = measure_floor_rates(device)
        nbytes, flops = token_step_cost(flow, args.batch, args.cfg > 0, 2 if dtype == torch.bfloat16 else 4)
        rec.update(copy_bandwidth_GBps=bandwidth / 1e9, bf16_matmul_TFLOPs=flops_rate / 1e12,
                   floor_ms_per_token_step_memory=1e3 * nbytes / bandwidth,
                   floor_ms_per_token_step_flops=1e3 * flops / flops_rate)
    else:
        rec['peak_rss_bytes'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mem = rec['peak_mem_fast_bytes'] if device.type == 'cuda' else rec['peak_rss_bytes']
    print(f"sampling {args.device} {args.dtype} width {args.width} depths {args.depths} N={args.tokens} "
          f"d={args.channels} B={args.batch} cfg={args.cfg}: fast {rec['fast_images_per_s']:.2f} img/s "
          f"({rec['fast_ms_per_token_step']:.3f} ms/token step), naive {rec['naive_images_per_s']:.2f} img/s "
          f"({rec['naive_ms_per_token_step']:.3f} ms/token step), speedup {rec['speedup']:.2f}x, "
          f"max|diff| {rec['max_abs_diff']:.2e}, peak mem {mem / 2**20:.0f} MiB"
          + (f", floor {max(rec['floor_ms_per_token_step_memory'], rec['floor_ms_per_token_step_flops']):.3f} "
             f"ms/token step" if device.type == 'cuda' else ''))
    print(json.dumps(rec))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--width', type=int, default=256, help='Transformer width (channels of the flow)')
    p.add_argument('--head-dim', type=int, default=64)
    p.add_argument('--depths', default='2,2,2,2,2,4', help='layers per block, comma separated')
    p.add_argument('--tokens', type=int, default=256, help='N tokens per sample')
    p.add_argument('--channels', type=int, default=32, help='d channels per token')
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--cfg', type=float, default=1.5, help='guidance weight w (0: no CFG)')
    p.add_argument('--guide-blocks', default='all', choices=GUIDE_BLOCKS, help='CFG in every block or the deep one')
    p.add_argument('--guidance-rule', default='starflow', choices=list(GUIDANCE_RULES),
                   help='a name in tarflow.GUIDANCE_RULES')
    p.add_argument('--num-classes', type=int, default=1000)
    p.add_argument('--device', default='cpu')
    p.add_argument('--dtype', default=None, choices=['float32', 'bfloat16', 'float64'],
                   help='bfloat16 = bf16 autocast (default on CUDA), float32 default on CPU')
    p.add_argument('--compile', action='store_true', help='torch.compile each block step')
    p.add_argument('--repeats', type=int, default=1, help='timed runs after one warm-up (best is kept)')
    p.add_argument('--skip-naive', action='store_true')
    p.add_argument('--threads', type=int, default=0, help='CPU threads (0: torch default)')
    args = p.parse_args(argv)
    args.dtype = args.dtype or ('bfloat16' if args.device.startswith('cuda') else 'float32')
    return args


if __name__ == '__main__':
    args = parse_args()
    try:
        main(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
