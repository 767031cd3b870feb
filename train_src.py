"""Stage 1 of SRC-Flow: train the Semantic Representation Compressor with a frozen RAE (paper §3.4, §4.1).

The RAE encoder E and decoder D stay frozen; the SRC (C_enc, C_dec) learns the reconstruction
path of eq. 7 with RAE-style per-example noise on the raw encoder output,

    x^ = D(denorm(C_dec(C_enc(norm(E(x) + eps))))),   eps ~ N(0, sigma^2 I),  sigma ~ U(0, 0.8),

under the RAE decoder's objective: pixel L1 + LPIPS (VGG16, weights from files) + an adversarial
hinge loss whose weight is adapted to the gradient of the last trainable layer (VQGAN / RAE),
switched on at epoch 8 with discriminator updates from epoch 6. AdamW 2e-4, betas (0.9, 0.95),
1 warm-up epoch then cosine to 2e-5, 16 epochs, EMA of the SRC. At the end the compact-space
statistics norm2 (eq. 5) are computed with the EMA SRC and stored in the checkpoint.

    python train_src.py --data /data/imagenet/train --out runs/src --encoder dinov2_vitb14_reg4_pretrain.pth \\
        --decoder rae_decoder_xl/model.pt --rae-stats stat.pt --lpips-vgg vgg16-397923af.pth \\
        --lpips-lin lpips_v0.1_vgg.pth --disc-encoder dino_deitsmall8_pretrain.pth
    torchrun --nproc_per_node=8 train_src.py ...          # same arguments, 8 GPUs (global batch 256)
    python train_src.py ... --resume                       # continue runs/src/checkpoint.pt exactly

--train-decoder: no released decoder for your data or resolution (and every toy run): D is built
from --decoder-* and trained jointly with the SRC on the same eq. 7 path (D and C start from
scratch; the adaptive weight then uses D's last layer, as RAE does). The paper's setting is
a released D, kept frozen.

    python train_src.py --data toy/ --out toy_src --encoder tiny_dinov2.pth --train-decoder \\
        --decoder-width 64 --decoder-depth 2 --decoder-heads 1 --decoder-mlp 128 --image-size 32 \\
        --src-depth 1 --src-dim 8 --perceptual-weight 0 --disc patch --epochs 4 --batch-size 8 --device cpu

--batch-size is global; per-example randomness (flip, sigma, eps, discriminator augmentation) is
drawn for the whole global batch from a generator seeded by (seed, step) and each rank takes its
rows, and the adaptive weight uses rank-averaged gradients, so N processes follow the trajectory
of one process. Outputs in --out: checkpoint.pt (atomic), log.jsonl, recon/*.png (rows: input, EMA
reconstruction).
"""

import argparse
import copy
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.nn.utils.parametrizations import spectral_norm
from tqdm import tqdm

import common
from common import UserError

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LPIPS_LIN_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"
DINO_S8_URL = "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth"


# -----------------------------------------------------------------------------
# LPIPS (Zhang et al. 2018): VGG16 features at relu1_2 .. relu5_3, unit-normalised over channels,
# squared differences weighted by learned 1x1 "lin" heads, averaged over space, summed over layers.

VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
VGG16_TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in vgg16.features


class LPIPS(nn.Module):
    """Per-example LPIPS distance between images in [-1, 1] (B,3,H,W) -> (B,)."""

    def __init__(self):
        super().__init__()
        layers, c_in = [], 3
        for v in VGG16_CFG:  # torchvision's vgg16().features, same indices and key names
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU()]
                c_in = v
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList([nn.Conv2d(c, 1, 1, bias=False) for c in (64, 128, 256, 512, 512)])
        # the "scaling layer": [-1, 1] inputs to the ImageNet statistics VGG was trained on
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def taps(self, x):
        out, h = [], (x - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in VGG16_TAPS:
                out.append(h)
            if i == VGG16_TAPS[-1]:
                break
        return out

    def forward(self, a, b):
        dist = 0
        for fa, fb, lin in zip(self.taps(a), self.taps(b), self.lins):
            fa = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            dist = dist + lin((fa - fb).pow(2)).mean(dim=(1, 2, 3))
        return dist


def load_lpips(vgg_path, lin_path):
    """LPIPS from torchvision's VGG16 weights (`features.N.*`) and the LPIPS v0.1 linear heads
    (`lin0.model.1.weight` .. `lin4.model.1.weight`); frozen, eval mode."""
    model = LPIPS()
    for path, what, url in ((vgg_path, "--lpips-vgg (torchvision VGG16 weights)", VGG16_URL),
                            (lin_path, "--lpips-lin (LPIPS v0.1 vgg.pth linear heads)", LPIPS_LIN_URL)):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file; expected {what}, from {url}")
    vgg = torch.load(vgg_path, map_location="cpu", weights_only=True)
    want = {k: v for k, v in model.features.state_dict().items()}
    got = {k[len("features."):]: v for k, v in vgg.items() if k.startswith("features.")} if isinstance(vgg, dict) else {}
    if set(got) != set(want) or any(got[k].shape != want[k].shape for k in want):
        raise UserError(f"{vgg_path}: expected torchvision VGG16 weights with features.N.weight/bias "
                        f"(vgg16-397923af.pth from {VGG16_URL})")
    model.features.load_state_dict(got)
    lin = torch.load(lin_path, map_location="cpu", weights_only=True)
    for i, conv in enumerate(model.lins):
        w = None
        if isinstance(lin, dict):
            w = lin.get(f"lin{i}.model.1.weight", lin.get(f"lin{i}.model.0.weight"))
        if w is None or w.shape != conv.weight.shape:
            raise UserError(f"{lin_path}: expected LPIPS linear heads lin0..lin4.model.1.weight of shapes "
                            f"(1,C,1,1) (the v0.1 vgg.pth from {LPIPS_LIN_URL})")
        conv.weight.data.copy_(w)
    return model.eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# Discriminators. `dino` is RAE's: a frozen DINO (v1) ViT-S/8 whose token features after blocks
# 2, 5, 8, 11 and at the output feed five trainable 1-D convolutional heads (spectral norm,
# per-sample normalisation over tokens, LeakyReLU 0.2, a residual kernel-9 circular conv), one
# logit per token and head. `patch` is a small convolutional PatchGAN that needs no weights.

class TokenNorm(nn.Module):
    """Per-sample, per-channel normalisation over tokens with an affine map (RAE's BatchNormLocal, virtual batch 1)."""

    def __init__(self, channels, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):  # (B, C, L)
        x = x.float()
        x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + self.eps)
        return x * self.weight[:, None] + self.bias[:, None]


def conv_norm_act(channels, kernel):
    return nn.Sequential(spectral_norm(nn.Conv1d(channels, channels, kernel, padding=kernel // 2, padding_mode="circular")),
                         TokenNorm(channels), nn.LeakyReLU(0.2))


class Residual(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return (self.fn(x) + x) * 2 ** -0.5


class DINOBackbone(nn.Module):
    """Frozen DINO (v1) ViT: patch tokens (B, C, L) after each of `taps` blocks and after the last one."""

    def __init__(self, dim, depth, patch, grid, taps=(2, 5, 8, 11)):
        super().__init__()
        from rae import Block
        self.patch, self.grid = patch, grid
        self.taps = [t for t in taps if t < depth]
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.blocks = nn.ModuleList([Block(dim, max(1, dim // 64)) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)  # in the checkpoint, unused (RAE reads pre-norm tokens)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x_pm1):
        size = self.grid * self.patch  # 224 for ViT-S/8: the input is resized, as in RAE
        x = F.interpolate(x_pm1.float(), size=(size, size), mode="bilinear", align_corners=False)
        x = ((x + 1) / 2 - self.mean) / self.std
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        feats = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                feats.append(x[:, 1:].transpose(1, 2))
        return [x[:, 1:].transpose(1, 2)] + feats


def load_dino_backbone(path):
    """A DINO (v1) ViT checkpoint in the official layout (dino_deitsmall8_pretrain.pth)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file; expected --disc-encoder, the DINO ViT-S/8 weights "
                                f"from {DINO_S8_URL} (or pass --disc patch)")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in sd.items()} if isinstance(sd, dict) else {}
    if "pos_embed" not in sd or "patch_embed.proj.weight" not in sd or "register_tokens" in sd or "mask_token" in sd or \
            any(".ls1." in k for k in sd):
        raise UserError(f"{path}: expected a DINO (v1) ViT state dict (cls_token, pos_embed, patch_embed.proj, "
                        f"blocks.N.*, no LayerScale/registers), e.g. {DINO_S8_URL}")
    dim, patch = sd["patch_embed.proj.weight"].shape[0], sd["patch_embed.proj.weight"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    grid = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5))
    model = DINOBackbone(dim, depth, patch, grid)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in ("mean", "std")]
    if missing or unexpected:
        raise UserError(f"{path}: DINO ViT keys do not match (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval().requires_grad_(False)


class DINODiscriminator(nn.Module):
    """RAE's discriminator: frozen DINO features -> trainable heads -> per-token logits (B, L * heads)."""

    def __init__(self, backbone, kernel=9):
        super().__init__()
        self.backbone = [backbone]  # a list: not a submodule, so it stays frozen and out of state_dict
        C = backbone.patch_embed.proj.out_channels
        self.heads = nn.ModuleList([
            nn.Sequential(conv_norm_act(C, 1), Residual(conv_norm_act(C, kernel)), spectral_norm(nn.Conv1d(C, 1, 1)))
            for _ in range(len(backbone.taps) + 1)])

    def to(self, *args, **kwargs):
        self.backbone[0].to(*args, **kwargs)
        return super().to(*args, **kwargs)

    def forward(self, x_pm1):
        feats = self.backbone[0](x_pm1)
        return torch.cat([head(f).flatten(1) for head, f in zip(self.heads, feats)], 1)


class PatchDiscriminator(nn.Module):
    """A weight-free PatchGAN: stride-2 convs (spectral norm, GroupNorm, LeakyReLU) -> a logit map (B, L)."""

    def __init__(self, width=64, layers=3):
        super().__init__()
        mods, c = [spectral_norm(nn.Conv2d(3, width, 4, 2, 1)), nn.LeakyReLU(0.2)], width
        for _ in range(layers - 1):
            mods += [spectral_norm(nn.Conv2d(c, 2 * c, 4, 2, 1)), nn.GroupNorm(8, 2 * c), nn.LeakyReLU(0.2)]
            c *= 2
        mods.append(spectral_norm(nn.Conv2d(c, 1, 3, 1, 1)))
        self.net = nn.Sequential(*mods)

    def forward(self, x_pm1):
        return self.net(x_pm1.float()).flatten(1)


def diff_augment(x, u):
    """RAE's DiffAug (translation by up to 1/8 of the side with zero fill, then brightness,
    saturation and contrast jitter), with the per-example uniforms u (B, 5) given by the caller."""
    B, _, H, W = x.shape
    dh, dw = round(H * 0.125), round(W * 0.125)
    th = (u[:, 0] * (2 * dh + 1)).floor().long() - dh
    tw = (u[:, 1] * (2 * dw + 1)).floor().long() - dw
    ih = torch.arange(H, device=x.device)[None] + th[:, None]  # output (i, j) reads input (i + th, j + tw)
    iw = torch.arange(W, device=x.device)[None] + tw[:, None]
    valid = ((ih >= 0) & (ih < H))[:, :, None] & ((iw >= 0) & (iw < W))[:, None, :]
    b = torch.arange(B, device=x.device)[:, None, None]
    x = x.permute(0, 2, 3, 1)[b, ih.clamp(0, H - 1)[:, :, None], iw.clamp(0, W - 1)[:, None, :]]
    x = (x * valid[..., None]).permute(0, 3, 1, 2)
    x = x + (u[:, 2] - 0.5).view(B, 1, 1, 1)                                     # brightness
    m = x.mean(1, keepdim=True)
    x = (x - m) * (2 * u[:, 3]).view(B, 1, 1, 1) + m                             # saturation
    m = x.mean((1, 2, 3), keepdim=True)
    return (x - m) * (u[:, 4] + 0.5).view(B, 1, 1, 1) + m                        # contrast


def hinge_d_loss(logits_real, logits_fake):
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def adaptive_weight(recon_loss, gan_loss, last_layer, max_weight=1e4):
    """VQGAN/RAE: ||grad recon|| / ||grad gan|| at the last layer, clamped; gradients are averaged
    over ranks first so the weight is that of the global batch."""
    g_rec = torch.autograd.grad(recon_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    g = common.all_reduce_(torch.stack([g_rec, g_gan]))
    return (g[0].norm() / (g[1].norm() + 1e-6)).clamp(0, max_weight).detach()


# -----------------------------------------------------------------------------
# The trainable path of eq. 7

class Reconstructor(nn.Module):
    """z (normalized RAE tokens) -> x^ = D(denorm(C_dec(C_enc(z)))) in [0, 1] (unclamped)."""

    def __init__(self, rae, C):
        super().__init__()
        self.rae, self.C = rae, C

    def forward(self, z):
        return self.rae.decode(self.C(z))


def generator_loss(recon, x, lpips, perceptual_weight, disc=None, disc_weight=0.0, aug_u=None, last_layer=None):
    """RAE's decoder objective: L1 + w_p * LPIPS (+ w_d * lambda * (-D(aug(x^))) once the GAN is on).
    Returns (total, dict of parts)."""
    rec = (recon - x).abs().mean()
    lp = lpips(x * 2 - 1, recon * 2 - 1).mean() if perceptual_weight > 0 else rec.new_zeros(())
    total = rec + perceptual_weight * lp
    parts = dict(l1=rec.detach(), lpips=lp.detach())
    if disc is not None:
        fake = recon * 2 - 1
        gan = -disc(diff_augment(fake, aug_u) if aug_u is not None else fake).mean()
        lam = adaptive_weight(total, gan, last_layer)
        total = total + disc_weight * lam * gan
        parts.update(gan=gan.detach(), adaptive_weight=lam)
    return total, parts


def last_layer_of(C, decoder, train_decoder):
    """The layer whose gradients set the adaptive weight: D's output projection when D is
    trained (RAE), else the SRC decoder's last linear layer."""
    if train_decoder:
        return decoder.decoder_pred.weight
    return C.dec_blocks[-1].mlp.fc2.weight if len(C.dec_blocks) else C.dec_proj.weight


def decoder_config_of(decoder):
    """RAEDecoder constructor arguments, read from the module."""
    if hasattr(decoder, "config"):
        return decoder.config()
    return dict(in_dim=decoder.decoder_embed.in_features, hidden=decoder.decoder_embed.out_features,
                depth=len(decoder.decoder_layers), num_heads=decoder.num_heads,
                mlp_dim=decoder.decoder_layers[0].intermediate.dense.out_features,
                patch_size=decoder.patch_size, num_patches=decoder.num_patches)


# -----------------------------------------------------------------------------

def main(args):
    # ---- set-up and argument checks
    rank, world, device = common.setup_ddp(args.device)
    master = rank == 0
    precision = args.precision
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.train_decoder == (args.decoder is not None):
        raise UserError("give exactly one of --decoder PATH (a released RAE decoder, frozen) and --train-decoder")
    if args.perceptual_weight > 0 and not (args.lpips_vgg and args.lpips_lin):
        raise UserError(f"--perceptual-weight {args.perceptual_weight} needs --lpips-vgg (VGG16, {VGG16_URL}) and "
                        f"--lpips-lin (LPIPS v0.1 heads, {LPIPS_LIN_URL}); or pass --perceptual-weight 0")
    if args.disc_weight > 0 and args.disc == "dino" and not args.disc_encoder:
        raise UserError(f"--disc dino needs --disc-encoder (DINO ViT-S/8 weights, {DINO_S8_URL}); "
                        f"use --disc patch for a discriminator without pretrained weights, or --disc-weight 0")
    if args.image_size % 16:
        raise UserError(f"--image-size must be a multiple of 16 (RAE decoder patch), got {args.image_size}")
    if not 0 <= args.noise_max:
        raise UserError(f"--noise-max must be >= 0, got {args.noise_max}")
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    resume = None
    if args.resume:
        resume = common.load_checkpoint(ckpt_path, "src")
        kept = ("data", "encoder", "decoder", "train_decoder", "image_size", "src_dim", "src_depth",
                "batch_size", "epochs", "seed", "noise_max", "disc")
        changed = {k: (resume["args"][k], getattr(args, k)) for k in kept if getattr(args, k) != resume["args"][k]}
        if changed:
            raise UserError(f"--resume {ckpt_path}: these arguments differ from the run being resumed (was, now): {changed}")
    elif os.path.exists(ckpt_path):
        raise UserError(f"{ckpt_path} exists; pass --resume to continue it or choose another --out")

    # ---- data
    dataset = common.ImageFolder(args.data, args.image_size)
    if args.skip_bad_images:
        bad = common.find_unreadable([p for p, _ in dataset.samples], rank, world, args.num_workers)
        if bad:
            if master:
                print(f"skipping {len(bad)} unreadable images: " + ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else ""),
                      file=sys.stderr)
            dataset = common.ImageFolder(args.data, args.image_size, exclude=bad)
    sampler = common.EpochSampler(len(dataset), args.batch_size, rank, world, args.seed)
    loader = common.make_loader(dataset, sampler, args.num_workers)
    spe = sampler.steps_per_epoch
    total_steps = args.epochs * spe
    local_b = args.batch_size // world

    def stats_batches(limit):  # the training images without flips, this rank's share
        n = len(dataset) if not limit else min(limit, len(dataset))
        part = torch.utils.data.Subset(dataset, list(range(rank, n, world)))
        for images, _ in torch.utils.data.DataLoader(part, batch_size=local_b, num_workers=args.num_workers):
            yield common.to_unit(images, device)

    # ---- frozen RAE (E, D, statistics) and the SRC
    from rae import RAE, RAEDecoder, load_dinov2, load_rae_decoder
    from src import SRC
    encoder = load_dinov2(args.encoder)
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    num_patches = (args.image_size // 16) ** 2
    if args.train_decoder:
        decoder = RAEDecoder(in_dim=encoder.embed_dim, hidden=args.decoder_width, depth=args.decoder_depth,
                             num_heads=args.decoder_heads, mlp_dim=args.decoder_mlp, patch_size=16,
                             num_patches=num_patches)
    else:
        decoder = load_rae_decoder(args.decoder)
    dec_cfg = decoder_config_of(decoder)
    if dec_cfg["num_patches"] != num_patches:
        raise UserError(f"--decoder {args.decoder}: decodes {dec_cfg['num_patches']} tokens, but --image-size "
                        f"{args.image_size} gives {num_patches}")
    rae = RAE(encoder, decoder, image_size=args.image_size).to(device)
    rae.requires_grad_(False)
    if resume is not None:
        rae.set_stats(resume["rae_stats"]["mean"], resume["rae_stats"]["var"])
    elif args.rae_stats:
        rae.load_stats(args.rae_stats)
    else:  # eq. 1 statistics of the raw encoder tokens over the training set
        if master:
            print("computing RAE statistics over the training images (pass --rae-stats to skip)")
        rae.set_stats(*common.channel_stats(stats_batches(args.stats_images), rae.encode_raw, device))
    rae_stats = dict(mean=rae.mean.detach().cpu().clone(), var=rae.var.detach().cpu().clone())
    rae.to(device)
    C = SRC(n=encoder.embed_dim, d=args.src_dim, depth=args.src_depth).to(device)
    trainable = list(C.parameters())
    if args.train_decoder:
        rae.decoder.requires_grad_(True)
        trainable += list(rae.decoder.parameters())
    C_ema = copy.deepcopy(C).requires_grad_(False).eval()
    D_ema = copy.deepcopy(rae.decoder).requires_grad_(False).eval() if args.train_decoder else None
    rae_ema = RAE(encoder, D_ema if args.train_decoder else rae.decoder, image_size=args.image_size).to(device)
    rae_ema.set_stats(rae_stats["mean"], rae_stats["var"])
    rae_ema.requires_grad_(False)

    lpips = load_lpips(args.lpips_vgg, args.lpips_lin).to(device) if args.perceptual_weight > 0 else None
    disc = None
    if args.disc_weight > 0:
        disc = (DINODiscriminator(load_dino_backbone(args.disc_encoder)) if args.disc == "dino"
                else PatchDiscriminator(args.disc_width)).to(device)
        common.broadcast_module(disc)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=fused)
    disc_opt = torch.optim.AdamW(disc.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0,
                                 fused=fused) if disc is not None else None
    step = 0
    norm2 = None
    if resume is not None:
        C.load_state_dict(resume["src"])
        C_ema.load_state_dict(resume["src_ema"])
        if args.train_decoder:
            rae.decoder.load_state_dict(resume["decoder"])
            D_ema.load_state_dict(resume["decoder_ema"])
        opt.load_state_dict(resume["optimizer"])
        if disc is not None:
            disc.load_state_dict(resume["discriminator"])
            disc_opt.load_state_dict(resume["disc_optimizer"])
        common.restore_rng(resume["rng"])
        step, norm2 = resume["step"], resume["norm2"]
    recon_net = Reconstructor(rae, C)
    model = DDP(recon_net, device_ids=[device.index] if device.type == "cuda" else None,
                broadcast_buffers=False) if world > 1 else recon_net
    last_layer = last_layer_of(C, rae.decoder, args.train_decoder)
    gan_start, disc_start = args.disc_start * spe, args.disc_upd_start * spe
    warmup = int(round(args.warmup_epochs * spe))

    def state(epoch):
        return dict(stage="src", args=vars(args), step=step, epoch=epoch, src=C.state_dict(), src_ema=C_ema.state_dict(),
                    decoder=rae.decoder.state_dict() if args.train_decoder else None,
                    decoder_ema=D_ema.state_dict() if args.train_decoder else None,
                    encoder_path=os.path.abspath(args.encoder),
                    decoder_path=os.path.abspath(args.decoder) if args.decoder else None,
                    decoder_config=dec_cfg, src_config=C.config(), rae_stats=rae_stats, norm2=norm2,
                    image_size=args.image_size, num_classes=len(dataset.classes),
                    optimizer=opt.state_dict(), scaler=None,  # bf16 / fp32: no loss scaling
                    discriminator=disc.state_dict() if disc is not None else None,
                    disc_optimizer=disc_opt.state_dict() if disc is not None else None,
                    rng=common.capture_rng(), world_size=world, steps_per_epoch=spe)

    if master:
        os.makedirs(args.out, exist_ok=True)
        n_train = sum(p.numel() for p in trainable)
        print(f"SRC n={encoder.embed_dim} -> d={args.src_dim}, depth {args.src_depth}; trainable {n_train / 1e6:.2f}M "
              f"({'SRC + decoder' if args.train_decoder else 'SRC'}); {len(dataset)} images, {spe} steps/epoch x "
              f"{args.epochs} epochs, global batch {args.batch_size} on {world} process(es), {device}, {precision}")
    log = common.JsonlLog(os.path.join(args.out, "log.jsonl"), enabled=master)
    last_good = step if resume is not None else None

    # ---- training loop
    B, n_raw = args.batch_size, encoder.embed_dim
    keys = ["loss", "l1", "lpips", "gan", "adaptive_weight", "disc_loss", "grad_norm"]
    sums = torch.zeros(len(keys) + 1, device=device)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    stop = min(args.max_steps, total_steps) if args.max_steps else total_steps
    bar = tqdm(total=total_steps, initial=step, disable=not master, dynamic_ncols=True, desc="src")
    t_log, step_log = time.time(), step
    fixed = None  # a fixed batch for the reconstruction grids
    for epoch in range(step // spe, args.epochs):
        if step >= stop:
            break
        sampler.set_epoch(epoch, step - epoch * spe)
        for images, _ in loader:
            use_gan = disc is not None and step >= gan_start
            train_disc = disc is not None and step >= disc_start
            gen = common.step_generator(args.seed, step, 0, device)
            flip = common.global_rand(gen, B, (), rank, world, device) < 0.5
            sigma = common.global_rand(gen, B, (), rank, world, device) * args.noise_max
            x = common.to_unit(images, device, flip)
            if fixed is None:
                fixed = x[:8].clone()
            with torch.no_grad(), autocast():
                z_raw = rae.encode_raw(x).float()
            eps = common.global_randn(gen, B, tuple(z_raw.shape[1:]), rank, world, device)
            z = rae.normalize(z_raw + sigma.view(-1, 1, 1) * eps)           # eq. 7: noise on E(x), then norm
            aug = [common.global_rand(gen, B, (5,), rank, world, device) for _ in range(3)]

            # generator step (SRC, and D with --train-decoder)
            lr = common.lr_warmup_cosine(step, warmup, total_steps, args.lr, args.min_lr)
            for group in opt.param_groups:
                group["lr"] = lr
            if disc is not None:
                disc.eval().requires_grad_(False)
            with autocast():
                recon = model(z).float()
                loss, parts = generator_loss(recon, x, lpips, args.perceptual_weight,
                                             disc if use_gan else None, args.disc_weight, aug[0], last_layer)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(trainable, float("inf"))  # measured, not clipped (RAE: no clip)
            opt.step()
            common.update_ema(C_ema, C, args.ema)
            if args.train_decoder:
                common.update_ema(D_ema, rae.decoder, args.ema)

            # discriminator step: fresh reconstruction of the clean tokens, 8-bit, augmented
            d_loss = torch.zeros((), device=device)
            if train_disc:
                disc.train().requires_grad_(True)
                for group in disc_opt.param_groups:
                    group["lr"] = common.lr_warmup_cosine(step - disc_start, warmup, total_steps, args.lr, args.min_lr)
                with torch.no_grad(), autocast():
                    fake = recon_net(rae.normalize(z_raw)).float() * 2 - 1
                fake = torch.round((fake.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1
                with autocast():
                    d_loss = hinge_d_loss(disc(diff_augment(x * 2 - 1, aug[2])), disc(diff_augment(fake, aug[1])))
                disc_opt.zero_grad(set_to_none=True)
                d_loss.backward()
                common.average_grads(disc.parameters())
                disc_opt.step()

            bad = ~torch.isfinite(loss.detach())
            first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, step + 1), first_bad)
            zero = torch.zeros((), device=device)
            sums += torch.stack([loss.detach().float(), parts["l1"], parts["lpips"].float(), parts.get("gan", zero).float(),
                                 parts.get("adaptive_weight", zero).float(), d_loss.detach().float(),
                                 gnorm.detach().float(), torch.ones((), device=device)])
            step += 1
            bar.update(1)

            end_of_epoch = step % spe == 0
            ckpt_due = end_of_epoch or step >= stop or (args.ckpt_every and step % args.ckpt_every == 0)
            if step % args.log_every == 0 or ckpt_due:
                common.stop_if_non_finite(first_bad, epoch, ckpt_path, last_good, bar)  # one host sync per log
                common.all_reduce_(sums)
                vals = (sums[:-1] / sums[-1]).tolist()
                dt = time.time() - t_log
                rec = dict(step=step, epoch=epoch, lr=lr, **dict(zip(keys, vals)), gan_on=use_gan, disc_on=train_disc,
                           steps_per_s=(step - step_log) / dt, images_per_s=(step - step_log) * B / dt)
                log.write(**rec)
                bar.set_postfix(loss=f"{vals[0]:.4f}", l1=f"{vals[1]:.4f}", lr=f"{lr:.2e}")
                sums.zero_()
                t_log, step_log = time.time(), step
            if master and args.grid_every and (step % args.grid_every == 0 or step >= stop):
                with torch.no_grad(), autocast():
                    rec_x = rae_ema.decode(C_ema(rae_ema.encode(fixed)))
                common.save_grid(torch.cat([fixed, rec_x.float()]), os.path.join(args.out, "recon", f"{step:07d}.png"),
                                 nrow=len(fixed))
            if ckpt_due:
                if master:
                    common.save_checkpoint(state(step // spe), ckpt_path)
                last_good = step
            if step >= stop:
                break
    bar.close()

    # ---- compact-space statistics norm2 (eq. 5), once training is complete
    if step >= total_steps and norm2 is None:
        # Eq. 5 defines norm2 on C_enc(z) of the clean features z = norm(E(x)) (no eps), computed with
        # the EMA SRC (the one sampling and train_flow.py use) over the training images without flips.
        if master:
            print("computing the compact statistics norm2 (eq. 5) with the EMA SRC")
        with autocast():
            mean2, var2 = common.channel_stats(stats_batches(args.stats_images),
                                               lambda x: C_ema.encode(rae.encode(x)).float(), device)
        norm2 = dict(mean=mean2.cpu(), var=var2.cpu())
        if master:
            common.save_checkpoint(state(step // spe), ckpt_path)
    if master:
        print(f"done: step {step}, checkpoint {ckpt_path}" + ("" if norm2 is not None else " (norm2 not yet computed)"))
    common.cleanup_ddp()


def build_parser():
    p = argparse.ArgumentParser(description="Stage 1 of SRC-Flow: train the SRC with a frozen RAE (eq. 7).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="training images as an ImageFolder (one subfolder per class)")
    p.add_argument("--out", required=True, help="output folder: checkpoint.pt, log.jsonl, recon/")
    p.add_argument("--encoder", required=True, help="DINOv2 weights (official .pth or a Hugging Face snapshot), the frozen E")
    p.add_argument("--decoder", default=None, help="released RAE decoder model.pt, kept frozen (else --train-decoder)")
    p.add_argument("--train-decoder", action="store_true", help="build D from --decoder-* and train it with the SRC (toy runs, new data or resolution)")
    p.add_argument("--decoder-width", type=int, default=1152, help="--train-decoder: D width (RAE ViT-XL: 1152)")
    p.add_argument("--decoder-depth", type=int, default=28, help="--train-decoder: D layers")
    p.add_argument("--decoder-heads", type=int, default=16, help="--train-decoder: D attention heads")
    p.add_argument("--decoder-mlp", type=int, default=4096, help="--train-decoder: D MLP width")
    p.add_argument("--rae-stats", default=None, help="RAE stat.pt (mean/var of raw encoder tokens); else computed from --data")
    p.add_argument("--stats-images", type=int, default=0, help="images used for the RAE and norm2 statistics (0: all)")
    p.add_argument("--image-size", type=int, default=256, help="image side (256 or 512 in the paper)")
    p.add_argument("--src-dim", type=int, default=32, help="d, channels of the compact tokens")
    p.add_argument("--src-depth", type=int, default=4, help="L, Transformer blocks on each side of the SRC")
    p.add_argument("--epochs", type=int, default=16, help="training epochs")
    p.add_argument("--batch-size", type=int, default=256, help="global batch size (split over processes)")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate, SRC and discriminator (betas 0.9, 0.95, no weight decay)")
    p.add_argument("--min-lr", type=float, default=2e-5, help="learning rate at the end of the cosine decay")
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up from 0, in epochs")
    p.add_argument("--noise-max", type=float, default=0.8, help="sigma_src ~ U(0, noise_max) per example on the raw encoder output (eq. 7)")
    p.add_argument("--perceptual-weight", type=float, default=1.0, help="LPIPS weight (needs --lpips-vgg and --lpips-lin; 0: off)")
    p.add_argument("--lpips-vgg", default=None, help=f"torchvision VGG16 weights ({VGG16_URL})")
    p.add_argument("--lpips-lin", default=None, help=f"LPIPS v0.1 linear heads vgg.pth ({LPIPS_LIN_URL})")
    p.add_argument("--disc", choices=["dino", "patch"], default="dino", help="discriminator: RAE's DINO-S/8 heads, or a PatchGAN needing no weights")
    p.add_argument("--disc-encoder", default=None, help=f"--disc dino: DINO (v1) ViT-S/8 weights ({DINO_S8_URL})")
    p.add_argument("--disc-width", type=int, default=64, help="--disc patch: width of the first conv")
    p.add_argument("--disc-weight", type=float, default=0.75, help="adversarial loss weight (0: no GAN)")
    p.add_argument("--disc-start", type=int, default=8, help="epoch from which the adversarial loss trains the SRC")
    p.add_argument("--disc-upd-start", type=int, default=6, help="epoch from which the discriminator is updated")
    p.add_argument("--ema", type=float, default=0.9999, help="EMA decay of the SRC (and D) weights")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="autocast precision of the forward passes")
    p.add_argument("--grid-every", type=int, default=2500, help="steps between reconstruction grids of the EMA model (0: off)")
    p.add_argument("--ckpt-every", type=int, default=2500, help="steps between checkpoints besides every epoch end (0: epoch ends only)")
    common.add_run_arguments(p)
    return p


if __name__ == "__main__":
    common.run_cli(main, build_parser().parse_args())
