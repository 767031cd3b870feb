"""fid.py: the FID Inception graph against an independent functional computation, the metrics
against closed forms and brute force, CLI = Python API (one process and torchrun), bad input."""

import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from scipy.spatial.distance import cdist

import fid

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# Random weights in the real file layout: the keys of torchvision's inception_v3 with a 1008-way
# fc and no aux head, which is how pytorch-fid's pt_inception-2015-12-05 file is keyed.

def random_fid_weights(seed=0):
    tv = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008,
                                         init_weights=False)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in tv.state_dict().items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(0)
        elif k.endswith("conv.weight"):
            fan_in = v[0].numel()
            sd[k] = torch.randn(v.shape, generator=g) * math.sqrt(2.0 / fan_in)
        elif k.endswith("bn.weight") or k.endswith("running_var"):
            sd[k] = 0.6 + 0.8 * torch.rand(v.shape, generator=g)
        elif k == "fc.weight":
            sd[k] = torch.randn(v.shape, generator=g) * 0.05
        else:                                            # bn.bias, running_mean, fc.bias
            sd[k] = 0.1 * torch.randn(v.shape, generator=g)
    return sd


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    sd = random_fid_weights()
    path = tmp_path_factory.mktemp("w") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(sd, path)
    return sd, path


@pytest.fixture(scope="module")
def sparse_weights(weights):
    """The same network with all but 3 pool3 channels switched off (large negative BN shifts in
    Mixed_7c). With few images the covariances are singular whatever the weights; confined to 3
    channels they stay real-diagonalisable, which keeps scipy's 2048x2048 sqrtm on its fast
    real path (seconds instead of a minute) for the tests that compute a full FID."""
    sd = dict(weights[0])
    for name in ("branch1x1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_3a",
                 "branch3x3dbl_3b", "branch_pool"):
        bias = torch.full_like(sd[f"Mixed_7c.{name}.bn.bias"], -1e4)
        if name == "branch1x1":
            bias[:3] = 0.5
        sd[f"Mixed_7c.{name}.bn.bias"] = bias
    path = weights[1].with_name("sparse.pth")
    torch.save(sd, path)
    return path


# ------------------------------------------------------------------------------------------------
# The TF 2015-12-05 graph written again with plain functional ops on the raw state dict, float64.

def conv(x, sd, name, stride=1, same=True):
    w = sd[name + ".conv.weight"]
    pad = (w.shape[2] // 2, w.shape[3] // 2) if same else 0
    y = F.conv2d(x, w, stride=stride, padding=pad)
    y = F.batch_norm(y, sd[name + ".bn.running_mean"], sd[name + ".bn.running_var"],
                     sd[name + ".bn.weight"], sd[name + ".bn.bias"], False, 0.0, 1e-3)
    return F.relu(y)


def chain(x, sd, names):
    for n in names:
        x = conv(x, sd, n)
    return x


def tf_avg_pool(x):
    """TF 'SAME' 3x3 average: the sum over the window divided by the count of real pixels."""
    ones = torch.ones_like(x[:1, :1])
    window_sum = F.avg_pool2d(x, 3, 1, 1, divisor_override=1)
    return window_sum / F.avg_pool2d(ones, 3, 1, 1, divisor_override=1)


def block_a(x, sd, p):
    return torch.cat([conv(x, sd, p + "branch1x1"),
                      chain(x, sd, [p + "branch5x5_1", p + "branch5x5_2"]),
                      chain(x, sd, [p + f"branch3x3dbl_{i}" for i in (1, 2, 3)]),
                      conv(tf_avg_pool(x), sd, p + "branch_pool")], 1)


def block_b(x, sd, p):
    d = chain(x, sd, [p + "branch3x3dbl_1", p + "branch3x3dbl_2"])
    return torch.cat([conv(x, sd, p + "branch3x3", stride=2, same=False),
                      conv(d, sd, p + "branch3x3dbl_3", stride=2, same=False),
                      F.max_pool2d(x, 3, 2)], 1)


def block_c(x, sd, p):
    return torch.cat([conv(x, sd, p + "branch1x1"),
                      chain(x, sd, [p + f"branch7x7_{i}" for i in (1, 2, 3)]),
                      chain(x, sd, [p + f"branch7x7dbl_{i}" for i in (1, 2, 3, 4, 5)]),
                      conv(tf_avg_pool(x), sd, p + "branch_pool")], 1)


def block_d(x, sd, p):
    a = conv(x, sd, p + "branch3x3_1")
    b = chain(x, sd, [p + f"branch7x7x3_{i}" for i in (1, 2, 3)])
    return torch.cat([conv(a, sd, p + "branch3x3_2", stride=2, same=False),
                      conv(b, sd, p + "branch7x7x3_4", stride=2, same=False),
                      F.max_pool2d(x, 3, 2)], 1)


def block_e(x, sd, p, max_pool):
    a = conv(x, sd, p + "branch3x3_1")
    b = chain(x, sd, [p + "branch3x3dbl_1", p + "branch3x3dbl_2"])
    pooled = F.max_pool2d(x, 3, 1, 1) if max_pool else tf_avg_pool(x)
    return torch.cat([conv(x, sd, p + "branch1x1"),
                      conv(a, sd, p + "branch3x3_2a"), conv(a, sd, p + "branch3x3_2b"),
                      conv(b, sd, p + "branch3x3dbl_3a"), conv(b, sd, p + "branch3x3dbl_3b"),
                      conv(pooled, sd, p + "branch_pool")], 1)


def reference_inception(images01, sd):
    sd = {k: v.double() for k, v in sd.items()}
    x = F.interpolate(images01.double(), size=(299, 299), mode="bilinear", align_corners=False)
    x = 2 * x - 1
    x = conv(x, sd, "Conv2d_1a_3x3", stride=2, same=False)
    x = conv(x, sd, "Conv2d_2a_3x3", same=False)
    x = F.max_pool2d(conv(x, sd, "Conv2d_2b_3x3"), 3, 2)
    x = conv(conv(x, sd, "Conv2d_3b_1x1"), sd, "Conv2d_4a_3x3", same=False)
    x = F.max_pool2d(x, 3, 2)
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        x = block_a(x, sd, name + ".")
    x = block_b(x, sd, "Mixed_6a.")
    for name in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        x = block_c(x, sd, name + ".")
    x = block_d(x, sd, "Mixed_7a.")
    x = block_e(x, sd, "Mixed_7b.", max_pool=False)
    x = block_e(x, sd, "Mixed_7c.", max_pool=True)
    assert x.shape[-2:] == (8, 8)
    pool = F.avg_pool2d(x, 8).flatten(1)                 # pool_3
    return pool, pool @ sd["fc.weight"].T               # softmax/logits/MatMul (no bias)


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_inception_matches_independent_graph(weights):
    sd, path = weights
    torch.manual_seed(0)
    images = torch.rand(1, 3, 48, 40)                    # non-square, resized to 299 inside
    ref_pool, ref_logits = reference_inception(images, sd)
    assert ref_pool.std() > 1e-3 and ref_logits.std() > 1e-3
    folded = fid.load_inception(path)                    # BN folded into the convs
    plain = fid.load_inception(path, fold=False)         # the checkpoint's own layout
    assert set(plain.state_dict()) == set(sd)
    with torch.inference_mode():
        for model in (folded, plain):
            pool, logits = model(images)
            assert pool.shape == (1, 2048) and logits.shape == (1, 1008)
            assert rel_err(pool, ref_pool) < 1e-4
            assert rel_err(logits, ref_logits) < 1e-4
        # The parity check sees the TF-specific pieces: Mixed_7c's max pool, for one.
        folded.Mixed_7c.pool = "avg"
        assert rel_err(folded(images)[0], ref_pool) > 1e-3


def test_random_init_and_batch_consistency():
    torch.manual_seed(0)
    model = fid.InceptionV3().eval()
    images = torch.rand(2, 3, 299, 299)
    with torch.inference_mode():
        pool, logits = model(images)
        one = model(images[1:2])[0]
    assert torch.isfinite(pool).all() and pool.std() > 0 and (pool >= 0).all()   # post-ReLU mean
    assert rel_err(one, pool[1:2]) < 1e-4


# ------------------------------------------------------------------------------------------------
# Metrics.

def test_statistics_is_mean_and_unbiased_covariance():
    x = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    mu, sigma = fid.statistics(torch.from_numpy(x))
    xd = x.astype(np.float64)
    assert mu.dtype == np.float64 and np.allclose(mu, xd.sum(0) / 50)
    c = xd - xd.mean(0)
    assert np.allclose(sigma, c.T @ c / 49)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 2, d), rng.uniform(0.1, 2, d)
    # Commuting covariances (shared eigenvectors): ||mu1-mu2||^2 + sum (sqrt a - sqrt b)^2.
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    # General covariances: tr (S1 S2)^1/2 = tr (S1^1/2 S2 S1^1/2)^1/2, via symmetric eigh.
    m1, m2 = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(d), m2 @ m2.T + 0.1 * np.eye(d)
    w, v = np.linalg.eigh(s1)
    r1 = v @ np.diag(np.sqrt(w)) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    # Singular covariances (fewer samples than dimensions) still give a finite, close value.
    s1[:, 0] = s1[0, :] = 0
    s2[:, 0] = s2[0, :] = 0
    w, v = np.linalg.eigh(s1)
    r1 = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="shapes"):
        fid.frechet_distance(mu1, s1, mu2[:-1], s2[:-1, :-1])


def test_inception_score_direct_and_closed_forms():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((25, 1008)).astype(np.float32) * 3
    p = np.exp(logits.astype(np.float64))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in (0, 10, 20):                                   # splits of 10, 10, 5 (ADM's slicing)
        part = p[i:i + 10]
        py = part.mean(0)
        scores.append(np.exp(np.mean([np.sum(q * np.log(q / py)) for q in part])))
    assert fid.inception_score(logits, split_size=10) == pytest.approx(np.mean(scores), rel=1e-9)
    assert fid.inception_score(torch.from_numpy(logits), split_size=10) == pytest.approx(
        np.mean(scores), rel=1e-9)
    # Constant predictions: IS = 1. Confident and distinct within each split of m: IS = m.
    assert fid.inception_score(np.zeros((8, 1008))) == pytest.approx(1.0)
    confident = np.full((12, 1008), -1e4)
    confident[np.arange(12), np.arange(12)] = 0
    assert fid.inception_score(confident, split_size=4) == pytest.approx(4.0)


def brute_force_pr(ref, gen, k):
    def radii(x):
        d = cdist(x, x)
        np.fill_diagonal(d, np.inf)
        return np.sort(d, 1)[:, k - 1]                      # k-th nearest *other* point
    d = cdist(gen, ref)                                     # (gen, ref)
    precision = np.mean((d <= radii(ref)[None]).any(1))
    recall = np.mean((d <= radii(gen)[:, None]).any(0))
    return precision, recall


@pytest.mark.parametrize("k,block", [(3, 10000), (3, 7), (1, 5), (5, 16)])
def test_precision_recall_matches_brute_force(k, block):
    rng = np.random.default_rng(k * 100 + block)
    ref = rng.standard_normal((60, 8))
    gen = 0.8 * rng.standard_normal((45, 8)) + 0.7          # partly overlapping manifolds
    expected = brute_force_pr(ref, gen, k)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    got = fid.precision_recall(ref.astype(np.float32), torch.from_numpy(gen).float(), k=k,
                               block=block)
    assert got == pytest.approx(expected, abs=1e-12)
    assert fid.precision_recall(ref, ref, k=k, block=block) == (1.0, 1.0)


# ------------------------------------------------------------------------------------------------
# Inputs, CLI = API, torchrun, errors.

def write_pngs(folder, n, seed, size=32, high=256):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        sub = folder / ("a" if i % 2 else "b")              # recursive search
        sub.mkdir(exist_ok=True)
        pixels = rng.integers(0, high, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(sub / f"{i}.png")
    return folder


def run_cli(*args, torchrun=False, wait=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29517"] if torchrun else [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd + [str(ROOT / "fid.py"), *map(str, args), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=env)
    if not wait:
        return proc
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_sources_folder_and_npz_agree(weights, tmp_path):
    _, path = weights
    folder = write_pngs(tmp_path / "imgs", 3, seed=1)
    ds = fid.ImageFiles(folder)
    arr = np.stack([np.asarray(Image.open(f)) for f in ds.files])
    np.savez(tmp_path / "imgs.npz", arr_0=arr)              # stored: read by memory map
    np.savez_compressed(tmp_path / "imgs_c.npz", arr_0=arr)  # deflated: loaded
    model = fid.load_inception(path)
    feats = [fid.extract_features(model, fid.open_source(p)[1], batch_size=2, progress=False)
             for p in (folder, tmp_path / "imgs.npz", tmp_path / "imgs_c.npz")]
    kind, src = fid.open_source(tmp_path / "imgs.npz")
    assert kind == "images" and isinstance(src.array, np.memmap)
    copy = pickle.loads(pickle.dumps(src))                  # as sent to data-loader workers
    assert isinstance(copy.array, np.memmap) and np.array_equal(copy.array, arr)
    for pool, logits in feats[1:]:
        assert np.array_equal(pool, feats[0][0]) and np.array_equal(logits, feats[0][1])
    # The features are the model's, image by image.
    with torch.inference_mode():
        direct = model(torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255)[0]
    assert rel_err(torch.from_numpy(feats[0][0]), direct) < 1e-5
    # Images of different sizes in one batch: each is resized to 299 first, same features.
    Image.fromarray(arr[0, :20]).save(folder / "b" / "short.png")
    mixed = fid.ImageFiles(folder)
    pool, _ = fid.extract_features(model, mixed, batch_size=4, progress=False)
    with torch.inference_mode():
        one = model(torch.from_numpy(arr[0, :20].copy()).permute(2, 0, 1)[None].float() / 255)[0]
    k = mixed.files.index(folder / "b" / "short.png")
    assert rel_err(torch.from_numpy(pool[k:k + 1]), one) < 1e-5
    assert rel_err(torch.from_numpy(np.delete(pool, k, 0)), torch.from_numpy(feats[0][0])) < 1e-5
    # Statistics files round-trip.
    mu, sigma = fid.statistics(feats[0][0])
    fid.save_stats(tmp_path / "s.npz", mu, sigma)
    kind, (mu2, sigma2) = fid.open_source(tmp_path / "s.npz")
    assert kind == "stats" and np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)


def test_cli_equals_api(sparse_weights, tmp_path):
    path = sparse_weights
    ref = write_pngs(tmp_path / "ref", 5, seed=2)
    gen = write_pngs(tmp_path / "gen", 4, seed=3, high=100)    # darker: a clearly nonzero FID
    cli = run_cli(ref, gen, "--weights", path, "--batch-size", "4", "--json", tmp_path / "m.json",
                  wait=False)                               # the API side runs meanwhile
    model = fid.load_inception(path)
    pr, lr = fid.extract_features(model, fid.ImageFiles(ref), batch_size=3, progress=False)
    pg, lg = fid.extract_features(model, fid.ImageFiles(gen), batch_size=3, progress=False)
    assert np.count_nonzero(pr.any(0)) == 3                 # see sparse_weights
    api_fid = fid.frechet_distance(*fid.statistics(pg), *fid.statistics(pr))
    stdout, stderr = cli.communicate(timeout=300)
    assert cli.returncode == 0, stderr
    printed = dict(line.split(": ") for line in stdout.strip().splitlines())
    assert api_fid > 1e-3 and float(printed["FID"]) == pytest.approx(api_fid, rel=1e-5)
    assert float(printed["IS"]) == pytest.approx(fid.inception_score(lg), rel=1e-5)
    assert (float(printed["Precision"]), float(printed["Recall"])) == fid.precision_recall(pr, pg)
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["fid"] == float(printed["FID"]) and metrics["num_gen"] == 4


def test_torchrun_split_gathers_the_same_statistics(weights, tmp_path):
    _, path = weights
    folder = write_pngs(tmp_path / "imgs", 3, seed=4)        # 3 images over 2 ranks: 2 + 1
    out = run_cli("--save-stats", folder, tmp_path / "s.npz", "--weights", path,
                  "--batch-size", "2", torchrun=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("saved statistics") == 1        # rank 0 only
    kind, (mu, sigma) = fid.open_source(tmp_path / "s.npz")
    pool, _ = fid.extract_features(fid.load_inception(path), fid.ImageFiles(folder), progress=False)
    mu1, sigma1 = fid.statistics(pool)
    # Same features up to float32 summation order (1 thread per rank here).
    assert np.allclose(mu, mu1, rtol=1e-5, atol=1e-6 * np.abs(mu1).max())
    assert np.allclose(sigma, sigma1, rtol=1e-4, atol=1e-5 * np.abs(sigma1).max())


def test_errors_are_one_line(weights, tmp_path, capsys):
    _, path = weights
    good = write_pngs(tmp_path / "good", 2, seed=5)
    (tmp_path / "empty").mkdir()
    bad = write_pngs(tmp_path / "bad", 1, seed=6)
    (bad / "b" / "broken.png").write_bytes(b"not a png")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    cases = [
        ([good, good, "--weights", tmp_path / "missing.pth"], "missing.pth"),
        ([tmp_path / "empty", good, "--weights", path], "no images"),
        ([good, bad, "--weights", path], "broken.png"),
        ([good, tmp_path / "other.npz", "--weights", path], "arr_0"),
        ([good, tmp_path / "nowhere", "--weights", path], "nowhere"),
        ([good, good, "--weights", tmp_path / "other.npz"], "other.npz"),
    ]
    for args, needle in cases:
        assert fid.main([str(a) for a in args] + ["--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err and "\n" not in err, err
    bad_layout = {k: v for k, v in random_fid_weights().items() if k != "fc.weight"}
    torch.save(bad_layout, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="fc.weight"):
        fid.load_inception(tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match="pt_inception"):
        fid.load_inception(tmp_path / "missing.pth")
