"""GPEX as a callback: it matches a network it never saw, logs what it promises, restores exactly from a
checkpoint, and never touches the classifier."""

from __future__ import annotations

import time

import lightning as L
import pytest
import torch
from conftest import loaders, quiet_trainer, read_events
from digit_net import DigitNet
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_xai import fit_explainers
from lightning_xai._core import LayerNotFoundError
from lightning_xai.data import BreastCancerDataModule, DigitsDataModule
from lightning_xai.gpex import GPEX, SurrogateFidelity, fidelity
from lightning_xai.models import MLP

EPOCHS = 12


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def cotrained(tmp_path_factory):
    """DigitNet co-trained with GPEX() (defaults) on the embedded digits, logged to TensorBoard."""
    log_dir = tmp_path_factory.mktemp("gpex_fit")
    L.seed_everything(0)
    gpex, model = GPEX(), DigitNet()
    logger = TensorBoardLogger(log_dir, name="", version="")
    trainer = quiet_trainer(log_dir, max_epochs=EPOCHS, callbacks=[gpex], logger=logger)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # conftest's one-thread fixture is per test; this fit runs once per module
    start = time.perf_counter()
    try:
        trainer.fit(model, datamodule=DigitsDataModule())
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("gpex/")}
    print(f"GPEX() co-trained {EPOCHS} epochs in {seconds:.1f} s: {metrics}")
    return gpex, model, trainer, log_dir, metrics


def test_cotrained_surrogate_matches_an_unseen_cnn(cotrained):
    gpex, _, _, _, metrics = cotrained
    assert metrics["gpex/agreement"] >= 0.98, metrics
    assert metrics["gpex/pearson"] >= 0.97, metrics
    assert metrics["gpex/r2"] >= 0.9 and 0 < metrics["gpex/variance"] < 1, metrics
    assert gpex.refits == EPOCHS and gpex.skipped_steps == 0
    assert gpex.surrogate.cache.num_filled == 1257  # every training example, by arrival order


def test_events_hold_scalars_and_one_neighbour_panel_per_epoch(cotrained):
    _, _, _, log_dir, _ = cotrained
    scalars, images = read_events(log_dir)
    assert images == {"gpex/neighbours": EPOCHS}
    for tag in ("agreement", "pearson", "pearson_min", "r2", "variance", "match_loss"):
        assert len(scalars[f"gpex/{tag}"]) == EPOCHS, tag


def test_explain_and_neighbours_equal_brute_force(cotrained):
    gpex, model, trainer, _, metrics = cotrained
    x = trainer.datamodule.val_dataset.tensors[0][:16]
    e = gpex.explain(x, k=10)
    assert e.mean.shape == e.variance.shape == e.output.shape == (16, 10)
    assert e.neighbours.shape == e.scores.shape == (16, 10)
    with torch.no_grad():
        assert torch.equal(e.output, model.eval()(x))
        assert torch.equal(e.head, e.output.argmax(-1))
    assert (e.scores[:, :-1] >= e.scores[:, 1:]).all()
    # brute force: the kernel of the predicted head against every cached row, ranked by (−score, slot)
    surrogate = gpex.surrogate
    with torch.no_grad():
        u = surrogate.kernel_net.eval()(x).double()
        cache = surrogate.cache
        scores = torch.einsum("bd,mbd->bm", u[torch.arange(16), e.head], cache.U[:, e.head].double())
        scores[:, ~cache.filled] = -float("inf")
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :10]
        assert torch.equal(e.neighbours, order)
        assert torch.allclose(e.scores, scores.gather(1, order), rtol=0, atol=1e-12)
        # the cached rows are the kernel net at the stored inputs (refit before the last validation)
        fresh = surrogate.kernel_net(cache.inputs[cache.filled]).double()
        assert torch.allclose(fresh, cache.U[cache.filled].double(), atol=1e-5)
    # neighbours come with the examples themselves (the stored inputs at those slots)
    assert e.examples.shape == (16, 10, 1, 8, 8) and torch.equal(e.examples, cache.inputs[order])
    # the GP means agree with the reported validation fidelity
    assert fidelity(e.mean, e.output)["pearson"] > 0.9


def _short_fit(tmp_path, callbacks, epochs=2, batches=6, datamodule=None, model=None):
    L.seed_everything(0)
    model = model or DigitNet()
    trainer = quiet_trainer(
        tmp_path, max_epochs=epochs, limit_train_batches=batches, limit_val_batches=2, callbacks=callbacks
    )
    trainer.fit(model, datamodule=datamodule or DigitsDataModule())
    return trainer, model


def test_classifier_trajectory_is_identical_and_gpex_is_deterministic(tmp_path):
    """Parameters and BatchNorm buffers end bit-identical with and without GPEX; two GPEX runs explain alike."""
    _, bare = _short_fit(tmp_path, [])
    runs = []
    for _ in range(2):
        gpex = GPEX(every_n_steps=1, probe_size=2)
        _, model = _short_fit(tmp_path, [gpex])
        runs.append((gpex, model))
    for model in (runs[0][1], runs[1][1]):
        state, reference = snapshot(model), snapshot(bare)
        assert state.keys() == reference.keys()
        for key in reference:
            assert torch.equal(state[key], reference[key]), key
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    a, b = runs[0][0].explain(x), runs[1][0].explain(x)
    assert torch.equal(a.neighbours, b.neighbours) and torch.equal(a.scores, b.scores)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.variance, b.variance)


def test_checkpoint_round_trip_restores_explanations_bit_for_bit(tmp_path):
    gpex = GPEX()
    trainer, model = _short_fit(tmp_path, [gpex], epochs=1, batches=5)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)  # callback state is tensors and plain types only
    x = torch.rand(4, 1, 8, 8)
    expected = gpex.explain(x)
    restored_model = DigitNet()
    restored_model.load_state_dict(checkpoint["state_dict"])
    fresh = GPEX()
    fresh.load_state_dict(checkpoint["callbacks"][fresh.state_key])
    got = fresh.explain(x, model=restored_model)
    for field in ("mean", "variance", "neighbours", "scores", "head", "output"):
        assert torch.equal(getattr(got, field), getattr(expected, field)), field
    a, b = gpex.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys()
    for key, value in a["surrogate"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b["surrogate"][key]), key
    with pytest.raises(ValueError, match="layer"):
        GPEX(layer="classifier").load_state_dict(checkpoint["callbacks"][fresh.state_key])


class UnshuffledDigits(DigitsDataModule):
    """Lightning does not checkpoint the global RNG, so a shuffling loader reshuffles differently after a resume."""

    def train_dataloader(self):
        return DataLoader(self.train_dataset, batch_size=self.batch_size)


def test_resumed_run_matches_uninterrupted_run(tmp_path):
    def run(max_epochs, ckpt_path=None):
        L.seed_everything(0)
        gpex = GPEX(probe_size=1)
        trainer = quiet_trainer(
            tmp_path, max_epochs=max_epochs, limit_train_batches=4, limit_val_batches=1, callbacks=[gpex]
        )
        trainer.fit(DigitNet(), datamodule=UnshuffledDigits(), ckpt_path=ckpt_path)
        return trainer, gpex

    _, full = run(2)
    half_trainer, _ = run(1)
    half_trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    _, resumed = run(2, ckpt_path=tmp_path / "epoch1.ckpt")
    a, b = full.state_dict(), resumed.state_dict()
    assert a["steps"] == b["steps"] == 8 and a["refits"] == b["refits"] == 2
    for key in a["surrogate"]:
        if isinstance(a["surrogate"][key], torch.Tensor):
            assert torch.equal(a["surrogate"][key], b["surrogate"][key]), key
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)


def test_submodule_layer_with_dataset_indices(tmp_path):
    """layer= explains a submodule (its input → its output); with index_fn neighbours are named by dataset index."""
    dm = DigitsDataModule()
    dm.setup()
    x, y = dm.train_dataset.tensors
    index = torch.arange(len(x)) * 3 + 5  # dataset indices that are not positions
    train = DataLoader(TensorDataset(x, y, index), batch_size=64, shuffle=True)
    val = DataLoader(dm.val_dataset, batch_size=64)
    gpex = GPEX(layer="classifier", index_fn=lambda batch: batch[2], probe_size=2, neighbours=3, every_n_steps=2)
    L.seed_everything(0)
    logger = TensorBoardLogger(tmp_path, name="", version="")
    trainer = quiet_trainer(tmp_path, max_epochs=2, limit_train_batches=8, callbacks=[gpex], logger=logger)
    trainer.fit(DigitNet(), train, val)
    assert gpex._shapes["input_shape"] == [24, 2, 2] and gpex._shapes["heads"] == 10
    assert gpex.steps == 8  # every other batch is a matching step; the others only refresh their rows
    cache = gpex.surrogate.cache
    assert int(cache.filled.sum()) == 8 * 64  # slots are stream positions: the epoch's 8 batches, one slot each
    assert set(cache.index[cache.filled].tolist()) <= set(index.tolist())
    e = gpex.explain(x[:3], k=4)
    assert e.mean.shape == (3, 10) and set(e.neighbours.flatten().tolist()) <= set(index.tolist())
    # each named neighbour is the example stored with that index
    named = {int(i): n for i, n in zip(index, range(len(index)))}
    for row, names in zip(e.examples, e.neighbours):
        for example, name in zip(row, names):
            assert torch.equal(example, x[named[int(name)]])
    scalars, images = read_events(tmp_path)
    assert images == {"gpex/neighbours": 2} and len(scalars["gpex/pearson"]) == 2


def test_post_hoc_and_tabular_inputs(tmp_path):
    """fit_explainers explains a frozen model; tabular inputs get a neighbour table figure."""
    L.seed_everything(0)
    model = MLP(input_shape=(30,), num_classes=2)
    before = snapshot(model)
    gpex = GPEX(probe_size=2)
    logger = TensorBoardLogger(tmp_path, name="", version="")
    trainer = fit_explainers(
        model, BreastCancerDataModule(), [gpex], epochs=2, accelerator="cpu", logger=logger,
        enable_progress_bar=False, num_sanity_val_steps=0,
    )  # fmt: skip
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert {"gpex/agreement", "gpex/pearson", "gpex/r2"} <= set(trainer.callback_metrics)
    _, images = read_events(tmp_path)
    assert images == {"gpex/neighbours": 2}


def test_without_stored_inputs_the_cache_keeps_only_features_targets_and_indices(tmp_path):
    """store_inputs=False (for data sets whose inputs would not fit): no inputs cached, neighbours named by index."""
    train, val = loaders(n_train=256, n_val=64)
    indexed = DataLoader(
        TensorDataset(*train.dataset.tensors, torch.arange(256) + 1000), batch_size=64, shuffle=True
    )
    gpex = GPEX(store_inputs=False, refit_each_epoch=False, index_fn=lambda batch: batch[2], probe_size=2)
    logger = TensorBoardLogger(tmp_path, name="", version="")
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=[gpex], logger=logger)
    trainer.fit(DigitNet(), indexed, val)
    cache = gpex.surrogate.cache
    assert cache.inputs.numel() == 0 and cache.num_filled == 256 and gpex.refits == 0
    e = gpex.explain(val.dataset.tensors[0][:3], k=4)
    assert e.examples is None and set(e.neighbours.flatten().tolist()) <= set(range(1000, 1256))
    with pytest.raises(RuntimeError, match="store_inputs=False"):
        gpex.refit()
    _, images = read_events(tmp_path)
    assert images == {"gpex/neighbours": 2}  # drawn as a table of names and scores


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dim": 0}, "dim=0"),
        ({"scale": -1.0}, "scale=-1.0"),
        ({"noise": 0.0}, "noise=0.0"),
        ({"lr": 0}, "lr=0"),
        ({"neighbours": 0}, "neighbours=0"),
        ({"every_n_steps": 0}, "every_n_steps=0"),
        ({"refit_each_epoch": "yes"}, "refit_each_epoch='yes'"),
        ({"index_fn": 3}, "index_fn=3"),
        ({"store_inputs": False}, "refit_each_epoch=True.*store_inputs=False"),
        ({"kernel_net": "resnet"}, "kernel_net=str"),
        ({"probe_size": -1}, "probe_size=-1"),
        ({"mix_fraction": 0.0}, r"mix_fraction=0.0 .*\(0, 1\]"),
        ({"mix_fraction": 1.5}, "mix_fraction=1.5"),
        ({"holdout_weight": -1}, "holdout_weight=-1"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPEX(**kwargs)


def test_bad_configurations_fail_at_setup(tmp_path):
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[GPEX(layer="classifer.3")])
    with pytest.raises(LayerNotFoundError, match="'classifier.3'"):
        trainer.fit(DigitNet(), datamodule=DigitsDataModule())
    with pytest.raises(RuntimeError, match="not been trained"):
        GPEX().explain(torch.rand(2, 1, 8, 8), model=DigitNet())


def test_fidelity_metric_sums_like_one_process():
    """Batch and rank splits give the same numbers as one pass (sum-reduced states, as DDP sync merges them)."""
    g = torch.Generator().manual_seed(0)
    target = torch.randn(300, 4, generator=g, dtype=torch.float64) * 3
    mean = target + 0.5 * torch.randn(300, 4, generator=g, dtype=torch.float64)
    variance = torch.rand(300, 4, generator=g, dtype=torch.float64)
    rank0, rank1 = SurrogateFidelity(4), SurrogateFidelity(4)
    for chunk in torch.arange(150).split(40):
        rank0.update(mean[chunk], target[chunk], variance[chunk])
    rank1.update(mean[150:], target[150:], variance[150:])
    rank0.merge_state(rank1)
    got = rank0.compute()
    ref = fidelity(mean, target)
    for name in ("agreement", "pearson", "pearson_min", "r2"):
        assert float(got[name]) == pytest.approx(ref[name], abs=1e-12), name
    assert float(got["variance"]) == pytest.approx(float(variance.mean()), abs=1e-12)


def test_non_finite_rows_are_skipped_and_the_cache_stays_finite():
    model = DigitNet().eval()
    gpex = GPEX().attach(model)
    x = torch.rand(8, 1, 8, 8)
    gpex.fit_step(x, torch.arange(8))
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.warns(UserWarning, match="NaN/Inf"):
        gpex.fit_step(bad, torch.arange(8))  # the seven finite rows still train and are written
    gpex.fit_step(torch.full_like(x, float("nan")), torch.arange(8))  # nothing left: skipped before any forward
    assert gpex.skipped_steps == 2 and gpex.steps == 2
    state = gpex.surrogate.state_dict()
    assert all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v) and v.is_floating_point())
    assert gpex.explain(x).mean.isfinite().all()
