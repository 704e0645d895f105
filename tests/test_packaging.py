"""Packaging: `pip install spine-wff` is a thin gRPC client, the extras add the server and training,
and the wheel builds and serves a repository from a fresh virtualenv.

The thin-client tests run `wff` in a fresh interpreter whose import system refuses the server and
training stacks (a sys.meta_path finder that raises ModuleNotFoundError and lists every attempt on stderr),
against a real tritonserver. The wheel tests build the wheel from a copy of the sources (no
downloads: --no-index, --no-build-isolation), install it with --no-deps into a virtualenv that sees
the dependencies of this environment through a .pth line but not its editable install, and run
`wff repo build` and `wff serve` from outside the checkout. With only [serve] (the training stack
refused the same way), `wff bench` runs without --baseline and --flops. A static check reads every import
statement under client/: wff.client imports neither the server nor the training code.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import write_dicom_patient
from wff.cli import EXTRAS
from wff.processes import free_port
from wff.serving.repository import MODEL_STEPS, PYTHON_STEPS

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# What the thin client must never import: the server and training stacks and the wff layers over them.
HEAVY_MODULES = ("torch", "torchvision", "openvino", "onnxruntime", "onnx", "onnxscript", "pytriton", "tritonserver")
WFF_SERVER_AND_TRAINING = ("wff.training", "wff.serving.server")
HEAVY_DISTRIBUTIONS = {"torch", "torchvision", "openvino", "onnxruntime", "onnx", "onnxscript", "nvidia-pytriton"}
# What [serve] alone lacks: the libraries of the [train] extra and the training code over them.
TRAIN_ONLY = tuple(sorted(module for module, extra in EXTRAS.items() if extra == "train")) + ("wff.training",)
# What no module of wff.client may import, at any depth: the heavy stacks and the layers over them (the
# server, training, and the load tests, which start the server).
CLIENT_FORBIDDEN = HEAVY_MODULES + ("wff.training", "wff.serving", "wff.loadtest")
BLOCKED_MARK = "blocked imports:"
COMMAND_TIMEOUT_S = 120

# Prepended to the command run by run_blocked: a meta-path finder that refuses BLOCKED as if it were not
# installed (ModuleNotFoundError naming the module) and, at exit, names every module that was asked for.
BLOCKER = """
import atexit, sys
BLOCKED = {blocked!r}
asked = []
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            asked.append(name)
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
        return None
sys.meta_path.insert(0, Refuse())
atexit.register(lambda: asked and print({mark!r}, " ".join(sorted(set(asked))), file=sys.stderr))
"""
WFF_MAIN = "from wff.cli import main; main(prog_name='wff')"


def run_blocked(statement: str, *args: str, cwd: Path | None = None,
                blocked: tuple[str, ...] = HEAVY_MODULES + WFF_SERVER_AND_TRAINING) -> subprocess.CompletedProcess:
    """``python -c statement args`` with ``blocked`` (by default the server and training stacks) unimportable."""
    code = BLOCKER.format(blocked=blocked, mark=BLOCKED_MARK) + statement
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, timeout=COMMAND_TIMEOUT_S)


def wff_blocked(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``wff ARGS`` as the thin client: the result, after checking that nothing blocked was asked for."""
    result = run_blocked(WFF_MAIN, *args, cwd=cwd)
    assert BLOCKED_MARK not in result.stderr, f"wff {' '.join(args)} imports the server or training stack:\n{result.stderr}"
    return result


def requirement_names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


class TestDependencies:
    def test_core_has_no_server_or_training_package(self):
        """`pip install spine-wff` pulls none of torch, torchvision, OpenVINO, ONNX, ONNX Runtime or the server wheel."""
        core = requirement_names(PYPROJECT["project"]["dependencies"])
        assert not core & HEAVY_DISTRIBUTIONS, sorted(core & HEAVY_DISTRIBUTIONS)
        assert {"numpy", "pydicom", "tritonclient", "grpcio", "protobuf", "click", "matplotlib"} <= core

    def test_extras_hold_the_rest(self):
        """[serve] has the server and its runtimes, [train] torch and the export, [pacs] the DICOM network, [dev] all three plus the test tools."""
        extras = PYPROJECT["project"]["optional-dependencies"]
        assert {"nvidia-pytriton", "onnxruntime", "openvino", "onnx"} <= requirement_names(extras["serve"])
        assert {"torch", "torchvision", "onnx", "onnxscript", "onnxruntime"} <= requirement_names(extras["train"])
        (itself,) = [Requirement(r) for r in extras["dev"] if canonicalize_name(Requirement(r).name) == "spine-wff"]
        assert {"pynetdicom", "highdicom", "dicomweb-client"} <= requirement_names(extras["pacs"])
        assert itself.extras == {"serve", "train", "pacs"} and "pytest" in requirement_names(extras["dev"])


class TestThinClient:
    def test_blocker_reports_a_blocked_import(self):
        """The harness itself: importing the server module is refused and named on stderr."""
        result = run_blocked("import wff.serving.server")
        assert result.returncode == 1 and f"{BLOCKED_MARK} wff.serving.server" in result.stderr, result.stderr

    @pytest.mark.server
    def test_diagnose_and_metrics(self, limited_server, dicom_patient, tmp_path):
        """wff diagnose (with --overlay) and wff metrics against a real tritonserver, without the server or training stacks."""
        result = wff_blocked("diagnose", str(dicom_patient), "--url", limited_server.grpc_url, "--json", "-",
                             "--overlay", str(tmp_path / "overlays"))
        assert result.returncode == 0, result.stderr
        diagnosis = json.loads(result.stdout)
        assert diagnosis["diagnosis"] in ("benign", "malignant") and 0 <= diagnosis["p_malignant"] <= 1
        assert len(list((tmp_path / "overlays").glob("*.png"))) == 3  # one per series

        result = wff_blocked("metrics", "--url", f"127.0.0.1:{limited_server.metrics_port}", "--json", "-")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["models"]

    @pytest.mark.server
    def test_evaluate_with_report_and_overlays(self, limited_server, tmp_path):
        """wff evaluate --report --overlay of a two-patient dataset: the same images labelled benign and malignant,
        so exactly one is misclassified and gets its overlays."""
        dataset = tmp_path / "dataset"
        for patient in ("P1", "P2"):
            write_dicom_patient(dataset / patient, {"SAG T1": 3, "SAG T2": 3})
        (dataset / "labels.csv").write_text("patient_id,label,age,location,split\nP1,benign,60,lumbar,test\nP2,malignant,60,lumbar,test\n")
        result = wff_blocked("evaluate", str(dataset), "--url", limited_server.grpc_url, "--report", str(tmp_path / "report"),
                             "--overlay", str(tmp_path / "overlays"))
        assert result.returncode == 0, result.stderr
        assert "2 of 2 patients diagnosed" in result.stdout
        assert (tmp_path / "report" / "roc.png").stat().st_size > 0
        overlays = sorted(p.name for p in (tmp_path / "overlays").glob("*.png"))
        assert len(overlays) == 2 and len({name.split("_")[0] for name in overlays}) == 1, overlays


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, module) of every import in ``source`` at any depth (module level, functions, try blocks):
    ``import a.b``; ``from a import b`` as a and a.b; relative imports resolved in ``package``;
    ``importlib.import_module`` and ``__import__`` of a literal name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            base = ".".join(parts + ([node.module] if node.module else []))
            found += [(node.lineno, base)] + [(node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*"]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            func = node.func
            if (func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)) in ("import_module", "__import__"):
                found.append((node.lineno, node.args[0].value))
    return found


def forbidden_in_client(source: str, package: str = "wff.client") -> list[tuple[int, str]]:
    """The imports of ``source`` (a module of ``package``) that name CLIENT_FORBIDDEN or a module inside one."""
    return [(line, name) for line, name in imported_modules(source, package)
            if any(name == f or name.startswith(f + ".") for f in CLIENT_FORBIDDEN)]


class TestClientLayer:
    def test_client_imports_neither_server_nor_training(self):
        """No module under client/ imports wff.training, wff.serving, wff.loadtest, torch, torchvision, OpenVINO,
        ONNX, ONNX Runtime or pytriton, at any depth."""
        folder = ROOT / PYPROJECT["tool"]["setuptools"]["package-dir"]["wff.client"]
        modules = sorted(folder.rglob("*.py"))
        assert len(modules) > 5
        found = [f"{path.relative_to(ROOT)}:{line}: {name}" for path in modules
                 for line, name in forbidden_in_client(path.read_text(), ".".join(("wff.client", *path.relative_to(folder).parent.parts)))]
        assert not found, "wff.client must not import the server or training stacks:\n" + "\n".join(found)

    @pytest.mark.parametrize("source, module", [
        ("import torch\n", "torch"),
        ("def f():\n    import torchvision.ops as ops\n", "torchvision.ops"),
        ("class C:\n    def m(self):\n        if self:\n            from openvino import Core\n", "openvino"),
        ("try:\n    from wff.serving.server import TritonServer\nexcept ImportError:\n    pass\n", "wff.serving.server"),
        ("from wff import training\n", "wff.training"),
        ("from .. import serving\n", "wff.serving"),
        ("import importlib\nmodule = importlib.import_module('onnxruntime')\n", "onnxruntime"),
        ("from pytriton.triton import Triton\n", "pytriton.triton"),
        ("def bench():\n    from wff.loadtest.bench_cli import bench\n", "wff.loadtest.bench_cli"),
    ])
    def test_checker_finds_an_import_at_any_depth(self, source, module):
        """The check sees module-level, nested, relative and importlib imports."""
        assert module in [name for _, name in forbidden_in_client(source)]

    def test_checker_allows_the_client_stack(self):
        """Imports of the client's own modules, wff.ensemble, tritonclient and names that only start alike pass."""
        source = ("from . import evaluate\nfrom wff.ensemble import steps\nimport tritonclient.grpc\n"
                  "import onnx_tool\nfrom wff.config import SMALL\nfrom wff.serving_notes import x\n")
        assert forbidden_in_client(source) == []


@pytest.fixture
def bench_dataset(tmp_path) -> Path:
    """labels.csv and one two-series patient of 3 slices each."""
    write_dicom_patient(tmp_path / "dataset" / "P1", {"SAG T1": 3, "SAG T2": 3})
    (tmp_path / "dataset" / "labels.csv").write_text("patient_id,label,age,location,split\nP1,benign,60,lumbar,test\n")
    return tmp_path / "dataset"


class TestServeExtra:
    """spine-wff[serve] without [train]: torch, torchvision, onnxscript and wff.training unimportable."""

    def test_serve_without_pytriton_names_the_extra(self, tmp_path):
        """Without the server wheel, wff serve says which extra installs it."""
        result = run_blocked(WFF_MAIN, "serve", "--repository", str(tmp_path), blocked=("pytriton",))
        assert result.returncode == 1, result.stderr
        assert "wff: error: nvidia-pytriton is not installed" in result.stderr and "pip install 'spine-wff[serve]'" in result.stderr

    @pytest.mark.server
    def test_bench_runs_without_the_training_stack(self, tiny_artifacts, bench_dataset):
        """wff bench on a server it starts, 2 requests at concurrency 1: one served row, nothing of [train] asked for."""
        result = run_blocked(WFF_MAIN, "bench", "--artifacts", str(tiny_artifacts), "--dataset", str(bench_dataset),
                             "--concurrency", "1", "--requests", "2", "--json", "-", blocked=TRAIN_ONLY)
        assert result.returncode == 0 and BLOCKED_MARK not in result.stderr, result.stderr
        (row,) = json.loads(result.stdout)["rows"]
        assert (row["pipeline"], row["requests"], row["errors"]) == ("served", 2, 0)

    @pytest.mark.parametrize("options", [["--baseline"], ["--flops"]])
    def test_bench_baseline_and_flops_name_the_train_extra(self, tiny_artifacts, bench_dataset, options):
        """--baseline or --flops without torch: the missing-extra error, before a server is started."""
        result = run_blocked(WFF_MAIN, "bench", "--artifacts", str(tiny_artifacts), "--dataset", str(bench_dataset),
                             "--requests", "1", *options, blocked=TRAIN_ONLY)
        assert result.returncode == 1, result.stderr
        assert "wff: error: wff bench needs torch, which is not installed; install it with pip install 'spine-wff[train]'" in result.stderr
        assert "patients (" not in result.stderr  # stopped before reading patients and starting tritonserver

    def test_flops_table_names_the_train_extra(self):
        """wff bench --flops alone (the profiles' FLOP table) without torch names [train]."""
        result = run_blocked(WFF_MAIN, "bench", "--flops", blocked=TRAIN_ONLY)
        assert result.returncode == 1 and "pip install 'spine-wff[train]'" in result.stderr, result.stderr


def copy_sources(dest: Path) -> Path:
    """pyproject.toml, the readme and every folder the package maps (tool.setuptools.package-dir), without caches."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / "pyproject.toml", dest)
    shutil.copy2(ROOT / PYPROJECT["project"]["readme"], dest)
    for folder in sorted(set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())):
        shutil.copytree(ROOT / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The spine-wff wheel, built from a copy of the sources without downloading anything."""
    source = copy_sources(tmp_path_factory.mktemp("source") / "spine-wff")
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                             "--wheel-dir", str(out), str(source)], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    (built,) = out.glob("spine_wff-*.whl")
    return built


@pytest.fixture(scope="module")
def wheel_venv(wheel, tmp_path_factory) -> Path:
    """A fresh virtualenv with the wheel installed (--no-deps); the dependencies come from this environment's
    site-packages, named in a .pth file (the .pth files inside it, the editable install's among them, are not run)."""
    venv = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=COMMAND_TIMEOUT_S)
    python = venv / "bin" / "python"
    site_packages = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                        capture_output=True, text=True, check=True).stdout.strip())
    (site_packages / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    result = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", "--no-index",
                             str(wheel)], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    return venv


def wheel_files() -> set[str]:
    """What the wheel must carry, as paths inside it: every module of every package folder (one with an
    __init__.py) under the folders pyproject maps, and every adapter, model_repository/<step>/1/model.py."""
    expected = set()
    for package, folder in PYPROJECT["tool"]["setuptools"]["package-dir"].items():
        base = ROOT / folder
        for path in base.rglob("*.py"):
            if "__pycache__" not in path.parts and (path.parent / "__init__.py").is_file():
                expected.add(f"{package.replace('.', '/')}/{path.relative_to(base).as_posix()}")
    adapters = ROOT / "model_repository"
    return expected | {f"wff/model_repository/{p.relative_to(adapters).as_posix()}" for p in adapters.glob("*/1/model.py")}


class TestWheel:
    def test_wheel_carries_every_module_and_adapter(self, wheel):
        """Every module of the mapped folders and every model_repository/<step>/1/model.py is in the wheel."""
        names = set(zipfile.ZipFile(wheel).namelist())
        missing = sorted(wheel_files() - names)
        assert not missing, f"not in the wheel (a package missing from pyproject's tool.setuptools.packages?): {missing}"
        assert {f"wff/model_repository/{step}/1/model.py" for step in PYTHON_STEPS + MODEL_STEPS} <= names

    def test_fresh_venv_imports_the_wheel(self, wheel_venv):
        """The fresh virtualenv's wff is the installed wheel, not the editable checkout."""
        out = subprocess.run([str(wheel_venv / "bin" / "python"), "-c",
                              "import wff, wff.model_repository; print(wff.__file__); print(wff.model_repository.__file__)"],
                             capture_output=True, text=True, check=True, cwd="/").stdout.split()
        assert all(Path(p).is_relative_to(wheel_venv) for p in out), out

    @pytest.mark.server
    def test_repo_build_serve_and_diagnose(self, wheel_venv, tiny_artifacts, dicom_patient, tmp_path):
        """From outside the checkout: wff repo build --target embedded, wff serve that repository, wff diagnose a patient."""
        wff = str(wheel_venv / "bin" / "wff")
        work = tmp_path / "elsewhere"
        work.mkdir()
        build = subprocess.run([wff, "repo", "build", "--target", "embedded", "--artifacts", str(tiny_artifacts), "repository"],
                               capture_output=True, text=True, cwd=work, timeout=COMMAND_TIMEOUT_S)
        assert build.returncode == 0, build.stderr
        assert (work / "repository" / "preprocess" / "1" / "model.py").is_file()
        ports = {name: free_port() for name in ("grpc", "http", "metrics")}
        serve = subprocess.Popen([wff, "serve", "--repository", "repository",
                                  *(f"--{name}-port={port}" for name, port in ports.items())],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=work, start_new_session=True)
        try:
            started = []
            for line in serve.stdout:  # until wff serve says it serves; it gives up by itself when the server is not ready in time
                started.append(line)
                if line.startswith("Ctrl-C to stop."):
                    break
            assert started and started[-1].startswith("Ctrl-C to stop."), "".join(started)
            result = subprocess.run([wff, "diagnose", str(dicom_patient), "--url", f"127.0.0.1:{ports['grpc']}", "--json", "-"],
                                    capture_output=True, text=True, cwd=work, timeout=COMMAND_TIMEOUT_S)
            assert result.returncode == 0, result.stderr
            assert json.loads(result.stdout)["diagnosis"] in ("benign", "malignant")
            serve.send_signal(signal.SIGTERM)
            serve.communicate(timeout=COMMAND_TIMEOUT_S)
        finally:
            if serve.poll() is None:
                os.killpg(serve.pid, signal.SIGKILL)
                serve.wait()
        assert serve.returncode == 0


class TestSetupScript:
    @pytest.fixture
    def checkout(self, tmp_path) -> tuple[Path, Path]:
        """A stand-in checkout: scripts/setup.sh, a pyproject.toml, and a .venv whose python logs pip calls to
        the returned file (and runs everything else with this interpreter)."""
        root = tmp_path / "checkout"
        (root / "scripts").mkdir(parents=True)
        shutil.copy2(ROOT / "scripts" / "setup.sh", root / "scripts")
        (root / "pyproject.toml").write_text('[project]\nname = "spine-wff"\n')
        (root / ".venv" / "bin").mkdir(parents=True)
        # the stamp of system packages already installed: the list setup.sh names, so it runs no apt-get
        system_packages = re.search(r"^SYSTEM_PACKAGES=\((.*)\)$", (ROOT / "scripts" / "setup.sh").read_text(), re.M)
        (root / ".venv" / ".wff-system-packages").write_text(system_packages.group(1) + "\n")
        pip_log = tmp_path / "pip.log"
        python = root / ".venv" / "bin" / "python"
        python.write_text(f'#!/bin/sh\nif [ "$1" = -m ] && [ "$2" = pip ]; then echo "$*" >> {pip_log}; exit 0; fi\nexec {sys.executable} "$@"\n')
        python.chmod(0o755)
        return root, pip_log

    def test_installs_every_extra_again_when_pyproject_changes(self, checkout):
        """A first run (or a stamp from an older set-up) installs -e .[serve,train,pacs,dev]; a second does nothing;
        a changed pyproject.toml installs again, even with an older modification time."""
        root, pip_log = checkout
        (root / ".venv" / ".wff-installed").touch()  # the empty stamp of an older set-up

        def installs() -> list[str]:
            subprocess.run(["bash", str(root / "scripts" / "setup.sh")], capture_output=True, text=True, check=True, timeout=COMMAND_TIMEOUT_S)
            return [line for line in pip_log.read_text().splitlines() if " -e " in line] if pip_log.exists() else []

        assert installs() == [f"-m pip install --quiet -e {root}[serve,train,pacs,dev]"]
        assert len(installs()) == 1
        pyproject = root / "pyproject.toml"
        before = pyproject.stat()
        pyproject.write_text('[project]\nname = "spine-wff"\ndependencies = ["numpy<2"]\n')
        os.utime(pyproject, ns=(before.st_atime_ns, before.st_mtime_ns - 10**12))  # older than the stamp
        assert len(installs()) == 2
