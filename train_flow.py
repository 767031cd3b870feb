"""Stage 2 of SRC-Flow: train the normalizing flow on the compact tokens (paper §3.4, §4.1).

    python train_flow.py --data /data/imagenet/train --stage1 runs/src/checkpoint.pt --out runs/flow
    torchrun --nproc_per_node=8 train_flow.py ...     # the same arguments on 8 GPUs

E, the RAE statistics, C_enc and norm2 come frozen from the stage-1 checkpoint. Each image becomes
eq. 8's z_c = norm2(C_enc(norm(E(x) + eps))), eps ~ N(0, 0.4^2 I) (src.Stage1.encode), and the
flow (SimFlow's deep-shallow XXL by default) is trained by maximum likelihood: eq. 9 divided by
N d is the logged `loss` (nats per dimension; `bpd` adds the Gaussian constant, in bits). Labels
become the flow's null label with probability 0.1, for classifier-free guidance. --batch-size is
the global batch. A step's randomness (flips, eps, label drops) is drawn for the global batch from
(seed, step) and each rank takes its rows: N processes follow one process's trajectory. Outputs
in --out: checkpoint.pt (what sample.py reads), log.jsonl, samples/*.png; under --fsdp also
shards-<step>/, the training state each rank wrote (checkpoint.pt names it; see write_checkpoint).
"""

import argparse
import os
import shutil
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

import common
from common import UserError
from rae import fingerprint
from src import load_stage1
from tarflow import SIZES, TARFlow, bits_per_dim, nll_per_dim

GRID_SAMPLES = 8
# --fsdp: the folders of sharded training state, shards-<step> (checkpoint.pt names the current)
SHARDS = "shards-"


# ---- The flow, its sharding and a step's randomness
def build_flow(args, stage1, num_classes, device):
    """The flow for z_c (B, N, d) of this stage 1, its EMA copy and AdamW (the paper's betas;
    fused on CUDA). Both are built on the meta device and sharded first under --fsdp, so that no
    rank ever holds a whole model; then each rank places its part on the device and draws the
    weights of TARFlow(...) for --seed (the same on every rank, whatever the sharding)."""
    config = dict(
        in_channels=stage1.C.d,
        num_tokens=stage1.rae.decoder.num_patches,
        num_classes=num_classes,
        **SIZES[args.model],
    )
    with torch.device("meta"):
        flow = TARFlow(**config)
        ema = TARFlow(**config).requires_grad_(False).eval()
    if args.fsdp:
        precision = common.precision_of(args.precision, device)
        shard(flow, device, precision=precision)
        # the grids sample the EMA under the same autocast: its layers gathered in bf16 give
        # the same numbers in half the memory
        shard(ema, device, precision=precision)
    flow.to_empty(device=device)
    ema.to_empty(device=device)
    # identical initial weights on every rank
    torch.manual_seed(args.seed)
    flow.init_weights()
    ema.set_orders(device)
    with torch.no_grad():
        for ema_param, param in zip(ema.parameters(), flow.parameters()):
            ema_param.copy_(param)
    opt = torch.optim.AdamW(
        flow.parameters(),
        lr=args.lr,
        betas=(0.9, 0.999),
        weight_decay=0.0,
        fused=device.type == "cuda",
    )
    return flow, ema, opt


def shard(flow, device, precision):
    """--fsdp (FSDP2), as torchtitan shards a Transformer: one unit per Transformer layer, one per
    flow block for the block's own weights (proj_in, pos_embed, class_embed, ada_out, proj_out),
    then the root. Parameters, gradients and AdamW state are split over the ranks; a unit's
    weights are gathered just before its forward and its backward, and freed after, so a rank
    holds about one layer gathered at a time (two while the next is prefetched in backward), and
    gathers overlap compute. The deep block's last layer and its head run last in the forward and
    first in the backward: they stay gathered in between (reshard_after_forward off).

    bf16 has the numerics of DDP under bf16 autocast. The layers' weights (all of them inputs of
    linears, which autocast casts to bf16) are gathered in bf16: the same numbers, half the
    traffic. The blocks' own weights are gathered in float32, so the position embedding enters the
    residual stream h in float32, and h stays float32 through every layer, as under autocast
    (gathered in bf16 too, the embeddings would make h bf16 from the first layer on). Gradients
    are reduced in float32, and no unit casts its inputs: the affine arithmetic of eq. 3 stays
    float32."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    exact = MixedPrecisionPolicy(cast_forward_inputs=False)
    layer_policy = exact
    if precision == "bf16":
        layer_policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16,
            reduce_dtype=torch.float32,
            cast_forward_inputs=False,
        )
    last = flow.blocks[-1]
    for block in flow.blocks:
        for layer in block.layers:
            fully_shard(
                layer,
                mesh=mesh,
                mp_policy=layer_policy,
                reshard_after_forward=layer is not last.layers[-1],
            )
        fully_shard(block, mesh=mesh, mp_policy=exact, reshard_after_forward=block is not last)
    fully_shard(flow, mesh=mesh, mp_policy=exact)


def wrap_ddp(model, world, device):
    """DDP for more than one process: gradients averaged in 100 MB buckets that are the
    parameters' .grad (no copies); the flow's buffers are constant, not broadcast."""
    if world == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return DDP(
        model,
        device_ids=ids,
        gradient_as_bucket_view=True,
        broadcast_buffers=False,
        bucket_cap_mb=100,
    )


def step_randomness(args, step, raw_shape, rank, world, device):
    """A step's flips, eq. 8's eps and label drops, drawn for the global batch from (seed, step):
    the same on every rank, whatever the number of ranks."""
    B = args.batch_size
    gen = common.step_generator(args.seed, step, common.STREAM_STEP, device)
    flip = common.global_rand(gen, B, (), rank, world, device) < 0.5
    eps = common.encoder_noise(
        gen,
        global_batch=B,
        shape=raw_shape,
        rank=rank,
        world=world,
        device=device,
        sigma=args.noise_std,
        mode=args.noise_mode,
    )
    drop = common.global_rand(gen, B, (), rank, world, device) < args.label_drop
    return flip, eps, drop


def main(args):
    # Setup DDP and precision
    check_args(args)
    rank, world, device = common.setup_ddp(args.device, args.dist_timeout, group=args.fsdp)
    master = rank == 0
    # bf16 on GPUs by default
    precision = common.precision_of(args.precision, device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    resume = common.resume_checkpoint(args, ckpt_path, "flow", build_parser())

    # The frozen stage 1: E, the RAE statistics, C_enc and norm2 (eq. 8)
    stage1 = load_stage1(args.stage1, device, encoder=args.encoder, decoder=args.decoder)
    image_size = stage1.image_size
    # what z_c is made with: E, D, the statistics, C and norm2 (a resumed run needs the same)
    stage1_print = fingerprint(stage1)
    # (N, n): the shape of E(x), of eq. 8's noise
    raw_shape = (stage1.rae.decoder.num_patches, stage1.rae.encoder.embed_dim)

    # Setup data
    dataset = common.training_set(args, image_size, rank, world)
    num_classes = 0 if args.unconditional else len(dataset.classes)
    if stage1.num_classes not in (None, len(dataset.classes)) and master:
        print(f"note: stage 1 saw {stage1.num_classes} classes, --data has "
              f"{len(dataset.classes)}", file=sys.stderr)
    sampler = common.EpochSampler(len(dataset), args.batch_size, rank, world, args.seed)
    loader = common.make_loader(dataset, sampler, args.num_workers)
    steps_per_epoch = sampler.steps_per_epoch
    total_steps = args.epochs * steps_per_epoch
    decay_epoch = args.decay_start_epoch
    # the paper's: constant for half the epochs, then cosine
    if decay_epoch is None:
        decay_epoch = args.epochs / 2
    decay_start = int(round(decay_epoch * steps_per_epoch))

    # Create the flow, its EMA and the optimiser; resume, then free what was read
    flow, ema, opt = build_flow(args, stage1, num_classes, device)
    if resume is not None:  # the flow and the stage 1 that the checkpoint holds, or an error
        common.check_built(ckpt_path, "flow_kind", resume["flow_kind"], TARFlow.__name__)
        common.check_built(ckpt_path, "flow_config", resume["flow_config"], flow.config())
        common.check_built(ckpt_path, "stage1", resume["stage1_fingerprint"], stage1_print)
    step = restore(resume, out=args.out, flow=flow, ema=ema, opt=opt, fsdp=args.fsdp)
    resumed = resume is not None
    # the checkpoint's mapping is released once nothing refers to it
    del resume
    for block in flow.blocks:
        block.checkpointing = args.checkpoint_activations
    # only rank 0 decodes (the sample grids): the others drop D's weights
    if not master:
        stage1.rae.decoder.to("meta")
    model = torch.compile(flow) if args.compile else flow
    # DDP averages the gradients (--fsdp shards the flow instead)
    if not args.fsdp:
        model = wrap_ddp(model, world, device)
    if master:
        os.makedirs(args.out, exist_ok=True)
        millions = sum(p.numel() for p in flow.parameters()) / 1e6
        print(f"flow {args.model}: {millions:.2f}M parameters, tokens {flow.num_tokens}x"
              f"{flow.in_channels}, {num_classes} classes; {len(dataset)} images, "
              f"{steps_per_epoch} steps/epoch x {args.epochs} epochs, global batch "
              f"{args.batch_size} on {world} ranks, {device}, {precision}")

    # Train: eq. 8's tokens, eq. 9's loss
    stop = min(args.max_steps or total_steps, total_steps)
    log = common.TrainLog(
        ["loss", "grad_norm"],
        out=args.out,
        step=step,
        total=total_steps,
        batch_size=args.batch_size,
        device=device,
        master=master,
        resumed=resumed,
        derive=lambda record: dict(bpd=bits_per_dim(record["loss"])),
        show=("loss", "bpd", "lr"),
    )
    flow.train()
    for epoch in range(step // steps_per_epoch, args.epochs):
        if step >= stop:
            break
        sampler.set_epoch(epoch, step - epoch * steps_per_epoch)
        for images, labels in loader:
            flip, eps, drop = step_randomness(args, step, raw_shape, rank, world, device)
            labels = labels.to(device, non_blocking=True)
            if num_classes:
                # dropped labels become the null label, for classifier-free guidance
                labels = torch.where(drop, flow.null_label, labels)
            else:
                labels = None

            # Forward, backward, update
            with common.autocast(device, precision):
                with torch.no_grad():
                    x = common.to_unit(images, device, flip)
                    z_c = stage1.encode(x, eps)  # eq. 8
                u, logdet = model(z_c.float(), labels)
            loss = nll_per_dim(u, logdet).mean()  # eq. 9 / (N d)
            lr = common.lr_schedule(step, 0, decay_start, total_steps, args.lr, args.min_lr)
            common.set_lr(opt, lr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            max_norm = args.grad_clip or float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(flow.parameters(), max_norm)
            # --fsdp: the norm over all shards
            if isinstance(grad_norm, DTensor):
                grad_norm = grad_norm.full_tensor()
            opt.step()
            common.update_ema(ema, flow, args.ema_decay)
            log.add(step, loss=loss, grad_norm=grad_norm)
            step += 1

            # Log (one host sync), grids, checkpoints
            at_epoch_end = step % steps_per_epoch == 0
            extra = args.ckpt_every and step % args.ckpt_every == 0
            ckpt_due = at_epoch_end or step >= stop or extra
            if step % args.log_every == 0 or ckpt_due:
                if not log.write(step, epoch=epoch, lr=lr):
                    # the loss became non-finite on some rank
                    common.cleanup_ddp()
                    sys.exit(3)
            grid_due = args.grid_every and (step % args.grid_every == 0 or step >= stop)
            if grid_due and (master or args.fsdp):
                path = None
                if master:
                    path = os.path.join(args.out, "samples", f"{step:07d}.png")
                sample_grid(
                    ema,
                    stage1,
                    guidance=args.sample_cfg,
                    seed=args.seed,
                    precision=precision,
                    path=path,
                )
            if ckpt_due:
                record = checkpoint_record(
                    args, step=step, flow=flow, num_classes=num_classes, image_size=image_size,
                    stage1_print=stage1_print, precision=precision, world=world,
                    steps_per_epoch=steps_per_epoch)
                # a collective under --fsdp: every rank writes its shards
                write_checkpoint(args.out, record, log=log, flow=flow, ema=ema, opt=opt,
                                 fsdp=args.fsdp)
            if step >= stop:
                break
    log.bar.close()
    if master:
        print(f"done: step {step}, checkpoint {ckpt_path}")
    common.cleanup_ddp()


# ---- Sample grids and checkpoints
@torch.no_grad()
def sample_grid(flow, stage1, guidance, seed, precision, path):
    """GRID_SAMPLES samples (eq. 10) from fixed prior noise, labels 0, 1, 2, ... (mod classes).
    Under --fsdp every rank runs the flow, one block at a time: TARFlow.reverse's loop written out
    with each block (its own weights and its layers') gathered whole for its token steps, then
    freed. Rank 0 (path not None) decodes."""
    shape = (GRID_SAMPLES, flow.num_tokens, flow.in_channels)
    gen = torch.Generator().manual_seed(seed)
    device = stage1.mean2.device
    u = torch.randn(shape, generator=gen).to(device)
    labels = None
    names = None
    if flow.num_classes:
        labels = torch.arange(GRID_SAMPLES) % flow.num_classes
        names = [str(int(c)) for c in labels]
        labels = labels.to(device)
    else:
        guidance = 0.0
    # as TARFlow.reverse: one batch [cond; null] when guided, the deep block inverted first
    labels = flow.check_labels(labels, GRID_SAMPLES, device, "reverse")
    if guidance > 0:
        labels = torch.cat([labels, torch.full_like(labels, flow.null_label)])
    with common.autocast(device, precision):
        caches = flow.new_caches(len(labels), device)
        z_c = u
        for block in reversed(flow.blocks):
            units = [m for m in block.modules() if isinstance(m, FSDPModule)]
            for unit in units:
                unit.unshard()
            z_c = block.reverse(z_c, labels, caches, guidance=guidance)
            for unit in units:
                unit.reshard()
    # not rank 0
    if path is None:
        return
    with common.autocast(device, precision):
        images = stage1.decode(z_c).float()
    common.save_grid(images, path, nrow=GRID_SAMPLES, labels=names)


def checkpoint_record(args, step, flow, num_classes, image_size, stage1_print, precision,
                      world, steps_per_epoch):
    """What checkpoint.pt holds besides the weights: the flow's kind and config() (so that a
    fork that swaps the flow reloads exactly what it saved, or fails loudly), RNG, and the
    stage-1 record sample.py needs (its path, the fingerprint of its weights and statistics,
    its noise)."""
    return dict(
        stage="flow",
        args=vars(args),
        step=step,
        epoch=step // steps_per_epoch,
        # the class built (FSDP wraps it in another)
        flow_kind=TARFlow.__name__,
        flow_config=flow.config(),
        rng=common.capture_rng(),
        stage1=os.path.abspath(args.stage1),
        stage1_fingerprint=stage1_print,
        noise_std=args.noise_std,
        noise_mode=args.noise_mode,
        num_classes=num_classes,
        image_size=image_size,
        precision=precision,
        world_size=world,
        steps_per_epoch=steps_per_epoch,
    )


def write_checkpoint(out, record, log, flow, ema, opt, fsdp):
    """out/checkpoint.pt: `record` and the weights. Without --fsdp rank 0 writes the flow's, the
    EMA's and AdamW's state dicts into it. Under --fsdp (a collective) each rank first writes its
    shards of the three into shards-<step>/ (save_shards); then checkpoint.pt gets the EMA
    gathered whole onto rank 0's host (what sample.py reads: no distributed code there) and the
    folder's name, and the previous folder goes. A killed save leaves the previous checkpoint.pt
    and the shards it names whole."""
    step = record["step"]
    if not fsdp:
        states = dict(flow=flow.state_dict(), flow_ema=ema.state_dict(),
                      optimizer=opt.state_dict())
        log.save(step, lambda: dict(record, **states))
        return
    shards = save_shards(out, step, flow=flow, ema=ema, opt=opt)
    # rank 0 gets the EMA (a quarter of the training state), the others an empty dict
    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
    ema_state = get_model_state_dict(ema, options=whole)
    try:
        log.save(step, lambda: dict(record, flow_ema=ema_state, shards=shards))
    except UserError:
        # a full disk: checkpoint.pt still names the previous shards
        shutil.rmtree(os.path.join(out, shards))
        raise
    if log.master:
        for name in os.listdir(out):
            if name.startswith(SHARDS) and name != shards:
                shutil.rmtree(os.path.join(out, name))


def save_shards(out, step, flow, ema, opt):
    """Each rank writes its shards of the flow, the EMA and AdamW's state (DCP: a file per rank
    and a .metadata index, readable on any number of ranks) into out/shards-<step>.tmp/, which
    rank 0 renames to shards-<step> once all are written; returns that name. A full disk on any
    rank is one line on every rank, after rank 0 removed the partial folder."""
    name = f"{SHARDS}{step:07d}"
    final = os.path.join(out, name)
    tmp = final + ".tmp"
    master = dist.get_rank() == 0
    if master:  # left by a killed save
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
    dist.barrier()
    flow_state, opt_state = get_state_dict(flow, opt)
    state = dict(flow=flow_state, flow_ema=get_model_state_dict(ema), optimizer=opt_state)
    try:
        dcp.save(state, storage_writer=FileSystemWriter(tmp))
    except CheckpointException as e:  # (raised on every rank)
        if master:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        errors = [error for error, _ in e.failures.values()]
        if not any(common.disk_full(error) for error in errors):
            raise RuntimeError(f"{tmp}: {errors[0]!r}") from None
        kept = "checkpoint.pt" if os.path.exists(os.path.join(out, "checkpoint.pt")) else None
        # a DTensor counts its global size: all the ranks' shards together
        raise UserError(common.no_space(final, common.tensor_bytes(state), kept=kept)) from None
    if master:
        os.replace(tmp, final)
        common.sync_folder(out)
    return name


def restore(resume, out, flow, ema, opt, fsdp):
    """Load a checkpoint's states (under --fsdp each rank reads its shards of the folder that
    checkpoint.pt names, on any number of ranks); returns its step. A fresh run (resume None)
    starts at step 0."""
    if resume is None:
        return 0
    if fsdp:
        folder = os.path.join(out, resume.get("shards") or "(none)")
        if not os.path.isdir(folder):
            raise UserError(f"--resume: {folder}: no such folder (the shards checkpoint.pt "
                            f"names)")
        flow_state, opt_state = get_state_dict(flow, opt)
        state = dict(flow=flow_state, flow_ema=get_model_state_dict(ema), optimizer=opt_state)
        dcp.load(state, checkpoint_id=folder)
        set_state_dict(flow, opt, model_state_dict=state["flow"],
                       optim_state_dict=state["optimizer"])
        set_model_state_dict(ema, state["flow_ema"])
    else:
        flow.load_state_dict(resume["flow"])
        ema.load_state_dict(resume["flow_ema"])
        opt.load_state_dict(resume["optimizer"])
    common.restore_rng(resume["rng"])
    return resume["step"]


# ---- Command line
def build_parser():
    p = argparse.ArgumentParser(description="Stage 2: train the flow on z_c (eq. 8, 9).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="training images, one folder per class")
    p.add_argument("--stage1", required=True, help="train_src.py's checkpoint")
    p.add_argument("--encoder", default=None, help="DINOv2 weights, if moved since stage 1")
    p.add_argument("--decoder", default=None, help="RAE decoder, if moved since stage 1")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", default="XXL", choices=list(SIZES),
                   help="flow size (XXL: width 1152, depths 2,2,2,2,2,46: 1.36B)")
    p.add_argument("--epochs", type=int, default=320, help="training epochs")
    p.add_argument("--batch-size", type=int, default=256, help="the GLOBAL batch (all ranks)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW lr (betas 0.9, 0.999)")
    p.add_argument("--min-lr", type=float, default=1e-6, help="lr at the cosine's end")
    p.add_argument("--decay-start-epoch", type=float, default=None, help="default: epochs / 2")
    p.add_argument("--noise-std", type=float, default=0.4, help="sigma_flow of eq. 8 (0: none)")
    p.add_argument("--noise-mode", choices=list(common.NOISE_MODES), default="constant",
                   help="constant sigma_flow (the paper) or ~ U(0, sigma_flow) per image")
    p.add_argument("--label-drop", type=float, default=0.1, help="null-label rate (for CFG)")
    p.add_argument("--unconditional", action="store_true", help="train without labels")
    p.add_argument("--grad-clip", type=float, default=1.0, help="grad-norm clip (0: off)")
    p.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay (the paper's)")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="default: bf16 on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the flow")
    p.add_argument("--fsdp", action="store_true",
                   help="shard weights, gradients, optimizer and EMA over the ranks (FSDP2)")
    p.add_argument("--checkpoint-activations", action="store_true", help="recompute in backward")
    p.add_argument("--grid-every", type=int, default=5000, help="steps between sample grids")
    p.add_argument("--sample-cfg", type=float, default=1.0, help="the grids' guidance")
    p.add_argument("--ckpt-every", type=int, default=0, help="steps between checkpoints")
    common.add_run_arguments(p)
    return p


def check_args(args):
    """One-line errors for settings that cannot run, before any file is read."""
    for name in ("epochs", "batch_size"):
        if getattr(args, name) <= 0:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} must be positive, got {getattr(args, name)}")
    if not 0 <= args.label_drop < 1:
        raise UserError(f"--label-drop must lie in [0, 1), got {args.label_drop}")
    if not args.sample_cfg >= 0:
        raise UserError(f"--sample-cfg must be >= 0, got {args.sample_cfg}")
    if args.noise_std < 0:
        raise UserError(f"--noise-std must be >= 0, got {args.noise_std}")
    return args


if __name__ == "__main__":
    common.run_cli(main, build_parser().parse_args())
