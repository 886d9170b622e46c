"""Export to TorchScript and AOTInductor: parity with the eager model, metadata, refusals.

The AOTInductor package is compiled once per session (export_helpers.session_artifacts).
"""
from __future__ import annotations

import json
import zipfile

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from export_helpers import TASKS, TINY_CONFIG, repackage_with_torch_version, session_artifacts, tiny_model
from tur_ext import deploy_cli
from tur_ext.export import (
    AOTI_METADATA_KEY,
    ExportParityError,
    TorchVersionMismatchError,
    artifact_kind,
    export_program,
    export_torchscript,
    load_exported,
    prepare_for_export,
    read_metadata,
)
from tur_ext.models import Backbone, build, strip_uncertainty
from tur_ext.tasks import TASK_SETS

FP32_ATOL = 1e-4


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return session_artifacts(tmp_path_factory)


def _rand(h: int, w: int, seed: int, batch: int = 1) -> Tensor:
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _eager(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return strip_uncertainty(model)(x)


def _eager_padded(model: nn.Module, x: Tensor, m: int) -> Tensor:
    """Reference for any size: torch's own reflect pad (bottom/right), the eager backbone, crop."""
    h, w = x.shape[-2:]
    ph, pw = -h % m, -w % m
    return _eager(model, F.pad(x, (0, pw, 0, ph), mode="reflect"))[..., :h, :w]


@pytest.mark.parametrize("fmt", ["torchscript", "aoti"])
def test_exported_matches_eager_at_two_sizes_and_a_batch(artifacts, fmt):
    result = getattr(artifacts, fmt)
    net = load_exported(result.path)
    assert net.artifact == fmt
    for i, (h, w, b) in enumerate([(16, 24, 1), (44, 20, 1), (12, 36, 3)]):
        x = _rand(h, w, seed=i, batch=b)
        ref = _eager(artifacts.model, x)
        out = net(x)
        assert out.shape == ref.shape == x.shape  # the image alone: the uncertainty head is stripped
        assert (out - ref).abs().max() <= FP32_ATOL
        assert (ref - x).abs().mean() > 1e-2  # the model does something, so the comparison means something
    assert set(result.parity) == {"16x24", "28x12"} and max(result.parity.values()) <= FP32_ATOL


def test_eager_torchscript_and_aoti_agree_at_a_size_that_needs_padding(artifacts):
    from tur_ext.inference import load_restorer

    x = _rand(37, 50, seed=5)  # 37x50 -> padded to 40x52 for size multiple 4
    ref = _eager_padded(artifacts.model, x, 4).clamp(0, 1)
    outs = {fmt: load_restorer(getattr(artifacts, fmt).path)(x) for fmt in ("torchscript", "aoti")}
    for fmt, out in outs.items():
        assert out.shape == x.shape, fmt
        assert (out - ref).abs().max() <= FP32_ATOL, fmt
    assert (outs["torchscript"] - outs["aoti"]).abs().max() <= FP32_ATOL


@pytest.mark.parametrize("fmt", ["torchscript", "aoti"])
def test_exported_model_refuses_sizes_that_are_not_multiples(artifacts, fmt):
    net = load_exported(getattr(artifacts, fmt).path)
    with pytest.raises(ValueError, match="multiples of 4"):
        net(_rand(30, 32, seed=0))  # an AOTI package would silently compute garbage for this
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        net(torch.rand(1, 1, 16, 16))


@pytest.mark.parametrize("fmt", ["torchscript", "aoti"])
def test_metadata_round_trip(artifacts, fmt):
    result = getattr(artifacts, fmt)
    meta = read_metadata(result.path)
    assert meta == result.metadata == load_exported(result.path).metadata
    assert meta["artifact"] == fmt and artifact_kind(result.path) == fmt
    assert meta["arch"] == "nafnet-tiny" and meta["size_multiple"] == 4
    assert meta["value_range"] == [0.0, 1.0] and meta["channel_order"] == "RGB" and meta["layout"] == "NCHW"
    assert meta["torch_version"] == torch.__version__
    assert meta["tasks"] == list(TASK_SETS[TASKS])
    assert meta["dtype"] == "float32" and meta["device"] == "cpu" and meta["supports_fp16"] is True
    assert meta["config"]["uncertainty"] is False
    # The config rebuilds the architecture, and the exported weights are the original model's backbone.
    rebuilt = build(meta["arch"], **meta["config"])
    rebuilt.load_state_dict(strip_uncertainty(artifacts.model).state_dict())
    x = _rand(16, 16, seed=9)
    with torch.no_grad():
        assert (load_exported(result.path)(x) - rebuilt.eval()(x)).abs().max() <= FP32_ATOL


def test_aoti_metadata_is_in_the_package_metadata(artifacts):
    entries = torch._C._aoti.AOTIModelPackageLoader.load_metadata_from_package(str(artifacts.aoti.path), "model")
    assert json.loads(entries[AOTI_METADATA_KEY]) == artifacts.aoti.metadata
    with zipfile.ZipFile(artifacts.torchscript.path) as z:
        name = next(n for n in z.namelist() if n.endswith("extra/tur_meta.json"))
        assert json.loads(z.read(name)) == artifacts.torchscript.metadata


def test_aoti_from_another_torch_release_is_refused(artifacts, tmp_path):
    other = tmp_path / "other.pt2"
    repackage_with_torch_version(artifacts.aoti.path, other, "2.12.1+cpu")
    assert read_metadata(other)["torch_version"] == "2.12.1+cpu"  # metadata stays readable
    with pytest.raises(TorchVersionMismatchError, match=r"torch 2\.12\.1\+cpu.*this is torch 2\.13") as info:
        load_exported(other)
    assert "re-export" in str(info.value) and str(other) in str(info.value)
    # Only the release counts, not the local build tag (+cpu / +cu126 builds of one release share the AOTI ABI).
    same = tmp_path / "same.pt2"
    repackage_with_torch_version(artifacts.aoti.path, same, torch.__version__.split("+")[0] + "+cu126")
    assert load_exported(same).metadata["torch_version"].endswith("+cu126")


def test_exported_graph_has_no_padding_and_dynamic_sizes():
    net = prepare_for_export(tiny_model())
    program = export_program(net)
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert ops, "empty graph"
    assert not [op for op in ops if "pad" in op or "reflection" in op or "index_select" in op], ops
    shape = program.graph_signature.user_inputs and next(
        n for n in program.graph.nodes if n.op == "placeholder" and n.name == program.graph_signature.user_inputs[0]
    ).meta["val"].shape
    assert all(isinstance(s, torch.SymInt) for s in (shape[0], shape[2], shape[3])), shape


class _ScriptSensitive(Backbone):
    """A real backbone whose scripted form differs from its eager form by 1e-3: the export must catch it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.size_multiple = 2
        self.feature_channels = 3

    def forward_features(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        if torch.jit.is_scripting():
            y = y + 1e-3
        return y

    def reconstruct(self, features: Tensor, x: Tensor) -> Tensor:
        return features + x


def test_export_fails_loudly_on_parity_and_writes_nothing(tmp_path):
    out = tmp_path / "bad.pt"
    with pytest.raises(ExportParityError, match=r"differs from the eager model by up to 0\.001.*nothing was written"):
        export_torchscript(_ScriptSensitive(), out)
    assert list(tmp_path.iterdir()) == []  # neither the artifact nor the staging folder


def test_export_writes_atomically_over_an_existing_file(artifacts, tmp_path):
    out = tmp_path / "model.pt"
    out.write_bytes(b"old")
    with pytest.raises(ExportParityError):
        export_torchscript(_ScriptSensitive(), out)
    assert out.read_bytes() == b"old"
    export_torchscript(tiny_model(), out)
    assert read_metadata(out)["arch"] == "nafnet-tiny"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_export_argument_errors(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match=r"out: TorchScript files must end in \.pt"):
        export_torchscript(model, tmp_path / "model.pt2")
    with pytest.raises(ValueError, match="half: fp16 export needs device='cuda'"):
        export_torchscript(model, tmp_path / "model.pt", half=True)
    model.supports_fp16 = False  # a model may declare fp16 unsupported
    with pytest.raises(ValueError, match="does not support fp16"):
        export_torchscript(model, tmp_path / "model.pt", half=True)
    with pytest.raises(TypeError, match="task names as str"):
        export_torchscript(tiny_model(), tmp_path / "model.pt", tasks=["denoise_15", 3])
    with pytest.raises(ValueError, match="unknown task set"):
        export_torchscript(tiny_model(), tmp_path / "model.pt", tasks="4task")
    with pytest.raises(TypeError, match="Backbone"):
        export_torchscript(nn.Conv2d(3, 3, 3), tmp_path / "model.pt")
    with pytest.raises(ValueError, match="parity_sizes"):
        export_torchscript(tiny_model(), tmp_path / "model.pt", parity_sizes=[(10, 16)])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.filterwarnings("ignore:.*torch.jit:DeprecationWarning")
def test_artifact_kind_and_foreign_files(tmp_path):
    png = tmp_path / "image.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ValueError, match="not a tur_ext model"):
        artifact_kind(png)
    with pytest.raises(FileNotFoundError, match="no such file"):
        artifact_kind(tmp_path / "missing.pt")
    foreign = tmp_path / "foreign.pt"
    torch.jit.save(torch.jit.script(nn.Conv2d(3, 3, 3)), str(foreign))
    with pytest.raises(ValueError, match="without tur_ext metadata"):
        load_exported(foreign)
    ckpt = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2)}, ckpt)
    assert artifact_kind(ckpt) == "checkpoint"
    with pytest.raises(ValueError, match="training checkpoint, not an exported model"):
        load_exported(ckpt)


def _training_checkpoint(path, seed: int = 1):
    """A tur_ext training checkpoint of the tiny TUR model, in the trainer's layout, with distinct EMA weights."""
    from tur_ext.train.checkpoint import model_spec, save_checkpoint

    model, ema = tiny_model(seed), tiny_model(seed + 1)
    save_checkpoint(path, {"step": 3, "model": model_spec(model, True), "params": model.state_dict(),
                           "params_ema": ema.state_dict(), "tasks": list(TASK_SETS[TASKS]), "config": {}})
    return model, ema


def test_cli_export_from_a_training_checkpoint(tmp_path, capsys):
    _, ema = _training_checkpoint(tmp_path / "step_00000003.pt")
    out = tmp_path / "exported" / "model.pt"
    assert deploy_cli.main(["export", str(tmp_path / "step_00000003.pt"), "--format", "torchscript",
                            "--out", str(out)]) == 0
    assert "parity vs eager" in capsys.readouterr().out
    meta = read_metadata(out)
    assert meta["tasks"] == list(TASK_SETS[TASKS])
    x = _rand(20, 12, seed=3)
    assert (load_exported(out)(x) - _eager(ema, x)).abs().max() <= FP32_ATOL  # params_ema by default


def test_cli_export_from_foreign_weights(tmp_path, capsys):
    model = tiny_model(seed=4)
    weights = tmp_path / "net_g.pth"
    torch.save({"params": {"module." + k: v for k, v in model.state_dict().items()}}, weights)  # BasicSR + DDP
    out = tmp_path / "model.pt"
    argv = ["export", "--arch", "nafnet-tiny", "--weights", str(weights), "--tasks", "derain,dehaze",
            "--format", "torchscript", "--out", str(out)]
    argv += [f"--config={k}={json.dumps(v)}" for k, v in TINY_CONFIG.items()]
    assert deploy_cli.main(argv) == 0, capsys.readouterr().err
    assert read_metadata(out)["tasks"] == ["derain", "dehaze"]
    x = _rand(8, 16, seed=2)
    assert (load_exported(out)(x) - _eager(model, x)).abs().max() <= FP32_ATOL


def test_cli_export_errors(tmp_path, capsys):
    _training_checkpoint(tmp_path / "ckpt.pt")
    cases = [
        (["export", str(tmp_path / "ckpt.pt"), "--arch", "nafnet-tiny", "--weights", "x", "--format", "aoti",
          "--out", "m.pt2"], 1, "either CHECKPOINT or --arch"),
        (["export", "--arch", "nafnet-tiny", "--format", "aoti", "--out", "m.pt2"], 1, "--arch and --weights"),
        (["export", "--arch", "nafnet-tiny", "--weights", str(tmp_path / "none.pth"), "--format", "aoti",
          "--out", "m.pt2"], 1, "--weights: no such file"),
        (["export", str(tmp_path / "ckpt.pt"), "--format", "tflite", "--out", "m.onnx"], 2, "invalid choice"),
        (["export", str(tmp_path / "ckpt.pt"), "--format", "aoti", "--out", str(tmp_path / "m.pt")], 1,
         r"must end in .pt2"),
    ]
    for argv, code, message in cases:
        assert deploy_cli.main(argv) == code, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
