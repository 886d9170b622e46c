"""Degradations: the registry is complete, outputs are seeded float32 images, and each model's statistics hold."""
import numpy as np
import pytest
import skimage.data

from tur_ext.data import degradations as D
from tur_ext.tasks import SYNTHETIC_TASKS


@pytest.fixture(scope="module")
def photo():
    """A natural RGB crop in [0, 1] (scikit-image's astronaut)."""
    return (skimage.data.astronaut()[120:248, 160:288].astype(np.float32) / 255.0).copy()


def test_registry_covers_every_synthetic_task():
    assert set(D.DEGRADATIONS) == set(SYNTHETIC_TASKS)
    assert set(D.RANGES) == set(SYNTHETIC_TASKS)


@pytest.mark.parametrize("name", sorted(SYNTHETIC_TASKS))
def test_shape_dtype_range_and_seeded(name, photo):
    before = photo.copy()
    out = D.degrade(name, photo, np.random.default_rng(123))
    assert out.dtype == np.float32 and out.shape == photo.shape
    assert out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_array_equal(photo, before)  # input untouched
    again = D.degrade(name, photo, np.random.default_rng(123))
    np.testing.assert_array_equal(out, again)
    assert np.abs(out - photo).mean() > 1e-3  # it does degrade
    if name != "sr":  # sr has no random parameter
        other = D.degrade(name, photo, np.random.default_rng(124))
        assert not np.array_equal(out, other)


def test_sample_params_within_ranges():
    rng = np.random.default_rng(0)
    for name, ranges in D.RANGES.items():
        draws = [D.sample_params(name, rng) for _ in range(200)]
        for key, (lo, hi) in ranges.items():
            vals = np.array([d[key] for d in draws], np.float64)
            assert vals.min() >= lo and vals.max() <= hi, (name, key)
            if hi > lo:  # uniform draws reach both ends of the range
                assert vals.min() < lo + 0.2 * (hi - lo) and vals.max() > hi - 0.2 * (hi - lo), (name, key)
            if key in ("ksize", "width"):
                assert np.all(vals % 2 == 1), (name, key)
    # MiOIR ranges, as the issue lists them
    assert D.RANGES["blur"] == {"ksize": (7, 21), "sigma": (1.0, 3.0)}
    assert D.RANGES["noise"]["sigma"] == (15.0, 50.0) and D.RANGES["jpeg"]["quality"] == (30, 70)
    assert {k: D.RANGES["rain"][k] for k in ("density", "length", "angle", "width")} == {
        "density": (50.0, 100.0), "length": (20, 40), "angle": (-45.0, 45.0), "width": (3, 11)}
    assert D.RANGES["haze"] == {"airlight": (0.8, 1.0), "beta": (0.5, 2.5)}
    assert D.RANGES["dark"]["gamma"] == (1.0, 3.0) and D.RANGES["sr"]["scale"] == (4, 4)


@pytest.mark.parametrize("name,sigma", [("denoise_15", 15), ("denoise_25", 25), ("denoise_50", 50)])
def test_noise_sigma_measured_back(name, sigma):
    # mid-grey with a gentle ramp: clipping at 0/1 stays negligible even at sigma 50
    ramp = np.linspace(0.4, 0.6, 256, dtype=np.float32)
    clean = np.repeat(np.repeat(ramp[None, :, None], 256, 0), 3, 2)
    out = D.degrade(name, clean, np.random.default_rng(7))
    measured = (out - clean).std() * 255
    assert abs(measured - sigma) < 0.03 * sigma
    assert abs((out - clean).mean()) * 255 < 0.5


def test_noise_task_sigma_in_range():
    clean = np.full((128, 128, 3), 0.5, np.float32)
    rng = np.random.default_rng(3)
    sig = [(D.degrade("noise", clean, rng) - clean).std() * 255 for _ in range(20)]
    assert min(sig) > 14 and max(sig) < 50 and max(sig) - min(sig) > 10


def test_jpeg_error_monotone_in_quality(photo):
    err = [np.abs(D.jpeg(photo, q) - photo).mean() for q in (10, 30, 50, 70, 90)]
    assert all(a > b for a, b in zip(err, err[1:])), err
    # the registry entry draws quality 30..70: its error lies between those two settings
    e = np.abs(D.degrade("jpeg", photo, np.random.default_rng(5)) - photo).mean()
    assert err[3] * 0.95 <= e <= err[1] * 1.05


@pytest.mark.parametrize("name", ["haze", "dehaze"])
def test_haze_brighter_lower_contrast(name, photo):
    out = D.degrade(name, photo, np.random.default_rng(11))
    assert out.mean() > photo.mean() + 0.02
    assert out.std() < photo.std()


def test_haze_model_matches_formula():
    clean = np.full((64, 48, 3), 0.3, np.float32)
    a, beta = 0.9, 1.5
    out = D.haze(clean, a, beta)
    t = (a - out) / (a - 0.3)  # invert I t + A (1 - t)
    np.testing.assert_allclose(t, np.exp(-beta * D.haze_depth_proxy(clean)).repeat(3, 2), rtol=1e-5, atol=1e-6)
    assert t[0].mean() < t[-1].mean()  # the top of the frame is farther, so hazier
    assert D.haze(clean, a, 2.5).mean() > D.haze(clean, a, 0.5).mean()


def test_rain_streaks_follow_angle_and_density():
    clean = np.full((160, 160, 3), 0.3, np.float32)
    rng = np.random.default_rng(0)
    vert = D.rain_streaks(clean, rng, density=100, length=30, angle=0.0, width=3) - clean
    assert vert.min() >= 0  # streaks only brighten
    s = vert[:, :, 0]
    # vertical streaks: the streak map correlates with itself shifted down far more than shifted right
    down = np.corrcoef(s[:-6].ravel(), s[6:].ravel())[0, 1]
    right = np.corrcoef(s[:, :-6].ravel(), s[:, 6:].ravel())[0, 1]
    assert down > 0.5 and right < 0.3
    light = D.rain_streaks(clean, np.random.default_rng(1), density=50, length=30, angle=20.0, width=3) - clean
    heavy = D.rain_streaks(clean, np.random.default_rng(1), density=100, length=30, angle=20.0, width=3) - clean
    assert (heavy > 0.01).mean() > (light > 0.01).mean()


def test_motion_blur_averages_along_its_direction():
    x = np.linspace(0, 1, 64, dtype=np.float32)
    stripes_vertical = np.repeat(np.repeat(x[None, :, None], 64, 0), 3, 2)  # constant along y
    out = D.motion_blur(stripes_vertical, 15, angle=0.0)  # angle 0: blur along y
    np.testing.assert_allclose(out, stripes_vertical, atol=1e-5)
    out = D.motion_blur(stripes_vertical, 15, angle=90.0)  # along x: the ramp's ends are smoothed
    assert np.abs(out - stripes_vertical).max() > 0.01
    const = np.full((32, 32, 3), 0.42, np.float32)
    np.testing.assert_allclose(D.motion_blur(const, 21, 33.0), const, atol=1e-5)


def test_gaussian_blur_smooths_more_with_sigma(photo):
    a, b = D.gaussian_blur(photo, 21, 1.0), D.gaussian_blur(photo, 21, 3.0)
    assert abs(a.mean() - photo.mean()) < 2e-3 and abs(b.mean() - photo.mean()) < 2e-3
    assert np.abs(np.diff(b, axis=1)).mean() < np.abs(np.diff(a, axis=1)).mean() < np.abs(np.diff(photo, axis=1)).mean()


def test_low_light_and_dark(photo):
    np.testing.assert_allclose(D.low_light(photo, 2.0, 0.5), 0.5 * photo.astype(np.float64) ** 2, atol=1e-6)
    assert D.degrade("lowlight", photo, np.random.default_rng(0)).mean() < 0.6 * photo.mean()
    dark = D.degrade("dark", photo, np.random.default_rng(0))
    assert np.all(dark <= photo + 1e-6)


def test_sr_keeps_smooth_and_loses_detail():
    yy, xx = np.mgrid[0:64, 0:64].astype(np.float32)
    smooth = np.repeat((0.5 + 0.3 * np.sin(xx / 12.0) * np.cos(yy / 15.0))[:, :, None], 3, 2)
    noise = np.random.default_rng(0).random((64, 64, 3)).astype(np.float32)
    assert np.abs(D.bicubic_sr(smooth) - smooth).mean() < 0.01
    assert np.abs(D.bicubic_sr(noise) - noise).mean() > 0.15
    assert D.bicubic_sr(np.zeros((30, 33, 3), np.float32)).shape == (30, 33, 3)


def test_bad_inputs():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="clean"):
        D.degrade("noise", np.zeros((8, 8), np.float32), rng)
    with pytest.raises(TypeError, match="clean"):
        D.degrade("noise", np.zeros((8, 8, 3), np.uint8), rng)
    with pytest.raises(ValueError, match="unknown degradation"):
        D.degrade("snow", np.zeros((8, 8, 3), np.float32), rng)
    with pytest.raises(TypeError, match="rng"):
        D.degrade("noise", np.zeros((8, 8, 3), np.float32), 0)
    with pytest.raises(ValueError, match="ksize"):
        D.gaussian_blur(np.zeros((8, 8, 3), np.float32), 4, 1.0)
    with pytest.raises(ValueError, match="quality"):
        D.jpeg(np.zeros((8, 8, 3), np.float32), 0)
