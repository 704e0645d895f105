"""wff.serving.trt_runtime: the error without TensorRT and the TensorRT version checks, no GPU needed."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from wff.serving import trt_runtime
from wff.serving.trt_cli import trt as trt_group


class TestTensorRTMissing:
    def test_import_error_message(self, no_tensorrt):
        """Without TensorRT: the message says where to run it."""
        with pytest.raises(trt_runtime.TensorRTUnavailable) as e:
            trt_runtime.import_tensorrt()
        assert str(e.value) == "TensorRT is not installed: run this inside the NGC tritonserver container, see docker/README.md"

    def test_build_command_fails_cleanly(self, trt_repo, no_tensorrt):
        """`wff trt build` preflights, then exits 1 with that message (no traceback)."""
        result = CliRunner().invoke(trt_group, ["build", str(trt_repo)])
        assert result.exit_code == 1
        assert "TensorRT is not installed" in result.output and "docker/README.md" in result.output
        assert not (trt_repo / "detector" / "1" / "model.plan").exists()


class TestVersions:
    LDD = (
        "\tlinux-vdso.so.1 (0x00007ffd)\n"
        "\tlibnvinfer.so.10 => /usr/lib/x86_64-linux-gnu/libnvinfer.so.10 (0x00007f1)\n"
        "\tlibnvinfer_plugin.so.10 => /usr/lib/x86_64-linux-gnu/libnvinfer_plugin.so.10 (0x00007f2)\n"
    )

    def test_parse_ldd(self):
        """ldd's libnvinfer line (not the plugin's) gives the library path."""
        assert trt_runtime.parse_ldd_libnvinfer(self.LDD) == "/usr/lib/x86_64-linux-gnu/libnvinfer.so.10"
        assert trt_runtime.parse_ldd_libnvinfer("\tlibc.so.6 => /lib/libc.so.6\n") is None

    def test_library_version_follows_the_soname_link(self, tmp_path):
        """libnvinfer.so.10 -> libnvinfer.so.10.5.0 gives 10.5.0."""
        (tmp_path / "libnvinfer.so.10.5.0").write_bytes(b"")
        (tmp_path / "libnvinfer.so.10").symlink_to("libnvinfer.so.10.5.0")
        assert trt_runtime.library_version(tmp_path / "libnvinfer.so.10") == "10.5.0"

    @pytest.mark.parametrize("a, b, same", [("10.5.0", "10.5.0", True), ("10.5.0.18", "10.5.0", True), ("10.6.0", "10.5.0", False)])
    def test_same_release(self, a, b, same):
        """Plans need the same major.minor.patch."""
        assert trt_runtime.same_release(a, b) is same
