"""The README's recipe runs as written: every command of its "Reproducing the paper" block, then of its "What only
a flow can do" block, is parsed and run, in order, in a folder holding tiny stand-ins of each file it names
(random weights in the real layouts: the official DINOv2 .pth, RAE's decoder model.pt, torchvision's VGG16, the
LPIPS v0.1 heads, a DINO ViT, the FID Inception state dict, an ADM reference batch). Only sizes are overridden
(flags appended after the README's own, so argparse takes them): a flag the README uses that the code lost fails
here. `torchrun` lines run under torchrun with two processes (gloo on CPU), `python` lines as one process."""

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import fid
import losses
import rae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLORS = [(220, 40, 40), (40, 200, 60), (50, 80, 240)]
TINY = {  # what each script gets appended (sizes, one CPU process), by script and mode
    "train_src.py": ["--image-size", 32, "--batch-size", 8, "--epochs", 1, "--max-steps", 1, "--src-depth", 1,
                     "--src-dim", 4, "--decoder-heads", 1, "--num-workers", 0, "--device", "cpu", "--grid-every", 0],
    "train_flow.py": ["--model", "tiny", "--batch-size", 8, "--epochs", 1, "--max-steps", 2, "--num-workers", 0,
                      "--device", "cpu", "--grid-every", 0],
    "sample.py": ["--num-samples", 4, "--batch-size", 4, "--device", "cpu", "--no-progress"],
    "evaluate.py": ["--num-samples", 4, "--batch-size", 4, "--device", "cpu", "--no-progress"],
    "evaluate.py --reconstruct": ["--limit", 4, "--batch-size", 4, "--device", "cpu", "--no-progress"],
    "invert.py --nll": ["--limit", 3, "--nll-draws", 1, "--batch-size", 4, "--device", "cpu", "--no-progress"],
    "invert.py --invert": ["--batch-size", 4, "--device", "cpu", "--no-progress"],
    "invert.py --interpolate": ["--steps", 3, "--device", "cpu", "--no-progress"],
    "fid.py": ["--batch-size", 4, "--device", "cpu", "--no-progress"],
}


def recipe_commands(section="Reproducing the paper"):
    """The shell commands of the first bash block of the README's `section`, continuation lines joined."""
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(rf"## {section}.*?```bash\n(.*?)```", text, re.S).group(1)
    commands, line = [], ""
    for raw in block.splitlines():
        if raw.strip().startswith("#") or not raw.strip():
            continue
        line += raw.rstrip("\\").strip() + " "
        if not raw.endswith("\\"):
            commands.append(shlex.split(line))
            line = ""
    return commands


def image_folder(root, per_class, seed):
    rng = np.random.default_rng(seed)
    for k, color in enumerate(COLORS):
        os.makedirs(root / f"c{k}", exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 60, (32, 32, 3)).astype(np.uint8)
            img[8:24, 8:24] = color
            Image.fromarray(img).save(root / f"c{k}" / f"{i}.png")
    return root


def write_stand_ins(tmp):
    """Every file the recipe names, tiny, in its real layout, under the README's own names."""
    torch.manual_seed(0)
    torch.save(rae.DINOv2(embed_dim=32, depth=1, num_heads=1, num_registers=4, pos_grid=2).state_dict(),
               tmp / "dinov2_vitb14_reg4_pretrain.pth")
    (tmp / "ViTXL_n08").mkdir()
    rae.save_rae_decoder(rae.RAEDecoder(in_dim=32, hidden=32, depth=1, num_heads=1, mlp_dim=64, patch_size=16,
                                        num_patches=4), str(tmp / "ViTXL_n08" / "model.pt"))
    vgg = torchvision.models.vgg16().features.state_dict()
    torch.save({f"features.{k}": v for k, v in vgg.items()}, tmp / "vgg16-397923af.pth")
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))},
               tmp / "vgg.pth")
    torch.save(losses.DINOBackbone(dim=64, depth=2, patch=8, grid=4).state_dict(),
               tmp / "dino_deitsmall8_pretrain.pth")
    torch.save(fid.InceptionV3().state_dict(), tmp / "pt_inception-2015-12-05-6726825d.pth")
    rng = np.random.default_rng(0)
    stats = {}
    for name, dim in (("", 2048), ("_s", 2023)):
        a = rng.standard_normal((dim, 64)) / 8
        stats["mu" + name], stats["sigma" + name] = rng.standard_normal(dim) / 10, a @ a.T
    np.savez(tmp / "VIRTUAL_imagenet256_labeled.npz", arr_0=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8),
             **stats)
    return image_folder(tmp / "train", 8, 0), image_folder(tmp / "val", 2, 1)


def test_readme_recipe_runs_as_written(tmp_path):
    commands = recipe_commands()
    scripts = [next(a for a in c if a.endswith(".py")) for c in commands]
    assert scripts[:2] == ["train_src.py", "evaluate.py"] and "train_flow.py" in scripts and "fid.py" in scripts
    flow_commands = recipe_commands("What only a flow can do")
    assert [m for c in flow_commands for m in c if m in ("--invert", "--interpolate", "--nll")] == [
        "--invert", "--interpolate", "--interpolate", "--nll"]
    train, val = write_stand_ins(tmp_path)
    held = sorted(val.rglob("*.png"))                    # two image files of the stage-1 size (tiny: 32 px)
    shutil.copy(held[0], tmp_path / "a.png")
    shutil.copy(held[-1], tmp_path / "b.png")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for argv in commands + flow_commands:
        assert argv[0] in ("python", "torchrun"), argv
        i = next(k for k, a in enumerate(argv) if a.endswith(".py"))
        script, args = argv[i], [a.replace("/data/imagenet/train", str(train)).replace("/data/imagenet/val", str(val))
                                 for a in argv[i + 1:]]
        modes = ("--nll", "--reconstruct", "--invert", "--interpolate")
        mode = next((f"{script} {m}" for m in modes if m in args), script)
        launcher = [sys.executable]  # torchrun lines run with two processes (gloo), as a user's would with N
        if argv[0] == "torchrun":
            launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        cmd = launcher + [os.path.join(ROOT, script)] + args + [str(a) for a in TINY[mode]]
        res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{' '.join(argv)}\n{res.stdout[-1500:]}\n{res.stderr[-2500:]}"
    for path in ("runs/src/checkpoint.pt", "runs/flow/checkpoint.pt", "recon/src/recon.npz", "recon/rae/recon.npz",
                 "sweep/sweep.json", "samples/cfg/samples.npz", "samples/cfg/metrics.json", "val_stats.npz",
                 "inv/latents.npz", "inv/grid.png", "interp/interpolation.png", "interp/files/interpolation.png",
                 "nll/val.json", "nll/val.csv", "nll/val.png"):
        assert (tmp_path / path).exists(), path
    with np.load(tmp_path / "val_stats.npz") as f:
        assert sorted(f.files) == ["mu", "mu_s", "sigma", "sigma_s"]


@pytest.mark.parametrize("script", ["train_src.py", "train_flow.py", "sample.py", "invert.py", "evaluate.py",
                                    "fid.py"])
def test_every_flag_the_readme_names_exists(script):
    """Flags in any README or docs/ code line that runs `script` are flags of its parser (the ablation lines too)."""
    docs = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    text = "".join(open(path).read() for path in docs)
    lines = [l for l in re.findall(r"```bash\n(.*?)```", text, re.S) for l in l.replace("\\\n", " ").splitlines()]
    used = {f for l in lines if script in l for f in re.findall(r"(--[a-z][a-z0-9-]*)", l.split(script, 1)[1])}
    help_text = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True,
                               text=True, cwd=ROOT).stdout
    assert used and not [f for f in used if f not in help_text], (script, used)
