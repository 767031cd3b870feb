"""The evaluation jobs around fid.py: rFID inputs (eq. 7) and the guidance sweep (eq. 10).

    torchrun --nproc_per_node=8 evaluate.py --reconstruct /data/imagenet/val \\
        --stage1 runs/src/checkpoint.pt --out recon
    torchrun --nproc_per_node=8 evaluate.py --cfg-sweep 1,2,3 --guide-blocks all,deep \\
        --ckpt runs/flow/checkpoint.pt --ref VIRTUAL_imagenet256_labeled.npz \\
        --fid-weights pt_inception-2015-12-05-6726825d.pth --out sweep --num-samples 10000

--reconstruct DIR --stage1 CKPT --out OUT: the images (ADM's centre crop) and their eq. 7
reconstructions (--recon-rae: the RAE's own, without the compressor; --recon-noise: noise of that
std on E(x)) as OUT/originals.npz and OUT/recon.npz, for fid.py's rFID; OUT/grid.png shows the
first pairs. No flow is needed.

--cfg-sweep W1,W2,... --ref REF --fid-weights FILE: samples every setting (w, and the lists of
--guide-blocks, --score-step and --guidance-rule) with sample.py's sample_images into
OUT/cfg-<w>[-deep][-score<g>][-rule<name>]/ (setting_name) and scores it against REF with fid.py
(FID, sFID, IS, precision, recall); OUT/sweep.json.

One mode per run.
"""

import argparse
import inspect
import os

import numpy as np
import torch

import common
import fid
import sample
from common import UserError
from src import Stage1

INCEPTION = "pt_inception-2015-12-05-6726825d.pth"


@torch.no_grad()
def main(args):
    """--reconstruct or --cfg-sweep. An error on one rank ends that process at once (no barrier
    on the way out): torchrun then stops the other ranks, so a failure never hangs the job."""
    settings = check_args(args)
    # Set up torchrun; reconstructions in fp32 unless --precision asks otherwise, the sweep
    # samples as sample.py does (bf16 autocast on CUDA by default)
    rank, world, device = common.setup_ddp(args.device)
    flag = args.precision
    if args.reconstruct is not None and flag is None:
        flag = "fp32"
    precision = common.precision_of(flag, device)
    dtype = torch.float64 if precision == "fp64" else torch.float32
    args.batch_size = args.batch_size or sample.BATCH_SIZE[device.type]
    job = sample.Job(rank=rank, world=world, device=device, dtype=dtype, precision=precision,
                     progress=rank == 0 and not args.no_progress)
    if args.reconstruct is not None:
        stage1 = sample.load_stage1_of(args, job)
        with common.autocast(device, precision):
            reconstruct(stage1, args, job)
    else:
        # as sample.py: the models, the class plan, then each setting into its folder
        flow, _, stage1 = sample.load_models(args, job)
        guided = any(s["guidance"] or s["score_step"] for s in settings)
        if guided and not flow.num_classes:
            raise UserError("guidance and --score-step need a conditional flow")
        if precision == "bf16":
            flow.cast_linears(torch.bfloat16)  # the same samples, no cast per token step
        classes = sample.parse_classes(args.classes, flow.num_classes)
        plan = sample.class_plan(args.num_samples, flow.num_classes, classes, seed=args.seed)
        sweep(flow, stage1, plan, settings, args, job)
    common.cleanup_ddp()


def reconstruct(stage1, args, job):
    """originals.npz and recon.npz of a folder (ADM's npz, uint8 NHWC) for rFID."""
    size = stage1.image_size
    _, n, batches = sample.folder_batches(args.reconstruct, size, args, job)
    os.makedirs(args.out, exist_ok=True)
    pairs = []
    for idx, x in batches:
        z_raw = stage1.encode_raw(x)
        if args.recon_noise > 0:
            eps = sample.encoder_noise_of(args.seed, idx, z_raw.shape[1:],
                                          sigma=args.recon_noise, stream=(common.STREAM_RECON,))
            z_raw = z_raw + eps.to(x)
        # eq. 7, or the RAE's own round trip without the compressor
        if args.recon_rae:
            recon = stage1.rae.decode(stage1.rae.normalize(z_raw))
        else:
            recon = stage1(z_raw)
        sample.check_finite(recon, idx, "reconstructions")
        pairs.append(np.stack([sample.to_uint8(x), sample.to_uint8(recon)], axis=1))
    # (n, 2, S, S, 3): each original beside its reconstruction
    pairs = sample.gather_rows(pairs, (2, size, size, 3), n, job, args.out)
    if job.rank > 0:
        return
    paths = [os.path.join(args.out, f"{k}.npz") for k in ("originals", "recon")]
    for k, path in enumerate(paths):
        common.atomic_write(path, lambda f: np.savez(f, arr_0=pairs[:, k]))
    sample.save_columns(pairs[:sample.GRID_PAIRS], os.path.join(args.out, "grid.png"),
                        "originals / reconstructions")
    rfid = f"python fid.py {paths[0]} {paths[1]} --weights {INCEPTION}"
    print(f"wrote {n} image pairs; rFID: {rfid}")


def sweep(flow, stage1, plan, settings, args, job):
    """Sample every setting into its folder --out/setting_name(setting)/ and score it against
    --ref with fid.py (on every rank, as fid.py asks); rank 0 writes sweep.json."""
    model = fid.load_inception(args.fid_weights).to(job.device)
    kwargs = dict(batch_size=args.batch_size, device=job.device, progress=job.progress)
    # a folder --ref gets ADM's centre crop to the samples' size
    ref = fid.load_features(args.ref, model, image_size=stage1.image_size, **kwargs)
    table = []
    names = []
    for s in settings:
        name = setting_name(s)
        out = os.path.join(args.out, name)
        path = sample.sample_images(flow, stage1, out, plan, s, args, job)
        res = fid.evaluate(ref, path, model, **kwargs)
        table.append(dict(**s, samples=path, **res))
        names.append(name)
        if job.rank == 0:
            scores = ", ".join(f"{k} {v:.4g}" for k, v in res.items())
            print(f"{name}: {scores}")
    if job.rank == 0:
        k = int(np.argmin([r["fid"] for r in table]))
        print(f"best: {names[k]} (FID {table[k]['fid']:.3f})")
        record = dict(ref=args.ref, num=args.num_samples, seed=args.seed, results=table)
        common.save_json(record, os.path.join(args.out, "sweep.json"))


# A sweep folder's name part of a setting's key (-deep, -score0.5); other keys: the key itself
NAME_PREFIX = {"guide_blocks": "", "score_step": "score"}


def setting_name(setting):
    """A sweep folder: cfg-<w>, then -<prefix><value> for every other key of the setting whose
    value differs from Stage1.generate's default (-deep, -score<g>, -rule<name>, a fork's key
    too)."""
    defaults = inspect.signature(Stage1.generate).parameters
    name = f"cfg-{setting['guidance']:g}"
    for key, value in setting.items():
        if key == "guidance" or value == defaults[key].default:
            continue
        text = f"{value:g}" if isinstance(value, float) else str(value)
        name += f"-{NAME_PREFIX.get(key, key)}{text}"
    return name


# ---- Command line
def check_args(args):
    """One-line errors for flags wrong before any model loads; the sweep's settings."""
    if (args.reconstruct is None) == (args.cfg_sweep is None):
        raise UserError("evaluate.py: exactly one of --reconstruct, --cfg-sweep")
    sample.check_positive(args, ("--num-samples", "--batch-size"))
    sample.floats(str(args.recon_noise), "--recon-noise")
    if args.out is None:
        raise UserError("--out: the output folder is needed")
    if args.reconstruct is not None:
        if args.ckpt is None and args.stage1 is None:
            raise UserError("--reconstruct needs --stage1 (or --ckpt)")
        return []
    settings = sample.guidance_settings(args.cfg_sweep, args.guide_blocks, args.score_step,
                                        args.guidance_rule, w_flag="--cfg-sweep")
    names = [setting_name(s) for s in settings]
    for k, name in enumerate(names):
        if name in names[:k]:
            raise UserError(f"--cfg-sweep: two settings would share the folder {name}")
    for flag, path in (("--ref", args.ref), ("--fid-weights", args.fid_weights)):
        if not (path and os.path.exists(path)):
            raise UserError(f"--cfg-sweep needs an existing {flag}, got {path}")
    if args.ckpt is None:
        raise UserError("--ckpt: a train_flow.py checkpoint is needed")
    if args.class_names and not os.path.isfile(args.class_names):
        raise UserError(f"--class-names {args.class_names}: no such file")
    return settings


def build_parser():
    """The flags; the README's commands and the tests use their names and defaults."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sample.add_model_arguments(p)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp64"],
                   help="None: fp32; --cfg-sweep on CUDA: bf16 autocast")
    p.add_argument("--reconstruct", help="rFID inputs of these images")
    p.add_argument("--recon-rae", action="store_true", help="the RAE alone")
    p.add_argument("--recon-noise", type=float, default=0.0, help="noise std on E(x)")
    p.add_argument("--limit", type=int, default=0, help="first N images (0: all)")
    p.add_argument("--cfg-sweep", help="w list to sample and score")
    p.add_argument("--guide-blocks", default="all",
                   help="all, deep (STARFlow's guide_top) or both: all,deep")
    p.add_argument("--score-step", default="0", help="SimFlow's score step list (0: off)")
    p.add_argument("--guidance-rule", default="starflow",
                   help="tarflow.GUIDANCE_RULES list: starflow,<a fork's rule>")
    p.add_argument("--ref", help="FID reference (.npz or folder)")
    p.add_argument("--fid-weights", help="fid.py's Inception weights")
    sample.add_sampling_arguments(p)
    return p


if __name__ == "__main__":
    common.run_cli(main, build_parser().parse_args())
