"""Probe and metric sets take finite, non-padding examples once each; perturbation AUCs refuse to rank NaN;
identity helpers name twins readably."""

import math

import pytest
import torch
from torch import nn

from lightning_xai import ClaDec, Linearization
from lightning_xai._core.identity import capture_arguments, distinguishing_suffix, stable
from lightning_xai._core.probe import ProbeSet
from lightning_xai.metrics.functional import deletion_auc, insertion_auc, nonfinite_rows


def batch(start, n=4):
    x = torch.arange(start, start + n, dtype=torch.float32).view(n, 1).expand(n, 3).clone()
    return x, torch.arange(start, start + n)


def test_non_finite_rows_are_left_out_and_counted_once():
    probe = ProbeSet(5, "test set")
    x, y = batch(0)
    x[1, 2] = float("nan")
    with pytest.warns(UserWarning, match="test set: left out 1"):
        assert probe.offer(x, y, start=0) == 1
    assert probe.targets.tolist() == [0, 2, 3] and probe.skipped == 1
    probe.offer(x, y, start=0)  # the same positions again (a later validation pass): nothing new, no recount
    assert len(probe) == 3 and probe.skipped == 1
    x2, y2 = batch(4)
    x2[0, 0] = float("inf")
    probe.offer(x2, y2, start=4)
    assert probe.targets.tolist() == [0, 2, 3, 5, 6] and probe.skipped == 2 and probe.full


def test_the_sanity_check_and_the_first_pass_do_not_duplicate_examples():
    probe = ProbeSet(6)
    probe.offer(*batch(0), start=0)  # sanity check: one batch
    for start in (0, 4, 8):  # first validation pass from the beginning
        probe.offer(*batch(start), start=start)
    assert probe.targets.tolist() == [0, 1, 2, 3, 4, 5] and probe.cursor == 6


def test_padding_rows_are_left_out_without_counting():
    probe = ProbeSet(8)
    probe.offer(*batch(0), start=0, padding=torch.tensor([False, False, True, True]))
    assert probe.targets.tolist() == [0, 1] and probe.skipped == 0


def test_a_callback_flags_the_rows_a_distributed_sampler_repeats():
    callback = Linearization()
    callback._padding = (1, 2, 41)  # rank 1 of 2 over 41 examples: its 21st row repeats example 0
    callback._val_position = 16
    assert callback._padding_rows(5).tolist() == [False, False, False, False, True]
    callback._padding = (0, 2, 41)
    assert not callback._padding_rows(5).any()


def test_resize_truncates_and_the_state_round_trips():
    probe = ProbeSet(4)
    probe.offer(*batch(0), start=0)
    probe.resize(2)
    assert probe.targets.tolist() == [0, 1]
    other = ProbeSet(9)
    other.load_state_dict(probe.state_dict())
    assert other.size == 2 and other.cursor == 4 and other.template == ((3,), torch.float32)
    legacy = {"size": 4, "inputs": torch.zeros(3, 2), "targets": None}  # a checkpoint before cursor and skipped
    other.load_state_dict(legacy)
    assert other.cursor == 3 and other.skipped == 0


def test_perturbation_aucs_give_nan_for_non_finite_attributions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x, attribution = torch.rand(3, 1, 3, 4), torch.rand(3, 1, 3, 4)
    clean = deletion_auc(model, x, attribution, 0, steps=4)
    attribution[1, 0, 2, 2] = float("nan")
    for auc in (deletion_auc, insertion_auc):
        scores = auc(model, x, attribution, 0, steps=4)
        assert math.isnan(scores[1]) and torch.isfinite(scores[[0, 2]]).all()
    assert torch.equal(deletion_auc(model, x, attribution, 0, steps=4)[[0, 2]], clean[[0, 2]])
    assert nonfinite_rows(attribution) == [1]


def test_arguments_are_captured_with_defaults_and_callables_by_name():
    def pick(batch):
        return batch[0]

    callback = ClaDec("features.3", 0.5, input_fn=pick)
    assert callback.config["layer"] == "features.3" and callback.config["alpha"] == 0.5
    assert callback.config["lr"] == 5e-3 and callback.config["input_fn"].endswith("pick>")
    assert "input_fn" not in callback.identity and "lr" not in callback.identity and "alpha" in callback.identity
    assert stable(nn.Linear(2, 2)) == "<module torch.nn.modules.linear.Linear>"
    assert capture_arguments(ClaDec, None, ("a", "b", "c"), {}) == {}  # does not bind: __init__ raises instead


def test_twin_suffixes_name_only_the_arguments_that_tell_them_apart():
    a = {"layer": None, "alpha": 0.0, "refae": True, "seed": 0}
    b = {"layer": "features.3", "alpha": 0.0, "refae": False, "seed": 0}
    c = {"layer": None, "alpha": 0.5, "refae": True, "seed": 0}
    assert distinguishing_suffix(a, [a]) == ""
    assert [distinguishing_suffix(t, [a, b]) for t in (a, b)] == ["-default", "-features.3"]
    assert [distinguishing_suffix(t, [a, c]) for t in (a, c)] == ["-alpha=0.0", "-alpha=0.5"]
    assert [distinguishing_suffix(t, [a, b, c]) for t in (a, b, c)] == [
        "-default-alpha=0.0", "-features.3-alpha=0.0", "-default-alpha=0.5"]


@pytest.mark.slow
def test_two_processes_equal_one_on_an_odd_validation_set_with_a_nan_image(tmp_path):
    """41 validation examples (the DistributedSampler repeats one on rank 1) and one NaN image: the scalars of two
    processes equal those of one, and both count the NaN image once."""
    from conftest import digits_tensors, quiet_trainer
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_xai import Insens
    from lightning_xai.models import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN()
    x, y = digits_tensors(41)
    x = x.clone()
    x[7, 0, 3, 3] = float("nan")
    loader = DataLoader(TensorDataset(x, y), batch_size=8)

    def validate(root, **kwargs):
        callbacks = [Linearization(metric_size=64, probe_size=2, steps=4),
                     Insens(metric_size=64, probe_size=2, steps=4)]
        trainer = quiet_trainer(root, callbacks=callbacks, **kwargs)
        trainer.validate(model, loader, verbose=False)
        return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("linearization/", "insens/"))}

    single = validate(tmp_path / "one")
    double = validate(tmp_path / "two", strategy="ddp_spawn", devices=2)
    compared = [k for k in single if "random" not in k and "r_min_median" not in k]
    assert len(compared) > 15 and set(single) == set(double)
    assert single["linearization/skipped"] == double["linearization/skipped"] == 1.0
    for key in compared:
        assert math.isfinite(single[key]), key
        assert double[key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), key
