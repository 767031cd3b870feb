"""Stage 1 of SRC-Flow: train the Semantic Representation Compressor with a frozen RAE (§3.4).

    python train_src.py --data /data/imagenet/train --out runs/src \\
        --encoder dinov2_vitb14_reg4_pretrain.pth --decoder ViTXL_n08/model.pt \\
        --lpips-vgg vgg16-397923af.pth --lpips-lin vgg.pth \\
        --disc-encoder dino_deitsmall8_pretrain.pth
    torchrun --nproc_per_node=8 train_src.py ...      # the same arguments on 8 GPUs

E and D stay frozen; C = (C_enc, C_dec) learns eq. 7's reconstruction with RAE's per-example
noise on the raw encoder output (eps ~ N(0, sigma^2 I), sigma ~ U(0, 0.8)) under the RAE
decoder's objective (losses.py): L1 + LPIPS + a hinge GAN loss with VQGAN's adaptive weight.
Each step of main's loop updates C (and D), then the discriminator. Whenever the run stops, the
compact statistics norm2 of eq. 5 are measured with the EMA C and stored: the checkpoint is all
stage 2 needs. --compressor picks a row of Table 5 from src.COMPRESSORS; one without parameters
(pca, identity) trains nothing: only the statistics are computed (and pca fitted); --train-decoder
trains D too (toy runs). A flag the chosen set-up does not use is refused, and so is a --resume
that does not rebuild what its checkpoint records. Where the paper defers to RAE (bytetriper/RAE,
src/train_stage1.py), the defaults are RAE's: its EMA decay, its random crop without flips
(--crop center: ADM's crop with flips), its DINO discriminator. --batch-size is the global
batch. A step's randomness is drawn for the global batch from (seed, step), an image's crop from
(seed, epoch, index), and the adaptive weight uses rank-averaged gradients: N processes follow
one process's trajectory. Outputs in --out: checkpoint.pt, log.jsonl, recon/*.png (inputs above
the EMA's reconstructions).
"""

import argparse
import copy
import functools
import inspect
import os
import sys

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import common
import losses
from common import UserError
from rae import RAE, STATS_EPS, RAEDecoder, fingerprint, load_dinov2, load_rae_decoder
from src import COMPRESSORS, Stage1

LOG_KEYS = ("loss", "l1", "lpips", "gan", "adaptive_weight", "disc_loss", "grad_norm")
# training images shown above their EMA reconstructions in recon/*.png
GRID_IMAGES = 8
# RAE's stage-1 EMA (configs/stage1/training/DINOv2-B_decXL.yaml); the flow's 0.9999 is the paper's
EMA_DECAY = 0.9978
# DiffAug's uniforms per image: translation (2), brightness, saturation, contrast
DIFFAUG_PARAMS = 5
# the flags that reach the compressor: flag -> its constructor's argument; a kind without that
# argument refuses the flag (identity has no d), a flag not given leaves the kind's default
COMPRESSOR_FLAGS = {"src_dim": "d", "src_depth": "depth"}


# ---- The models, the optimisers and a step's randomness
def build_decoder(args, encoder):
    """D: built from --decoder-* to be trained (--train-decoder, RAE's patch 16), or the released
    one, frozen, whose patch size and token count come from its file."""
    if args.train_decoder:
        grid = args.image_size // 16
        return RAEDecoder(
            in_dim=encoder.embed_dim,
            hidden=args.decoder_width,
            depth=args.decoder_depth,
            num_heads=args.decoder_heads or 16,
            mlp_dim=args.decoder_mlp,
            patch_size=16,
            num_patches=grid * grid,
        )
    decoder = load_rae_decoder(args.decoder, num_heads=args.decoder_heads)
    if decoder.num_patches * decoder.patch_size ** 2 != args.image_size ** 2:
        raise UserError(f"--decoder {args.decoder}: makes {decoder.num_patches} patches of "
                        f"{decoder.patch_size} px, not {args.image_size} px images")
    return decoder


def compressor_arguments(args):
    """The constructor arguments of --compressor given by COMPRESSOR_FLAGS; a flag given to a
    kind whose constructor lacks its argument is a one-line error."""
    params = inspect.signature(COMPRESSORS[args.compressor]).parameters
    kwargs = {}
    for key, name in COMPRESSOR_FLAGS.items():
        value = getattr(args, key)
        if value is None:
            continue
        if name not in params:
            raise UserError(f"--{key.replace('_', '-')}: compressor '{args.compressor}' has no "
                            f"{name} (its arguments: {', '.join(params)})")
        kwargs[name] = value
    return kwargs


def build_compressor(args, n):
    """C (eq. 4) of --compressor for RAE tokens of width n, its other arguments the flags'
    (compressor_arguments) or the kind's defaults."""
    try:
        return COMPRESSORS[args.compressor](n=n, **compressor_arguments(args))
    except ValueError as e:  # a size the constructor refuses, e.g. --src-depth -1
        raise UserError(f"--compressor {args.compressor}: {e}") from None


def create_models(args, device):
    """E and D (frozen unless --train-decoder) in the RAE of eq. 1, and C (eq. 4), with the same
    initial weights on every rank. Returns (rae, C, trains, prints): whether anything trains
    (pca and identity have no parameters: without --train-decoder nothing does) and the
    fingerprints of E's and a released D's weights as read (stage 2 refuses other weights of
    these shapes)."""
    torch.manual_seed(args.seed)
    encoder = load_dinov2(args.encoder)
    decoder = build_decoder(args, encoder)
    C = build_compressor(args, encoder.embed_dim).to(device)
    rae = RAE(encoder, decoder, image_size=args.image_size).to(device)
    decoder.requires_grad_(args.train_decoder)
    trains = args.train_decoder or len(list(C.parameters())) > 0
    encoder_print = fingerprint(encoder)
    decoder_print = None if args.train_decoder else fingerprint(decoder)
    return rae, C, trains, (encoder_print, decoder_print)


def gan_last_layer(args, rae, C, trains):
    """The weight at which the GAN loss's adaptive weight compares the gradients: the last layer
    trained (D's decoder_pred with --train-decoder, else C.last_layer()). A run whose GAN would
    find none is refused now, not when the GAN starts (epoch --disc-start)."""
    if args.train_decoder:
        return rae.decoder.decoder_pred.weight
    layer = C.last_layer()
    if layer is None and trains and args.disc_weight > 0:
        raise UserError(f"--compressor {C.kind}: its last_layer() is None, and the GAN loss's "
                        f"adaptive weight needs one; give --disc-weight 0 or --train-decoder")
    return layer


def build_losses(args, trains, device):
    """LPIPS, the discriminator (None where their weight is 0, or where nothing trains) and its
    trainable parameters (a DINO discriminator's backbone stays frozen), their files read now
    (a missing one is refused first)."""
    lpips = None
    disc = None
    if not trains:
        return lpips, disc, []
    if args.perceptual_weight > 0 and not (args.lpips_vgg and args.lpips_lin):
        raise UserError(f"--perceptual-weight {args.perceptual_weight} needs --lpips-vgg "
                        f"({losses.VGG16_URL}) and --lpips-lin ({losses.LPIPS_LIN_URL}), or 0")
    if args.disc_weight > 0 and args.disc == "dino" and not args.disc_encoder:
        raise UserError(f"--disc dino needs --disc-encoder ({losses.DINO_S8_URL}); or use "
                        f"--disc patch (no weights) or --disc-weight 0")
    if args.perceptual_weight > 0:
        lpips = losses.load_lpips(args.lpips_vgg, args.lpips_lin).to(device)
    if args.disc_weight > 0 and args.disc == "dino":
        backbone = losses.load_dino_backbone(args.disc_encoder)
        disc = losses.DINODiscriminator(backbone).to(device)
    elif args.disc_weight > 0:
        disc = losses.PatchDiscriminator(args.disc_width).to(device)
    disc_params = []
    if disc is not None:
        disc_params = [p for p in disc.parameters() if p.requires_grad]
    return lpips, disc, disc_params


def ema_copies(args, rae, C, rae_stats, device):
    """The EMA copies of C and (with --train-decoder) D, and the Stage1 that holds them."""
    C_ema = copy.deepcopy(C).requires_grad_(False).eval()
    D_ema = rae.decoder
    if args.train_decoder:
        D_ema = copy.deepcopy(rae.decoder).requires_grad_(False).eval()
    rae_ema = RAE(rae.encoder, D_ema, image_size=args.image_size)
    rae_ema.set_stats(rae_stats["mean"], rae_stats["var"])
    return C_ema, D_ema, Stage1(rae_ema, C_ema).to(device)


def adamw(params, args, device):
    """RAE's optimiser, for C (and D) and for the discriminator; None without parameters."""
    if not params:
        return None
    return torch.optim.AdamW(
        params,
        lr=args.lr,
        betas=(0.9, 0.95),
        weight_decay=0.0,
        fused=device.type == "cuda",
    )


def wrap_ddp(module, world, device):
    """DDP for more than one process (None stays None). The statistics are equal on every rank:
    not synced."""
    if world == 1 or module is None:
        return module
    ids = [device.index] if device.type == "cuda" else None
    return DDP(module, device_ids=ids, forward_sync_buffers=False)


def gan_steps(args, steps_per_epoch, stop, disc):
    """The step the GAN loss starts training C from (--disc-start) and the step the
    discriminator starts training from (--disc-upd-start): both flags count epochs, so the steps
    are said once (with a discriminator)."""
    gan_from_step = args.disc_start * steps_per_epoch
    disc_from_step = args.disc_upd_start * steps_per_epoch
    if disc is not None:
        late = " (not in this run)" if gan_from_step >= stop else ""
        print0(f"GAN: the discriminator trains from step {disc_from_step}, its loss trains C "
               f"from step {gan_from_step}{late}")
    return gan_from_step, disc_from_step


def step_randomness(args, step, raw_shape, rank, world, device):
    """A step's flips, eq. 7's eps and three DiffAug draws (the generator's, the fake and the real
    images'), drawn for the global batch from (seed, step): the same on every rank."""
    B = args.batch_size
    gen = common.step_generator(args.seed, step, common.STREAM_STEP, device)
    flip = common.global_rand(gen, B, (), rank, world, device) < 0.5
    # RAE's stage 1 does not flip; drawn all the same, so that eps does not change
    if args.crop == "random":
        flip = None
    eps = common.encoder_noise(
        gen,
        global_batch=B,
        shape=raw_shape,
        rank=rank,
        world=world,
        device=device,
        sigma=args.noise_max,
        mode="per-example",
    )
    aug_draws = []
    for _ in range(3):
        aug_draws.append(common.global_rand(gen, B, (DIFFAUG_PARAMS,), rank, world, device))
    return flip, eps, aug_draws


def train_discriminator(disc, params, on):
    """Switch the discriminator's trainable parameters (not its frozen backbone) and its mode."""
    for p in params:
        p.requires_grad_(on)
    if disc is not None:
        disc.train(on)


# ---- The statistics of eq. 1 and eq. 5
def image_batches(dataset, args, rank, world, device):
    """This rank's share of the first --stats-images (0: all) training images in [0, 1], by
    index: ADM's centre crops, unflipped, whatever --crop is. Eq. 1's statistics are RAE's
    (its calculate_stat.py crops so) and norm2 is over the features stage 2 sees."""
    end = min(args.stats_images or len(dataset), len(dataset))
    part = torch.utils.data.Subset(dataset, range(rank, end, world))
    loader = torch.utils.data.DataLoader(
        part,
        batch_size=args.batch_size // world,
        num_workers=args.num_workers,
    )
    for images, _ in loader:
        yield common.to_unit(images, device)


def set_statistics(args, rae, C, resume, batches, device):
    """The RAE statistics of eq. 1: RAE's stat.pt (--rae-stats), a resumed run's or measured over
    the training images (the paper); a fitted compressor (pca) is fitted to the normalized
    tokens' mean and covariance."""
    if args.rae_stats:
        rae.load_stats(args.rae_stats)
    elif resume is not None:
        # measured in that run, not again; copied: nothing keeps the checkpoint's mapping alive
        stats = resume["rae_stats"]
        rae.set_stats(stats["mean"].clone(), stats["var"].clone())
    else:
        print0("computing the RAE statistics (eq. 1) over the training images")
        rae.set_stats(*common.channel_stats(batches(), rae.encode_raw, device))
    if hasattr(C, "fit") and resume is None:
        C.fit(*common.channel_stats(batches(), rae.encode, device, covariance=True))
        explained = getattr(C, "explained", float("nan"))
        print0(f"{C.kind} fitted: {C.d} of {C.n} directions explain {explained:.1%}")
    return dict(mean=rae.mean.cpu().clone(), var=rae.var.cpu().clone())


def check_resumed(ckpt_path, resume, rae, C, prints, rae_stats):
    """A resumed run (resume not None) must have rebuilt what its checkpoint records, else one
    line names the first key that differs: C's kind and config(), E's and D's config() and the
    fingerprints of E's and a released D's weights (the flags were compared already; this
    catches a fork that changed a default in code), and the RAE statistics of eq. 1."""
    if resume is None:
        return
    built = dict(
        encoder=dict(config=rae.encoder.config(), fingerprint=prints[0]),
        decoder=dict(config=rae.decoder.config(), fingerprint=prints[1]),
        compressor=dict(kind=C.kind, config=C.config()),
    )
    for part, fields in built.items():
        recorded = {key: resume[part][key] for key in fields}
        common.check_built(ckpt_path, part, recorded, fields)
    for key in ("mean", "var"):
        if not torch.equal(resume["rae_stats"][key], rae_stats[key]):
            raise UserError(f"--resume {ckpt_path}: rae_stats.{key} (eq. 1) differs from "
                            f"that run's")


def measure_norm2(stage1_ema, batches, device, precision):
    """Eq. 5's norm2: the channel mean and variance of C_enc(norm(E(x))) with the EMA C, and the
    eps its standardisation adds to the variance (as eq. 1's)."""
    print0("computing the compact statistics norm2 (eq. 5) with the EMA compressor")
    with common.autocast(device, precision):
        mean2, var2 = common.channel_stats(batches, stage1_ema.encode, device)
    return dict(mean=mean2.cpu(), var=var2.cpu(), eps=STATS_EPS)


def main(args):
    # Setup DDP, precision and the run folder
    check_args(args)
    rank, world, device = common.setup_ddp(args.device, args.dist_timeout)
    master = rank == 0
    # bf16 on GPUs by default, as stage 2
    precision = common.precision_of(args.precision, device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    resume = common.resume_checkpoint(args, ckpt_path, "src", build_parser())

    # Setup data
    dataset = common.training_set(args, args.image_size, rank, world, crop=args.crop,
                                  seed=args.seed)
    sampler = common.EpochSampler(len(dataset), args.batch_size, rank, world, args.seed)
    loader = common.make_loader(dataset, sampler, args.num_workers)
    steps_per_epoch = sampler.steps_per_epoch
    total_steps = args.epochs * steps_per_epoch

    # batches(): the first --stats-images training images, for the statistics
    batches = functools.partial(image_batches, dataset, args, rank, world, device)

    # Create E, D (frozen unless --train-decoder), C and the loss networks: every file read now
    rae, C, trains, prints = create_models(args, device)
    last_layer = gan_last_layer(args, rae, C, trains)  # for the GAN loss's adaptive weight
    lpips, disc, disc_params = build_losses(args, trains, device)

    # The statistics of eq. 1 (and the PCA fit), checked on resume; the EMA copies of C and D
    rae_stats = set_statistics(args, rae, C, resume, batches, device)
    check_resumed(ckpt_path, resume, rae=rae, C=C, prints=prints, rae_stats=rae_stats)
    C_ema, D_ema, stage1_ema = ema_copies(args, rae, C, rae_stats, device)

    # The trained path (its forward is eq. 7), the optimisers; resume
    model = Stage1(rae, C).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(trainable, args, device)
    disc_opt = adamw(disc_params, args, device)
    disc_net = wrap_ddp(disc, world, device)
    step, norm2 = resume_from(resume, C=C, C_ema=C_ema, decoder=rae.decoder, D_ema=D_ema,
                              opt=opt, disc=disc, disc_opt=disc_opt)
    resumed = resume is not None
    del resume  # the checkpoint's mapping is released once nothing refers to it

    # what checkpoint.pt holds now (built on rank 0 only)
    def record():
        return checkpoint_record(
            args, step=step, world=world, steps_per_epoch=steps_per_epoch,
            num_classes=len(dataset.classes), rae=rae, C=C, C_ema=C_ema, D_ema=D_ema, opt=opt,
            disc=disc, disc_opt=disc_opt, rae_stats=rae_stats, norm2=norm2, prints=prints)

    os.makedirs(args.out, exist_ok=True)
    print_run(args, C=C, trainable=trainable, images=len(dataset), steps_per_epoch=steps_per_epoch,
              world=world, device=device, precision=precision)

    # Train: eq. 7 with per-example noise, RAE's objective (DDP averages the gradients)
    net = wrap_ddp(model, world, device) if trains else model
    stop = min(args.max_steps or total_steps, total_steps) if trains else step
    # C trains on: a resumed run's norm2 is stale, measured again at the end
    if stop > step:
        norm2 = None
    raw_shape = (rae.decoder.num_patches, rae.encoder.embed_dim)  # (N, n) of E(x)
    gan_from_step, disc_from_step = gan_steps(args, steps_per_epoch, stop=stop, disc=disc)
    warmup = int(round(args.warmup_epochs * steps_per_epoch))
    log = common.TrainLog(
        LOG_KEYS, out=args.out, step=step, total=total_steps if trains else step,
        batch_size=args.batch_size, device=device, master=master, resumed=resumed,
        show=("loss", "l1", "lr"))
    # the first training images, shown above their reconstructions in the grids
    fixed = next(batches())[:GRID_IMAGES]
    for epoch in range(step // steps_per_epoch, args.epochs):
        if step >= stop:
            break
        sampler.set_epoch(epoch, step - epoch * steps_per_epoch)
        for images, _ in loader:
            use_gan = disc is not None and step >= gan_from_step
            train_disc = disc is not None and step >= disc_from_step
            flip, eps, aug_draws = step_randomness(args, step, raw_shape, rank, world, device)
            x = common.to_unit(images, device, flip)
            with torch.no_grad(), common.autocast(device, precision):
                z_raw = rae.encode_raw(x).float()

            # Update C (and D): eq. 7's reconstruction under RAE's objective (losses.py); the
            # GAN loss's gradients flow through the discriminator, not into it
            lr = common.lr_schedule(step, warmup, warmup, total_steps, args.lr, args.min_lr)
            common.set_lr(opt, lr)
            train_discriminator(disc, disc_params, False)
            with common.autocast(device, precision):
                recon = net(z_raw, eps).float()  # eq. 7
                loss, loss_parts = losses.generator_loss(
                    recon, x, lpips=lpips, perceptual_weight=args.perceptual_weight,
                    disc=disc if use_gan else None, disc_weight=args.disc_weight,
                    aug_draws=aug_draws[0], last_layer=last_layer, average=common.all_reduce_)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            # the gradient norm is measured, not clipped (RAE does not clip)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, float("inf"))
            opt.step()
            common.update_ema(C_ema, C, args.ema_decay)
            if args.train_decoder:
                common.update_ema(D_ema, rae.decoder, args.ema_decay)

            # Update the discriminator: hinge loss on a fresh reconstruction of the clean tokens,
            # 8-bit like a saved image, and on the real images, each with its own DiffAug draws
            d_loss = torch.zeros((), device=device)
            if train_disc:
                train_discriminator(disc, disc_params, True)
                disc_lr = common.lr_schedule(step - disc_from_step, warmup, warmup, total_steps,
                                             args.lr, args.min_lr)
                common.set_lr(disc_opt, disc_lr)
                with torch.no_grad(), common.autocast(device, precision):
                    fake = model(z_raw).float().clamp(0, 1)
                    fake = torch.round(fake * 255) / 127.5 - 1  # 8-bit, in [-1, 1]
                with common.autocast(device, precision):
                    logits_real = disc_net(losses.diff_augment(x * 2 - 1, aug_draws[2]))
                    logits_fake = disc_net(losses.diff_augment(fake, aug_draws[1]))
                    d_loss = losses.hinge_d_loss(logits_real, logits_fake)
                disc_opt.zero_grad(set_to_none=True)
                d_loss.backward()
                disc_opt.step()
            log.add(step, loss=loss, **loss_parts, disc_loss=d_loss.detach(), grad_norm=grad_norm)
            step += 1

            # Log (one host sync), grids, checkpoints
            extra = args.ckpt_every and step % args.ckpt_every == 0
            ckpt_due = step < stop and (step % steps_per_epoch == 0 or extra)
            if step % args.log_every == 0 or ckpt_due or step >= stop:
                if not log.write(step, epoch=epoch, lr=lr, gan_on=use_gan, disc_on=train_disc):
                    # the loss became non-finite on some rank
                    common.cleanup_ddp()
                    sys.exit(3)
            grid_due = args.grid_every and (step % args.grid_every == 0 or step >= stop)
            if master and grid_due:
                save_recon_grid(stage1_ema, fixed, args.out, step, precision)
            if ckpt_due:
                log.save(step, record)
            if step >= stop:
                break
    log.bar.close()

    # norm2 of eq. 5 (clean tokens, EMA C, no flips), measured whenever the run stops
    if norm2 is None:
        norm2 = measure_norm2(stage1_ema, batches(), device, precision=precision)
        log.save(step, record)
    what = f"step {step}" if trains else "nothing to train: wrote the statistics"
    print0(f"done, {what}; {ckpt_path} feeds stage 2: python train_flow.py --data "
           f"{args.data} --stage1 {ckpt_path} --out OUT")
    common.cleanup_ddp()


# ---- Checkpoints, grids and messages
def checkpoint_record(args, step, world, steps_per_epoch, num_classes, rae, C, C_ema, D_ema, opt,
                      disc, disc_opt, rae_stats, norm2, prints):
    """What checkpoint.pt holds: what E, D and C were built from (kind, path, config, the
    weights' fingerprints `prints` of E and D), their weights, the statistics of eq. 1 and 5,
    optimisers and RNG. D's states only where it was trained."""
    trained_d = args.train_decoder
    encoder = dict(
        kind="dinov2",
        path=os.path.abspath(args.encoder),
        config=rae.encoder.config(),
        fingerprint=prints[0],
    )
    decoder = dict(
        path=os.path.abspath(args.decoder) if args.decoder else None,
        config=rae.decoder.config(),
        fingerprint=prints[1],
        state=rae.decoder.state_dict() if trained_d else None,
        state_ema=D_ema.state_dict() if trained_d else None,
    )
    compressor = dict(
        kind=C.kind,
        config=C.config(),
        state=C.state_dict(),
        state_ema=C_ema.state_dict(),
    )
    return dict(
        stage="src",
        args=vars(args),
        step=step,
        epoch=step // steps_per_epoch,
        image_size=args.image_size,
        num_classes=num_classes,
        encoder=encoder,
        decoder=decoder,
        compressor=compressor,
        rae_stats=rae_stats,
        norm2=norm2,
        optimizer=opt.state_dict() if opt is not None else None,
        discriminator=disc.state_dict() if disc is not None else None,
        disc_optimizer=disc_opt.state_dict() if disc_opt is not None else None,
        rng=common.capture_rng(),
        world_size=world,
        steps_per_epoch=steps_per_epoch,
    )


def resume_from(resume, C, C_ema, decoder, D_ema, opt, disc, disc_opt):
    """Load a checkpoint's states into the run's modules and optimisers (D's only where it was
    trained, the discriminator's where there is one) and restore the RNG; returns its step and
    its norm2 (None if not measured yet). A fresh run (resume None) starts at step 0."""
    if resume is None:
        return 0, None
    comp = resume["compressor"]
    # D's states are None unless it was trained
    dec = resume["decoder"]
    pairs = [(C, comp["state"]),
             (C_ema, comp["state_ema"]),
             (decoder, dec["state"]),
             (D_ema, dec["state_ema"]),
             (opt, resume["optimizer"]),
             (disc, resume["discriminator"]),
             (disc_opt, resume["disc_optimizer"])]
    for target, state in pairs:
        if target is not None and state is not None:
            target.load_state_dict(state)
    # copied: nothing keeps the checkpoint's mapping alive
    norm2 = resume["norm2"]
    if norm2 is not None:
        norm2 = dict(mean=norm2["mean"].clone(), var=norm2["var"].clone(), eps=norm2["eps"])
    common.restore_rng(resume["rng"])
    return resume["step"], norm2


@torch.no_grad()
def save_recon_grid(stage1_ema, fixed, out, step, precision):
    """recon/<step>.png: the fixed training images above the EMA's eq. 7 reconstructions."""
    with common.autocast(fixed.device, precision):
        recon = stage1_ema(stage1_ema.encode_raw(fixed)).float()
    path = os.path.join(out, "recon", f"{step:07d}.png")
    common.save_grid(torch.cat([fixed, recon]), path, nrow=len(fixed))


def print_run(args, C, trainable, images, steps_per_epoch, world, device, precision):
    """What this run trains, on what, where."""
    millions = sum(p.numel() for p in trainable) / 1e6
    print0(f"compressor {C.kind} n={C.n} -> d={C.d}, {millions:.2f}M trained; {images} "
           f"images, {steps_per_epoch} steps/epoch x {args.epochs} epochs, global batch "
           f"{args.batch_size} on {world} ranks, {device}, {precision}")




def print0(text):
    """Print on rank 0 only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(text)


# ---- Command line
def kind_defaults(name):
    """'src 32, conv 32, ...': each compressor's default for its constructor argument `name`."""
    found = []
    for kind, make in COMPRESSORS.items():
        param = inspect.signature(make).parameters.get(name)
        if param is not None:
            found.append(f"{kind} {param.default}")
    return ", ".join(found)


def build_parser():
    p = argparse.ArgumentParser(description="Stage 1: train the compressor (eq. 7).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="training images, one folder per class")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--encoder", required=True, help="DINOv2 weights (.pth or HF snapshot)")
    p.add_argument("--decoder", default=None, help="released RAE decoder model.pt (frozen)")
    p.add_argument("--train-decoder", action="store_true", help="build D and train it (toy runs)")
    p.add_argument("--decoder-width", type=int, default=1152, help="trained D's width")
    p.add_argument("--decoder-depth", type=int, default=28, help="trained D's layers")
    p.add_argument("--decoder-heads", type=int, default=None, help="D's heads (default: RAE's)")
    p.add_argument("--decoder-mlp", type=int, default=4096, help="trained D's MLP width")
    p.add_argument("--rae-stats", default=None, help="RAE's stat.pt (default: measured)")
    p.add_argument("--stats-images", type=int, default=0, help="images for statistics (0: all)")
    p.add_argument("--image-size", type=int, default=256, help="image side")
    p.add_argument("--crop", choices=["random", "center"], default="random",
                   help="RAE's random crop, no flips; or ADM's, flipped")
    p.add_argument("--compressor", choices=list(COMPRESSORS), default="src",
                   help="C (Table 5), one of src.COMPRESSORS: " + ", ".join(COMPRESSORS))
    p.add_argument("--src-dim", type=int, default=None,
                   help=f"d: channels of z_c (each kind's default: {kind_defaults('d')})")
    p.add_argument("--src-depth", type=int, default=None,
                   help=f"L: blocks per side (each kind's default: {kind_defaults('depth')})")
    p.add_argument("--epochs", type=int, default=16, help="training epochs")
    p.add_argument("--batch-size", type=int, default=256, help="the GLOBAL batch (all ranks)")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW lr of C, D and the disc.")
    p.add_argument("--min-lr", type=float, default=2e-5, help="lr at the cosine's end")
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up epochs")
    p.add_argument("--noise-max", type=float, default=0.8, help="sigma_src ~ U(0, noise_max)")
    p.add_argument("--perceptual-weight", type=float, default=1.0, help="LPIPS weight")
    p.add_argument("--lpips-vgg", default=None, help=f"VGG16 weights ({losses.VGG16_URL})")
    p.add_argument("--lpips-lin", default=None, help=f"LPIPS heads ({losses.LPIPS_LIN_URL})")
    p.add_argument("--disc", choices=["dino", "patch"], default="dino",
                   help="RAE's DINO-S/8 discriminator, or a weight-free PatchGAN")
    p.add_argument("--disc-encoder", default=None, help=f"DINO ViT-S/8 ({losses.DINO_S8_URL})")
    p.add_argument("--disc-width", type=int, default=64, help="PatchGAN's first width")
    p.add_argument("--disc-weight", type=float, default=0.75, help="GAN loss weight")
    p.add_argument("--disc-start", type=int, default=8,
                   help="epoch (not step) the GAN loss starts: --max-steps runs that end "
                        "sooner train without it")
    p.add_argument("--disc-upd-start", type=int, default=6,
                   help="epoch (not step) the disc. trains")
    p.add_argument("--ema-decay", type=float, default=EMA_DECAY,
                   help="EMA decay of C and D (RAE's)")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="default: bf16 on CUDA")
    p.add_argument("--grid-every", type=int, default=2500, help="steps between grids")
    p.add_argument("--ckpt-every", type=int, default=2500, help="steps between checkpoints")
    common.add_run_arguments(p)
    return p


def check_args(args):
    """One-line errors for settings that cannot run or flags that would change nothing, before
    any file is read."""
    for name in ("epochs", "batch_size", "image_size"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    if args.train_decoder and args.image_size % 16:
        raise UserError("--image-size must be a multiple of 16 (D's patch)")
    if args.noise_max < 0:
        raise UserError(f"--noise-max must be >= 0, got {args.noise_max}")
    if args.train_decoder == (args.decoder is not None):
        raise UserError("give one of --decoder PATH and --train-decoder")
    compressor_arguments(args)
    # flags that only one set-up uses: given to another, they would change nothing
    parser = build_parser()
    used = {
        "decoder_width": ("--train-decoder", args.train_decoder),
        "decoder_depth": ("--train-decoder", args.train_decoder),
        "decoder_mlp": ("--train-decoder", args.train_decoder),
        "disc_width": ("--disc patch", args.disc == "patch"),
        "disc_encoder": ("--disc dino", args.disc == "dino"),
    }
    for key, (setting, on) in used.items():
        if not on and getattr(args, key) != parser.get_default(key):
            raise UserError(f"--{key.replace('_', '-')} is used only with {setting}")
    return args


if __name__ == "__main__":
    common.run_cli(main, build_parser().parse_args())
