"""gRPC over TLS with a self-signed certificate, and loopback binding by default.

The certificate is made with the openssl command line (no Python crypto package is needed);
it names localhost and 127.0.0.1, so the client verifies the host against it.
"""

from __future__ import annotations

import asyncio
import subprocess
import urllib.error
import urllib.request

import pytest
import tritonclient.grpc as grpcclient
from click.testing import CliRunner
from tritonclient.utils import InferenceServerException

from wff.cli import main
from wff.client.grpc_client import AsyncDiagnosisClient, DiagnosisClient, DiagnosisError, read_patient_files
from wff.serving.repository import build_repository
from wff.serving.server import ServerError, TritonServer, listening_sockets, process_name

TIMEOUT_S = 30


def self_signed(folder) -> tuple[str, str]:
    """(certificate, key) PEM paths of a one-day RSA certificate for localhost / 127.0.0.1."""
    cert, key = folder / "server.crt", folder / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return str(cert), str(key)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[str, str]:
    return self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_server(tiny_artifacts, certificate, tmp_path_factory):
    repo = build_repository(tmp_path_factory.mktemp("tls-served") / "repository", "embedded", tiny_artifacts)
    cert, key = certificate
    with TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, tls_cert=cert, tls_key=key, restrict_repository_api=True) as server:
        yield server


@pytest.mark.server
class TestTls:
    def test_tls_client_diagnoses(self, tls_server, certificate, dicom_patient):
        """A client with ssl=True and the certificate as root gets a diagnosis."""
        with DiagnosisClient(tls_server.grpc_url, ssl=True, root_certificates=certificate[0], timeout_s=TIMEOUT_S) as client:
            assert client.diagnose(read_patient_files(dicom_patient)).label in ("benign", "malignant")

    def test_async_tls_client_diagnoses(self, tls_server, certificate, dicom_patient):
        """The asyncio client (wff evaluate) works over TLS too."""

        async def run():
            async with AsyncDiagnosisClient(tls_server.grpc_url, ssl=True, root_certificates=certificate[0], timeout_s=TIMEOUT_S) as client:
                return await client.diagnose(read_patient_files(dicom_patient))

        assert asyncio.run(run()).label in ("benign", "malignant")

    def test_plaintext_client_refused(self, tls_server, dicom_patient):
        """A client without TLS gets no diagnosis from a TLS server: UNAVAILABLE."""
        with DiagnosisClient(tls_server.grpc_url, timeout_s=TIMEOUT_S) as client, pytest.raises(DiagnosisError) as e:
            client.diagnose(read_patient_files(dicom_patient))
        assert e.value.status == "UNAVAILABLE"

    def test_untrusted_certificate_refused(self, tls_server, dicom_patient):
        """TLS against the system roots fails: the self-signed certificate is not trusted."""
        with DiagnosisClient(tls_server.grpc_url, ssl=True, timeout_s=TIMEOUT_S) as client, pytest.raises(DiagnosisError) as e:
            client.diagnose(read_patient_files(dicom_patient))
        assert e.value.status == "UNAVAILABLE"

    def test_diagnose_command_with_ssl(self, tls_server, certificate, dicom_patient):
        """wff diagnose --ssl --root-certificates CERT works against the TLS server."""
        args = ["diagnose", str(dicom_patient), "--url", tls_server.grpc_url, "--ssl", "--root-certificates", certificate[0]]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        assert "Diagnosis:" in result.output

    def test_repository_api_needs_the_secret(self, tls_server, certificate):
        """With the repository API restricted, a client can neither list nor unload models; inference still works."""
        with grpcclient.InferenceServerClient(tls_server.grpc_url, ssl=True, root_certificates=certificate[0]) as c:
            for call in (c.get_model_repository_index, lambda: c.unload_model("preprocess")):
                with pytest.raises(InferenceServerException, match="restricted|not allowed|header"):
                    call()
            assert c.is_model_ready("preprocess")
        request = urllib.request.Request(f"{tls_server.http_url}/v2/repository/models/preprocess/unload", data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(request, timeout=10)
        assert tls_server.repository_api_restricted and tls_server.is_healthy()

    def test_every_endpoint_on_loopback(self, tls_server):
        """tritonserver listens on 127.0.0.1 only: gRPC, HTTP and metrics ports, nothing else."""
        pid = tls_server.process.pid
        assert process_name(pid) == "tritonserver"
        assert listening_sockets(pid) == sorted(
            ("127.0.0.1", port) for port in (tls_server.grpc_port, tls_server.http_port, tls_server.metrics_port)
        )


class TestTlsArguments:
    def test_key_without_certificate(self, tiny_artifacts, tmp_path):
        """Only one of certificate and key is refused before anything starts."""
        key = tmp_path / "k.pem"
        key.write_text("x")
        with pytest.raises(ServerError, match="needs both a certificate and its private key"):
            TritonServer(tiny_artifacts, tls_key=key)

    def test_serve_needs_both(self, tiny_artifacts, tmp_path):
        """wff serve --tls-cert without --tls-key is a usage error."""
        cert = tmp_path / "c.pem"
        cert.write_text("x")
        result = CliRunner().invoke(main, ["serve", "--artifacts", str(tiny_artifacts), "--tls-cert", str(cert)])
        assert result.exit_code == 2 and "give both --tls-cert and --tls-key" in result.output

    def test_default_address_is_loopback(self, tiny_artifacts):
        """Without an address, every endpoint URL is 127.0.0.1."""
        server = TritonServer(tiny_artifacts, grpc_port=1, http_port=2, metrics_port=3)
        assert (server.grpc_url, server.http_url, server.metrics_url) == (
            "127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3/metrics")
        server.close()

    def test_public_address_without_tls_warns(self, tiny_artifacts, caplog):
        """Binding to all interfaces without TLS logs a warning that says what is exposed, and locks the repository API."""
        server = TritonServer(tiny_artifacts, address="0.0.0.0", grpc_port=1, http_port=2, metrics_port=3)
        flags = server.command(tiny_artifacts)
        server.close()
        assert "without TLS" in caplog.text and "0.0.0.0" in caplog.text
        assert server.repository_api_restricted and any(f.startswith("--grpc-restricted-protocol=model-repository:") for f in flags)

    def test_loopback_keeps_the_repository_api_open(self, tiny_artifacts):
        """On 127.0.0.1 the repository API stays open to local clients (model index, operators)."""
        server = TritonServer(tiny_artifacts, grpc_port=1, http_port=2, metrics_port=3)
        flags = server.command(tiny_artifacts)
        server.close()
        assert not server.repository_api_restricted and not [f for f in flags if "restricted" in f]
