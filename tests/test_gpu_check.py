"""python -m wff.training.gpu_check (scripts/gpu_check.sh): the paper profile's short GPU training and per-patient timing, run here on a CPU.

scripts/gpu_check.sh runs on a machine without the package installed; the end-to-end test runs the
script itself (its namespace bootstrap included) with --device cpu --tiny and reads the JSON back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from wff.training.gpu_check import JSON_NAME, TABLE_NAME, summarize_ms, time_models

ROOT = Path(__file__).resolve().parents[1]


class TestSummaries:
    def test_percentiles_by_hand(self):
        """1..20 seconds: p50 is 10.5 s, p95 19.05 s (linear interpolation), mean 10.5 s."""
        s = summarize_ms([float(i) for i in range(20, 0, -1)])
        assert s == {"p50_ms": 10500.0, "p95_ms": 19050.0, "mean_ms": 10500.0, "samples": 20}


class _Graph(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        return self.conv(x)


class _FailsUnderAutocast(nn.Module):
    def forward(self, x):
        if torch.is_autocast_enabled("cpu"):
            raise RuntimeError("no kernel for this dtype\nsecond line")
        return x.sum()


class TestTimeModels:
    def inputs(self):
        return [(torch.rand(3, 1, 8, 8), torch.rand(2, 1, 4, 4, 4)), (torch.rand(5, 1, 8, 8), torch.rand(1, 1, 4, 4, 4))]

    def test_every_patient_and_round_is_a_sample(self):
        """fp32 and bf16 (autocast on the CPU): 2 patients x 3 rounds = 6 positive samples per model."""
        messages = []
        out = time_models(_Graph(), nn.Conv3d(1, 1, 3), self.inputs(), "cpu", ("fp32", "bf16"), 3, messages.append)
        assert set(out) == {"fp32", "bf16"}
        for row in out.values():
            for model in ("detector", "classifier", "detector_plus_classifier"):
                assert row[model]["samples"] == 6 and 0 < row[model]["p50_ms"] <= row[model]["p95_ms"]
            assert row["detector_plus_classifier"]["mean_ms"] == pytest.approx(
                row["detector"]["mean_ms"] + row["classifier"]["mean_ms"], abs=0.02)
        assert len(messages) == 4  # one line per precision and model

    def test_a_failing_model_is_recorded_not_raised(self):
        """The classifier fails under bf16: its error is kept, the detector's bf16 times too, and no sum is made."""
        out = time_models(_Graph(), _FailsUnderAutocast(), self.inputs(), "cpu", ("fp32", "bf16"), 1, lambda m: None)
        assert "detector_plus_classifier" in out["fp32"]
        assert out["bf16"]["classifier"] == {"error": "RuntimeError: no kernel for this dtype"}
        assert out["bf16"]["detector"]["samples"] == 2 and "detector_plus_classifier" not in out["bf16"]


@pytest.mark.slow
def test_script_runs_the_paper_profile_tiny_on_cpu(tmp_path):
    """scripts/gpu_check.sh --device cpu --tiny: trains the paper architecture 2 steps per model at 64 px, times
    the two test patients, and writes the JSON and the table, importing wff from its own bootstrap folder."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "WFF_COMMIT": "abc1234"}
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--device", "cpu", "--tiny"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "out" / JSON_NAME).read_text())
    env_info = result["environment"]
    assert env_info["commit"] == "abc1234" and env_info["torch"] == torch.__version__ and env_info["card"].startswith("CPU")
    assert "wff-boot." in env_info["wff_package"] and not env_info["wff_package"].startswith(str(ROOT))
    assert result["profile"] == "paper" and result["image_size"] == 64
    training = result["training"]
    assert training["detector_steps"] == 2 and training["classifier_steps"] == 2
    assert training["detector_s"] > 0 and training["classifier_s"] > 0
    timing = result["timing"]
    assert timing["patients"] == 2 and timing["rounds"] == 1 and timing["slices_mean"] == 4
    assert list(timing["precisions"]) == ["fp32"]
    for model in ("detector", "classifier", "detector_plus_classifier"):
        row = timing["precisions"]["fp32"][model]
        assert row["samples"] == 2 and 0 < row["p50_ms"] <= row["p95_ms"]
    table = (tmp_path / "out" / TABLE_NAME).read_text()
    assert "paper profile on CPU" in table and "\nfp32 " in table
    assert table in (tmp_path / "out" / "gpu_check.log").read_text()  # the script's output, kept beside the results
    assert result["total_s"] >= training["detector_s"] + training["classifier_s"]
