"""What a fork of stage 1 changes either works end to end or is refused at start-up with one line: every
compressor flag reaches the kind's constructor or is refused, flags the set-up does not use are refused, --resume
rebuilds what the checkpoint records (flags, compressor config, E's weights, RAE statistics) and a record that
lacks a newer option resumes with its default, and a GAN that would find no last layer is refused before the first
step, for every kind of src.COMPRESSORS and a fork's."""

import os
import shutil

import pytest
import torch

import losses
import rae
import src
import test_train
import train_src
from common import UserError
from src import SRC, Linear, Stage1
from test_train import TINY_DECODER, cli, compressor_flags, load, src_args, tiny_rae, toy  # noqa: F401


def errors(err):
    return [line for line in err.splitlines() if line.startswith("error: ")]


def refused(args, capsys, match):
    """train_src.py refuses args with one error line that contains `match`, before the statistics pass."""
    code, (out, err) = cli(train_src, args, capsys, "both")
    lines = errors(err)
    assert code == 2 and len(lines) == 1 and match in lines[0] and "Traceback" not in err, err
    assert "computing the RAE statistics" not in out
    return lines[0]


@pytest.fixture(scope="module")
def stats(toy):
    """A stat.pt for --rae-stats (no statistics pass: the runs stay short)."""
    path = toy / "fork_stats" / "stat.pt"
    os.makedirs(path.parent)
    torch.manual_seed(3)
    torch.save(dict(mean=torch.randn(64), var=torch.rand(64) + 0.5), path)
    return path


def base_args(toy, stats, out, extra=()):
    return src_args(toy, out, ["--rae-stats", stats, "--max-steps", 1, "--grid-every", 0, *extra])


@pytest.fixture(scope="module")
def base(toy, stats):
    """One step of the tiny SRC (d = 8, L = 1) with D trained: the run every --resume below continues."""
    out = toy / "fork_base"
    train_src.main(train_src.build_parser().parse_args([str(a) for a in base_args(toy, stats, out)]))
    return out


# -----------------------------------------------------------------------------
# Every flag shapes what is built or is refused

def test_src_depth_reaches_the_conv_compressor_and_is_refused_where_there_is_none(toy, stats, capsys):
    out = toy / "fork_conv"
    args = src_args(toy, out, ["--rae-stats", stats, "--max-steps", 1, "--grid-every", 0], kind="conv")
    assert "--src-depth" in args and cli(train_src, args, capsys)[0] == 0
    comp = load(out / "checkpoint.pt")["compressor"]
    assert comp["kind"] == "conv" and comp["config"]["depth"] == 1 and comp["config"]["d"] == 8
    assert len(comp["state"]) == len(src.Conv(n=64, d=8, depth=1).state_dict())
    # a kind whose constructor lacks the flag's argument: one line, naming its arguments
    line = refused(src_args(toy, toy / "fork_no", ["--src-depth", 2], kind="linear"), capsys, "--src-depth")
    assert line == "error: --src-depth: compressor 'linear' has no depth (its arguments: n, d)"
    line = refused(src_args(toy, toy / "fork_no", ["--src-dim", 4], kind="identity"), capsys, "--src-dim")
    assert line == "error: --src-dim: compressor 'identity' has no d (its arguments: n)"
    # a size the constructor refuses: one line too
    refused(src_args(toy, toy / "fork_no", ["--src-depth", -1]), capsys, "--compressor src: SRC: depth=-1")


def test_flags_the_set_up_does_not_use_are_refused(toy, tmp_path, capsys):
    dec = str(tmp_path / "model.pt")
    rae.save_rae_decoder(rae.RAEDecoder(in_dim=64, hidden=64, depth=1, num_heads=1, mlp_dim=128, patch_size=16,
                                        num_patches=4), dec)
    frozen = ["--decoder", dec, "--decoder-heads", 1]
    for flag in ("--decoder-width", "--decoder-depth", "--decoder-mlp"):
        line = refused(src_args(toy, tmp_path / "o", [flag, 32], frozen), capsys, flag)
        assert line == f"error: {flag} is used only with --train-decoder"
    dino = ["--disc", "dino", "--disc-encoder", "dino.pth"]
    refused(src_args(toy, tmp_path / "o", ["--disc-width", 8], disc=dino), capsys, "--disc-width is used only "
            "with --disc patch")
    refused(src_args(toy, tmp_path / "o", ["--disc-encoder", "dino.pth"]), capsys, "--disc-encoder is used only "
            "with --disc dino")
    # left at their defaults they are fine: the frozen decoder runs (no GAN: D's file, C has no parameters)
    assert cli(train_src, src_args(toy, tmp_path / "o", ["--max-steps", 1, "--grid-every", 0], frozen,
                                   kind="pca"), capsys)[0] == 0


# -----------------------------------------------------------------------------
# --resume rebuilds what the checkpoint records

class TwoHeads(SRC):
    """A fork that changed a default in code without a flag: two attention heads at n = 64 (the SRC's default
    there is one). The weights keep their shapes, so only the recorded config() tells."""

    def __init__(self, n=768, d=32, depth=4, num_heads=2, mlp_ratio=4.0):
        super().__init__(n=n, d=d, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio)


def test_resume_refuses_what_was_not_built_so(toy, stats, base, tmp_path, capsys, monkeypatch):
    ckpt = base / "checkpoint.pt"
    resume = lambda extra=(): base_args(toy, stats, base, ["--resume", *extra])      # noqa: E731
    # flags: a changed compressor depth, noise setting
    refused(resume(["--src-depth", 2]), capsys, f"--resume {ckpt}: --src-depth was 1 in that run, 2 now")
    refused(resume(["--noise-max", 0.5]), capsys, "--noise-max was 0.8 in that run, 0.5 now")
    # what was built: E's weights read from another file (paths may move, weights may not)
    torch.manual_seed(5)
    other = str(tmp_path / "other.pth")
    torch.save(rae.DINOv2(embed_dim=64, depth=1, num_heads=1, num_registers=4, pos_grid=2).state_dict(), other)
    refused(resume(["--encoder", other]), capsys, f"--resume {ckpt}: encoder.fingerprint was '")
    # a fork that changed the SRC's default heads: config() differs, the flags do not
    with monkeypatch.context() as m:
        m.setitem(src.COMPRESSORS, "src", TwoHeads)
        line = refused(resume(), capsys, "compressor.config.num_heads")
        assert line.endswith("compressor.config.num_heads was 1 in that run, 2 as built now")
    # the same --rae-stats file with other values
    saved = stats.read_bytes()
    try:
        torch.save(dict(mean=torch.zeros(64), var=torch.ones(64)), stats)
        code, err = cli(train_src, resume(), capsys)
        assert code == 2 and errors(err) == [f"error: --resume {ckpt}: rae_stats.mean (eq. 1) differs from "
                                             f"that run's"], err
    finally:
        stats.write_bytes(saved)
    assert load(ckpt)["step"] == 1                                  # nothing was written by a refused run


def test_a_record_without_a_newer_option_resumes_with_its_default(toy, stats, base, tmp_path, capsys):
    """A run recorded before --crop existed (its key deleted) resumes: the key counts as the parser's default, so
    given at its default it continues, given otherwise it is refused."""
    out = tmp_path / "old"
    shutil.copytree(base, out)
    ckpt = load(out / "checkpoint.pt")
    del ckpt["args"]["crop"]
    torch.save(ckpt, out / "checkpoint.pt")
    refused(base_args(toy, stats, out, ["--resume", "--crop", "center"]), capsys,
            "--crop was 'random' in that run, 'center' now")
    assert cli(train_src, base_args(toy, stats, out, ["--resume", "--max-steps", 2]), capsys)[0] == 0
    assert load(out / "checkpoint.pt")["step"] == 2


# -----------------------------------------------------------------------------
# The GAN's adaptive weight needs a last layer: checked before the first step

class NoLastLayer(Linear):
    """A fork's compressor that trains but names no last layer (Compressor.last_layer() returns None)."""
    kind = "fork"

    def last_layer(self):
        return None


@pytest.mark.parametrize("train_decoder", [False, True])
def test_the_gan_finds_a_last_layer_for_every_compressor_or_is_refused(train_decoder, monkeypatch):
    """Every kind of src.COMPRESSORS and a fork's, with D frozen or trained: gan_last_layer gives the weight at which
    one generator step with the GAN on takes a finite adaptive weight, or None where nothing trains; the fork
    without a last layer is refused with one line unless D trains (D's decoder_pred is the layer then)."""
    monkeypatch.setitem(src.COMPRESSORS, "fork", NoLastLayer)
    decoder = ["--train-decoder"] if train_decoder else ["--decoder", "model.pt"]
    for kind in src.COMPRESSORS:
        args = train_src.build_parser().parse_args(
            [str(a) for a in ["--data", "d", "--out", "o", "--encoder", "e", *decoder, "--disc", "patch",
                              *compressor_flags(kind, 8)]])
        model = tiny_rae()
        model.decoder.requires_grad_(train_decoder)
        C = train_src.build_compressor(args, 64)
        trains = train_decoder or len(list(C.parameters())) > 0
        if kind == "fork" and not train_decoder:
            with pytest.raises(UserError) as e:
                train_src.gan_last_layer(args, model, C, trains)
            assert str(e.value) == ("--compressor fork: its last_layer() is None, and the GAN loss's adaptive "
                                    "weight needs one; give --disc-weight 0 or --train-decoder")
            continue
        layer = train_src.gan_last_layer(args, model, C, trains)
        if not trains:
            assert layer is None
            continue
        x = torch.rand(2, 3, 32, 32)
        recon = Stage1(model, C)(model.encode_raw(x))
        torch.manual_seed(0)
        _, parts = losses.generator_loss(recon, x, lpips=None, perceptual_weight=0,
                                         disc=losses.PatchDiscriminator(8), disc_weight=0.75,
                                         aug_draws=torch.rand(2, 5), last_layer=layer)
        assert torch.isfinite(parts["adaptive_weight"]) and parts["adaptive_weight"] > 0, kind


def test_a_fork_without_last_layer_is_refused_before_the_first_step(toy, stats, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(src.COMPRESSORS, "fork", NoLastLayer)
    dec = str(tmp_path / "model.pt")
    rae.save_rae_decoder(rae.RAEDecoder(in_dim=64, hidden=64, depth=1, num_heads=1, mlp_dim=128, patch_size=16,
                                        num_patches=4), dec)
    frozen = ["--decoder", dec, "--decoder-heads", 1]
    args = src_args(toy, tmp_path / "o", ["--disc-start", 0], frozen, kind="fork")
    code, (out, err) = cli(train_src, args, capsys, "both")
    assert code == 2 and errors(err) == ["error: --compressor fork: its last_layer() is None, and the GAN loss's "
                                         "adaptive weight needs one; give --disc-weight 0 or --train-decoder"]
    assert not os.path.exists(tmp_path / "o" / "log.jsonl")
    # either way out runs: no GAN, or D trained (its decoder_pred weighs the GAN from step 0)
    run = ["--rae-stats", stats, "--max-steps", 1, "--grid-every", 0, "--disc-start", 0]
    assert cli(train_src, src_args(toy, tmp_path / "a", [*run, "--disc-weight", 0], frozen, kind="fork"),
               capsys)[0] == 0
    assert cli(train_src, src_args(toy, tmp_path / "b", run, kind="fork"), capsys)[0] == 0
    log = [line for line in open(tmp_path / "b" / "log.jsonl")]
    assert len(log) == 1 and '"gan_on": true' in log[0]


# -----------------------------------------------------------------------------
# A fork's kind in src.COMPRESSORS runs the same end-to-end test as the built-in kinds

def test_a_forks_compressor_trains_round_trips_and_drives_stage2(toy, capsys, monkeypatch):
    """test_train's parametrisation reads src.COMPRESSORS when it is collected; added here at run time, the fork
    goes through the same test: one step, load_stage1 rebuilds it, train_flow.py trains on it, sample.py samples."""
    monkeypatch.setitem(src.COMPRESSORS, "fork", NoLastLayer)
    test_train.test_other_compressors_train_round_trip_and_drive_stage2(toy, "fork", capsys)
