"""Transformer autoregressive affine flow (TARFlow) with SimFlow's upgrades: paper §2, eq. 2, 3, 9.

The flow f = f_{K-1} o ... o f_0 maps the compact tokens z_c (B, N, d) to the prior variable
u = f(z_c) ~ N(0, I). Block k reads its input y^k in its own token order (identity, reversed,
identity, ... by default) and moves each token with an affine map (eq. 3):

    y^{k+1}_i = (y^k_i - mu^k_i) * exp(-alpha^k_i),      y^k_i = y^{k+1}_i * exp(alpha^k_i) + mu^k_i

(mu^k_i, alpha^k_i) come from a causal Transformer over the tokens read before token i, so the
Jacobian is triangular and the likelihood exact: log p(z_c | c) = log N(u; 0, I) + log|det|,
log|det| = -sum alpha (eq. 2); training minimises 0.5 ||u||^2 + sum alpha (eq. 9). SimFlow's
choices: deep-shallow depths [2, 2, 2, 2, 2, L] with the deep block last in the data -> prior
direction (first when sampling), adaLN-Zero class conditioning (DiT), and a null label for
label dropout and the unconditional half of classifier-free guidance: `None` at the API
(labels=None), `self.null_label` = num_classes inside (the class embedding's last row).

Sampling (`reverse`) inverts the blocks token by token with preallocated key/value caches. With
guidance w > 0 the conditional and null-label passes run as one batch [cond; null], each token's
two Gaussians combined by a guidance rule (sigma = exp(alpha); STARFlow's by default); both
halves continue from the guided token. guide_blocks='deep' guides the deep block only and runs
the shallow blocks conditional and unguided: STARFlow's `guide_top` sampling mode (not its
`cond_top_only` model, whose shallow blocks are trained without labels). STARFlow's rule:

    s = min(sigma_c / sigma_u, 1)^2,   sigma = sigma_c / sqrt(1 + w - w s),
    mu = ((1 + w) mu_c - w s mu_u) / (1 + w - w s)

A fork adds a guidance rule to GUIDANCE_RULES (beside guided_gaussian): a name -> a function
(mu_c, alpha_c, mu_u, alpha_u, w) -> (mu, sigma), with its reference formula in
tests/reference.py's REFERENCE_RULES. reverse(rule=...), sample.py --guidance-rule,
evaluate.py's sweep and the guidance tests read the dict.

Training (`forward`) computes each layer's adaLN modulation inside the layer, from the block's
c = SiLU(class embedding), so that a layer is one unit of train_flow.py's sharding; sampling
computes every layer's once per block (`conditioning`) for all its token steps. The Transformer
may run under bf16 autocast; the residual stream, the affine arithmetic, the log-det and the
tokens between blocks stay in float32 (float64 for a float64 flow and input).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint

from common import UserError, load_checkpoint

# Model sizes (SimFlow Table 8; 'tiny' for toy runs and tests). With 1000 classes, d = 32 and
# 256 tokens: S 37M, B 141M, L 475M, XL 695M and XXL 1.36B. XXL's deep block has 46 layers, as
# SimFlow's §5 and its 1.4B count say (its Table 8 prints 36: 1.12B). 'XXL-2048' is XXL at width
# 2048 (4.3B): the paper's full-representation baseline (its Table 1).
SIZES = {
    'tiny': dict(channels=64, head_dim=32, depths=[1, 1, 1, 1, 1, 2]),
    'S': dict(channels=384, head_dim=64, depths=[2, 2, 2, 2, 2, 2]),
    'B': dict(channels=768, head_dim=64, depths=[2, 2, 2, 2, 2, 2]),
    'L': dict(channels=1024, head_dim=64, depths=[2, 2, 2, 2, 2, 14]),
    'XL': dict(channels=1152, head_dim=72, depths=[2, 2, 2, 2, 2, 18]),
    'XXL': dict(channels=1152, head_dim=72, depths=[2, 2, 2, 2, 2, 46]),
    'XXL-2048': dict(channels=2048, head_dim=128, depths=[2, 2, 2, 2, 2, 46]),
}
# -log N(0; 0, 1): the Gaussian constant per dimension
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
LN_EPS = 1e-6
# score_step's images per autograd pass: XXL keeps ~0.75 GB of activations for each
SCORE_CHUNK = 16


def modulate(x, shift, scale):
    """adaLN: a LayerNorm output x scaled and shifted by the class (DiT's modulate)."""
    return x * (1 + scale) + shift


class Attention(nn.Module):
    """Causal multi-head self-attention; `step` attends one new token to a preallocated cache."""

    def __init__(self, channels, head_dim):
        super().__init__()
        self.num_heads = channels // head_dim
        self.head_dim = head_dim
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))

    def step(self, x, cache, i):
        """x (B, 1, C): token i. cache (B, 2, heads, N, head_dim): keys and values, written at i."""
        B, _, C = x.shape
        qkv = self.qkv(x).view(B, 3, self.num_heads, self.head_dim)
        cache[:, :, :, i] = qkv[:, 1:]  # this token's key and value
        q = qkv[:, 0].unsqueeze(2)  # (B, heads, 1, head_dim)
        keys = cache[:, 0, :, :i + 1]
        values = cache[:, 1, :, :i + 1]
        x = F.scaled_dot_product_attention(q, keys, values)
        return self.proj(x.reshape(B, 1, C))


class Layer(nn.Module):
    """Pre-LN Transformer layer with adaLN-Zero class modulation (DiT, SimFlow)."""

    def __init__(self, channels, head_dim, mlp_ratio):
        super().__init__()
        hidden = int(channels * mlp_ratio)
        self.norm1 = nn.LayerNorm(channels, elementwise_affine=False, eps=LN_EPS)
        self.attn = Attention(channels, head_dim)
        self.norm2 = nn.LayerNorm(channels, elementwise_affine=False, eps=LN_EPS)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(),
                                 nn.Linear(hidden, channels))
        # adaLN-Zero: zero-initialised, so the gates start closed
        self.ada = nn.Linear(channels, 6 * channels)

    def modulation(self, c):
        """c = SiLU(class embedding) (B, C) -> shift, scale, gate of attention and MLP, each
        (B, 1, C)."""
        return self.ada(c).unsqueeze(1).chunk(6, dim=-1)

    def forward(self, h, c):
        """Training: h (B, N, C) with c (B, C). The layer computes its own modulation, so that
        train_flow.py --fsdp gathers its adaLN weights with the rest of the layer (one unit)."""
        return self.residual(h, self.modulation(c), self.attn)

    def step(self, h, mod, cache, i):
        """Sampling: forward() for token i alone (B, 1, C), with the modulation computed once
        per block (FlowBlock.conditioning); its key and value are written into cache."""
        return self.residual(h, mod, lambda x: self.attn.step(x, cache, i))

    def residual(self, h, mod, attend):
        """The two adaLN-Zero residual branches: h + gate * branch(modulate(norm(h)))."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        h = h + gate_msa * attend(modulate(self.norm1(h), shift_msa, scale_msa))
        return h + gate_mlp * self.mlp(modulate(self.norm2(h), shift_mlp, scale_mlp))


def guided_gaussian(mu_c, alpha_c, mu_u, alpha_u, w):
    """STARFlow's guided Gaussian per element, sigma = exp(alpha): s = min(sigma_c / sigma_u, 1)^2,
    sigma = sigma_c / sqrt(1 + w - w s), mu = ((1 + w) mu_c - w s mu_u) / (1 + w - w s)."""
    s = torch.exp(2 * (alpha_c - alpha_u).clamp(max=0))
    denom = 1 + w - w * s  # >= 1 since s <= 1
    mu = ((1 + w) * mu_c - w * s * mu_u) / denom
    sigma = torch.exp(alpha_c) * denom.rsqrt()
    return mu, sigma


# The guidance rules by name: function(mu_c, alpha_c, mu_u, alpha_u, w) -> (mu, sigma) of the
# guided Gaussian. A fork adds its rule here (and its reference to tests/reference.py).
GUIDANCE_RULES = {"starflow": guided_gaussian}
# The blocks guided: every one, or the deep one only (STARFlow's guide_top)
GUIDE_BLOCKS = ("all", "deep")


def affine_dtype(x):
    """The affine arithmetic runs in float32 at least (float64 stays float64)."""
    return torch.promote_types(x.dtype, torch.float32)


class FlowBlock(nn.Module):
    """One autoregressive affine block f_k (eq. 3); step i reads token perm[i]."""

    def __init__(self, in_channels, num_tokens, channels, depth, head_dim, num_classes, mlp_ratio,
                 perm):
        super().__init__()
        self.set_order(perm)
        self.proj_in = nn.Linear(in_channels, channels)
        # position embeddings by reading step; the class embedding's last row is the null label
        self.pos_embed = nn.Parameter(torch.empty(num_tokens, channels))
        self.class_embed = nn.Embedding(num_classes + 1, channels)
        layers = [Layer(channels, head_dim, mlp_ratio) for _ in range(depth)]
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(channels, elementwise_affine=False, eps=LN_EPS)
        self.ada_out = nn.Linear(channels, 2 * channels)
        # zero-initialised, so a new block gives mu = alpha = 0: the identity
        self.proj_out = nn.Linear(channels, 2 * in_channels)
        # train_flow.py --checkpoint-activations: recompute the layers in backward
        self.checkpointing = False

    def set_order(self, perm, device=None):
        """Step i reads token perm[i]. The permutation is data (the flow's config), not state:
        its index buffers are not saved, and are set again on a flow built on the meta device."""
        natural = list(range(len(perm)))
        inverse = sorted(natural, key=perm.__getitem__)
        self.order = 'gather'
        if perm == natural:
            self.order = 'identity'
        if perm == natural[::-1]:
            self.order = 'reversed'
        self.register_buffer('perm', torch.tensor(perm, device=device), persistent=False)
        self.register_buffer('inv_perm', torch.tensor(inverse, device=device), persistent=False)

    def permute(self, y, inverse=False):
        """Natural token order -> this block's reading order (inverse=True: back)."""
        if self.order == 'identity':
            return y
        if self.order == 'reversed':
            return y.flip(1)
        return y.index_select(1, self.inv_perm if inverse else self.perm)

    def condition(self, labels):
        """c = SiLU(class embedding of labels (B,)) (B, C): what every adaLN modulation reads."""
        return F.silu(self.class_embed(labels))

    def out_modulation(self, c):
        """The output layer's shift and scale (each (B, 1, C)) from c."""
        out_shift, out_scale = self.ada_out(c).unsqueeze(1).chunk(2, dim=-1)
        return out_shift, out_scale

    def conditioning(self, labels):
        """Sampling: the adaLN modulations of every layer and of the output for labels (B,),
        computed once for all the token steps."""
        c = self.condition(labels)
        layer_mods = [layer.modulation(c) for layer in self.layers]
        return layer_mods, self.out_modulation(c)

    def head(self, h, out_mod):
        """The last hidden states (B, n, C) -> [mu, alpha] for the next token (B, n, 2d)."""
        out_shift, out_scale = out_mod
        return self.proj_out(modulate(self.norm(h), out_shift, out_scale))

    def params(self, y, c):
        """(mu, alpha) of every token of y (B, N, d), already in reading order: token i sees
        y_{<i}. c = condition(labels); each layer computes its modulation from it."""
        h = self.proj_in(y.to(self.proj_in.weight.dtype)) + self.pos_embed
        for layer in self.layers:
            if self.checkpointing and torch.is_grad_enabled():
                h = checkpoint(layer, h, c, use_reentrant=False)
            else:
                h = layer(h, c)
        out = self.head(h, self.out_modulation(c))
        # shift by one, so token i's (mu, alpha) come from tokens < i; token 0 gets 0, 0
        out = F.pad(out[:, :-1], (0, 0, 1, 0))
        mu, alpha = out.to(affine_dtype(y)).chunk(2, dim=-1)
        return mu, alpha

    def forward(self, y, labels):
        """Eq. 3 forward: y^{k+1} = (y^k - mu) * exp(-alpha); returns it and
        log|det| = -sum alpha."""
        y = self.permute(y)
        mu, alpha = self.params(y, self.condition(labels))
        y_next = (y.to(mu.dtype) - mu) * torch.exp(-alpha)
        return self.permute(y_next, inverse=True), -alpha.sum(dim=(1, 2))

    def step(self, token, i, layer_mods, out_mod, caches):
        """Token i (B, 1, d) of y^k -> (mu, alpha) of token i + 1, each (B, d)."""
        h = self.proj_in(token.to(self.proj_in.weight.dtype)) + self.pos_embed[i]
        # each layer attends to the cached keys and values of tokens 0..i, then adds token i's
        for layer, mod, cache in zip(self.layers, layer_mods, caches):
            h = layer.step(h, mod, cache, i)
        # back to the affine dtype: the arithmetic of eq. 3 stays in float32 (or float64)
        out = self.head(h, out_mod)[:, 0].to(token.dtype)
        mu, alpha = out.chunk(2, dim=-1)
        return mu, alpha

    def reverse(self, y_next, labels, caches, guidance=0.0, rule='starflow'):
        """Eq. 3 inverse, token by token: y^k from y^{k+1} (B, N, d). Guided (guidance > 0), the
        labels are [cond; null] (2B,): both halves run as one batch, their Gaussians combine
        (GUIDANCE_RULES[rule]), and both read the same guided token at the next step."""
        guided = guidance > 0
        combine = GUIDANCE_RULES[rule]
        y_next = self.permute(y_next)
        layer_mods, out_mod = self.conditioning(labels)
        y = torch.empty_like(y_next)
        y[:, 0] = y_next[:, 0]  # the first token read: mu = 0, alpha = 0
        for i in range(y.shape[1] - 1):
            token = y[:, i:i + 1]
            if guided:  # the same token for the cond and null halves
                token = torch.cat([token, token])
            mu, alpha = self.step(token, i, layer_mods, out_mod, caches)
            if guided:
                mu_c, mu_u = mu.chunk(2)
                alpha_c, alpha_u = alpha.chunk(2)
                mu, sigma = combine(mu_c, alpha_c, mu_u, alpha_u, w=guidance)
            else:
                sigma = torch.exp(alpha)
            # eq. 3's inverse: y^k_i = y^{k+1}_i * sigma + mu
            y[:, i + 1] = y_next[:, i + 1] * sigma + mu
        return self.permute(y, inverse=True)


def fill(param, value):
    """param <- value, a host tensor of param's full shape: this rank's rows if FSDP sharded it."""
    if isinstance(param, DTensor):
        value = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(value)


class TARFlow(nn.Module):
    """K = len(depths) autoregressive affine blocks over tokens (B, num_tokens, in_channels).
    Built on the default device, or on the meta device under `with torch.device('meta')`
    (no memory, no weights: then to_empty and init_weights, or load_state_dict(assign=True))."""

    def __init__(self, in_channels, num_tokens, channels, depths, head_dim=64, num_classes=0,
                 mlp_ratio=4.0, permutations=None):
        super().__init__()
        depths = list(depths)
        check_config(in_channels, num_tokens, channels, depths, head_dim, num_classes)
        natural = list(range(num_tokens))
        # the default orders: identity, reversed, identity, ...
        if permutations is None:
            permutations = []
            for k in range(len(depths)):
                permutations.append(natural[::-1] if k % 2 else natural)
        perms = check_permutations(permutations, len(depths), num_tokens)
        self.in_channels = in_channels
        self.num_tokens = num_tokens
        self.channels = channels
        self.depths = depths
        self.head_dim = head_dim
        self.num_classes = num_classes
        self.mlp_ratio = mlp_ratio
        self.permutations = perms
        self.null_label = num_classes
        # the modules are built on the meta device, then placed and drawn by init_weights: one
        # way to initialise, whether or not the caller builds on the meta device
        device = torch.get_default_device()
        blocks = []
        with torch.device('meta'):
            for depth, perm in zip(depths, perms):
                block = FlowBlock(
                    in_channels=in_channels,
                    num_tokens=num_tokens,
                    channels=channels,
                    depth=depth,
                    head_dim=head_dim,
                    num_classes=num_classes,
                    mlp_ratio=mlp_ratio,
                    perm=perm,
                )
                blocks.append(block)
        self.blocks = nn.ModuleList(blocks)
        if device.type != 'meta':
            self.to_empty(device=device)
            self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """The orders and all the weights of a flow placed by to_empty (train_flow.py builds on
        the meta device, shards, then calls this). Each weight is drawn whole on the host from
        torch's default generator, in the order TARFlow has always drawn them (a seed gives the
        weights of earlier versions), and copied into its parameter, this rank's rows if sharded:
        per block, PyTorch's default init of each module as it was built (drawn and dropped) and
        pos_embed ~ N(0, 0.02^2) after proj_in's; then xavier-uniform linears with zero biases and
        N(0, 0.02^2) class embeddings. adaLN-Zero and a zero output layer make a new flow the
        identity."""
        self.set_orders(self.blocks[0].pos_embed.device)
        for block in self.blocks:
            for m in block.modules():
                # the draws of PyTorch's default init, as the module was built (values dropped)
                if isinstance(m, nn.Linear):
                    nn.Linear(m.in_features, m.out_features, device='cpu')
                elif isinstance(m, nn.Embedding):
                    nn.Embedding(m.num_embeddings, m.embedding_dim, device='cpu')
                if m is block.proj_in:
                    pos_embed = torch.randn(block.pos_embed.shape, device='cpu') * 0.02
                    fill(block.pos_embed, pos_embed)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                weight = torch.empty(m.weight.shape, device='cpu')
                fill(m.weight, nn.init.xavier_uniform_(weight))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                weight = torch.empty(m.weight.shape, device='cpu')
                fill(m.weight, nn.init.normal_(weight, std=0.02))
        for block in self.blocks:
            zero = [block.ada_out, block.proj_out] + [layer.ada for layer in block.layers]
            for m in zero:
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)

    def set_orders(self, device):
        """Each block's order as index buffers on device."""
        for block, perm in zip(self.blocks, self.permutations):
            block.set_order(perm, device)

    def config(self):
        """The constructor arguments, as flow checkpoints store them (`flow_config`)."""
        return dict(
            in_channels=self.in_channels,
            num_tokens=self.num_tokens,
            channels=self.channels,
            depths=list(self.depths),
            head_dim=self.head_dim,
            num_classes=self.num_classes,
            mlp_ratio=self.mlp_ratio,
            permutations=[list(p) for p in self.permutations],
        )

    def forward(self, z_c, labels=None):
        """Data -> prior: u = f(z_c) (B, N, d) and log|det df/dz_c| (B,), summed over all blocks."""
        self.check_tokens(z_c, 'forward')
        labels = self.check_labels(labels, z_c.shape[0], z_c.device, 'forward')
        y = z_c
        logdet = 0
        for block in self.blocks:
            y, block_logdet = block(y, labels)
            logdet = logdet + block_logdet
        return y, logdet

    def log_prob(self, z_c, labels=None):
        """Eq. 2: the exact log p(z_c | labels) in nats per example (B,), the Gaussian constant
        included."""
        u, logdet = self(z_c, labels)
        dims = u.shape[1] * u.shape[2]
        return -0.5 * u.pow(2).sum(dim=(1, 2)) - dims * HALF_LOG_2PI + logdet

    @torch.no_grad()
    def reverse(self, u, labels=None, guidance=0.0, guide_blocks='all', rule='starflow'):
        """Prior -> data: z_c = f^{-1}(u) (B, N, d) in the affine dtype, with KV caches. labels
        (B,) or None (the null label); guidance w > 0: classifier-free guidance by
        GUIDANCE_RULES[rule] in every block (guide_blocks='all') or in the deep one ('deep',
        STARFlow's guide_top: the shallow ones stay conditional with w = 0)."""
        self.check_tokens(u, 'reverse')
        check_guidance(guidance, guide_blocks, rule)
        B = u.shape[0]
        labels = self.check_labels(labels, B, u.device, 'reverse')
        guided = guidance > 0
        null = torch.full_like(labels, self.null_label)
        # one batch [cond; null] when guided; the caches are reused by every block
        batch_labels = torch.cat([labels, null]) if guided else labels
        caches = self.new_caches(len(batch_labels), u.device)
        deep_block = self.blocks[-1]  # the last block of f, the first one inverted
        y = u.to(affine_dtype(u))
        y = deep_block.reverse(y, batch_labels, caches, guidance=guidance, rule=rule)
        # 'deep': the shallow blocks run on the conditional half only, with w = 0
        if guide_blocks == 'deep' and guided:
            batch_labels = labels
            guidance = 0.0
            caches = [cache[:B] for cache in caches]
        for block in reversed(self.blocks[:-1]):
            y = block.reverse(y, batch_labels, caches, guidance=guidance, rule=rule)
        return y

    def new_caches(self, batch, device):
        """One (batch, 2, heads, N, head_dim) key/value cache per layer of the deepest block."""
        heads = self.channels // self.head_dim
        shape = (batch, 2, heads, self.num_tokens, self.head_dim)
        dtype = self.compute_dtype(device)
        caches = []
        for _ in range(max(self.depths)):
            caches.append(torch.empty(shape, dtype=dtype, device=device))
        return caches

    def score_step(self, z_c, labels, gamma, chunk=SCORE_CHUNK):
        """SimFlow's score step (SimFlow eq. 6) on samples z_c from `reverse`, with exact gradients:
        z_c + gamma * (grad log p(z_c | labels) - grad log p(z_c | null)). Autograd keeps every
        layer's activations, so `chunk` images are taken at a time. Works under no_grad and
        inference mode; the result is detached, in the affine dtype."""
        self.check_tokens(z_c, 'score_step')
        if not (isinstance(gamma, (int, float)) and math.isfinite(gamma)):
            raise ValueError(f"TARFlow.score_step: gamma must be a finite number, got {gamma!r}")
        labels = self.check_labels(labels, z_c.shape[0], z_c.device, 'score_step')
        steps = []
        for start in range(0, len(z_c), chunk):
            part = slice(start, start + chunk)
            null = torch.full_like(labels[part], self.null_label)
            with torch.inference_mode(False), torch.enable_grad():
                # one batch [z_c; z_c] with the labels [cond; null]
                both = z_c[part].detach().repeat(2, 1, 1).requires_grad_(True)
                log_p = self.log_prob(both, torch.cat([labels[part], null]))
                grad = torch.autograd.grad(log_p.sum(), both)[0]  # examples are independent
            grad_c, grad_u = grad.chunk(2)
            steps.append(z_c[part].to(grad_c.dtype) + gamma * (grad_c - grad_u))
        return torch.cat(steps).detach()

    def cast_linears(self, dtype):
        """The Linear weights in dtype (bf16 to sample under bf16 autocast, which caches its casts
        only for weights that need grad: a frozen fp32 flow is re-cast at every token step). The
        same numbers; embeddings and the affine arithmetic keep their dtype."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.to(dtype)
        return self

    def compute_dtype(self, device):
        """The dtype of the Transformer's keys and values: the autocast dtype if enabled."""
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.blocks[0].proj_in.weight.dtype

    def check_tokens(self, x, name):
        """One-line error unless x is float tokens (B, num_tokens, in_channels)."""
        shape = (self.num_tokens, self.in_channels)
        ok = torch.is_tensor(x) and x.dim() == 3 and tuple(x.shape[1:]) == shape
        if not (ok and x.is_floating_point()):
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"TARFlow.{name}: expected float tokens of shape "
                             f"(B, {shape[0]}, {shape[1]}), got {got}")

    def check_labels(self, labels, B, device, name):
        """Class labels (B,) in [0, num_classes] as int64. None (the API's "no label") becomes
        self.null_label for every example."""
        if labels is None:
            return torch.full((B,), self.null_label, dtype=torch.long, device=device)
        integer = torch.is_tensor(labels) and labels.dtype in (torch.int32, torch.int64)
        if not integer or labels.shape != (B,):
            got = type(labels).__name__
            if torch.is_tensor(labels):
                got = f"{tuple(labels.shape)} {labels.dtype}"
            raise ValueError(f"TARFlow.{name}: expected integer labels of shape ({B},), got {got}")
        # Range check on CPU labels only: on an accelerator it would cost a host sync every step.
        on_cpu = labels.device.type == 'cpu' and not torch.compiler.is_compiling()
        low = int(labels.min()) if B and on_cpu else 0
        high = int(labels.max()) if B and on_cpu else 0
        if low < 0 or high > self.null_label:
            raise ValueError(f"TARFlow.{name}: labels must lie in [0, {self.null_label}] "
                             f"({self.null_label} = null label), got [{low}, {high}]")
        return labels.to(device=device, dtype=torch.long)


# ---- Eq. 9: the training loss, and the likelihood in bits
def nll_per_dim(u, logdet):
    """Eq. 9 per example divided by N d, in nats: (0.5 ||u||^2 - log|det|) / (N d). This is
    -log p(z_c) / (N d) without the Gaussian constant HALF_LOG_2PI (the training loss)."""
    dims = u.shape[1] * u.shape[2]
    return (0.5 * u.pow(2).sum(dim=(1, 2)) - logdet) / dims


def bits_per_dim(nll):
    """nll_per_dim (nats, eq. 9 / (N d)) -> -log2 p(z_c) / (N d): the Gaussian constant added."""
    return (nll + HALF_LOG_2PI) / math.log(2)


# ---- Argument checks of TARFlow's constructor and reverse (one-line errors)
def check_config(in_channels, num_tokens, channels, depths, head_dim, num_classes):
    """One-line errors for a TARFlow that cannot be built."""
    if min(in_channels, num_tokens, channels, head_dim) <= 0:
        raise ValueError(f"TARFlow: in_channels, num_tokens, channels, head_dim must be positive, "
                         f"got {in_channels}, {num_tokens}, {channels}, {head_dim}")
    if channels % head_dim:
        raise ValueError(f"TARFlow: channels={channels} is not a multiple of head_dim={head_dim}")
    if not depths or any(int(n) != n or n < 1 for n in depths):
        raise ValueError(f"TARFlow: depths must be a non-empty list of positive layer counts, "
                         f"got {depths}")
    if num_classes < 0:
        raise ValueError(f"TARFlow: num_classes must be >= 0, got {num_classes}")


def check_permutations(permutations, num_blocks, num_tokens):
    """The block orders as lists of ints, one permutation of range(num_tokens) per block."""
    natural = list(range(num_tokens))
    perms = []
    for p in permutations:
        if isinstance(p, (list, tuple)) and all(type(i) is int for i in p):
            perms.append(list(p))
    ok = len(perms) == len(permutations) == num_blocks
    if not ok or any(sorted(p) != natural for p in perms):
        raise ValueError(f"TARFlow: permutations must be None or {num_blocks} lists of ints (one "
                         f"per block), each a permutation of range({num_tokens})")
    return perms


def check_guidance(guidance, guide_blocks, rule):
    """One-line errors for a guidance scale w < 0, a guide_blocks not in GUIDE_BLOCKS or a rule
    not in GUIDANCE_RULES."""
    finite = isinstance(guidance, (int, float)) and math.isfinite(guidance)
    if not (finite and guidance >= 0):
        raise ValueError(f"TARFlow.reverse: guidance must be a finite number >= 0, "
                         f"got {guidance!r}")
    if guide_blocks not in GUIDE_BLOCKS:
        blocks = " or ".join(repr(b) for b in GUIDE_BLOCKS)
        raise ValueError(f"TARFlow.reverse: guide_blocks must be {blocks}, got {guide_blocks!r}")
    if not (isinstance(rule, str) and rule in GUIDANCE_RULES):
        rules = ", ".join(GUIDANCE_RULES)
        raise ValueError(f"TARFlow.reverse: rule must be one of GUIDANCE_RULES ({rules}), "
                         f"got {rule!r}")


# ---- Checkpoints
def load_flow(path, device="cpu", ema=True):
    """(flow, record) of a train_flow.py checkpoint: the flow rebuilt from its stored kind and
    config (EMA weights by default), in eval mode without gradients; record is the checkpoint
    without its weights, optimizer and RNG states. Built on the meta device, the flow takes the
    checkpoint's tensors as they are read: on the CPU its weights stay memory-mapped from the
    file (copy-on-write), no second copy."""
    ckpt = load_checkpoint(path, "flow")
    if ckpt.get("flow_kind") != TARFlow.__name__:
        raise UserError(f"{path}: flow kind {ckpt.get('flow_kind')!r}; this code builds "
                        f"{TARFlow.__name__}")
    key = "flow_ema" if ema else "flow"
    if key not in ckpt:  # an --fsdp run's checkpoint.pt holds the EMA only
        raise UserError(f"{path}: holds no raw weights ('{key}'); an --fsdp run keeps them in "
                        f"the shards-<step>/ folder it names: sample its EMA (drop --no-ema)")
    with torch.device("meta"):
        flow = TARFlow(**ckpt["flow_config"])
    try:
        flow.load_state_dict(ckpt[key], assign=True)
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        detail = lines[1].strip() if len(lines) > 1 else lines[0]
        detail = detail[:200]
        raise UserError(f"{path}: its weights do not fit its flow_config: {detail}") from None
    flow.set_orders(device)
    for key in ("flow", "flow_ema", "optimizer", "rng"):
        ckpt.pop(key, None)
    flow = flow.to(device).eval().requires_grad_(False)
    return flow, ckpt
