"""The Hydra app: every shipped config composes, `train(cfg)` runs on tiny settings, the CLI and the wheel work."""

from __future__ import annotations

import csv
import glob
import importlib.resources
import importlib.util
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import read_events
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_xai.train import train

REPO = Path(__file__).resolve().parents[1]
CONFIG_MODULE = "lightning_xai.configs"
# One short epoch: enough to log val/acc (and every callback's end-of-validation metrics) once.
TINY = [
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
    "+trainer.num_sanity_val_steps=0",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
]


@pytest.fixture(autouse=True)
def _one_thread_and_no_hydra_leftovers():
    # These networks are tiny: one intra-op thread is faster, and immune to a busy second core.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    HydraConfig.instance().cfg = None  # _compose sets the global HydraConfig; leave none behind for other tests


def _compose(run_dir: Path, *overrides: str) -> DictConfig:
    """Compose train.yaml like `lightning-xai-train` would, with the run folder at ``run_dir``."""
    with initialize_config_module(version_base="1.3", config_module=CONFIG_MODULE):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    # A real launch fills hydra.runtime.output_dir; set it (and HydraConfig) so ${hydra:...} resolves.
    OmegaConf.set_readonly(cfg.hydra, False)
    cfg.hydra.run.dir = str(run_dir)
    cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


def _options(group: str) -> list[str]:
    folder = importlib.resources.files(CONFIG_MODULE) / group
    return sorted(entry.name[: -len(".yaml")] for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def _targets(node) -> list:
    if node is None:
        return []
    if "_target_" in node:
        return [node]
    return [child for child in node.values() if isinstance(child, DictConfig) and "_target_" in child]


def _events(folder: Path) -> list[str]:
    return glob.glob(str(folder / "**" / "events.out.tfevents.*"), recursive=True)


GROUPS = ["data", "model", "callbacks", "trainer", "logger", "experiment"]
GROUP_OPTIONS = [(group, option) for group in GROUPS for option in _options(group)]


def test_the_groups_hold_the_documented_options():
    assert {"digits", "breast_cancer", "mnist", "fashion_mnist", "cifar10"} <= set(_options("data"))
    assert {"cnn", "mlp"} <= set(_options("model"))
    assert {"default", "none", "cladec", "linearization", "insens", "dmmmen", "gpex"} <= set(_options("callbacks"))
    assert {"default", "cpu", "gpu", "ddp_cpu"} <= set(_options("trainer"))
    assert {"tensorboard", "csv", "none"} <= set(_options("logger"))
    assert {"quick", "cladec_alpha"} <= set(_options("experiment"))


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_config_composes_and_resolves(tmp_path, group, option):
    cfg = _compose(tmp_path, f"{group}={option}")
    # every interpolation of the app's own keys resolves, ${hydra:runtime.output_dir} included
    resolved = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in cfg if key not in ("hydra", "seed")}
    resolved["seed"] = cfg.seed
    assert resolved["seed"] == 0
    for name in ("data", "model", "trainer"):
        get_class(cfg[name]._target_)
    for name in ("callbacks", "logger"):
        for node in _targets(cfg.get(name)):
            get_class(node._target_)
    assert "input_shape" not in cfg.model and "num_classes" not in cfg.model  # they come from the datamodule
    if group == "logger" and option != "none":
        assert all(node.save_dir == str(tmp_path) for node in _targets(cfg.logger))


def test_callbacks_list_replaces_the_default_selection(tmp_path):
    # A user config group option (through hydra.searchpath) next to the shipped ones.
    (tmp_path / "user" / "callbacks").mkdir(parents=True)
    (tmp_path / "user" / "callbacks" / "lr_monitor.yaml").write_text(
        "lr_monitor:\n  _target_: lightning.pytorch.callbacks.LearningRateMonitor\n"
    )
    searchpath = f"hydra.searchpath=[file://{tmp_path / 'user'}]"
    assert set(_compose(tmp_path, searchpath).callbacks) == {"cladec", "linearization", "insens", "dmmmen", "gpex"}
    assert set(_compose(tmp_path, searchpath, "callbacks=[lr_monitor]").callbacks) == {"lr_monitor"}
    assert set(_compose(tmp_path, searchpath, "callbacks=[lr_monitor,cladec]").callbacks) == {"lr_monitor", "cladec"}
    assert set(_compose(tmp_path, "callbacks=[cladec]").callbacks) == {"cladec"}
    assert not _targets(_compose(tmp_path, "callbacks=none").get("callbacks"))


def test_experiments_override_the_defaults(tmp_path):
    quick = _compose(tmp_path, "experiment=quick", "seed=3")
    assert quick.trainer.max_epochs == 2 and quick.trainer.limit_train_batches > 0
    assert quick.data.seed == 3 and quick.callbacks.cladec.seed == 3
    alpha = _compose(tmp_path, "experiment=cladec_alpha")
    cladecs = _targets(alpha.callbacks)
    assert len(cladecs) == 2 and all(node._target_ == "lightning_xai.ClaDec" for node in cladecs)
    assert sorted(str(node.layer) for node in cladecs) == ["None", "features.7"]
    assert all(node.alpha == 0.5 for node in cladecs)


def test_default_config_trains_and_writes_tensorboard_scalars(tmp_path, capsys):
    metrics = train(_compose(tmp_path, *TINY))
    assert 0.0 <= metrics["val/acc"] <= 1.0 and metrics["val/loss"] > 0.0
    events = _events(tmp_path)
    assert len(events) == 1 and Path(events[0]).parent == tmp_path / "tensorboard"
    board = EventAccumulator(str(Path(events[0]).parent))
    board.Reload()
    assert {"val/acc", "val/loss"} <= set(board.Tags()["scalars"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("Inspect this run: tensorboard --logdir ") and last.endswith(tmp_path.name)


def test_mlp_on_breast_cancer_trains(tmp_path):
    metrics = train(_compose(tmp_path, "model=mlp", "data=breast_cancer", *TINY))
    assert 0.0 <= metrics["val/acc"] <= 1.0


def test_cladec_alpha_experiment_trains(tmp_path):
    metrics = train(_compose(tmp_path, "experiment=cladec_alpha", *TINY))
    assert "val/acc" in metrics


def test_no_callbacks_and_csv_logger(tmp_path, capsys):
    metrics = train(_compose(tmp_path, "callbacks=none", "logger=csv", *TINY))
    assert "val/acc" in metrics
    with open(tmp_path / "csv" / "metrics.csv", newline="") as handle:
        assert "val/acc" in next(csv.reader(handle))
    assert not _events(tmp_path)
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("metrics.csv")


def test_no_logger_and_a_plainly_composed_config(tmp_path):
    # train() itself fills hydra.runtime.output_dir from hydra.run.dir when the caller did not
    with initialize_config_module(version_base="1.3", config_module=CONFIG_MODULE):
        cfg = compose(
            "train", overrides=["callbacks=none", "logger=none", *TINY, f"hydra.run.dir='{tmp_path}'"],
            return_hydra_config=True,
        )
    metrics = train(cfg)
    assert "val/acc" in metrics
    assert not _events(tmp_path) and not (tmp_path / "csv").exists()
    assert list((tmp_path / "checkpoints").glob("*.ckpt"))  # trainer.default_root_dir is the run folder


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["OMP_NUM_THREADS"] = "1"  # tiny networks; keeps a busy second core from slowing the run down
    return env


def test_python_dash_m_entry_point(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_xai.train", "callbacks=none", *TINY, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env={**_clean_env(), "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "Inspect this run: tensorboard --logdir run"
    assert _events(run_dir) and (run_dir / ".hydra" / "config.yaml").exists()


@pytest.mark.slow
def test_ddp_cpu_prints_once(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_xai.train", "trainer=ddp_cpu", "callbacks=none", *TINY,
         f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env={**_clean_env(), "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Inspect this run:") == 1  # rank 1 prints nothing
    assert len(_events(run_dir)) == 1


def _run_or_show(command: list, **kwargs) -> subprocess.CompletedProcess:
    """Run ``command``; on a non-zero exit fail with the command and the tail of its stdout and stderr."""
    proc = subprocess.run([str(part) for part in command], capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, (
        f"{' '.join(str(part) for part in command)} exited with {proc.returncode}\n"
        f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"
    )
    return proc


def _venv_seeing_this_environment(venv: Path) -> Path:
    """A new venv at ``venv`` that also imports what the running interpreter's environment holds; its python.

    ``--system-site-packages`` would show the *base* interpreter's packages, which lack torch and the rest when the
    tests run from a venv. Instead a ``.pth`` file in the new venv lists the running environment's site-packages
    folders: they come after the venv's own on ``sys.path`` (an installed wheel wins), and the ``.pth`` files inside
    them are not run (an editable install of this repository stays invisible).
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = _run_or_show([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    folders = [*site.getsitepackages(), site.getusersitepackages() if site.ENABLE_USER_SITE else ""]
    lines = [folder for folder in dict.fromkeys(folders) if folder and os.path.isdir(folder)]
    Path(purelib, "_running_environment.pth").write_text("\n".join(lines) + "\n")
    return python


@pytest.mark.slow
def test_wheel_ships_the_configs_and_the_console_script(tmp_path):
    # Build from a fresh copy: setuptools keeps stale files in build/ and would pack them into the wheel.
    source = tmp_path / "source"
    shutil.copytree(REPO / "lightning_xai", source / "lightning_xai", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, source / name)
    wheels = tmp_path / "wheels"
    # The running environment's setuptools when it has one (no download); else pip's isolated build environment.
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    _run_or_show([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, source, "-w", wheels],
                 cwd=tmp_path, timeout=300)
    (wheel,) = wheels.glob("lightning_xai-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for config in ("train.yaml", "data/digits.yaml", "callbacks/default.yaml", "experiment/quick.yaml"):
        assert f"lightning_xai/configs/{config}" in names
    assert "lightning_xai/py.typed" in names  # type checkers read the package's hints (PEP 561)

    venv = tmp_path / "venv"
    env = _clean_env()
    python = _venv_seeing_this_environment(venv)
    # The running environment's pip (seen through the .pth file) installs into the venv; --force-reinstall so that an
    # install of the same version outside the venv (an editable one, say) never counts as already satisfied.
    _run_or_show([python, "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall", wheel],
                 cwd=tmp_path, env=env, timeout=300)
    where = _run_or_show(
        [python, "-c", "import lightning_xai, lightning_xai.configs as c; print(lightning_xai.__file__, *c.__path__)"],
        cwd=tmp_path, env=env,
    ).stdout.split()
    assert all(path.startswith(str(venv)) for path in where), where  # not the repo, not an editable install

    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [venv / "bin" / "lightning-xai-train", "experiment=quick", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip().splitlines()[-1] == "Inspect this run: tensorboard --logdir run"
    scalars, images = read_events(run_dir)  # the main job's event file holds ClaDec's scalars and images
    expected = {"val/acc", "cladec/rec_loss", "refae/rec_loss", "cladec/acc_on_recon", "refae/acc_on_recon",
                "linearization/residual_max", "linearization/deletion_auc_wx", "insens/deletion_auc_insens",
                "gpex/agreement", "gpex/pearson"}
    assert expected <= set(scalars)
    # experiment=quick: two validation epochs, one image per callback and epoch
    # DMMMEN reports every 5 epochs and after training: here only its final fit
    assert images == {"cladec/probes": 2, "linearization/probes": 2, "insens/probes": 2, "gpex/neighbours": 2,
                      "dmmmen/components": 1, "dmmmen/weights": 1}
    assert "dmmmen/final_r2" in scalars
