"""PromptIR against the fixture of the official release: state-dict layout, parameter count, forward output.

The fixture lives beside the checkout (``../shared/fixtures/promptir_official.json``, as in CI) and is never copied
into the repository: see ``tests/fixtures.py`` (skipped where ``../shared`` is absent, an error where it exists but
the fixture does not).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.export import Dim

from fixtures import load_official_fixture
from tur_ext.models import build, load_weights, strip_uncertainty

HEAD_SHAPES = {
    "var_conv.0.weight": [96, 96, 3, 3], "var_conv.0.bias": [96],
    "var_conv.2.weight": [96, 96, 3, 3], "var_conv.2.bias": [96],
    "var_conv.4.weight": [3, 96, 3, 3], "var_conv.4.bias": [3],
}


@pytest.fixture(scope="module")
def fixture() -> dict:
    return load_official_fixture("promptir")


def deterministic_weights(layout: dict) -> dict:
    """The weights the fixture's ``about`` describes, built from the fixture's own key list and shapes."""
    g = torch.Generator().manual_seed(1234)
    weights = {}
    for key in sorted(layout):
        shape = layout[key]
        if (len(shape) == 1 and key.endswith("weight")) or "temperature" in key:
            weights[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            weights[key] = 0.05 * torch.randn(shape, generator=g)
    return weights


@pytest.fixture(scope="module")
def fixture_input(fixture) -> torch.Tensor:
    return torch.rand(fixture["input_shape"], generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def official(fixture) -> torch.nn.Module:
    model = build("promptir")
    model.load_state_dict(deterministic_weights(fixture["state_dict"]))
    return model.eval()


def test_state_dict_layout_matches_the_release(fixture, official):
    layout = {k: list(v.shape) for k, v in official.state_dict().items()}
    assert list(layout) == list(fixture["state_dict"])  # same keys, in the release's order
    assert layout == fixture["state_dict"]
    count = sum(p.numel() for p in official.parameters())
    assert count == fixture["num_params"] == 35_592_263
    assert sum(math.prod(s) for s in fixture["state_dict"].values()) == count  # no buffers hide in the layout


def test_forward_reproduces_the_release(fixture, official, fixture_input):
    with torch.no_grad():
        out = official(fixture_input)
    expected = torch.tensor(fixture["expected_output"], dtype=torch.float32).reshape(out.shape)
    assert out.shape == tuple(fixture["input_shape"])
    assert (out - expected).abs().max().item() <= 1e-4


def test_release_checkpoint_loads_into_the_tur_model(fixture, fixture_input):
    """The released Lightning layout (``state_dict`` entry, ``net.`` prefix) into PromptIR with the TUR head: keys are
    the release's plus ``var_conv.{0,2,4}`` (96 -> 96 -> 96 -> 3), and the image output is unchanged by the head."""
    prefix = fixture["checkpoint_prefix"]
    ckpt = {"state_dict": {prefix + k: v for k, v in deterministic_weights(fixture["state_dict"]).items()},
            "epoch": 0, "global_step": 0}
    torch.manual_seed(0)
    model = build("promptir", uncertainty=True).eval()
    layout = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(layout) == list(fixture["state_dict"]) + list(HEAD_SHAPES)
    assert layout == {**fixture["state_dict"], **HEAD_SHAPES}
    with pytest.warns(UserWarning, match="untrained"):
        report = load_weights(model, ckpt, strict_head=False)
    assert report.format == "lightning" and sorted(report.missing_head_keys) == sorted(HEAD_SHAPES)
    with torch.no_grad():
        image, u = model(fixture_input)
    expected = torch.tensor(fixture["expected_output"], dtype=torch.float32).reshape(image.shape)
    assert (image - expected).abs().max().item() <= 1e-4
    assert u.shape == image.shape and torch.isfinite(u).all() and (u > 0).all()
    plain = strip_uncertainty(model)
    assert [k for k in plain.state_dict()] == list(fixture["state_dict"])


@pytest.mark.slow
@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")
def test_full_size_trace_and_export_match_eager(official):
    x1, x2 = torch.rand(1, 3, 32, 48), torch.rand(1, 3, 48, 40)
    with torch.no_grad():
        traced = torch.jit.trace(official, x1)
        h, w = Dim("h", min=1, max=256), Dim("w", min=1, max=256)
        exported = torch.export.export(official, (x1,), dynamic_shapes={"x": {2: 8 * h, 3: 8 * w}}).module()
        for x in (x1, x2):
            eager = official(x)
            assert (traced(x) - eager).abs().max().item() <= 1e-4
            assert (exported(x) - eager).abs().max().item() <= 1e-4


def test_fixture_helper_skips_only_without_shared_and_fails_with_it(tmp_path, monkeypatch):
    """tests/fixtures.py: a fixture absent because ../shared is absent skips; absent (or broken) although
    ../shared exists fails, so CI cannot pass without the comparisons above."""
    import fixtures

    monkeypatch.delenv("TUR_REQUIRE_FIXTURES", raising=False)
    shared = tmp_path / "shared"
    monkeypatch.setattr(fixtures, "SHARED", shared)
    monkeypatch.setattr(fixtures, "FIXTURES", shared / "fixtures")
    with pytest.raises(pytest.skip.Exception, match="is absent"):
        fixtures.load_official_fixture("promptir")
    monkeypatch.setenv("TUR_REQUIRE_FIXTURES", "1")
    with pytest.raises(pytest.fail.Exception, match="fixture missing"):
        fixtures.load_official_fixture("promptir")
    monkeypatch.delenv("TUR_REQUIRE_FIXTURES")
    (shared / "fixtures").mkdir(parents=True)
    with pytest.raises(pytest.fail.Exception, match="fixture missing although"):
        fixtures.load_official_fixture("promptir")
    (shared / "fixtures" / "promptir_official.json").write_text("{truncated")
    with pytest.raises(pytest.fail.Exception, match="not a readable JSON fixture"):
        fixtures.load_official_fixture("promptir")
    (shared / "fixtures" / "x_official.json").write_text('{"num_params": 3}')
    assert fixtures.load_official_fixture("x") == {"num_params": 3}
    assert fixtures.fixture_path("promptir") == fixtures.FIXTURES / "promptir_official.json"
