"""GPEX on models and data the digits CNN never shows: dict outputs, NaN rows, constant outputs, other precisions,
too few batches for its cadence."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import digits_tensors, quiet_trainer
from digit_net import DigitNet
from torch.utils.data import DataLoader, TensorDataset

from lightning_xai._core.outputs import OutputFormatError
from lightning_xai.gpex import GPEX


class DictNet(DigitNet):
    """Returns ``{"embedding": (B, 96), "logits": (B, 10)}``, the embedding first."""

    def forward(self, x):
        h = self.body(x)
        return {"embedding": h.flatten(1), "logits": self.classifier(h)}

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0])["logits"], batch[1])

    def validation_step(self, batch, batch_idx):
        pass


class MarkedNaNNet(DigitNet):
    """Outputs NaN for the examples whose first pixel is exactly 0.5 (and trains on the finite rows only)."""

    def forward(self, x):
        out = super().forward(x)
        marked = (x[:, 0, 0, 0] == 0.5)[:, None]
        return torch.where(marked, torch.full_like(out, float("nan")), out)

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        keep = x.isfinite().flatten(1).all(1)  # the user's own step drops bad inputs (BatchNorm would spread them)
        out = self(x[keep])
        ok = out.isfinite().all(1)
        return F.cross_entropy(out[ok], y[keep][ok])


class ConstantNet(DigitNet):
    """The same output for every input (a collapsed network)."""

    def forward(self, x):
        return super().forward(x) * 0 + torch.linspace(0, 1, 10, dtype=x.dtype, device=x.device)


def data(n_train=128, n_val=32, batch_size=32):
    x, y = digits_tensors(n_train + n_val)
    train = DataLoader(TensorDataset(x[:n_train], y[:n_train]), batch_size=batch_size, shuffle=True)
    val = DataLoader(TensorDataset(x[n_train:], y[n_train:]), batch_size=batch_size)
    return train, val


def gpex_warnings(caught, text: str) -> list[str]:
    return [str(w.message) for w in caught if text in str(w.message)]


def test_dict_output_with_output_fn_explains_the_chosen_tensor(tmp_path):
    train, val = data()
    gpex = GPEX(probe_size=1, output_fn=lambda out: out["logits"])
    model = DictNet()
    quiet_trainer(tmp_path, max_epochs=1, callbacks=[gpex]).fit(model, train, val)
    assert gpex._shapes["heads"] == 10  # the logits, not the 96 embedding values
    x = val.dataset.tensors[0][:4]
    e = gpex.explain(x)
    with torch.no_grad():
        assert torch.equal(e.output, model.eval()(x)["logits"])
    with pytest.raises(ValueError, match="output_fn=3"):
        GPEX(output_fn=3)


def test_dict_output_without_output_fn_fails_on_the_first_batch_naming_the_keys(tmp_path):
    train, val = data()
    gpex = GPEX(probe_size=1)
    with pytest.raises(OutputFormatError, match=r"GPEX.*\['embedding', 'logits'\].*output_fn"):
        quiet_trainer(tmp_path, max_epochs=1, callbacks=[gpex]).fit(DictNet(), train, val)
    assert gpex.batches_seen == 1 and gpex.surrogate is None


def test_non_finite_inputs_and_outputs_are_left_out_counted_and_warned_once(tmp_path):
    x, y = digits_tensors(160)
    x = x.clone()
    x[[3, 40, 77], 0, 2, 2] = float("nan")  # three bad inputs
    x[[10, 90], 0, 0, 0] = 0.5  # two examples on which the network outputs NaN
    train = DataLoader(TensorDataset(x[:128], y[:128]), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(x[128:], y[128:]), batch_size=32)
    gpex = GPEX(probe_size=1)
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=[gpex])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(MarkedNaNNet(), train, val)
    assert len(gpex_warnings(caught, "NaN/Inf")) == 1
    assert float(trainer.callback_metrics["gpex/skipped"]) == 5  # rows of the last epoch, since the last report
    cache = gpex.surrogate.cache
    assert cache.num_filled == 123 and torch.isfinite(cache.inputs[cache.filled]).all()
    assert all(math.isfinite(float(v)) for k, v in trainer.callback_metrics.items() if k.startswith("gpex/"))


def test_constant_output_reports_no_pearson_and_warns(tmp_path):
    train, val = data()
    gpex = GPEX(probe_size=1)
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=[gpex])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(ConstantNet(), train, val)
    logged = {k for k in trainer.callback_metrics if k.startswith("gpex/")}
    assert not logged & {"gpex/pearson", "gpex/pearson_min", "gpex/r2"}
    assert float(trainer.callback_metrics["gpex/agreement"]) == 1.0
    assert len(gpex_warnings(caught, "constant over the validation examples")) == 1


@pytest.mark.parametrize("precision", ["64-true", "bf16-true", "bf16-mixed"])
def test_other_precisions_give_finite_scalars(tmp_path, precision):
    train, val = data(n_train=96)
    gpex = GPEX(probe_size=1)
    trainer = quiet_trainer(tmp_path, max_epochs=1, precision=precision, callbacks=[gpex])
    trainer.fit(DigitNet(), train, val)
    scalars = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("gpex/")}
    assert {"gpex/agreement", "gpex/pearson", "gpex/r2", "gpex/match_loss"} <= scalars.keys()
    assert all(math.isfinite(v) for v in scalars.values()), scalars
    cache = gpex.surrogate.cache
    assert cache.num_filled == 96 and cache.G.dtype == torch.float64 and cache.U.dtype == torch.float32
    dtype = {"64-true": torch.float64, "bf16-true": torch.bfloat16, "bf16-mixed": torch.float32}[precision]
    assert cache.inputs.dtype == dtype  # inputs kept exactly as the model saw them
    assert gpex.explain(val.dataset.tensors[0][:2].to(dtype)).mean.isfinite().all()


def test_an_epoch_without_a_matching_step_warns_once_naming_every_n_steps(tmp_path):
    train, val = data(n_train=128)  # 4 batches per epoch
    gpex = GPEX(probe_size=1, every_n_steps=6)
    trainer = quiet_trainer(tmp_path, max_epochs=3, callbacks=[gpex], limit_val_batches=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(DigitNet(), train, val)
    messages = gpex_warnings(caught, "did not co-train")
    assert len(messages) == 1 and "every_n_steps=6" in messages[0] and "epoch 0" in messages[0]
    assert gpex.steps == 2  # batches 6 and 12 of 12
