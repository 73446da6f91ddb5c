"""tests/gpu_check.py on the CPU: its cheapest part (encoder parity, fp32 and bf16 autocast, on the small
published-layout encoders it gives train.py, and the --precision probe) by default; the whole dry run
(`gpu_check.py --cpu`: train.py, torchrun, resume after a kill, --compile; ~4 min) when slow tests run."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoints
import gpu_check
import train
import u2a

ROOT = Path(__file__).resolve().parent.parent


def test_parity_lines_and_precision_probe(tmp_path, capsys):
    report = gpu_check.Report()
    weights = Path(checkpoints.save_run_encoders(tmp_path, u2a.ENCODER_FOLDERS["paper"], ["best", "recipe"]))
    gpu_check.parity(report, weights, torch.device("cpu"))
    assert gpu_check.precision_flag(report, "  --precision {bf16,fp16,fp32}", torch.device("cuda")) == \
        ["--precision", "bf16"]
    assert gpu_check.precision_flag(report, "  --compile", torch.device("cpu")) == []  # a FAIL line, no crash
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "PASS parity fp32 vit", "PASS parity bf16 vit", "PASS parity fp32 bert", "PASS parity bf16 bert",
        "PASS parity fp32 ast", "PASS parity bf16 ast", "PASS train.py --precision", "FAIL train.py --precision"]
    assert report.verdict(0.0) == 1
    assert capsys.readouterr().out.startswith("VERDICT: FAIL, 1 of 8 checks failed (train.py --precision)")


def test_a_parity_line_fails_when_ours_and_transformers_differ(tmp_path, capsys, monkeypatch):
    """The parity checks can fail: against a transformers model whose weights were moved, every line is FAIL."""
    weights = Path(checkpoints.save_run_encoders(tmp_path, u2a.ENCODER_FOLDERS["paper"], ["best", "recipe"]))
    real_reference = gpu_check.test_encoders.reference

    def moved(kind, directory):
        model = real_reference(kind, directory)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        return model
    monkeypatch.setattr(gpu_check.test_encoders, "reference", moved)
    report = gpu_check.Report()
    gpu_check.parity(report, weights, torch.device("cpu"))
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"FAIL parity {p} {kind}" for kind in ("vit", "bert", "ast")
                                                      for p in ("fp32", "bf16")]
    assert len(report.failed) == 6


@pytest.mark.slow
def test_dry_run_on_the_cpu():
    done = subprocess.run([sys.executable, "tests/gpu_check.py", "--cpu"], cwd=ROOT, capture_output=True, text=True)
    lines = done.stdout.splitlines()
    checks = {line.split(":")[0].split(" ", 1)[1]: line.split(" ", 1)[0] for line in lines
              if line.startswith(("PASS ", "FAIL "))}
    assert len(checks) == 11, done.stdout + done.stderr[-3000:]
    # --precision is another branch's: until it lands, its line fails and the runs use train.py's default
    assert all(v == "PASS" for k, v in checks.items() if k != "train.py --precision"), done.stdout
    assert lines[-1].startswith("VERDICT: ") and done.returncode == (checks["train.py --precision"] == "FAIL")
