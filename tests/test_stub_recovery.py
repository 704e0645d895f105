"""A Python-backend stub process killed mid-run: what the client sees, and recovery.

Measured on Triton 2.51 (the pytriton wheel), and asserted here:

* without the watchdog (``restart_stubs=False``) the server never recovers: every request to
  the ensemble fails after about 1 s with INTERNAL "Stub process '<model>_0_0' is not
  healthy", while the server and the model keep reporting READY;
* with it (the default of TritonServer and ``wff serve``) the model is reloaded with a new
  stub within a few seconds; requests in between fail with that same INTERNAL error (the
  client raises BackendDown, saying to retry), none hangs, and every request after the
  reload succeeds.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from conftest import write_dicom_patient

from wff.client.grpc_client import AsyncDiagnosisClient, BackendDown, DiagnosisClient, DiagnosisError, read_patient_files
from wff.serving.repository import build_repository
from wff.serving.server import RELOAD_ATTEMPTS, ServerError, TritonServer

RECOVERY_LIMIT_S = 20.0  # kill to first success; measured about 2.5 s on the 2-core development machine
FAILED_REQUEST_LIMIT_S = 5.0  # a request that meets a dead stub fails within this (measured about 1 s)
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def repository(tiny_artifacts, tmp_path_factory):
    return build_repository(tmp_path_factory.mktemp("stub-kill") / "repository", "embedded", tiny_artifacts)


@pytest.fixture(scope="module")
def server(repository):
    """Repository API restricted, as on a network address: the watchdog's reloads carry the secret header."""
    with TritonServer(repository, grpc_port=0, http_port=0, metrics_port=0, restrict_repository_api=True) as s:
        yield s


@pytest.fixture(scope="module")
def files(dicom_patient):
    return read_patient_files(dicom_patient)


def kill_stub(server: TritonServer, model: str) -> int:
    """SIGKILL one backend stub of ``model`` (the first, when it has several instances); returns its pid."""
    pid = min(pid for pid, name in server.stub_pids().items() if name == model)
    os.kill(pid, signal.SIGKILL)
    return pid


def diagnose_until_recovered(client: DiagnosisClient, files, server: TritonServer, restarts: int, started: float):
    """Send the patient until the watchdog has reloaded the model (restart number ``restarts + 1``) and a
    diagnosis comes back. Returns (seconds from ``started``, the errors met, each failed request's duration).
    A model with several instances may answer from a live one meanwhile."""
    errors, durations = [], []
    while time.monotonic() - started < RECOVERY_LIMIT_S:
        reloaded = len(server.stub_restarts) > restarts
        sent = time.monotonic()
        try:
            client.diagnose(files)
            if reloaded:
                return time.monotonic() - started, errors, durations
        except DiagnosisError as e:
            errors.append(e)
            durations.append(time.monotonic() - sent)
        time.sleep(0.1)
    pytest.fail(f"not recovered within {RECOVERY_LIMIT_S} s of the kill; errors: {[str(e) for e in errors[-3:]]}")


@pytest.mark.server
class TestWatchdog:
    @pytest.mark.parametrize("model", ["preprocess", "detector", "fusion"])
    def test_killed_stub_is_replaced(self, server, files, model):
        """The client sees BackendDown (INTERNAL, naming the stub) until the model is reloaded, then diagnoses again."""
        with DiagnosisClient(server.grpc_url, timeout_s=TIMEOUT_S) as client:
            client.diagnose(files)
            restarts = len(server.stub_restarts)
            old = kill_stub(server, model)
            recovered_s, errors, durations = diagnose_until_recovered(client, files, server, restarts, time.monotonic())
            for _ in range(3):
                client.diagnose(files)
        assert recovered_s < RECOVERY_LIMIT_S
        assert all(isinstance(e, BackendDown) and e.status == "INTERNAL" and f"'{model}_0_" in str(e) for e in errors), errors
        assert all(d < FAILED_REQUEST_LIMIT_S for d in durations), durations
        assert [(r["model"], r["ok"]) for r in server.stub_restarts[restarts:]] == [(model, True)]
        assert old not in server.stub_pids() and server.is_healthy()
        print(f"\n{model}: recovered {recovered_s:.2f} s after the kill; {len(errors)} failed requests "
              f"of {max(durations, default=0):.2f} s at most; reload {server.stub_restarts[-1]['reload_s']} s")

    def test_kill_with_requests_in_flight(self, server, files, tmp_path):
        """Eight patients in flight when the preprocess stub dies: each one answers (diagnosis or error), nothing hangs."""
        big = read_patient_files(write_dicom_patient(tmp_path / "big", {"SAG T1": 12, "SAG T2": 12}, size=160))

        async def run():
            async with AsyncDiagnosisClient(server.grpc_url, timeout_s=TIMEOUT_S) as client:
                async def one():
                    try:
                        await client.diagnose(big)
                        return "ok"
                    except DiagnosisError as e:
                        return e
                tasks = [asyncio.create_task(one()) for _ in range(8)]
                await asyncio.sleep(0.3)
                kill_stub(server, "preprocess")
                return await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT_S)

        restarts = len(server.stub_restarts)
        outcomes = asyncio.run(run())
        failed = [o for o in outcomes if o != "ok"]
        assert all(isinstance(e, BackendDown) for e in failed), failed
        with DiagnosisClient(server.grpc_url, timeout_s=TIMEOUT_S) as client:
            recovered_s, _, _ = diagnose_until_recovered(client, files, server, restarts, time.monotonic())
        print(f"\nin flight: {len(outcomes) - len(failed)} diagnosed, {len(failed)} BackendDown; recovered in {recovered_s:.2f} s")


@pytest.mark.server
def test_without_watchdog_triton_does_not_recover(repository, files):
    """Triton 2.51 alone: after the kill every request fails with INTERNAL while the model still reports READY."""
    with TritonServer(repository, grpc_port=0, http_port=0, metrics_port=0, restart_stubs=False) as server:
        with DiagnosisClient(server.grpc_url, timeout_s=TIMEOUT_S) as client:
            client.diagnose(files)
            kill_stub(server, "preprocess")
            time.sleep(3 * 0.5 + 2.0)  # longer than the watchdog would need to notice and reload
            for _ in range(3):
                with pytest.raises(BackendDown, match="'preprocess_0_0' of the server has died"):
                    client.diagnose(files)
            assert client.is_ready() and server.is_ready()  # Triton's readiness does not see the dead stub
        assert not server.is_healthy() and server.dead_stubs() == {"preprocess": 1} and server.stub_restarts == []


@pytest.mark.server
def test_server_stops_when_the_model_cannot_be_reloaded(repository, files, monkeypatch):
    """Reloads that keep failing: after RELOAD_ATTEMPTS the watchdog stops tritonserver (readiness no longer
    answers 200) and ``failure`` names the model, instead of a server that reports ready while every request fails."""

    def broken_reload(self, model):
        raise ServerError(f"reloading model {model!r} failed (test)")

    monkeypatch.setattr(TritonServer, "reload_model", broken_reload)
    with TritonServer(repository, grpc_port=0, http_port=0, metrics_port=0) as server:
        with DiagnosisClient(server.grpc_url, timeout_s=TIMEOUT_S) as client:
            client.diagnose(files)
        kill_stub(server, "preprocess")
        deadline = time.monotonic() + RECOVERY_LIMIT_S
        while server.is_running() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not server.is_running() and not server.is_ready()
        assert [(r["model"], r["ok"]) for r in server.stub_restarts] == [("preprocess", False)] * RELOAD_ATTEMPTS
        assert "'preprocess' could not be reloaded" in server.failure
