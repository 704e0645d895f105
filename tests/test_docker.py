"""docker/: static checks of the GPU deployment's image and compose set (no Docker engine or GPU here).

* docker/Dockerfile, parsed by BuildKit's own parser (the ``dockerfile`` package): pinned NGC
  base, every COPY source present, the entrypoint script, an unprivileged user, the DICOM codec
  plugins of pyproject.toml (the image's own codec check is run here too);
* docker/entrypoint.sh, run for real with a stand-in ``tritonserver`` on PATH;
* docker/compose.yaml, Prometheus and Grafana files: wiring, ports (loopback unless told
  otherwise, with compose's variable interpolation applied here), no default Grafana password,
  the stop grace period against Triton's exit timeout, GPU reservation, and every metric the
  dashboard queries is one Triton 2.51 exports (docker/triton-metrics-2.51.json).

deploy/ (Kubernetes and Helm) is checked in test_k8s.py.
"""

from __future__ import annotations

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

import pytest
import yaml
from packaging.requirements import Requirement

from deploy_files import (
    DOCKER,
    METRIC_NAME,
    ROOT,
    TRITON_METRICS,
    TRITON_PORTS,
    WRITABLE,
    dockerfile_args,
    dockerfile_commands,
    entrypoint_exit_timeout_s,
    load_yaml,
)

NGC_IMAGE = re.compile(r"^nvcr\.io/nvidia/tritonserver:(\d\d)\.(\d\d)-py3$")
CODEC_PREFIX = "pylibjpeg"  # pydicom's decoder plugins for compressed transfer syntaxes


def resolve_args(text: str) -> str:
    args = dockerfile_args()
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], text)


def requirement_pins() -> dict[str, str]:
    """docker/requirements.txt as {distribution name: pinned version}."""
    lines = [line.split("#")[0].strip() for line in (DOCKER / "requirements.txt").read_text().splitlines()]
    return {Requirement(r).name: str(Requirement(r).specifier).removeprefix("==") for r in lines if r}


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
        # glibc: a mirror of the image's backends whose stub wrapper exports serving.stub_malloc_tunables
        # (the wrapper itself: tests/test_server_malloc.py)
        (backend_dir,) = [a.split("=", 1)[1] for a in args if a.startswith("--backend-directory=")]
        assert backend_dir != env["WFF_TRITON_BACKENDS"] and Path(backend_dir).name == "backends" and "wff-triton-" in backend_dir
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
