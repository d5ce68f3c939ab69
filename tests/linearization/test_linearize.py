"""Exactness of F(x) = W·x + b on networks the library never saw, with b from the independent frozen-gate pass."""

import pytest
import torch
from torch import nn

from lightning_xai.insens import insens
from lightning_xai.linearization import frozen_gate_forward, linearize


class ResidualNet(nn.Module):
    """Conv, eval BatchNorm, LeakyReLU, a residual block, max- and average-pooling, Hardtanh, linear."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.LeakyReLU(0.1))
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.Conv2d(8, 8, 3, padding=1))
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.avg = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Sequential(nn.Flatten(), nn.Hardtanh(), nn.Linear(32, classes))

    def forward(self, x):
        h = self.stem(x)
        h = self.act(h + self.block(h))
        return self.head(self.avg(self.pool(h)))


def randomise_batchnorm(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_exact_identity_on_an_unseen_residual_network(dtype, bound):
    torch.manual_seed(0)
    model = randomise_batchnorm(ResidualNet()).to(dtype).train()  # train mode: linearize must use eval mode
    x = torch.randn(6, 2, 8, 8, dtype=dtype)
    lin = linearize(model, x)
    assert lin.mode == "exact" and lin.weight.shape == (6, 5, 2, 8, 8)
    assert lin.residual(x).max() < bound
    assert all(m.training for m in model.modules())  # modes restored
    model.eval()
    assert torch.equal(lin.output, model(x))
    # the bias is not F(0): frozen gates matter
    assert not torch.allclose(lin.bias, model(torch.zeros_like(x)))


def test_modes_restored_and_inference_mode_tolerated():
    model = randomise_batchnorm(ResidualNet()).train()
    model.head.eval()
    with torch.inference_mode():
        lin = linearize(model, torch.randn(2, 2, 8, 8))
    assert lin.residual(torch.randn(2, 2, 8, 8)).shape == (2,)
    assert model.training and model.stem.training and not model.head.training


def test_weight_of_a_class_is_its_input_gradient_and_subsets_agree():
    torch.manual_seed(1)
    model = randomise_batchnorm(ResidualNet()).eval()
    x = torch.randn(4, 2, 8, 8, requires_grad=True)
    full = linearize(model, x)
    for c in range(5):
        (grad,) = torch.autograd.grad(model(x)[:, c].sum(), x)
        assert torch.allclose(full.weight[:, c], grad, atol=1e-7, rtol=0)
    predicted = model(x).argmax(-1)
    one = linearize(model, x, classes=predicted)
    assert one.weight.shape == (4, 1, 2, 8, 8)
    assert torch.equal(one.weight[:, 0], full.weight[torch.arange(4), predicted])
    cheap = linearize(model, x, bias="difference")
    assert torch.equal(cheap.weight, full.weight) and torch.allclose(cheap.bias, full.bias, atol=1e-5)
    pair = linearize(model, x, classes=[3, 1], chunk_size=1)
    assert torch.equal(pair.weight, full.weight[:, [3, 1]]) and torch.equal(pair.bias, full.bias[:, [3, 1]])
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        linearize(model, x, classes=[7])


def test_the_linear_map_holds_on_the_whole_region_not_just_at_x():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 16), nn.LeakyReLU(0.2), nn.Linear(16, 4))
    model = model.double()
    x = torch.randn(3, 10, dtype=torch.float64)
    lin = linearize(model, x)
    radius = insens(model, x).r_min
    delta = torch.randn_like(x)
    delta = delta / delta.norm(dim=1, keepdim=True) * 0.9 * radius[:, None]
    moved = x + delta
    assert torch.allclose(lin.apply(moved), model(moved), atol=1e-12, rtol=0)
    far = x + delta / 0.9 * 50  # well outside: the affine piece no longer describes the network
    assert not torch.allclose(lin.apply(far), model(far), atol=1e-6)


class GatedNet(nn.Module):
    """GELU, SiLU, LayerNorm and a softmax attention built from modules."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.softmax = nn.Softmax(dim=-1)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8), nn.SiLU())
        self.out = nn.Linear(8 * 3, 2)

    def forward(self, x):  # x: (B, 3 tokens, 4)
        h = self.norm(self.embed(x))
        attn = self.softmax(self.q(h) @ self.k(h).transpose(1, 2) / 8**0.5)
        h = h + attn @ self.v(h)
        h = h + self.mlp(h)
        return self.out(h.flatten(1))


def test_gated_linear_mode_is_chosen_reported_and_exact_against_the_gated_network():
    torch.manual_seed(3)
    model = GatedNet().double()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    lin = linearize(model, x)
    assert lin.mode == "gated-linear"
    assert lin.residual(x).max() < 1e-12
    gated = frozen_gate_forward(model, x, x, gated=True)
    assert torch.allclose(gated, model(x), atol=1e-12)
    x_req = x.clone().requires_grad_(True)
    (jac_row,) = torch.autograd.grad(model(x_req)[:, 0].sum(), x_req)
    assert not torch.allclose(jac_row, lin.weight[:, 0], atol=1e-6)  # W is not the plain Jacobian here
    with pytest.raises(ValueError, match="gated-linear"):
        linearize(model, x, mode="exact")


def test_embedding_network_has_one_row_per_axis():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 2)).double()
    x = torch.randn(7, 64, dtype=torch.float64)
    lin = linearize(model, x)
    assert lin.weight.shape == (7, 2, 64) and lin.residual(x).max() < 1e-12


def test_a_nonlinearity_without_a_gate_rule_is_warned_about():
    class Squares(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 12), nn.Linear(12, 3)

        def forward(self, x):
            h = self.a(x)
            return self.b(torch.sin(h) * h)  # sin has no gate rule: W·x + b cannot match F(x)

    with pytest.warns(UserWarning, match="misses F"):
        lin = linearize(Squares().double(), torch.randn(4, 6, dtype=torch.float64))
    assert lin.residual().max() > 1e-6
