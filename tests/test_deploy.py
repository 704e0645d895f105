"""docker/ and deploy/: static checks of the GPU deployment (no Docker engine, GPU or cluster here).

* docker/Dockerfile, parsed by BuildKit's own parser (the ``dockerfile`` package): pinned NGC
  base, every COPY source present, the entrypoint script, an unprivileged user, the DICOM codec
  plugins of pyproject.toml (the image's own codec check is run here too);
* docker/entrypoint.sh, run for real with a stand-in ``tritonserver`` on PATH;
* docker/compose.yaml, Prometheus and Grafana files: wiring, ports (loopback unless told
  otherwise, with compose's variable interpolation applied here), no default Grafana password,
  the stop grace period against Triton's exit timeout, GPU reservation, and every metric the
  dashboard queries is one Triton 2.51 exports (docker/triton-metrics-2.51.json);
* deploy/k8s/ manifests against the Kubernetes 1.28 OpenAPI schemas (``kubernetes-validate``,
  strict) plus probes, ports, labels, security contexts, the NetworkPolicy, the plan cache
  volume and the HPA / prometheus-adapter metrics;
* deploy/helm/spine-wff: every ``.Values`` path a template reads exists, and the defaults
  agree with deploy/k8s/. Rendering the chart needs helm, which is not installed here.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
K8S = ROOT / "deploy" / "k8s"
CHART = ROOT / "deploy" / "helm" / "spine-wff"
ADAPTER_VALUES = ROOT / "deploy" / "helm" / "prometheus-adapter-values.yaml"
TRITON_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
NGC_IMAGE = re.compile(r"^nvcr\.io/nvidia/tritonserver:(\d\d)\.(\d\d)-py3$")
K8S_VERSION = "1.28.0"
HPA_METRIC = "wff_avg_queue_time_per_request_us"
HPA_PREPROCESS_METRIC = "wff_preprocess_queue_time_per_request_us"
CODEC_PREFIX = "pylibjpeg"  # pydicom's decoder plugins for compressed transfer syntaxes
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


def resolve_args(text: str) -> str:
    args = dockerfile_args()
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], text)


def requirement_pins() -> dict[str, str]:
    """docker/requirements.txt as {distribution name: pinned version}."""
    lines = [line.split("#")[0].strip() for line in (DOCKER / "requirements.txt").read_text().splitlines()]
    return {Requirement(r).name: str(Requirement(r).specifier).removeprefix("==") for r in lines if r}


def entrypoint_exit_timeout_s() -> int:
    """The default of WFF_EXIT_TIMEOUT_S in docker/entrypoint.sh: how long tritonserver waits on SIGTERM."""
    match = re.search(r"\$\{WFF_EXIT_TIMEOUT_S:-(\d+)\}", (DOCKER / "entrypoint.sh").read_text())
    assert match, "docker/entrypoint.sh sets no WFF_EXIT_TIMEOUT_S default"
    return int(match.group(1))


# --------------------------------------------------------------------------- Dockerfile


class TestDockerfile:
    def test_base_image_is_a_pinned_ngc_tritonserver(self):
        """FROM resolves (through its ARG default) to nvcr.io/nvidia/tritonserver:24.10-py3, never latest."""
        (base,) = [c.value[0] for c in dockerfile_commands() if c.cmd == "FROM"]
        image = resolve_args(base)
        assert NGC_IMAGE.match(image), image
        assert image == "nvcr.io/nvidia/tritonserver:24.10-py3"  # Triton 2.51, TensorRT 10.5
        assert "latest" not in (DOCKER / "Dockerfile").read_text()

    def test_copy_sources_exist(self):
        """Every COPY source is in the repository (the build context is its root)."""
        copies = [c for c in dockerfile_commands() if c.cmd == "COPY"]
        assert copies
        for c in copies:
            for source in c.value[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: missing"

    def test_copy_sources_not_dockerignored(self):
        """docker/Dockerfile.dockerignore does not drop what the Dockerfile copies."""
        lines = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
        ignored = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
        for c in (c for c in dockerfile_commands() if c.cmd == "COPY"):
            for source in c.value[:-1]:
                assert Path(source).parts[0] not in ignored, source

    def test_entrypoint_installed_and_executable(self):
        """ENTRYPOINT is the copied docker/entrypoint.sh; the script is executable bash that parses."""
        commands = dockerfile_commands()
        (entry,) = [c.value for c in commands if c.cmd == "ENTRYPOINT"]
        copied = {c.value[-1]: c.value[0] for c in commands if c.cmd == "COPY"}
        assert copied[entry[0]] == "docker/entrypoint.sh"
        script = DOCKER / "entrypoint.sh"
        assert script.stat().st_mode & stat.S_IXUSR
        subprocess.run(["bash", "-n", str(script)], check=True)

    def test_image_installs_pinned_requirements(self):
        """Serving requirements are pinned, fit tritonclient 2.51 (numpy<2, protobuf<5), and the TensorRT bindings match 10.5."""
        reqs = [line.split("#")[0].strip() for line in (DOCKER / "requirements.txt").read_text().splitlines()]
        reqs = [r for r in reqs if r]
        assert reqs and all("==" in r for r in reqs), reqs
        pins = {r.split("==")[0].split("[")[0]: r.split("==")[1] for r in reqs}
        assert pins["tritonclient"] == "2.51.0" and pins["numpy"].startswith("1.") and pins["protobuf"].startswith("4.")
        assert "torch" not in pins
        text = (DOCKER / "Dockerfile").read_text()
        assert "docker/requirements.txt" in text and "TENSORRT_BINDINGS_VERSION=10.5.0" in text and "wff trt versions" in text

    def test_codec_plugins_match_pyproject(self):
        """The image pins every pydicom codec plugin the embedded install depends on, at versions pyproject.toml allows."""
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        dicom = {r.name: r.specifier for r in map(Requirement, project["dependencies"])
                 if r.name.startswith(CODEC_PREFIX) or r.name == "pydicom"}
        assert len(dicom) >= 5, dicom  # pydicom, pylibjpeg and its libjpeg, openjpeg and rle plugins
        pins = requirement_pins()
        assert {n for n in pins if n.startswith(CODEC_PREFIX)} == {n for n in dicom if n.startswith(CODEC_PREFIX)}, sorted(pins)
        for name, spec in dicom.items():
            assert spec.contains(pins[name]), f"docker/requirements.txt {name}=={pins[name]} is outside pyproject's {name}{spec}"

    def test_image_checks_its_codecs(self):
        """The image build's codec check passes where the plugins are installed and fails, naming them, where they are not."""
        (check,) = [c.value[0] for c in dockerfile_commands() if c.cmd == "RUN" and "get_decoder" in c.value[0]]
        program, flag, code = shlex.split(check)
        assert (program, flag) == ("python3", "-c")
        ok = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert ok.returncode == 0, ok.stderr
        hidden = subprocess.run([sys.executable, "-c", f"import sys; sys.modules['pylibjpeg'] = None\n{code}"],
                                capture_output=True, text=True, timeout=120)
        assert hidden.returncode == 1 and "no pylibjpeg decoder for" in hidden.stderr and "JPEG 2000" in hidden.stderr

    def test_runs_as_a_fixed_unprivileged_user(self):
        """USER is a fixed non-zero uid:gid created in the image, set after the last RUN; /models/state belongs to it."""
        commands = dockerfile_commands()
        (user,) = [c.value[0] for c in commands if c.cmd == "USER"]
        uid, gid = resolve_args(user).split(":")
        assert int(uid) >= 1000 and int(gid) >= 1000, user
        position = next(i for i, c in enumerate(commands) if c.cmd == "USER")
        assert not any(c.cmd in ("RUN", "COPY") for c in commands[position:])
        setup = resolve_args(next(c.value[0] for c in commands if c.cmd == "RUN" and "useradd" in c.value[0]))
        assert f"--uid \"{uid}\"" in setup and f"--gid \"{gid}\"" in setup and "chown wff:wff /models/state" in setup


# --------------------------------------------------------------------------- entrypoint


@pytest.fixture
def fake_tritonserver(tmp_path):
    """A `tritonserver` on PATH that records its arguments and LD_PRELOAD, runs its backend directory's Python
    stub (recording what the stub saw), and exits; a backend directory with a stand-in Python stub; the venv's
    `wff` on PATH. `wff serve` then reports that tritonserver exited during startup."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "tritonserver.args"
    fake = bin_dir / "tritonserver"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f'printf "%s\\n" "$@" > {record}\n'
        f'echo "${{LD_PRELOAD:-}}" > {record}.preload\n'
        'for arg in "$@"; do\n'
        f'    [[ "$arg" == --backend-directory=* ]] && "${{arg#*=}}/python/triton_python_backend_stub" model.py > {record}.stub\n'
        "done\n"
        "exit 0\n"
    )
    fake.chmod(0o755)
    backends = tmp_path / "backends"
    (backends / "python").mkdir(parents=True)
    (backends / "onnxruntime").mkdir()
    (backends / "python" / "libtriton_python.so").write_bytes(b"")
    stub = backends / "python" / "triton_python_backend_stub"
    stub.write_text('#!/bin/sh\necho "stub $1 LD_PRELOAD=${LD_PRELOAD:-unset}"\n')
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "WFF_SERVER_MALLOC": "glibc", "WFF_TRITON_BACKENDS": str(backends)}
    return env, record


def run_entrypoint(env, *args, **extra):
    return subprocess.run(["bash", str(DOCKER / "entrypoint.sh"), *args], env={**env, **extra},
                          capture_output=True, text=True, timeout=120)


def ran_and_exited(result) -> bool:
    """wff serve started the fake tritonserver and reported its exit during startup."""
    return result.returncode == 1 and "tritonserver exited with code 0 during startup" in result.stderr


class TestEntrypoint:
    def test_serve_builds_then_runs_tritonserver_under_wff_serve(self, fake_tritonserver, tiny_artifacts, tmp_path):
        """CPU variant: onnxruntime repository with KIND_CPU, then wff serve runs tritonserver with the container's settings."""
        env, record = fake_tritonserver
        state = tmp_path / "state"
        result = run_entrypoint(env, "serve", "--log-info=true", WFF_ARTIFACTS=str(tiny_artifacts), WFF_STATE=str(state),
                                WFF_TARGET="onnxruntime", WFF_INSTANCE_KIND="KIND_CPU")
        assert ran_and_exited(result), result.stderr
        assert "KIND_CPU" in (state / "repository" / "detector" / "config.pbtxt").read_text()
        args = record.read_text().split()
        assert f"--model-repository={state / 'repository'}" in args
        assert f"--backend-directory={env['WFF_TRITON_BACKENDS']}" in args  # glibc: the image's backends as they are
        assert {"--http-address=0.0.0.0", "--http-port=8000", "--grpc-address=0.0.0.0", "--grpc-port=8001",
                "--metrics-address=0.0.0.0", "--metrics-port=8002", "--allow-metrics=true", "--allow-gpu-metrics=false",
                "--backend-config=python,shm-default-byte-size=67108864", "--backend-config=python,shm-growth-byte-size=67108864",
                "--exit-timeout-secs=30", "--model-control-mode=explicit", "--log-verbose=0", "--log-info=true"} <= set(args)
        assert any(a.startswith("--http-restricted-api=model-repository:") for a in args)  # endpoints off loopback

    def test_settings_from_the_environment(self, fake_tritonserver, tiny_artifacts, tmp_path):
        """Exit timeout, per-endpoint addresses and ports, and gRPC (mutual) TLS come from WFF_* variables."""
        env, record = fake_tritonserver
        pem = tmp_path / "x.pem"
        pem.write_text("stand-in")
        result = run_entrypoint(env, "serve", WFF_ARTIFACTS=str(tiny_artifacts), WFF_STATE=str(tmp_path / "state"),
                                WFF_TARGET="onnxruntime", WFF_EXIT_TIMEOUT_S="7", WFF_HTTP_ADDRESS="127.0.0.1",
                                WFF_METRICS_ADDRESS="127.0.0.1", WFF_GRPC_PORT="9001", WFF_TLS_CERT=str(pem), WFF_TLS_KEY=str(pem),
                                WFF_TLS_CLIENT_CA=str(pem))
        assert ran_and_exited(result), result.stderr
        args = set(record.read_text().split())
        assert {"--exit-timeout-secs=7", "--http-address=127.0.0.1", "--metrics-address=127.0.0.1", "--grpc-address=0.0.0.0",
                "--grpc-port=9001", "--grpc-use-ssl=true", f"--grpc-server-cert={pem}", f"--grpc-server-key={pem}",
                "--grpc-use-ssl-mutual=true", f"--grpc-root-cert={pem}", "--allow-gpu-metrics=true"} <= args

    def test_server_malloc_preloads_tritonserver_not_stubs(self, fake_tritonserver, tiny_artifacts, tmp_path):
        """WFF_SERVER_MALLOC=LIB: tritonserver gets LD_PRELOAD=LIB and a backend directory whose Python stub clears it."""
        env, record = fake_tritonserver
        lib = tmp_path / "libfake.so"
        lib.write_bytes(b"")
        result = run_entrypoint(env, "serve", WFF_ARTIFACTS=str(tiny_artifacts), WFF_STATE=str(tmp_path / "state"),
                                WFF_TARGET="onnxruntime", WFF_INSTANCE_KIND="KIND_CPU", WFF_SERVER_MALLOC=str(lib))
        assert ran_and_exited(result), result.stderr
        assert f"--backend-directory={env['WFF_TRITON_BACKENDS']}" not in record.read_text().split()  # a wrapped copy
        assert Path(f"{record}.preload").read_text().strip() == str(lib)
        assert Path(f"{record}.stub").read_text().strip() == "stub model.py LD_PRELOAD=unset"

    def test_server_malloc_glibc_and_bad_values(self, fake_tritonserver, tiny_artifacts, tmp_path):
        env, record = fake_tritonserver
        common = dict(WFF_ARTIFACTS=str(tiny_artifacts), WFF_STATE=str(tmp_path / "state"), WFF_TARGET="onnxruntime", WFF_INSTANCE_KIND="KIND_CPU")
        result = run_entrypoint(env, "serve", **common)  # the fixture's glibc
        assert ran_and_exited(result), result.stderr
        assert Path(f"{record}.preload").read_text().strip() == ""
        assert Path(f"{record}.stub").read_text().strip() == "stub model.py LD_PRELOAD=unset"
        record.unlink()
        missing = run_entrypoint(env, "serve", **common, WFF_SERVER_MALLOC=str(tmp_path / "nothing.so"))
        assert missing.returncode == 1 and "nothing.so' is neither auto, glibc, jemalloc nor the path" in missing.stderr
        assert not record.exists()
        no_stub = run_entrypoint(env, "serve", **common, WFF_TRITON_BACKENDS=str(tmp_path))
        assert no_stub.returncode == 1 and "no Python backend stub" in no_stub.stderr and not record.exists()

    def test_prepare_is_idempotent_and_follows_artifacts(self, fake_tritonserver, tiny_artifacts, tmp_path):
        """A second prepare keeps the repository; changed artifacts rebuild it."""
        env, _ = fake_tritonserver
        artifacts = tmp_path / "artifacts"
        shutil.copytree(tiny_artifacts, artifacts)
        common = {"WFF_ARTIFACTS": str(artifacts), "WFF_STATE": str(tmp_path / "state"), "WFF_TARGET": "embedded"}
        first = run_entrypoint(env, "prepare", **common)
        assert first.returncode == 0 and "building the embedded repository" in first.stderr
        second = run_entrypoint(env, "prepare", **common)
        assert second.returncode == 0 and "building" not in second.stderr
        fusion = json.loads((artifacts / "fusion.json").read_text())
        (artifacts / "fusion.json").write_text(json.dumps(fusion, indent=1))
        third = run_entrypoint(env, "prepare", **common)
        assert third.returncode == 0 and "building the embedded repository" in third.stderr

    def test_missing_artifacts(self, fake_tritonserver, tmp_path):
        """No wff train output: exit 2 and say what to mount."""
        env, record = fake_tritonserver
        result = run_entrypoint(env, "serve", WFF_ARTIFACTS=str(tmp_path / "none"), WFF_STATE=str(tmp_path / "s"))
        assert result.returncode == 2 and "/models/artifacts" in result.stderr and not record.exists()

    def test_tensorrt_target_runs_trt_build(self, fake_tritonserver, tiny_artifacts, tmp_path):
        """The tensorrt target calls `wff trt build` after the repository; here it stops there (no TensorRT)."""
        env, record = fake_tritonserver
        result = run_entrypoint(env, "serve", WFF_ARTIFACTS=str(tiny_artifacts), WFF_STATE=str(tmp_path / "s"), WFF_TARGET="tensorrt")
        assert result.returncode == 1 and "TensorRT is not installed" in result.stderr and not record.exists()
        assert (tmp_path / "s" / "repository" / "detector" / "1" / "model.onnx").is_file()


# --------------------------------------------------------------------------- compose, Prometheus, Grafana


@pytest.fixture(scope="module")
def compose():
    return load_yaml(DOCKER / "compose.yaml")


def published(service) -> set[int]:
    return {int(str(p).split(":")[-1].split("/")[0]) for p in service["ports"]}


COMPOSE_VARIABLE = re.compile(r"\$\{(\w+)(?::([-?])([^}]*))?\}")
COMPOSE_REQUIRED = {"WFF_ARTIFACTS": "/srv/runs/paper", "GRAFANA_ADMIN_PASSWORD": "chosen-by-the-site"}


def compose_config(**env: str) -> dict:
    """docker/compose.yaml as compose reads it with ``env``: ``${VAR:-default}`` and ``${VAR:?error}`` applied
    (empty counts as unset, as in compose); a missing required variable raises ValueError with compose's message."""
    def substitute(match: re.Match) -> str:
        name, operator, argument = match.groups()
        if env.get(name):
            return env[name]
        if operator == "?":
            raise ValueError(f"required variable {name} is missing a value: {argument}")
        return argument if operator == "-" else ""

    return yaml.safe_load(COMPOSE_VARIABLE.sub(substitute, (DOCKER / "compose.yaml").read_text()))


def host_addresses(config: dict) -> dict[tuple[str, int], str]:
    """(service, container port) -> the host address it is published on."""
    return {(name, int(str(p).rsplit(":", 1)[1])): str(p).rsplit(":", 2)[0]
            for name, service in config["services"].items() for p in service.get("ports", [])}


def seconds(duration: str) -> float:
    """A compose duration such as 45s, 1m30s or 2m."""
    parts = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert parts and duration, duration
    return int(parts.group(1) or 0) * 60 + int(parts.group(2) or 0)


class TestCompose:
    def test_triton_services(self, compose):
        """gpu and cpu profiles: both publish 8000-8002 and answer as `triton` on the network."""
        services = compose["services"]
        for name, profile in (("triton", "gpu"), ("triton-cpu", "cpu")):
            s = services[name]
            assert s["profiles"] == [profile]
            assert published(s) == set(TRITON_PORTS.values())
            assert "triton" in s["networks"]["default"]["aliases"]
            assert (ROOT / s["build"]["dockerfile"]).is_file() and s["build"]["context"] == ".."
            assert any(v.endswith(":/models/artifacts:ro") for v in s["volumes"])
            assert s["shm_size"]

    def test_gpu_reservation_only_on_gpu_service(self, compose):
        """The tensorrt service reserves an NVIDIA GPU; the CPU one uses the onnxruntime target on KIND_CPU."""
        gpu = compose["services"]["triton"]
        (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["count"] == 1
        assert gpu["environment"]["WFF_TARGET"] == "tensorrt"
        cpu = compose["services"]["triton-cpu"]
        assert "deploy" not in cpu and cpu["environment"] == {"WFF_TARGET": "onnxruntime", "WFF_INSTANCE_KIND": "KIND_CPU"}

    def test_healthcheck_is_readiness(self, compose):
        """The healthcheck asks /v2/health/ready on the HTTP port, with a start period for plan builds."""
        check = compose["services"]["triton"]["healthcheck"]
        assert "localhost:8000/v2/health/ready" in " ".join(check["test"]) and check["start_period"]

    def test_bind_mounts_exist(self, compose):
        """Every relative bind mount of Prometheus and Grafana points at a file in docker/."""
        for name in ("prometheus", "grafana"):
            for volume in compose["services"][name]["volumes"]:
                source = volume.split(":")[0]
                if source.startswith("./"):
                    assert (DOCKER / source).exists(), f"{name}: {source}"

    def test_images_pinned(self, compose):
        """Third-party images carry an explicit version tag."""
        for name in ("prometheus", "grafana"):
            image = compose["services"][name]["image"]
            assert re.search(r":v?\d+\.\d+\.\d+$", image), image

    def test_ports_published_on_loopback_unless_told(self):
        """By default every port listens on 127.0.0.1 only; WFF_GRPC_BIND_ADDRESS opens gRPC alone, WFF_BIND_ADDRESS the rest."""
        default = host_addresses(compose_config(**COMPOSE_REQUIRED))
        assert len(default) == 2 * 3 + 2 and set(default.values()) == {"127.0.0.1"}, default
        grpc_open = host_addresses(compose_config(**COMPOSE_REQUIRED, WFF_GRPC_BIND_ADDRESS="0.0.0.0"))
        assert {k for k, v in grpc_open.items() if v == "0.0.0.0"} == {("triton", 8001), ("triton-cpu", 8001)}
        rest_open = host_addresses(compose_config(**COMPOSE_REQUIRED, WFF_BIND_ADDRESS="10.0.0.5"))
        assert {k for k, v in rest_open.items() if v == "127.0.0.1"} == {("triton", 8001), ("triton-cpu", 8001)}

    def test_grafana_has_no_default_password(self, compose):
        """Without GRAFANA_ADMIN_PASSWORD compose refuses to start, saying which variable to set; sign-up and anonymous access are off."""
        with pytest.raises(ValueError, match="GRAFANA_ADMIN_PASSWORD is missing a value: set GRAFANA_ADMIN_PASSWORD"):
            compose_config(WFF_ARTIFACTS="/srv/runs/paper")
        grafana = compose_config(**COMPOSE_REQUIRED)["services"]["grafana"]["environment"]
        assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == COMPOSE_REQUIRED["GRAFANA_ADMIN_PASSWORD"]
        assert grafana["GF_USERS_ALLOW_SIGN_UP"] == "false" and grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"

    def test_stop_grace_period_exceeds_triton_exit_timeout(self, compose):
        """Docker waits longer than tritonserver's wait for requests in flight (the entrypoint's WFF_EXIT_TIMEOUT_S default)."""
        for name in ("triton", "triton-cpu"):
            grace = seconds(compose["services"][name]["stop_grace_period"])
            assert grace >= entrypoint_exit_timeout_s() + 10, (name, grace)

    def test_triton_container_is_locked_down(self, compose):
        """Read-only root filesystem with a tmpfs /tmp, no capabilities, no privilege gain; the image's user is not overridden."""
        for name in ("triton", "triton-cpu"):
            service = compose["services"][name]
            assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
            assert "no-new-privileges:true" in service["security_opt"] and "user" not in service
            assert [t.split(":")[0] for t in service["tmpfs"]] == ["/tmp"]
            assert {v.split(":")[1] for v in service["volumes"]} | {"/tmp", "/dev/shm"} >= WRITABLE - {"/models/plans"}

    def test_prometheus_scrapes_triton(self):
        """Prometheus scrapes triton:8002/metrics."""
        config = load_yaml(DOCKER / "prometheus" / "prometheus.yml")
        (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "triton"]
        assert job["metrics_path"] == "/metrics"
        assert ["triton:8002"] == [t for c in job["static_configs"] for t in c["targets"]]


@pytest.fixture(scope="module")
def dashboard():
    return json.loads((DOCKER / "grafana" / "dashboards" / "spine-wff-triton.json").read_text())


def panel_exprs(dashboard) -> dict[str, list[str]]:
    return {p["title"]: [t["expr"] for t in p.get("targets", [])] for p in dashboard["panels"] if p["type"] != "row"}


class TestGrafana:
    def test_provisioning_wiring(self, compose, dashboard):
        """Datasource uid = the panels' uid; the dashboard provider reads the mounted folder."""
        (ds,) = load_yaml(DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
        assert ds["url"] == "http://prometheus:9090"
        uids = {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
        uids |= {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
        assert uids == {ds["uid"]}
        (provider,) = load_yaml(DOCKER / "grafana" / "provisioning" / "dashboards" / "dashboards.yml")["providers"]
        mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"] if v.startswith("./"))
        assert mounts["./grafana/dashboards"] == provider["options"]["path"]
        assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"

    def test_only_triton_251_metrics(self, dashboard):
        """Every nv_* name in the dashboard's PromQL is a metric Triton 2.51 exports."""
        names = {m for exprs in panel_exprs(dashboard).values() for e in exprs for m in METRIC_NAME.findall(e)}
        names |= set(METRIC_NAME.findall(json.dumps(dashboard["templating"])))
        assert names and names <= TRITON_METRICS, sorted(names - TRITON_METRICS)

    def test_required_panels(self, dashboard):
        """Rate/failures per model, queue vs compute per request, GPU utilisation and memory."""
        text = json.dumps(panel_exprs(dashboard))
        for metric in ("nv_inference_request_success", "nv_inference_request_failure", "nv_inference_queue_duration_us",
                       "nv_inference_compute_infer_duration_us", "nv_inference_compute_input_duration_us",
                       "nv_inference_compute_output_duration_us", "nv_inference_request_duration_us", "nv_gpu_utilization",
                       "nv_gpu_memory_used_bytes"):
            assert metric in text, metric
        exprs = panel_exprs(dashboard)
        queue = [e for e in exprs["Queue vs compute time per request"] if "queue_duration" in e]
        assert queue and "/ sum by (model) (rate(nv_inference_request_success" in queue[0]
        assert all("by (model" in e for e in exprs["Failures per model"] + exprs["Request rate per model"])

    def test_metric_list_source(self):
        """The metric list names its source (server docs at tag v2.51.0)."""
        data = json.loads((DOCKER / "triton-metrics-2.51.json").read_text())
        assert data["triton_version"] == "2.51.0" and data["source"]["tag"] == "v2.51.0"
        assert data["container"] == "nvcr.io/nvidia/tritonserver:24.10-py3"


# --------------------------------------------------------------------------- Kubernetes manifests


def k8s_docs() -> dict[str, dict]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            docs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return docs


@pytest.fixture(scope="module")
def manifests():
    return k8s_docs()


def pod_containers(deployment):
    spec = deployment["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec.get("initContainers", []) + spec["containers"]}


class TestKubernetesManifests:
    def test_kustomization_lists_every_manifest(self):
        """kustomization.yaml names every manifest of the app (the adapter's ConfigMap lives in its own namespace)."""
        listed = set(load_yaml(K8S / "kustomization.yaml")["resources"])
        assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "prometheus-adapter-config.yaml"}

    def test_schemas(self, manifests):
        """Core kinds validate strictly against the Kubernetes 1.28 OpenAPI schemas."""
        import kubernetes_validate as kv  # bundled Kubernetes OpenAPI schemas (dev dependency)

        core = {k: d for k, d in manifests.items() if not d["apiVersion"].startswith("monitoring.coreos.com")}
        assert {"Deployment/spine-wff", "Service/spine-wff", "HorizontalPodAutoscaler/spine-wff", "NetworkPolicy/spine-wff",
                "PersistentVolumeClaim/spine-wff-artifacts", "PersistentVolumeClaim/spine-wff-plans",
                "ConfigMap/adapter-config"} <= set(core)
        for doc in core.values():
            kv.validate(doc, K8S_VERSION, strict=True)

    def test_probes_ports_and_gpu(self, manifests):
        """tritonserver: live/ready probes on the named HTTP port, ports 8000-8002, one GPU, /dev/shm in memory."""
        deployment = manifests["Deployment/spine-wff"]
        containers = pod_containers(deployment)
        triton = containers["triton"]
        assert {p["name"]: p["containerPort"] for p in triton["ports"]} == TRITON_PORTS
        assert triton["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
        assert triton["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
        assert triton["startupProbe"]["httpGet"]["port"] == "http"
        for c in containers.values():
            assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert containers["prepare"]["args"] == ["prepare"] and triton["args"] == ["serve"]
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
        assert {m["mountPath"] for m in triton["volumeMounts"]} == {"/models/artifacts"} | WRITABLE

    def test_labels_and_selectors(self, manifests):
        """Service and ServiceMonitor select the pod template's labels; scrape annotations name port 8002."""
        deployment = manifests["Deployment/spine-wff"]
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"] == pod_labels
        assert pod_labels["app.kubernetes.io/name"] == "spine-wff"
        service = manifests["Service/spine-wff"]
        assert service["spec"]["selector"] == pod_labels
        assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {k: (v, k) for k, v in TRITON_PORTS.items()}
        monitor = manifests["ServiceMonitor/spine-wff"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": "8002", "prometheus.io/path": "/metrics"}

    def test_hpa_metrics_served_by_adapter_rules(self, manifests):
        """The HPA's pods metrics are the adapter rules' outputs: rate(queue us) / rate(successes) of Triton counters,
        for the GPU models and for the preprocess step."""
        hpa = manifests["HorizontalPodAutoscaler/spine-wff"]
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "spine-wff"}
        metrics = {m["pods"]["metric"]["name"]: m for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
        assert list(metrics) == [HPA_METRIC, HPA_PREPROCESS_METRIC] and len(hpa["spec"]["metrics"]) == 2
        config = yaml.safe_load(manifests["ConfigMap/adapter-config"]["data"]["config.yaml"])
        rules = {r["name"]["as"]: r for r in config["rules"]}
        assert list(rules) == list(metrics)
        models = {HPA_METRIC: 'model=~"detector|classifier"', HPA_PREPROCESS_METRIC: 'model="preprocess"'}
        for name, rule in rules.items():
            query = rule["metricsQuery"]
            assert re.search(r"rate\(nv_inference_queue_duration_us\{.*\}\[1m\]\).*/.*rate\(nv_inference_request_success\{", query)
            assert query.count(models[name]) == 2 and models[name] in rule["seriesQuery"], name
            assert set(METRIC_NAME.findall(query + rule["seriesQuery"])) <= TRITON_METRICS
            assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}

    def test_pods_run_unprivileged_on_a_read_only_root(self, manifests):
        """Pod: non-root as the image's uid/gid, RuntimeDefault seccomp, no API token; every container: no privilege
        escalation, no capabilities, read-only root with a volume at each place the server writes."""
        spec = manifests["Deployment/spine-wff"]["spec"]["template"]["spec"]
        pod = spec["securityContext"]
        uid, gid = dockerfile_args()["WFF_UID"], dockerfile_args()["WFF_GID"]
        assert pod["runAsNonRoot"] is True and (pod["runAsUser"], pod["runAsGroup"], pod["fsGroup"]) == (int(uid), int(gid), int(gid))
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"} and spec["automountServiceAccountToken"] is False
        volumes = {v["name"]: v for v in spec["volumes"]}
        for name, container in pod_containers(manifests["Deployment/spine-wff"]).items():
            context = container["securityContext"]
            assert context == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}, name
            writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
            assert writable == WRITABLE - ({"/dev/shm"} if name == "prepare" else set()), name
            for mount in container["volumeMounts"]:
                assert mount["name"] in volumes, mount

    def test_plans_on_a_persistent_volume(self, manifests):
        """The plan cache and the timing cache live on the spine-wff-plans claim, mounted where the env points."""
        spec = manifests["Deployment/spine-wff"]["spec"]["template"]["spec"]
        claim = manifests["PersistentVolumeClaim/spine-wff-plans"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["plans"]["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"]}
        assert "ReadWriteMany" in claim["spec"]["accessModes"]
        for container in pod_containers(manifests["Deployment/spine-wff"]).values():
            env = {e["name"]: e["value"] for e in container["env"]}
            (mount,) = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == "plans"]
            assert env["WFF_TRT_PLAN_CACHE"] == mount and Path(env["WFF_TRT_TIMING_CACHE"]).parent == Path(mount)
        assert "WFF_TRT_TIMING_CACHE" in (DOCKER / "entrypoint.sh").read_text()  # the entrypoint passes it to wff trt build

    def test_termination_grace_exceeds_exit_timeout(self, manifests):
        """Kubernetes waits longer than tritonserver's wait for requests in flight."""
        spec = manifests["Deployment/spine-wff"]["spec"]["template"]["spec"]
        env = {e["name"]: e["value"] for e in pod_containers(manifests["Deployment/spine-wff"])["triton"]["env"]}
        exit_timeout = int(env.get("WFF_EXIT_TIMEOUT_S", entrypoint_exit_timeout_s()))
        assert spec["terminationGracePeriodSeconds"] >= exit_timeout + 10

    def test_network_policy(self, manifests):
        """Ingress: gRPC from labelled client pods/namespaces, metrics from Prometheus, nothing else; no egress."""
        policy = manifests["NetworkPolicy/spine-wff"]["spec"]
        pod_labels = manifests["Deployment/spine-wff"]["spec"]["template"]["metadata"]["labels"]
        assert policy["podSelector"]["matchLabels"] == pod_labels
        assert policy["policyTypes"] == ["Ingress", "Egress"] and policy["egress"] == []
        named = {port["name"]: port["containerPort"] for container in manifests["Deployment/spine-wff"]["spec"]["template"]["spec"]["containers"]
                 for port in container.get("ports", [])}
        # named ports, resolved to what the server listens on, so a changed Service port cannot open or close anything
        opened = {named[p["port"]]: rule["from"] for rule in policy["ingress"] for p in rule["ports"]}
        assert set(opened) == {TRITON_PORTS["grpc"], TRITON_PORTS["metrics"]}
        clients = opened[TRITON_PORTS["grpc"]]
        assert [set(peer) for peer in clients] == [{"podSelector"}, {"namespaceSelector"}]
        assert all(peer[next(iter(peer))]["matchLabels"] for peer in clients)
        (prometheus,) = opened[TRITON_PORTS["metrics"]]
        assert prometheus["namespaceSelector"]["matchLabels"] and prometheus["podSelector"]["matchLabels"]

    def test_adapter_rule_same_in_helm_values(self, manifests):
        """deploy/helm/prometheus-adapter-values.yaml carries the same rules as the ConfigMap."""
        config = yaml.safe_load(manifests["ConfigMap/adapter-config"]["data"]["config.yaml"])
        assert load_yaml(ADAPTER_VALUES)["rules"]["custom"] == config["rules"]

    @pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
    def test_kustomize_builds(self):
        """`kubectl kustomize deploy/k8s` builds the set offline."""
        out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=True).stdout
        kinds = [d["kind"] for d in yaml.safe_load_all(out)]
        assert sorted(kinds) == sorted(d["kind"] for d in k8s_docs().values() if d["kind"] != "ConfigMap")


# --------------------------------------------------------------------------- Helm chart


VALUES_REF = re.compile(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")


def chart_templates() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((CHART / "templates").iterdir())}


class TestHelmChart:
    def test_chart_metadata(self):
        """Chart.yaml: apiVersion v2, semver version, appVersion = the image tag default."""
        chart = load_yaml(CHART / "Chart.yaml")
        values = load_yaml(CHART / "values.yaml")
        assert chart["apiVersion"] == "v2" and chart["name"] == "spine-wff"
        assert re.match(r"^\d+\.\d+\.\d+$", chart["version"])
        assert values["image"]["tag"] == chart["appVersion"]

    def test_values_paths_exist(self):
        """Every .Values path a template reads is defined in values.yaml."""
        values = load_yaml(CHART / "values.yaml")
        for name, text in chart_templates().items():
            for path in VALUES_REF.findall(text):
                node = values
                for key in path.strip(".").split("."):
                    assert isinstance(node, dict) and key in node, f"{name}: .Values{path}"
                    node = node[key]

    def test_includes_defined_and_braces_balanced(self):
        """Templates include only helpers defined in _helpers.tpl; {{ and }} pair up."""
        templates = chart_templates()
        defined = set(re.findall(r'define "([^"]+)"', templates["_helpers.tpl"]))
        for name, text in templates.items():
            assert set(re.findall(r'include "([^"]+)"', text)) <= defined, name
            assert text.count("{{") == text.count("}}"), name

    def test_templates_cover_the_objects(self):
        """The chart has the same kinds as deploy/k8s (the adapter rule lives in its own values file)."""
        kinds = {m for text in chart_templates().values() for m in re.findall(r"^kind: (\w+)$", text, flags=re.M)}
        assert kinds == {d["kind"] for d in k8s_docs().values()} - {"ConfigMap"}

    def test_defaults_match_plain_manifests(self, manifests):
        """values.yaml defaults = what deploy/k8s spells out (ports, resources, HPA, env names, probes)."""
        values = load_yaml(CHART / "values.yaml")
        assert values["service"]["ports"] == TRITON_PORTS
        deployment = manifests["Deployment/spine-wff"]
        triton = pod_containers(deployment)["triton"]
        assert triton["resources"] == values["resources"]
        hpa = manifests["HorizontalPodAutoscaler/spine-wff"]["spec"]
        auto = values["autoscaling"]
        assert (hpa["minReplicas"], hpa["maxReplicas"]) == (auto["minReplicas"], auto["maxReplicas"])
        for metric, settings in zip(hpa["metrics"], (auto, auto["preprocess"]), strict=True):
            assert metric["pods"]["target"]["averageValue"] == settings["targetAverageValue"]
            assert metric["pods"]["metric"]["name"] == settings["metricName"]
        assert [auto["metricName"], auto["preprocess"]["metricName"]] == [HPA_METRIC, HPA_PREPROCESS_METRIC]
        helper_env = re.findall(r"- name: (WFF_\w+)", chart_templates()["_helpers.tpl"])
        assert helper_env == [e["name"] for e in triton["env"]]
        for probe in ("startup", "liveness", "readiness"):
            assert triton[f"{probe}Probe"]["periodSeconds"] == values["probes"][probe]["periodSeconds"]
        deployment_tpl = chart_templates()["deployment.yaml"]
        assert "path: /v2/health/live" in deployment_tpl and "path: /v2/health/ready" in deployment_tpl

    def test_security_defaults_match_plain_manifests(self, manifests):
        """Security contexts, grace period, exit timeout, plan cache claim and NetworkPolicy peers: values.yaml = deploy/k8s."""
        values = load_yaml(CHART / "values.yaml")
        deployment = manifests["Deployment/spine-wff"]
        spec = deployment["spec"]["template"]["spec"]
        assert spec["securityContext"] == values["podSecurityContext"]
        assert all(c["securityContext"] == values["securityContext"] for c in pod_containers(deployment).values())
        assert spec["terminationGracePeriodSeconds"] == values["terminationGracePeriodSeconds"]
        env = {e["name"]: e["value"] for e in pod_containers(deployment)["triton"]["env"]}
        assert env["WFF_EXIT_TIMEOUT_S"] == str(values["exitTimeoutSeconds"])
        claim = manifests["PersistentVolumeClaim/spine-wff-plans"]["spec"]
        assert (claim["accessModes"], claim["resources"]["requests"]["storage"]) == (values["plans"]["accessModes"], values["plans"]["size"])
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["tmp"]["emptyDir"]["sizeLimit"] == values["tmpSizeLimit"]
        peers = manifests["NetworkPolicy/spine-wff"]["spec"]["ingress"]
        allowed = values["networkPolicy"]
        assert [p["podSelector"]["matchLabels"] for p in peers[0]["from"] if "podSelector" in p] == [allowed["clients"]["podLabels"]]
        assert [p["namespaceSelector"]["matchLabels"] for p in peers[0]["from"]
                if "namespaceSelector" in p] == [allowed["clients"]["namespaceLabels"]]
        (prometheus,) = peers[1]["from"]
        assert prometheus == {"namespaceSelector": {"matchLabels": allowed["prometheus"]["namespaceLabels"]},
                              "podSelector": {"matchLabels": allowed["prometheus"]["podLabels"]}}
        templates = chart_templates()
        mounts = re.findall(r"mountPath: (\S+)", templates["_helpers.tpl"] + templates["deployment.yaml"])
        assert set(mounts) == {m["mountPath"] for m in pod_containers(deployment)["triton"]["volumeMounts"]}
