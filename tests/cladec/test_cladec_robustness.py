"""ClaDec on ordinary set-ups: whose forward it learns from, bad rows, short epochs, every precision, any output,
token ids. Each test asserts what ClaDec learns or logs, compared with a clean twin run where possible."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import digits_tensors, quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_xai import GPEX, ClaDec
from lightning_xai._core import LayerTap, eval_mode
from lightning_xai._core.outputs import OutputFormatError
from lightning_xai.cladec.capture import BatchCapture, same_input
from lightning_xai.models import SmallCNN


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # fits below write nothing, but Lightning may create folders in the working directory


def digit_loaders(n_train=96, n_val=32, batch_size=16, val_x=None, val_y=None):
    x, y = digits_tensors(n_train + n_val)
    vx = x[n_train:] if val_x is None else val_x
    vy = y[n_train:] if val_y is None else val_y
    train = DataLoader(TensorDataset(x[:n_train], y[:n_train]), batch_size=batch_size)
    return train, DataLoader(TensorDataset(vx, vy), batch_size=batch_size)


def fit(callbacks, model=SmallCNN, loaders=None, epochs=1, **trainer_kwargs):
    """Fit a fresh ``model()`` (built after seeding, so every run starts from the same weights)."""
    L.seed_everything(0)
    model = model()
    trainer = quiet_trainer(None, max_epochs=epochs, callbacks=callbacks, **trainer_kwargs)
    trainer.fit(model, *(loaders or digit_loaders()))
    return trainer


def same_weights(a: ClaDec, b: ClaDec) -> bool:
    sa, sb = a.core.state_dict(), b.core.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def scalars(trainer, prefix="cladec/"):
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------------------- capture
class Meddler(L.Callback):
    """Runs the model on another batch of the same size before and after the user's step (eval mode, no grad)."""

    def __init__(self):
        self.other, self.calls = torch.rand(16, 1, 8, 8), 0

    def _forward(self, pl_module, x):
        with torch.no_grad(), eval_mode(pl_module):
            pl_module(x)
        self.calls += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._forward(pl_module, self.other)

    def on_before_backward(self, trainer, pl_module, loss):
        self._forward(pl_module, self.other.flip(-1))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._forward(pl_module, self.other.flip(-2))


class AuxiliaryForwards(SmallCNN):
    """A training_step that also runs the model on another batch of the same size, before and after its own."""

    def training_step(self, batch, batch_idx):
        other = torch.rand(batch[0].shape, generator=torch.Generator().manual_seed(batch_idx))  # global RNG untouched
        with torch.no_grad(), eval_mode(self):
            self(other)
        loss = super().training_step(batch, batch_idx)
        with torch.no_grad(), eval_mode(self):
            self(other.flip(-1))
        return loss


def test_capture_ignores_other_forwards_of_the_same_size():
    """Other callbacks' forwards and a training_step's forwards of other inputs leave ClaDec's pairs unchanged."""
    plain = ClaDec(every_n_steps=1)
    fit([plain])
    meddler, beside_meddler = Meddler(), ClaDec(every_n_steps=1)
    fit([meddler, beside_meddler])
    meddler_last, last = Meddler(), ClaDec(every_n_steps=1)
    fit([last, meddler_last])  # ClaDec's hooks run before the meddler's
    auxiliary = ClaDec(every_n_steps=1)
    fit([auxiliary], model=AuxiliaryForwards)
    assert meddler.calls == meddler_last.calls == 6 * 3
    assert plain.steps == beside_meddler.steps == last.steps == auxiliary.steps == 6
    assert same_weights(plain, beside_meddler) and same_weights(plain, last) and same_weights(plain, auxiliary)


class CallsItsParts(SmallCNN):
    """A training_step that calls the submodules directly instead of ``self(x)``."""

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.head(self.features(batch[0])), batch[1])


def test_a_training_step_calling_submodules_directly_is_captured():
    plain, direct = ClaDec(layer="features.7", every_n_steps=2), ClaDec(layer="features.7", every_n_steps=2)
    fit([plain], model=TensorOutput)
    fit([direct], model=CallsItsParts)
    assert direct.steps == plain.steps == 3 and same_weights(plain, direct)


def test_gpex_before_cladec_runs_and_cladec_learns_what_it_learns_alone():
    alone = ClaDec()
    fit([alone], epochs=2)
    beside = ClaDec()
    trainer = fit([GPEX(probe_size=2), beside], epochs=2)
    assert alone.steps == beside.steps == 2
    assert same_weights(alone, beside)
    values = scalars(trainer)
    assert values["cladec/skipped"] == 0 and all(math.isfinite(v) for v in values.values())


def test_capture_accepts_the_batch_as_a_view_a_copy_or_a_cast():
    x = torch.rand(4, 1, 8, 8)
    assert same_input(x, x) and same_input(x.view(4, -1), x) and same_input(x.clone(), x)
    assert same_input(x.double(), x) and same_input(x.flatten(1).clone(), x)
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    assert same_input(nan.clone(), nan)
    assert not same_input(x.flip(-1), x) and not same_input(x[:2], x) and not same_input(torch.rand(4, 1, 8, 8), x)


class Redirecting(nn.Module):
    """Called with the whole batch, it calls itself the way Lightning's DDP wrapper runs ``training_step`` as the
    module's forward: on another input of the same size, on the batch's input, and on another again."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 3)

    def forward(self, batch, nested=False):
        if not nested:
            x = batch[0] if isinstance(batch, list) else batch
            self(x.flip(0), nested=True)
            out = self(x, nested=True)
            self(x + 1, nested=True)
            return out
        return self.body(batch)


@pytest.mark.parametrize("as_list", [True, False])
def test_capture_judges_each_nested_forward_of_the_model_on_its_own(as_list):
    model = Redirecting()
    capture = BatchCapture(model, LayerTap(model, "body", "output"))
    x = torch.rand(5, 4)
    capture.arm(x)
    model([x, None] if as_list else x)
    matched, got = capture.matched, capture.disarm()
    assert torch.equal(got, model.body(x))
    # judged: the outer call, and each call of the model or of its layer outside a matching call
    assert matched == (1 if as_list else 2) and capture.ignored == (5 if as_list else 4)
    model(x)  # disarmed: nothing is recorded
    assert capture.value is None


# ---------------------------------------------------------------------------------------------------- bad rows
def twins(**kwargs):
    model = SmallCNN().eval()
    return model, [ClaDec(activation_mode="eval", **kwargs).attach(model) for _ in range(2)]


def test_one_nan_training_row_leaves_out_that_row_only():
    model, (cladec, clean) = twins()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    bad = x.clone()
    bad[2, 0, 3, 3] = float("nan")
    bad[5, 0, 1, 1] = float("inf")
    keep = torch.tensor([True, True, False, True, True, False, True, True])
    with pytest.warns(UserWarning, match="left out 2 training rows with NaN/Inf"):
        losses = cladec.fit_step(bad, y=y)
    clean_losses = clean.fit_step(x[keep], y=y[keep])
    assert cladec.skipped == 2 and cladec.skipped_steps == 0 and cladec.steps == 1
    assert torch.equal(losses["cladec/rec_loss"], clean_losses["cladec/rec_loss"])
    assert same_weights(cladec, clean)
    assert all(torch.isfinite(v).all() for v in cladec.core.state_dict().values())


def test_labels_out_of_range_leave_out_their_rows_in_the_classification_term():
    model, (cladec, clean) = twins(alpha=0.5)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    bad_y = y.clone()
    bad_y[1], bad_y[6] = 10, -1
    keep = torch.ones(8, dtype=torch.bool)
    keep[[1, 6]] = False
    with pytest.warns(UserWarning, match="labels outside the class range"):
        cladec.fit_step(x, y=bad_y)
    clean.fit_step(x[keep], y=y[keep])
    assert cladec.skipped == 2 and same_weights(cladec, clean)


def test_a_batch_without_any_usable_row_is_skipped_whole():
    model, (cladec, _) = twins()
    cladec.fit_step(torch.rand(4, 1, 8, 8))
    before = {k: v.clone() for k, v in cladec.core.state_dict().items()}
    with pytest.warns(UserWarning):
        assert cladec.fit_step(torch.full((4, 1, 8, 8), float("nan"))) == {}
    assert cladec.skipped == 4 and cladec.skipped_steps == 1
    assert all(torch.equal(v, before[k]) for k, v in cladec.core.state_dict().items())


class LabelFreeValidation(SmallCNN):
    """The user's validation_step does not read labels, so out-of-range labels reach only the callback."""

    def validation_step(self, batch, batch_idx):
        self(batch[0])


def test_bad_validation_rows_are_left_out_of_the_scalars_and_counted():
    x, y = digits_tensors(128)
    vx, vy = x[96:].clone(), y[96:].clone()
    vx[3, 0, 2, 2], vy[7], vy[20] = float("nan"), 10, -3
    good = torch.ones(32, dtype=torch.bool)
    good[[3, 7, 20]] = False
    clean = ClaDec(every_n_steps=2, metric_size=32)
    clean_trainer = fit([clean], model=LabelFreeValidation, loaders=digit_loaders(val_x=vx[good], val_y=vy[good]))
    cladec = ClaDec(every_n_steps=2, metric_size=32)
    with pytest.warns(UserWarning, match="metric-set examples"):
        trainer = fit([cladec], model=LabelFreeValidation, loaders=digit_loaders(val_x=vx, val_y=vy))
    held_x, held_y = cladec.examples.inputs, cladec.examples.targets  # the metric set as ClaDec holds it
    unusable = int((~torch.isfinite(held_x.flatten(1)).all(1) | (held_y < 0) | (held_y >= 10)).sum())
    assert unusable >= 2  # the labels at least (the NaN image too, unless the metric set refused it itself)
    got, want = scalars(trainer), scalars(clean_trainer)
    assert got.pop("cladec/skipped") == 3 and want.pop("cladec/skipped") == 0  # refused or left out, each once
    assert got.keys() == want.keys() and {"cladec/rec_loss", "cladec/acc_on_recon", "cladec/rec_ratio"} <= set(got)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key


def test_later_epochs_stay_finite_after_a_nan_validation_image():
    x, y = digits_tensors(128)
    vx = x[96:].clone()
    vx[0] = float("nan")
    cladec = ClaDec(every_n_steps=2)
    trainer = fit([cladec], loaders=digit_loaders(val_x=vx, val_y=y[96:]), epochs=2)
    values = scalars(trainer)
    assert values["cladec/skipped"] == 1  # refused by the metric set, or left out of the scalars: counted once
    assert all(math.isfinite(v) for v in values.values()) and cladec.steps == 6


# ---------------------------------------------------------------------------------------------------- cadence
def test_short_epochs_still_co_train_once_per_epoch_and_report():
    cladec = ClaDec(every_n_steps=6)  # 4 batches per epoch
    trainer = fit([cladec], loaders=digit_loaders(n_train=64), epochs=2)
    assert cladec.steps == 2 and cladec.batches_seen == 8
    assert {"cladec/rec_loss", "refae/rec_loss", "cladec/rec_ratio"} <= set(scalars(trainer, ""))
    regular = ClaDec(every_n_steps=3)  # steps at batches 3 and 6: the last-batch rule adds nothing
    fit([regular], loaders=digit_loaders(n_train=64), epochs=2)
    assert regular.steps == 2


class Stream(IterableDataset):
    """Three batches of 16 digits, without a length: Lightning cannot know the epoch's last batch."""

    def __iter__(self):
        x, y = digits_tensors(48)
        return iter(zip(x.split(16), y.split(16)))


def test_an_epoch_of_unknown_length_without_a_step_warns_naming_every_n_steps():
    cladec = ClaDec(every_n_steps=6)
    val = digit_loaders()[1]
    with pytest.warns(UserWarning, match="every_n_steps=6"):
        fit([cladec], loaders=(DataLoader(Stream(), batch_size=None), val))
    assert cladec.steps == 0


# ---------------------------------------------------------------------------------------------------- precision
@pytest.mark.parametrize("precision", ["64-true", "bf16-true", "bf16-mixed"])
def test_every_precision_fits_and_logs_finite_scalars(precision):
    cladec = ClaDec(alpha=0.5, every_n_steps=2)
    trainer = fit([cladec], precision=precision)
    values = scalars(trainer, "")
    assert {"cladec/rec_loss", "cladec/ce_on_recon", "refae/rec_loss", "cladec/skipped"} <= set(values)
    assert all(math.isfinite(v) for k, v in values.items() if k.startswith(("cladec/", "refae/")))
    assert cladec.steps == 3 and all(p.dtype == torch.float32 for p in cladec.core.parameters())


# ---------------------------------------------------------------------------------------------------- outputs
class DictOutput(SmallCNN):
    def forward(self, x):
        logits = super().forward(x)
        return {"embedding": logits.detach() * 0, "logits": logits}

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0])["logits"], batch[1])

    def validation_step(self, batch, batch_idx):
        self(batch[0])


class TensorOutput(SmallCNN):
    def validation_step(self, batch, batch_idx):
        self(batch[0])


def test_dict_outputs_need_output_fn_and_with_it_match_a_tensor_output():
    with pytest.raises(OutputFormatError, match=r"keys \['embedding', 'logits'\].*output_fn"):
        fit([ClaDec(alpha=0.5, every_n_steps=2)], model=DictOutput)
    with_fn = fit([ClaDec(alpha=0.5, every_n_steps=2, output_fn=lambda out: out["logits"])], model=DictOutput)
    plain = fit([ClaDec(alpha=0.5, every_n_steps=2)], model=TensorOutput)
    got, want = scalars(with_fn), scalars(plain)
    assert got.keys() == want.keys() and "cladec/acc_on_recon" in got
    assert all(got[k] == pytest.approx(want[k], rel=1e-6) for k in want)


class TokenModel(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(50, 8), nn.Sequential(nn.Flatten(), nn.Linear(8 * 6, 16), nn.ReLU(),
                                                                   nn.Linear(16, 3))

    def forward(self, ids):
        return self.head(self.embed(ids))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_token_ids_fail_at_the_first_batch_with_a_clear_message():
    ids, y = torch.randint(0, 50, (32, 6)), torch.randint(0, 3, (32,))
    cladec = ClaDec(every_n_steps=1)
    with pytest.raises(TypeError, match="token ids"):
        fit([cladec], model=TokenModel, loaders=(DataLoader(TensorDataset(ids, y), batch_size=8), None))
    assert cladec.batches_seen == 0 and cladec.steps == 0


def token_loaders(n=96, batch_size=16):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (n, 6), generator=g)
    y = (ids[:, 0] % 3).long()  # learnable: the first token's id decides the class
    data = TensorDataset(ids, y)
    return DataLoader(data, batch_size=batch_size), DataLoader(TensorDataset(ids[:32], y[:32]), batch_size=16)


class TokenClassifier(TokenModel):
    def validation_step(self, batch, batch_idx):
        self(batch[0])


@pytest.mark.parametrize("activation_mode", ["train", "eval"])
def test_token_ids_are_explained_through_the_embedding_with_input_layer(activation_mode):
    cladec = ClaDec(alpha=0.3, every_n_steps=1, input_layer="embed", activation_mode=activation_mode, probe_size=2)
    trainer = fit([cladec], model=TokenClassifier, loaders=token_loaders(), epochs=2)
    values = scalars(trainer, "")
    assert {"cladec/rec_loss", "cladec/acc_on_recon", "refae/rec_loss", "cladec/rec_ratio"} <= set(values)
    assert all(math.isfinite(v) for k, v in values.items() if k.startswith(("cladec/", "refae/")))
    model, ids = trainer.lightning_module, torch.randint(0, 50, (4, 6))
    out = cladec.explain(ids)
    with torch.no_grad():
        assert torch.equal(out.original, model.embed(ids))
    assert out.cladec.shape == out.refae.shape == (4, 6, 8) and cladec.steps == 12
    # the decoder learnt something: it rebuilds the embeddings better than their mean does
    x = cladec.examples.inputs
    rebuilt = cladec.explain(x)
    baseline = ((rebuilt.original - rebuilt.original.mean(0)) ** 2).mean()
    assert ((rebuilt.cladec - rebuilt.original) ** 2).mean() < baseline
