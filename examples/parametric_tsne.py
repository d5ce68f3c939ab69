"""Parametric t-SNE on digits, explained exactly: why does each point land where it does?

A ReLU network f: R^64 → R^2 is trained with the t-SNE objective (van der Maaten, "Learning a Parametric Embedding
by Preserving Local Structure", AISTATS 2009): input affinities P from Gaussian kernels calibrated to a perplexity,
embedding affinities Q from a Student-t kernel, loss KL(P‖Q). Because the network is piecewise-linear, each point's
embedding is exactly ``f(x) = W(x)·x + b(x)`` with ``W(x)`` a 2×64 matrix (:func:`lightning_xai.linearize`): row 1
says how each pixel moves the point along the first axis, row 2 along the second, and ``W⊙x`` is each pixel's exact
share of the point's coordinates (apart from ``b``). The script saves a figure with the embedding and, for one point
per class, both rows of ``W⊙x`` as 8×8 images, and prints the residual of the identity.

    python examples/parametric_tsne.py --steps 300 --out tsne.png
"""

from __future__ import annotations

import argparse
import math

import torch
from sklearn.datasets import load_digits
from torch import nn

from lightning_xai import linearize
from lightning_xai.viz import new_figure


def input_affinities(x: torch.Tensor, perplexity: float = 30.0, iterations: int = 50) -> torch.Tensor:
    """Symmetric t-SNE affinities P (N×N, summing to 1), each row's Gaussian width found by bisection on its entropy."""
    d2 = torch.cdist(x, x).pow(2)
    d2.fill_diagonal_(float("inf"))
    target = math.log(perplexity)
    low = torch.full((x.shape[0], 1), 1e-10, dtype=x.dtype)
    high = torch.full((x.shape[0], 1), 1e10, dtype=x.dtype)
    beta = torch.ones(x.shape[0], 1, dtype=x.dtype)
    for _ in range(iterations):
        p = torch.softmax(-d2 * beta, dim=1)
        entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(1, keepdim=True)
        too_flat = entropy > target  # too wide a kernel: raise beta
        low = torch.where(too_flat, beta, low)
        high = torch.where(too_flat, high, beta)
        beta = torch.where(high < 1e10, (low + high) / 2, beta * 2)
    p = torch.softmax(-d2 * beta, dim=1)
    p = (p + p.T) / (2 * x.shape[0])
    return p.clamp_min(1e-12)


def tsne_loss(y: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """KL(P‖Q) with the Student-t embedding affinities Q of one degree of freedom."""
    q = 1.0 / (1.0 + torch.cdist(y, y).pow(2))
    q = q * (1 - torch.eye(y.shape[0], dtype=y.dtype))
    q = (q / q.sum()).clamp_min(1e-12)
    return (p * (p.log() - q.log())).sum()


def embedding_network() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 2))


def train(steps: int, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor, list[float]]:
    torch.manual_seed(seed)
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(data.target)
    p = input_affinities(x.double()).float()
    net = embedding_network()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for step in range(steps):
        exaggeration = 4.0 if step < steps // 4 else 1.0  # early exaggeration, as in t-SNE
        loss = tsne_loss(net(x), p * exaggeration)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return net.eval(), x, labels, losses


def explain_figure(net: nn.Module, x: torch.Tensor, labels: torch.Tensor, path: str) -> float:
    """Save the embedding with each class's first point explained; return the largest relative residual."""
    with torch.no_grad():
        y = net(x)
    chosen = torch.stack([torch.nonzero(labels == c)[0, 0] for c in range(10)])
    lin = linearize(net, x[chosen])  # weight: (10 points, 2 axes, 64 pixels)
    residual = float(lin.residual(x[chosen]).max())
    contributions = lin.contributions(x[chosen])  # W⊙x: each pixel's exact share of each coordinate (minus b)

    figure = new_figure(13, 6)
    grid = figure.add_gridspec(4, 9)  # scatter on the left, 5×4 tiles on the right
    ax = figure.add_subplot(grid[:, :4])
    ax.scatter(y[:, 0], y[:, 1], c=labels, cmap="tab10", s=4)
    for i, index in enumerate(chosen.tolist()):
        ax.annotate(str(i), y[index].tolist(), fontsize=12, weight="bold")
    ax.set_title("parametric t-SNE of digits (numbers: explained points)")
    limit = float(contributions.abs().max())
    for i in range(10):
        for axis in range(2):
            sub = figure.add_subplot(grid[(i // 5) * 2 + axis, 4 + i % 5])
            sub.imshow(contributions[i, axis].view(8, 8), cmap="RdBu_r", vmin=-limit, vmax=limit)
            sub.set_xticks([])
            sub.set_yticks([])
            if axis == 0:
                sub.set_title(f"{i}: W⊙x axis 1 / axis 2", fontsize=7)
    figure.savefig(path)
    return residual


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="parametric_tsne.png")
    args = parser.parse_args()
    net, x, labels, losses = train(args.steps)
    residual = explain_figure(net, x, labels, args.out)
    print(f"KL {losses[0]:.3f} -> {losses[-1]:.3f}; max relative residual of W·x + b = f(x): {residual:.2e}")
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
