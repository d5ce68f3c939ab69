"""One contract, run over all five callbacks: construction without arguments, bad arguments named at set-up, the
user's module untouched, hooks gone after ``teardown``, twins side by side, ``explain(x, model=...)`` after a
checkpoint load, and tags under the callback's prefix."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from conftest import NestedNet, loaders, quiet_trainer

from lightning_xai import DMMMEN, GPEX, ClaDec, Insens, Linearization

CLASSES = {"cladec": ClaDec, "linearization": Linearization, "insens": Insens, "dmmmen": DMMMEN, "gpex": GPEX}
# cheap settings for the runs (construction without arguments is checked separately)
CHEAP = {
    "cladec": {"every_n_steps": 1, "probe_size": 2},
    "linearization": {"probe_size": 2, "metric_size": 8, "steps": 3},
    "insens": {"probe_size": 2, "metric_size": 8, "steps": 3},
    "dmmmen": {"sweeps": 10, "refit_sweeps": 3, "every_n_epochs": 1, "progress": False},
    "gpex": {"probe_size": 2, "neighbours": 2},
}
# a second configuration that defines another explanation (a twin)
TWIN = {"cladec": {"alpha": 0.5}, "linearization": {"mode": "gated-linear"}, "insens": {"maxpool_losers": "inactive"},
        "dmmmen": {"target_class": 1}, "gpex": {"dim": 8}}
# a bad value that only the model can refute: it must fail at set-up, naming the value
BAD_LAYER = {"cladec": {"layer": "backbone.blok1"}, "linearization": {"input_layer": "backbone.blok1"},
             "insens": {"input_layer": "backbone.blok1"}, "gpex": {"layer": "backbone.blok1"}}


def make(name: str, **extra) -> L.Callback:
    return CLASSES[name](**{**CHEAP[name], **extra})


def fit(tmp_path, callbacks, **kwargs) -> tuple[L.Trainer, NestedNet]:
    torch.manual_seed(0)
    model = NestedNet()
    train, val = loaders(n_train=64, n_val=32, batch_size=16, as_dict=True)
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=callbacks, **kwargs)
    trainer.fit(model, train, val)
    return trainer, model


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_constructs_without_arguments(name):
    callback = CLASSES[name]()
    assert callback.state_key and callback.method == name


@pytest.mark.parametrize("name", sorted(BAD_LAYER))
def test_a_misspelt_layer_fails_at_setup_naming_it_and_the_closest_names(tmp_path, name):
    with pytest.raises(ValueError, match=r"backbone\.blok1.*backbone\.block1"):
        fit(tmp_path, [make(name, **BAD_LAYER[name])], limit_train_batches=1, limit_val_batches=1)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_the_users_module_is_untouched_and_hooks_are_gone_after_teardown(tmp_path, name):
    _, bare = fit(tmp_path / "bare", [])
    trainer, explained = fit(tmp_path / "explained", [make(name)])
    for key, value in bare.state_dict().items():  # parameters and BatchNorm statistics, bit for bit
        assert torch.equal(value, explained.state_dict()[key]), key
    assert _hooks(explained) == _hooks(bare) == 0
    tags = [k for k in trainer.callback_metrics if k.startswith(f"{name}/")]
    assert tags, f"no {name}/ scalars logged"


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_twins_run_side_by_side_under_their_own_prefixes(tmp_path, name):
    first, second = make(name), make(name, **TWIN[name])
    trainer, _ = fit(tmp_path, [first, second])
    assert first.state_key != second.state_key
    assert first.prefix != second.prefix
    for callback in (first, second):
        assert any(k.startswith(f"{callback.prefix}/") for k in trainer.callback_metrics), callback.prefix


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_explain_after_a_checkpoint_load(tmp_path, name):
    callback = make(name)
    _, model = fit(tmp_path, [callback])
    state = copy.deepcopy(callback.state_dict())
    restored = make(name)
    restored.load_state_dict(state)
    x = next(iter(loaders(n_train=8, n_val=8, batch_size=4)[1]))[0]
    model.eval()
    expected, explanation = callback.explain(x, model=model), restored.explain(x, model=model)
    for field in vars(expected):
        a, b = getattr(expected, field), getattr(explanation, field)
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), field
