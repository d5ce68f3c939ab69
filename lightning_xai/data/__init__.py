"""Lightning data modules: embedded scikit-learn datasets and optional torchvision datasets.

:class:`DigitsDataModule` and :class:`BreastCancerDataModule` use data that ship with scikit-learn, so nothing is
downloaded at run time; :class:`TorchvisionDataModule` serves real image datasets when torchvision is installed.
"""

from __future__ import annotations

from lightning_xai.data.breast_cancer import BreastCancerDataModule
from lightning_xai.data.digits import DigitsDataModule
from lightning_xai.data.vision import TorchvisionDataModule

__all__ = ["BreastCancerDataModule", "DigitsDataModule", "TorchvisionDataModule"]
