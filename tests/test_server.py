"""The real tritonserver (nvidia-pytriton wheel) on an embedded repository built from stand-in artifacts.

One server serves the module; tests that count metrics take differences, so their order does
not matter. Served results are compared with the in-process pipeline at PARITY_ATOL.
TestTritonStep checks the adapter base against a fake triton_python_backend_utils, no server.
"""

import asyncio
import importlib
import json
import os
import signal
import subprocess
import sys
import time
import types
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from wff.client.metrics import fetch_metrics, per_model
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
from click.testing import CliRunner
from conftest import TINY, embedded_server, wait_for, write_dicom_patient

from wff.cli import main
from wff.client.grpc_client import DiagnosisClient, RejectedInput, read_patient_files
from wff.contracts import ENSEMBLE_NAME, contracts_for
from wff.ensemble.pipeline import Pipeline
from wff.ensemble.types import InputError
from wff.serving.repository import build_repository
from wff.processes import child_pids, free_port, process_name, stop_process_group

C = contracts_for(TINY)
PARITY_ATOL = 1e-5  # same code, same ONNX Runtime settings; only float summation order may differ
STARTUP_LIMIT_S = 60.0
METRICS_SETTLE_S = 5.0
LOG_SETTLE_S = 5.0


server = embedded_server("served")


@pytest.fixture(scope="module")
def client(server):
    with DiagnosisClient(server.grpc_url, timeout_s=60) as c:
        yield c


def request_counts(server) -> dict[str, int]:
    """nv_inference_request_success + failure per model, from the metrics endpoint."""
    return {model: int(c.get("success", 0) + c.get("failure", 0)) for model, c in per_model(fetch_metrics(server.metrics_url)).items()}


@pytest.mark.server
class TestServer:
    def test_ready_with_every_model(self, server):
        """The server is ready within the limit and every step plus the ensemble is READY."""
        assert server.is_ready() and server.startup_s < STARTUP_LIMIT_S
        with grpcclient.InferenceServerClient(server.grpc_url) as c:
            index = {m.name: m.state for m in c.get_model_repository_index().models}
        assert index == {name: "READY" for name in [s.name for s in C.steps] + [ENSEMBLE_NAME]}

    def test_diagnosis_matches_in_process_pipeline(self, client, tiny_artifacts, dicom_patient):
        """A patient's served outputs equal the in-process pipeline's, field by field."""
        files = read_patient_files(dicom_patient)
        served = client.diagnose(files, age=None)
        local = Pipeline.from_artifacts(tiny_artifacts, threads=1).diagnose_files(files, None)
        assert served.label == local.label and len(served.series_m) == 3 and len(served.slice_d) == 15
        assert served.age_used == 60 and served.notes["age_source"] == "PatientAge"
        for name in ("p_malignant", "series_m", "series_regions", "slice_d", "slice_score", "slice_box", "age_a"):
            np.testing.assert_allclose(getattr(served, name), getattr(local, name), atol=PARITY_ATOL, err_msg=name)
        np.testing.assert_array_equal(served.series_votes, local.series_votes)
        assert served.series_info == local.series_info

    def test_request_age_overrides_dicom(self, client, dicom_patient):
        """AGE_YEARS in the request replaces PatientAge."""
        dx = client.diagnose(read_patient_files(dicom_patient), age=30.0)
        assert dx.age_used == 30 and dx.notes["age_source"] == "request"

    @pytest.mark.parametrize(
        "files, age, match",
        [
            ([("IM1.dcm", b"not a dicom file")], None, r"DICOM_FILES\[0\] \(IM1.dcm\)"),
            (None, 200.0, "AGE_YEARS"),
            (None, float("nan"), "AGE_YEARS"),
        ],
    )
    def test_bad_request_is_rejected_and_server_keeps_serving(self, client, dicom_patient, files, age, match):
        """Bad DICOM or age -> INVALID_ARGUMENT naming the input; the next patient is still diagnosed."""
        with pytest.raises(RejectedInput, match=match):
            client.diagnose(files or read_patient_files(dicom_patient), age)
        assert client.diagnose(read_patient_files(dicom_patient)).label in ("benign", "malignant")

    def test_step_reports_inconsistent_inputs_as_internal(self, server):
        """Called directly with tensors that disagree on the slice count, crop answers INTERNAL (steps' tensors
        disagreeing is a bug, not the patient's files) and logs the cause; the server keeps serving."""
        s, k = TINY.image.size, TINY.detector.top_k
        arrays = {
            "crop_slices": np.zeros((3, 1, s, s), np.float32),
            "crop_slice_series": np.zeros(3, np.int32),
            "crop_boxes": np.zeros((2, k, 4), np.float32),
            "crop_scores": np.zeros((3, k), np.float32),
            "crop_count": np.zeros((3, 1), np.int32),
        }
        inputs = []
        for spec in C.crop.inputs:
            inputs.append(grpcclient.InferInput(spec.name, list(arrays[spec.name].shape), spec.wire_dtype))
            inputs[-1].set_data_from_numpy(arrays[spec.name])
        with grpcclient.InferenceServerClient(server.grpc_url) as c:
            with pytest.raises(Exception, match="crop: internal error") as e:
                c.infer("crop", inputs)
        assert "INTERNAL" in str(e.value.status())
        # the stub's log line reaches the server log a moment after the reply
        assert wait_for(lambda: "crop_boxes has 2 rows for 3 slices" in server.log_file.read_text(), LOG_SETTLE_S)
        assert server.is_healthy()

    def test_concurrent_detector_requests_are_split_back(self, server):
        """Requests merged by the dynamic batcher each get their own slices' outputs."""
        s = TINY.image.size
        batches = [np.full((n, 1, s, s), v, np.float32) for n, v in ((3, 0.1), (1, 0.5), (5, 0.9), (2, 0.3))]

        async def run():
            async with grpcclient_aio.InferenceServerClient(server.grpc_url) as c:
                async def one(x):
                    tensor = grpcclient_aio.InferInput("detector_image", list(x.shape), "FP32")
                    tensor.set_data_from_numpy(x)
                    return (await c.infer("detector", [tensor])).as_numpy("detector_malignancy")
                return await asyncio.gather(*(one(x) for x in batches))

        for x, malignancy in zip(batches, asyncio.run(run())):
            assert malignancy.shape == (len(x), TINY.detector.top_k)
            np.testing.assert_allclose(malignancy, x[0].mean(), atol=1e-5)

    def test_metrics_count_each_model(self, server, client, dicom_patient):
        """One diagnosis adds exactly one request to the ensemble and to each of its five steps."""
        models = [s.name for s in C.steps] + [ENSEMBLE_NAME]
        files = read_patient_files(dicom_patient)
        before = request_counts(server)
        client.diagnose(files)
        deadline = time.monotonic() + METRICS_SETTLE_S  # a step's statistics land just after its response
        while True:
            after = request_counts(server)
            added = {m: after.get(m, 0) - before.get(m, 0) for m in models}
            if all(added.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert added == {m: 1 for m in models}


@pytest.mark.server
class TestClientCommands:
    def test_diagnose_json(self, server, dicom_patient):
        """wff diagnose --json - prints the diagnosis as JSON."""
        result = CliRunner().invoke(main, ["diagnose", str(dicom_patient), "--url", server.grpc_url, "--json", "-"])
        assert result.exit_code == 0, result.output
        data = json.loads(result.output)
        assert data["diagnosis"] in ("benign", "malignant") and len(data["series"]) == 3

    def test_diagnose_rejected_age(self, server, dicom_patient):
        """An age out of range exits 1 with the server's reason."""
        result = CliRunner().invoke(main, ["diagnose", str(dicom_patient), "--url", server.grpc_url, "--age", "300"])
        assert result.exit_code == 1 and "AGE_YEARS" in result.output

    def test_evaluate_split(self, server, tmp_path):
        """wff evaluate scores the six strategies; a broken patient is counted, the others' results are written, and the exit code is 1."""
        rows = ["patient_id,label,age,location,split"]
        for i, label in enumerate(("benign", "malignant", "malignant")):
            write_dicom_patient(tmp_path / f"P{i}", {"SAG T2": 4, "SAG T1": 4}, seed=i)
            rows.append(f"P{i},{label},{40 + 10 * i},lumbar,test")
        (tmp_path / "P3").mkdir()
        (tmp_path / "P3" / "IM1.dcm").write_bytes(b"broken")
        rows.append("P3,benign,50,lumbar,test")
        (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
        args = ["evaluate", str(tmp_path), "--url", server.grpc_url, "--concurrency", "2", "--json", str(tmp_path / "m.json"), "--csv", str(tmp_path / "p.csv")]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and "1 of 4 patients failed" in result.output, result.output
        data = json.loads((tmp_path / "m.json").read_text())
        assert (data["patients"], data["errors"]) == (4, 1) and data["seconds_per_patient"] > 0
        assert list(data["strategies"]) == ["Det", "Det-Age", "Seq", "Seq-Age", "Det-Seq", "Det-Seq-Age", "Det-Seq-Age (paper λ)"]
        assert "Det-Seq-Age" in result.output and "Det-Seq-Age (paper λ)" in result.output and "P3:" in result.output
        assert len((tmp_path / "p.csv").read_text().splitlines()) == 5


@pytest.mark.server
def test_serve_command_stops_on_sigterm(tiny_artifacts, tmp_path):
    """wff serve --artifacts builds, serves until SIGTERM, then exits 0."""
    ports = [str(free_port()) for _ in range(3)]
    args = [sys.executable, "-m", "wff", "serve", "--artifacts", str(tiny_artifacts), "--startup-timeout", str(STARTUP_LIMIT_S),
            "--grpc-port", ports[0], "--http-port", ports[1], "--metrics-port", ports[2]]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        started = []
        for line in proc.stdout:  # until wff serve says it serves (it exits by itself after --startup-timeout)
            started.append(line)
            if line.startswith("Ctrl-C to stop."):
                break
        assert proc.poll() is None, "".join(started)
        assert urllib.request.urlopen(f"http://127.0.0.1:{ports[1]}/v2/health/ready", timeout=2).status == 200
        proc.send_signal(signal.SIGTERM)
        out = "".join(started) + proc.communicate(timeout=30)[0]
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out
    assert f"127.0.0.1:{ports[0]}" in out and "metrics" in out


def fake_pb_utils() -> types.ModuleType:
    """Just enough of triton_python_backend_utils for TritonStep, recording responses as plain objects."""
    pb = types.ModuleType("triton_python_backend_utils")

    class TritonError:
        INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

        def __init__(self, message, code):
            self.message, self.code = message, code

    class Logger:
        lines: list = []
        log_info = log_warn = log_error = staticmethod(lambda msg: Logger.lines.append(msg))

    pb.TritonError, pb.Logger = TritonError, Logger
    pb.Tensor = lambda name, array: (name, array)
    pb.InferenceResponse = lambda output_tensors, error=None: types.SimpleNamespace(outputs=dict(output_tensors), error=error)
    pb.get_input_tensor_by_name = lambda request, name: None if name not in request else types.SimpleNamespace(as_numpy=lambda: request[name])
    pb.triton_string_to_numpy = lambda t: {"TYPE_FP32": np.float32, "TYPE_INT32": np.int32}[t]
    return pb


class TestTritonStep:
    @pytest.fixture
    def step(self, monkeypatch, tmp_path):
        """A batching 'doubler' step: x (B, 2) -> y = 2x; rows with a negative value are bad input; 99 is a bug."""
        monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils())
        module = importlib.reload(importlib.import_module("wff.serving.triton_step"))

        class Doubler(module.TritonStep):
            def setup(self):
                self.calls = []

            def run(self, inputs):
                x = inputs["x"]
                self.calls.append(len(x))
                if (x == 99).any():
                    raise RuntimeError("bug")
                if (x < 0).any():
                    raise InputError("x must be >= 0")
                return {"y": x * 2}

        config = {"max_batch_size": 8, "input": [{"name": "x"}], "output": [{"name": "y", "data_type": "TYPE_INT32"}],
                  "parameters": {"k": {"string_value": "v"}}}
        s = Doubler()
        s.initialize({"model_config": json.dumps(config), "model_name": "doubler", "model_repository": str(tmp_path), "model_version": "1"})
        yield s
        sys.modules.pop("wff.serving.triton_step", None)  # the next import gets the real backend utils again

    def test_merged_batch_is_split_back(self, step):
        """Three requests run as one call; each gets its own rows, in the config's dtype."""
        requests = [{"x": np.full((n, 2), n, np.int64)} for n in (1, 3, 2)]
        responses = step.execute(requests)
        assert step.calls == [6] and step.parameters == {"k": "v"} and step.version_dir.name == "1"
        for r, n in zip(responses, (1, 3, 2)):
            assert r.error is None and r.outputs["y"].shape == (n, 2) and (r.outputs["y"] == 2 * n).all()
            assert r.outputs["y"].dtype == np.int32

    def test_bad_request_fails_alone(self, step):
        """An InputError in the merged call reruns requests one by one; only the bad one gets INVALID_ARG."""
        responses = step.execute([{"x": np.ones((1, 2), np.int64)}, {"x": -np.ones((2, 2), np.int64)}])
        assert responses[0].error is None and (responses[0].outputs["y"] == 2).all()
        assert (responses[1].error.code, responses[1].error.message) == ("INVALID_ARG", "x must be >= 0")

    def test_unexpected_exception_is_internal_and_logged(self, step):
        """A bug answers INTERNAL without its message details, and the traceback goes to the log."""
        (response,) = step.execute([{"x": np.full((1, 2), 99, np.int64)}])
        assert response.error.code == "INTERNAL" and "RuntimeError" in response.error.message
        assert any("Traceback" in line for line in sys.modules["triton_python_backend_utils"].Logger.lines)


def test_serve_stops_a_starting_server_on_sigterm(tiny_artifacts, tmp_path):
    """SIGTERM while tritonserver is still starting (a stand-in that never gets ready): wff serve stops it at once and exits 0."""
    fake = tmp_path / "tritonserver"
    fake.write_text("#!/bin/sh\nexec sleep 300\n")
    fake.chmod(0o755)
    backends = tmp_path / "backends"
    (backends / "python").mkdir(parents=True)
    (backends / "python" / "triton_python_backend_stub").write_text("")
    args = [sys.executable, "-m", "wff", "serve", "--repository", str(build_repository(tmp_path / "repo", "embedded", tiny_artifacts)),
            "--tritonserver", str(fake), "--backend-directory", str(backends), "--server-malloc", "glibc",
            *(f"--{name}-port={free_port()}" for name in ("grpc", "http", "metrics"))]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + STARTUP_LIMIT_S
        while not [p for p in child_pids(proc.pid) if process_name(p) == "sleep"]:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else "no start"
            time.sleep(0.1)
        starting = [p for p in child_pids(proc.pid) if process_name(p) == "sleep"]
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        stopped_s = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0 and "SIGTERM while tritonserver was starting: stopped it" in out, out
    assert stopped_s < 10 and not [p for p in starting if Path(f"/proc/{p}").exists()]


class TestStopProcessGroup:
    """wff.processes.stop_process_group, which TritonServer.stop and the tests' Orthanc and gateway processes use."""

    @staticmethod
    def start(script: str) -> subprocess.Popen:
        process = subprocess.Popen(["bash", "-c", script], start_new_session=True, stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "ready"  # its traps are set
        return process

    @staticmethod
    def sleeping_child(process: subprocess.Popen) -> int:
        """The pid of the leader's background `sleep`, once it runs sleep (a forked child is bash until its exec)."""
        found = wait_for(lambda: [pid for pid in child_pids(process.pid) if process_name(pid) == "sleep"], 10, 0.01)
        assert found, "the background sleep did not start"
        return found[0]

    def test_sigterm_stops_the_whole_group(self):
        """The group's leader and its background child both get SIGTERM; no kill needed."""
        process = self.start("sleep 60 & echo ready; wait")
        child = self.sleeping_child(process)
        assert stop_process_group(process, 10) == (-signal.SIGTERM, False)
        assert wait_for(lambda: process_name(child) != "sleep", 10, 0.01)  # reaped by init, then gone

    def test_leader_only_leaves_its_children_to_it(self):
        """term_group=False: SIGTERM reaches the leader alone, so a child it does not stop outlives it."""
        process = self.start("sleep 60 & echo ready; wait")
        child = self.sleeping_child(process)
        try:
            assert stop_process_group(process, 10, term_group=False) == (-signal.SIGTERM, False)
            time.sleep(0.2)
            assert process_name(child) == "sleep"
        finally:
            os.killpg(process.pid, signal.SIGKILL)

    def test_a_process_ignoring_sigterm_is_killed(self):
        process = self.start("trap '' TERM; echo ready; while true; do sleep 0.1; done")
        started = time.monotonic()
        assert stop_process_group(process, 0.5) == (-signal.SIGKILL, True)
        assert time.monotonic() - started < 5

    def test_an_exited_process_is_only_reaped(self):
        process = subprocess.Popen(["true"], start_new_session=True)
        process.wait()
        assert stop_process_group(process, 0.1) == (0, False)
