"""docker/ and deploy/ files and parsers shared by test_docker.py and test_k8s.py."""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
TRITON_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
WRITABLE = {"/models/state", "/models/plans", "/tmp", "/dev/shm"}  # all the server writes, on a read-only root
TRITON_METRICS = set(json.loads((DOCKER / "triton-metrics-2.51.json").read_text())["metrics"])
METRIC_NAME = re.compile(r"\bnv_[a-z_]+\b")


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


_PARSE = "import dockerfile, json, sys; print(json.dumps([[c.cmd, list(c.value)] for c in dockerfile.parse_file(sys.argv[1])]))"


@functools.cache
def _parsed_dockerfile() -> tuple[tuple[str, tuple[str, ...]], ...]:
    # BuildKit's parser (dev dependency ``dockerfile``) is Go code: its runtime is kept out of the
    # pytest process, where it once crashed the whole session with a segmentation fault
    out = subprocess.run([sys.executable, "-c", _PARSE, str(DOCKER / "Dockerfile")], check=True, capture_output=True, text=True)
    return tuple((cmd, tuple(value)) for cmd, value in json.loads(out.stdout))


def dockerfile_commands():
    return [SimpleNamespace(cmd=cmd, value=value) for cmd, value in _parsed_dockerfile()]


def dockerfile_args() -> dict[str, str]:
    """ARG defaults of docker/Dockerfile."""
    return dict(c.value[0].split("=", 1) for c in dockerfile_commands() if c.cmd == "ARG" and "=" in c.value[0])


def entrypoint_exit_timeout_s() -> int:
    """The default of WFF_EXIT_TIMEOUT_S in docker/entrypoint.sh: how long tritonserver waits on SIGTERM."""
    match = re.search(r"\$\{WFF_EXIT_TIMEOUT_S:-(\d+)\}", (DOCKER / "entrypoint.sh").read_text())
    assert match, "docker/entrypoint.sh sets no WFF_EXIT_TIMEOUT_S default"
    return int(match.group(1))
