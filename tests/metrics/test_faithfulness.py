"""Faithfulness metrics: properties on models whose true attributions are known, metric/functional agreement, DDP."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_xai.metrics import CompletenessResidual, DeletionAUC, Infidelity, InsertionAUC
from lightning_xai.metrics.functional import (
    completeness_residual,
    deletion_auc,
    gaussian_blur,
    infidelity,
    insertion_auc,
    perturbation_curve,
)

D = 12  # features of the tabular examples


def linear_model(d: int = D, classes: int = 3, seed: int = 0) -> tuple[nn.Linear, torch.Tensor]:
    """A bias-free float64 linear classifier with positive weights, and its weight matrix (classes, d)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(d, classes, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.rand(classes, d, generator=g, dtype=torch.float64) + 0.1)
    return model, model.weight.detach().clone()


def binary_model(d: int = D, seed: int = 0) -> tuple[nn.Linear, torch.Tensor]:
    """Two classes, the second logit always 0: the probability of class 0 is sigmoid(w·x), monotone in w·x."""
    model, w = linear_model(d, 2, seed)
    with torch.no_grad():
        model.weight[1].zero_()
    return model, model.weight[0].detach().clone()


def positive_inputs(b: int = 6, d: int = D, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, d, generator=g, dtype=torch.float64) + 0.05


class TinyCNN(nn.Module):
    def __init__(self, channels: int = 3, classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 5, 3, padding=1)
        self.norm = nn.BatchNorm2d(5)
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(5 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(torch.relu(self.norm(self.conv(x)))).flatten(1))


# ------------------------------------------------------------------------------------------------ perturbation curves
def reference_deletion_logits(w: torch.Tensor, x: torch.Tensor, steps: int) -> torch.Tensor:
    """Deletion curves of f(x) = w·x (zero baseline) by sorting the contributions, one example at a time."""
    n = x.shape[1]
    rows = []
    for xi in x:
        contrib = (w * xi).sort(descending=True).values
        rows.append(torch.stack([contrib[(2 * k * n + steps) // (2 * steps) :].sum() for k in range(steps + 1)]))
    return torch.stack(rows)


@pytest.mark.parametrize("steps", [4, 5, D])
def test_deletion_curve_of_linear_model_matches_sorted_contributions(steps):
    model, w = linear_model()
    x = positive_inputs()
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    attribution = w[target] * x
    curve = perturbation_curve(model, x, attribution, target, steps=steps, score="logit")
    assert curve.shape == (6, steps + 1)
    expected = torch.stack([reference_deletion_logits(w[t], x[i : i + 1], steps)[0] for i, t in enumerate(target)])
    torch.testing.assert_close(curve, expected, rtol=0, atol=1e-12)


def test_curves_start_and_end_at_input_and_baseline_scores():
    model, w = linear_model()
    x = positive_inputs()
    target = torch.tensor([0, 1, 2, 2, 1, 0])
    baseline = torch.full((D,), 0.3, dtype=torch.float64)
    attribution = w[target] * x
    with torch.no_grad():
        p_x = model(x).softmax(1).gather(1, target[:, None]).squeeze(1)
        p_base = model(baseline.expand_as(x)).softmax(1).gather(1, target[:, None]).squeeze(1)
    deletion = perturbation_curve(model, x, attribution, target, baseline=baseline)
    insertion = perturbation_curve(model, x, attribution, target, mode="insertion", baseline=baseline)
    torch.testing.assert_close(deletion[:, 0], p_x)
    torch.testing.assert_close(deletion[:, -1], p_base)
    torch.testing.assert_close(insertion[:, 0], p_base)
    torch.testing.assert_close(insertion[:, -1], p_x)
    assert ((deletion >= 0) & (deletion <= 1)).all()


@pytest.mark.parametrize("score", ["prob", "logit"])
def test_true_ordering_beats_reversed_and_random_orderings(score):
    model, w = binary_model()
    x = positive_inputs(b=16)
    truth = w * x  # all contributions positive
    reverse = -truth
    random = torch.rand(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    kw = dict(steps=D, score=score)

    del_true, del_rev, del_rand = (deletion_auc(model, x, a, 0, **kw) for a in (truth, reverse, random))
    ins_true, ins_rev, ins_rand = (insertion_auc(model, x, a, 0, **kw) for a in (truth, reverse, random))
    # removing the largest contributions first is pointwise optimal, so every example obeys the order
    assert (del_true <= del_rand + 1e-12).all() and (del_rand <= del_rev + 1e-12).all()
    assert (ins_true >= ins_rand - 1e-12).all() and (ins_rand >= ins_rev - 1e-12).all()
    assert del_true.mean() < del_rand.mean() < del_rev.mean()
    assert ins_true.mean() > ins_rand.mean() > ins_rev.mean()


def test_auc_is_the_trapezoid_of_the_curve():
    model, w = linear_model()
    x = positive_inputs()
    curve = perturbation_curve(model, x, w[1] * x, 1, steps=6)
    by_hand = (curve[:, :-1] + curve[:, 1:]).sum(1) / 2 / 6
    torch.testing.assert_close(deletion_auc(model, x, w[1] * x, 1, steps=6), by_hand)
    constant = torch.ones(2, 7)
    from lightning_xai.metrics.functional import _auc

    torch.testing.assert_close(_auc(constant), torch.ones(2))


def test_images_move_whole_pixels_ranked_by_channel_sum():
    torch.manual_seed(0)
    model = TinyCNN().double().eval()
    x = torch.rand(3, 3, 4, 4, dtype=torch.float64)
    attribution = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    target = torch.tensor([0, 3, 1])
    curve = perturbation_curve(model, x, attribution, target, steps=16, score="logit")
    for i in range(3):
        order = attribution[i].sum(0).flatten().argsort(descending=True, stable=True)
        expected = []
        for k in range(17):
            keep = torch.ones(16, dtype=torch.float64)
            keep[order[:k]] = 0
            with torch.no_grad():
                expected.append(model((x[i] * keep.view(1, 4, 4))[None])[0, target[i]])
        torch.testing.assert_close(curve[i], torch.stack(expected), rtol=0, atol=1e-12)


def test_chunking_gives_the_same_curves_and_modes_are_restored():
    torch.manual_seed(0)
    model = TinyCNN().double().train()
    model.norm.eval()  # a user-frozen BatchNorm must stay frozen
    x = torch.rand(5, 3, 4, 4, dtype=torch.float64)
    attribution = torch.randn_like(x)
    kw = dict(mode="insertion", steps=7, baseline="blur", blur=1.0)
    full = perturbation_curve(model, x, attribution, 2, **kw)
    chunked = perturbation_curve(model, x, attribution, 2, batch_size=3, **kw)
    torch.testing.assert_close(full, chunked, rtol=0, atol=1e-12)  # dropout was off, batch statistics unused
    assert model.training and model.conv.training and model.drop.training and not model.norm.training
    assert not full.requires_grad


def test_blur_baseline_is_a_blurred_copy():
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    blurred = gaussian_blur(x, 1.5)
    assert blurred.shape == x.shape
    assert blurred.var(dim=(2, 3)).lt(x.var(dim=(2, 3))).all()
    torch.testing.assert_close(blurred.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=0.05, rtol=0)
    torch.testing.assert_close(gaussian_blur(torch.full((1, 2, 5, 7), 0.7)), torch.full((1, 2, 5, 7), 0.7))
    # channels are blurred independently
    torch.testing.assert_close(gaussian_blur(x[:, :1], 1.5), blurred[:, :1])

    model = TinyCNN().double().eval()
    x4 = x[:, :, :4, :4]
    curve = perturbation_curve(model, x4, torch.randn_like(x4), 1, mode="insertion", baseline="blur", blur=1.5)
    with torch.no_grad():
        start = model(gaussian_blur(x4, 1.5)).softmax(1)[:, 1]
        end = model(x4).softmax(1)[:, 1]
    torch.testing.assert_close(curve[:, 0], start)
    torch.testing.assert_close(curve[:, -1], end)


# ------------------------------------------------------------------------------------------------------ completeness
def test_completeness_of_linear_attribution_and_of_linearization():
    model, w = linear_model()
    x = positive_inputs()
    with torch.no_grad():
        out = model(x)[:, 2]
    assert completeness_residual(w[2] * x, out, torch.zeros(6)).max() < 1e-12
    # F(x) = W·x + b: Σ W⊙x against F(x) − b(x)
    b = torch.randn(6, dtype=torch.float64)
    assert completeness_residual(w[2] * x, out + b, b).max() < 1e-12
    wrong = completeness_residual(w[1] * x, out, 0.0)
    torch.testing.assert_close(wrong, ((w[1] - w[2]) * x).sum(1).abs() / out.abs())
    assert wrong.min() > 1e-3
    # a zero delta does not divide by zero
    assert torch.isfinite(completeness_residual(torch.ones(2, 3), torch.zeros(2), torch.zeros(2))).all()


# --------------------------------------------------------------------------------------------------------- infidelity
def test_infidelity_is_zero_for_the_gradient_of_a_linear_model():
    model, w = linear_model()
    x = positive_inputs()
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    gradient = w[target]
    g = torch.Generator().manual_seed(0)
    assert infidelity(model, x, gradient, target, n_perturb=20, generator=g).max() < 1e-25
    wrong = infidelity(model, x, w[target] * x, target, n_perturb=20, generator=g)
    assert wrong.min() > 1e-4
    # a rescaled gradient is unfaithful, unless normalize applies the optimal beta
    assert infidelity(model, x, 3 * gradient, target, generator=g).min() > 1e-3
    assert infidelity(model, x, 3 * gradient, target, generator=g, normalize=True).max() < 1e-25


def test_infidelity_matches_formula_and_is_reproducible():
    torch.manual_seed(0)
    model = TinyCNN().double().eval()
    x = torch.rand(4, 3, 4, 4, dtype=torch.float64)
    phi = torch.randn_like(x)
    target = torch.tensor([0, 1, 2, 3])
    n, std = 6, 0.2

    noise = torch.randn((n, *x.shape), generator=torch.Generator().manual_seed(7), dtype=torch.float64) * std
    with torch.no_grad():
        fx = model(x).gather(1, target[:, None]).squeeze(1)
        delta = torch.stack([fx - model(x - noise[p]).gather(1, target[:, None]).squeeze(1) for p in range(n)])
    predicted = (noise * phi).flatten(2).sum(2)
    expected = (predicted - delta).square().mean(0)
    beta = (predicted * delta).mean(0) / predicted.square().mean(0)
    expected_normalized = (beta * predicted - delta).square().mean(0)

    def run(**kw):
        g = torch.Generator().manual_seed(7)
        return infidelity(model, x, phi, target, n_perturb=n, noise_std=std, generator=g, **kw)

    torch.testing.assert_close(run(), expected, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(run(batch_size=5), expected, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(run(normalize=True), expected_normalized, rtol=1e-10, atol=1e-14)
    assert torch.equal(run(), run())


# -------------------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(mode="delete"), "'delete'.*'deletion', 'insertion'"),
        (dict(score="probability"), "'probability'.*'prob', 'logit'"),
        (dict(steps=0), "steps=0"),
        (dict(batch_size=-2), "batch_size=-2"),
        (dict(baseline="zeros"), "'zeros'.*'blur'"),
        (dict(blur=2.0), "blur=2.0"),
        (dict(baseline="blur", blur=-1.0), "blur=-1.0"),
    ],
)
def test_perturbation_curve_rejects_bad_arguments(kwargs, match):
    model, w = linear_model()
    x = positive_inputs()
    with pytest.raises(ValueError, match=match):
        perturbation_curve(model, x, x, 0, **kwargs)


def test_other_bad_arguments_raise_value_errors():
    model, w = linear_model()
    x = positive_inputs()
    with pytest.raises(ValueError, match="baseline='blur' needs images"):
        perturbation_curve(model, x, x, 0, baseline="blur")
    with pytest.raises(ValueError, match=r"attribution has shape \(6, 3\)"):
        deletion_auc(model, x, x[:, :3], 0)
    with pytest.raises(ValueError, match=r"target has shape \(2,\)"):
        insertion_auc(model, x, x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="n_perturb=0"):
        infidelity(model, x, x, 0, n_perturb=0)
    with pytest.raises(ValueError, match="noise_std=-0.1"):
        infidelity(model, x, x, 0, noise_std=-0.1)
    with pytest.raises(ValueError, match=r"output has shape \(5,\)"):
        completeness_residual(x, torch.zeros(5), 0.0)
    with pytest.raises(ValueError, match="steps=0"):
        DeletionAUC(steps=0)
    with pytest.raises(ValueError, match="'smooth'"):
        InsertionAUC(baseline="smooth")
    with pytest.raises(ValueError, match="n_perturb=-1"):
        Infidelity(n_perturb=-1)
    with pytest.raises(ValueError, match="eps=0"):
        CompletenessResidual(eps=0)


# ----------------------------------------------------------------------------------------------------------- metrics
def batches():
    model, w = linear_model()
    xs = [positive_inputs(b, seed=s) for b, s in ((4, 1), (3, 2), (5, 3))]
    targets = [torch.arange(len(x)) % 3 for x in xs]
    return model, w, xs, targets


def test_metric_classes_equal_the_mean_of_the_functional_over_batches():
    model, w, xs, targets = batches()
    attributions = [w[t] * x for x, t in zip(xs, targets)]
    x_all, t_all, a_all = torch.cat(xs), torch.cat(targets), torch.cat(attributions)
    assert not DeletionAUC.higher_is_better and InsertionAUC.higher_is_better
    assert not CompletenessResidual.higher_is_better and not Infidelity.higher_is_better

    for metric, fn, mode in (
        (DeletionAUC(steps=6), deletion_auc, "deletion"),
        (InsertionAUC(steps=6), insertion_auc, "insertion"),
    ):
        for x, a, t in zip(xs, attributions, targets):
            metric.update(model, x, a, t)
        torch.testing.assert_close(metric.compute().double(), fn(model, x_all, a_all, t_all, steps=6).mean())
        curve = perturbation_curve(model, x_all, a_all, t_all, mode=mode, steps=6).mean(0)
        torch.testing.assert_close(metric.curve().double(), curve)
        metric.reset()
        metric.update(model, xs[0], attributions[0], targets[0])
        torch.testing.assert_close(
            metric.compute().double(), fn(model, xs[0], attributions[0], targets[0], steps=6).mean()
        )

    residual = CompletenessResidual()
    outputs = [model(x).detach().gather(1, t[:, None]).squeeze(1) * 1.1 for x, t in zip(xs, targets)]
    for a, out in zip(attributions, outputs):
        residual.update(a, out, torch.zeros(()))
    expected = completeness_residual(a_all, torch.cat(outputs), 0.0)
    torch.testing.assert_close(residual.compute().double(), expected.mean())
    torch.testing.assert_close(residual.compute_max().double(), expected.max())
    residual.reset()
    assert residual.compute_max() == 0


def test_infidelity_metric_uses_a_seeded_stream_restarted_on_reset():
    model, w, xs, targets = batches()
    phi = [w[t] * x for x, t in zip(xs, targets)]  # not the gradient: positive infidelity
    metric = Infidelity(n_perturb=5, noise_std=0.3, seed=11, batch_size=4)
    for x, a, t in zip(xs, phi, targets):
        metric.update(model, x, a, t)
    first = metric.compute()

    g = torch.Generator().manual_seed(11)
    expected = torch.cat(
        [infidelity(model, x, a, t, n_perturb=5, noise_std=0.3, generator=g) for x, a, t in zip(xs, phi, targets)]
    ).mean()
    torch.testing.assert_close(first.double(), expected)
    assert first > 0

    metric.reset()
    for x, a, t in zip(xs, phi, targets):
        metric.update(model, x, a, t)
    assert torch.equal(metric.compute(), first)


def test_merged_states_compute_the_metric_over_all_data():
    """DDP reduces states with their ``dist_reduce_fx``; ``merge_state`` applies the same reductions."""
    model, w, xs, targets = batches()
    attributions = [w[t] * x for x, t in zip(xs, targets)]
    outputs = [model(x).detach().gather(1, t[:, None]).squeeze(1) * 1.2 for x, t in zip(xs, targets)]
    outputs[1] = outputs[1] * 3  # the worst example lives on the second "rank"

    def fill(metric_cls, kwargs, parts):
        metric = metric_cls(**kwargs)
        for i in parts:
            if metric_cls is CompletenessResidual:
                metric.update(attributions[i], outputs[i], 0.0)
            else:
                metric.update(model, xs[i], attributions[i], targets[i])
        return metric

    for metric_cls, kwargs in (
        (DeletionAUC, dict(steps=5)),
        (InsertionAUC, dict(steps=5, baseline=0.2)),
        (CompletenessResidual, {}),
        (Infidelity, dict(seed=None)),
    ):
        torch.manual_seed(3)
        whole = fill(metric_cls, kwargs, [0, 1, 2])
        torch.manual_seed(3)
        rank0, rank1 = fill(metric_cls, kwargs, [0, 2]), fill(metric_cls, kwargs, [1])
        if metric_cls is Infidelity:  # the global noise stream differs once the batches are split: compare states
            expected = ((rank0.infidelity_sum + rank1.infidelity_sum) / 12).float()
        else:
            expected = whole.compute()
        rank0.merge_state(rank1)
        torch.testing.assert_close(rank0.compute(), expected)
        for name in rank0._defaults:
            reduce = rank0._reductions[name].__name__
            combined = getattr(rank0, name)
            assert reduce in ("dim_zero_sum", "dim_zero_max"), name
            assert combined.dtype == torch.float64
        if metric_cls is CompletenessResidual:
            torch.testing.assert_close(rank0.compute_max(), whole.compute_max())
        if metric_cls in (DeletionAUC, InsertionAUC):
            torch.testing.assert_close(rank0.curve(), whole.curve())
        assert rank0.count == 12


def _ddp_worker(rank: int, port: int, results: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model, w, xs, targets = batches()
        parts = [[0, 2], [1]][rank]
        deletion, residual = DeletionAUC(steps=4), CompletenessResidual()
        for i in parts:
            deletion.update(model, xs[i], w[targets[i]] * xs[i], targets[i])
            residual.update(w[targets[i]] * xs[i], torch.full((len(xs[i]),), float(i + 1)), 0.0)
        torch.save(
            dict(auc=deletion.compute(), curve=deletion.curve(), mean=residual.compute(), max=residual.compute_max()),
            os.path.join(results, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_ddp_sync_over_two_gloo_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the workers inherit the imported modules (spawn would re-import lightning, seconds per process)
    torch.multiprocessing.start_processes(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, start_method="fork")

    model, w, xs, targets = batches()
    x_all, t_all = torch.cat(xs), torch.cat(targets)
    outputs = torch.cat([torch.full((len(x),), float(i + 1)) for i, x in enumerate(xs)])
    residuals = completeness_residual(w[t_all] * x_all, outputs, 0.0)
    auc = deletion_auc(model, x_all, w[t_all] * x_all, t_all, steps=4).mean()
    curve = perturbation_curve(model, x_all, w[t_all] * x_all, t_all, steps=4).mean(0)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["auc"].double(), auc, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got["curve"].double(), curve, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got["mean"].double(), residuals.mean(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got["max"].double(), residuals.max(), rtol=1e-6, atol=1e-7)
