"""The client against a real tritonserver that requires mutual TLS: the --tls-* options, the gRPC
message limit, and `wff evaluate`'s exit code and failure report.

The certificates are made here with the openssl command line: a test CA, a server certificate
for localhost / 127.0.0.1 and a client certificate, both signed by that CA. The server trusts
client certificates of that CA only.
"""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from click.testing import CliRunner
from conftest import serve_embedded, write_dicom_patient
from tritonclient.utils import InferenceServerException

from wff.cli import main
from wff.client import evaluate as evaluate_module
from wff.client.grpc_client import GRPC_FRAMING_BYTES, build_inputs, channel_kwargs, read_patient_files
from wff.contracts import ENSEMBLE_NAME

TIMEOUT = "30"  # --timeout of the commands, seconds


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def signed(folder: Path, name: str, subject: str, extensions: str, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    """(certificate, key) PEM paths: a one-day RSA certificate for ``subject`` signed by ``ca``."""
    key, csr, cert, ext = (folder / f"{name}.{suffix}" for suffix in ("key", "csr", "crt", "ext"))
    ext.write_text(extensions + "\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", str(key), "-out", str(csr))
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial", "-days", "1",
            "-extfile", str(ext), "-out", str(cert))
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """ca (certificate), server_cert/server_key, client_cert/client_key, other_cert/other_key (signed by another CA)."""
    folder = tmp_path_factory.mktemp("pki")
    cas = {}
    for name in ("ca", "other_ca"):
        cert, key = folder / f"{name}.crt", folder / f"{name}.key"
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN=wff test {name}",
                "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
                "-keyout", str(key), "-out", str(cert))
        cas[name] = (cert, key)
    server = signed(folder, "server", "/CN=localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth", cas["ca"])
    client = signed(folder, "client", "/CN=wff test client", "extendedKeyUsage=clientAuth", cas["ca"])
    other = signed(folder, "other", "/CN=wff other client", "extendedKeyUsage=clientAuth", cas["other_ca"])
    return {"ca": cas["ca"][0], "server_cert": server[0], "server_key": server[1], "client_cert": client[0], "client_key": client[1],
            "other_cert": other[0], "other_key": other[1]}


@pytest.fixture(scope="module")
def mtls_server(limited_artifacts, pki, tmp_path_factory):
    yield from serve_embedded(limited_artifacts, tmp_path_factory, "mtls", tls_cert=pki["server_cert"], tls_key=pki["server_key"],
                              tls_client_ca=pki["ca"])


def tls_args(pki, client: str = "client") -> list[str]:
    return ["--tls-ca", str(pki["ca"]), "--tls-cert", str(pki[f"{client}_cert"]), "--tls-key", str(pki[f"{client}_key"])]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """labels.csv and four test patients: P1, P2 good; P3 a folder of non-DICOM files; P4 good on disk."""
    root = tmp_path_factory.mktemp("dataset")
    for pid, seed in (("P1", 1), ("P2", 2), ("P4", 4)):
        write_dicom_patient(root / pid, {"SAG T1": 5, "SAG T2": 5}, seed=seed)
    (root / "P3" / "SAG T2").mkdir(parents=True)
    for k in range(3):
        (root / "P3" / "SAG T2" / f"IM{k}.dcm").write_bytes(b"not a DICOM file " * 20)
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["patient_id", "label", "age", "location", "split"])
        writer.writerows([(pid, label, "60", "lumbar", "test") for pid, label in
                          (("P1", "benign"), ("P2", "malignant"), ("P3", "benign"), ("P4", "malignant"))])
    return root


@pytest.mark.server
class TestClientTls:
    def test_diagnose_with_client_certificate(self, mtls_server, pki, dicom_patient):
        """--tls-ca with --tls-cert/--tls-key: the server accepts the client and diagnoses."""
        args = ["diagnose", str(dicom_patient), "--url", mtls_server.grpc_url, "--timeout", TIMEOUT, *tls_args(pki)]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        assert "Diagnosis:" in result.output

    @pytest.mark.parametrize("case", ["no client certificate", "client certificate of another CA", "server not trusted"])
    def test_refused_without_the_right_certificates(self, mtls_server, pki, dicom_patient, case):
        """No client certificate, one the server's CA did not sign, or no --tls-ca for the server's CA: no diagnosis, exit 1."""
        tls = {"no client certificate": ["--tls-ca", str(pki["ca"])],
               "client certificate of another CA": tls_args(pki, "other"),
               "server not trusted": ["--ssl", "--tls-cert", str(pki["client_cert"]), "--tls-key", str(pki["client_key"])]}[case]
        args = ["diagnose", str(dicom_patient), "--url", mtls_server.grpc_url, "--timeout", TIMEOUT, "--retries", "0", *tls]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and "no server answered" in result.output and "Diagnosis:" not in result.output

    def test_message_limit_enforced_by_grpc(self, mtls_server, pki):
        """The channel's send limit (max_bytes plus framing) is what gRPC enforces: a larger message is not sent."""
        kwargs = channel_kwargs(tls_ca=pki["ca"], tls_cert=pki["client_cert"], tls_key=pki["client_key"], max_bytes=1000)
        files = [("big.dcm", b"x" * (GRPC_FRAMING_BYTES + 2000))]
        with grpcclient.InferenceServerClient(mtls_server.grpc_url, **kwargs) as client, pytest.raises(InferenceServerException) as e:
            client.infer(ENSEMBLE_NAME, build_inputs(files, None), client_timeout=30)
        assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED" and "larger than max" in e.value.message()


@pytest.mark.server
class TestEvaluateFailures:
    def test_failed_patients_exit_1_and_the_others_are_kept(self, mtls_server, pki, dataset, tmp_path, monkeypatch):
        """A rejected patient and one whose reading raises OSError: exit 1, failures counted by reason, every result written."""
        original = evaluate_module.read_patient_files

        def read(path):
            if Path(path).name == "P4":
                raise OSError(5, "Input/output error", str(Path(path) / "SAG T1" / "IM0001.dcm"))
            return original(path)

        monkeypatch.setattr(evaluate_module, "read_patient_files", read)
        csv_out, json_out = tmp_path / "patients.csv", tmp_path / "metrics.json"
        args = ["evaluate", str(dataset), "--url", mtls_server.grpc_url, "--timeout", TIMEOUT, *tls_args(pki),
                "--csv", str(csv_out), "--json", str(json_out), "--concurrency", "2"]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1, result.output
        assert "2 of 4 patients failed" in result.output
        assert "1  input rejected by the server: P3" in result.output and "1  unexpected OSError: P4" in result.output
        assert "2 of 4 patients diagnosed (2 errors)" in result.output  # the table of the others is still printed
        rows = {r["patient_id"]: r for r in csv.DictReader(open(csv_out))}
        assert set(rows) == {"P1", "P2", "P3", "P4"}
        assert rows["P1"]["predicted_label"] and rows["P2"]["predicted_label"]
        assert "DICOM_FILES[" in rows["P3"]["error"] and rows["P4"]["error"].startswith("unexpected OSError: [Errno 5] Input/output error")
        data = json.loads(json_out.read_text())
        assert (data["patients"], data["errors"]) == (4, 2)
        assert data["failures"] == {"input rejected by the server": ["P3"], "unexpected OSError": ["P4"]}

    def test_all_diagnosed_exits_0(self, mtls_server, pki, dataset, tmp_path):
        """Without failures the exit code is 0 (P3 removed from the split)."""
        text = (dataset / "labels.csv").read_text().replace("P3,benign,60,lumbar,test", "P3,benign,60,lumbar,train")
        local = tmp_path / "ds"
        local.mkdir()
        (local / "labels.csv").write_text(text)
        for pid in ("P1", "P2", "P3", "P4"):
            (local / pid).symlink_to(dataset / pid, target_is_directory=True)
        result = CliRunner().invoke(main, ["evaluate", str(local), "--url", mtls_server.grpc_url, "--timeout", TIMEOUT, *tls_args(pki)])
        assert result.exit_code == 0, result.output
        assert "3 of 3 patients diagnosed (0 errors)" in result.output and "failed" not in result.output
