"""Stage 1's reconstruction objective (paper §3.4, eq. 7), RAE's decoder objective:

    L = L1(x^, x) + w_p * LPIPS(x^, x) + w_d * lambda * (-D(aug(x^)))

LPIPS compares VGG16 features (Zhang et al. 2018). D is a hinge discriminator on DiffAug'd
images: RAE's heads on a frozen DINO ViT-S/8, or a PatchGAN needing no weights. lambda is
VQGAN's adaptive weight. Weights are read from local files in their official layouts; a wrong
file fails with one line naming it."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

from rae import IMAGENET_MEAN, IMAGENET_STD, Block, load_weights, need_file, read_state_dict, rgb

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LPIPS_LIN_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"
DINO_S8_URL = "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth"


# ---- LPIPS: VGG16 features at five ReLUs, unit-normalised over channels; their squared
# differences, weighted by learned 1x1 "lin" heads, are averaged over space and summed.
# torchvision's vgg16().features to relu5_3: conv widths, "M" a 2x2 max-pool
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
# relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: their indices in the features
VGG16_TAPS = (3, 8, 15, 22, 29)
TAP_WIDTHS = (64, 128, 256, 512, 512)
# the "scaling layer": [-1, 1] inputs to the ImageNet statistics VGG saw
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


def unit(f):
    """Feature vectors (B, C, H, W) scaled to unit length over channels."""
    return f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)


class LPIPS(nn.Module):
    """Per-example LPIPS distance of images in [-1, 1] (B, 3, H, W) -> (B,).
    `features` has the indices and keys of torchvision's vgg16().features."""

    def __init__(self):
        super().__init__()
        layers = []
        c_in = 3
        for c in VGG16_CFG:
            if c == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU()]
                c_in = c
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList([nn.Conv2d(c, 1, 1, bias=False) for c in TAP_WIDTHS])
        self.register_buffer("shift", rgb(LPIPS_SHIFT))
        self.register_buffer("scale", rgb(LPIPS_SCALE))

    def taps(self, x):
        """The five tapped feature maps, each (B, C_k, H_k, W_k)."""
        h = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in VGG16_TAPS:
                out.append(h)
        return out

    def forward(self, a, b):
        dist = 0
        for fa, fb, lin in zip(self.taps(a), self.taps(b), self.lins):
            dist = dist + lin((unit(fa) - unit(fb)).pow(2)).mean(dim=(1, 2, 3))
        return dist


def load_lpips(vgg_path, lin_path):
    """Frozen LPIPS in eval mode from torchvision's VGG16 (`features.N.*`)
    and the LPIPS v0.1 heads (`linK.model.1.weight`, K = 0..4; `.0.`
    in files saved without the dropout)."""
    vgg_what = f"torchvision VGG16 weights ({VGG16_URL})"
    lin_what = f"LPIPS linear heads v0.1 vgg.pth ({LPIPS_LIN_URL})"
    need_file(vgg_path, f"--lpips-vgg, {vgg_what}")
    need_file(lin_path, f"--lpips-lin, {lin_what}")
    model = LPIPS()
    vgg = read_state_dict(vgg_path, vgg_what)
    vgg = {k.removeprefix("features."): v for k, v in vgg.items() if k.startswith("features.")}
    try:
        model.features.load_state_dict(vgg)
    except RuntimeError:
        raise ValueError(f"{vgg_path}: expected {vgg_what}") from None
    lin = read_state_dict(lin_path, lin_what)
    for i, conv in enumerate(model.lins):
        w = lin.get(f"lin{i}.model.1.weight", lin.get(f"lin{i}.model.0.weight"))
        if w is None or w.shape != conv.weight.shape:
            raise ValueError(f"{lin_path}: expected {lin_what}")
        conv.weight.data.copy_(w)
    return model.eval().requires_grad_(False)


# ---- Discriminators. `dino` is RAE's: a frozen DINO (v1) ViT-S/8 whose patch tokens after
# blocks 2, 5, 8, 11 and at the output feed five trainable 1-D conv heads, one logit per token
# and head. `patch` is a PatchGAN that needs no weights.
LEAKY_SLOPE = 0.2
DINO_TAPS = (2, 5, 8, 11)


def conv_norm_act(channels, kernel):
    """On (B, C, L): a spectral-norm circular conv, a per-sample norm over
    tokens (RAE's BatchNormLocal with a virtual batch of 1) and a LeakyReLU."""
    conv = nn.Conv1d(channels, channels, kernel, padding=kernel // 2, padding_mode="circular")
    norm = nn.InstanceNorm1d(channels, eps=1e-6, affine=True)
    return nn.Sequential(spectral_norm(conv), norm, nn.LeakyReLU(LEAKY_SLOPE))


class Residual(nn.Module):
    """(fn(x) + x) / sqrt(2)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return (self.fn(x) + x) * 2 ** -0.5


class DINOBackbone(nn.Module):
    """A DINO (v1) ViT with the official keys: images in [-1, 1], resized to
    grid * patch (224 for ViT-S/8) as in RAE -> patch tokens (B, C, L) at
    the output, then after each block in `taps`. Its heads are 64 wide; its
    MLPs use the tanh GELU, as RAE's discriminator (DINO itself: exact)."""

    def __init__(self, dim, depth, patch, grid, taps=DINO_TAPS):
        super().__init__()
        self.size = (grid * patch, grid * patch)
        self.taps = [t for t in taps if t < depth]
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid**2, dim))
        heads = max(1, dim // 64)
        # RAE's discriminator blocks use the tanh GELU (src/disc/dinodisc.py)
        blocks = [Block(dim, heads, gelu="tanh") for _ in range(depth)]
        self.blocks = nn.ModuleList(blocks)
        # in the checkpoint, unused: RAE reads the tokens before this norm
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.register_buffer("mean", rgb(IMAGENET_MEAN), persistent=False)
        self.register_buffer("std", rgb(IMAGENET_STD), persistent=False)

    def forward(self, x):
        x = F.interpolate(x.float(), self.size, mode="bilinear", align_corners=False)
        x = ((x + 1) / 2 - self.mean) / self.std
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        feats = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                feats.append(x[:, 1:].transpose(1, 2))
        return [x[:, 1:].transpose(1, 2)] + feats


def load_dino_backbone(path):
    """A frozen DINO (v1) ViT from an official checkpoint (DINO_S8_URL). RAE
    also zeroes the key part of each qkv bias on load: it adds one constant
    to each query's logits, which the softmax ignores, so it is not done."""
    what = f"DINO (v1) ViT-S/8 weights ({DINO_S8_URL})"
    need_file(path, f"--disc-encoder, {what}, or --disc patch")
    sd = read_state_dict(path, what)
    # DINO's training checkpoints prefix the keys: module., backbone.
    sd = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in sd.items()}
    proj = sd.get("patch_embed.proj.weight")
    if proj is None or "pos_embed" not in sd:
        raise ValueError(f"{path}: expected {what}")
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.")}
    grid = round((sd["pos_embed"].shape[1] - 1) ** 0.5)
    model = DINOBackbone(proj.shape[0], 1 + max(blocks), proj.shape[-1], grid)
    # Another file (DINOv2, say) fails there, with its wrong keys.
    return load_weights(model, sd, path, what)


def drop_backbone(module, state_dict, prefix, local_metadata):
    """state_dict hook: only the heads are saved, not the backbone."""
    for k in [k for k in state_dict if k.startswith(prefix + "backbone.")]:
        del state_dict[k]


def allow_no_backbone(module, incompatible_keys):
    """load_state_dict hook: a heads-only state dict loads strictly."""
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not k.startswith("backbone.")]


class DINODiscriminator(nn.Module):
    """RAE's: frozen DINO tokens -> trainable heads -> logits (B, L * heads).
    Its state dict and its parameters that require grad are the heads'."""

    def __init__(self, backbone, kernel=9):
        super().__init__()
        # frozen; no dropout or batch norm: train/eval mode does not matter
        self.backbone = backbone.eval().requires_grad_(False)
        self.register_state_dict_post_hook(drop_backbone)
        self.register_load_state_dict_post_hook(allow_no_backbone)
        C = backbone.patch_embed.proj.out_channels
        self.heads = nn.ModuleList()
        for _ in range(len(backbone.taps) + 1):
            head = [conv_norm_act(C, 1), Residual(conv_norm_act(C, kernel))]
            self.heads.append(nn.Sequential(*head, spectral_norm(nn.Conv1d(C, 1, 1))))

    def forward(self, x):
        feats = self.backbone(x)
        assert len(feats) == len(self.heads)
        return torch.cat([h(f).flatten(1) for h, f in zip(self.heads, feats)], dim=1)


class PatchDiscriminator(nn.Module):
    """A PatchGAN: 4x4 stride-2 convs (spectral norm, GroupNorm but on the
    first, LeakyReLU), then a 3x3 conv to a logit map, flattened (B, L)."""

    def __init__(self, width=64, layers=3):
        super().__init__()
        mods = []
        c_in = 3
        for k in range(layers):
            c = width * 2**k
            mods.append(spectral_norm(nn.Conv2d(c_in, c, 4, stride=2, padding=1)))
            if k > 0:
                mods.append(nn.GroupNorm(8, c))
            mods.append(nn.LeakyReLU(LEAKY_SLOPE))
            c_in = c
        self.net = nn.Sequential(*mods, spectral_norm(nn.Conv2d(c_in, 1, 3, padding=1)))

    def forward(self, x):
        return self.net(x.float()).flatten(1)


# ---- RAE's DiffAug: a translation with zero fill (at most TRANSLATION of the side), then
# brightness, saturation and contrast jitter, from per-example uniform draws (B, 5) the caller
# makes (train_src.step_randomness: the same on every rank).
TRANSLATION = 1 / 8


def shifted_index(n, draws):
    """Read indices (B, n) shifted by a t in [-d, d] drawn from the uniforms
    `draws` (B,), clamped into [0, n), and whether each was inside."""
    d = round(n * TRANSLATION)
    t = (draws * (2 * d + 1)).floor().long() - d
    i = torch.arange(n, device=draws.device)[None] + t[:, None]
    return i.clamp(0, n - 1), (i >= 0) & (i < n)


def diff_augment(x, draws):
    """Images x (B, C, H, W) augmented with the uniforms `draws` (B, 5):
    draws[:, 0:2] shift, then draws[:, 2] brightness, draws[:, 3]
    saturation, draws[:, 4] contrast."""
    B, _, H, W = x.shape
    assert draws.shape == (B, 5), draws.shape
    # output pixel (i, j) reads input pixel (i + th, j + tw), zero outside
    ih, inside_h = shifted_index(H, draws[:, 0])
    iw, inside_w = shifted_index(W, draws[:, 1])
    inside = inside_h[:, :, None] & inside_w[:, None, :]
    b = torch.arange(B, device=x.device)[:, None, None]
    x = x.permute(0, 2, 3, 1)[b, ih[:, :, None], iw[:, None, :]]
    x = (x * inside[..., None]).permute(0, 3, 1, 2)
    s = draws[:, :, None, None, None]
    x = x + (s[:, 2] - 0.5)
    m = x.mean(1, keepdim=True)
    x = (x - m) * (2 * s[:, 3]) + m
    m = x.mean((1, 2, 3), keepdim=True)
    return (x - m) * (s[:, 4] + 0.5) + m


# ---- The losses
def hinge_d_loss(logits_real, logits_fake):
    """The discriminator's hinge loss."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def adaptive_weight(recon_loss, gan_loss, last_layer, average=lambda g: g, max_weight=1e4):
    """VQGAN / RAE: lambda = |grad recon| / |grad gan| at the last layer,
    clamped to [0, max_weight], detached. `average` (e.g. common.all_reduce_)
    first averages both gradients over the ranks: the global batch's lambda."""
    grads = [torch.autograd.grad(loss, last_layer, retain_graph=True)[0]
             for loss in (recon_loss, gan_loss)]
    g = average(torch.stack(grads))
    return (g[0].norm() / (g[1].norm() + 1e-6)).clamp(0, max_weight).detach()


def generator_loss(recon, x, lpips, perceptual_weight, disc=None, disc_weight=0.0,
                   aug_draws=None, last_layer=None, average=lambda g: g):
    """Eq. 7 on x^ = recon and x in [0, 1]: L1 + w_p * LPIPS, plus
    w_d * lambda * (-D(DiffAug(x^, aug_draws))) when `disc` is given
    (lambda: adaptive_weight at last_layer). Returns (total, detached parts)."""
    l1 = (recon - x).abs().mean()
    lp = l1.new_zeros(())
    if perceptual_weight > 0:
        lp = lpips(x * 2 - 1, recon * 2 - 1).mean()
    total = l1 + perceptual_weight * lp
    parts = dict(l1=l1.detach(), lpips=lp.detach())
    if disc is not None:
        gan = -disc(diff_augment(recon * 2 - 1, aug_draws)).mean()
        lam = adaptive_weight(total, gan, last_layer, average=average)
        total = total + disc_weight * lam * gan
        parts.update(gan=gan.detach(), adaptive_weight=lam)
    return total, parts
