"""Stage 1 of SRC-Flow: train the Semantic Representation Compressor with a frozen RAE (paper §3.4, §4.1).

E and D stay frozen; the compressor C = (C_enc, C_dec) learns the reconstruction path of eq. 7 with
RAE-style per-example noise on the raw encoder output,

    x^ = D(denorm(C_dec(C_enc(norm(E(x) + eps))))),   eps ~ N(0, sigma^2 I),  sigma ~ U(0, 0.8),

under the RAE decoder's objective (losses.py): L1 + LPIPS + a hinge GAN loss with VQGAN's adaptive weight,
on from epoch 8 with discriminator updates from epoch 6. AdamW 2e-4, betas (0.9, 0.95), 1 warm-up epoch then
cosine to 2e-5, 16 epochs, EMA of C. Whenever the run stops (at the end or at --max-steps) the compact
statistics norm2 of eq. 5 are computed with the EMA C and stored: the checkpoint is all stage 2 needs.

    python train_src.py --data /data/imagenet/train --out runs/src --encoder dinov2_vitb14_reg4_pretrain.pth \\
        --decoder ViTXL_n08/model.pt --lpips-vgg vgg16-397923af.pth \\
        --lpips-lin lpips_v0.1_vgg.pth --disc-encoder dino_deitsmall8_pretrain.pth
    torchrun --nproc_per_node=8 train_src.py ...          # same arguments, 8 GPUs (global batch 256)
    python train_src.py ... --resume                       # continue runs/src/checkpoint.pt exactly

--compressor (Table 5): src (the paper), linear, pca (fitted to the normalised RAE tokens, frozen) or identity
(d = n); with nothing to train only the statistics are computed. --train-decoder builds D from --decoder-* and
trains it with C (toy runs; data or resolutions without a released D). Randomness (flip, sigma, eps,
augmentation) is drawn per global example from a generator seeded by (seed, step) and the adaptive weight uses
rank-averaged gradients: N processes follow one process's trajectory. Outputs in --out: checkpoint.pt,
log.jsonl, recon/*.png (inputs above EMA reconstructions).
"""

import argparse
import copy
import os
import sys

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import common
import losses
from common import UserError
from rae import RAE, RAEDecoder, fingerprint, load_dinov2, load_rae_decoder
from src import COMPRESSORS

RESUME_KEPT = ("data", "encoder", "decoder", "train_decoder", "image_size", "compressor", "src_dim", "src_depth",
               "batch_size", "epochs", "seed", "noise_max", "disc")
LOG_KEYS = ("loss", "l1", "lpips", "gan", "adaptive_weight", "disc_loss", "grad_norm")


def build_decoder(args, encoder):
    """D: built from --decoder-* to be trained (--train-decoder, RAE's patch 16), or the released one, frozen,
    whose patch size and token count come from its file."""
    if args.train_decoder:
        return RAEDecoder(in_dim=encoder.embed_dim, hidden=args.decoder_width, depth=args.decoder_depth,
                          num_heads=args.decoder_heads or 16, mlp_dim=args.decoder_mlp, patch_size=16,
                          num_patches=(args.image_size // 16) ** 2)
    decoder = load_rae_decoder(args.decoder, num_heads=args.decoder_heads)
    if decoder.num_patches * decoder.patch_size ** 2 != args.image_size ** 2:
        raise UserError(f"--decoder {args.decoder}: decodes {decoder.num_patches} patches of {decoder.patch_size} px, "
                        f"not {args.image_size} x {args.image_size} images (--image-size)")
    return decoder


def build_compressor(args, n):
    """C (eq. 4) of --compressor for RAE tokens of width n (identity: d = n)."""
    sizes = dict(src=dict(d=args.src_dim, depth=args.src_depth), identity={})
    return COMPRESSORS[args.compressor](n=n, **sizes.get(args.compressor, dict(d=args.src_dim)))


def image_batches(dataset, limit, rank, world, batch_size, num_workers, device):
    """This rank's share of the first `limit` (0: all) training images in [0, 1], without flips."""
    part = torch.utils.data.Subset(dataset, range(rank, min(limit or len(dataset), len(dataset)), world))
    for images, _ in torch.utils.data.DataLoader(part, batch_size=batch_size, num_workers=num_workers):
        yield common.to_unit(images, device)


def main(args):
    # Setup DDP, precision and the run folder
    check_args(args)
    rank, world, device = common.setup_ddp(args.device)
    master = rank == 0
    say = print if master else lambda *a, **k: None  # messages from rank 0 only
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    resume = common.resume_checkpoint(args, ckpt_path, "src", RESUME_KEPT)

    # Setup data
    dataset = common.training_set(args, args.image_size, rank, world)
    sampler = common.EpochSampler(len(dataset), args.batch_size, rank, world, args.seed)
    loader = common.make_loader(dataset, sampler, args.num_workers)
    spe, B = sampler.steps_per_epoch, args.batch_size
    total_steps = args.epochs * spe
    batches = lambda: image_batches(dataset, args.stats_images, rank, world, B // world, args.num_workers, device)

    # Create models: E and D (frozen unless --train-decoder), C, the statistics of eq. 1, the EMA copies
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    encoder = load_dinov2(args.encoder)
    decoder = build_decoder(args, encoder)
    fingerprints = dict(encoder=fingerprint(encoder),  # stage 2 refuses other weights of this shape
                        decoder=None if args.train_decoder else fingerprint(decoder))
    C = build_compressor(args, encoder.embed_dim).to(device)
    trains = args.train_decoder or any(True for _ in C.parameters())  # pca and identity have nothing to train

    # The loss networks, read before the long statistics pass so that a bad weight file is refused at once
    lpips = disc = None
    if trains and args.perceptual_weight > 0:
        lpips = losses.load_lpips(args.lpips_vgg, args.lpips_lin).to(device)
    if trains and args.disc_weight > 0:
        disc = (losses.DINODiscriminator(losses.load_dino_backbone(args.disc_encoder)) if args.disc == "dino"
                else losses.PatchDiscriminator(args.disc_width)).to(device)
    rae = RAE(encoder, decoder, image_size=args.image_size).to(device)
    if resume is not None:
        rae.set_stats(resume["rae_stats"]["mean"], resume["rae_stats"]["var"])
    elif args.rae_stats:
        rae.load_stats(args.rae_stats)
    else:
        say("computing the RAE statistics (eq. 1) over the training images (pass --rae-stats to skip)")
        rae.set_stats(*common.channel_stats(batches(), rae.encode_raw, device))
    if C.kind == "pca" and resume is None:
        C.fit(*common.channel_stats(batches(), rae.encode, device, covariance=True))
        say(f"fitted PCA to the normalised RAE tokens: {C.d} of {C.n} dimensions explain {C.explained:.2%}")
    rae_stats = dict(mean=rae.mean.cpu().clone(), var=rae.var.cpu().clone())
    C_ema = copy.deepcopy(C).requires_grad_(False).eval()
    D_ema = copy.deepcopy(decoder).requires_grad_(False).eval() if args.train_decoder else decoder
    ema = common.Stage1(RAE(encoder, D_ema, image_size=args.image_size), C_ema).to(device)  # norm2: identity
    ema.rae.set_stats(rae_stats["mean"], rae_stats["var"])
    decoder.requires_grad_(args.train_decoder)
    model = common.Stage1(rae, C).to(device)  # the eq. 7 path; norm2 stays the identity while training
    trainable = [p for p in model.parameters() if p.requires_grad]

    # Create the optimisers (when there is something to train)
    opt = disc_opt = None
    adamw = lambda params: torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0,
                                             fused=device.type == "cuda")
    if trainable:
        opt = adamw(trainable)
    if disc is not None:
        disc_opt = adamw(disc.parameters())
    last_layer = decoder.decoder_pred.weight if args.train_decoder else C.last_layer()

    # Resume
    step = 0
    if resume is not None:
        comp, dec = resume["compressor"], resume["decoder"]  # decoder states: None unless D was trained
        for obj, saved in ((C, comp["state"]), (C_ema, comp["state_ema"]), (decoder, dec["state"]),
                           (D_ema, dec["state_ema"]), (opt, resume["optimizer"]), (disc, resume["discriminator"]),
                           (disc_opt, resume["disc_optimizer"])):
            if obj is not None and saved is not None:
                obj.load_state_dict(saved)
        common.restore_rng(resume["rng"])
        step = resume["step"]

    def state(epoch):
        return dict(stage="src", args=vars(args), step=step, epoch=epoch, image_size=args.image_size,
                    num_classes=len(dataset.classes),
                    encoder=dict(kind="dinov2", path=os.path.abspath(args.encoder), config=encoder.config(),
                                 fingerprint=fingerprints["encoder"]),
                    decoder=dict(path=os.path.abspath(args.decoder) if args.decoder else None, config=decoder.config(),
                                 fingerprint=fingerprints["decoder"],
                                 state=decoder.state_dict() if args.train_decoder else None,
                                 state_ema=D_ema.state_dict() if args.train_decoder else None),
                    compressor=dict(kind=C.kind, config=C.config(), state=C.state_dict(), state_ema=C_ema.state_dict()),
                    rae_stats=rae_stats, norm2=norm2, optimizer=opt and opt.state_dict(),
                    discriminator=disc and disc.state_dict(), disc_optimizer=disc_opt and disc_opt.state_dict(),
                    rng=common.capture_rng(), world_size=world, steps_per_epoch=spe)

    os.makedirs(args.out, exist_ok=True)
    say(f"compressor {C.kind} n={C.n} -> d={C.d}; trainable {sum(p.numel() for p in trainable) / 1e6:.2f}M "
        f"({'C + D' if args.train_decoder else 'C'}); {len(dataset)} images, {spe} steps/epoch x {args.epochs} "
        f"epochs, global batch {B} on {world} process(es), {device}, {args.precision}")

    # Train: eq. 7 with per-example noise, RAE's objective. DDP averages the gradients of C (and D) and of the
    # discriminator over the ranks; buffers (the statistics) are equal on every rank, so they are not synced.
    ddp = lambda m: m if world == 1 or m is None or not trainable else DDP(
        m, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)
    net, disc_net = ddp(model), ddp(disc)
    stop = min(args.max_steps or total_steps, total_steps) if trainable else step
    norm2 = resume["norm2"] if resume is not None and stop <= step else None  # stale once C trains on
    raw_shape = (decoder.num_patches, encoder.embed_dim)  # (N, n) of E(x)
    gan_start, disc_start = args.disc_start * spe, args.disc_upd_start * spe
    warmup = int(round(args.warmup_epochs * spe))
    if disc is not None:
        late = " (after this run's last step: no GAN in this run)" if gan_start >= stop else ""
        say(f"GAN: the discriminator trains from step {disc_start} (--disc-upd-start {args.disc_upd_start} epochs), "
            f"the adversarial loss trains C from step {gan_start} (--disc-start {args.disc_start} epochs){late}")
    log = common.TrainLog(LOG_KEYS, args.out, step, total_steps if trainable else step, B, device, master,
                          resume is not None, show=("loss", "l1", "lr"))
    fixed = next(batches())[:8]  # the first training images, for the reconstruction grids
    for epoch in range(step // spe, args.epochs):
        if step >= stop:
            break
        sampler.set_epoch(epoch, step - epoch * spe)
        for images, _ in loader:
            use_gan, train_disc = disc is not None and step >= gan_start, disc is not None and step >= disc_start
            gen = common.step_generator(args.seed, step, 0, device)
            flip = common.global_rand(gen, B, (), rank, world, device) < 0.5
            eps = common.encoder_noise(gen, B, raw_shape, rank, world, device, args.noise_max, per_example=True)
            aug = [common.global_rand(gen, B, (5,), rank, world, device) for _ in range(3)]
            x = common.to_unit(images, device, flip)
            with torch.no_grad(), autocast():
                z_raw = rae.encode_raw(x).float()

            # generator step: C (and D with --train-decoder)
            lr = common.lr_schedule(step, warmup, warmup, total_steps, args.lr, args.min_lr)
            for group in opt.param_groups:
                group["lr"] = lr
            if disc is not None:
                disc.eval().requires_grad_(False)
            with autocast():
                loss, parts = losses.generator_loss(net(z_raw + eps).float(), x, lpips, args.perceptual_weight,
                                                    disc if use_gan else None, args.disc_weight, aug[0], last_layer,
                                                    average=common.all_reduce_)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(trainable, float("inf"))  # measured, not clipped (RAE: no clip)
            opt.step()
            common.update_ema(C_ema, C, args.ema)
            if args.train_decoder:
                common.update_ema(D_ema, decoder, args.ema)

            # discriminator step: a fresh reconstruction of the clean tokens, 8-bit, augmented
            d_loss = torch.zeros((), device=device)
            if train_disc:
                disc.train().requires_grad_(True)
                for group in disc_opt.param_groups:
                    group["lr"] = common.lr_schedule(step - disc_start, warmup, warmup, total_steps, args.lr,
                                                     args.min_lr)
                with torch.no_grad(), autocast():
                    fake = torch.round(model(z_raw).float().clamp(0, 1) * 255) / 127.5 - 1  # in [-1, 1]
                with autocast():
                    d_loss = losses.hinge_d_loss(disc_net(losses.diff_augment(x * 2 - 1, aug[2])),
                                                 disc_net(losses.diff_augment(fake, aug[1])))
                disc_opt.zero_grad(set_to_none=True)
                d_loss.backward()
                disc_opt.step()
            log.add(step, loss=loss, **parts, disc_loss=d_loss, grad_norm=gnorm)
            step += 1

            ckpt_due = step < stop and (step % spe == 0 or (args.ckpt_every and step % args.ckpt_every == 0))
            if step % args.log_every == 0 or ckpt_due or step >= stop:  # one host sync per log
                if log.write(step, epoch=epoch, lr=lr, gan_on=use_gan, disc_on=train_disc) is None:  # non-finite
                    common.cleanup_ddp()
                    sys.exit(3)
            if master and args.grid_every and (step % args.grid_every == 0 or step >= stop):
                with torch.no_grad(), autocast():
                    rec_x = ema(ema.rae.encode_raw(fixed)).float()
                common.save_grid(torch.cat([fixed, rec_x]), os.path.join(args.out, "recon", f"{step:07d}.png"),
                                 nrow=len(fixed))
            if ckpt_due:
                log.save(step, lambda: state(step // spe))
            if step >= stop:
                break
    log.bar.close()

    # Save: norm2 of eq. 5 (clean tokens, EMA C, no flips) whenever the run stops
    if norm2 is None:
        say("computing the compact statistics norm2 (eq. 5) with the EMA compressor")
        with autocast():
            mean2, var2 = common.channel_stats(batches(), lambda x: ema.encode(x).float(), device)
        norm2 = dict(mean=mean2.cpu(), var=var2.cpu())
        if master:
            common.save_checkpoint(state(step // spe), ckpt_path)
    what = f"step {step}" if trainable else "nothing to train (C and D frozen): wrote the statistics"
    say(f"done, {what}; {ckpt_path} holds what stage 2 needs (E's path, D, C_enc/C_dec, the RAE statistics "
        f"and norm2): python train_flow.py --data {args.data} --stage1 {ckpt_path} --out OUT")
    common.cleanup_ddp()


def build_parser():
    p = argparse.ArgumentParser(description="Stage 1 of SRC-Flow: train the compressor with a frozen RAE (eq. 7).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="training images as an ImageFolder (one subfolder per class)")
    p.add_argument("--out", required=True, help="output folder: checkpoint.pt, log.jsonl, recon/")
    p.add_argument("--encoder", required=True, help="DINOv2 weights (official .pth or a Hugging Face snapshot): E")
    p.add_argument("--decoder", default=None, help="released RAE decoder model.pt, kept frozen (else --train-decoder)")
    p.add_argument("--train-decoder", action="store_true",
                   help="build D from --decoder-* and train it with C (toy runs, new data or resolution)")
    p.add_argument("--decoder-width", type=int, default=1152, help="--train-decoder: D width (RAE ViT-XL: 1152)")
    p.add_argument("--decoder-depth", type=int, default=28, help="--train-decoder: D layers")
    p.add_argument("--decoder-heads", type=int, default=None,
                   help="D attention heads (default: 16 with --train-decoder; RAE's count for a --decoder's width)")
    p.add_argument("--decoder-mlp", type=int, default=4096, help="--train-decoder: D MLP width")
    p.add_argument("--rae-stats", default=None, help="RAE stat.pt (mean/var of raw encoder tokens); else computed")
    p.add_argument("--stats-images", type=int, default=0, help="images for the statistics and the PCA fit (0: all)")
    p.add_argument("--image-size", type=int, default=256, help="image side (256 or 512 in the paper)")
    p.add_argument("--compressor", choices=list(COMPRESSORS), default="src",
                   help="C: src (the paper), linear, pca (fitted, frozen) or identity (d = n)")
    p.add_argument("--src-dim", type=int, default=32, help="d, channels of the compact tokens")
    p.add_argument("--src-depth", type=int, default=4, help="L, Transformer blocks on each side of the SRC")
    p.add_argument("--epochs", type=int, default=16, help="training epochs")
    p.add_argument("--batch-size", type=int, default=256, help="global batch size (split over processes)")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate of C (and D) and the discriminator")
    p.add_argument("--min-lr", type=float, default=2e-5, help="learning rate at the end of the cosine decay")
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up from 0, in epochs")
    p.add_argument("--noise-max", type=float, default=0.8, help="sigma_src ~ U(0, noise_max) per example (eq. 7)")
    p.add_argument("--perceptual-weight", type=float, default=1.0, help="LPIPS weight (0: off)")
    p.add_argument("--lpips-vgg", default=None, help=f"torchvision VGG16 weights ({losses.VGG16_URL})")
    p.add_argument("--lpips-lin", default=None, help=f"LPIPS v0.1 linear heads vgg.pth ({losses.LPIPS_LIN_URL})")
    p.add_argument("--disc", choices=["dino", "patch"], default="dino",
                   help="discriminator: RAE's heads on a frozen DINO-S/8, or a PatchGAN needing no weights")
    p.add_argument("--disc-encoder", default=None, help=f"--disc dino: DINO ViT-S/8 weights ({losses.DINO_S8_URL})")
    p.add_argument("--disc-width", type=int, default=64, help="--disc patch: width of the first conv")
    p.add_argument("--disc-weight", type=float, default=0.75, help="adversarial loss weight (0: no GAN)")
    p.add_argument("--disc-start", type=int, default=8,
                   help="epoch (not step) from which the adversarial loss trains C: a --max-steps run that stops "
                        "earlier trains without the GAN")
    p.add_argument("--disc-upd-start", type=int, default=6,
                   help="epoch (not step) from which the discriminator is updated")
    p.add_argument("--ema", type=float, default=0.9999, help="EMA decay of the weights of C (and D)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="autocast precision of the passes")
    p.add_argument("--grid-every", type=int, default=2500, help="steps between reconstruction grids (0: off)")
    p.add_argument("--ckpt-every", type=int, default=2500, help="steps between extra checkpoints (0: epoch ends)")
    common.add_run_arguments(p)
    return p


def check_args(args):
    """One-line errors for settings that cannot run, before any file is read."""
    for name in ("epochs", "batch_size", "image_size"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.train_decoder and args.image_size % 16:
        raise UserError(f"--image-size must be a multiple of 16 (the trained decoder's patch), got {args.image_size}")
    if args.noise_max < 0:
        raise UserError(f"--noise-max must be >= 0, got {args.noise_max}")
    if args.train_decoder == (args.decoder is not None):
        raise UserError("give exactly one of --decoder PATH (a released RAE decoder, frozen) and --train-decoder")
    if args.compressor in ("pca", "identity") and not args.train_decoder:
        return args  # nothing to train: the loss weights are not needed
    if args.perceptual_weight > 0 and not (args.lpips_vgg and args.lpips_lin):
        raise UserError(f"--perceptual-weight {args.perceptual_weight} needs --lpips-vgg ({losses.VGG16_URL}) and "
                        f"--lpips-lin ({losses.LPIPS_LIN_URL}); or pass --perceptual-weight 0")
    if args.disc_weight > 0 and args.disc == "dino" and not args.disc_encoder:
        raise UserError(f"--disc dino needs --disc-encoder (DINO ViT-S/8 weights, {losses.DINO_S8_URL}); "
                        f"use --disc patch for a discriminator without pretrained weights, or --disc-weight 0")
    return args


if __name__ == "__main__":
    common.run_cli(main, build_parser().parse_args())
