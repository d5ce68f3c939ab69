"""Gates recorded per operator call: functional and in-place activations, shared modules, attention, norms, compiled
submodules, token ids and dict outputs, on networks written the way users write them."""

import pytest
import torch
import torch.nn.functional as F
from _vision import timm_or_skip, torchvision_models
from torch import nn

from lightning_xai._core.gates import GateRecorder
from lightning_xai._core.layers import resolve_layer
from lightning_xai._core.outputs import OutputFormatError
from lightning_xai.linearization import frozen_gate_forward, linearize

BOUNDS = {torch.float32: 1e-5, torch.float64: 1e-12}


def randomise_norms(model: nn.Module) -> nn.Module:
    """Trained-like BatchNorm statistics (the identity statistics of a fresh network hide bias errors)."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.data.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return model


class FunctionalResNet(nn.Module):
    """Every way of calling a piecewise-linear unit: F.relu, torch.relu_, Tensor.relu, F.leaky_relu, F.relu6,
    F.hardtanh, clamp, an in-place nn.ReLU module called at two sites, F.max_pool2d and torch.max over a dim."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 8, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        self.conv1, self.conv2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)  # called twice per forward, as torchvision's BasicBlock does
        self.head = nn.Linear(8 * 4 + 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.stem(x), 0.1)
        r = self.relu(self.bn1(self.conv1(h)))
        r = self.bn2(self.conv2(r))
        h = self.relu(h + r)
        h = torch.relu_(h * 1.0) + F.relu6(h * 3.0) - F.hardtanh(h, -0.5, 0.5) + h.clamp(min=0.2).relu()
        pooled = F.max_pool2d(h, 2)  # (B, 8, 4, 4)
        columns = torch.max(pooled, dim=-1).values.flatten(1)  # (B, 32)
        return self.head(torch.cat([columns, F.adaptive_max_pool2d(h, 1).flatten(1)], dim=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_functional_and_inplace_units_are_exact(dtype):
    torch.manual_seed(0)
    model = randomise_norms(FunctionalResNet()).to(dtype)
    x = torch.randn(4, 2, 8, 8, dtype=dtype)
    lin = linearize(model, x)
    assert lin.mode == "exact"
    assert lin.residual(x).max() < BOUNDS[dtype]
    # the bias came from the frozen gates, not from F(0): it is not the network's output at zero
    assert not torch.allclose(lin.bias, model.eval()(torch.zeros_like(x)))
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xr)[:, 2].sum(), xr)
    assert torch.allclose(lin.weight[:, 2], grad, atol=BOUNDS[dtype])


def test_a_module_called_at_two_sites_gets_a_gate_per_call():
    model = randomise_norms(FunctionalResNet()).double().eval()
    recorder = GateRecorder(model)
    with recorder.record():
        model(torch.randn(2, 2, 8, 8, dtype=torch.float64))
    names = [site.name for site in recorder.sites]
    assert "relu" in names and "relu#2" in names  # the shared in-place module, once per call
    assert any(name.startswith(":leaky_relu") or name == "leaky_relu" for name in names)
    first, second = (next(s for s in recorder.sites if s.name == n) for n in ("relu", "relu#2"))
    assert not torch.equal(first.gates[0], second.gates[0])


class GatedBlocks(nn.Module):
    """Smooth units as users write them: in-place Hardswish, a squeeze-excitation gate (hardsigmoid · x), SwiGLU,
    GroupNorm, a LayerNorm2d (permute + F.layer_norm), an RMSNorm written out, nn.MultiheadAttention, fused
    scaled-dot-product attention and a log-softmax head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.se_down, self.se_up = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.ln = nn.LayerNorm(8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.qkv = nn.Linear(8, 24)
        self.w1, self.w2, self.w3 = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.hardswish(self.gn(self.conv(x)), inplace=True)
        scale = F.hardsigmoid(self.se_up(torch.relu(self.se_down(h.mean((2, 3), keepdim=True)))))
        h = h * scale
        h = F.layer_norm(h.permute(0, 2, 3, 1), (8,)).permute(0, 3, 1, 2)  # timm's LayerNorm2d
        tokens = h.flatten(2).transpose(1, 2)  # (B, 16, 8)
        tokens = tokens + self.mha(self.ln(tokens), self.ln(tokens), self.ln(tokens), need_weights=False)[0]
        q, k, v = self.qkv(tokens).view(tokens.shape[0], -1, 3, 2, 4).permute(2, 0, 3, 1, 4)
        tokens = tokens + F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
        rms = tokens * torch.rsqrt(tokens.pow(2).mean(-1, keepdim=True) + 1e-6)
        tokens = tokens + self.w3(F.silu(self.w1(rms)) * self.w2(rms))
        return F.log_softmax(self.head(F.gelu(tokens.mean(1))), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gated_blocks_are_exact_against_the_gated_network(dtype):
    torch.manual_seed(1)
    model = GatedBlocks().to(dtype)
    x = torch.randn(3, 3, 4, 4, dtype=dtype)
    lin = linearize(model, x)
    assert lin.mode == "gated-linear"
    assert lin.residual(x).max() < BOUNDS[dtype]
    model.eval()
    with torch.no_grad():
        assert torch.allclose(lin.output, model(x), atol=BOUNDS[dtype] * 10)  # the gated network is the network at x
        gated_elsewhere = frozen_gate_forward(model, x, 0.5 * x, gated=True)
    assert torch.allclose(lin.apply(0.5 * x), gated_elsewhere.flatten(1), atol=BOUNDS[dtype] * 10)
    with pytest.raises(ValueError, match="gated-linear"):
        linearize(model, x, mode="exact")


def test_recurrent_layers_are_refused_not_called_affine():
    model = nn.Sequential(nn.LSTM(4, 8, batch_first=True))
    with pytest.raises(NotImplementedError, match="LSTM"):
        linearize(model, torch.randn(2, 3, 4))


def test_compiled_submodule_is_explained_through_its_original_module():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).double()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    plain = linearize(model, x)
    model[0] = torch.compile(model[0])
    compiled = linearize(model, x)
    assert torch.equal(compiled.weight, plain.weight) and compiled.residual(x).max() < 1e-12
    recorder = GateRecorder(torch.compile(model))
    with recorder.record():
        recorder.model(x)
    assert [site.name for site in recorder.sites] == ["1"]  # names without _orig_mod
    assert resolve_layer(model, "0._orig_mod") is model[0]._orig_mod
    nested = nn.Sequential(torch.compile(nn.Sequential(nn.Linear(2, 2), nn.ReLU())))
    assert resolve_layer(nested, "0.1") is resolve_layer(nested, "0._orig_mod.1")


class TokenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(self.embed(ids).transpose(1, 2)))
        return self.head(h.amax(-1) + h.mean(-1))


def test_token_ids_are_linearized_in_the_embedding():
    torch.manual_seed(3)
    model = TokenNet().double()
    ids = torch.randint(0, 50, (4, 7))
    with pytest.raises(TypeError, match="input_layer"):
        linearize(model, ids)
    lin = linearize(model, ids, input_layer="embed")
    assert lin.weight.shape == (4, 3, 7, 8) and lin.point.shape == (4, 7, 8)
    assert lin.residual().max() < 1e-12
    assert torch.equal(lin.point, model.embed(ids).detach())


def test_dict_outputs_need_output_fn():
    class DictNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = nn.Linear(6, 5), nn.Linear(5, 2)

        def forward(self, x):
            h = torch.relu(self.body(x))
            return {"embedding": h, "logits": self.head(h)}

    model, x = DictNet().double(), torch.randn(3, 6, dtype=torch.float64)
    with pytest.raises(OutputFormatError, match=r"\['embedding', 'logits'\]"):
        linearize(model, x)
    lin = linearize(model, x, output_fn=lambda out: out["logits"])
    assert lin.weight.shape == (3, 2, 6) and lin.residual(x).max() < 1e-12


# ------------------------------------------------------------------------------------------ real architectures
def _tv_vit(models):
    vit = models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                                   num_classes=10)
    nn.init.normal_(vit.heads.head.weight, std=0.2)  # torchvision zero-initialises the head
    return vit


REAL = {
    "resnet18": (lambda: randomise_norms(torchvision_models().resnet18(weights=None, num_classes=10)), "exact"),
    "mobilenet_v3_small": (lambda: randomise_norms(torchvision_models().mobilenet_v3_small(weights=None,
                                                                                            num_classes=10)),
                           "gated-linear"),
    "torchvision_vit": (lambda: _tv_vit(torchvision_models()), "gated-linear"),
    "timm_vit": (lambda: timm_or_skip().create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                                                     patch_size=8, depth=2, num_classes=10), "gated-linear"),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_architectures(name):
    build, mode = REAL[name]
    torch.manual_seed(4)
    model = build()
    x = torch.randn(2, 3, 32, 32)
    lin = linearize(model, x, classes=[0, 3])
    assert lin.mode == mode
    assert lin.residual(x).max() < 1e-5
    assert lin.weight.abs().sum() > 0 and lin.output.abs().sum() > 0


class MaskedNet(nn.Module):
    """Piecewise-linear units written with masks: torch.where on a comparison, x * (x > 0), sign, clamp_."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 12), nn.Linear(12, 12), nn.Linear(12, 3)

    def forward(self, x):
        h = self.a(x)
        h = torch.where(h > 0, h, 0.1 * h)  # a leaky ReLU by hand
        g = self.b(h)
        g = g * (g > 0).to(g.dtype) + 0.5 * torch.sign(g) * g.clamp(-1, 1)
        return self.c(g.clone().clamp_(min=-2.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masks_and_comparisons_are_exact_gates(dtype):
    torch.manual_seed(5)
    model = MaskedNet().to(dtype)
    x = torch.randn(5, 6, dtype=dtype)
    lin = linearize(model, x)
    assert lin.mode == "exact" and lin.residual(x).max() < BOUNDS[dtype]
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xr)[:, 1].sum(), xr)
    assert torch.allclose(lin.weight[:, 1], grad, atol=BOUNDS[dtype])
    assert not torch.allclose(lin.bias, model(torch.zeros_like(x)), atol=1e-3)
