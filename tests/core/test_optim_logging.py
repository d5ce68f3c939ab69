import pytest
import torch
from torch import nn

from lightning_xai._core import owned_step


def test_owned_step_updates_only_its_parameters_through_a_shared_graph():
    user = nn.Linear(3, 2)
    user.weight.grad = torch.full_like(user.weight, 7.0)  # pretend the user has accumulated gradients
    before = [p.detach().clone() for p in user.parameters()]
    mine = nn.Linear(3, 3)
    opt = torch.optim.SGD(mine.parameters(), lr=0.1)
    w0 = mine.weight.detach().clone()
    loss = user(mine(torch.randn(4, 3))).pow(2).sum()  # gradient flows through the user's module
    assert owned_step(loss, list(mine.parameters()), opt)
    assert not torch.equal(mine.weight, w0)
    assert all(torch.equal(p, b) for p, b in zip(user.parameters(), before))
    assert torch.equal(user.weight.grad, torch.full_like(user.weight, 7.0)) and user.bias.grad is None


def test_owned_step_skips_non_finite_gradients():
    mine = nn.Linear(2, 1)
    opt = torch.optim.SGD(mine.parameters(), lr=0.1)
    w0 = mine.weight.detach().clone()
    loss = mine(torch.tensor([[float("nan"), 1.0]])).sum()
    assert not owned_step(loss, list(mine.parameters()), opt)
    assert torch.equal(mine.weight, w0)


def test_logger_without_images_warns_once(tmp_path):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from lightning_xai._core import logging as xlog

    trainer = L.Trainer(logger=CSVLogger(tmp_path), accelerator="cpu")
    xlog._warned.discard("CSVLogger")
    with pytest.warns(UserWarning, match="CSVLogger cannot store images") as record:
        xlog.log_image(trainer, "x/img", torch.zeros(3, 4, 4))
        xlog.log_image(trainer, "x/img", torch.zeros(3, 4, 4))
    assert sum("CSVLogger" in str(w.message) for w in record) == 1
