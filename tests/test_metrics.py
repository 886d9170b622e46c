"""PSNR/SSIM in both conventions against scikit-image and against a plain float64 reimplementation of BasicSR's."""
import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from tur_ext import metrics as M


def _pair_float(shape, seed, noise=0.08):
    rng = np.random.default_rng(seed)
    ref = rng.random(shape)
    img = np.clip(ref + rng.normal(0, noise, shape), 0, 1)
    return img, ref


def _pair_u8(shape, seed, noise=12):
    rng = np.random.default_rng(seed)
    ref = rng.integers(0, 256, shape).astype(np.uint8)
    img = np.clip(ref.astype(int) + rng.integers(-noise, noise + 1, shape), 0, 255).astype(np.uint8)
    return img, ref


# ----------------------------------------------------------------------------- PromptIR convention vs scikit-image

@pytest.mark.parametrize("shape,seed", [((32, 32, 3), 0), ((45, 61, 3), 1), ((20, 17, 3), 2), ((33, 40, 1), 3)])
def test_promptir_matches_skimage(shape, seed):
    img, ref = _pair_float(shape, seed)
    assert M.psnr_promptir(img, ref) == pytest.approx(peak_signal_noise_ratio(ref, img, data_range=1), abs=1e-9)
    expect = structural_similarity(ref, img, data_range=1, channel_axis=-1)
    assert M.ssim_promptir(img, ref) == pytest.approx(expect, abs=1e-9)


def test_promptir_float32_within_skimage_precision():
    img, ref = _pair_float((40, 40, 3), 4)
    img, ref = img.astype(np.float32), ref.astype(np.float32)
    assert M.psnr_promptir(img, ref) == pytest.approx(peak_signal_noise_ratio(ref, img, data_range=1), abs=1e-4)
    assert M.ssim_promptir(img, ref) == pytest.approx(
        structural_similarity(ref, img, data_range=1, channel_axis=-1), abs=1e-5)


def test_promptir_clips_to_unit_range():
    img, ref = _pair_float((24, 24, 3), 5)
    over = img.copy()
    over[0, 0] = 1.7
    clipped = np.clip(over, 0, 1)
    assert M.psnr_promptir(over, ref) == M.psnr_promptir(clipped, ref)
    assert M.ssim_promptir(over, ref) == M.ssim_promptir(clipped, ref)


# ----------------------------------------------------------------------------- BasicSR convention vs scikit-image

@pytest.mark.parametrize("shape,seed,crop", [((32, 32, 3), 0, 0), ((50, 43, 3), 1, 4), ((30, 30, 3), 2, 2)])
def test_basicsr_matches_skimage(shape, seed, crop):
    img, ref = _pair_u8(shape, seed)
    c = slice(crop, shape[0] - crop), slice(crop, shape[1] - crop)
    a, b = img[c].astype(np.float64), ref[c].astype(np.float64)
    assert M.psnr_basicsr(img, ref, crop_border=crop) == pytest.approx(
        peak_signal_noise_ratio(b, a, data_range=255), abs=1e-9)
    # BasicSR's SSIM is scikit-image's with an 11x11 Gaussian (sigma 1.5) and population statistics
    expect = structural_similarity(b, a, data_range=255, gaussian_weights=True, sigma=1.5,
                                   use_sample_covariance=False, channel_axis=-1)
    assert M.ssim_basicsr(img, ref, crop_border=crop) == pytest.approx(expect, abs=1e-9)


def _y(img255):
    r, g, b = img255[..., 0], img255[..., 1], img255[..., 2]
    return 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0


def test_basicsr_y_channel_matches_skimage_on_luma():
    img, ref = _pair_u8((40, 36, 3), 6)
    a, b = _y(img.astype(np.float64))[3:-3, 3:-3], _y(ref.astype(np.float64))[3:-3, 3:-3]
    assert M.psnr_basicsr(img, ref, 3, True) == pytest.approx(peak_signal_noise_ratio(b, a, data_range=255), abs=1e-9)
    expect = structural_similarity(b, a, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert M.ssim_basicsr(img, ref, 3, True) == pytest.approx(expect, abs=1e-9)


# ----------------------------------------------------------------------------- BasicSR vs a plain reimplementation

def _reference_basicsr(img_u8, ref_u8, crop, y):
    """Straight from the definition, in float64 with explicit loops over windows."""
    a, b = img_u8.astype(np.float64), ref_u8.astype(np.float64)
    if crop:
        a, b = a[crop:-crop, crop:-crop], b[crop:-crop, crop:-crop]
    if y:
        a, b = _y(a)[..., None], _y(b)[..., None]
    mse = np.mean((a - b) ** 2)
    psnr = 10 * math.log10(255.0 ** 2 / mse)
    ax = np.arange(11) - 5
    g = np.exp(-(ax[:, None] ** 2 + ax[None, :] ** 2) / (2 * 1.5 ** 2))
    w = g / g.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    per_channel = []
    for ch in range(a.shape[2]):
        vals = []
        for i in range(a.shape[0] - 10):
            for j in range(a.shape[1] - 10):
                x, z = a[i:i + 11, j:j + 11, ch], b[i:i + 11, j:j + 11, ch]
                mx, mz = (w * x).sum(), (w * z).sum()
                vx = (w * x * x).sum() - mx * mx
                vz = (w * z * z).sum() - mz * mz
                cxz = (w * x * z).sum() - mx * mz
                vals.append((2 * mx * mz + c1) * (2 * cxz + c2) / ((mx * mx + mz * mz + c1) * (vx + vz + c2)))
        per_channel.append(np.mean(vals))
    return psnr, float(np.mean(per_channel))


@pytest.mark.parametrize("crop,y", [(0, False), (2, False), (0, True), (3, True)])
def test_basicsr_matches_plain_reimplementation(crop, y):
    img, ref = _pair_u8((26, 29, 3), 10 + crop, noise=30)
    p, s = _reference_basicsr(img, ref, crop, y)
    assert M.psnr_basicsr(img, ref, crop_border=crop, test_y_channel=y) == pytest.approx(p, abs=1e-9)
    assert M.ssim_basicsr(img, ref, crop_border=crop, test_y_channel=y) == pytest.approx(s, abs=1e-9)


def test_basicsr_quantises_float_input_like_tensor2img():
    img, ref = _pair_float((24, 24, 3), 11)
    img, ref = img.astype(np.float32), ref.astype(np.float32)
    q = lambda x: np.round(np.clip(x, 0, 1) * np.float32(255)).astype(np.uint8)  # noqa: E731
    assert M.psnr_basicsr(img, ref) == M.psnr_basicsr(q(img), q(ref))
    assert M.ssim_basicsr(img, ref, test_y_channel=True) == M.ssim_basicsr(q(img), q(ref), test_y_channel=True)


# ----------------------------------------------------------------------------- API

def test_identical_images():
    img, _ = _pair_float((16, 16, 3), 12)
    assert M.psnr(img, img) == math.inf and M.psnr(img, img, "basicsr") == math.inf
    assert M.ssim(img, img) == pytest.approx(1.0) and M.ssim(img, img, "basicsr") == pytest.approx(1.0)


def test_tensors_and_batches_match_numpy():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(3, 3, 24, 20, generator=g)
    pred = (target + 0.05 * torch.randn(3, 3, 24, 20, generator=g)).clamp(0, 1)
    for conv, kw in (("promptir", {}), ("basicsr", {"crop_border": 2, "test_y_channel": True})):
        ps, ss = M.psnr_batch(pred, target, conv, **kw), M.ssim_batch(pred, target, conv, **kw)
        for i in range(3):
            hwc = lambda t: t.permute(1, 2, 0).numpy()  # noqa: E731
            assert ps[i] == pytest.approx(M.psnr(hwc(pred[i]), hwc(target[i]), conv, **kw), abs=1e-12)
            assert ss[i] == pytest.approx(M.ssim(hwc(pred[i]), hwc(target[i]), conv, **kw), abs=1e-12)
            assert ps[i] == M.psnr(pred[i], target[i], conv, **kw)
    expect = peak_signal_noise_ratio(target[0].permute(1, 2, 0).numpy(), pred[0].permute(1, 2, 0).numpy(),
                                     data_range=1)
    assert M.psnr_batch(pred, target)[0] == pytest.approx(expect, abs=1e-4)


def test_bad_arguments():
    a = np.zeros((16, 16, 3), np.float32)
    with pytest.raises(ValueError, match="same shape"):
        M.psnr(a, np.zeros((16, 15, 3), np.float32))
    with pytest.raises(ValueError, match="convention"):
        M.psnr(a, a, "matlab")
    with pytest.raises(ValueError, match="crop_border"):
        M.psnr(a, a, "promptir", crop_border=4)
    with pytest.raises(ValueError, match="crop_border"):
        M.psnr_basicsr(a, a, crop_border=8)
    with pytest.raises(TypeError, match="float"):
        M.psnr_promptir(a.astype(np.uint8), a.astype(np.uint8))
    with pytest.raises(ValueError, match="at least"):
        M.ssim_basicsr(np.zeros((8, 8, 3), np.float32), np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="3-channel"):
        M.psnr_basicsr(np.zeros((8, 8, 1), np.uint8), np.zeros((8, 8, 1), np.uint8), test_y_channel=True)
    with pytest.raises(ValueError, match="B, C, H, W"):
        M.psnr_batch(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))
