"""The reconstruction objective of stage 1 (paper §3.4, eq. 7), RAE's decoder objective:

    L = L1(x^, x) + w_p * LPIPS(x^, x) + w_d * lambda * (-Disc(aug(x^)))

LPIPS on VGG16 features (Zhang et al. 2018), a hinge discriminator on augmented images (RAE's
frozen-DINO heads, or a PatchGAN that needs no weights), and the adaptive weight lambda of
VQGAN / RAE. Pretrained weights are read from local files in their official layouts.
"""

import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

from rae import Block, read_state_dict

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LPIPS_LIN_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"
DINO_S8_URL = "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth"


# -----------------------------------------------------------------------------
# LPIPS: VGG16 features at relu1_2 .. relu5_3, unit-normalised over channels, squared differences
# weighted by learned 1x1 "lin" heads, averaged over space, summed over layers.

VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
VGG16_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in vgg16.features


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
        for i, layer in enumerate(self.features[:VGG16_TAPS[-1] + 1]):
            h = layer(h)
            if i in VGG16_TAPS:
                out.append(h)
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
    vgg = read_state_dict(vgg_path, f"torchvision VGG16 weights ({VGG16_URL})")
    want = model.features.state_dict()
    got = {k.removeprefix("features."): v for k, v in vgg.items() if k.startswith("features.")}
    if set(got) != set(want) or any(got[k].shape != want[k].shape for k in want):
        raise ValueError(f"{vgg_path}: expected torchvision VGG16 weights with features.N.weight/bias "
                         f"(vgg16-397923af.pth from {VGG16_URL})")
    model.features.load_state_dict(got)
    lin = read_state_dict(lin_path, f"the LPIPS v0.1 linear heads vgg.pth ({LPIPS_LIN_URL})")
    for i, conv in enumerate(model.lins):
        w = lin.get(f"lin{i}.model.1.weight", lin.get(f"lin{i}.model.0.weight"))
        if w is None or w.shape != conv.weight.shape:
            raise ValueError(f"{lin_path}: expected LPIPS linear heads lin0..lin4.model.1.weight of shapes "
                             f"(1,C,1,1) (the v0.1 vgg.pth from {LPIPS_LIN_URL})")
        conv.weight.data.copy_(w)
    return model.eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# Discriminators. `dino` is RAE's: a frozen DINO (v1) ViT-S/8 whose token features after blocks
# 2, 5, 8, 11 and at the output feed five trainable 1-D convolutional heads (spectral norm,
# per-sample normalisation over tokens, LeakyReLU 0.2, a residual kernel-9 circular conv), one
# logit per token and head. `patch` is a small convolutional PatchGAN that needs no weights.

def conv_norm_act(channels, kernel):
    """Spectral-norm circular conv, per-sample normalisation over tokens (RAE's BatchNormLocal with a virtual
    batch of 1, i.e. an instance norm), LeakyReLU 0.2; on (B, C, L)."""
    conv = nn.Conv1d(channels, channels, kernel, padding=kernel // 2, padding_mode="circular")
    return nn.Sequential(spectral_norm(conv), nn.InstanceNorm1d(channels, eps=1e-6, affine=True), nn.LeakyReLU(0.2))


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
        self.patch, self.grid = patch, grid
        self.taps = [t for t in taps if t < depth]
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.blocks = nn.ModuleList([Block(dim, max(1, dim // 64)) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)  # in the checkpoint, unused (RAE reads pre-norm tokens)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

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
    sd = read_state_dict(path, f"the DINO ViT-S/8 weights ({DINO_S8_URL})")
    sd = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in sd.items()}
    dinov2 = "register_tokens" in sd or "mask_token" in sd or any(".ls1." in k for k in sd)
    if "pos_embed" not in sd or "patch_embed.proj.weight" not in sd or dinov2:
        raise ValueError(f"{path}: expected a DINO (v1) ViT state dict (cls_token, pos_embed, patch_embed.proj, "
                         f"blocks.N.*, no LayerScale/registers), e.g. {DINO_S8_URL}")
    dim, patch = sd["patch_embed.proj.weight"].shape[0], sd["patch_embed.proj.weight"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    grid = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5))
    model = DINOBackbone(dim, depth, patch, grid)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: DINO ViT keys do not match (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval().requires_grad_(False)


class DINODiscriminator(nn.Module):
    """RAE's discriminator: frozen DINO features -> trainable heads -> per-token logits (B, L * heads)."""

    def __init__(self, backbone, kernel=9):
        super().__init__()
        self.backbone = [backbone]  # a list: not a submodule, so it stays frozen and out of state_dict
        width = backbone.patch_embed.proj.out_channels
        self.heads = nn.ModuleList([
            nn.Sequential(conv_norm_act(width, 1), Residual(conv_norm_act(width, kernel)),
                          spectral_norm(nn.Conv1d(width, 1, 1)))
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


# -----------------------------------------------------------------------------
# The losses

def hinge_d_loss(logits_real, logits_fake):
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def adaptive_weight(recon_loss, gan_loss, last_layer, average=lambda g: g, max_weight=1e4):
    """VQGAN / RAE: lambda = ||grad recon|| / ||grad gan|| at the last layer, clamped. `average`
    (e.g. common.all_reduce_) averages the two gradients over ranks first, so that lambda is the
    global batch's."""
    g_rec = torch.autograd.grad(recon_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    g = average(torch.stack([g_rec, g_gan]))
    return (g[0].norm() / (g[1].norm() + 1e-6)).clamp(0, max_weight).detach()


def generator_loss(recon, x, lpips, perceptual_weight, disc=None, disc_weight=0.0, aug_u=None, last_layer=None,
                   average=lambda g: g):
    """RAE's decoder objective on x^ of eq. 7 (recon) and x in [0, 1]: L1 + w_p * LPIPS, plus
    w_d * lambda * (-Disc(DiffAug(x^, aug_u))) when `disc` is given (lambda: adaptive_weight at last_layer).
    Returns (total, dict of detached parts)."""
    rec = (recon - x).abs().mean()
    lp = lpips(x * 2 - 1, recon * 2 - 1).mean() if perceptual_weight > 0 else rec.new_zeros(())
    total = rec + perceptual_weight * lp
    parts = dict(l1=rec.detach(), lpips=lp.detach())
    if disc is not None:
        gan = -disc(diff_augment(recon * 2 - 1, aug_u)).mean()
        lam = adaptive_weight(total, gan, last_layer, average)
        total = total + disc_weight * lam * gan
        parts.update(gan=gan.detach(), adaptive_weight=lam)
    return total, parts
