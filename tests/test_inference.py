"""Python inference (`tur restore`): padding, the tiling and blending rule, file handling, the command line."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from export_helpers import TASKS, session_artifacts, photo_crop, tiny_model
from tur_ext import deploy_cli
from tur_ext.data.io import read_image
from tur_ext.inference import (
    blend_weights,
    load_restorer,
    resolve_tiling,
    restore_files,
    run_tiled,
    tile_starts,
)
from tur_ext.models import strip_uncertainty
from tur_ext.tasks import TASK_SETS


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return session_artifacts(tmp_path_factory)


def _eager_restore(model, x, m=4):
    """Independent reference: torch's reflect pad, the eager backbone, crop, clamp."""
    h, w = x.shape[-2:]
    with torch.no_grad():
        y = strip_uncertainty(model)(F.pad(x, (0, -w % m, 0, -h % m), mode="reflect"))
    return y[..., :h, :w].clamp(0, 1)


# --- the rule -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("length,tile,overlap,expected", [
    (40, 16, 4, [0, 12, 24]),      # 0, 12, 24 ends exactly at 40
    (41, 16, 4, [0, 12, 24, 25]),  # the last tile moves back to end at 41
    (16, 16, 4, [0]),
    (10, 16, 4, [0]),              # shorter than a tile: one tile of the whole side
    (32, 16, 0, [0, 16]),
    (100, 32, 31, list(range(0, 68)) + [68]),
])
def test_tile_starts_by_hand(length, tile, overlap, expected):
    assert tile_starts(length, tile, overlap) == expected


@pytest.mark.parametrize("length", [4, 17, 64, 97, 256, 257])
@pytest.mark.parametrize("tile,overlap", [(8, 0), (16, 4), (32, 8), (64, 32)])
def test_tile_starts_cover_the_side_with_at_least_the_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    t = min(tile, length)
    assert starts[0] == 0 and starts[-1] + t == length
    assert starts == sorted(set(starts))
    for a, b in zip(starts, starts[1:]):
        assert a + t - b >= overlap  # neighbours overlap by at least O
    if len(starts) > 1:  # and no tile is wasted: one fewer would leave a gap at the stride t - O
        assert len(starts) == math.ceil((length - t) / (t - overlap)) + 1


def test_blend_weights_by_hand():
    assert blend_weights(8, 3, 2).tolist() == [0.25, 0.5, 0.75, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert blend_weights(4, 0, 3).tolist() == [1.0] * 4
    assert blend_weights(6, 5, 1).tolist() == [1.0] * 6  # a side covered by one tile is not ramped


def _blend_reference(fn, x, tile, overlap):
    """Pixel-by-pixel weighted average over the tiles covering each pixel, from the documented formula."""
    _, _, h, w = x.shape
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    th, tw = min(tile, h), min(tile, w)

    def weight(i, size, count):
        return 1.0 if count == 1 else min(i + 1, size - i, overlap + 1) / (overlap + 1)

    outs = {(y0, x0): fn(x[..., y0:y0 + th, x0:x0 + tw]).double() for y0 in ys for x0 in xs}
    ref = torch.zeros(x.shape, dtype=torch.float64)
    for yy in range(h):
        for xx in range(w):
            num, den = 0.0, 0.0
            for (y0, x0), out in outs.items():
                if y0 <= yy < y0 + th and x0 <= xx < x0 + tw:
                    wgt = weight(yy - y0, th, len(ys)) * weight(xx - x0, tw, len(xs))
                    num = num + wgt * out[..., yy - y0, xx - x0]
                    den += wgt
            ref[..., yy, xx] = num / den
    return ref


def test_run_tiled_matches_the_documented_blend():
    x = torch.rand(2, 3, 28, 36, generator=torch.Generator().manual_seed(0))

    def fn(t):  # depends on the whole tile, so every tile gives a different answer at shared pixels
        return t * 0.5 + t.mean(dim=(-2, -1), keepdim=True)

    for tile, overlap in [(16, 4), (12, 0), (20, 7), (64, 8)]:
        got = run_tiled(fn, x, tile, overlap)
        assert torch.allclose(got.double(), _blend_reference(fn, x, tile, overlap), atol=1e-6), (tile, overlap)


def test_run_tiled_is_exact_for_pointwise_models():
    x = torch.rand(1, 3, 40, 52, generator=torch.Generator().manual_seed(1))
    out = run_tiled(lambda t: torch.sigmoid(3 * t - 1), x, 16, 6)
    assert torch.allclose(out, torch.sigmoid(3 * x - 1), atol=1e-6)


def test_resolve_tiling():
    assert resolve_tiling(None, None, 8) is None
    assert resolve_tiling(100, None, 8) == (96, 32)   # rounded down to the multiple; default overlap 32
    assert resolve_tiling(40, None, 8) == (40, 20)    # default overlap at most half the tile
    assert resolve_tiling(64, 0, 8) == (64, 0)
    with pytest.raises(ValueError, match="tile: 4 is smaller than the model's size multiple 8"):
        resolve_tiling(4, None, 8)
    with pytest.raises(ValueError, match=r"overlap: expected 0 <= overlap < tile \(64"):
        resolve_tiling(70, 64, 8)
    with pytest.raises(ValueError, match="overlap: expected 0 <= overlap"):
        resolve_tiling(64, -1, 8)
    with pytest.raises(ValueError, match="overlap: only meaningful together with tile"):
        resolve_tiling(None, 8, 8)
    with pytest.raises(TypeError, match="tile: expected an int"):
        resolve_tiling(64.0, None, 8)


# --- restorers ----------------------------------------------------------------------------------------------------

def _checkpoint(path, seed=2):
    from tur_ext.train.checkpoint import model_spec, save_checkpoint

    model, ema = tiny_model(seed), tiny_model(seed + 1)
    save_checkpoint(path, {"step": 1, "model": model_spec(model, True), "params": model.state_dict(),
                           "params_ema": ema.state_dict(), "tasks": list(TASK_SETS[TASKS]), "config": {}})
    return model, ema


def test_restorer_from_checkpoint_pads_and_crops(tmp_path):
    model, ema = _checkpoint(tmp_path / "run" / "checkpoints" / "step_00000001.pt")
    for source in (tmp_path / "run" / "checkpoints" / "step_00000001.pt", tmp_path / "run"):
        restorer = load_restorer(source)
        assert restorer.metadata["tasks"] == list(TASK_SETS[TASKS]) and restorer.size_multiple == 4
        for h, w in [(37, 50), (16, 16), (3, 2)]:  # needs padding; doesn't; smaller than the multiple
            x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(h))
            out = restorer(x)
            assert out.shape == x.shape
            if min(h, w) > 4:  # F.pad's reflect needs pad < size; pad_to_multiple keeps mirroring beyond it
                assert (out - _eager_restore(ema, x)).abs().max() <= 1e-5
    no_ema = load_restorer(tmp_path / "run", use_ema=False)
    x = torch.rand(1, 3, 20, 21, generator=torch.Generator().manual_seed(0))
    assert (no_ema(x) - _eager_restore(model, x)).abs().max() <= 1e-5


@pytest.mark.parametrize("fmt", ["torchscript", "aoti"])
def test_tiled_restore_matches_the_blend_of_eager_tiles(artifacts, fmt):
    restorer = load_restorer(getattr(artifacts, fmt).path)
    x = torch.rand(1, 3, 45, 61, generator=torch.Generator().manual_seed(3))
    net = strip_uncertainty(artifacts.model)
    padded = F.pad(x, (0, 3, 0, 3), mode="reflect")
    with torch.no_grad():
        ref = _blend_reference(net, padded, 24, 6)[..., :45, :61].clamp(0, 1)
    got = restorer(x, tile=24, overlap=6)
    assert (got.double() - ref).abs().max() <= 1e-4
    # One tile larger than the image is the untiled path.
    assert torch.equal(restorer(x, tile=256), restorer(x))


def test_restorer_input_errors(artifacts):
    restorer = load_restorer(artifacts.torchscript.path)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        restorer(torch.rand(3, 16, 16))
    with pytest.raises(TypeError, match="float"):
        restorer(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="tile: 2 is smaller"):
        restorer(torch.rand(1, 3, 8, 8), tile=2)
    with pytest.raises(ValueError, match="half: fp16 inference needs device='cuda'"):
        load_restorer(artifacts.torchscript.path, half=True)


# --- files and the command line -----------------------------------------------------------------------------------

def _write_inputs(folder):
    """8-bit PNG, 16-bit PNG, gray PNG, JPEG and 16-bit TIFF versions of the test photo (odd sizes)."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = photo_crop(45, 61)
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    wide = bgr.astype(np.uint16) * 257 + np.arange(45 * 61 * 3, dtype=np.uint16).reshape(bgr.shape) % 200
    files = {"rgb8.png": bgr, "rgb16.png": wide, "gray.png": bgr[:, :, 1], "photo.jpg": bgr, "rgb16.tif": wide}
    for name, pixels in files.items():
        assert cv2.imwrite(str(folder / name), pixels)
    return [folder / name for name in files]


def test_restore_files_formats_and_depths(artifacts, tmp_path):
    inputs = _write_inputs(tmp_path / "in")
    restorer = load_restorer(artifacts.aoti.path)
    written = restore_files(restorer, inputs, tmp_path / "out", tile=24, overlap=8)
    assert [p.name for p in written] == [p.name for p in inputs]
    for src, dst in zip(inputs, written):
        raw = cv2.imread(str(dst), cv2.IMREAD_UNCHANGED)
        assert raw.shape == (45, 61, 3), dst.name  # gray is promoted to RGB
        assert raw.dtype == (np.uint16 if "16" in src.name else np.uint8), dst.name
        expected = restorer.restore_image(read_image(src), tile=24, overlap=8)
        scale = 65535.0 if raw.dtype == np.uint16 else 255.0
        got = raw[:, :, ::-1].astype(np.float64) / scale
        tolerance = 0.02 if src.suffix == ".jpg" else 1.0 / scale  # JPEG re-encodes with loss
        assert np.abs(got - expected).mean() <= tolerance, dst.name


def test_restore_files_refuses_collisions_and_overwrites(artifacts, tmp_path):
    inputs = _write_inputs(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "rgb8.png").write_bytes(inputs[0].read_bytes())
    with pytest.raises(ValueError, match="would both be written"):
        restore_files(artifacts.torchscript.path, [inputs[0], tmp_path / "b" / "rgb8.png"], tmp_path / "out")
    with pytest.raises(ValueError, match="would overwrite the input"):
        restore_files(artifacts.torchscript.path, [inputs[0]], tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="no such file"):
        restore_files(artifacts.torchscript.path, [tmp_path / "missing.png"], tmp_path / "out")
    with pytest.raises(ValueError, match="tile: 3 is smaller"):
        restore_files(artifacts.torchscript.path, inputs, tmp_path / "out", tile=3)
    assert not (tmp_path / "out").exists()


def test_cli_restore(artifacts, tmp_path, capsys):
    inputs = _write_inputs(tmp_path / "in")[:2]
    out = tmp_path / "out"
    argv = ["restore", "--model", str(artifacts.torchscript.path), *map(str, inputs), "--out", str(out)]
    assert deploy_cli.main(argv + ["--tile", "32", "--overlap", "8"]) == 0
    assert "restored 2 image(s)" in capsys.readouterr().out
    restorer = load_restorer(artifacts.torchscript.path)
    expected = restorer.restore_image(read_image(inputs[0]), tile=32, overlap=8)
    got = cv2.imread(str(out / "rgb8.png"))[:, :, ::-1] / 255.0
    assert np.abs(got - expected).max() <= 0.5 / 255 + 1e-6  # rounding only

    for extra, code, message in [
        (["--tile", "2"], 1, "--tile: 2 is smaller than the model's size multiple 4"),
        (["--tile", "16", "--overlap", "16"], 1, "--overlap: expected 0 <= overlap < tile"),
        (["--overlap", "4"], 1, "--overlap: only meaningful with --tile"),
        (["--tile", "x"], 2, "invalid int value"),
    ]:
        assert deploy_cli.main(argv + extra) == code, extra
        assert message in capsys.readouterr().err, extra
    bad = ["restore", "--model", str(inputs[0]), str(inputs[1]), "--out", str(out)]
    assert deploy_cli.main(bad) == 1
    assert "not a tur_ext model" in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    assert deploy_cli.main(["restore", "--model", str(artifacts.torchscript.path), str(broken), "--out",
                            str(out)]) == 1
    assert f"cannot read image '{broken}'" in capsys.readouterr().err


def test_register_adds_both_subcommands():
    import argparse

    parser = argparse.ArgumentParser(prog="tur")
    deploy_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["restore", "--model", "m.pt", "a.png", "--out", "o"])
    assert args.func is deploy_cli.cmd_restore and deploy_cli.COMMANDS["restore"] is args.func
    args = parser.parse_args(["export", "ck.pt", "--format", "aoti", "--out", "m.pt2"])
    assert args.func is deploy_cli.cmd_export and args.device == "cpu" and not args.half
