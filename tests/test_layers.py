"""Shared model building blocks and the per-architecture checkpoint hook of load_weights."""
from __future__ import annotations

import pytest
import torch

from tur_ext.models import load_weights
from tur_ext.models.layers import DropPath
from tur_ext.models.nafnet import NAFNet


def test_drop_path_drops_whole_samples_and_keeps_the_mean():
    torch.manual_seed(0)
    layer = DropPath(0.25).train()
    x = torch.rand(4000, 2, 3) + 0.5
    y = layer(x)
    dropped = (y == 0).flatten(1).all(1)
    kept = torch.isclose(y, x / 0.75).flatten(1).all(1)
    assert bool((dropped | kept).all())                       # a sample is dropped or kept as a whole
    assert 0.22 < dropped.float().mean().item() < 0.28
    assert abs(y.mean().item() / x.mean().item() - 1) < 0.03  # the 1/(1-p) scale keeps the expectation
    assert torch.equal(layer.eval()(x), x)
    assert torch.equal(DropPath(0.0).train()(x), x)


@pytest.mark.parametrize("p", [-0.1, 1.0, 2])
def test_drop_path_rejects_bad_probabilities(p):
    with pytest.raises(ValueError, match="p: expected a drop probability"):
        DropPath(p)


class _RenamingNet(NAFNet):
    """A release that stored the output convolution under another name and carried an unused tensor."""

    def adapt_state_dict(self, state_dict):
        out = {k.replace("release_ending.", "ending."): v for k, v in state_dict.items()}
        out.pop("unused_buffer", None)
        return out


def test_load_weights_runs_the_architecture_hook_before_comparing_keys():
    config = dict(width=8, enc_blocks=(1,), middle_blocks=1, dec_blocks=(1,))
    source, target = NAFNet(**config), _RenamingNet(**config)
    release = {k.replace("ending.", "release_ending."): v for k, v in source.state_dict().items()}
    release["unused_buffer"] = torch.zeros(3)
    with pytest.raises(ValueError, match="release_ending"):
        load_weights(NAFNet(**config), dict(release))  # without the hook the layout does not match
    report = load_weights(target, {"module." + k: v for k, v in release.items()})
    assert report.num_loaded == len(source.state_dict())
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v)
