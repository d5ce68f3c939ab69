import pytest
import torch
from torch import nn

from lightning_xai._core import LayerNotFoundError, LayerTap, detached_copy, eval_mode, fresh_copy, resolve_layer
from lightning_xai._core.layers import last_linear_name


def make_net() -> nn.Module:
    net = nn.Sequential()
    net.add_module("features", nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()))
    net.add_module("head", nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 3)))
    return net


def test_unknown_layer_lists_closest_names():
    with pytest.raises(LayerNotFoundError) as err:
        resolve_layer(make_net(), "featurs.2")
    message = str(err.value)
    assert "'featurs.2'" in message and "'features.2'" in message


def test_last_linear_is_found_and_missing_one_is_explained():
    assert last_linear_name(make_net()) == "head.3"
    with pytest.raises(LayerNotFoundError, match="no nn.Linear"):
        last_linear_name(nn.Sequential(nn.Conv2d(1, 1, 1)))


def test_tap_records_output_and_input_only_while_armed():
    net = make_net()
    x = torch.randn(5, 1, 8, 8)
    out_tap, in_tap = LayerTap(net, "features.2").attach(), LayerTap(net, "head.3", capture="input").attach()
    net(x)
    assert out_tap.value is None and in_tap.value is None  # not armed: nothing kept
    with out_tap.recording(), in_tap.recording():
        y = net(x)
    assert torch.equal(out_tap.value, net.features(x))
    assert torch.equal(net.head[3](in_tap.value), y)


def test_truncated_forward_stops_after_layer_and_keeps_gradients():
    net = make_net()
    ran = []
    net.head[3].register_forward_hook(lambda *a: ran.append(True))
    tap = LayerTap(net, "features.2")
    x = torch.randn(2, 1, 8, 8)
    code = tap.truncated(net, x)
    assert not ran, "layers after the tap must not run"
    code.sum().backward()
    assert net.features[0].weight.grad is not None


def test_layer_off_the_forward_path_fails_clearly():
    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.spare = make_net(), nn.Linear(2, 2)

        def forward(self, x):
            return self.body(x)

    net = WithSpare()
    with pytest.raises(RuntimeError, match="never ran"):
        LayerTap(net, "spare").truncated(net, torch.randn(1, 1, 8, 8))


def test_eval_mode_restores_each_submodule_mode():
    net = make_net().train()
    net.features[1].eval()  # a user-frozen BatchNorm
    with eval_mode(net):
        assert not any(m.training for m in net.modules())
    assert net.training and not net.features[1].training and net.head.training


def test_detached_copy_drops_hooks_and_fresh_copy_reinitialises():
    net = make_net()
    LayerTap(net, "features.2").attach()
    clone = detached_copy(net)
    assert not clone.features[2]._forward_hooks
    assert net.features[2]._forward_hooks
    torch.manual_seed(1)
    fresh = fresh_copy(net)
    assert not torch.equal(fresh.head[1].weight, net.head[1].weight)
    assert fresh.head[1].weight.shape == net.head[1].weight.shape


def test_fresh_copy_warns_about_bare_parameters():
    net = make_net()
    net.scale = nn.Parameter(torch.ones(1))
    with pytest.warns(UserWarning, match="scale"):
        fresh_copy(net)
