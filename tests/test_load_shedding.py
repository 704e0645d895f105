"""Load shedding through a real tritonserver: bounded step queues reject a flood fast, and the server keeps serving.

Each server here has one instance per step and a tiny queue policy, so a burst of concurrent
patients overflows it at once: either every step holds at most one waiting request
("Exceeds maximum queue size"), or a request may wait at most 100 ms in a step's queue
("Request timeout expired"). The client is asked not to retry, so every rejection is seen.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
from conftest import serve_embedded

from wff.client.grpc_client import AsyncDiagnosisClient, DiagnosisClient, ServerBusy, read_patient_files
from wff.config import load_profile
from wff.ensemble.diagnosis import Diagnosis

FLOOD = 24  # concurrent patients, far beyond what one instance per step and the tiny queues hold
TIMEOUT_S = 60  # client timeout: a request that waits this long is the unbounded latency shedding prevents
REJECTED_WITHIN_S = 5.0  # a shed request is answered within this (measured: ~0.03 s queue full, ~0.2 s timeout)
ONE_INSTANCE = {"instances_python": 1, "instances_detector": 1, "instances_classifier": 1}
POLICIES = {
    "queue full": ({"max_queue_size": 1, "queue_timeout_us": 0}, "Exceeds maximum queue size"),
    "queue timeout": ({"max_queue_size": 0, "queue_timeout_us": 100_000}, "Request timeout expired"),
}


@pytest.fixture(scope="module", params=list(POLICIES))
def shedding_server(request, limited_artifacts, tmp_path_factory):
    """(server, the message Triton sheds with) for one tiny queue policy."""
    queue, message = POLICIES[request.param]
    serving = dataclasses.replace(load_profile(limited_artifacts / "profile.json").serving, **ONE_INSTANCE, **queue)
    for server in serve_embedded(limited_artifacts, tmp_path_factory, "shedding", serving=serving):
        yield server, message


def flood(url: str, files, retries: int) -> list[tuple[Diagnosis | Exception, float]]:
    """FLOOD requests of ``files`` at once: (diagnosis or the exception raised, seconds) of each."""

    async def one(client):
        started = time.monotonic()
        try:
            outcome = await client.diagnose(files)
        except Exception as e:  # every outcome is checked by the caller
            outcome = e
        return outcome, time.monotonic() - started

    async def run():
        async with AsyncDiagnosisClient(url, timeout_s=TIMEOUT_S, retries=retries) as client:
            return await asyncio.gather(*(one(client) for _ in range(FLOOD)))

    return asyncio.run(run())


@pytest.mark.server
class TestLoadShedding:
    def test_flood_is_shed_fast_and_the_server_keeps_serving(self, shedding_server, dicom_patient):
        """Some requests of the flood are diagnosed, the others rejected fast with UNAVAILABLE; none waits unboundedly."""
        server, message = shedding_server
        files = read_patient_files(dicom_patient)
        started = time.monotonic()
        outcomes = flood(server.grpc_url, files, retries=0)
        wall = time.monotonic() - started
        diagnosed = [s for o, s in outcomes if isinstance(o, Diagnosis)]
        shed = [(o, s) for o, s in outcomes if isinstance(o, ServerBusy)]
        others = [o for o, _ in outcomes if not isinstance(o, (Diagnosis, ServerBusy))]
        assert not others, others[:3]
        assert diagnosed and shed, (len(diagnosed), len(shed))
        for error, seconds in shed:
            assert error.status == "UNAVAILABLE" and message in str(error) and "[1 attempt in" in str(error)
            assert seconds < REJECTED_WITHIN_S, (seconds, str(error))
        assert wall < TIMEOUT_S / 2
        with DiagnosisClient(server.grpc_url, timeout_s=TIMEOUT_S, retries=0) as client:
            assert client.diagnose(files).label in ("benign", "malignant")
        assert server.is_healthy()

    def test_retrying_client_reports_its_attempts(self, shedding_server, dicom_patient):
        """With retries, every request of the flood ends diagnosed or shed after all its attempts, within the timeout."""
        server, message = shedding_server
        retries = 3
        outcomes = flood(server.grpc_url, read_patient_files(dicom_patient), retries=retries)
        for outcome, seconds in outcomes:
            assert isinstance(outcome, (Diagnosis, ServerBusy)), outcome
            assert seconds < TIMEOUT_S
            if isinstance(outcome, ServerBusy):
                assert outcome.attempts == retries + 1 and f"[{retries + 1} attempts in" in str(outcome) and message in str(outcome)
        assert any(isinstance(o, Diagnosis) for o, _ in outcomes)
