import pytest
import torch

from lightning_xai._core import BatchFormatError, BatchUnpacker, PrivateRNG, ProbeSet


def test_default_unpacking_of_tuples_dicts_and_tensors():
    x, y = torch.randn(4, 3), torch.arange(4)
    unpack = BatchUnpacker()
    assert unpack.input((x, y)) is x and unpack.target((x, y)) is y
    assert unpack.input({"image": x, "label": y}) is x and unpack.target({"image": x, "label": y}) is y
    assert unpack.input(x) is x and unpack.target(x) is None


def test_unknown_batch_structure_says_how_to_pass_input_fn():
    with pytest.raises(BatchFormatError, match="input_fn"):
        BatchUnpacker().input({"pixels": torch.zeros(2)})
    custom = BatchUnpacker(input_fn=lambda b: b["pixels"])
    assert custom.input({"pixels": torch.ones(2)}).sum() == 2


def test_probe_set_fills_once_and_round_trips():
    probe = ProbeSet(5)
    with torch.inference_mode():
        a, b = torch.arange(3.0), torch.arange(3.0, 10.0)
        probe.offer(a, a.long())
        probe.offer(b, b.long())
        probe.offer(torch.zeros(4), torch.zeros(4).long())
    assert probe.full and torch.equal(probe.inputs, torch.arange(5.0))
    assert not probe.inputs.is_inference(), "probe copies must be usable with autograd later"
    other = ProbeSet(1)
    other.load_state_dict(probe.state_dict())
    assert torch.equal(other.inputs, probe.inputs) and torch.equal(other.targets, probe.targets)


def test_private_rng_leaves_global_stream_alone_and_is_reproducible():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    rng = PrivateRNG(seed=7)
    with rng.active():
        first = torch.rand(2)
    assert torch.equal(torch.rand(3), expected), "the global stream must not move"
    with rng.active():
        second = torch.rand(2)
    assert not torch.equal(first, second), "the private stream advances"
    replay = PrivateRNG(seed=7)
    with replay.active():
        assert torch.equal(torch.rand(2), first)
    resumed = PrivateRNG(seed=0)
    resumed.load_state_dict(rng.state_dict())
    with rng.active():
        a = torch.rand(2)
    with resumed.active():
        assert torch.equal(torch.rand(2), a)
