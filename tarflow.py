"""Transformer autoregressive affine flow (TARFlow) with SimFlow's upgrades, paper §2, eq. 2, 3, 9.

x (B, N, d) are the data tokens (the compact features), z the Gaussian prior side, y the class labels.
The flow f = f_{K-1} o ... o f_0 maps x = x^0 to z = x^K. Block k reads the tokens in its own order, a
permutation pi_k of 0..N-1 (default: identity, reversed, identity, ...), and moves each token with an
affine map whose parameters come from a causal Transformer over the tokens read before it:

    x^{k+1}_i = (x^k_i - mu^k_i) * exp(-alpha^k_i),    x^k_i = x^{k+1}_i * exp(alpha^k_i) + mu^k_i   (eq. 3)

(mu^k_i, alpha^k_i) depend on x^k_{<i} only (the Transformer output is shifted by one position; the first token
read gets mu = alpha = 0), so the Jacobian is triangular and

    log p(x|y) = log N(f(x); 0, I) + log|det df/dx|,   log|det df/dx| = -sum_{k,i,j} alpha^k_{i,j}   (eq. 2)

and training minimises 0.5 ||f(x)||^2 + sum alpha (eq. 9). Following SimFlow (Table 8) the blocks are deep-shallow
(depths [2, 2, 2, 2, 2, L]: the deep block is the last one in the data -> prior direction, i.e. the first one run
when sampling) and each Transformer layer is conditioned on the class by adaLN-Zero (DiT). Label `num_classes` is
the null label, used for label dropout in training and for the unconditional half of classifier-free guidance; an
unconditional flow (num_classes=0) has only the null label.

Sampling (`reverse`) inverts the blocks token by token: one fused step per token writes its keys and values into
caches preallocated for the whole sequence; the class modulation is computed once per block. With guidance w > 0
the conditional and null-label passes run as one batch [cond; null] and their Gaussians are combined per element
with STARFlow's guided-Gaussian rule (sigma = exp(alpha)):

    s = min(sigma_c / sigma_u, 1)^2,   sigma = sigma_c / sqrt(1 + w - w s),
    mu = ((1 + w) mu_c - w s mu_u) / (1 + w - w s)

Both halves then continue from the same guided token, as in STARFlow. guide_blocks='all' (default) guides every
block; 'deep' is STARFlow's top-block mode: only the deep block is guided and the shallow blocks run conditional on
y with w = 0, at batch B. `score_step` then takes SimFlow's score step (SimFlow eq. 6) with exact gradients.

Precision: the Transformer may run under bf16 autocast; the affine arithmetic, the log-det and the tokens between
blocks stay in float32 (float64 for float64 model and input, as the tests use).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# Model sizes (SimFlow Table 8; 'tiny' for toy runs and tests). With 1000 classes, d = 32, 256 tokens: S 37M,
# B 141M, L 475M, XL 695M (Table 8) and XXL 1.36B: its deep block has 46 layers, as SimFlow's §5 and 1.4B count
# say (Table 8 prints 36: 1.12B). 'XXL-2048' is XXL at width 2048 (4.3B): the paper's naive baseline (Table 1).
SIZES = {
    'tiny': dict(channels=64, head_dim=32, depths=[1, 1, 1, 1, 1, 2]),
    'S': dict(channels=384, head_dim=64, depths=[2, 2, 2, 2, 2, 2]),
    'B': dict(channels=768, head_dim=64, depths=[2, 2, 2, 2, 2, 2]),
    'L': dict(channels=1024, head_dim=64, depths=[2, 2, 2, 2, 2, 14]),
    'XL': dict(channels=1152, head_dim=72, depths=[2, 2, 2, 2, 2, 18]),
    'XXL': dict(channels=1152, head_dim=72, depths=[2, 2, 2, 2, 2, 46]),
    'XXL-2048': dict(channels=2048, head_dim=128, depths=[2, 2, 2, 2, 2, 46]),
}


class Attention(nn.Module):
    """Causal multi-head self-attention; `step` attends one new token to a preallocated cache."""

    def __init__(self, channels, head_dim):
        super().__init__()
        self.num_heads, self.head_dim = channels // head_dim, head_dim
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x):
        B, N, width = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(x.transpose(1, 2).reshape(B, N, width))

    def step(self, x, cache, t):
        """x: (B, 1, width) token t; cache: (B, 2, heads, N, head_dim), written in place at t."""
        B, _, width = x.shape
        qkv = self.qkv(x).view(B, 3, self.num_heads, self.head_dim)
        cache[:, :, :, t] = qkv[:, 1:]
        q = qkv[:, 0].unsqueeze(2)
        x = F.scaled_dot_product_attention(q, cache[:, 0, :, :t + 1], cache[:, 1, :, :t + 1])
        return self.proj(x.reshape(B, 1, width))  # (B, heads, 1, hd) -> (B, 1, width): a view


class Layer(nn.Module):
    """Pre-LN Transformer layer with adaLN-Zero class modulation (DiT / SimFlow)."""

    def __init__(self, channels, head_dim, mlp_ratio):
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.norm1 = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(channels, head_dim)
        self.norm2 = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels))
        self.ada = nn.Linear(channels, 6 * channels)  # zero-initialised: gates start closed

    def modulation(self, c):
        """c = SiLU(class embedding) (B, C) -> (shift, 1 + scale, gate) for attention and MLP, each (B, 1, C)."""
        sa, ca, ga, sm, cm, gm = self.ada(c).unsqueeze(1).chunk(6, dim=-1)
        return sa, 1 + ca, ga, sm, 1 + cm, gm

    def forward(self, h, mod):
        sa, ca, ga, sm, cm, gm = mod
        h = h + ga * self.attn(torch.addcmul(sa, self.norm1(h), ca))
        return h + gm * self.mlp(torch.addcmul(sm, self.norm2(h), cm))

    def step(self, h, mod, cache, t):
        sa, ca, ga, sm, cm, gm = mod
        h = h + ga * self.attn.step(torch.addcmul(sa, self.norm1(h), ca), cache, t)
        return h + gm * self.mlp(torch.addcmul(sm, self.norm2(h), cm))


class FlowBlock(nn.Module):
    """One autoregressive affine block f_k (eq. 3) reading its tokens in the order perm (step i reads token perm[i])."""

    def __init__(self, in_channels, num_tokens, channels, depth, head_dim, num_classes, mlp_ratio, perm):
        super().__init__()
        natural = list(range(num_tokens))
        self.order = 'identity' if perm == natural else 'reversed' if perm == natural[::-1] else 'gather'
        self.register_buffer('perm', torch.tensor(perm), persistent=False)  # the constructor's permutations
        self.register_buffer('inv_perm', torch.tensor(sorted(natural, key=perm.__getitem__)), persistent=False)
        self.proj_in = nn.Linear(in_channels, channels)
        self.pos_embed = nn.Parameter(torch.randn(num_tokens, channels) * 0.02)  # by step in this block's order
        self.class_embed = nn.Embedding(num_classes + 1, channels)  # last row: null label
        self.layers = nn.ModuleList([Layer(channels, head_dim, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(channels, 2 * channels)
        self.proj_out = nn.Linear(channels, 2 * in_channels)  # zero-initialised: mu = alpha = 0

    def permute(self, x, inverse=False):
        """Natural token order -> this block's reading order (inverse=True: back); the default orders need no gather."""
        if self.order == 'identity':
            return x
        if self.order == 'reversed':
            return x.flip(1)
        return x.index_select(1, self.inv_perm if inverse else self.perm)

    def conditioning(self, y):
        """Per-layer adaLN modulations and the output modulation for labels y (B,), computed once."""
        c = F.silu(self.class_embed(y))
        shift, scale = self.ada_out(c).unsqueeze(1).chunk(2, dim=-1)
        return [layer.modulation(c) for layer in self.layers], (shift, 1 + scale)

    def head(self, h, out_mod):
        shift, scale = out_mod
        return self.proj_out(torch.addcmul(shift, self.norm(h), scale))

    def params(self, x, mods, out_mod):
        """(mu, alpha) for every token of x (B, N, d), already in this block's order; token i sees x_{<i}."""
        h = self.proj_in(x.to(self.proj_in.weight.dtype)) + self.pos_embed
        for layer, mod in zip(self.layers, mods):
            h = layer(h, mod)
        out = self.head(h, out_mod)
        out = F.pad(out[:, :-1], (0, 0, 1, 0))  # shift by one: token 0 gets mu = alpha = 0
        return out.to(_affine_dtype(x)).chunk(2, dim=-1)

    def forward(self, x, y):
        """x^{k+1} = (x^k - mu) * exp(-alpha) (eq. 3); returns it and log|det| = -sum alpha per example."""
        x = self.permute(x)
        mu, alpha = self.params(x, *self.conditioning(y))
        z = (x.to(mu.dtype) - mu) * torch.exp(-alpha)
        return self.permute(z, inverse=True), -alpha.sum(dim=(1, 2))

    def step(self, x_t, t, mods, out_mod, caches):
        """One sampling step: token t (B, 1, d) -> (mu, alpha) of token t + 1, each (B, d)."""
        h = self.proj_in(x_t.to(self.proj_in.weight.dtype)) + self.pos_embed[t]
        for layer, mod, cache in zip(self.layers, mods, caches):
            h = layer.step(h, mod, cache, t)
        return self.head(h, out_mod)[:, 0].to(x_t.dtype).chunk(2, dim=-1)

    def reverse(self, z, y, caches, guidance):
        """Invert this block token by token (eq. 3). z: (B, N, d); y: (B,) or (2B,) = [cond; null] for CFG."""
        B, N, _ = z.shape
        G = y.shape[0] // B  # 2 when guiding
        z = self.permute(z)
        mods, out_mod = self.conditioning(y)
        x = z.new_empty(G, B, *z.shape[1:])
        x[:, :, 0] = z[:, 0]
        x_flat = x.view(G * B, *z.shape[1:])
        for t in range(N - 1):
            mu, alpha = self.step(x_flat[:, t:t + 1], t, mods, out_mod, caches)
            if G == 2:
                mu, sigma = guided_gaussian(mu[:B], alpha[:B], mu[B:], alpha[B:], guidance)
            else:
                sigma = torch.exp(alpha)
            x[:, :, t + 1] = torch.addcmul(mu, z[:, t + 1], sigma)  # same token for both CFG halves
        return self.permute(x[0], inverse=True)


def guided_gaussian(mu_c, alpha_c, mu_u, alpha_u, w):
    """STARFlow's guided Gaussian, per element, with sigma = exp(alpha):
    s = min(sigma_c/sigma_u, 1)^2, sigma = sigma_c / sqrt(1 + w - w s), mu = ((1+w) mu_c - w s mu_u) / (1 + w - w s)."""
    s = torch.exp(2 * (alpha_c - alpha_u).clamp(max=0))
    denom = 1 + w - w * s  # >= 1 since s <= 1
    return ((1 + w) * mu_c - w * s * mu_u) / denom, torch.exp(alpha_c) * denom.rsqrt()


def _affine_dtype(x):
    """The affine arithmetic runs in float32 at least (float64 stays float64)."""
    return torch.promote_types(x.dtype, torch.float32)


class TARFlow(nn.Module):
    """K = len(depths) autoregressive affine blocks over (B, num_tokens, in_channels) tokens (eq. 2, 3)."""

    def __init__(self, in_channels, num_tokens, channels, depths, head_dim=64, num_classes=0, mlp_ratio=4.0,
                 permutations=None):
        super().__init__()
        depths = list(depths)
        if in_channels <= 0 or num_tokens <= 0 or channels <= 0 or head_dim <= 0:
            raise ValueError(f"TARFlow: in_channels, num_tokens, channels, head_dim must be positive, got "
                             f"{in_channels}, {num_tokens}, {channels}, {head_dim}")
        if channels % head_dim:
            raise ValueError(f"TARFlow: channels={channels} is not a multiple of head_dim={head_dim}")
        if not depths or any(int(n) != n or n < 1 for n in depths):
            raise ValueError(f"TARFlow: depths must be a non-empty list of positive layer counts, got {depths}")
        if num_classes < 0:
            raise ValueError(f"TARFlow: num_classes must be >= 0, got {num_classes}")
        natural = list(range(num_tokens))
        if permutations is None:  # the default orders: identity, reversed, identity, ...
            permutations = [natural[::-1] if k % 2 else natural for k in range(len(depths))]
        perms = [list(p) for p in permutations if isinstance(p, (list, tuple)) and all(type(i) is int for i in p)]
        if not len(perms) == len(permutations) == len(depths) or any(sorted(p) != natural for p in perms):
            raise ValueError(f"TARFlow: permutations must be None or {len(depths)} lists of ints (one per block), "
                             f"each a permutation of range({num_tokens})")
        self.in_channels, self.num_tokens, self.channels = in_channels, num_tokens, channels
        self.depths, self.head_dim, self.num_classes, self.mlp_ratio = depths, head_dim, num_classes, mlp_ratio
        self.null_label, self.permutations = num_classes, perms
        self.blocks = nn.ModuleList([
            FlowBlock(in_channels, num_tokens, channels, depth, head_dim, num_classes, mlp_ratio, perm)
            for depth, perm in zip(depths, perms)])
        self.apply(self._init_weights)
        for block in self.blocks:  # adaLN-Zero and a zero output: a new flow is the identity
            for m in [block.ada_out, block.proj_out] + [layer.ada for layer in block.layers]:
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def config(self):
        """The constructor arguments, as stored in flow checkpoints (`flow_config`)."""
        return dict(in_channels=self.in_channels, num_tokens=self.num_tokens, channels=self.channels,
                    depths=list(self.depths), head_dim=self.head_dim, num_classes=self.num_classes,
                    mlp_ratio=self.mlp_ratio, permutations=[list(p) for p in self.permutations])

    def _check(self, x, name):
        shape = (self.num_tokens, self.in_channels)
        if not torch.is_tensor(x) or x.dim() != 3 or tuple(x.shape[1:]) != shape or not x.is_floating_point():
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"TARFlow.{name}: expected float tokens of shape (B, {shape[0]}, {shape[1]}), got {got}")

    def _labels(self, y, B, device, name):
        """Class labels (B,) in [0, num_classes]; None means the null label num_classes."""
        if y is None:
            return torch.full((B,), self.null_label, dtype=torch.long, device=device)
        if not torch.is_tensor(y) or y.shape != (B,) or y.dtype not in (torch.int32, torch.int64):
            got = f"{tuple(y.shape)} {y.dtype}" if torch.is_tensor(y) else type(y).__name__
            raise ValueError(f"TARFlow.{name}: expected integer labels y of shape ({B},), got {got}")
        # Range check on CPU labels only: on an accelerator it would cost a host sync every step.
        if B and y.device.type == 'cpu' and not torch.compiler.is_compiling() and (
                int(y.min()) < 0 or int(y.max()) > self.null_label):
            raise ValueError(f"TARFlow.{name}: labels must lie in [0, {self.null_label}] "
                             f"({self.null_label} = null label), got [{int(y.min())}, {int(y.max())}]")
        return y.to(device=device, dtype=torch.long)

    def forward(self, x, y=None):
        """Data -> prior: returns z = f(x) (B, N, d) and log|det df/dx| (B,) summed over all elements and blocks."""
        self._check(x, 'forward')
        y = self._labels(y, x.shape[0], x.device, 'forward')
        logdet = 0
        for block in self.blocks:
            x, ld = block(x, y)
            logdet = logdet + ld
        return x, logdet

    def log_prob(self, x, y=None):
        """Exact log p(x) in nats (eq. 2): log N(f(x); 0, I) + log|det df/dx|, per example (B,)."""
        z, logdet = self(x, y)
        return -0.5 * z.pow(2).sum(dim=(1, 2)) - 0.5 * z.shape[1:].numel() * math.log(2 * math.pi) + logdet

    @torch.no_grad()
    def reverse(self, z, y=None, guidance=0.0, guide_blocks='all'):
        """Prior -> data: x = f^{-1}(z) (B, N, d) in the affine dtype, token by token with KV caches; CFG (STARFlow
        rule) when guidance > 0. y: labels (B,) or None (null label). guide_blocks: 'all' guides every block,
        'deep' only the deep block (run first); the shallow blocks then run on y alone with w = 0."""
        self._check(z, 'reverse')
        if not (isinstance(guidance, (int, float)) and math.isfinite(guidance) and guidance >= 0):
            raise ValueError(f"TARFlow.reverse: guidance must be a finite number >= 0, got {guidance!r}")
        if guide_blocks not in ('all', 'deep'):
            raise ValueError(f"TARFlow.reverse: guide_blocks must be 'all' or 'deep', got {guide_blocks!r}")
        B, N, _ = z.shape
        y = self._labels(y, B, z.device, 'reverse')
        labels = torch.cat([y, torch.full_like(y, self.null_label)]) if guidance > 0 else y  # one batch: [cond; null]
        heads = self.channels // self.head_dim
        caches = [torch.empty(labels.shape[0], 2, heads, N, self.head_dim, dtype=self._compute_dtype(z.device),
                              device=z.device) for _ in range(max(self.depths))]  # reused by every block
        x = z.to(_affine_dtype(z))
        for k, block in enumerate(reversed(self.blocks)):
            if k == 1 and guide_blocks == 'deep':  # shallow blocks: conditional half only, batch B
                labels, guidance, caches = y, 0.0, [cache[:B] for cache in caches]
            x = block.reverse(x, labels, caches, float(guidance))
        return x

    def score_step(self, x, y, gamma):
        """SimFlow's score step (SimFlow eq. 6) on samples x from `reverse`, by autograd of the exact log_prob:
        x + gamma * (grad_x log p(x|y) - grad_x log p(x|null)). Works under no_grad / inference mode; the result
        is detached, in the affine dtype."""
        self._check(x, 'score_step')
        if not (isinstance(gamma, (int, float)) and math.isfinite(gamma)):
            raise ValueError(f"TARFlow.score_step: gamma must be a finite number, got {gamma!r}")
        y = self._labels(y, x.shape[0], x.device, 'score_step')
        with torch.inference_mode(False), torch.enable_grad():
            xx = x.detach().repeat(2, 1, 1).requires_grad_(True)  # one batch [x; x] with labels [y; null]
            log_p = self.log_prob(xx, torch.cat([y, torch.full_like(y, self.null_label)]))
            grad_c, grad_u = torch.autograd.grad(log_p.sum(), xx)[0].chunk(2)  # examples are independent
        return (x.to(grad_c.dtype) + gamma * (grad_c - grad_u)).detach()

    def _compute_dtype(self, device):
        """The dtype the Transformer's keys and values come out in (autocast dtype if enabled)."""
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.blocks[0].proj_in.weight.dtype
