"""torchvision and timm for tests, without breaking ``import lightning`` elsewhere.

The torchvision wheel that installs beside the CPU build of torch on these machines is built for CUDA: importing it
fails on ``torchvision::nms`` unless the two operator schemas are declared first (its model code is pure Python). And
once torchvision is importable from site-packages, torchmetrics imports it too, in every process. So CI installs
torchvision and timm into ``.vendor/`` (``pip install --no-deps --target .vendor ...``, see ``.ci/run``), outside the
import path, and tests that need them call :func:`torchvision_models` / :func:`timm_or_skip`, which declare the
missing operators and put ``.vendor`` on the path in this test process only.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

VENDOR = Path(__file__).resolve().parents[1] / ".vendor"


def _declare_torchvision_ops() -> None:
    for op in ("nms", "qnms"):
        try:
            getattr(torch.ops.torchvision, op)
        except (AttributeError, RuntimeError):
            schema = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
            if op == "qnms":
                schema = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
            torch.library.define(f"torchvision::{op}", schema)


def _import(name: str) -> ModuleType:
    """Import ``name`` with ``.vendor`` on the path for the import only: processes spawned later (DDP tests) copy
    ``sys.path``, and with ``.vendor`` on it their torchmetrics would import torchvision without the declarations."""
    _declare_torchvision_ops()
    added = VENDOR.is_dir() and str(VENDOR) not in sys.path
    if added:
        sys.path.append(str(VENDOR))
    try:
        return importlib.import_module(name)
    except Exception as error:  # noqa: BLE001 - any import failure means: not available here
        pytest.skip(f"{name} is not importable ({type(error).__name__}: {error}); .ci/run installs it into .vendor/")
    finally:
        if added:
            sys.path.remove(str(VENDOR))


def torchvision_models() -> ModuleType:
    """``torchvision.models`` (skips the test when torchvision is not available)."""
    _import("torchvision")
    return importlib.import_module("torchvision.models")


def timm_or_skip() -> ModuleType:
    """``timm`` (skips the test when it is not available)."""
    _import("torchvision")
    return _import("timm")
