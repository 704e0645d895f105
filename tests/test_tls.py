"""gRPC over TLS with a self-signed certificate, mutual TLS, and each endpoint's bind address.

Certificates are made with the openssl command line (no Python crypto package is needed); the
server's name localhost, 127.0.0.1 and the machine's network address, so the client verifies
the host against them. The mutual-TLS server listens for gRPC on that network address (all
interfaces when the machine has none) while HTTP and metrics stay on loopback.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import subprocess
import urllib.error
import urllib.request

import pytest
import tritonclient.grpc as grpcclient
from click.testing import CliRunner
from conftest import serve_embedded
from tritonclient.utils import InferenceServerException

from wff.cli import main
from wff.client.grpc_client import (AsyncDiagnosisClient, DiagnosisClient, DiagnosisError, build_inputs, parse_result,
                                    read_patient_files, requested_outputs)
from wff.contracts import ENSEMBLE_NAME
from wff.serving.repository import build_repository
from wff.processes import listening_sockets, process_name
from wff.serving.server import ServerError, TritonServer

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


def network_address() -> str:
    """A non-loopback IPv4 address of this machine (the source address of its default route), or
    0.0.0.0 (every interface) when it has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("203.0.113.1", 9))  # a documentation address; connecting a UDP socket sends nothing
            ip = s.getsockname()[0]
        except OSError:
            return "0.0.0.0"
    return "0.0.0.0" if ipaddress.ip_address(ip).is_loopback else ip


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(folder, name: str) -> tuple[str, str]:
    """(certificate, key) PEM paths of a one-day self-signed certificate authority."""
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}",
            "-keyout", str(key), "-out", str(cert))
    return str(cert), str(key)


def make_signed(folder, name: str, ca: tuple[str, str], alt_names: str | None = None) -> tuple[str, str]:
    """(certificate, key) PEM paths of a one-day certificate for ``name`` signed by ``ca``; ``alt_names``
    is its subjectAltName (a server's host names and addresses)."""
    cert, key, request = folder / f"{name}.crt", folder / f"{name}.key", folder / f"{name}.csr"
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(request))
    extensions = []
    if alt_names:
        (folder / f"{name}.ext").write_text(f"subjectAltName={alt_names}\n")
        extensions = ["-extfile", str(folder / f"{name}.ext")]
    openssl("x509", "-req", "-in", str(request), "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial", "-days", "1",
            *extensions, "-out", str(cert))
    return str(cert), str(key)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[str, str]:
    return self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_server(tiny_artifacts, certificate, tmp_path_factory):
    cert, key = certificate
    yield from serve_embedded(tiny_artifacts, tmp_path_factory, "tls-served", tls_cert=cert, tls_key=key, restrict_repository_api=True)


@pytest.mark.server
class TestTls:
    def test_tls_client_diagnoses(self, tls_server, certificate, dicom_patient):
        """A client with the certificate as its TLS root gets a diagnosis."""
        with DiagnosisClient(tls_server.grpc_url, tls_ca=certificate[0], timeout_s=TIMEOUT_S) as client:
            assert client.diagnose(read_patient_files(dicom_patient)).label in ("benign", "malignant")

    def test_async_tls_client_diagnoses(self, tls_server, certificate, dicom_patient):
        """The asyncio client (wff evaluate) works over TLS too."""

        async def run():
            async with AsyncDiagnosisClient(tls_server.grpc_url, tls_ca=certificate[0], timeout_s=TIMEOUT_S) as client:
                return await client.diagnose(read_patient_files(dicom_patient))

        assert asyncio.run(run()).label in ("benign", "malignant")

    def test_plaintext_client_refused(self, tls_server, dicom_patient):
        """A client without TLS gets no diagnosis from a TLS server: UNAVAILABLE."""
        with DiagnosisClient(tls_server.grpc_url, timeout_s=TIMEOUT_S, retries=0) as client, pytest.raises(DiagnosisError) as e:
            client.diagnose(read_patient_files(dicom_patient))
        assert e.value.status == "UNAVAILABLE"

    def test_untrusted_certificate_refused(self, tls_server, dicom_patient):
        """TLS against the system roots fails: the self-signed certificate is not trusted."""
        with DiagnosisClient(tls_server.grpc_url, ssl=True, timeout_s=TIMEOUT_S, retries=0) as client, pytest.raises(DiagnosisError) as e:
            client.diagnose(read_patient_files(dicom_patient))
        assert e.value.status == "UNAVAILABLE"

    def test_diagnose_command_with_ssl(self, tls_server, certificate, dicom_patient):
        """wff diagnose --tls-ca CERT works against the TLS server."""
        args = ["diagnose", str(dicom_patient), "--url", tls_server.grpc_url, "--tls-ca", certificate[0]]
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
    def test_client_ca_needs_server_certificate(self, tiny_artifacts, certificate):
        """Mutual TLS without the server's own certificate and key is refused before anything starts."""
        with pytest.raises(ServerError, match="mutual TLS .* needs the server's own certificate"):
            TritonServer(tiny_artifacts, tls_client_ca=certificate[0])

    def test_serve_client_ca_needs_certificate(self, tiny_artifacts, certificate):
        """wff serve --tls-client-ca without --tls-cert/--tls-key is a usage error."""
        result = CliRunner().invoke(main, ["serve", "--artifacts", str(tiny_artifacts), "--tls-client-ca", certificate[0]])
        assert result.exit_code == 2 and "--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key" in result.output

    def test_client_ca_flags(self, tiny_artifacts, certificate):
        """--tls-client-ca turns on Triton's mutual TLS with that CA as the root for client certificates."""
        cert, key = certificate
        server = TritonServer(tiny_artifacts, grpc_port=1, http_port=2, metrics_port=3, tls_cert=cert, tls_key=key, tls_client_ca=cert)
        flags = server.command(tiny_artifacts)
        server.close()
        assert {"--grpc-use-ssl=true", "--grpc-use-ssl-mutual=true", f"--grpc-root-cert={server.tls_client_ca}"} <= set(flags)

    def test_each_endpoint_has_its_address(self, tiny_artifacts, certificate):
        """grpc/http/metrics addresses default to address; a server on every interface is reached through loopback."""
        server = TritonServer(tiny_artifacts, address="127.0.0.2", grpc_address="0.0.0.0", grpc_port=1, http_port=2, metrics_port=3,
                              tls_cert=certificate[0], tls_key=certificate[1])
        flags = server.command(tiny_artifacts)
        server.close()
        assert {"--grpc-address=0.0.0.0", "--http-address=127.0.0.2", "--metrics-address=127.0.0.2"} <= set(flags)
        assert (server.grpc_url, server.http_url, server.metrics_url) == (
            "127.0.0.1:1", "http://127.0.0.2:2", "http://127.0.0.2:3/metrics")

    def test_tls_grpc_on_network_warns_about_nothing(self, tiny_artifacts, certificate, caplog):
        """gRPC with TLS on the network, HTTP and metrics on loopback: no plain-text warning; the repository API is locked."""
        with caplog.at_level(logging.WARNING):
            server = TritonServer(tiny_artifacts, grpc_address="0.0.0.0", grpc_port=1, http_port=2, metrics_port=3,
                                  tls_cert=certificate[0], tls_key=certificate[1])
        server.close()
        assert "without TLS" not in caplog.text and server.repository_api_restricted

    def test_network_http_warns_and_locks_the_repository_api(self, tiny_artifacts, caplog):
        """HTTP on the network (gRPC on loopback): a warning naming HTTP and --http-address; the repository API is locked."""
        with caplog.at_level(logging.WARNING):
            server = TritonServer(tiny_artifacts, http_address="0.0.0.0", grpc_port=1, http_port=2, metrics_port=3)
        server.close()
        assert "HTTP will listen on 0.0.0.0 without TLS" in caplog.text and "--http-address" in caplog.text
        assert "gRPC will listen" not in caplog.text and "metrics will listen" not in caplog.text
        assert server.repository_api_restricted

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


@pytest.fixture(scope="module")
def mutual(tmp_path_factory) -> dict:
    """A CA, a server certificate it signed (localhost, 127.0.0.1, the network address), a client
    certificate it signed, and a client certificate from another CA."""
    folder = tmp_path_factory.mktemp("mtls")
    ca, other_ca = make_ca(folder, "ca"), make_ca(folder, "other-ca")
    host = network_address()
    names = "DNS:localhost,IP:127.0.0.1" + ("" if host == "0.0.0.0" else f",IP:{host}")
    return {"host": host, "ca": ca[0], "server": make_signed(folder, "server", ca, names),
            "client": make_signed(folder, "client", ca), "stranger": make_signed(folder, "stranger", other_ca)}


@pytest.fixture(scope="module")
def mtls_server(tiny_artifacts, mutual, tmp_path_factory):
    """gRPC with mutual TLS on the network address; HTTP and metrics on loopback."""
    repo = build_repository(tmp_path_factory.mktemp("mtls-served") / "repository", "embedded", tiny_artifacts)
    cert, key = mutual["server"]
    with TritonServer(repo, grpc_port=0, http_port=0, metrics_port=0, grpc_address=mutual["host"], tls_cert=cert, tls_key=key,
                      tls_client_ca=mutual["ca"]) as server:
        yield server


def raw_diagnose(server, mutual, dicom_patient, client_cert: tuple[str, str] | None):
    """One diagnosis through tritonclient directly, presenting ``client_cert`` (certificate, key) or none."""
    keys = {} if client_cert is None else {"certificate_chain": client_cert[0], "private_key": client_cert[1]}
    with grpcclient.InferenceServerClient(server.grpc_url, ssl=True, root_certificates=mutual["ca"], **keys) as client:
        result = client.infer(ENSEMBLE_NAME, build_inputs(read_patient_files(dicom_patient), None), outputs=requested_outputs(),
                              client_timeout=TIMEOUT_S)
    return parse_result(result)


@pytest.mark.server
class TestMutualTls:
    def test_grpc_on_the_network_http_and_metrics_on_loopback(self, mtls_server, mutual):
        """gRPC listens on the network address; HTTP and metrics only on 127.0.0.1."""
        assert listening_sockets(mtls_server.process.pid) == sorted(
            [(mutual["host"], mtls_server.grpc_port), ("127.0.0.1", mtls_server.http_port), ("127.0.0.1", mtls_server.metrics_port)])
        assert mtls_server.repository_api_restricted and mtls_server.is_healthy()

    def test_client_certificate_diagnoses(self, mtls_server, mutual, dicom_patient):
        """A client presenting a certificate signed by the server's client CA gets a diagnosis."""
        assert raw_diagnose(mtls_server, mutual, dicom_patient, mutual["client"]).label in ("benign", "malignant")

    @pytest.mark.parametrize("who", ["none", "stranger"])
    def test_client_without_accepted_certificate_refused(self, mtls_server, mutual, dicom_patient, who):
        """No client certificate, or one from another CA: the handshake fails (UNAVAILABLE), no diagnosis."""
        with pytest.raises(InferenceServerException) as e:
            raw_diagnose(mtls_server, mutual, dicom_patient, None if who == "none" else mutual["stranger"])
        assert e.value.status() == "StatusCode.UNAVAILABLE"

    def test_diagnose_command_with_client_certificate(self, mtls_server, mutual, dicom_patient):
        """wff diagnose --tls-ca --tls-cert --tls-key works against the mutual-TLS server."""
        cert, key = mutual["client"]
        args = ["diagnose", str(dicom_patient), "--url", mtls_server.grpc_url, "--tls-ca", mutual["ca"], "--tls-cert", cert, "--tls-key", key]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        assert "Diagnosis:" in result.output
