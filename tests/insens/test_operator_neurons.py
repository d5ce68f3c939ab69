"""Neurons seen per operator call: in-place and functional ReLUs, and a module called at two sites."""

import pytest
import torch
import torch.nn.functional as F
from _vision import torchvision_models
from torch import nn

from lightning_xai.insens import insens, insens_naive, switched_projections


def _inplace(model: nn.Module, flag: bool) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = flag
    return model


def test_inplace_relu_resnet_equals_the_same_network_without_inplace():
    models = torchvision_models()
    torch.manual_seed(0)
    model = models.resnet18(weights=None, num_classes=10).double().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    inplace = insens(_inplace(model, True), x, method="hutchinson", samples=32, generator=gen())
    plain = insens(_inplace(model, False), x, method="hutchinson", samples=32, generator=gen())
    assert inplace.map.abs().max() > 0 and inplace.inactive.min() > 0
    assert (inplace.map - plain.map).abs().max() < 1e-10
    assert torch.equal(inplace.inactive, plain.inactive)
    # a BasicBlock calls its one ReLU module twice: two neuron layers, not one replayed twice
    assert {"layer1.0.relu", "layer1.0.relu#2"} <= set(inplace.active_fraction)


class FunctionalNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(64, 12), nn.Linear(12, 3)

    def forward(self, x):
        h = F.max_pool2d(torch.relu_(self.conv(x)), 2).flatten(1)
        return self.fc2(F.leaky_relu(self.fc1(h), 0.1))


@pytest.mark.parametrize("losers", ["active", "inactive"])
def test_functional_relus_are_neurons_and_fast_equals_naive(losers):
    torch.manual_seed(1)
    model, x = FunctionalNet().double(), torch.randn(3, 1, 8, 8, dtype=torch.float64)
    fast = insens(model, x, maxpool_losers=losers)
    naive = insens_naive(model, x, maxpool_losers=losers)
    assert set(fast.active_fraction) == {"relu", "leaky_relu"}
    assert fast.map.abs().max() > 1e-3 and (fast.map - naive).abs().max() < 1e-10
    proj = switched_projections(model, x, "leaky_relu")
    rebuilt = (proj.weight.flatten(2) * x.flatten(1)[:, None]).sum(-1) + proj.bias
    assert (rebuilt - proj.pre).abs().max() < 1e-12


def test_functional_smooth_units_are_refused_naming_the_call():
    class Smooth(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 1)

        def forward(self, x):
            return self.b(F.gelu(torch.relu(self.a(x))))

    with pytest.raises(ValueError, match="gelu"):
        insens(Smooth(), torch.randn(2, 3))


def test_token_ids_are_explained_in_the_embedding():
    class TokenNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(30, 6)
            self.fc1, self.fc2 = nn.Linear(6, 10), nn.Linear(10, 2)

        def forward(self, ids):
            return self.fc2(F.relu(self.fc1(self.embed(ids))).mean(1))

    torch.manual_seed(2)
    model, ids = TokenNet().double(), torch.randint(0, 30, (3, 5))
    with pytest.raises(TypeError, match="input_layer"):
        insens(model, ids)
    result = insens(model, ids, input_layer="embed")
    assert result.map.shape == (3, 5, 6) and result.map.abs().max() > 0
    # the same network fed the embedding directly gives the same map
    class FromEmbedding(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, e):
            return self.net.fc2(F.relu(self.net.fc1(e)).mean(1))

    direct = insens(FromEmbedding(model), model.embed(ids).detach())
    assert (result.map - direct.map).abs().max() < 1e-12
    assert torch.equal(result.inactive, direct.inactive)
