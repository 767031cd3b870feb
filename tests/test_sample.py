"""sample.py: the sampling plan, eq. 10 end to end on a tiny trained pipeline, rank/batch
independence, the npz/PNG/grid outputs; invert.py: the exact NLL (eq. 2) and its CSV, inversion and interpolation
in the prior; evaluate.py: rFID inputs and the guidance sweep; one-line errors of all three."""

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
import evaluate
import invert
import sample
from src import Stage1, load_stage1
from tarflow import load_flow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLORS = [(220, 40, 40), (40, 200, 60), (50, 80, 240)]


# -----------------------------------------------------------------------------
# The plan: labels and per-index noise.

def test_class_plan_even_random_list():
    even = sample.class_plan(10, 4, "even")
    assert np.bincount(even, minlength=4).tolist() == [3, 3, 2, 2]      # all classes, as even as possible
    assert sample.class_plan(50_000, 1000, "even").tolist().count(7) == 50  # the paper's 50 per class
    r1, r2 = sample.class_plan(200, 5, "random", seed=3), sample.class_plan(200, 5, "random", seed=3)
    assert (r1 == r2).all() and r1.min() >= 0 and r1.max() < 5 and len(set(r1.tolist())) == 5
    assert not (sample.class_plan(200, 5, "random", seed=4) == r1).all()
    assert sample.class_plan(5, 10, [7, 2]).tolist() == [7, 2, 7, 2, 7]
    assert sample.class_plan(3, 0, "even") is None                    # unconditional


def test_parse_classes_refuses_bad_lists():
    assert sample.parse_classes("3,1", 5) == [3, 1]
    assert sample.parse_classes("even", 5) == "even"
    for bad in ("3,x", "", "0,5", "-1"):
        with pytest.raises(ValueError, match="--classes"):
            sample.parse_classes(bad, 5)


def test_prior_noise_depends_only_on_seed_and_index():
    full = sample.prior_noise(0, range(8), (4, 3))
    assert torch.equal(sample.prior_noise(0, [5, 2], (4, 3)), full[[5, 2]])
    assert not torch.equal(sample.prior_noise(1, range(8), (4, 3)), full)
    # standard normal: a loose moment check on many draws
    big = sample.prior_noise(0, range(64), (16, 8))
    assert abs(big.mean().item()) < 0.05 and abs(big.std().item() - 1) < 0.05


def test_grid_rows_are_classes_and_tiles_are_the_samples(tmp_path):
    from common import save_grid
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    labels = np.array([2, 0, 2, 1, 0, 2, 1, 0, 2, 1, 0, 2, 3])[:12]
    order = sample.grid_order(np.append(labels, 3), rows=3, cols=3)
    # rows in plan order: class 2, then 0, then 1 (class 3 is cut by rows=3); a short row is padded with -1
    assert order == [[0, 2, 5], [1, 4, 7], [3, 6, 9]]
    assert sample.grid_order(np.array([1, 1, 0]), rows=2, cols=3) == [[0, 1, -1], [2, -1, -1]]
    tiles = torch.from_numpy(images[[i for row in order for i in row]]).permute(0, 3, 1, 2) / 255
    save_grid(tiles, str(tmp_path / "g.png"), nrow=3, min_tile=16)
    g = np.asarray(Image.open(tmp_path / "g.png"))
    assert g.shape[:2] == (3 * (16 + 2) + 2, 3 * (16 + 2) + 2)      # tiles enlarged 2x (nearest), pad 2
    for r, row in enumerate(order):
        for k, i in enumerate(row):
            y0, x0 = 2 + r * 18, 2 + k * 18
            assert (g[y0:y0 + 16, x0:x0 + 16] == images[i].repeat(2, 0).repeat(2, 1)).all()


# -----------------------------------------------------------------------------
# A tiny pipeline trained by the real scripts.

def draw(k, rng, size=32):
    """A coloured disc of class k on a dark noisy background."""
    yy, xx = np.mgrid[:size, :size]
    cx, cy, r = rng.uniform(10, 22), rng.uniform(10, 22), rng.uniform(5, 9)
    img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
    img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = COLORS[k]
    return img


def image_folder(root, per_class, seed):
    rng = np.random.default_rng(seed)
    for k in range(len(COLORS)):
        os.makedirs(root / f"c{k}", exist_ok=True)
        for i in range(per_class):
            Image.fromarray(draw(k, rng)).save(root / f"c{k}" / f"{i}.png")
    return root


def run(args, nproc=1, check=True):
    args = [str(a) for a in args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + args
    else:
        cmd = [sys.executable] + args
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(args[:1])} failed ({res.returncode}):\n{res.stdout[-2000:]}\n"
                             f"{res.stderr[-3000:]}")
    return res


def wake_zero_initialised_layers(path, std=0.05):
    """Three toy steps leave adaLN-Zero's gates and the output layers near their zero start, so guidance, labels and
    the score step would change samples by less than a uint8 step on some machines. Give every parameter that a
    new flow starts at zero random values (flow and EMA weights), in place: the checkpoint keeps its format, and
    the flow's conditioning now changes every sample for certain."""
    from tarflow import TARFlow
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    fresh = TARFlow(**ckpt["flow_config"])
    zero = [name for name, p in fresh.named_parameters() if not p.any()]
    assert any(".ada" in name for name in zero) and any("proj_out" in name for name in zero)
    g = torch.Generator().manual_seed(0)
    for key in ("flow", "flow_ema"):
        for name in zero:
            ckpt[key][name] = torch.randn(ckpt[key][name].shape, generator=g) * std
    torch.save(ckpt, path)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Random DINOv2 (official layout) -> train_src.py (D + SRC) -> train_flow.py, at toy size."""
    import rae
    tmp = tmp_path_factory.mktemp("pipe")
    data, heldout = image_folder(tmp / "train", 8, 0), image_folder(tmp / "heldout", 2, 1)
    torch.manual_seed(0)
    enc = tmp / "dinov2.pth"
    torch.save(rae.DINOv2(embed_dim=32, depth=1, num_heads=1, num_registers=4, pos_grid=2).state_dict(), enc)
    common = ["--data", data, "--batch-size", 8, "--epochs", 1, "--num-workers", 0, "--device", "cpu",
              "--grid-every", 0, "--ckpt-every", 0]
    run(["train_src.py", "--out", tmp / "s1", "--encoder", enc, "--train-decoder", "--decoder-width", 32,
         "--decoder-depth", 1, "--decoder-heads", 1, "--decoder-mlp", 64, "--image-size", 32, "--src-depth", 1,
         "--src-dim", 4, "--perceptual-weight", 0, "--disc", "patch", "--disc-width", 8] + common)
    run(["train_flow.py", "--stage1", tmp / "s1" / "checkpoint.pt", "--out", tmp / "s2", "--model", "tiny",
         "--ema-decay", 0.5] + common)
    wake_zero_initialised_layers(tmp / "s2" / "checkpoint.pt")
    return dict(tmp=tmp, flow=str(tmp / "s2" / "checkpoint.pt"), stage1=str(tmp / "s1" / "checkpoint.pt"),
                heldout=str(heldout))


def cli(argv, script=sample):
    """sample.py (or invert.py, evaluate.py) in this process (one rank); returns its exit status (None when it
    returns)."""
    try:
        common.run_cli(script.main, script.build_parser().parse_args([str(a) for a in argv]))
    except SystemExit as e:
        return e.code


def test_samples_are_eq10_and_independent_of_ranks_and_batches(pipeline):
    tmp, flow = pipeline["tmp"], pipeline["flow"]
    args = ["--ckpt", flow, "--num-samples", 7, "--cfg", 1.5, "--seed", 5, "--no-progress"]
    assert cli(args + ["--out", tmp / "one", "--batch-size", 3]) is None
    run(["sample.py"] + [str(a) for a in args] + ["--out", str(tmp / "two"), "--batch-size", 2], nproc=2)
    one, two = np.load(tmp / "one" / "samples.npz"), np.load(tmp / "two" / "samples.npz")
    assert one["arr_0"].dtype == np.uint8 and one["arr_0"].shape == (7, 32, 32, 3)
    assert (one["arr_1"] == [0, 1, 2, 0, 1, 2, 0]).all() and (two["arr_1"] == one["arr_1"]).all()
    # 1 rank / batch 3 vs 2 ranks / batch 2: each sample's noise is fixed by (seed, index)
    diff = np.abs(one["arr_0"].astype(int) - two["arr_0"].astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    for i in range(7):                                  # PNGs named by global index hold the npz images
        assert (np.asarray(Image.open(tmp / "two" / "images" / f"{i:06d}.png")) == two["arr_0"][i]).all()
    assert Image.open(tmp / "one" / "grid.png").size[0] > 3 * 32
    assert json.load(open(tmp / "one" / "info.json"))["class_counts"] == [3, 2, 2]

    # eq. 10 computed here from the loaded modules: u -> f^-1 (CFG) -> denorm2 -> C_dec -> RAE decode
    f, _ = load_flow(flow)
    s1 = load_stage1(pipeline["stage1"])
    rae, C, mean2, std2 = s1.rae, s1.C, s1.mean2, (s1.var2 + s1.eps2).sqrt()
    idx = [0, 4, 5]
    u = sample.prior_noise(5, idx, (f.num_tokens, f.in_channels))
    with torch.no_grad():
        zc = f.reverse(u, torch.tensor([0, 1, 2]), guidance=1.5)
        x = rae.decode(C.decode(zc * std2 + mean2)).clamp(0, 1)
    ref = (x * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(ref.astype(int) - one["arr_0"][idx].astype(int)).max() <= 1

    # reproducible with the seed, different with another seed
    assert cli(args[:-3] + ["--seed", 5, "--no-progress", "--out", tmp / "again", "--no-png"]) is None
    assert (np.load(tmp / "again" / "samples.npz")["arr_0"] == one["arr_0"]).all()
    assert not (tmp / "again" / "images").exists()
    assert cli(args[:-3] + ["--seed", 6, "--no-progress", "--out", tmp / "other", "--no-png"]) is None
    assert (np.load(tmp / "other" / "samples.npz")["arr_0"] != one["arr_0"]).any()


def test_nll_is_the_exact_flow_likelihood(pipeline):
    tmp, flow = pipeline["tmp"], pipeline["flow"]
    out = tmp / "nll.json"
    assert cli(["--ckpt", flow, "--nll", pipeline["heldout"], "--nll-json", out, "--nll-draws", 2,
                "--batch-size", 2, "--no-progress"], invert) is None
    res = json.load(open(out))
    assert res["num_images"] == 6 and res["conditional"]
    # independent: the RAE's own encode (no noise), norm2, and the flow's forward pass (eq. 2)
    f, cfg = load_flow(flow)
    s1 = load_stage1(pipeline["stage1"])
    rae, C, mean2, std2 = s1.rae, s1.C, s1.mean2, (s1.var2 + s1.eps2).sqrt()
    paths = [r["path"] for r in res["per_image"]]
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB")).copy()).permute(2, 0, 1)
                     for p in paths]).float() / 255
    y = torch.tensor([int(os.path.basename(os.path.dirname(p))[1:]) for p in paths])
    with torch.no_grad():
        zc = (C.encode(rae.encode(x)) - mean2) / std2
        u, logdet = f(zc, y)
    D = zc.shape[1] * zc.shape[2]
    ref = (0.5 * u.pow(2).sum((1, 2)) + 0.5 * D * math.log(2 * math.pi) - logdet) / (D * math.log(2))
    clean = np.array([r["clean"] for r in res["per_image"]])
    noisy = np.array([r["noisy"] for r in res["per_image"]])
    assert np.allclose(clean, ref.numpy(), rtol=1e-4, atol=1e-4)
    assert np.isfinite(noisy).all() and not np.allclose(noisy, clean)
    assert res["dims"] == D and res["noise_std"] == cfg["noise_std"]
    assert math.isclose(res["nll_bpd_clean"], clean.mean(), rel_tol=1e-9)
    assert math.isclose(res["nll_bpd_clean_sem"], clean.std(ddof=1) / math.sqrt(6), rel_tol=1e-9)
    assert math.isclose(res["nll_bpd_noisy"], noisy.mean(), rel_tol=1e-9)
    # the noisy estimate uses noise fixed per image (like the prior noise): other batches, same numbers
    assert cli(["--ckpt", flow, "--nll", pipeline["heldout"], "--nll-json", tmp / "nll1.json", "--nll-draws", 2,
                "--batch-size", 4, "--no-progress"], invert) is None
    one = json.load(open(tmp / "nll1.json"))
    assert np.allclose([r["noisy"] for r in one["per_image"]], noisy, rtol=1e-5, atol=1e-5)

    # the CSV beside the JSON holds the same per-image values, to the last bit
    with open(tmp / "nll.csv") as f:
        table = list(csv.reader(f))
    assert table[0] == ["path", "clean", "noisy"]
    assert [[r[0], float(r[1]), float(r[2])] for r in table[1:]] == [[r["path"], r["clean"], r["noisy"]]
                                                                      for r in res["per_image"]]
    # the grid: the most likely images in the top row, the least likely in the bottom row (2x tiles, pad 2,
    # 16 px title; the lower half of a tile is free of its label)
    g = np.asarray(Image.open(tmp / "nll.png").convert("RGB"))
    order = np.argsort(clean)
    assert g.shape[:2] == (16 + 2 * 66 + 2, 6 * 66 + 2)
    for row, ranked in enumerate((order, order[::-1])):
        for col, i in enumerate(ranked):
            y0, x0 = 16 + 2 + row * 66, 2 + col * 66
            img = np.asarray(Image.open(paths[i]).convert("RGB")).repeat(2, 0).repeat(2, 1)
            assert (g[y0 + 32:y0 + 64, x0:x0 + 64] == img[32:]).all(), (row, col)


def test_bad_inputs_are_one_line_errors(pipeline, tmp_path, capsys):
    flow = pipeline["flow"]
    held = pipeline["tmp"] / "heldout"
    a = held / "c0" / "0.png"
    Image.new("RGB", (40, 32)).save(tmp_path / "wide.png")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "flat" / "one.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    assert cli(["--ckpt", flow, "--invert", held, "--out", tmp_path / "inv", "--no-progress"], invert) is None
    latents = tmp_path / "inv" / "latents.npz"
    inter = ["--ckpt", flow, "--out", tmp_path / "path", "--interpolate"]
    cases = [
        (invert, inter + [tmp_path / "missing.png", a], "missing.png"),
        (invert, inter + [a, tmp_path / "wide.png"], "wide.png: 40x32 pixels, expected the stage-1 size 32x32"),
        (invert, inter + [a, tmp_path / "junk.png"], "junk.png: unreadable image"),
        (invert, inter + [a, a, "--label", 3], "--label 3"),                  # the flow has classes 0, 1, 2
        (invert, inter + [a, a, "--label", "red"], "--label red"),
        (invert, inter + [a, a, "--label", "b"], "files have no label"),
        (invert, inter + [0, 9, "--latents", latents], "indices 0..5"),
        (invert, inter + [0, 1, "--latents", tmp_path / "nowhere.npz"], "--latents"),
        (invert, inter + [a, a, "--steps", 0], "--steps"),
        (invert, inter + [a, a, "--precision", "bf16"], "fp32 or fp64"),
        (invert, ["--ckpt", flow, "--invert", tmp_path / "flat", "--out", tmp_path], "--uncond"),
        (invert, ["--ckpt", flow, "--invert", held, "--out", tmp_path, "--invert-tol", 1e-12], "c0/0.png"),
        (sample, ["--ckpt", tmp_path / "missing.pt", "--out", tmp_path], "missing.pt"),
        (sample, ["--ckpt", flow, "--out", tmp_path, "--classes", "0,7"], "--classes"),
        (sample, ["--ckpt", flow, "--out", tmp_path, "--classes", "red"], "--classes"),
        (sample, ["--ckpt", flow, "--out", tmp_path, "--cfg", -1], "guidance"),
        (sample, ["--ckpt", flow, "--out", tmp_path, "--guide-blocks", "top"], "--guide-blocks"),
        (sample, ["--ckpt", flow, "--out", tmp_path, "--score-step", "0,1"], "--cfg-sweep"),
        (sample, ["--ckpt", flow, "--out", tmp_path, "--guidance-rule", "nope"], "--guidance-rule: starflow"),
        (sample, ["--ckpt", flow, "--out", tmp_path, "--guidance-rule", "starflow,starflow"], "--cfg-sweep"),
        (invert, inter + [a, a, "--guidance-rule", "nope"], "--guidance-rule"),
        (evaluate, ["--ckpt", flow, "--out", tmp_path, "--cfg-sweep", 1, "--guidance-rule", "starflow,nope"],
         "--guidance-rule"),
        (evaluate, ["--ckpt", flow, "--out", tmp_path, "--cfg-sweep", "1,1.0"], "share the folder cfg-1"),
        (evaluate, ["--reconstruct", pipeline["heldout"], "--out", tmp_path], "--stage1"),
        (evaluate, ["--stage1", pipeline["stage1"], "--reconstruct", tmp_path / "nowhere", "--out", tmp_path],
         "nowhere"),
        (invert, ["--ckpt", flow, "--nll", tmp_path / "nowhere"], "nowhere"),
        (sample, ["--ckpt", flow, "--stage1", tmp_path / "gone.pt", "--out", tmp_path], "gone.pt"),
        (evaluate, ["--stage1", tmp_path / "gone1.pt", "--reconstruct", pipeline["heldout"], "--out", tmp_path],
         "gone1.pt"),
        (sample, ["--ckpt", pipeline["stage1"], "--out", tmp_path], "checkpoint"),
    ]
    for script, argv, needle in cases:
        capsys.readouterr()
        size = [] if script is invert else ["--num-samples", 2]            # invert.py samples nothing
        assert cli(argv + size + ["--no-progress"], script) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and needle in err, (argv, err)
        assert "named by None" not in err, (argv, err)  # a flag the user did not give is not blamed


class TinyFeatures(torch.nn.Module):
    """A cheap stand-in for the Inception: the 299x299 graph input -> 4x4 colour means -> 16 pool features,
    10 logits and 8 spatial features."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1, self.w2, self.w3 = (torch.randn(*shape, generator=g) for shape in ((48, 16), (16, 10), (48, 8)))

    def features(self, x):
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return pooled @ self.w1, pooled @ self.w1 @ self.w2, pooled @ self.w3


def test_guidance_sweep_reports_metrics_per_setting(pipeline, monkeypatch):
    """--cfg-sweep scores every (w, guide_blocks) setting with fid.evaluate under the ADM protocol."""
    import fid
    tmp, flow = pipeline["tmp"], pipeline["flow"]
    monkeypatch.setattr(fid, "load_inception", lambda path: TinyFeatures())
    weights = tmp / "weights.pth"
    weights.write_bytes(b"unused")
    assert cli(["--ckpt", flow, "--out", tmp / "sweep", "--num-samples", 5, "--cfg-sweep", "0,2", "--guide-blocks",
                "all,deep", "--ref", pipeline["heldout"], "--fid-weights", weights, "--no-progress",
                "--no-png"], evaluate) is None
    res = json.load(open(tmp / "sweep" / "sweep.json"))["results"]
    assert [(r["guidance"], r["guide_blocks"]) for r in res] == [(0, "all"), (0, "deep"), (2, "all"), (2, "deep")]
    assert {r["rule"] for r in res} == {"starflow"}
    # independent: ADM preprocessing of the held-out PNGs and of each samples.npz through the same network
    model = TinyFeatures()
    held = sorted(str(p) for p in (tmp / "heldout").rglob("*.png"))
    ref = torch.stack([torch.from_numpy(np.asarray(Image.open(p)).copy()) for p in held]).permute(0, 3, 1, 2)
    pool_r, _, spatial_r = model.features(fid.preprocess(ref, "adm"))
    for r in res:
        name = f"cfg-{r['guidance']:g}" + ("-deep" if r["guide_blocks"] == "deep" else "")
        gen = torch.from_numpy(np.load(tmp / "sweep" / name / "samples.npz")["arr_0"]).permute(0, 3, 1, 2)
        pool, _, spatial = model.features(fid.preprocess(gen, "adm"))
        assert math.isclose(r["fid"], fid.frechet_distance(*fid.statistics(pool), *fid.statistics(pool_r)),
                            rel_tol=1e-4)
        assert math.isclose(r["sfid"], fid.frechet_distance(*fid.statistics(spatial), *fid.statistics(spatial_r)),
                            rel_tol=1e-4)
        assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and r["inception_score"] >= 1 - 1e-6
    # w = 0: the guide_blocks setting cannot matter
    assert (np.load(tmp / "sweep" / "cfg-0" / "samples.npz")["arr_0"]
            == np.load(tmp / "sweep" / "cfg-0-deep" / "samples.npz")["arr_0"]).all()


def test_guidance_sweep_under_torchrun_equals_one_process(pipeline, tmp_path):
    """The README's sweep command with two processes: every rank scores samples.npz once rank 0 has written it,
    and sweep.json equals one process's (random-weight Inception in its real layout)."""
    import fid
    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(fid.InceptionV3().state_dict(), weights)
    args = ["evaluate.py", "--ckpt", pipeline["flow"], "--num-samples", 4, "--batch-size", 2, "--cfg-sweep", "1,2",
            "--ref", pipeline["heldout"], "--fid-weights", weights, "--no-png", "--no-progress", "--device", "cpu"]
    run(args + ["--out", tmp_path / "one"])
    run(args + ["--out", tmp_path / "two"], nproc=2)
    one, two = (json.load(open(tmp_path / name / "sweep.json"))["results"] for name in ("one", "two"))
    assert [r["guidance"] for r in one] == [r["guidance"] for r in two] == [1, 2]
    for a, b in zip(one, two):
        assert (np.load(a["samples"])["arr_0"] == np.load(b["samples"])["arr_0"]).all()
        for key in ("fid", "sfid", "inception_score", "precision", "recall", "num_ref", "num_gen"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key


def test_sweep_folder_names_are_unique_and_unchanged_for_the_default_rule(monkeypatch):
    """evaluate.setting_name: cfg-<w>[-deep][-score<g>] as before for STARFlow's rule, -rule<name> added for
    another (here one added as a fork adds it): every combination of a sweep gets a folder of its own."""
    import tarflow
    monkeypatch.setitem(tarflow.GUIDANCE_RULES, "mine", tarflow.guided_gaussian)
    settings = sample.guidance_settings("0,1.5,2", "all,deep", "0,0.5", "starflow,mine", w_flag="--cfg-sweep")
    names = [evaluate.setting_name(s) for s in settings]
    assert len(settings) == 24 and len(set(names)) == 24
    for s, name in zip(settings, names):
        today = f"cfg-{s['guidance']:g}" + ("-deep" if s["guide_blocks"] == "deep" else "")
        today += f"-score{s['score_step']:g}" if s["score_step"] else ""
        assert name == today + ("-rulemine" if s["rule"] == "mine" else ""), s
    assert "cfg-1.5-deep-score0.5" in names and "cfg-0" in names and "cfg-2-score0.5-rulemine" in names


def test_guidance_rule_reaches_the_flow(pipeline, monkeypatch):
    """--guidance-rule NAME samples with tarflow.GUIDANCE_RULES[NAME] (here a rule the test adds, as a fork
    would): the rule is called with w, the samples are TARFlow.reverse(rule=NAME)'s and differ from STARFlow's."""
    import tarflow
    calls = []

    def mean_cfg(mu_c, alpha_c, mu_u, alpha_u, w):
        calls.append(w)
        return mu_c + w * (mu_c - mu_u), torch.exp(alpha_c)
    monkeypatch.setitem(tarflow.GUIDANCE_RULES, "mean-cfg", mean_cfg)
    tmp, flow = pipeline["tmp"], pipeline["flow"]
    args = ["--ckpt", flow, "--num-samples", 2, "--cfg", 2.0, "--seed", 1, "--no-progress", "--no-png"]
    assert cli(args + ["--out", tmp / "rule-mean-cfg", "--guidance-rule", "mean-cfg"]) is None
    assert calls and set(calls) == {2.0}
    assert json.load(open(tmp / "rule-mean-cfg" / "info.json"))["rule"] == "mean-cfg"
    assert cli(args + ["--out", tmp / "rule-default"]) is None
    f, _ = load_flow(flow)
    s1 = load_stage1(pipeline["stage1"])
    z, y = sample.prior_noise(1, range(2), (f.num_tokens, f.in_channels)), torch.tensor([0, 1])
    with torch.no_grad():
        ref = sample.to_uint8(s1.decode(f.reverse(z, y, guidance=2.0, rule="mean-cfg")))
    mine = np.load(tmp / "rule-mean-cfg" / "samples.npz")["arr_0"]
    assert np.abs(ref.astype(int) - mine.astype(int)).max() <= 1
    assert (mine != np.load(tmp / "rule-default" / "samples.npz")["arr_0"]).any()


def test_deep_guidance_and_score_step_follow_the_flow(pipeline):
    """--guide-blocks deep and --score-step are TARFlow.reverse(guide_blocks='deep') and TARFlow.score_step."""
    tmp, flow = pipeline["tmp"], pipeline["flow"]
    args = ["--ckpt", flow, "--num-samples", 3, "--cfg", 2.0, "--seed", 1, "--no-progress", "--no-png"]
    assert cli(args + ["--out", tmp / "deep", "--guide-blocks", "deep", "--score-step", 0.5]) is None
    assert cli(args + ["--out", tmp / "all"]) is None
    f, _ = load_flow(flow)
    s1 = load_stage1(pipeline["stage1"])
    z, y = sample.prior_noise(1, range(3), (f.num_tokens, f.in_channels)), torch.tensor([0, 1, 2])
    with torch.no_grad():
        x = f.score_step(f.reverse(z, y, guidance=2.0, guide_blocks="deep"), y, 0.5)
        ref = sample.to_uint8(s1.decode(x))
    deep = np.load(tmp / "deep" / "samples.npz")["arr_0"]
    assert np.abs(ref.astype(int) - deep.astype(int)).max() <= 1
    assert (deep != np.load(tmp / "all" / "samples.npz")["arr_0"]).any()


def test_non_finite_samples_stop_with_one_line(pipeline, monkeypatch, capsys):
    real = Stage1.generate

    def broken(*a, **k):
        images = real(*a, **k)
        images[1::2] = float("nan")                           # every second sample of each batch
        return images
    monkeypatch.setattr(Stage1, "generate", broken)
    out = pipeline["tmp"] / "nan"
    assert cli(["--ckpt", pipeline["flow"], "--out", out, "--num-samples", 4, "--batch-size", 4, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: 2 samples not finite (nan/inf), indices [1, 3]; stopped before writing them", err
    assert not (out / "samples.npz").exists() and not list((out / "images").glob("*.png"))


def test_reconstructions_for_rfid(pipeline):
    """--reconstruct writes the ADM-cropped originals and D(denorm(C_dec(C_enc(norm(E(x) + eps))))) as npz."""
    tmp, held = pipeline["tmp"], pipeline["heldout"]
    base = ["--reconstruct", held, "--stage1", pipeline["stage1"], "--no-progress"]
    assert cli(base + ["--out", tmp / "rec", "--batch-size", 4], evaluate) is None
    assert cli(base + ["--out", tmp / "rae", "--recon-rae"], evaluate) is None
    assert cli(base + ["--out", tmp / "noisy4", "--recon-noise", 0.5, "--batch-size", 4], evaluate) is None
    assert cli(base + ["--out", tmp / "noisy2", "--recon-noise", 0.5, "--batch-size", 2], evaluate) is None
    paths = sorted((tmp / "heldout").rglob("*.png"))
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB")).copy()) for p in paths])
    orig = np.load(tmp / "rec" / "originals.npz")["arr_0"]
    assert (orig == x.numpy()).all()                          # 32 px images: the ADM crop is the identity
    x = x.permute(0, 3, 1, 2).float() / 255
    s1 = load_stage1(pipeline["stage1"])
    with torch.no_grad():
        src_ref = sample.to_uint8(s1.rae.decode(s1.C.decode(s1.C.encode(s1.rae.encode(x)))))
        rae_ref = sample.to_uint8(s1.rae.decode(s1.rae.encode(x)))
    for name, ref in (("rec", src_ref), ("rae", rae_ref)):
        got = np.load(tmp / name / "recon.npz")["arr_0"]
        assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1, name
    noisy4, noisy2 = (np.load(tmp / n / "recon.npz")["arr_0"] for n in ("noisy4", "noisy2"))
    assert (noisy4 == noisy2).all() and (noisy4 != np.load(tmp / "rec" / "recon.npz")["arr_0"]).any()


def test_moved_weights_need_only_the_override_flags(pipeline, tmp_path, capsys):
    """A stage 1 whose encoder and released decoder moved: the error names the flag; the flags restore it."""
    import rae
    torch.manual_seed(1)
    enc, dec = tmp_path / "dinov2.pth", tmp_path / "decoder.pt"
    torch.save(rae.DINOv2(embed_dim=32, depth=1, num_heads=1, num_registers=4, pos_grid=2).state_dict(), enc)
    rae.save_rae_decoder(rae.RAEDecoder(in_dim=32, hidden=32, depth=1, num_heads=1, mlp_dim=64, patch_size=16,
                                        num_patches=4), str(dec))
    data = ["--data", pipeline["tmp"] / "train", "--batch-size", 8, "--epochs", 1, "--max-steps", 1,
            "--num-workers", 0, "--device", "cpu", "--grid-every", 0]
    run(["train_src.py", "--out", tmp_path / "s1", "--encoder", enc, "--decoder", dec, "--decoder-heads", 1,
         "--image-size", 32,
         "--src-depth", 1, "--src-dim", 4, "--perceptual-weight", 0, "--disc-weight", 0] + data)
    ckpt = tmp_path / "s1" / "checkpoint.pt"
    flow_args = ["train_flow.py", "--stage1", ckpt, "--model", "tiny"] + data
    run(flow_args + ["--out", tmp_path / "s2"])
    flow = tmp_path / "s2" / "checkpoint.pt"
    sample_args = ["--ckpt", flow, "--num-samples", 2, "--no-progress", "--no-png"]
    assert cli(sample_args + ["--out", tmp_path / "before"]) is None
    before = load_stage1(str(ckpt))

    moved = tmp_path / "moved"                                   # another machine: the weights live elsewhere
    moved.mkdir()
    enc.rename(moved / enc.name)
    dec.rename(moved / dec.name)
    flags = ["--encoder", moved / enc.name, "--decoder", moved / dec.name]
    with pytest.raises(FileNotFoundError, match="--encoder"):
        load_stage1(str(ckpt))
    with pytest.raises(FileNotFoundError, match="--decoder"):
        load_stage1(str(ckpt), encoder=str(moved / enc.name))
    after = load_stage1(str(ckpt), encoder=str(moved / enc.name), decoder=str(moved / dec.name))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(before.decode(before.encode(x)), after.decode(after.encode(x)))
    res = run(flow_args + ["--out", tmp_path / "s2b"], check=False)
    assert res.returncode == 2 and "--encoder" in res.stderr.strip().splitlines()[-1], res.stderr[-500:]
    run(flow_args + ["--out", tmp_path / "s2b"] + flags)
    capsys.readouterr()
    assert cli(sample_args + ["--out", tmp_path / "lost"]) == 2
    assert "--encoder" in capsys.readouterr().err
    assert cli(sample_args + ["--out", tmp_path / "after"] + flags) is None
    a, b = (np.load(tmp_path / n / "samples.npz")["arr_0"] for n in ("before", "after"))
    assert (a == b).all()

    # The same weights in the Hugging Face layout pass; other weights of the same architecture are refused
    from test_rae import to_hf, write_safetensors
    (tmp_path / "hf").mkdir()
    write_safetensors(tmp_path / "hf" / "model.safetensors", to_hf(torch.load(moved / enc.name)))
    hf = load_stage1(str(ckpt), encoder=str(tmp_path / "hf"), decoder=str(moved / dec.name))
    with torch.no_grad():
        assert torch.allclose(hf.encode(x), before.encode(x), atol=1e-6)
    torch.manual_seed(2)
    torch.save(rae.DINOv2(embed_dim=32, depth=1, num_heads=1, num_registers=4, pos_grid=2).state_dict(),
               tmp_path / "other.pth")
    with pytest.raises(ValueError, match="fingerprint"):
        load_stage1(str(ckpt), encoder=str(tmp_path / "other.pth"), decoder=str(moved / dec.name))
    rae.save_rae_decoder(rae.RAEDecoder(in_dim=32, hidden=32, depth=1, num_heads=1, mlp_dim=64, patch_size=16,
                                        num_patches=4), str(tmp_path / "other_decoder.pt"))
    capsys.readouterr()
    assert cli(sample_args + ["--out", tmp_path / "other", "--encoder", moved / enc.name, "--decoder",
                              tmp_path / "other_decoder.pt"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "fingerprint" in err and "--decoder" in err, err


# -----------------------------------------------------------------------------
# What only a flow can do: exact inversion, interpolation in the prior.

def test_slerp_keeps_norms_on_the_great_circle():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 256, 32, generator=g, dtype=torch.float64)
    t = torch.linspace(0, 1, 9, dtype=torch.float64)
    b_equal = b / b.norm() * a.norm()
    path = invert.slerp(a, b_equal, t)
    assert path.shape == (9, 256, 32)
    assert torch.allclose(path[0], a, rtol=0, atol=1e-12) and torch.allclose(path[-1], b_equal, rtol=0, atol=1e-12)
    norms = path.flatten(1).norm(dim=1)
    assert torch.allclose(norms, a.norm(), rtol=1e-12, atol=0)            # equal norms stay equal all along
    assert (a + b_equal).norm() / 2 < 0.75 * a.norm()                    # where a straight line would pass
    # independent: on the circle through orthonormal e1, e2 (a Gram-Schmidt pair), slerp is cos/sin of t * theta
    e1 = a.flatten() / a.norm()
    e2 = b.flatten() - (b.flatten() @ e1) * e1
    e2 = e2 / e2.norm()
    theta = torch.arccos((b.flatten() @ e1) / b.norm())
    ref = torch.cos(t[:, None] * theta) * e1 + torch.sin(t[:, None] * theta) * e2
    got = invert.slerp(a, b, t).flatten(1)
    assert torch.allclose(got / got.norm(dim=1, keepdim=True), ref, atol=1e-12)
    # unequal norms: the norm goes linearly from |a| to |b|
    assert torch.allclose(got.norm(dim=1), (1 - t) * a.norm() + t * b.norm(), rtol=1e-12)
    # parallel and nearly parallel points: finite, on the ray, norms linear
    for other in (3 * a, 3 * a + 1e-12 * b):
        near = invert.slerp(a, other, t).flatten(1)
        assert torch.isfinite(near).all()
        assert torch.allclose(near, ((1 - t) + 3 * t)[:, None] * a.flatten(), rtol=1e-9, atol=1e-9)


def random_flow(pipeline, path, seed):
    """The pipeline's flow checkpoint with all weights random (seeded Xavier init, zero-initialised layers woken)."""
    from tarflow import TARFlow
    ckpt = torch.load(pipeline["flow"], map_location="cpu", weights_only=False)
    torch.manual_seed(seed)
    state = TARFlow(**ckpt["flow_config"]).state_dict()
    ckpt["flow"], ckpt["flow_ema"] = state, {k: v.clone() for k, v in state.items()}
    torch.save(ckpt, path)
    wake_zero_initialised_layers(path)
    return str(path)


def test_inversion_round_trip_is_exact(pipeline, tmp_path):
    """--invert: u = f(z_c) of clean z_c under the class folders' labels, and back; the round-trip error of
    random-weight flows is below 1e-8 in float64 and below the stated float32 tolerance with margin."""
    held = pipeline["heldout"]
    s1 = load_stage1(pipeline["stage1"]).double()
    paths = sorted(str(p) for p in (pipeline["tmp"] / "heldout").rglob("*.png"))
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB")).copy()) for p in paths])
    x = x.permute(0, 3, 1, 2).double() / 255
    assert invert.ROUND_TRIP_TOL == {torch.float32: 1e-3, torch.float64: 1e-8}
    for seed in (0, 1):
        flow = random_flow(pipeline, tmp_path / f"random{seed}.pt", seed)
        for precision, tol in (("fp64", 1e-8), ("fp32", 1e-3)):
            out = tmp_path / f"{precision}-{seed}"
            assert cli(["--ckpt", flow, "--invert", held, "--out", out, "--precision", precision,
                        "--batch-size", 4, "--no-progress"], invert) is None
            res = np.load(out / "latents.npz")
            assert res["paths"].tolist() == paths and res["labels"].tolist() == [0, 0, 1, 1, 2, 2]
            assert res["error"].shape == (6,) and res["error"].max() <= tol / 100, (precision, res["error"])
            # independent: z_c = norm2(C_enc(norm(E(x)))) (eq. 5) and u = f(z_c), in float64
            f, _ = load_flow(flow)
            f = f.double()
            with torch.no_grad():
                z_c = s1.encode(x)
                u, _ = f(z_c, torch.from_numpy(res["labels"]))
                back = f.reverse(torch.from_numpy(res["u"]).double(), torch.from_numpy(res["labels"]))
            atol = 1e-10 if precision == "fp64" else 1e-4
            assert np.allclose(res["z_c"], z_c.numpy(), atol=atol) and np.allclose(res["u"], u.numpy(), atol=atol)
            err = (back - torch.from_numpy(res["z_c"]).double()).abs().flatten(1).amax(1)
            assert err.max() <= (1e-8 if precision == "fp64" else 1e-5)
    # grid.png: originals, reconstructions D(z_c), decodings of f^-1(u): three rows of the six images
    assert Image.open(tmp_path / "fp32-0" / "grid.png").size == (6 * 66 + 2, 16 + 3 * 66 + 2)


def test_inversion_under_torchrun_equals_one_process(pipeline, tmp_path):
    args = ["invert.py", "--ckpt", pipeline["flow"], "--invert", pipeline["heldout"], "--no-progress",
            "--device", "cpu"]
    run(args + ["--out", tmp_path / "one", "--batch-size", 4])
    res = run(args + ["--out", tmp_path / "two", "--batch-size", 2], nproc=2)
    assert res.stdout.count("round trip") == 1                           # rank 0 reports
    one, two = np.load(tmp_path / "one" / "latents.npz"), np.load(tmp_path / "two" / "latents.npz")
    assert (one["paths"] == two["paths"]).all() and (one["labels"] == two["labels"]).all()
    for key in ("u", "z_c"):
        assert np.allclose(one[key], two[key], rtol=1e-5, atol=1e-5), key
    assert not list((tmp_path / "two").glob(".shard*"))
    a, b = (np.asarray(Image.open(tmp_path / n / "grid.png")).astype(int) for n in ("one", "two"))
    assert np.abs(a - b).max() <= 1


def test_interpolation_ends_are_the_images_own_decodings(pipeline, tmp_path):
    """--interpolate: slerp between f(z_c) of two images under one label; without guidance the path's ends decode to
    the images' own decodings D(z_c), and every point is f^-1 of the slerp point; files or --invert indices."""
    flow, held = pipeline["flow"], pipeline["tmp"] / "heldout"
    a, b = held / "c0" / "0.png", held / "c2" / "1.png"
    assert cli(["--ckpt", flow, "--interpolate", a, b, "--out", tmp_path / "files", "--label", 1, "--cfg", 2,
                "--steps", 5, "--no-progress"], invert) is None
    res = np.load(tmp_path / "files" / "interpolation.npz")
    assert res["images"].shape == (2, 5, 32, 32, 3) and res["guidance"].tolist() == [0, 2]
    assert np.allclose(res["t"], np.linspace(0, 1, 5))
    f, _ = load_flow(flow)
    s1 = load_stage1(pipeline["stage1"])
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB")).copy()) for p in (a, b)])
    y = torch.tensor([1, 1])
    with torch.no_grad():
        z_c = s1.encode(x.permute(0, 3, 1, 2).float() / 255)
        own = sample.to_uint8(s1.decode(z_c))
        u, _ = f(z_c, y)
        mid = invert.slerp(u[0], u[1], torch.tensor([0.5]))
        mid_image = sample.to_uint8(s1.decode(f.reverse(mid, y[:1])))
    row = res["images"][0].astype(int)
    assert np.abs(row[[0, -1]] - own.astype(int)).max() <= 1
    assert np.abs(row[2] - mid_image[0].astype(int)).max() <= 1
    assert (res["images"][1] != res["images"][0]).any()                 # the guided row
    assert Image.open(tmp_path / "files" / "interpolation.png").size == (5 * 66 + 2, 16 + 2 * 66 + 2)

    # indices into an --invert result, under A's label (class 0) and under the null label
    assert cli(["--ckpt", flow, "--invert", held, "--out", tmp_path / "inv", "--no-progress"], invert) is None
    for label in ("a", "null"):
        out = tmp_path / f"index-{label}"
        assert cli(["--ckpt", flow, "--interpolate", 0, 5, "--latents", tmp_path / "inv" / "latents.npz",
                    "--label", label, "--out", out, "--no-progress"], invert) is None
        images = np.load(out / "interpolation.npz")["images"]
        assert images.shape == (1, 8, 32, 32, 3)                          # no guidance asked: one row
        assert np.abs(images[0, [0, -1]].astype(int) - own.astype(int)).max() <= 1
