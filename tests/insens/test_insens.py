"""Insens and switched linear projections: fast equals naive, Theorem 1 holds, edge cases are flagged."""

import pytest
import torch
from torch import nn

from lightning_xai.insens import insens, insens_naive, switched_projections


def cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.LeakyReLU(0.1), nn.Flatten(), nn.Linear(96, 12), nn.ReLU(),
        nn.Linear(12, 3),
    ).double()
    bn = model[1]
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    return model


@pytest.mark.parametrize("losers", ["active", "inactive"])
def test_fast_insens_equals_the_naive_definition(losers):
    model, x = cnn(), torch.randn(3, 1, 8, 8, dtype=torch.float64)
    fast = insens(model, x, maxpool_losers=losers)
    naive = insens_naive(model, x, maxpool_losers=losers)
    assert (fast.map - naive).abs().max() < 1e-10
    assert fast.map.abs().max() > 1e-3  # not trivially zero
    assert fast.inactive.min() > 0 and fast.r_min.min() > 0


def test_losers_policy_changes_the_inactive_set():
    model, x = cnn(), torch.randn(2, 1, 8, 8, dtype=torch.float64)
    assert (insens(model, x, maxpool_losers="inactive").inactive > insens(model, x).inactive).all()
    with pytest.raises(ValueError, match="maxpool_losers='none'"):
        insens(model, x, maxpool_losers="none")


def test_hutchinson_estimate_approaches_the_exact_map():
    model, x = cnn(), torch.randn(2, 1, 8, 8, dtype=torch.float64)
    exact = insens(model, x).map
    estimate = insens(model, x, method="hutchinson", samples=3000, generator=torch.Generator().manual_seed(0)).map
    assert ((estimate - exact).norm() / exact.norm()) < 0.1


@pytest.mark.parametrize("layer", ["2", "5", "8"])
def test_switched_projections_reconstruct_every_preactivation(layer):
    model, x = cnn(), torch.randn(2, 1, 8, 8, dtype=torch.float64)
    proj = switched_projections(model, x, layer)
    rebuilt = (proj.weight.flatten(2) * x.flatten(1)[:, None]).sum(-1) + proj.bias
    assert (rebuilt - proj.pre).abs().max() < 1e-12
    centres = proj.centres(x).flatten(2)
    on_plane = (proj.weight.flatten(2) * centres).sum(-1) + proj.bias
    usable = proj.weight.flatten(2).norm(dim=-1) > 0
    assert on_plane[usable].abs().max() < 1e-10


def test_dead_neurons_are_left_out_and_counted():
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 2)).double()
    with torch.no_grad():
        model[0].weight[2].zero_()
        model[0].bias[2] = -1.0  # inactive, and no hyperplane: ŵ = 0
    out = insens(model, torch.randn(4, 5, dtype=torch.float64))
    assert (out.zero_norm == 1).all() and torch.isfinite(out.map).all()


def test_non_relu_networks_and_unknown_layers_are_refused():
    with pytest.raises(ValueError, match="piecewise-linear"):
        insens(nn.Sequential(nn.Linear(3, 3), nn.GELU(), nn.Linear(3, 1)), torch.randn(2, 3))
    with pytest.raises(ValueError, match="ReLU-family"):
        switched_projections(cnn(), torch.randn(1, 1, 8, 8, dtype=torch.float64), "0")
