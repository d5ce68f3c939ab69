"""Hydra entry point: train a classifier with explanation callbacks attached.

Run it as ``lightning-xai-train`` (console script) or ``python -m lightning_xai.train``; any key of the composed
config can be overridden on the command line, e.g.::

    lightning-xai-train 'callbacks=[cladec]' trainer.max_epochs=5 model=mlp data=breast_cancer

The configs ship inside the package (``lightning_xai/configs``). Every launch writes into its own run folder
(``runs/<date>_<time>`` by default, ``hydra.run.dir=...`` to choose), and the last line printed is the TensorBoard
command that shows the run.

:func:`train` is the reusable part: it takes a composed config and returns the final metrics, so tests and notebooks
can call it on ``hydra.compose(..., return_hydra_config=True)``.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from omegaconf import DictConfig, OmegaConf, read_write

__all__ = ["main", "train"]


def _is_rank_zero() -> bool:
    # Lightning reads the rank from the environment (RANK/LOCAL_RANK...) at import, so this also holds in DDP child
    # processes before the process group exists.
    return getattr(rank_zero_only, "rank", 0) == 0


def _say(message: str) -> None:
    if _is_rank_zero():
        print(message, flush=True)


def _use_hydra_node(cfg: DictConfig) -> None:
    """Make ``${hydra:...}`` resolvable for a config composed with ``return_hydra_config=True``.

    Inside ``@hydra.main`` the task config has no ``hydra`` node and Hydra has already set :class:`HydraConfig`;
    a composed config carries the node itself. Its ``runtime.output_dir`` is only filled by a real launch, so it
    defaults to ``hydra.run.dir`` here.
    """
    if "hydra" not in cfg:
        return
    if OmegaConf.is_missing(cfg.hydra.runtime, "output_dir"):
        with read_write(cfg.hydra):
            cfg.hydra.runtime.output_dir = os.path.abspath(str(cfg.hydra.run.dir))
    HydraConfig.instance().set_config(cfg)


def _run_dir() -> str:
    return str(HydraConfig.get().runtime.output_dir)


def _targets(node: Any) -> list[DictConfig]:
    """The instantiable configs of a group: the node itself if it has ``_target_``, else its children that do."""
    if node is None or not isinstance(node, Mapping):
        return []
    if "_target_" in node:
        return [node]
    return [child for child in node.values() if isinstance(child, Mapping) and "_target_" in child]


def _display_path(path: str) -> str:
    """``path`` relative to the working directory when it lies below it, else absolute; quoted for a shell."""
    path = os.path.abspath(path)
    rel = os.path.relpath(path, os.getcwd())
    return shlex.quote(path if rel.startswith("..") else rel)


def _inspect_line(run_dir: str, loggers: list[Logger]) -> str:
    if any(isinstance(lg, TensorBoardLogger) for lg in loggers):
        return f"Inspect this run: tensorboard --logdir {_display_path(run_dir)}"
    places = [
        os.path.join(lg.log_dir, "metrics.csv") if isinstance(lg, CSVLogger) else lg.log_dir or lg.save_dir or run_dir
        for lg in loggers
    ]
    if not places:
        return f"Inspect this run: {_display_path(run_dir)} (logger=none: no metrics were written)"
    return "Inspect this run: " + " ".join(_display_path(place) for place in places)


def _applicable(callbacks: list[L.Callback], model: L.LightningModule) -> list[L.Callback]:
    """The default callback set without the methods that cannot explain ``model`` (e.g. Insens on a network with
    smooth units), each dropped with one warning; a callback selected explicitly fails at set-up instead."""
    from lightning_xai._core.callback import explained_model

    kept = []
    for callback in callbacks:
        check = getattr(callback, "inapplicable_reason", None)
        reason = check(explained_model(model)) if check is not None else None
        if reason is None:
            kept.append(callback)
        else:
            rank_zero_warn(f"{type(callback).__name__} is skipped from the default callbacks: {reason}")
    return kept


def train(cfg: DictConfig) -> dict[str, float]:
    """Train ``cfg.model`` on ``cfg.data`` with ``cfg.callbacks`` and ``cfg.logger`` under ``cfg.trainer``.

    Args:
        cfg: A config composed from ``lightning_xai/configs/train.yaml`` (by ``@hydra.main`` or by
            ``hydra.compose(..., return_hydra_config=True)``).

    Returns:
        The scalar metrics the trainer holds after fitting (``trainer.callback_metrics``: ``val/loss``,
        ``val/acc``, ``train/loss`` and whatever the callbacks log), as floats.
    """
    _use_hydra_node(cfg)
    run_dir = _run_dir()
    _say(f"Run folder: {_display_path(run_dir)}")

    L.seed_everything(cfg.seed, workers=True)

    # _convert_="all": objects get plain lists/dicts, not omegaconf containers. _partial_ (then a call) instead of
    # instantiate(..., **kwargs): kwargs would be merged into the config first, turning tuples and objects into
    # omegaconf nodes.
    datamodule: L.LightningDataModule = instantiate(cfg.data, _convert_="all")
    # input_shape and num_classes always come from the datamodule, never from the model config
    model: L.LightningModule = instantiate(cfg.model, _partial_=True, _convert_="all")(
        input_shape=tuple(datamodule.input_shape), num_classes=int(datamodule.num_classes)
    )
    callbacks: list[L.Callback] = [instantiate(node, _convert_="all") for node in _targets(cfg.get("callbacks"))]
    if HydraConfig.get().runtime.choices.get("callbacks") == "default":
        callbacks = _applicable(callbacks, model)
    loggers: list[Logger] = [instantiate(node, _convert_="all") for node in _targets(cfg.get("logger"))]

    trainer: L.Trainer = instantiate(cfg.trainer, _partial_=True, _convert_="all")(
        callbacks=callbacks, logger=loggers if loggers else False
    )
    trainer.fit(model, datamodule=datamodule)

    metrics = {
        name: float(value)
        for name, value in trainer.callback_metrics.items()
        if value.numel() == 1
    }

    if trainer.is_global_zero:
        _say(f"Run folder: {_display_path(run_dir)}")
        _say(_inspect_line(run_dir, loggers))
    return metrics


@hydra.main(version_base="1.3", config_path="pkg://lightning_xai.configs", config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    train(cfg)


def main() -> None:
    """Console script ``lightning-xai-train``: parse Hydra overrides from the command line and train."""
    _hydra_main()


if __name__ == "__main__":
    main()
