"""docker/entrypoint.sh run for real, on the nvidia-pytriton wheel's tritonserver instead of the image's.

The container runs tritonserver under ``wff serve``: a Python-backend stub killed in the
entrypoint's process tree is replaced (Triton alone reports ready while every request to that
model fails, see test_stub_recovery.py), and SIGTERM to the entrypoint stops tritonserver and
its stubs. The entrypoint gets the wheel's binary (WFF_TRITONSERVER), a backend directory made
by prepare_backends (WFF_TRITON_BACKENDS), an embedded repository from the stand-in artifacts,
and free loopback ports.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from wff.client.grpc_client import DiagnosisClient, DiagnosisError, read_patient_files
from wff.processes import child_pids, free_port, process_name
from wff.serving.server import STUB_NAME, prepare_backends, stub_model, wheel_tritonserver

ENTRYPOINT = Path(__file__).resolve().parents[1] / "docker" / "entrypoint.sh"
READY_LIMIT_S = 120.0  # repository build plus tritonserver start (about 10 s here)
RECOVERY_LIMIT_S = 20.0  # kill to first diagnosis; the watchdog needs about 3 s here
STOP_LIMIT_S = 20.0  # SIGTERM to exit with nothing in flight (measured about 3 s; the container's exit timeout is 30 s)
TIMEOUT_S = 30


def http_ready(port: int) -> int | None:
    """Status of /v2/health/ready (None when nothing answers)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def alive(pid: int) -> bool:
    """The process exists and is not a zombie waiting for its parent."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def tritonserver_of(entry_pid: int) -> int:
    """The tritonserver process under the entrypoint (the entrypoint has exec'd wff serve, its parent)."""
    found = [p for p in child_pids(entry_pid) if process_name(p) == "tritonserver"]
    assert len(found) == 1, f"tritonserver processes under the entrypoint: {found}"
    return found[0]


def stubs_of(server_pid: int) -> dict[int, str]:
    """pid -> model of every backend stub of tritonserver ``server_pid``."""
    return {p: stub_model(p) for p in child_pids(server_pid, recursive=False) if process_name(p) == STUB_NAME}


@contextlib.contextmanager
def serving_entrypoint(artifacts: Path, tmp: Path):
    """`entrypoint.sh serve` running and ready; yields (process, ports, log path). Killed with its descendants at the end."""
    binary, libs = wheel_tritonserver()
    ports = {name: free_port() for name in ("grpc", "http", "metrics")}
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "LD_LIBRARY_PATH": str(libs),
        "WFF_TRITONSERVER": str(binary),
        "WFF_TRITON_BACKENDS": str(prepare_backends(tmp / "backends")),
        "WFF_ARTIFACTS": str(artifacts),
        "WFF_STATE": str(tmp / "state"),
        "WFF_TARGET": "embedded",
        "WFF_PYTHON_SHM_DEFAULT_BYTES": str(16 * 1024 * 1024),
        **{f"WFF_{name.upper()}_ADDRESS": "127.0.0.1" for name in ports},
        **{f"WFF_{name.upper()}_PORT": str(port) for name, port in ports.items()},
    }
    log = tmp / "entrypoint.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", str(ENTRYPOINT), "serve"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + READY_LIMIT_S
        while "Ctrl-C to stop." not in log.read_text() or http_ready(ports["http"]) != 200:  # wff serve watches the stubs
            assert proc.poll() is None, f"entrypoint exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"not ready in {READY_LIMIT_S} s:\n{log.read_text()[-4000:]}"
            time.sleep(0.3)
        yield proc, ports, log
    finally:
        if proc.poll() is None:  # tritonserver runs in a session of its own: kill every descendant, then the entrypoint
            for pid in child_pids(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def entrypoint(tiny_artifacts, tmp_path_factory):
    with serving_entrypoint(tiny_artifacts, tmp_path_factory.mktemp("entrypoint")) as running:
        yield running


@pytest.mark.server
class TestEntrypointServe:
    def test_runs_tritonserver_under_wff_serve(self, entrypoint):
        """The entrypoint process is wff serve (exec), with tritonserver and its backend stubs below it."""
        proc, _, _ = entrypoint
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert b"serve" in cmdline and any(part.endswith(b"wff") for part in cmdline), cmdline
        assert {"preprocess", "fusion"} <= set(stubs_of(tritonserver_of(proc.pid)).values())

    def test_killed_stub_is_replaced(self, entrypoint, dicom_patient):
        """A SIGKILLed preprocess stub is replaced: diagnoses come back within the limit, with the stub running again."""
        proc, ports, log = entrypoint
        files = read_patient_files(dicom_patient)
        with DiagnosisClient(f"127.0.0.1:{ports['grpc']}", timeout_s=TIMEOUT_S, retries=0) as client:
            client.diagnose(files)
            server = tritonserver_of(proc.pid)
            victim = min(p for p, model in stubs_of(server).items() if model == "preprocess")
            os.kill(victim, signal.SIGKILL)
            killed = time.monotonic()
            errors, ready_while_failing = [], []
            while True:
                try:
                    client.diagnose(files)
                    break
                except DiagnosisError as e:
                    errors.append(e)
                    ready_while_failing.append(http_ready(ports["http"]))
                assert time.monotonic() - killed < RECOVERY_LIMIT_S, (
                    f"no diagnosis within {RECOVERY_LIMIT_S} s of the kill; /v2/health/ready answered {ready_while_failing[-5:]} "
                    f"meanwhile; errors: {[str(e) for e in errors[-2:]]}\n{log.read_text()[-3000:]}")
                time.sleep(0.2)
            recovered_s = time.monotonic() - killed
        stubs = stubs_of(server)
        assert victim not in stubs and "preprocess" in stubs.values()
        assert http_ready(ports["http"]) == 200
        assert "reloading the model" in log.read_text()
        print(f"\nentrypoint: recovered {recovered_s:.2f} s after the kill; {len(errors)} failed requests")



@pytest.mark.server
def test_sigterm_stops_tritonserver(tiny_artifacts, tmp_path):
    """SIGTERM to the entrypoint stops tritonserver cleanly (exit code 0) with its stubs, and the entrypoint exits 0.

    A server of its own: after a stub was replaced, Triton 2.51's shutdown waits out the whole
    exit timeout for the replaced instance and exits 1 (still bounded by the exit timeout)."""
    with serving_entrypoint(tiny_artifacts, tmp_path) as (proc, _, log):
        server = tritonserver_of(proc.pid)
        stubs = list(stubs_of(server))
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(STOP_LIMIT_S)
        text = log.read_text()
    assert code == 0, text[-3000:]
    assert "tritonserver stopped (exit code 0)" in text, text[-3000:]
    assert stubs and not [p for p in (server, *stubs) if alive(p)]
