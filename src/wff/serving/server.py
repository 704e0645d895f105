"""Run the real tritonserver (shipped in the nvidia-pytriton wheel) on a model repository.

    with TritonServer("repo/", grpc_port=0, http_port=0, metrics_port=0) as server:
        DiagnosisClient(server.grpc_url).diagnose(files, age=None)

The wheel's server needs three things set up around it, done here:

* a backend directory ``python/`` holding libtriton_python.so, triton_python_backend_utils.py
  and the ``triton_python_backend_stub`` built for the running Python (symlinked into a
  temporary folder);
* ``LD_LIBRARY_PATH`` with the wheel's bundled libraries (nvidia_pytriton.libs) and this
  Python's bin folder first in ``PATH``, so the stub imports this environment's packages
  (``wff`` included);
* Python-backend shared memory big enough for one patient's slices (:func:`shm_bytes_for`), and
  a region prefix unique to this server so several servers on one machine do not collide.

Port 0 picks a free port. The server's output goes to a log file; on a failed start the
exception carries its last lines.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from pathlib import Path

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# Each Python-backend model instance passes tensors to and from its stub through a shared-memory
# region that starts at shm-default-byte-size and grows by shm-growth-byte-size. Measured with the
# small profile: an 84-slice patient (84 x 1 x 256 x 256 x 4 B = 22 MiB of slices) grows the
# preprocess, detector and crop regions to 23-27 MiB. The default region is therefore sized for
# the largest patient the repository accepts (serving.max_slices slices), so the first patient
# does not pay for growth; the regions are real /dev/shm memory (5 Python models x the default).
SHM_HEADROOM = 1.25  # slices plus the step's other tensors and the backend's bookkeeping
SHM_FALLBACK_BYTES = 32 * MIB  # when the repository has no profile.json to size from
SHM_GROWTH_BYTES = 16 * MIB
STARTUP_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0
EXIT_TIMEOUT_S = 5  # tritonserver waits this long for open client connections and in-flight requests
LOG_TAIL_LINES = 40


class ServerError(RuntimeError):
    """tritonserver failed to start, died, or is missing from this environment."""


def _pytriton_dirs() -> tuple[Path, Path]:
    """(pytriton/tritonserver, nvidia_pytriton.libs) of the installed wheel."""
    try:
        import pytriton
    except ImportError as e:
        raise ServerError("nvidia-pytriton is not installed; it ships the tritonserver binary (pip install nvidia-pytriton)") from e
    root = Path(pytriton.__file__).resolve().parent / "tritonserver"
    libs = root.parent.parent / "nvidia_pytriton.libs"
    if not (root / "bin" / "tritonserver").is_file():
        raise ServerError(f"{root}/bin/tritonserver not found; reinstall nvidia-pytriton")
    return root, libs


def prepare_backends(dest: Path) -> Path:
    """A backend directory with ``python/`` for the running interpreter; returns ``dest``."""
    root, _ = _pytriton_dirs()
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / py / "triton_python_backend_stub"
    if not stub.is_file():
        available = sorted(p.name for p in (root / "python_backend_stubs").iterdir())
        raise ServerError(f"no Python backend stub for Python {py}; the wheel has {available}")
    python = dest / "python"
    python.mkdir(parents=True, exist_ok=True)
    for src in (root / "backends/python/libtriton_python.so", root / "backends/python/triton_python_backend_utils.py", stub):
        link = python / src.name
        if not link.exists():
            link.symlink_to(src)
    return dest


def shm_bytes_for(repository: Path) -> int:
    """Default Python-backend region for the repository's largest patient, rounded up to 8 MiB."""
    from wff.config import load_profile

    path = repository / "preprocess" / "1" / "profile.json"
    if not path.is_file():
        return SHM_FALLBACK_BYTES
    profile = load_profile(path)
    need = SHM_HEADROOM * profile.serving.max_slices * profile.image.size**2 * 4  # float32 slices
    return int(-(-need // (8 * MIB)) * 8 * MIB)


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


class TritonServer:
    """A tritonserver process on ``repository``; a context manager (start on enter, stop on exit)."""

    def __init__(
        self,
        repository: str | Path,
        address: str = "127.0.0.1",
        grpc_port: int = 8001,
        http_port: int = 8000,
        metrics_port: int = 8002,
        log_verbose: int = 0,
        log_file: str | Path | None = None,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
        shm_default_bytes: int | None = None,
        shm_growth_bytes: int = SHM_GROWTH_BYTES,
        exit_timeout_s: int = EXIT_TIMEOUT_S,
    ) -> None:
        self.repository = Path(repository).resolve()
        if not self.repository.is_dir():
            raise ServerError(f"{self.repository}: no model repository here (build one with wff repo build)")
        self.address = address
        self.grpc_port = grpc_port or free_port(address)
        self.http_port = http_port or free_port(address)
        self.metrics_port = metrics_port or free_port(address)
        self.log_verbose = log_verbose
        self.startup_timeout_s = startup_timeout_s
        self.shm_default_bytes = shm_default_bytes or shm_bytes_for(self.repository)
        self.shm_growth_bytes = shm_growth_bytes
        self.exit_timeout_s = exit_timeout_s
        self._tmp = tempfile.TemporaryDirectory(prefix="wff-triton-")
        self.log_file = Path(log_file) if log_file else Path(self._tmp.name) / "tritonserver.log"
        self.process: subprocess.Popen | None = None
        self.startup_s: float | None = None

    @property
    def grpc_url(self) -> str:
        return f"{self.address}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.address}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.address}:{self.metrics_port}/metrics"

    def command(self, backend_dir: Path) -> list[str]:
        root, _ = _pytriton_dirs()
        shm_prefix = f"wff_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        return [
            str(root / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={backend_dir}",
            f"--backend-config=python,shm-default-byte-size={self.shm_default_bytes}",
            f"--backend-config=python,shm-growth-byte-size={self.shm_growth_bytes}",
            f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
            f"--http-address={self.address}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.address}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.address}",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--log-verbose={self.log_verbose}",
        ]

    def environment(self) -> dict[str, str]:
        _, libs = _pytriton_dirs()
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        return env

    def start(self) -> "TritonServer":
        if self.process is not None:
            raise ServerError("this server is already started")
        backend_dir = prepare_backends(Path(self._tmp.name) / "backends")
        started = time.monotonic()
        with open(self.log_file, "wb") as out:
            self.process = subprocess.Popen(
                self.command(backend_dir),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.environment(),
                start_new_session=True,  # its own process group: stop() reaches the backend stubs too
            )
        log.info("tritonserver pid %d on %s (log %s)", self.process.pid, self.repository, self.log_file)
        try:
            self._wait_ready(started)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - started
        log.info("tritonserver ready in %.1f s: grpc %s, http %s", self.startup_s, self.grpc_url, self.http_url)
        return self

    def _wait_ready(self, started: float) -> None:
        while True:
            code = self.process.poll()
            if code is not None:
                raise ServerError(f"tritonserver exited with code {code} during startup; last log lines:\n{self.log_tail()}")
            if self.is_ready():
                return
            if time.monotonic() - started > self.startup_timeout_s:
                raise ServerError(f"tritonserver not ready after {self.startup_timeout_s:.0f} s; last log lines:\n{self.log_tail()}")
            time.sleep(0.2)

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            with open(self.log_file, errors="replace") as f:
                return "".join(deque(f, maxlen=lines)).rstrip()
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL the process group. Returns the exit code."""
        if self.process is None:
            return None
        proc, self.process = self.process, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop in %.0f s; killing its process group", timeout_s)
                os.killpg(proc.pid, signal.SIGKILL)  # the server and its backend stubs
        code = proc.wait()
        log.info("tritonserver stopped (exit code %s)", code)
        return code

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
