"""wff soak: a short run of the soak (the 10-minute one is run by hand, see README), and its pass rules."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from wff.cli import main
from wff.client.grpc_client import read_patient_files
from wff.client.soak import MIB, SoakReport, bad_variants, find_server_pid

SHORT_SOAK_MINUTES = 0.3  # 18 s of requests


@pytest.mark.server
def test_short_soak_passes(tiny_artifacts, dicom_patient, tmp_path):
    """18 s at concurrency 4 on its own server: every good request diagnosed, every bad one of each kind rejected, RSS sampled."""
    out = tmp_path / "soak.json"
    args = ["soak", "--artifacts", str(tiny_artifacts), "--patient", str(dicom_patient), "--minutes", str(SHORT_SOAK_MINUTES),
            "--concurrency", "4", "--bad-fraction", "0.4", "--sample-every", "1", "--json", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["passed"] and report["good_failed"] == 0 and report["good_ok"] > 10
    assert report["bad_rejected"] == report["bad_sent"] > 10
    assert set(report["bad_by_kind"]) == set(bad_variants(read_patient_files(dicom_patient)))
    assert report["rss_start_bytes"] > 50 * MIB and len(report["rss_samples"]) >= 10 and report["server_alive"]
    print(f"\n{result.output}")


@pytest.mark.server
def test_finds_the_server_process(limited_server):
    """The tritonserver behind a gRPC port is found from /proc, so --url soaks sample its memory too."""
    assert find_server_pid(limited_server.grpc_port) == limited_server.process.pid


class TestPassRules:
    def report(self, **changes) -> SoakReport:
        base = dict(duration_s=60, concurrency=2, good_sent=10, good_ok=10, bad_sent=5, bad_rejected=5, rss_growth_bytes=MIB)
        return SoakReport(**{**base, **changes})

    def test_clean_run_passes(self):
        """All good diagnosed, all bad rejected, little growth: passed."""
        assert self.report().passed

    @pytest.mark.parametrize("changes", [
        {"good_ok": 9, "good_failed": 1}, {"bad_rejected": 4, "bad_accepted": 1}, {"bad_rejected": 4, "bad_other_error": 1},
        {"server_alive": False}, {"rss_growth_bytes": 65 * MIB}, {"good_ok": 0, "good_sent": 0},
    ])
    def test_each_failure_fails(self, changes):
        """A failed good request, an accepted or mis-answered bad one, a dead server, growth over 64 MiB or no diagnosis at all fail."""
        assert not self.report(**changes).passed

    def test_needs_good_patients(self):
        """Without --dataset or --patient the command says what to give."""
        result = CliRunner().invoke(main, ["soak", "--url", "127.0.0.1:1"])
        assert result.exit_code == 2 and "give good patients" in result.output
