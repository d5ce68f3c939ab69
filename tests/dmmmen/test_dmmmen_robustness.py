"""DMM-MEN under conditions a user brings: long streams, NaN networks and inputs, constant outputs, other precisions,
dict outputs, token ids and a cadence longer than the run. Fits are tiny (few sweeps, no progress bar)."""

import time

import lightning as L
import pytest
import torch
from conftest import digits_tensors, quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_xai._core.outputs import OutputFormatError
from lightning_xai.dmmmen.callback import DMMMEN
from lightning_xai.models import SmallCNN


def tiny(**kwargs) -> DMMMEN:
    defaults = dict(target_class=1, every_n_epochs=1, sweeps=10, refit_sweeps=5, progress=False)
    defaults.update(kwargs)
    return DMMMEN(**defaults)


def digit_loaders(n_train=96, n_val=48, batch_size=16):
    x, y = digits_tensors(n_train + n_val)
    return (DataLoader(TensorDataset(x[:n_train], y[:n_train]), batch_size=batch_size),
            DataLoader(TensorDataset(x[n_train:], y[n_train:]), batch_size=batch_size))


def fit_once(tmp_path, model, callback, **kwargs):
    L.seed_everything(0)
    train, val = kwargs.pop("loaders", None) or digit_loaders()
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback], **kwargs)
    trainer.fit(model, train, val)
    return {k.split("/", 1)[1]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("dmmmen")}


def stream(dmm, x, y, batch_size):
    for i in range(0, x.shape[0], batch_size):
        dmm.train_batch(None, None, (x[i : i + batch_size], y[i : i + batch_size]))


# ----------------------------------------------------------------------------------------------------- the reservoir
def test_batched_reservoir_equals_algorithm_r_one_example_at_a_time():
    x, y = torch.arange(300.0).view(-1, 1, 1), torch.arange(300)
    one, batched = DMMMEN(max_examples=5, seed=3), DMMMEN(max_examples=5, seed=3)
    stream(one, x, y, 1)
    stream(batched, x, y, 32)  # several rows of one batch often draw the same slot: the last one must win
    assert one._seen == batched._seen == 300
    assert torch.equal(one.pool, batched.pool) and torch.equal(one.pool_labels, batched.pool_labels)
    assert torch.equal(batched.pool.flatten().long(), batched.pool_labels)  # rows and labels stay paired


def test_reservoir_is_a_uniform_sample_of_the_stream():
    n, k, runs = 60, 12, 300
    counts = torch.zeros(n)
    x, y = torch.arange(float(n)).view(-1, 1), torch.zeros(n, dtype=torch.long)
    for seed in range(runs):
        dmm = DMMMEN(max_examples=k, seed=seed)
        stream(dmm, x, y, 16)
        assert dmm.pool.shape == (k, 1) and dmm.pool.unique().numel() == k
        counts[dmm.pool.flatten().long()] += 1
    expected = runs * k / n  # 60 per example; binomial sd 6.9
    assert (counts - expected).abs().max() < 5 * (expected * (1 - k / n)) ** 0.5
    assert abs(float(counts[: n // 2].mean() - counts[n // 2 :].mean())) < 6  # early and late examples alike


def test_filling_a_large_reservoir_is_linear_in_the_stream():
    n = 10_000
    x, y = torch.rand(n, 1, 784), torch.randint(0, 10, (n,))
    dmm = DMMMEN(max_examples=n)
    started = time.perf_counter()
    stream(dmm, x, y, 64)
    seconds = time.perf_counter() - started
    assert torch.equal(dmm.pool, x) and torch.equal(dmm.pool_labels, y)
    assert seconds < 10, f"{seconds:.1f} s to keep {n} examples (a copy of the pool per example takes ~60 s)"


def test_checkpoint_holds_only_the_kept_rows_and_resumes_exactly():
    x, y = torch.rand(200, 1, 6), torch.randint(0, 3, (200,))
    full = DMMMEN(max_examples=150, seed=1)
    stream(full, x, y, 20)
    half = DMMMEN(max_examples=150, seed=1)
    stream(half, x[:100], y[:100], 20)
    state = half.state_dict()
    assert state["pool"].shape == (100, 1, 6)
    assert state["pool"].untyped_storage().nbytes() == 100 * 6 * 4  # not the whole (larger) buffer behind it
    resumed = DMMMEN(max_examples=150, seed=1)
    resumed.load_state_dict(state)
    stream(resumed, x[100:], y[100:], 20)
    assert torch.equal(resumed.pool, full.pool) and torch.equal(resumed.pool_labels, full.pool_labels)


# ---------------------------------------------------------------------------------------------------------- bad rows
class NaNWhereBright(SmallCNN):
    """NaN logits on inputs whose first pixel is bright, finite elsewhere."""

    def forward(self, x):
        out = super().forward(x)
        bright = x.flatten(1)[:, 0] > 0.5
        return torch.where(bright[:, None], torch.full_like(out, float("nan")), out)


def test_rows_with_a_nan_network_output_are_left_out_of_the_fit():
    x, y = torch.rand(40, 1, 8, 8), torch.ones(40, dtype=torch.long)
    dmm = tiny()
    dmm.model = NaNWhereBright()
    dmm.train_batch(None, None, (x, y))
    bad = int((x.flatten(1)[:, 0] > 0.5).sum())
    assert 0 < bad < 38
    with pytest.warns(UserWarning, match="NaN/Inf"):
        dmm.refit()
    assert dmm.fits == 1 and dmm._fit_skipped == bad
    values = dmm.evaluate("cpu", x, y)
    assert values["skipped"] == bad and all(torch.isfinite(torch.tensor(v)) for v in values.values())


def test_an_all_nan_network_skips_the_fit_and_training_goes_on(tmp_path):
    class NaNNet(SmallCNN):
        def forward(self, x):
            return super().forward(x) * float("nan")

    dmm = tiny()
    with pytest.warns(UserWarning, match="this fit is skipped"):
        metrics = fit_once(tmp_path, NaNNet(), dmm)
    assert dmm.fits == 0
    assert metrics == {"skipped": 96.0}  # every stored training input, counted; no fidelity number


def test_nan_rows_of_the_metric_set_are_counted_not_scored():
    x, y = digits_tensors(120)
    dmm = tiny(target_class=0)
    dmm.model = SmallCNN()
    dmm.train_batch(None, None, (x[:96], y[:96]))
    dmm.refit()
    clean = dmm.evaluate("cpu", x[96:], y[96:])
    dirty = x[96:].clone()
    dirty[[0, 5], 0, 2, 2] = float("inf")
    with pytest.warns(UserWarning, match="NaN/Inf"):
        values = dmm.evaluate("cpu", torch.cat([dirty, x[96:]]), torch.cat([y[96:], y[96:]]))
    assert values["skipped"] == 2 and clean["skipped"] == 0
    assert all(torch.isfinite(torch.tensor(v)) for v in values.values())


def test_a_constant_network_output_reports_no_r2():
    class Constant(SmallCNN):
        def forward(self, x):
            return super().forward(x) * 0 + torch.linspace(-1, 1, 10)

    x, y = digits_tensors(80)
    dmm = tiny()
    dmm.model = Constant()
    dmm.train_batch(None, None, (x, y))
    dmm.refit()
    with pytest.warns(UserWarning, match="constant.*R² is undefined"):
        values = dmm.evaluate("cpu", x, y)
    assert "r2" not in values and values["rmsd_prob"] < 1e-6  # the surrogate matches the constant exactly


# --------------------------------------------------------------------------------------------- precision and outputs
@pytest.mark.parametrize("precision", ["64-true", "bf16-true", "bf16-mixed"])
def test_each_precision_fits_and_reports_finite_scalars(tmp_path, precision):
    dmm = tiny()
    metrics = fit_once(tmp_path, SmallCNN(), dmm, precision=precision)
    stored = {"64-true": torch.float64, "bf16-true": torch.bfloat16, "bf16-mixed": torch.float32}[precision]
    assert dmm.fits == 2 and dmm.pool.dtype == stored  # the epoch's report and the end of training
    assert {"rmsd_prob", "coverage90", "pcr_filling_top"} <= set(metrics)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert dmm.surrogate.components.coefficients.dtype == torch.float64  # the sampler stays in float64


class DictCNN(SmallCNN):
    def forward(self, x):
        logits = super().forward(x)
        return {"embedding": logits.relu(), "logits": logits}

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0])["logits"], batch[1])

    def validation_step(self, batch, batch_idx):
        pass


def pick_logits(out):
    return out["logits"]


def test_dict_output_with_output_fn_explains_the_logits(tmp_path):
    plain = fit_once(tmp_path / "plain", SmallCNN(), tiny())
    chosen = fit_once(tmp_path / "dict", DictCNN(), tiny(output_fn=pick_logits))
    assert chosen == pytest.approx(plain, rel=1e-6, abs=1e-9)  # the same network, read through output_fn


def test_dict_output_without_output_fn_fails_at_the_first_batch(tmp_path):
    dmm = tiny()
    with pytest.raises(OutputFormatError, match=r"keys \['embedding', 'logits'\].*output_fn"):
        fit_once(tmp_path, DictCNN(), dmm)
    assert dmm.batches_seen == 1


class TokenNet(L.LightningModule):
    def __init__(self, vocab=16, length=10):
        super().__init__()
        self.embedding = nn.Embedding(vocab, 6)
        self.head = nn.Linear(6 * length, 3)

    def forward(self, ids):
        return self.head(self.embedding(ids).flatten(1))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_token_ids_are_regressed_as_numbers_with_a_warning(tmp_path):
    ids = torch.randint(0, 16, (96, 10), generator=torch.Generator().manual_seed(0))
    labels = ids[:, 0] % 3
    loaders = (DataLoader(TensorDataset(ids[:64], labels[:64]), batch_size=16),
               DataLoader(TensorDataset(ids[64:], labels[64:]), batch_size=16))
    dmm = tiny()
    with pytest.warns(UserWarning, match="token ids"):
        metrics = fit_once(tmp_path, TokenNet(), dmm, loaders=loaders)
    assert dmm.fits == 2 and dmm.pool.dtype == torch.int64 and torch.equal(dmm.pool, ids[:64])
    assert {"rmsd_prob", "pcr_new_cases_top"} <= set(metrics)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    explanation = dmm.explain(ids[64:70])
    assert explanation.coefficients.shape == (6, 10)


def test_wrong_class_for_the_output_fails_at_the_first_batch(tmp_path):
    dmm = tiny(target_class=12)
    with pytest.raises(ValueError, match="target_class=12.*shape \\(2, 10\\)"):
        fit_once(tmp_path, SmallCNN(), dmm)
    assert dmm.batches_seen == 1


# ----------------------------------------------------------------------------------------------------------- cadence
def test_an_epoch_without_a_refit_warns_once_naming_every_n_epochs(tmp_path):
    dmm = tiny(every_n_epochs=3)
    with pytest.warns(UserWarning, match="every_n_epochs=3") as record:
        L.seed_everything(0)
        train, val = digit_loaders()
        quiet_trainer(tmp_path, max_epochs=2, callbacks=[dmm]).fit(SmallCNN(), train, val)
    assert sum("every_n_epochs=3" in str(w.message) for w in record) == 1
    assert dmm.fits == 1  # the fit at the end of training still came


def test_a_fit_stopped_by_its_time_budget_says_so(tmp_path):
    x, y = digits_tensors(96)
    train = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=16)
    val = DataLoader(TensorDataset(x[64:], y[64:]), batch_size=16)
    dmm = DMMMEN(sweeps=100_000, refit_sweeps=3, every_n_epochs=1, progress=False, time_budget=0.2)
    with pytest.warns(UserWarning, match=r"time budget \(0.2 s\) after \d+ of 100000 sweeps"):
        quiet_trainer(tmp_path, max_epochs=1, callbacks=[dmm]).fit(SmallCNN(), train, val)
    assert dmm.fits >= 1  # the stopped fit still counts: its means cover the sweeps it did
