"""wff soak: a short run of the soak (the 10-minute one is run by hand, see README), and its pass rules."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from wff.cli import main
from wff.client.grpc_client import read_patient_files
from wff.loadtest.soak import MIB, SoakReport, bad_variants, find_server_pid, trend_growth
from wff.processes import child_pids, process_name

SHORT_SOAK_MINUTES = 0.3  # 18 s of requests


@pytest.mark.server
def test_short_soak_passes(tiny_artifacts, dicom_patient, tmp_path):
    """6 s of warm-up and 18 s at concurrency 4 on its own server: every good request diagnosed, every bad one of each kind
    rejected, memory sampled."""
    out = tmp_path / "soak.json"
    args = ["soak", "--artifacts", str(tiny_artifacts), "--patient", str(dicom_patient), "--minutes", str(SHORT_SOAK_MINUTES), "--warmup-minutes", "0.1",
            "--concurrency", "4", "--bad-fraction", "0.4", "--sample-every", "1", "--set", "serving.server_malloc=glibc", "--json", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["passed"] and report["good_failed"] == 0 and report["good_ok"] > 10
    assert report["bad_rejected"] == report["bad_sent"] > 10
    assert set(report["bad_by_kind"]) == set(bad_variants(read_patient_files(dicom_patient)))
    assert report["memory_start_bytes"] > 50 * MIB and report["memory_growth_bytes"] is not None and report["server_alive"]
    assert report["server_allocator"] == "glibc"  # the --set override reached the server
    assert len(report["memory_samples"]) >= 20 and report["memory_samples"][0][0] < 6 <= report["memory_samples"][-1][0] - 18
    print(f"\n{result.output}")


@pytest.mark.server
def test_sigterm_stops_the_soaks_own_server(tiny_artifacts, dicom_patient):
    """SIGTERM to `wff soak` that started its own tritonserver stops that server too (it runs in its own session)."""
    proc = subprocess.Popen([sys.executable, "-m", "wff", "soak", "--artifacts", str(tiny_artifacts), "--patient", str(dicom_patient),
                             "--minutes", "5", "--warmup-minutes", "0", "--concurrency", "1", "--set", "serving.server_malloc=glibc"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if "tritonserver ready" in line:
                break
        servers = [pid for pid in child_pids(proc.pid) if process_name(pid) == "tritonserver"]
        assert len(servers) == 1, servers
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 10
        while Path(f"/proc/{servers[0]}").exists() and process_name(servers[0]) == "tritonserver" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert process_name(servers[0]) != "tritonserver", "tritonserver left running after wff soak was terminated"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()


@pytest.mark.server
def test_finds_the_server_process(limited_server):
    """The tritonserver behind a gRPC port is found from /proc, so --url soaks sample its memory too."""
    assert find_server_pid(limited_server.grpc_port) == limited_server.process.pid


class TestTrendGrowth:
    def test_steady_climb_is_growth(self):
        """1 MiB per 10 s over 100 s is 10 MiB of growth, whatever the level."""
        samples = [(t, 500 * MIB + t * MIB // 10) for t in range(0, 101, 5)]
        assert trend_growth(samples) == pytest.approx(10 * MIB, rel=1e-6)

    def test_one_spike_is_not_a_leak(self):
        """A flat series with one high sample (a large request held at that moment) stays far below the limit."""
        samples = [(t, 700 * MIB) for t in range(0, 600, 5)]
        samples[60] = (300, 900 * MIB)
        assert abs(trend_growth(samples)) < 2 * MIB

    def test_too_few_samples(self):
        """Two samples cannot tell a trend."""
        assert trend_growth([(0, 1), (5, 2)]) is None


class TestPassRules:
    def report(self, **changes) -> SoakReport:
        base = dict(duration_s=60, concurrency=2, good_sent=10, good_ok=10, bad_sent=5, bad_rejected=5, memory_growth_bytes=MIB)
        return SoakReport(**{**base, **changes})

    def test_clean_run_passes(self):
        """All good diagnosed, all bad rejected, little growth: passed."""
        assert self.report().passed

    @pytest.mark.parametrize("changes", [
        {"good_ok": 9, "good_failed": 1}, {"bad_rejected": 4, "bad_accepted": 1}, {"bad_rejected": 4, "bad_other_error": 1},
        {"server_alive": False}, {"memory_growth_bytes": 65 * MIB}, {"good_ok": 0, "good_sent": 0},
    ])
    def test_each_failure_fails(self, changes):
        """A failed good request, an accepted or mis-answered bad one, a dead server, growth over 64 MiB or no diagnosis at all fail."""
        assert not self.report(**changes).passed

    def test_needs_good_patients(self):
        """Without --dataset or --patient the command says what to give."""
        result = CliRunner().invoke(main, ["soak", "--url", "127.0.0.1:1"])
        assert result.exit_code == 2 and "give good patients" in result.output
