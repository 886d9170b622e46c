"""load_weights on every checkpoint layout it claims, written here by the tests themselves."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

from tur_ext.models import LoadReport, WeightsMismatchError, build, load_weights, read_state_dict

SMALL_PROMPTIR = dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 2, 4, 8],
                      prompt_dims=[8, 16, 32], prompt_sizes=[8, 8, 8])
HEAD_KEYS = [f"var_conv.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]


def _model(name: str = "nafnet-tiny", seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    cfg = SMALL_PROMPTIR if name == "promptir" else {}
    return build(name, **cfg, **kwargs)


def _randomised(sd):
    """A state dict with the same keys and shapes and fresh random values (never zeros)."""
    g = torch.Generator().manual_seed(11)
    return {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in sd.items()}


def _save(path, obj):
    torch.save(obj, path)
    return path


def _assert_loaded(model, expected):
    got = model.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v.to(got[k].dtype), rtol=0, atol=0, msg=k)


class NotATensor:  # a pickled object of an arbitrary class: weights_only loading must refuse it
    pass


@pytest.mark.parametrize("name", ["nafnet-tiny", "promptir"])
def test_raw_state_dict(tmp_path, name):
    src = _randomised(_model(name).state_dict())
    model = _model(name, seed=1)
    report = load_weights(model, _save(tmp_path / "raw.pth", src))
    assert isinstance(report, LoadReport)
    assert report.format == "state_dict" and report.prefixes_stripped == ()
    assert report.num_loaded == len(src) and report.missing_head_keys == ()
    assert report.source.endswith("raw.pth")
    _assert_loaded(model, src)


def test_lightning_checkpoint_with_net_prefix(tmp_path):
    src = _randomised(_model("promptir").state_dict())
    ckpt = {
        "epoch": 119,
        "global_step": 12345,
        "pytorch-lightning_version": "2.0.2",
        "state_dict": {**{"net." + k: v for k, v in src.items()}, "loss_fn.scale": torch.tensor([2.0])},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 2e-4, "params": [0, 1]}]}],
        "lr_schedulers": [{"last_epoch": 119}],
    }
    model = _model("promptir", seed=1)
    report = load_weights(model, _save(tmp_path / "promptir.ckpt", ckpt))
    assert report.format == "lightning" and report.prefixes_stripped == ("net.",)
    _assert_loaded(model, src)


def test_basicsr_prefers_params_ema(tmp_path):
    sd = _model().state_dict()
    params = _randomised(sd)
    ema = {k: v + 1.0 for k, v in params.items()}
    model = _model(seed=1)
    report = load_weights(model, _save(tmp_path / "ema.pth", {"params": params, "params_ema": ema}))
    assert report.format == "basicsr:params_ema"
    _assert_loaded(model, ema)
    report = load_weights(model, _save(tmp_path / "params.pth", {"params": params}))
    assert report.format == "basicsr:params"
    _assert_loaded(model, params)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
@pytest.mark.parametrize("layout", ["raw", "basicsr", "lightning"])
def test_wrapper_prefixes_are_removed(tmp_path, prefix, layout):
    src = _randomised(_model().state_dict())
    keyed = {prefix + k: v for k, v in src.items()}
    payload = {"raw": keyed, "basicsr": {"params": keyed},
               "lightning": {"state_dict": {"net." + k: v for k, v in keyed.items()}}}[layout]
    model = _model(seed=1)
    report = load_weights(model, _save(tmp_path / "wrapped.pth", payload))
    assert "".join(report.prefixes_stripped).replace("net.", "") == prefix
    _assert_loaded(model, src)


def test_half_precision_checkpoint_loads_into_a_float_model(tmp_path):
    src = {k: v.half() for k, v in _randomised(_model().state_dict()).items()}
    model = _model(seed=1)
    load_weights(model, _save(tmp_path / "half.pth", src))
    assert next(model.parameters()).dtype == torch.float32
    _assert_loaded(model, src)


def test_an_already_loaded_dict_is_accepted():
    src = _randomised(_model().state_dict())
    model = _model(seed=1)
    report = load_weights(model, {"params_ema": src})
    assert report.source == "<state dict>" and report.format == "basicsr:params_ema"
    _assert_loaded(model, src)


def test_mismatch_lists_missing_unexpected_and_the_file(tmp_path):
    src = _randomised(_model().state_dict())
    src.pop("intro.weight")
    src.pop("ending.bias")
    src["extra.layer.weight"] = torch.ones(2)
    path = _save(tmp_path / "broken.pth", src)
    with pytest.raises(WeightsMismatchError) as info:
        load_weights(_model(), path)
    msg = str(info.value)
    assert "broken.pth" in msg and "state_dict" in msg
    assert "missing keys (2): intro.weight, ending.bias" in msg
    assert "unexpected keys (1): extra.layer.weight" in msg
    assert isinstance(info.value, ValueError)


def test_mismatch_against_another_architecture_is_truncated(tmp_path):
    path = _save(tmp_path / "promptir.pth", _model("promptir").state_dict())
    with pytest.raises(WeightsMismatchError, match=r"missing keys \(\d+\): .*\(\+\d+ more\).*unexpected keys"):
        load_weights(_model("nafnet-tiny"), path)


def test_shape_mismatch_is_reported(tmp_path):
    path = _save(tmp_path / "wide.pth", _model("nafnet", width=8, enc_blocks=[1, 1, 1], middle_blocks=2,
                                              dec_blocks=[1, 1, 1]).state_dict())
    with pytest.raises(WeightsMismatchError, match=r"wide\.pth.*shape mismatches.*intro\.weight \(8, 3, 3, 3\) vs "
                                                   r"model \(16, 3, 3, 3\)"):
        load_weights(_model("nafnet-tiny"), path)


def test_headless_checkpoint_into_a_model_with_a_head(tmp_path):
    src = _randomised(_model().state_dict())
    path = _save(tmp_path / "plain.pth", {"params": src})
    model = _model(seed=1, uncertainty=True)
    head_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("var_conv.")}
    with pytest.raises(WeightsMismatchError, match=r"plain\.pth.*var_conv\.0\.weight.*strict_head=False"):
        load_weights(model, path)
    with pytest.warns(UserWarning, match=r"plain\.pth.*no uncertainty head.*untrained"):
        report = load_weights(model, path, strict_head=False)
    assert sorted(report.missing_head_keys) == sorted(HEAD_KEYS)
    _assert_loaded(model, src)
    _assert_loaded(model, head_before)  # the head keeps its fresh initialisation


def test_head_checkpoint_into_models_with_and_without_a_head(tmp_path):
    src = _randomised(_model(uncertainty=True).state_dict())
    path = _save(tmp_path / "tur.pth", src)
    with_head = _model(seed=1, uncertainty=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete checkpoint loads silently
        report = load_weights(with_head, path)
    assert report.missing_head_keys == () and report.dropped_head_keys == ()
    _assert_loaded(with_head, src)

    plain = _model(seed=1)
    with pytest.raises(WeightsMismatchError, match=r"unexpected keys \(6\): var_conv"):
        load_weights(plain, path)
    report = load_weights(plain, path, strict_head=False)  # export a TUR-trained backbone
    assert sorted(report.dropped_head_keys) == sorted(HEAD_KEYS)
    _assert_loaded(plain, {k: v for k, v in src.items() if not k.startswith("var_conv.")})


def test_half_a_head_is_an_error_even_when_not_strict(tmp_path):
    src = _randomised(_model(uncertainty=True).state_dict())
    del src["var_conv.4.weight"]
    with pytest.raises(WeightsMismatchError, match=r"missing keys \(1\): var_conv\.4\.weight"):
        load_weights(_model(uncertainty=True), _save(tmp_path / "half_head.pth", src), strict_head=False)


def test_files_are_read_with_weights_only(tmp_path):
    path = _save(tmp_path / "pickled.pth", {"params": _model().state_dict(), "opt": NotATensor()})
    with pytest.raises(ValueError, match=r"pickled\.pth.*weights_only=True"):
        load_weights(_model(), path)


def test_bad_files_and_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        load_weights(_model(), tmp_path / "nothing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match="garbage.pth"):
        load_weights(_model(), garbage)
    with pytest.raises(ValueError, match=r"tensor\.pth.*expected a state dict"):
        load_weights(_model(), _save(tmp_path / "tensor.pth", torch.ones(3)))
    with pytest.raises(ValueError, match=r"meta\.pth.*not a recognised checkpoint.*'epoch'"):
        load_weights(_model(), _save(tmp_path / "meta.pth", {"epoch": 3, "note": "x"}))
    with pytest.raises(ValueError, match="empty"):
        load_weights(_model(), {"params": {}})
    with pytest.raises(TypeError, match="model"):
        load_weights("nafnet-tiny", garbage)
    with pytest.raises(TypeError, match="path"):
        load_weights(_model(), 3)
    with pytest.raises(TypeError, match="strict_head"):
        load_weights(_model(), garbage, strict_head="no")


def test_read_state_dict_only_takes_net_entries_from_lightning():
    sd, fmt, stripped = read_state_dict({"state_dict": {"net.a": torch.ones(1), "other.b": torch.ones(1)}})
    assert fmt == "lightning" and stripped == ("net.",) and list(sd) == ["a"]
    sd, fmt, stripped = read_state_dict({"a.net.x": torch.ones(1)})  # `net.` is only special in Lightning files
    assert fmt == "state_dict" and list(sd) == ["a.net.x"] and stripped == ()
