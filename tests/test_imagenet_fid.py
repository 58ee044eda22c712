"""ImageNet FID / IS (issue 5): metric math, the Flax FID Inception-v3 against the pytorch-fid state-dict layout and an
independent PyTorch re-implementation, weight formats and errors, and the CLI end to end. Random weights throughout
(the real file is a user download); every network forward uses one compiled shape: 8 images of 32×32 on the 8 fake
devices."""

import json
import os

import jax
import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.numpy import save_file
from torch import nn

from data_pipelines.imagenet import center_crop_arr
from latent_lm import cli
from latent_lm.errors import ConfigError, DataError, MissingInputError
from latent_lm.evaluation import imagenet_fid, inception
from latent_lm.evaluation.frechet import feature_stats, frechet_distance

# --------------------------------------------------------------------------------------------------------------
# The pytorch-fid state dict, written from the architecture (torchvision Inception3(num_classes=1008,
# aux_logits=False) with pytorch-fid's FIDInceptionA/C/E_1/E_2 swapped in; the patches change forward passes only).
# Each BasicConv2d contributes conv.weight [out,in,kh,kw] and bn.{weight,bias,running_mean,running_var} [out] plus
# bn.num_batches_tracked [] (the file was saved by torch ≥ 0.4.1: pytorch-fid issue #34 shows torch 0.4.0 rejecting
# exactly these keys). 5 stem + 3×7 (A) + 4 (B) + 4×10 (C) + 6 (D) + 2×9 (E) = 94 convs → 94×6 + fc.{weight,bias}.
EXPECTED_TENSORS = 566


def _convs_a(name, cin, pool):
    return [(f"{name}.branch1x1", cin, 64, 1, 1), (f"{name}.branch5x5_1", cin, 48, 1, 1),
            (f"{name}.branch5x5_2", 48, 64, 5, 5), (f"{name}.branch3x3dbl_1", cin, 64, 1, 1),
            (f"{name}.branch3x3dbl_2", 64, 96, 3, 3), (f"{name}.branch3x3dbl_3", 96, 96, 3, 3),
            (f"{name}.branch_pool", cin, pool, 1, 1)]


def _convs_c(name, c7):
    return [(f"{name}.branch1x1", 768, 192, 1, 1), (f"{name}.branch7x7_1", 768, c7, 1, 1),
            (f"{name}.branch7x7_2", c7, c7, 1, 7), (f"{name}.branch7x7_3", c7, 192, 7, 1),
            (f"{name}.branch7x7dbl_1", 768, c7, 1, 1), (f"{name}.branch7x7dbl_2", c7, c7, 7, 1),
            (f"{name}.branch7x7dbl_3", c7, c7, 1, 7), (f"{name}.branch7x7dbl_4", c7, c7, 7, 1),
            (f"{name}.branch7x7dbl_5", c7, 192, 1, 7), (f"{name}.branch_pool", 768, 192, 1, 1)]


def _convs_e(name, cin):
    return [(f"{name}.branch1x1", cin, 320, 1, 1), (f"{name}.branch3x3_1", cin, 384, 1, 1),
            (f"{name}.branch3x3_2a", 384, 384, 1, 3), (f"{name}.branch3x3_2b", 384, 384, 3, 1),
            (f"{name}.branch3x3dbl_1", cin, 448, 1, 1), (f"{name}.branch3x3dbl_2", 448, 384, 3, 3),
            (f"{name}.branch3x3dbl_3a", 384, 384, 1, 3), (f"{name}.branch3x3dbl_3b", 384, 384, 3, 1),
            (f"{name}.branch_pool", cin, 192, 1, 1)]


CONVS = ([("Conv2d_1a_3x3", 3, 32, 3, 3), ("Conv2d_2a_3x3", 32, 32, 3, 3), ("Conv2d_2b_3x3", 32, 64, 3, 3),
          ("Conv2d_3b_1x1", 64, 80, 1, 1), ("Conv2d_4a_3x3", 80, 192, 3, 3)]
         + _convs_a("Mixed_5b", 192, 32) + _convs_a("Mixed_5c", 256, 64) + _convs_a("Mixed_5d", 288, 64)
         + [("Mixed_6a.branch3x3", 288, 384, 3, 3), ("Mixed_6a.branch3x3dbl_1", 288, 64, 1, 1),
            ("Mixed_6a.branch3x3dbl_2", 64, 96, 3, 3), ("Mixed_6a.branch3x3dbl_3", 96, 96, 3, 3)]
         + _convs_c("Mixed_6b", 128) + _convs_c("Mixed_6c", 160) + _convs_c("Mixed_6d", 160) + _convs_c("Mixed_6e", 192)
         + [("Mixed_7a.branch3x3_1", 768, 192, 1, 1), ("Mixed_7a.branch3x3_2", 192, 320, 3, 3),
            ("Mixed_7a.branch7x7x3_1", 768, 192, 1, 1), ("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7),
            ("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1), ("Mixed_7a.branch7x7x3_4", 192, 192, 3, 3)]
         + _convs_e("Mixed_7b", 1280) + _convs_e("Mixed_7c", 2048))


def _table() -> dict[str, tuple[int, ...]]:
    table = {}
    for name, cin, cout, kh, kw in CONVS:
        table[f"{name}.conv.weight"] = (cout, cin, kh, kw)
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            table[f"{name}.bn.{leaf}"] = (cout,)
        table[f"{name}.bn.num_batches_tracked"] = ()
    table["fc.weight"], table["fc.bias"] = (1008, 2048), (1008,)
    return table


PYTORCH_FID_TABLE = _table()


def _random_state_dict(seed=0) -> dict[str, np.ndarray]:
    """He-scaled convs and BatchNorm statistics near identity keep activations O(1) through the 94 layers."""
    rng = np.random.default_rng(seed)
    sd = {}
    for key, shape in PYTORCH_FID_TABLE.items():
        if key.endswith("num_batches_tracked"):
            sd[key] = np.array(1000, np.int64)
        elif key.endswith("conv.weight"):
            sd[key] = (rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))).astype(np.float32)
        elif key.endswith(("bn.weight", "running_var")):
            sd[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif key == "fc.weight":
            sd[key] = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        else:  # bn.bias, running_mean, fc.bias
            sd[key] = (rng.standard_normal(shape) * 0.1).astype(np.float32)
    return sd


# --------------------------------------------------------------------------------------------------------------
# An independent PyTorch FID Inception (plain torch.nn, NCHW), written from torchvision's Inception3 and
# pytorch-fid's inception.py.

class TorchConv(nn.Module):
    def __init__(self, cin, cout, k, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class TorchBlock(nn.Module):
    """Builds its BasicConv2d children from the CONVS rows of one Mixed_* block."""

    def __init__(self, name):
        super().__init__()
        for full, cin, cout, kh, kw in CONVS:
            if full.startswith(name + "."):
                stride = 2 if full.split(".")[1] in ("branch3x3", "branch3x3dbl_3", "branch3x3_2", "branch7x7x3_4") \
                    and name in ("Mixed_6a", "Mixed_7a") else 1
                pad = (0, 0) if stride == 2 else (kh // 2, kw // 2)
                self.add_module(full.split(".")[1], TorchConv(cin, cout, (kh, kw), stride, pad))


class TorchA(TorchBlock):
    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False))
        return torch.cat([self.branch1x1(x), b5, b3, bp], 1)


class TorchB(TorchBlock):
    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, 2)], 1)


class TorchC(TorchBlock):
    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        bp = self.branch_pool(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False))
        return torch.cat([self.branch1x1(x), b7, bd, bp], 1)


class TorchD(TorchBlock):
    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, 3, 2)], 1)


class TorchE(TorchBlock):
    def __init__(self, name, max_pool):
        super().__init__(name)
        self.max_pool = max_pool

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = F.max_pool2d(x, 3, 1, 1) if self.max_pool else F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class TorchFIDInception(nn.Module):
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = TorchConv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = TorchConv(32, 32, 3)
        self.Conv2d_2b_3x3 = TorchConv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = TorchConv(64, 80, 1)
        self.Conv2d_4a_3x3 = TorchConv(80, 192, 3)
        for n in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
            setattr(self, n, TorchA(n))
        self.Mixed_6a = TorchB("Mixed_6a")
        for n in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
            setattr(self, n, TorchC(n))
        self.Mixed_7a = TorchD("Mixed_7a")
        self.Mixed_7b = TorchE("Mixed_7b", max_pool=False)
        self.Mixed_7c = TorchE("Mixed_7c", max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, images_uint8_nhwc):
        x = torch.from_numpy(np.asarray(images_uint8_nhwc)).permute(0, 3, 1, 2).float() / 255.0
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2)))
        x = F.max_pool2d(x, 3, 2)
        for n in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                  "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, n)(x)
        pool = x.mean((2, 3))
        return pool, self.fc(pool)


# --------------------------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One PyTorch thread: with the other test worker on the second core, 2 intra-op threads spin against it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(7)
    # Smooth-ish random images (low-frequency noise + per-image colour) so the resize is exercised on structure.
    base = rng.uniform(0, 255, (10, 8, 8, 3))
    up = np.asarray([np.asarray(Image.fromarray(b.astype(np.uint8)).resize((32, 32), Image.BICUBIC)) for b in base])
    return np.clip(up.astype(np.float64) + rng.normal(0, 20, up.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The random state dict written as .pth (torch.save), .safetensors and .npz (this one without the 94
    num_batches_tracked counters, which inference does not need)."""
    d = tmp_path_factory.mktemp("weights")
    sd = _random_state_dict()
    paths = {"pth": str(d / "w.pth"), "safetensors": str(d / "w.safetensors"), "npz": str(d / "w.npz")}
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, paths["pth"])
    save_file(sd, paths["safetensors"])
    np.savez(paths["npz"], **{k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")})
    return sd, paths


def _flat(variables) -> dict[str, np.ndarray]:
    return {"/".join(k.key for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(variables)[0]}


def test_layout_matches_pytorch_fid_state_dict():
    assert len(PYTORCH_FID_TABLE) == EXPECTED_TENSORS
    # torchvision documents inception_v3 (aux logits, 1000 classes) at 27,161,264 parameters; without AuxLogits
    # (3,326,696: conv0 1×1 768→128 + bn, conv1 5×5 128→768 + bn, fc 768→1000) and with 8 more fc classes
    # (8·2048 + 8) the FID network has 23,850,960. Counts conv, bn weight/bias and fc (not the running statistics).
    n = sum(int(np.prod(s)) for k, s in PYTORCH_FID_TABLE.items()
            if k.endswith(("conv.weight", "bn.weight", "bn.bias")) or k.startswith("fc."))
    assert n == 27_161_264 - 3_326_696 + 8 * 2048 + 8
    layout = {k: shape for k, (_, shape, _) in inception.torch_layout().items()}
    assert set(layout) | inception.bn_counters() == set(PYTORCH_FID_TABLE)
    assert layout == {k: s for k, s in PYTORCH_FID_TABLE.items() if not k.endswith("num_batches_tracked")}
    # The independent torch twin has exactly the table's state dict, so it can load the same file strictly.
    ref = {k: tuple(v.shape) for k, v in TorchFIDInception().state_dict().items()}
    assert ref == PYTORCH_FID_TABLE


def test_formats_load_identically_and_match_independent_torch(weights, images):
    sd, paths = weights
    loaded = {fmt: inception.load_variables(p) for fmt, p in paths.items()}
    flat = {fmt: _flat(v) for fmt, v in loaded.items()}
    for fmt in ("safetensors", "npz"):
        assert flat[fmt].keys() == flat["pth"].keys()
        for k, v in flat["pth"].items():
            np.testing.assert_array_equal(flat[fmt][k], v, err_msg=f"{fmt}: {k}")
    # The three formats load to identical variables (above), so one network run stands for all of them: 10 images
    # in batches of 8, the second zero-padded.
    extractor = imagenet_fid.InceptionFeatures(loaded["npz"], batch_size=8)
    p10, l10 = extractor(iter([images[:8], images[8:]]))
    pool, logits = p10[:8], l10[:8]
    assert p10.shape == (10, 2048) and l10.shape == (10, 1008)

    twin = TorchFIDInception().eval()
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    with torch.no_grad():
        ref_pool, ref_logits = (t.numpy() for t in twin(images[:8]))
    scale = np.abs(ref_pool).max()
    assert 1.0 < scale < 1000, scale  # the random network neither vanished nor blew up (measured: 54)
    err = np.abs(pool - ref_pool).max()
    ref_unbiased = ref_logits - sd["fc.bias"]
    logit_err = np.abs(logits - ref_unbiased).max()
    print(f"max |JAX − torch|: pool_3 {err:.2e} (max |feature| {scale:.1f}), unbiased logits {logit_err:.2e} "
          f"(max |logit| {np.abs(ref_unbiased).max():.1f})")
    assert err < 1e-3 and logit_err < 1e-3  # measured 4e-5 on pool_3

    # Padding and batch position do not leak: images 8–9, computed in the zero-padded batch above, give the same rows
    # at the front of a full batch.
    p_front, _ = extractor(iter([np.concatenate([images[8:], images[:6]])]))
    np.testing.assert_allclose(p_front[:2], p10[8:], rtol=1e-5, atol=1e-5)


def test_weight_errors(weights, tmp_path):
    sd, _ = weights
    with pytest.raises(MissingInputError, match="pytorch-fid/releases/download/fid_weights/pt_inception"):
        inception.load_variables(str(tmp_path / "absent.pth"))
    bad = dict(sd)
    bad["Mixed_6e.branch7x7_2.conv.weights"] = bad.pop("Mixed_6e.branch7x7_2.conv.weight")  # a typo'd key
    np.savez(tmp_path / "typo.npz", **bad)
    with pytest.raises(DataError, match=r"unexpected key 'Mixed_6e\.branch7x7_2\.conv\.weights'"):
        inception.load_variables(str(tmp_path / "typo.npz"))
    missing = {k: v for k, v in sd.items() if k != "fc.bias"}
    with pytest.raises(DataError, match=r"missing key 'fc\.bias'"):
        inception.variables_from_state_dict(missing)
    wrong = dict(sd, **{"Mixed_5b.branch_pool.conv.weight": np.zeros((64, 192, 1, 1), np.float32)})
    with pytest.raises(DataError, match=r"'Mixed_5b\.branch_pool\.conv\.weight' has shape \[64, 192, 1, 1\]"):
        inception.variables_from_state_dict(wrong)
    with pytest.raises(DataError, match="unknown extension"):
        open(tmp_path / "w.ckpt", "w").close()
        inception.load_variables(str(tmp_path / "w.ckpt"))


def test_convert_cli(weights, tmp_path, capsys):
    sd, paths = weights
    out = tmp_path / "inception_fid.safetensors"
    inception.main(["--convert", paths["pth"], "--out", str(out)])
    assert f"({EXPECTED_TENSORS} tensors)" in capsys.readouterr().out
    from safetensors.numpy import load_file
    back = load_file(str(out))
    assert back.keys() == sd.keys()
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])


def test_frechet_distance_against_scipy():
    def reference(x, y):  # symmetric route: Tr((Σ1Σ2)^½) = Tr((Σ1^½ Σ2 Σ1^½)^½)
        m1, m2, s1, s2 = x.mean(0), y.mean(0), np.cov(x, rowvar=False), np.cov(y, rowvar=False)
        r = scipy.linalg.sqrtm(s1).real
        return np.sum((m1 - m2) ** 2) + np.trace(s1 + s2) - 2 * np.trace(scipy.linalg.sqrtm(r @ s2 @ r).real)

    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 64)) @ rng.normal(size=(64, 64)) * 0.3 + 1.0
    b = rng.normal(size=(300, 64)) * 1.5
    assert frechet_distance(*feature_stats(a), *feature_stats(b)) == pytest.approx(reference(a, b), rel=1e-8)
    # Near-singular covariances: rank-6 signals in 64 dimensions plus 1e-5 noise (eigenvalues down to ~1e-10).
    a = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 64)) + 1e-5 * rng.normal(size=(500, 64))
    b = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 64)) + 1e-5 * rng.normal(size=(500, 64)) + 0.2
    fd, ref = frechet_distance(*feature_stats(a), *feature_stats(b)), reference(a, b)
    assert np.isfinite(fd) and fd == pytest.approx(ref, rel=1e-5)


def test_inception_score_against_definition():
    def reference(logits, splits):  # p(y|x) by exp/sum, KL by scipy.stats.entropy, from the definition
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        n = len(p) // splits
        scores = []
        for k in range(splits):
            part = p[k * n:(k + 1) * n]
            py = part.mean(0)
            scores.append(np.exp(np.mean([scipy.stats.entropy(px, py) for px in part])))
        return np.mean(scores), np.std(scores)

    rng = np.random.default_rng(3)
    logits = rng.normal(size=(1003, 1008)) * 4.0  # 1003: the 3 left over after 10 splits are dropped
    mean, std = imagenet_fid.inception_score(logits, 10)
    ref_mean, ref_std = reference(logits, 10)
    assert mean == pytest.approx(ref_mean, rel=1e-10) and std == pytest.approx(ref_std, rel=1e-8)
    # Confident, evenly spread predictions over 5 classes → IS = 5; identical predictions → IS = 1.
    confident = 60.0 * np.eye(1008)[np.arange(100) % 5]
    assert imagenet_fid.inception_score(confident, 10)[0] == pytest.approx(5.0, rel=1e-6)
    assert imagenet_fid.inception_score(np.tile(logits[:1], (50, 1)), 10) == pytest.approx((1.0, 0.0))
    with pytest.raises(DataError, match="at least 10 samples"):
        imagenet_fid.inception_score(logits[:9], 10)


def test_cli_scores_with_the_statistics_of_its_inputs(weights, images, tmp_path, monkeypatch, capsys):
    """The CLI's two stages, one batch of 8 each: --make_ref writes the pool_3 statistics of a folder of PNGs of
    several sizes (ADM center crop to 32), and scoring the same crops as a sampler npz hands the distance exactly
    those statistics for both sides, then writes the JSON. The 2048-dimensional matrix square root (8–45 s of CPU per
    call here) is left to the slow end-to-end test: here the distance is a spy that records its inputs and returns a
    marker value; frechet_distance itself is checked against scipy in test_frechet_distance_against_scipy.
    (Fast sibling of test_cli_end_to_end.)"""
    _, paths = weights
    real = tmp_path / "real"
    real.mkdir()
    for i, img in enumerate(images[:8]):
        Image.fromarray(img).resize((32 + 8 * (i % 3), 32 + 4 * (i % 2))).save(real / f"{i:03d}.png")
    ref = tmp_path / "ref.npz"
    assert cli.run(imagenet_fid.main, ["--make_ref", str(real), "--out", str(ref), "--weights", paths["safetensors"],
                                       "--image_size", "32", "--batch_size", "8"]) == 0
    with np.load(ref) as r:
        mu_ref, sigma_ref = r["mu"], r["sigma"]
        assert mu_ref.shape == (2048,) and sigma_ref.shape == (2048, 2048) and int(r["num_images"]) == 8

    crops = np.stack([center_crop_arr(Image.open(real / f"{i:03d}.png").convert("RGB"), 32) for i in range(8)])
    samples = tmp_path / "samples" / "final.npz"
    samples.parent.mkdir()
    np.savez(samples, images=crops, labels=np.arange(8) % 3)
    seen = {}

    def spy(*stats):
        seen["stats"] = stats
        return 12.5

    monkeypatch.setattr(imagenet_fid, "frechet_distance", spy)
    assert cli.run(imagenet_fid.main, ["--samples", str(samples), "--ref", str(ref), "--weights", paths["npz"],
                                       "--batch_size", "8", "--num_splits", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("FID 12.500  IS ")
    mu, sigma, mu2, sigma2 = seen["stats"]
    np.testing.assert_array_equal(mu2, mu_ref)
    np.testing.assert_array_equal(sigma2, sigma_ref)
    # The same crops through the same network (weights from another file format): the same statistics.
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-6, atol=1e-6)
    with open(tmp_path / "samples" / "final_imagenet_fid.json") as f:
        result = json.load(f)
    assert result["fid"] == 12.5 and result["num_samples"] == 8 and result["inception_score_splits"] == 2
    assert np.isfinite(result["inception_score"]) and result["inception_score"] >= 1.0
    assert not [n for n in os.listdir(samples.parent) if ".tmp" in n]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # 10 samples: a rank-9 covariance, as expected
@pytest.mark.usefixtures("full_optimization")  # Inception over images: executing is the cost (55 s unoptimised, 27 s)
def test_cli_end_to_end(weights, images, tmp_path, capsys):
    """Slow (the 2048-dimensional matrix square root of the FID). Fast sibling:
    test_cli_scores_with_the_statistics_of_its_inputs."""
    _, paths = weights
    # Real images as a folder of PNGs of different sizes (ADM center crop to 32) → reference statistics.
    real = tmp_path / "real"
    real.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).resize((32 + 8 * (i % 3), 32 + 4 * (i % 2))).save(real / f"{i:03d}.png")
    ref = tmp_path / "ref.npz"
    imagenet_fid.main(["--make_ref", str(real), "--out", str(ref), "--weights", paths["safetensors"],
                       "--image_size", "32", "--batch_size", "8"])
    with np.load(ref) as r:
        assert r["mu"].shape == (2048,) and r["sigma"].shape == (2048, 2048) and int(r["num_images"]) == 10

    samples = tmp_path / "samples" / "final.npz"
    samples.parent.mkdir()
    np.savez(samples, images=images[::-1].copy(), labels=np.arange(10) % 3)
    imagenet_fid.main(["--samples", str(samples), "--ref", str(ref), "--weights", paths["npz"],
                       "--batch_size", "8", "--num_splits", "2"])
    assert "FID" in capsys.readouterr().out
    with open(tmp_path / "samples" / "final_imagenet_fid.json") as f:
        result = json.load(f)
    assert result["num_samples"] == 10 and result["inception_score_splits"] == 2
    assert np.isfinite(result["fid"]) and result["fid"] >= -1e-6
    assert result["inception_score"] >= 1.0
    assert not [n for n in os.listdir(samples.parent) if ".tmp" in n]


def test_npz_images_streams_batches(tmp_path):
    """Sampler (`images`) and ADM (`arr_0`) npz files, plain or compressed, read in batches straight from the zip;
    a Fortran-ordered array (not streamable) is loaded whole instead."""
    imgs = np.random.default_rng(2).integers(0, 256, (11, 5, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "ours.npz", images=imgs, labels=np.arange(11))
    np.savez_compressed(tmp_path / "adm.npz", arr_0=imgs)
    np.savez(tmp_path / "fortran.npz", images=np.asfortranarray(imgs))
    for name in ("ours.npz", "adm.npz", "fortran.npz"):
        reader = imagenet_fid.NpzImages(str(tmp_path / name))
        assert len(reader) == 11 and reader.shape == imgs.shape
        batches = list(reader.batches(4))
        assert [len(b) for b in batches] == [4, 4, 3]
        np.testing.assert_array_equal(np.concatenate(batches), imgs)
    np.savez(tmp_path / "other.npz", pictures=imgs)
    with pytest.raises(DataError, match=r"no image array: expected one of \['images', 'arr_0'\]"):
        imagenet_fid.NpzImages(str(tmp_path / "other.npz"))


def test_input_errors(tmp_path, capsys):
    np.savez(tmp_path / "stats_only_mu.npz", mu=np.zeros(2048))
    with pytest.raises(DataError, match=r"lacks \['sigma'\]"):
        imagenet_fid.load_reference(str(tmp_path / "stats_only_mu.npz"))
    with pytest.raises(MissingInputError, match="VIRTUAL_imagenet256_labeled.npz"):
        imagenet_fid.load_reference(str(tmp_path / "absent.npz"))
    np.savez(tmp_path / "float_images.npz", images=np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(DataError, match="must be uint8"):
        imagenet_fid.NpzImages(str(tmp_path / "float_images.npz"))
    with pytest.raises(ConfigError, match="multiple of the 8 local devices"):
        imagenet_fid.InceptionFeatures({}, batch_size=12)
    # The CLI turns a missing weight file into one line and exit status 2.
    np.savez(tmp_path / "s.npz", images=np.zeros((10, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    assert cli.run(imagenet_fid.main, ["--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz"),
                                       "--weights", str(tmp_path / "none.pth")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pt_inception-2015-12-05-6726825d.pth" in err


@pytest.mark.parametrize("shape", [(2, 330, 310, 3), (2, 40, 24, 1)])
def test_resize_matches_pytorch_fid(shape):
    """pytorch-fid's input path: /255, F.interpolate(bilinear, align_corners=False, no antialias), 2x−1; downsampling
    (where jax.image.resize would antialias by default) and upsampling of a grayscale image (repeated to RGB)."""
    imgs = np.random.default_rng(5).integers(0, 256, shape, dtype=np.uint8)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().expand(-1, 3, -1, -1) / 255.0
    ref = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
    got = np.asarray(jax.jit(inception.preprocess)(imgs))
    np.testing.assert_allclose(got, ref.permute(0, 2, 3, 1).numpy(), atol=2e-6)
