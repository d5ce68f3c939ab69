"""benchmarks/real_models.py and benchmarks/device_check.py at their smallest settings: the tables they print hold
real figures, refusals and ratios; device_check's CPU dry run reaches every section."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import device_check  # noqa: E402
import real_models as rm  # noqa: E402


def _built(name: str) -> rm.Classifier:
    try:
        return rm.build_model(name)
    except rm.VendorMissing as error:
        pytest.skip(str(error))


def _cells(row: str) -> list[str]:
    return [cell.strip() for cell in row.strip().strip("|").split("|")]


def test_all_five_leaves_insens_out_of_a_smooth_network_only():
    vit, resnet = _built("vit"), _built("resnet18")
    callbacks, note = rm.make_callbacks("all", vit)
    assert [type(c).__name__ for c in callbacks] == ["GPEX", "ClaDec", "Linearization", "DMMMEN"]
    assert note == "Insens left out"
    callbacks, note = rm.make_callbacks("all", resnet)
    assert len(callbacks) == 5 and note == ""
    assert callbacks[-1].progress is False  # DMM-MEN without its progress bar


def test_the_vit_head_is_not_zero():
    vit = _built("vit").net.eval()
    out = vit(torch.rand(4, *rm.SHAPE))
    assert vit.heads.head.weight.abs().sum() > 0
    assert out.std(dim=0).max() > 1e-4  # outputs differ between inputs


def test_insens_on_a_vit_is_reported_as_refused():
    _built("vit")
    lines: list[str] = []
    results = rm.table(["vit"], ["insens"], n=64, epochs=1, echo=lines.append)
    assert results["vit", "insens"].refused  # the bare fit ran; Insens stopped at setup
    assert results["vit", "none"].error is None and len(results["vit", "none"].epochs) == 1
    (row,) = [line for line in lines if "insens" in line]
    assert _cells(row)[2].startswith("refused: ") and "error" not in row
    assert all("bare" not in line for line in lines[2:])  # the denominator was not asked for: not printed


@pytest.mark.slow
def test_the_table_has_ratios_to_the_bare_fit():
    _built("vit")
    lines: list[str] = []
    results = rm.table(["vit"], ["none", "linearization"], n=64, epochs=2, echo=lines.append, clock="cpu",
                       bare_twice=True)
    bare, lin = results["vit", "none"], results["vit", "linearization"]
    assert len(bare.epochs) == 2 and len(lin.epochs) == 2 and bare.error is None and lin.error is None
    assert all(s > 0 for s in bare.epochs + lin.epochs) and bare.fit >= sum(bare.epochs)
    rows = {(c := _cells(line))[1]: c for line in lines[2:]}
    assert rows["bare"][3] == "1.00" and rows["bare"][4] == "+0.00" and rows["bare"][6] == "1.00"
    assert float(rows["linearization"][3]) == pytest.approx(lin.epoch / bare.epoch, abs=0.01)
    assert float(rows["linearization"][4]) == pytest.approx(lin.epoch - bare.epoch, abs=0.01)
    again = results["vit", "none again"]
    assert len(again.epochs) == 2 and float(rows["bare, again"][3]) == pytest.approx(again.epoch / bare.epoch, abs=0.01)
    assert list(rows) == ["bare", "linearization", "bare, again"]


def test_linearize_dry_run_on_the_cpu_is_exact_and_gated_linear(capsys):
    _built("resnet18")
    device_check.linearize_table("cpu", batch=2, cases=["resnet18 float64", "vit float32"])
    rows = [_cells(line) for line in capsys.readouterr().out.splitlines() if line.startswith("| resnet18")
            or line.startswith("| vit")]
    modes = {(row[0], row[1]): row[2] for row in rows}
    assert modes == {("resnet18 float64", "off"): "exact", ("vit float32", "default"): "gated-linear",
                     ("vit float32", "off"): "gated-linear"}
    assert all(row[5] == "yes" and float(row[3]) < float(row[4]) for row in rows)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without a CUDA device")
def test_device_check_without_cuda_says_so_and_exits_0():
    done = subprocess.run([sys.executable, str(BENCHMARKS / "device_check.py")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0
    assert done.stdout.strip() == "no CUDA device: nothing to check"


@pytest.mark.slow
def test_main_job_dry_run_on_the_cpu_reports_status_and_scalars(capsys):
    rc = device_check.main_job("cpu", timeout=600, extra=["trainer.max_epochs=1", "callbacks=none"])
    out = capsys.readouterr().out
    assert rc == 0 and "exit status 0" in out and "trainer=cpu" in out
    scalars = " ".join(out.split("last logged scalars: ")[1].split())
    accuracy = float(scalars.split("val/acc = ")[1].split(",")[0])
    assert 0.0 <= accuracy <= 1.0
    assert "it/s]" not in out.split("Epoch")[0]  # progress-bar redraws are dropped from the tail


def test_readable_lines_drop_progress_redraws_but_keep_the_last_epoch_bar():
    output = ("start\nDMM-MEN sweeps:  5%| 5/100 [00:01<00:00, 500it/s]\x1b[A\r\x1b[A\n"
              "Epoch 0:  50%| 1/2 [00:01, 2.1it/s]\rEpoch 0: 100%| 2/2 [00:01, 2.2it/s, val/acc=0.5]\nRun folder: x")
    assert device_check.readable_lines(output) == [
        "start", "Epoch 0: 100%| 2/2 [00:01, 2.2it/s, val/acc=0.5]", "Run folder: x"]
