"""``tur export --format onnx``: graphs that ONNX Runtime runs like the eager model (max abs <= 1e-4, batch and H/W
dynamic), their metadata, ``tur restore --model model.onnx``, and clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from export_helpers import TINY_CONFIG, photo_crop, tiny_model
from tur_ext import deploy_cli
from tur_ext.data.io import read_image, write_image
from tur_ext.models import build
from tur_ext.train.checkpoint import model_spec, save_checkpoint

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from tur_ext.export_onnx import export_onnx, load_onnx, read_onnx_metadata  # noqa: E402

SMALL_PROMPTIR = dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 2, 2, 2],
                      prompt_dims=[8, 16, 32], prompt_sizes=[8, 4, 2])
SMALL_TRANSWEATHER = dict(embed_dims=[8, 16, 32, 64])
ATOL = 1e-4


def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def graph_dims(path: Path):
    proto = onnx.load(str(path))
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (proto.graph.input[0], proto.graph.output[0])]
    return proto, dims


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    """The tiny NAFNet's training checkpoint, exported through the CLI (once for the module)."""
    folder = tmp_path_factory.mktemp("onnx")
    model = tiny_model()
    sd = model.state_dict()
    ckpt = folder / "ckpt.pt"
    save_checkpoint(ckpt, {"model": model_spec(model, True), "params": sd, "params_ema": sd, "tasks": ["derain"]})
    out = folder / "tiny.onnx"
    assert deploy_cli.main(["export", str(ckpt), "--format", "onnx", "--out", str(out)]) == 0
    return model, ckpt, out


def test_graph_metadata_and_dynamic_axes(tiny_onnx, capsys):
    model, _, path = tiny_onnx
    proto, dims = graph_dims(path)
    assert dims == [["batch", 3, "height", "width"]] * 2  # one image output: the head is stripped
    assert len(proto.graph.output) == 1 and proto.producer_name == "tur_ext"
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 18
    props = {p.key: p.value for p in proto.metadata_props}
    meta = read_onnx_metadata(path)
    assert json.loads(props["tur_meta"]) == meta
    assert meta["artifact"] == "onnx" and meta["arch"] == props["arch"] == "nafnet-tiny"
    assert meta["tasks"] == json.loads(props["tasks"]) == ["derain"]
    assert meta["size_multiple"] == int(props["size_multiple"]) == 4 and meta["opset"] == 18
    assert json.loads(props["value_range"]) == json.loads(props["output_range"]) == [0.0, 1.0]
    assert meta["config"]["uncertainty"] is False and meta["onnx_exporter"] == "torchscript"


def test_onnxruntime_matches_eager_at_other_sizes_and_batches(tiny_onnx):
    model, _, path = tiny_onnx
    net = load_onnx(path)
    g = torch.Generator().manual_seed(5)
    for shape in [(3, 3, 20, 44), (1, 3, 64, 8), (2, 3, 4, 4)]:
        x = torch.rand(shape, generator=g)
        with torch.no_grad():
            ref = model(x)[0]
        got = net(x)
        assert got.shape == ref.shape
        assert (got - ref).abs().max().item() <= ATOL, shape
    with pytest.raises(ValueError, match="height and width must be positive multiples of 4"):
        net(torch.rand(1, 3, 10, 12))


def test_tur_restore_runs_the_onnx_model(tiny_onnx, tmp_path, capsys):
    _, ckpt, path = tiny_onnx
    src = tmp_path / "in" / "photo.png"
    src.parent.mkdir()
    write_image(src, photo_crop(37, 50))  # odd sizes: padding and cropping around the graph
    for name, model, extra in [("onnx", path, []), ("ckpt", ckpt, []),
                               ("onnx_tiled", path, ["--tile", "16", "--overlap", "4"]),
                               ("ckpt_tiled", ckpt, ["--tile", "16", "--overlap", "4"])]:
        assert deploy_cli.main(["restore", "--model", str(model), str(src), "--out", str(tmp_path / name),
                                *extra]) == 0
    got = {n: np.round(read_image(tmp_path / n / "photo.png") * 255).astype(np.int64)
           for n in ("onnx", "ckpt", "onnx_tiled", "ckpt_tiled")}
    assert np.abs(got["onnx"] - got["ckpt"]).max() <= 1  # rounding of a 1e-7 difference at most
    assert np.abs(got["onnx_tiled"] - got["ckpt_tiled"]).max() <= 1
    assert deploy_cli.main(["restore", "--model", str(path), str(src), "--out", str(tmp_path / "x"), "--half"]) == 1
    assert "ONNX models run with ONNX Runtime on the CPU" in capsys.readouterr().err


SMALL_UFORMER = dict(embed_dim=8, depths=[1] * 9, num_heads=[1, 1, 2, 2, 4, 4, 2, 2, 1], win_size=2)


@pytest.mark.parametrize("arch, config", [("promptir", SMALL_PROMPTIR), ("transweather", SMALL_TRANSWEATHER),
                                          ("uformer", SMALL_UFORMER)])
def test_promptir_transweather_uformer_export(tmp_path, arch, config):
    model = randomised(build(arch, uncertainty=True, **config))
    result = export_onnx(model, tmp_path / "m.onnx", tasks="3task")
    assert len(result.parity) == 2 and max(result.parity.values()) <= ATOL
    _, dims = graph_dims(result.path)
    assert dims == [["batch", 3, "height", "width"]] * 2
    m = model.size_multiple
    low = max(m, model.min_size)
    x = torch.rand(1, 3, low + 3 * m, low + m, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x)[0]
    assert (load_onnx(result.path)(x) - ref).abs().max().item() <= ATOL


def test_export_errors(tmp_path):
    model = tiny_model()
    for kwargs, message in [({}, r"out: ONNX files must end in \.onnx"),
                            ({"half": True}, "half: ONNX exports are fp32"),
                            ({"exporter": "tf"}, r"exporter: expected one of \['torchscript', 'dynamo'\]"),
                            ({"opset": 17}, "opset: expected an int >= 18")]:
        target = tmp_path / ("m.pt" if not kwargs else "m.onnx")
        with pytest.raises(ValueError, match=message):
            export_onnx(model, target, **kwargs)
    assert not (tmp_path / "m.onnx").exists()
    bare = tmp_path / "bare.onnx"
    with torch.no_grad(), pytest.warns(DeprecationWarning):
        torch.onnx.export(build("nafnet-tiny", **TINY_CONFIG).eval(), (torch.rand(1, 3, 8, 8),), str(bare),
                          dynamo=False)
    with pytest.raises(ValueError, match="an ONNX file without tur_ext metadata"):
        load_onnx(bare)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not onnx at all")
    with pytest.raises(ValueError, match="is not a readable ONNX file"):
        read_onnx_metadata(junk)


@pytest.mark.slow
def test_dynamo_exporter(tmp_path):
    """torch.onnx.export(dynamo=True) of the torch.export program (H, W as multiples of 4): minutes on 2 cores."""
    model = tiny_model()
    result = export_onnx(model, tmp_path / "m.onnx", exporter="dynamo")
    assert max(result.parity.values()) <= ATOL and result.metadata["onnx_exporter"] == "dynamo"
    x = torch.rand(1, 3, 40, 12, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(x)[0]
    assert (load_onnx(result.path)(x) - ref).abs().max().item() <= ATOL
