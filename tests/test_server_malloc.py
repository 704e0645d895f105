"""serving.server_malloc: which allocator tritonserver runs on, and that its backend stubs keep glibc's.

The served test preloads this machine's libm (present everywhere, harmless) instead of jemalloc,
which a fresh machine may lack: what is checked is the mechanism, LD_PRELOAD reaching
tritonserver and being cleared for every stub, with diagnoses still served.
"""

import dataclasses
import logging
import os
import subprocess
from pathlib import Path

import pytest

from wff.client.grpc_client import DiagnosisClient, read_patient_files
from wff.config import ServingConfig
from wff.serving import server as server_mod
from wff.serving.repository import build_repository
from wff.serving.server import ServerError, TritonServer, prepare_backends, repository_serving, resolve_malloc, wrap_backends


def loaded_library(fragment: str) -> Path:
    """Path of a shared library this test process has mapped (e.g. libm)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1]
        if fragment in Path(path).name and Path(path).is_file():
            return Path(path)
    raise AssertionError(f"no {fragment} mapped in this process")


def environ(pid: int) -> dict[str, str]:
    items = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(i.decode(errors="replace").split("=", 1) for i in items if b"=" in i)


class TestResolve:
    def test_glibc_preloads_nothing(self):
        assert resolve_malloc("glibc") is None

    def test_auto_uses_jemalloc_when_installed(self, tmp_path, monkeypatch):
        monkeypatch.setattr(server_mod, "JEMALLOC_DIRS", (str(tmp_path),))
        assert resolve_malloc("auto") is None
        (tmp_path / "libjemalloc.so.2").write_bytes(b"")
        assert resolve_malloc("auto") == tmp_path / "libjemalloc.so.2"
        assert resolve_malloc("jemalloc") == tmp_path / "libjemalloc.so.2"

    def test_jemalloc_missing_says_what_to_do(self, tmp_path, monkeypatch):
        monkeypatch.setattr(server_mod, "JEMALLOC_DIRS", (str(tmp_path),))
        with pytest.raises(ServerError, match=r"serving.server_malloc=jemalloc.*apt install libjemalloc2"):
            resolve_malloc("jemalloc")

    def test_bad_path_is_named(self, tmp_path):
        with pytest.raises(ServerError, match=r"serving.server_malloc: '.*nothing.so'"):
            resolve_malloc(str(tmp_path / "nothing.so"))

    def test_setting_comes_from_the_repository(self, tiny_artifacts, tmp_path):
        from wff.config import load_profile

        serving = load_profile(tiny_artifacts / "profile.json").serving
        repo = build_repository(tmp_path / "repo", "embedded", tiny_artifacts,
                                serving=dataclasses.replace(serving, server_malloc="glibc", server_malloc_conf="narenas:1"))
        assert repository_serving(repo) == dataclasses.replace(serving, server_malloc="glibc", server_malloc_conf="narenas:1")
        assert repository_serving(tmp_path) == ServingConfig()  # no profile

    def test_default_conf_is_valid_for_jemalloc(self):
        """jemalloc prints "<jemalloc>: Invalid conf ..." for an option it does not know, and carries on with its defaults."""
        lib = server_mod.find_jemalloc()
        if lib is None:
            assert os.geteuid() != 0, "scripts/setup.sh installs libjemalloc2 when run as root"
            pytest.skip("libjemalloc is not installed (scripts/setup.sh installs it when run as root)")
        conf = ServingConfig().server_malloc_conf
        assert conf, "serving.server_malloc_conf has no default"
        run = subprocess.run(["/bin/true"], env={"LD_PRELOAD": str(lib), "MALLOC_CONF": conf}, capture_output=True, text=True)
        assert run.returncode == 0 and run.stderr == "", run.stderr
        bad = subprocess.run(["/bin/true"], env={"LD_PRELOAD": str(lib), "MALLOC_CONF": "no_such_option:1"}, capture_output=True, text=True)
        assert "Invalid conf" in bad.stderr  # the check above can fail

    def test_stub_wrapper_clears_the_variable(self, tmp_path):
        python = prepare_backends(tmp_path, ("LD_PRELOAD",)) / "python"
        wrapper = (python / "triton_python_backend_stub").read_text()
        assert wrapper.startswith("#!/bin/sh\nunset LD_PRELOAD\nexec ")
        assert (python / "triton_python_backend_stub").stat().st_mode & 0o111
        assert (python / "triton_python_backend_stub").is_file() and not (python / "triton_python_backend_stub").is_symlink()
        plain = prepare_backends(tmp_path / "plain") / "python" / "triton_python_backend_stub"
        assert plain.is_symlink()


    def test_stub_wrapper_exports_tunables_without_preload(self, tmp_path):
        """On glibc (nothing preloaded) the stubs still get their tunables, through a wrapper."""
        python = prepare_backends(tmp_path, (), {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) / "python"
        wrapper = (python / "triton_python_backend_stub").read_text()
        assert wrapper.startswith("#!/bin/sh\nexport GLIBC_TUNABLES=glibc.malloc.arena_max=2\nexec ") and "unset" not in wrapper

    def test_wrapped_backend_directory(self, tmp_path):
        """Another installation's backend directory is mirrored by links, with a stub wrapper that clears LD_PRELOAD."""
        source = prepare_backends(tmp_path / "source")
        (source / "onnxruntime").mkdir()
        wrapped = wrap_backends(source, tmp_path / "wrapped", ("LD_PRELOAD",))
        assert (wrapped / "onnxruntime").resolve() == source / "onnxruntime"
        assert (wrapped / "python" / "libtriton_python.so").resolve() == (source / "python" / "libtriton_python.so").resolve()
        stub = wrapped / "python" / "triton_python_backend_stub"
        assert stub.read_text() == f"#!/bin/sh\nunset LD_PRELOAD\nexec {source / 'python' / 'triton_python_backend_stub'} \"$@\"\n"


class TestGlibcWarning:
    """A server on glibc's malloc, which the soak did not pass with, says so at start-up and what to install."""

    @pytest.mark.parametrize("setting", ["auto", "glibc"])
    def test_glibc_warns(self, tiny_artifacts, monkeypatch, caplog, setting):
        monkeypatch.setattr(server_mod, "find_jemalloc", lambda: None)
        with caplog.at_level(logging.WARNING, logger="wff.serving.server"):
            TritonServer(tiny_artifacts, grpc_port=1, http_port=2, metrics_port=3, server_malloc=setting).close()
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(f"glibc's malloc (serving.server_malloc={setting})" in w and "apt install libjemalloc2" in w for w in warnings), warnings

    def test_jemalloc_is_quiet(self, tiny_artifacts, tmp_path, monkeypatch, caplog):
        lib = tmp_path / "libjemalloc.so.2"
        lib.write_bytes(b"")
        monkeypatch.setattr(server_mod, "find_jemalloc", lambda: lib)
        with caplog.at_level(logging.WARNING, logger="wff.serving.server"):
            server = TritonServer(tiny_artifacts, grpc_port=1, http_port=2, metrics_port=3, server_malloc="auto")
            server.close()
        assert server.allocator == str(lib) and "malloc" not in caplog.text


@pytest.mark.server
def test_preload_reaches_tritonserver_only(tiny_artifacts, dicom_patient, tmp_path):
    lib = loaded_library("libm.so")
    repo = build_repository(tmp_path / "repository", "embedded", tiny_artifacts)
    with TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, server_malloc=str(lib)) as server:
        assert environ(server.process.pid).get("LD_PRELOAD") == str(lib.resolve())
        assert environ(server.process.pid).get("MALLOC_CONF") == ServingConfig().server_malloc_conf
        stubs = server.stub_pids()
        assert stubs, "no backend stubs found"
        for pid, model in stubs.items():
            assert "LD_PRELOAD" not in environ(pid), f"stub of {model} inherited LD_PRELOAD"
            assert "MALLOC_CONF" not in environ(pid), f"stub of {model} inherited MALLOC_CONF"
            # glibc parses GLIBC_TUNABLES in place at start-up (it cuts the string after the first tunable),
            # so /proc shows the first one: enough to see that the variable reached the stub
            tunables = environ(pid).get("GLIBC_TUNABLES")
            assert tunables and ServingConfig().stub_malloc_tunables.startswith(tunables), (model, tunables)
        assert "GLIBC_TUNABLES" not in environ(server.process.pid)
        with DiagnosisClient(server.grpc_url, timeout_s=60) as client:
            result = client.diagnose(read_patient_files(dicom_patient))
        assert result.label in ("benign", "malignant") and result.series_votes.size == 3
