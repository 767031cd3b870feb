"""train_flow.py's sharding at toy scale, in 2 processes (gloo, CPU): --fsdp bf16 has the numerics
of plain bf16 autocast (losses, gradients, a float32 residual stream), activation checkpointing
changes nothing, the sample grid gathered one block at a time is TARFlow.reverse; a flow built on
the meta device and initialised is TARFlow(...) bit for bit, with the weights of earlier versions;
load_flow loads without a second copy and refuses weights that do not fit in one line."""

import os
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train_flow
from common import UserError
from tarflow import SIZES, TARFlow, Layer, fill, load_flow, nll_per_dim

TOY = dict(in_channels=4, num_tokens=8, num_classes=3)
BATCH = 8


def toy_args(precision):
    return types.SimpleNamespace(seed=3, model="tiny", fsdp=True, precision=precision, lr=1e-4)


def toy_stage1(capture):
    """What build_flow and sample_grid read of a stage 1; decode keeps the z_c it is given."""
    def decode(z_c):
        capture.append(z_c)
        return torch.zeros(len(z_c), 3, 8, 8)
    rae = types.SimpleNamespace(decoder=types.SimpleNamespace(num_patches=TOY["num_tokens"]))
    C = types.SimpleNamespace(d=TOY["in_channels"])
    return types.SimpleNamespace(C=C, rae=rae, mean2=torch.zeros(1), decode=decode)


def perturb(flow):
    """Every weight moved off its init (the zero gates would leave most gradients zero), the same
    numbers whether the flow is sharded or not."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in flow.named_parameters():
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            fill(p, full.detach().cpu() + 0.05 * torch.randn(p.shape, generator=gen))


def full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()


def pass_(flow, z, labels, precision):
    """Eq. 9 / (N d) on (z, labels) under the precision's autocast, backward; (loss, grads, the
    dtypes of every layer's input h)."""
    dtypes = []
    hooks = []
    for m in flow.modules():
        if isinstance(m, Layer):
            hooks.append(m.register_forward_pre_hook(lambda m, args: dtypes.append(args[0].dtype)))
    flow.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        u, logdet = flow(z, labels)
    loss = nll_per_dim(u, logdet).mean()
    loss.backward()
    for h in hooks:
        h.remove()
    grads = {name: full(p.grad) for name, p in flow.named_parameters()}
    return loss.detach(), grads, set(dtypes)


def worker(rank, world, tmp, precision):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    device = torch.device("cpu")
    capture = []
    stage1 = toy_stage1(capture)
    flow, ema, opt = train_flow.build_flow(toy_args(precision), stage1, TOY["num_classes"], device)
    built = {name: full(p) for name, p in flow.named_parameters()}
    ema_built = {name: full(p) for name, p in ema.named_parameters()}
    perturb(flow)
    perturb(ema)
    gen = torch.Generator().manual_seed(11)
    z = torch.randn(BATCH, TOY["num_tokens"], TOY["in_channels"], generator=gen)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])    # 3 = the null label
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    out = {}
    for checkpointing in (False, True):
        for block in flow.blocks:
            block.checkpointing = checkpointing
        loss, grads, dtypes = pass_(flow, z[rows], labels[rows], precision)
        dist.all_reduce(loss)
        out[checkpointing] = dict(loss=loss / world, grads=grads, dtypes=dtypes)
    train_flow.sample_grid(
        ema,
        stage1,
        guidance=1.5,
        seed=5,
        precision=precision,
        path=os.path.join(tmp, "grid.png") if rank == 0 else None,
    )
    if rank == 0:
        torch.save(dict(out=out, built=built, ema_built=ema_built, grid=capture[0],
                        fused=opt.defaults["fused"]), os.path.join(tmp, "fsdp.pt"))
    dist.destroy_process_group()


def reference(precision):
    """The same passes without sharding, from TARFlow(...) built under the seed: as DDP computes
    them (each half of the batch under autocast, the losses and gradients averaged) and on the
    whole batch at once; and the grid by TARFlow.reverse."""
    torch.manual_seed(toy_args(precision).seed)
    flow = TARFlow(**TOY, **SIZES["tiny"])
    built = {name: p.detach().clone() for name, p in flow.named_parameters()}
    perturb(flow)
    gen = torch.Generator().manual_seed(11)
    z = torch.randn(BATCH, TOY["num_tokens"], TOY["in_channels"], generator=gen)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    whole = pass_(flow, z, labels, precision)
    halves = []
    for rows in (slice(0, BATCH // 2), slice(BATCH // 2, BATCH)):
        halves.append(pass_(flow, z[rows], labels[rows], precision))
    ddp_loss = (halves[0][0] + halves[1][0]) / 2
    ddp_grads = {}
    for name in whole[1]:
        ddp_grads[name] = (halves[0][1][name] + halves[1][1][name]) / 2
    gen = torch.Generator().manual_seed(5)
    u = torch.randn(train_flow.GRID_SAMPLES, TOY["num_tokens"], TOY["in_channels"], generator=gen)
    grid_labels = torch.arange(train_flow.GRID_SAMPLES) % TOY["num_classes"]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        grid = flow.eval().reverse(u, grid_labels, guidance=1.5)
    return dict(built=built, ddp=(ddp_loss, ddp_grads, halves[0][2]), whole=whole, grid=grid)


def max_rel_diff(a, b):
    """The largest difference of two gradient dicts, relative to each gradient's largest entry."""
    diffs = []
    for k in a:
        diffs.append(((a[k] - b[k]).abs().max() / b[k].abs().max()).item())
    return max(diffs)


def test_fsdp_bf16_has_the_numerics_of_autocast(tmp_path):
    """2 processes --fsdp bf16 (each half the batch) against plain bf16 autocast on the same batch,
    from build_flow's weights moved off their init. The layers gathered in bf16 and the blocks'
    own weights in float32 give autocast's numbers: every layer's input h is float32 in both, and
    the loss and gradients equal DDP's computation (each half under autocast, averaged); measured
    equal bit for bit, tolerance 1e-6 relative (the cross-rank average's rounding). Against the
    whole batch in one pass the bf16 roundings of the per-half gradient sums move: measured
    |dloss| 0 and gradients 5.5e-3 of their largest entry, tolerances 1e-5 and 2e-2. (With the
    embeddings gathered in bf16, as before, h was bf16: |dloss| 1.2e-2, gradients 3.7e-2.)
    Activation checkpointing (the per-layer units inside the recomputation) gives the same loss
    and gradients bit for bit. The grid (EMA blocks gathered one at a time, their layers in bf16)
    is TARFlow.reverse under autocast bit for bit. AdamW is fused only on CUDA."""
    mp.spawn(worker, args=(2, str(tmp_path), "bf16"), nprocs=2)
    got = torch.load(tmp_path / "fsdp.pt")
    ref = reference("bf16")
    for name in ref["built"]:       # build_flow's flow and EMA: TARFlow(...) under the seed
        assert torch.equal(got["built"][name], ref["built"][name]), name
        assert torch.equal(got["ema_built"][name], ref["built"][name]), name
    plain = got["out"][False]
    ddp_loss, ddp_grads, ddp_dtypes = ref["ddp"]
    assert plain["dtypes"] == ddp_dtypes == {torch.float32}
    assert abs(plain["loss"] - ddp_loss) <= 1e-6 * abs(ddp_loss)
    assert max_rel_diff(plain["grads"], ddp_grads) <= 1e-6
    whole_loss, whole_grads, _ = ref["whole"]
    assert abs(plain["loss"] - whole_loss) < 1e-5
    assert max_rel_diff(plain["grads"], whole_grads) < 2e-2
    checkpointed = got["out"][True]
    assert torch.equal(checkpointed["loss"], plain["loss"])
    assert max_rel_diff(checkpointed["grads"], plain["grads"]) == 0
    assert torch.equal(got["grid"], ref["grid"])
    assert got["fused"] is False


def test_meta_built_flow_is_the_flow_built_normally(tmp_path):
    """The meta device, to_empty and init_weights (train_flow.py's way) give TARFlow(...)'s
    weights bit for bit under the same seed, and these are the weights the code before meta
    building drew (a checksum and the next random number recorded from it: same draws, same
    order). load_flow assigns the checkpoint's tensors (no second copy) and refuses weights that
    do not fit the config in one line."""
    config = dict(in_channels=4, num_tokens=8, channels=64, depths=[1, 2], head_dim=32,
                  num_classes=3, permutations=[[3, 1, 0, 2, 4, 5, 7, 6], list(range(8))])
    torch.manual_seed(0)
    plain = TARFlow(**config)
    with torch.device("meta"):
        meta = TARFlow(**config)
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    torch.manual_seed(0)
    meta.init_weights()
    for (name, a), b in zip(plain.state_dict().items(), meta.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(plain.buffers(), meta.buffers()):
        assert torch.equal(a, b)
    torch.manual_seed(0)
    earlier = TARFlow(**{**config, "permutations": None})
    total = 0.0
    for k, p in enumerate(earlier.parameters()):
        flat = p.detach().double().flatten()
        position = torch.arange(1, len(flat) + 1, dtype=torch.float64)
        total += (k + 1) * (flat * position).sum().item()
    assert total == pytest.approx(-1653713.4936227363, rel=1e-9)
    assert torch.rand(1).item() == pytest.approx(0.9321017861366272, rel=1e-7)
    ckpt = dict(stage="flow", flow_kind="TARFlow", flow_config=plain.config(),
                flow=plain.state_dict(), flow_ema=plain.state_dict())
    torch.save(ckpt, tmp_path / "flow.pt")
    loaded, _ = load_flow(str(tmp_path / "flow.pt"))
    for (name, a), b in zip(plain.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    x = torch.randn(2, 8, 4)
    assert torch.equal(loaded(x)[0], plain(x)[0])                 # the orders placed too
    del ckpt["flow_ema"]["blocks.1.pos_embed"]
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(UserError, match=r"bad.pt: its weights do not fit its flow_config: "
                                        r"Missing key.*blocks.1.pos_embed") as e:
        load_flow(str(tmp_path / "bad.pt"))
    assert "\n" not in str(e.value)
