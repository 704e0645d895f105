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
* Python-backend shared memory big enough for a few patients' slices (:func:`shm_bytes_for`), and
  a region prefix unique to this server so several servers on one machine do not collide;
* ``serving.server_malloc``: tritonserver itself on jemalloc where it is installed (glibc's malloc
  kept the server process growing under load), with ``serving.server_malloc_conf`` as its
  ``MALLOC_CONF``; its backend stubs on glibc (a stub wrapper clears ``LD_PRELOAD`` and
  ``MALLOC_CONF``; the OpenVINO stub does not start with jemalloc preloaded) with
  ``serving.stub_malloc_tunables`` as their ``GLIBC_TUNABLES``.

Port 0 picks a free port. The server's output goes to a log file; on a failed start the
exception carries its last lines.

Backend stubs: each Python-backend model instance runs in a ``triton_python_backend_stub``
process. Triton 2.51 does not restart a stub that dies (killed, out of memory): every later
request to that model fails with INTERNAL "Stub process '<model>_0_0' is not healthy" while
the server and the model still report READY. The server therefore runs with explicit model
control, and a watchdog thread (``restart_stubs=True``) checks the stubs every
``STUB_CHECK_S`` and reloads a model whose stub has gone, through the repository API; it logs
an error each time and counts the restarts in ``stub_restarts``. Requests that reach the model
between the death and the reload fail with that INTERNAL error; nothing hangs. When a model's
reload fails ``RELOAD_ATTEMPTS`` times in a row the watchdog stops tritonserver (``failure`` says
why), so that the server does not go on reporting ready with a model that cannot answer.

Security: every endpoint binds to 127.0.0.1 unless told otherwise; each has its own address
(``grpc_address``, ``http_address``, ``metrics_address``, each defaulting to ``address``), so gRPC
can face the network while HTTP and metrics stay on loopback. ``tls_cert`` and ``tls_key`` (PEM
files) turn on TLS for gRPC (``--grpc-use-ssl``); ``tls_client_ca`` adds mutual TLS
(``--grpc-use-ssl-mutual``, ``--grpc-root-cert``): only clients presenting a certificate signed
by that CA get through. HTTP and metrics are always plain text. A warning is logged for each
endpoint reachable from the network in plain text. Explicit model control opens Triton's
model-repository API (load, unload, index); when gRPC or HTTP is reachable from the network
(``restrict_repository_api`` None and a non-loopback address, or True) that API needs the header
``ADMIN_HEADER`` with a secret made per start, which only the watchdog knows.
Triton 2.51 has no setting for the gRPC server's maximum message size (it accepts up to 2 GiB):
a request over ``serving.max_bytes`` is refused by the preprocess step, after Triton has received
it and copied it into that step's shared memory (the client refuses to send one).

Allocator: tritonserver runs on jemalloc where it is installed (``serving.server_malloc``); on
glibc's malloc, with which the soak did not pass reliably, a warning at start-up says what to
install.

Other installations: ``tritonserver`` (the binary) and ``backends`` (a Triton backend directory
holding ``python/``) run another tritonserver under the same watchdog, e.g. the NGC container's
/opt/tritonserver; ``extra_args`` are passed on to it.

:mod:`wff.processes` reads /proc to find the backend stubs, check the binding and measure the
server's memory (tritonserver plus its backend stubs).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter, deque
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Mapping, Sequence

from wff.processes import child_pids, free_port, process_name, process_tree_rss, stop_process_group

if TYPE_CHECKING:
    from wff.config import ServingConfig

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# Each Python-backend model instance passes tensors to and from its stub through a shared-memory
# region that starts at shm-default-byte-size and grows by shm-growth-byte-size. Measured with the
# small profile: an 84-slice patient (84 x 1 x 256 x 256 x 4 B = 22 MiB of slices) grows the
# preprocess, detector and crop regions to 23-27 MiB; at concurrency 8 (merged batches) they grew
# to 64-80 MiB and never shrank, which the soak saw as memory growth. The default region is
# therefore sized for serving.shm_patients of the largest patients the repository accepts
# (serving.max_slices slices), so the load does not pay for growth; the regions are /dev/shm
# memory (one per Python-backend instance), resident only where touched.
SHM_HEADROOM = 1.25  # slices plus the step's other tensors and the backend's bookkeeping
SHM_FALLBACK_BYTES = 32 * MIB  # when the repository has no profile.json to size from
SHM_GROWTH_BYTES = 16 * MIB
STARTUP_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0
EXIT_TIMEOUT_S = 5  # tritonserver waits this long for open client connections and in-flight requests
STOP_MARGIN_S = 10.0  # stop() waits the exit timeout plus this before it kills the process group
LOG_TAIL_LINES = 40
STUB_NAME = "triton_python_backend_stub"
JEMALLOC_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
STUB_CHECK_S = 0.5  # how often the watchdog looks for dead backend stubs
RELOAD_TIMEOUT_S = 120.0
RELOAD_ATTEMPTS = 3  # failed reloads of one model in a row after which the watchdog stops the server
RELOAD_PARAMETER = "wff_reloaded_after_stub_death"  # config parameter that makes a reload a new model
ADMIN_HEADER = "wff-admin-key"  # header the restricted model-repository API requires
# tritonserver flags TritonServer sets from its own arguments; extra_args may not repeat them
OWNED_FLAGS = (
    "--model-repository", "--backend-directory", "--grpc-address", "--grpc-port", "--http-address", "--http-port",
    "--metrics-address", "--metrics-port", "--grpc-use-ssl", "--grpc-use-ssl-mutual", "--grpc-server-cert",
    "--grpc-server-key", "--grpc-root-cert", "--model-control-mode", "--load-model", "--strict-readiness",
    "--http-restricted-api", "--grpc-restricted-protocol", "--exit-timeout-secs", "--log-verbose",
)
GLIBC_WARNING = ("tritonserver runs on glibc's malloc (serving.server_malloc=%s): the 10-minute soak passed with jemalloc, "
                 "not reliably with glibc (the server process kept growing under load). Install jemalloc "
                 "(Debian/Ubuntu: apt install libjemalloc2, which scripts/setup.sh does when run as root) and keep "
                 "serving.server_malloc=auto, or give a jemalloc library's path")


class ServerError(RuntimeError):
    """tritonserver failed to start, died, or is missing from this environment."""


class StartCancelled(ServerError):
    """``cancel_start`` was set (a signal, for ``wff serve``) while tritonserver was starting; it was stopped."""


def _pytriton_dirs() -> tuple[Path, Path]:
    """(pytriton/tritonserver, nvidia_pytriton.libs) of the installed wheel."""
    try:
        import pytriton
    except ImportError as e:
        raise ServerError("nvidia-pytriton is not installed; it ships the tritonserver binary: install the serving extra "
                          "with pip install 'spine-wff[serve]'") from e
    root = Path(pytriton.__file__).resolve().parent / "tritonserver"
    libs = root.parent.parent / "nvidia_pytriton.libs"
    if not (root / "bin" / "tritonserver").is_file():
        raise ServerError(f"{root}/bin/tritonserver not found; reinstall nvidia-pytriton")
    return root, libs


def _write_stub(target: Path, stub: Path, stub_env_unset: tuple[str, ...], stub_env_set: Mapping[str, str] = MappingProxyType({})) -> None:
    """``target``: a symlink to ``stub``, or a shell script that unsets ``stub_env_unset``, exports ``stub_env_set``
    and execs it."""
    if target.exists() or target.is_symlink():
        target.unlink()
    if stub_env_unset or stub_env_set:
        lines = ["#!/bin/sh"]
        if stub_env_unset:
            lines.append(f"unset {' '.join(stub_env_unset)}")
        lines += [f"export {name}={shlex.quote(value)}" for name, value in stub_env_set.items()]
        lines.append(f"exec {shlex.quote(str(stub))} \"$@\"")
        target.write_text("\n".join(lines) + "\n")
        target.chmod(0o755)
    else:
        target.symlink_to(stub)


def prepare_backends(dest: Path, stub_env_unset: tuple[str, ...] = (), stub_env_set: Mapping[str, str] = MappingProxyType({})) -> Path:
    """A backend directory with ``python/`` for the running interpreter, from the wheel; returns ``dest``.

    ``stub_env_unset`` names environment variables the backend stubs must not inherit from
    tritonserver (``LD_PRELOAD`` when the server alone runs on another allocator), ``stub_env_set``
    the ones they get (``GLIBC_TUNABLES``): the stub is then a shell script that does so and execs
    the wheel's stub.
    """
    root, _ = _pytriton_dirs()
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / py / STUB_NAME
    if not stub.is_file():
        available = sorted(p.name for p in (root / "python_backend_stubs").iterdir())
        raise ServerError(f"no Python backend stub for Python {py}; the wheel has {available}")
    python = dest / "python"
    python.mkdir(parents=True, exist_ok=True)
    for src in (root / "backends/python/libtriton_python.so", root / "backends/python/triton_python_backend_utils.py"):
        link = python / src.name
        if not link.exists():
            link.symlink_to(src)
    _write_stub(python / STUB_NAME, stub, stub_env_unset, stub_env_set)
    return dest


def check_backends(backends: Path) -> Path:
    """``backends`` resolved; ServerError unless it is a Triton backend directory with the Python backend's stub."""
    backends = Path(backends).resolve()
    if not (backends / "python" / STUB_NAME).is_file():
        raise ServerError(f"no Python backend stub in {backends}/python: give tritonserver's backend directory "
                          "(the NGC image's is /opt/tritonserver/backends), or leave it out to use the nvidia-pytriton wheel's")
    return backends


def wrap_backends(source: Path, dest: Path, stub_env_unset: tuple[str, ...], stub_env_set: Mapping[str, str] = MappingProxyType({})) -> Path:
    """``dest`` mirrors the backend directory ``source`` (symlinks), with a Python stub that unsets ``stub_env_unset``
    and exports ``stub_env_set``."""
    python = dest / "python"
    python.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name != "python" and not (dest / item.name).exists():
            (dest / item.name).symlink_to(item)
    for item in (source / "python").iterdir():
        if item.name != STUB_NAME and not (python / item.name).exists():
            (python / item.name).symlink_to(item)
    _write_stub(python / STUB_NAME, source / "python" / STUB_NAME, stub_env_unset, stub_env_set)
    return dest


def _repository_profile(repository: Path):
    """The Profile an embedded repository was built with (its preprocess step's copy), or None."""
    from wff.config import load_profile

    path = repository / "preprocess" / "1" / "profile.json"
    return load_profile(path) if path.is_file() else None


def shm_bytes_for(repository: Path) -> int:
    """Default Python-backend region: serving.shm_patients of the repository's largest patients, rounded up to 8 MiB."""
    profile = _repository_profile(repository)
    if profile is None:
        return SHM_FALLBACK_BYTES
    need = profile.serving.shm_patients * SHM_HEADROOM * profile.serving.max_slices * profile.image.size**2 * 4  # float32 slices
    return int(-(-need // (8 * MIB)) * 8 * MIB)


def repository_serving(repository: Path) -> ServingConfig:
    """The serving section of the repository's profile (the defaults without one): what the server takes its
    allocator settings (server_malloc, server_malloc_conf, stub_malloc_tunables) from."""
    from wff.config import ServingConfig

    profile = _repository_profile(repository)
    return profile.serving if profile is not None else ServingConfig()


def find_jemalloc() -> Path | None:
    """libjemalloc's path on this machine (Debian/Ubuntu package libjemalloc2, RHEL jemalloc), or None."""
    for folder in JEMALLOC_DIRS:
        for name in ("libjemalloc.so.2", "libjemalloc.so"):
            if (Path(folder) / name).is_file():
                return Path(folder) / name
    return None


def resolve_malloc(setting: str) -> Path | None:
    """The library tritonserver preloads for ``serving.server_malloc`` (None: glibc's malloc)."""
    if setting == "glibc":
        return None
    if setting in ("auto", "jemalloc"):
        lib = find_jemalloc()
        if lib is None and setting == "jemalloc":
            raise ServerError("serving.server_malloc=jemalloc but libjemalloc is not installed in "
                              f"{', '.join(JEMALLOC_DIRS)}: install it (Debian/Ubuntu: apt install libjemalloc2), "
                              "give its path as serving.server_malloc, or set serving.server_malloc=glibc")
        return lib
    lib = Path(setting)
    if not lib.is_file():
        raise ServerError(f"serving.server_malloc: {setting!r} is neither auto, glibc, jemalloc nor the path of a shared library")
    return lib.resolve()


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
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        restart_stubs: bool = True,
        restrict_repository_api: bool | None = None,
        server_malloc: str | None = None,
        *,
        grpc_address: str | None = None,
        http_address: str | None = None,
        metrics_address: str | None = None,
        tls_client_ca: str | Path | None = None,
        tritonserver: str | Path | None = None,
        backends: str | Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        """``log_file`` "-" leaves tritonserver's log on this process's standard output (a container's log)."""
        self.repository = Path(repository).resolve()
        if not self.repository.is_dir():
            raise ServerError(f"{self.repository}: no model repository here (build one with wff repo build)")
        self.tls = _tls_files(tls_cert, tls_key)
        self.tls_client_ca = _tls_client_ca(tls_client_ca, self.tls)
        self.grpc_address = grpc_address or address
        self.http_address = http_address or address
        self.metrics_address = metrics_address or address
        self._warn_exposed()
        exposed = not (_is_loopback(self.grpc_address) and _is_loopback(self.http_address))  # both serve the repository API
        restricted = exposed if restrict_repository_api is None else restrict_repository_api
        self._admin_key = uuid.uuid4().hex if restricted else None
        self.grpc_port = grpc_port or free_port(self.grpc_address)
        self.http_port = http_port or free_port(self.http_address)
        self.metrics_port = metrics_port or free_port(self.metrics_address)
        self.log_verbose = log_verbose
        self.startup_timeout_s = startup_timeout_s
        self.shm_default_bytes = shm_default_bytes or shm_bytes_for(self.repository)
        self.shm_growth_bytes = shm_growth_bytes
        self.exit_timeout_s = exit_timeout_s
        serving = repository_serving(self.repository)
        self.server_malloc_conf, self.stub_malloc_tunables = serving.server_malloc_conf, serving.stub_malloc_tunables
        self.server_malloc = server_malloc if server_malloc is not None else serving.server_malloc
        self.server_preload = resolve_malloc(self.server_malloc)
        if self.server_preload is None:
            log.warning(GLIBC_WARNING, self.server_malloc)
        self.tritonserver, self._wheel_libs = _tritonserver_binary(tritonserver)
        self.backends = check_backends(Path(backends)) if backends is not None else None
        self.extra_args = _check_extra_args(extra_args)
        self._tmp = tempfile.TemporaryDirectory(prefix="wff-triton-")
        self.log_to_stdout = str(log_file) == "-"
        self.log_file = Path(log_file) if log_file and not self.log_to_stdout else Path(self._tmp.name) / "tritonserver.log"
        self.process: subprocess.Popen | None = None
        self.startup_s: float | None = None
        self.restart_stubs = restart_stubs
        self.stub_restarts: list[dict] = []  # {"model", "reload_s", "ok"}, one per stub death seen
        self.failure: str | None = None  # why the watchdog stopped the server
        self._watchdog: threading.Thread | None = None
        self._stopping = threading.Event()
        self.cancel_start = threading.Event()  # set from a signal handler: start() stops tritonserver and raises StartCancelled
        self._stop_lock = threading.Lock()  # one stop at a time: the watchdog's and close()'s
        self._expected_stubs: Counter = Counter()  # model -> stubs running once the server was ready

    def _warn_exposed(self) -> None:
        """One warning per endpoint that is reachable from the network in plain text."""
        if not _is_loopback(self.grpc_address) and self.tls is None:
            log.warning("gRPC will listen on %s without TLS: diagnoses and patient files cross the network in plain text; "
                        "give tls_cert/tls_key (wff serve --tls-cert/--tls-key) or keep it on 127.0.0.1", self.grpc_address)
        for name, address, option in (("HTTP", self.http_address, "--http-address"),
                                      ("metrics", self.metrics_address, "--metrics-address")):
            if not _is_loopback(address):
                log.warning("%s will listen on %s without TLS (TLS covers gRPC only): reachable from the network in plain text; "
                            "keep it on 127.0.0.1 (wff serve %s) unless a proxy in front of it adds TLS", name, address, option)

    @property
    def allocator(self) -> str:
        """The library preloaded into tritonserver, or "glibc" (its own malloc)."""
        return str(self.server_preload) if self.server_preload is not None else "glibc"

    @property
    def grpc_url(self) -> str:
        return f"{_url_host(self.grpc_address)}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{_url_host(self.http_address)}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_url_host(self.metrics_address)}:{self.metrics_port}/metrics"

    def command(self, backend_dir: Path) -> list[str]:
        shm_prefix = f"wff_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        overridden = {a.split("=", 1)[0] for a in self.extra_args}
        defaults = [f for f in ("--allow-metrics=true", "--allow-gpu-metrics=false", "--exit-on-error=true")
                    if f.split("=", 1)[0] not in overridden]
        return [
            str(self.tritonserver),
            f"--model-repository={self.repository}",
            f"--backend-directory={backend_dir}",
            f"--backend-config=python,shm-default-byte-size={self.shm_default_bytes}",
            f"--backend-config=python,shm-growth-byte-size={self.shm_growth_bytes}",
            f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
            f"--http-address={self.http_address}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.grpc_address}",
            f"--grpc-port={self.grpc_port}",
            *self._tls_flags(),
            f"--metrics-address={self.metrics_address}",
            f"--metrics-port={self.metrics_port}",
            "--strict-readiness=true",
            "--model-control-mode=explicit",  # lets the watchdog reload a model whose stub died
            "--load-model=*",
            *self._restriction_flags(),
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--log-verbose={self.log_verbose}",
            *defaults,
            *self.extra_args,
        ]

    @property
    def repository_api_restricted(self) -> bool:
        return self._admin_key is not None

    def _restriction_flags(self) -> list[str]:
        if self._admin_key is None:
            return []
        rule = f"model-repository:{ADMIN_HEADER}={self._admin_key}"
        return [f"--http-restricted-api={rule}", f"--grpc-restricted-protocol={rule}"]

    def _tls_flags(self) -> list[str]:
        if self.tls is None:
            return []
        cert, key = self.tls
        flags = ["--grpc-use-ssl=true", f"--grpc-server-cert={cert}", f"--grpc-server-key={key}"]
        if self.tls_client_ca is not None:
            flags += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={self.tls_client_ca}"]
        return flags

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self._wheel_libs is not None:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(self._wheel_libs), env.get("LD_LIBRARY_PATH", "")) if p)
        env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
        if self.server_preload is not None:
            env["LD_PRELOAD"] = str(self.server_preload)
            if self.server_malloc_conf:
                env["MALLOC_CONF"] = self.server_malloc_conf
        return env

    def _backend_dir(self) -> Path:
        """The backend directory tritonserver gets: the wheel's or ``backends``, with a stub that clears LD_PRELOAD when preloading."""
        stub_env_unset = ("LD_PRELOAD", "MALLOC_CONF") if self.server_preload is not None else ()
        stub_env_set = {"GLIBC_TUNABLES": self.stub_malloc_tunables} if self.stub_malloc_tunables else {}
        dest = Path(self._tmp.name) / "backends"
        if self.backends is None:
            return prepare_backends(dest, stub_env_unset, stub_env_set)
        if stub_env_unset or stub_env_set:
            return wrap_backends(self.backends, dest, stub_env_unset, stub_env_set)
        return self.backends

    def start(self) -> "TritonServer":
        if self.process is not None:
            raise ServerError("this server is already started")
        backend_dir = self._backend_dir()
        started = time.monotonic()
        with contextlib.nullcontext() if self.log_to_stdout else open(self.log_file, "wb") as out:
            self.process = subprocess.Popen(
                self.command(backend_dir),
                stdout=out,  # None: this process's standard output
                stderr=None if out is None else subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.environment(),
                start_new_session=True,  # its own process group: stop() reaches the backend stubs too
            )
        log.info("tritonserver pid %d on %s (log %s), allocator %s", self.process.pid, self.repository,
                 "standard output" if self.log_to_stdout else self.log_file, self.allocator)
        try:
            self._wait_ready(started)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - started
        log.info("tritonserver ready in %.1f s: grpc %s, http %s", self.startup_s, self.grpc_url, self.http_url)
        self._expected_stubs = Counter(self.stub_pids().values())
        if self.restart_stubs:
            self._stopping.clear()
            self._watchdog = threading.Thread(target=self._watch_stubs, name="wff-stub-watchdog", daemon=True)
            self._watchdog.start()
        return self

    def _wait_ready(self, started: float) -> None:
        while True:
            if self.cancel_start.is_set():
                raise StartCancelled("stopped while tritonserver was starting")
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
        if self.log_to_stdout:
            return "(tritonserver's log is on standard output)"
        try:
            with open(self.log_file, errors="replace") as f:
                return "".join(deque(f, maxlen=lines)).rstrip()
        except OSError:
            return "(no log)"

    def stub_pids(self) -> dict[int, str]:
        """pid -> model name of every running backend stub of this server."""
        proc = self.process  # stop() may clear it from another thread
        if proc is None or proc.poll() is not None:
            return {}
        stubs = {}
        for pid in child_pids(proc.pid, recursive=False):  # a stub's own short-lived forks share its command line
            if process_name(pid) == STUB_NAME:
                model = stub_model(pid)
                if model:
                    stubs[pid] = model
        return stubs

    def reload_model(self, model: str) -> None:
        """Load ``model`` again through the repository API (new instances, new stubs); ServerError on failure.

        Triton skips the load of a model whose files and config have not changed, so the request
        carries the model's current config as an override, with the parameter ``RELOAD_PARAMETER``
        set to a new value each time (the steps ignore it).
        """
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/models/{model}/config", timeout=RELOAD_TIMEOUT_S) as r:
                config = json.loads(r.read())
            config.setdefault("parameters", {})[RELOAD_PARAMETER] = {"string_value": uuid.uuid4().hex}
            body = json.dumps({"parameters": {"config": json.dumps(config)}}).encode()
            headers = {ADMIN_HEADER: self._admin_key} if self._admin_key else {}
            request = urllib.request.Request(f"{self.http_url}/v2/repository/models/{model}/load", data=body, method="POST",
                                             headers=headers)
            with urllib.request.urlopen(request, timeout=RELOAD_TIMEOUT_S) as r:
                r.read()
        except (urllib.error.URLError, OSError) as e:
            raise ServerError(f"reloading model {model!r} failed ({e}); last log lines:\n{self.log_tail()}") from e

    def dead_stubs(self) -> dict[str, int]:
        """model -> backend stubs missing since the server became ready (empty when all run)."""
        current = Counter(self.stub_pids().values())
        return {m: n - current[m] for m, n in self._expected_stubs.items() if current[m] < n}

    def is_healthy(self) -> bool:
        """Ready, and every backend stub that ran at start is running (Triton's own readiness misses dead stubs)."""
        return self.is_ready() and not self.dead_stubs()

    def _watch_stubs(self) -> None:
        """Reload every model whose number of running stubs drops, until the server stops; stop the
        server when one model's reload fails RELOAD_ATTEMPTS times in a row."""
        expected = self._expected_stubs
        failed: Counter = Counter()  # model -> failed reloads in a row
        log.info("stub watchdog: %s", dict(expected))
        while not self._stopping.wait(STUB_CHECK_S):
            if not self.is_running():
                return
            current = Counter(self.stub_pids().values())
            for model in [m for m, count in expected.items() if current[m] < count]:
                if self._stopping.is_set():
                    return
                log.error("backend stub of model %r died (%d of %d running); reloading the model", model, current[model], expected[model])
                if self._reload_after_stub_death(model):
                    failed[model] = 0
                    continue
                failed[model] += 1
                if failed[model] >= RELOAD_ATTEMPTS and not self._stopping.is_set():
                    self.failure = (f"model {model!r} could not be reloaded after its backend stub died "
                                    f"({RELOAD_ATTEMPTS} attempts); stopping tritonserver so that it does not report ready "
                                    f"while every request to {model!r} fails")
                    log.error("%s", self.failure)
                    self.stop()
                    return

    def _reload_after_stub_death(self, model: str) -> bool:
        started = time.monotonic()
        try:
            self.reload_model(model)
            ok = True
            log.warning("model %r reloaded in %.1f s after its stub died", model, time.monotonic() - started)
        except ServerError as e:
            ok = False
            if not self._stopping.is_set():
                log.error("%s", e)
        self.stub_restarts.append({"model": model, "reload_s": round(time.monotonic() - started, 3), "ok": ok})
        return ok

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM, wait up to ``timeout_s`` (default: the exit timeout plus STOP_MARGIN_S, at least
        STOP_TIMEOUT_S), then SIGKILL the process group. Returns the exit code."""
        if timeout_s is None:
            timeout_s = max(STOP_TIMEOUT_S, self.exit_timeout_s + STOP_MARGIN_S)
        self._stopping.set()
        with self._stop_lock:  # a second caller waits until tritonserver has exited, then finds nothing to stop
            proc, code = self.process, None
            if proc is not None:
                # SIGTERM to tritonserver alone (it stops its backend stubs); SIGKILL reaches the stubs too
                code, killed = stop_process_group(proc, timeout_s, term_group=False)
                if killed:
                    log.warning("tritonserver did not stop in %.0f s; its process group was killed", timeout_s)
                self.process = None
                log.info("tritonserver stopped (exit code %s)", code)
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.join(STOP_TIMEOUT_S)  # it ends within a check period now that the server is gone
            self._watchdog = None
        return code

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def rss_bytes(self) -> int:
        """Resident memory of tritonserver and its backend stubs, in bytes (0 when not running)."""
        proc = self.process
        return process_tree_rss(proc.pid) if proc is not None and proc.poll() is None else 0

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def _tls_files(cert: str | Path | None, key: str | Path | None) -> tuple[Path, Path] | None:
    """(certificate, key) as resolved paths, None without TLS; ServerError when one is missing."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ServerError("gRPC TLS needs both a certificate and its private key (PEM files); got only one")
    paths = (Path(cert).resolve(), Path(key).resolve())
    for what, path in zip(("certificate", "private key"), paths):
        if not path.is_file():
            raise ServerError(f"{path}: TLS {what} not found")
    return paths


def _tls_client_ca(ca: str | Path | None, tls: tuple[Path, Path] | None) -> Path | None:
    """The CA that client certificates must be signed by (mutual TLS), resolved; None without it."""
    if ca is None:
        return None
    if tls is None:
        raise ServerError("mutual TLS (a client CA) needs the server's own certificate and key too (tls_cert, tls_key)")
    path = Path(ca).resolve()
    if not path.is_file():
        raise ServerError(f"{path}: TLS client CA certificate not found")
    return path


def wheel_tritonserver() -> tuple[Path, Path]:
    """(tritonserver executable, the libraries it needs on LD_LIBRARY_PATH) of the nvidia-pytriton wheel."""
    root, libs = _pytriton_dirs()
    return root / "bin" / "tritonserver", libs


def _tritonserver_binary(binary: str | Path | None) -> tuple[Path, Path | None]:
    """(tritonserver executable, the wheel's library folder or None): the wheel's by default, else
    ``binary`` as a path or a name on PATH."""
    if binary is None:
        return wheel_tritonserver()
    found = shutil.which(str(binary))
    if found is None:
        raise ServerError(f"tritonserver {str(binary)!r}: no such executable (a path, or a name on PATH; "
                          "the NGC image's is /opt/tritonserver/bin/tritonserver)")
    return Path(found).resolve(), None


def _check_extra_args(args: Sequence[str]) -> tuple[str, ...]:
    """``args`` for tritonserver; ServerError for a flag TritonServer sets itself, naming what to use instead."""
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in OWNED_FLAGS or arg.startswith("--backend-config=python,shm-"):
            raise ServerError(f"tritonserver argument {arg!r} is set by wff serve itself; use its own option "
                              "(addresses, ports, --tls-*, --shm-*, --exit-timeout, --log-verbose, --backend-directory)")
    return tuple(args)


def _url_host(address: str) -> str:
    """Host part of a URL that reaches a server bound to ``address`` from this machine."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:  # a host name
        return address
    if ip.is_unspecified:  # bound to every interface: loopback is one of them
        return "127.0.0.1" if ip.version == 4 else "[::1]"
    return f"[{ip}]" if ip.version == 6 else str(ip)


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:  # a host name other than localhost
        return False


def stub_model(pid: int) -> str | None:
    """The model a backend stub serves: its first argument is <repository>/<model>/<version>/model.py."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if len(argv) < 2:
        return None
    return Path(argv[1].decode(errors="replace")).parent.parent.name or None
