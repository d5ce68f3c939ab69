"""The runnable examples run (briefly) and keep their promises."""

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parametric_tsne_learns_and_its_points_are_explained_exactly(tmp_path):
    tsne = load("parametric_tsne")
    net, x, labels, losses = tsne.train(steps=30)
    assert losses[-1] < 0.8 * losses[0]
    residual = tsne.explain_figure(net, x, labels, str(tmp_path / "tsne.png"))
    assert residual < 1e-5
    assert (tmp_path / "tsne.png").stat().st_size > 10_000
