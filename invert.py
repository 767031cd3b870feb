"""The flow's other direction on real images: u = f(z_c), data -> prior (eq. 2, 5, 8).

    python invert.py --ckpt runs/flow/checkpoint.pt --nll /data/imagenet/val --nll-json nll.json
    torchrun --nproc_per_node=8 invert.py --ckpt runs/flow/checkpoint.pt --invert DIR --out inv
    python invert.py --ckpt runs/flow/checkpoint.pt --interpolate 0 1 --latents inv/latents.npz \\
        --label a --cfg 2 --out interp

--nll DIR: -log p(z_c | label) / (N d ln 2) per image (eq. 2), "noisy" (eq. 8, the training
objective on held-out data, over --nll-draws draws) and "clean" (eq. 5). Densities of continuous
features: they can be negative, and are not comparable with bits/dim of pixels. --nll-json FILE
also writes the per-image values as a CSV beside it, and a grid (.png) of the most and least
likely images.

--invert DIR --out OUT: each image's prior point u = f(z_c) (clean z_c, eq. 5, under its class
folder's label or --uncond's null label) and back, f^{-1}(u) (guidance 0: the exact inverse).
OUT/latents.npz holds u, z_c, labels, paths and error = max |f^{-1}(u) - z_c| per image;
OUT/grid.png the originals, their reconstructions D(z_c) and D(f^{-1}(u)). A round trip worse
than --invert-tol (default ROUND_TRIP_TOL) stops with one line naming the images.

--interpolate A B --out OUT: A and B are image files of the stage-1 size (a file is not cropped)
or, with --latents OUT/latents.npz, indices into an --invert result. Their prior points under one
label (--label) are joined by slerp() and decoded (eq. 10) without and with --cfg guidance:
OUT/interpolation.png, a row per setting, and interpolation.npz.

One mode per run, in fp32 or fp64 (--precision): exact values, no bf16.
"""

import argparse
import csv
import math
import os

import numpy as np
import torch
from PIL import Image

import common
import sample
from common import UserError
from tarflow import bits_per_dim, nll_per_dim

# --invert: the largest round-trip error max |f^{-1}(f(z_c)) - z_c| accepted per image, by
# precision. Measured in float32: up to 1.2e-5 (random-weight flows of 4 to 256 tokens, the
# demo's flow); in float64: 1e-14. More means a broken inverse or an unstable flow.
ROUND_TRIP_TOL = {torch.float32: 1e-3, torch.float64: 1e-8}
# slerp(): below this sin(theta) two points count as parallel
SLERP_EPS = 1e-6


@torch.no_grad()
def main(args):
    """One of --nll, --invert, --interpolate. An error on one rank ends that process at once
    (no barrier on the way out): torchrun then stops the other ranks."""
    setting = check_args(args)
    # Set up torchrun; float32 (or --precision fp64) weights, no autocast: exact values
    rank, world, device = common.setup_ddp(args.device)
    dtype = torch.float64 if args.precision == "fp64" else torch.float32
    args.batch_size = args.batch_size or sample.BATCH_SIZE[device.type]
    job = sample.Job(rank=rank, world=world, device=device, dtype=dtype,
                     precision=args.precision, progress=rank == 0 and not args.no_progress)
    flow, record, stage1 = sample.load_models(args, job)
    if args.nll is not None:
        evaluate_nll(flow, record, stage1, args, job)
    elif args.invert is not None:
        invert(flow, stage1, args, job)
    else:
        interpolate(flow, stage1, setting, args, job)
    common.cleanup_ddp()


# ---- The exact likelihood (eq. 2), the inverse and paths in the prior
def evaluate_nll(flow, record, stage1, args, job):
    """The exact NLL of a folder in bits per compact dimension, noisy (eq. 8) and clean (eq. 5);
    rank 0 prints it and writes --nll-json."""
    data, n, batches = sample.folder_batches(args.nll, stage1.image_size, args, job)
    uncond = args.uncond or not flow.num_classes
    labels = folder_labels(data, n, flow, args, "--nll")
    # the noise the flow was trained with (eq. 8): a mode this code knows, or an error
    mode = common.check_noise_mode(record["noise_mode"], where=f"{args.ckpt} (its noise_mode)")
    sigma = float(record["noise_std"])
    draws = args.nll_draws

    def bits(z_c, y):
        """-log p(z_c | y) / (N d ln 2): eq. 2 through eq. 9 and its constant."""
        u, logdet = flow(z_c, y if flow.num_classes else None)
        return bits_per_dim(nll_per_dim(u, logdet)).double()

    rows = []
    for idx, x in batches:
        y = labels[idx].to(job.device)
        # E(x) once for every draw; clean: eq. 5, noisy: eq. 8 averaged over the draws
        z_raw = stage1.encode_raw(x)
        clean = bits(stage1.compact(z_raw), y)
        noisy = 0
        for k in range(draws):
            eps = sample.encoder_noise_of(args.seed, idx, z_raw.shape[1:], sigma=sigma,
                                          mode=mode, stream=(common.STREAM_NLL, k))
            noisy = noisy + bits(stage1.compact(z_raw, eps.to(x)), y)
        noisy = noisy / draws
        rows.extend(zip(idx.tolist(), clean.tolist(), noisy.tolist()))
    rows = sorted(sum(common.all_gather(rows), []))
    if job.rank > 0:
        return
    _, clean, noisy = zip(*rows)
    dims = flow.num_tokens * flow.in_channels
    noisy_bpd, noisy_sem = mean_sem(noisy)
    clean_bpd, clean_sem = mean_sem(clean)
    kind = "null label" if uncond else "conditional"
    print(f"NLL of {len(rows)} images in {args.nll} ({kind}), bits/dim (N*d={dims}):")
    print(f"  noisy (eq. 8, {draws} draws): {noisy_bpd:.4f} +- {noisy_sem:.4f}")
    print(f"  clean (eq. 5): {clean_bpd:.4f} +- {clean_sem:.4f}")
    if args.nll_json:
        per_image = [dict(path=data.samples[i][0], clean=c, noisy=v) for i, c, v in rows]
        res = dict(folder=args.nll, num_images=len(rows), conditional=not uncond,
                   noise_std=sigma, noise_mode=mode, noise_draws=draws, dims=dims,
                   nll_bpd_noisy=noisy_bpd, nll_bpd_noisy_sem=noisy_sem,
                   nll_bpd_clean=clean_bpd, nll_bpd_clean_sem=clean_sem,
                   per_image=per_image)
        common.save_json(res, args.nll_json)
        write_nll_table(rows, data, args)


def invert(flow, stage1, args, job):
    """--invert: each image's prior point u = f(z_c), z_c clean (eq. 5) under its label
    (folder_labels), and the round trip f^{-1}(u) (guidance 0: the exact inverse). Rank 0
    writes latents.npz and grid.png; a round trip worse than the tolerance stops the run."""
    data, n, batches = sample.folder_batches(args.invert, stage1.image_size, args, job)
    labels = folder_labels(data, n, flow, args, "--invert")
    tol = args.invert_tol
    if tol is None:
        tol = ROUND_TRIP_TOL[job.dtype]
    latents = []
    errors = []
    tiles = []
    for idx, x in batches:
        y = labels[idx].to(job.device)
        z_c = stage1.compact(stage1.encode_raw(x))
        u, _ = flow(z_c, y)
        z_back = flow.reverse(u, y)
        error = (z_back - z_c).flatten(1).abs().amax(1).cpu()
        far = ~(error <= tol)  # nan too
        if far.any():
            paths = [data.samples[i][0] for i in idx[far.numpy()]]
            raise UserError(f"round trip off by {error.max():.2g} > "
                            f"--invert-tol {tol:g} for {len(paths)} "
                            f"images: {', '.join(paths[:3])}")
        errors.append(error.double().numpy())
        latents.append(torch.stack([u, z_c], 1).cpu().numpy())
        # grid.png shows the first images; idx ascends, so they open the batch
        shown = int((idx < sample.GRID_PAIRS).sum())
        if shown:
            rows = [x, stage1.decode(z_c[:shown]), stage1.decode(z_back[:shown])]
            tiles.append(np.stack([sample.to_uint8(r[:shown]) for r in rows], 1))
    size = stage1.image_size
    shape = (2, flow.num_tokens, flow.in_channels)
    latents = sample.gather_rows(latents, shape, n, job, args.out)
    errors = sample.gather_rows(errors, (), n, job, args.out)
    num_tiles = min(sample.GRID_PAIRS, n)
    tiles = sample.gather_rows(tiles, (3, size, size, 3), num_tiles, job, args.out)
    if job.rank > 0:
        return
    paths = np.array([path for path, _ in data.samples[:n]])
    arrays = dict(u=latents[:, 0], z_c=latents[:, 1], paths=paths,
                  labels=labels.numpy(), error=errors)
    npz = os.path.join(args.out, "latents.npz")
    common.atomic_write(npz, lambda f: np.savez(f, **arrays))
    title = "originals / D(z_c) / D(f^-1(f(z_c)))"
    sample.save_columns(tiles, os.path.join(args.out, "grid.png"), title)
    dtype = str(job.dtype).replace("torch.", "")
    print(f"round trip f^-1(f(z_c)) of {n} images ({dtype}): max error "
          f"{errors.max():.2e} (tolerance {tol:g}); wrote {npz}")


def interpolate(flow, stage1, setting, args, job):
    """--interpolate A B: the prior points u = f(z_c) of A and B under one label (--label), the
    slerp() path of --steps points between them, decoded (eq. 10) without guidance, so that its
    ends are A's and B's own decodings D(z_c), and with `setting` when it guides. Rank 0 writes
    interpolation.png (a row per setting) and interpolation.npz (images, t, guidance)."""
    z_c, own = endpoints(stage1, args, job)
    label = path_label(args.label, own, flow)
    u, _ = flow(z_c, torch.full((2,), label, device=job.device))
    t = torch.linspace(0, 1, args.steps, dtype=job.dtype)
    t = t.to(job.device)
    path = slerp(u[0], u[1], t)
    labels = torch.full((args.steps,), label, device=job.device)
    settings = [dict(setting, guidance=0.0, score_step=0.0)]
    if setting["guidance"] or setting["score_step"]:
        settings.append(setting)
    rows = []
    for s in settings:
        images = stage1.generate(flow, path, labels, **s)
        sample.check_finite(images, np.arange(args.steps), "path images")
        rows.append(sample.to_uint8(images))
    if job.rank > 0:
        return
    guidance = [s["guidance"] for s in settings]
    names = [f"w={w:g}" for w in guidance]
    tile_labels = [names[r] if k == 0 else None
                   for r in range(len(rows)) for k in range(args.steps)]
    ends = " -> ".join(os.path.basename(e) for e in args.interpolate)
    title = f"slerp {ends}, label {args.label}"
    path_png = os.path.join(args.out, "interpolation.png")
    sample.save_columns(np.stack(rows, 1), path_png, title, tile_labels)
    arrays = dict(images=np.stack(rows), t=t.cpu().numpy(), guidance=guidance)
    npz = os.path.join(args.out, "interpolation.npz")
    common.atomic_write(npz, lambda f: np.savez(f, **arrays))
    print(f"wrote {path_png} ({len(rows)} x {args.steps} images)")


def slerp(a, b, t):
    """Spherical interpolation between prior points a and b (each one vector, of any shape) at
    the fractions t (T,) -> (T, *a.shape). The direction follows the great circle,

        a^ = a / |a|,  theta = angle(a^, b^),
        dir(t) = (sin((1 - t) theta) a^ + sin(t theta) b^) / sin(theta),

    and the norm goes linearly from |a| to |b|, so it stays constant between equal norms. A
    Gaussian vector of D dimensions has a norm near sqrt(D); the straight line between two
    independent ones passes at sqrt(D / 2) midway, where the prior has no mass. Nearly parallel
    points (sin(theta) < SLERP_EPS) take the weights' limit, 1 - t and t."""
    t = t[:, None]  # (T, 1)
    a_dir = a.flatten() / a.norm()
    b_dir = b.flatten() / b.norm()
    # Kahan's form of the angle: accurate for nearly parallel points too
    theta = 2 * torch.atan2((a_dir - b_dir).norm(), (a_dir + b_dir).norm())
    weight_a = 1 - t
    weight_b = t
    if torch.sin(theta) >= SLERP_EPS:
        weight_a = torch.sin((1 - t) * theta) / torch.sin(theta)
        weight_b = torch.sin(t * theta) / torch.sin(theta)
    norm = (1 - t) * a.norm() + t * b.norm()
    path = norm * (weight_a * a_dir + weight_b * b_dir)
    return path.view(len(t), *a.shape)


# ---- Labels, image files and tables
def folder_labels(data, n, flow, args, flag):
    """The label of each of a folder's first n images: its class folder's (sorted, as in
    training), or flow.null_label with --uncond or an unconditional flow."""
    uncond = args.uncond or not flow.num_classes
    classes = len(data.classes)
    if not uncond and classes != flow.num_classes:
        raise UserError(f"{flag}: {classes} class folders, the flow has "
                        f"{flow.num_classes} classes (or pass --uncond)")
    labels = [flow.null_label if uncond else y for _, y in data.samples[:n]]
    return torch.tensor(labels)


def write_nll_table(rows, data, args):
    """Beside --nll-json: its per-image values as a CSV (path, clean, noisy) and a grid of the
    most likely (top row) and least likely (bottom row) images by the clean NLL (eq. 5: no noise
    draw, a fixed order): the first outlier detector of a flow. rows: (index, clean, noisy)."""
    stem = os.path.splitext(args.nll_json)[0]
    table = [[data.samples[i][0], c, v] for i, c, v in rows]

    def write(f):
        out = csv.writer(f, lineterminator="\n")
        out.writerow(["path", "clean", "noisy"])
        out.writerows(table)
    common.atomic_write(stem + ".csv", write, mode="w")
    ranked = np.argsort([c for _, c, _ in rows], kind="stable")
    k = min(sample.GRID_PAIRS, len(rows))
    shown = np.concatenate([ranked[:k], ranked[::-1][:k]])
    tiles = torch.stack([data[i][0] for i in shown]) / 255
    labels = [f"{rows[i][1]:.2f}" for i in shown]
    title = "most likely / least likely (clean bits/dim)"
    common.save_grid(tiles, stem + ".png", nrow=k, labels=labels, title=title)


def mean_sem(values):
    """The mean and its standard error (nan below two values), as floats."""
    sem = math.nan
    if len(values) > 1:
        sem = float(np.std(values, ddof=1) / math.sqrt(len(values)))
    return float(np.mean(values)), sem


def read_file(path, size):
    """An --interpolate image file as uint8 (3, S, S). It must be S x S, the stage-1 size: a
    folder's images get ADM's centre crop, a single file is taken exactly as it is."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        with Image.open(path) as im:
            rgb = np.array(im.convert("RGB"))
    except OSError as e:  # PIL: not an image, truncated
        raise UserError(f"{path}: unreadable image ({e})") from None
    found = f"{rgb.shape[1]}x{rgb.shape[0]}"
    if found != f"{size}x{size}":
        raise UserError(f"{path}: {found} pixels, expected the stage-1 size {size}x{size}")
    return torch.from_numpy(rgb).permute(2, 0, 1)


def endpoints(stage1, args, job):
    """z_c (2, N, d) of --interpolate's A and B (clean, eq. 5) and their labels: those that
    --latents recorded for its indices, None for image files."""
    if not args.latents:
        x = [read_file(path, stage1.image_size) for path in args.interpolate]
        x = torch.stack(x).to(job.device, job.dtype) / 255
        return stage1.compact(stage1.encode_raw(x)), None
    with np.load(args.latents) as f:
        z_c = f["z_c"]
        labels = f["labels"]
    idx = [int(i) for i in args.interpolate if i.isdigit()]
    if len(idx) < 2 or max(idx) >= len(z_c):
        got = " ".join(args.interpolate)
        raise UserError(f"--interpolate {got}: expected indices 0..{len(z_c) - 1} into --latents")
    return torch.from_numpy(z_c[idx]).to(job.device, job.dtype), labels[idx]


def path_label(text, own, flow):
    """--label: 'a' or 'b' (that endpoint's label in --latents), 'null' (flow.null_label) or a
    class index."""
    if text == "null":
        return flow.null_label
    if text in ("a", "b") and own is not None:
        return int(own["ab".index(text)])
    if text.isdigit() and int(text) < flow.num_classes:
        return int(text)
    raise UserError(f"--label {text}: expected null, a class below "
                    f"{flow.num_classes}, or a, b with --latents "
                    f"(files have no label)")


# ---- Command line
def check_args(args):
    """One-line errors for flags wrong before any model loads; --interpolate's setting."""
    modes = [args.nll is not None, args.invert is not None, args.interpolate is not None]
    if sum(modes) != 1:
        raise UserError("invert.py: exactly one of --nll, --invert, --interpolate")
    sample.check_positive(args, ("--batch-size", "--nll-draws", "--steps"))
    setting = sample.guidance_setting(args)
    if args.ckpt is None:
        raise UserError("--ckpt: a train_flow.py checkpoint is needed")
    if args.out is None and args.nll is None:
        raise UserError("--out: needed except with --nll")
    if args.latents and not os.path.isfile(args.latents):
        raise UserError(f"--latents {args.latents}: no such file (--invert's latents.npz)")
    if args.precision not in ("fp32", "fp64"):
        raise UserError(f"--precision {args.precision}: fp32 or fp64 only "
                        f"(exact likelihoods and inverses)")
    return setting


def build_parser():
    """The flags; the README's commands and the tests use their names and defaults."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sample.add_model_arguments(p)
    p.add_argument("--precision", default="fp32", help="fp32 or fp64")
    p.add_argument("--uncond", action="store_true", help="the null label for every image")
    p.add_argument("--limit", type=int, default=0, help="first N images (0: all)")
    p.add_argument("--nll", help="exact NLL of these images")
    p.add_argument("--nll-draws", type=int, default=4, help="noise draws per image")
    p.add_argument("--nll-json", help="also write the NLL here")
    p.add_argument("--invert", help="u = f(z_c) of these images")
    p.add_argument("--invert-tol", type=float,
                   help="round-trip tolerance; None: 1e-3 in fp32, 1e-8 in fp64")
    p.add_argument("--interpolate", nargs=2, metavar=("A", "B"),
                   help="slerp between two images in the prior")
    p.add_argument("--latents", help="--invert's latents.npz")
    p.add_argument("--label", default="null", help="a, b, null or a class")
    p.add_argument("--steps", type=int, default=8, help="points on the path")
    p.add_argument("--cfg", type=float, default=0.0, help="--interpolate's guidance w")
    p.add_argument("--guide-blocks", default="all",
                   help="all: every block; deep: the deep one only (STARFlow's guide_top)")
    p.add_argument("--score-step", default="0", help="SimFlow's score step (0: off)")
    p.add_argument("--guidance-rule", default="starflow",
                   help="--interpolate's rule (tarflow.GUIDANCE_RULES)")
    return p


if __name__ == "__main__":
    common.run_cli(main, build_parser().parse_args())
