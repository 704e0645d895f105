"""The gRPC client, the evaluation loop and their CLI, without a server (see test_server.py for the real one)."""

import asyncio
import csv
import json
import logging
import math
import time

import numpy as np
import pytest
from click.testing import CliRunner
from tritonclient.utils import InferenceServerException

from wff.cli import main
from wff.training.dataset import load_records
from wff.client.evaluate import Evaluation, PatientResult, compare_evaluations, diagnose_records, score
from wff.client.grpc_client import (
    DEFAULT_MAX_BYTES,
    GRPC_FRAMING_BYTES,
    MAX_RETRY_PAUSE_S,
    RETRY_PAUSE_S,
    AsyncDiagnosisClient,
    DiagnosisClient,
    DiagnosisError,
    RejectedInput,
    RequestTooLarge,
    ServerBusy,
    ServerUnavailable,
    build_inputs,
    channel_kwargs,
    read_patient_files,
    settings_from_config,
    translate_error,
)
from wff.config import ServingConfig
from wff.ensemble.diagnosis import Diagnosis
from wff.ensemble.fusion import PAPER_ROW, STRATEGIES, FusionSettings
from wff.processes import free_port


def fake_diagnosis(d: float, m: float, label: str = "malignant") -> Diagnosis:
    """Two series of two slices, every slice's D = d, every series' M = m, no age."""
    return Diagnosis(
        label=label, p_malignant=d, series_votes=np.array([1, 1], np.int32), series_m=np.array([m, m], np.float32),
        series_info=({"index": 0}, {"index": 1}), series_regions=np.zeros((2, 5), np.float32),
        slice_d=np.full(4, d, np.float32), slice_score=np.full(4, 0.9, np.float32), slice_box=np.zeros((4, 4), np.float32),
        slice_series=np.array([0, 0, 1, 1], np.int32), age_a=math.nan, age_used=math.nan, notes={},
    )


def write_dataset(root, rows):
    root.mkdir(exist_ok=True)
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient_id", "label", "age", "location", "split"])
        w.writerows(rows)
    for pid, *_ in rows:
        (root / pid / "s").mkdir(parents=True, exist_ok=True)
        (root / pid / "s" / "IM1.dcm").write_bytes(b"DICM")
    return root


class TestReadPatientFiles:
    def test_skips_json_and_csv_and_uses_relative_names(self, tmp_path):
        """Annotations and tables are not sent; names are relative to the patient folder."""
        (tmp_path / "T2").mkdir()
        (tmp_path / "T2" / "IM2.dcm").write_bytes(b"b")
        (tmp_path / "T2" / "IM2.json").write_text("{}")
        (tmp_path / "IM1").write_bytes(b"a")
        (tmp_path / "labels.CSV").write_text("x")
        assert read_patient_files(tmp_path) == [("IM1", b"a"), ("T2/IM2.dcm", b"b")]

    def test_empty_folder_is_an_error(self, tmp_path):
        """A folder with nothing to send says so."""
        with pytest.raises(FileNotFoundError, match="no files to send"):
            read_patient_files(tmp_path)


class TestBuildInputs:
    def test_age_absent_is_zero_elements(self):
        """No age -> AGE_YEARS with shape [0]; the files become one BYTES element each."""
        files_in, age_in = build_inputs([("a", b"1"), ("b", b"22")], None)
        assert (files_in.name(), files_in.shape(), files_in.datatype()) == ("DICOM_FILES", [2], "BYTES")
        assert (age_in.name(), age_in.shape(), age_in.datatype()) == ("AGE_YEARS", [0], "FP32")

    def test_age_given(self):
        """An age is one FP32 element."""
        assert build_inputs([("a", b"1")], 63.0)[1].shape() == [1]


class TestTranslateError:
    def test_invalid_argument_names_the_file(self):
        """INVALID_ARGUMENT becomes RejectedInput, DICOM_FILES[i] annotated with the client's file name."""
        e = InferenceServerException("in ensemble 'wff_diagnosis', DICOM_FILES[1]: not DICOM", status="StatusCode.INVALID_ARGUMENT")
        err = translate_error(e, [("a.dcm", b""), ("T2/b.dcm", b"")])
        assert isinstance(err, RejectedInput) and "DICOM_FILES[1] (T2/b.dcm): not DICOM" in str(err)

    @pytest.mark.parametrize("status, cls", [("StatusCode.UNAVAILABLE", ServerUnavailable), ("StatusCode.DEADLINE_EXCEEDED", ServerUnavailable), ("StatusCode.INTERNAL", DiagnosisError)])
    def test_status_classes(self, status, cls):
        """Unreachable and timed-out servers are ServerUnavailable; anything else a DiagnosisError with its status."""
        err = translate_error(InferenceServerException("boom", status=status), timeout_s=3)
        assert type(err) is cls and err.status == status.removeprefix("StatusCode.")


class TestSettingsFromConfig:
    def test_round_trip(self):
        """The client reads back the settings the repository builder wrote into the fusion config."""
        from wff.ensemble.fusion import fusion_parameters

        s = FusionSettings(det_threshold=0.2, vote_thresholds={"Seq": 0.6})
        config = {"parameters": {k: {"string_value": v} for k, v in fusion_parameters(s).items()}}
        assert settings_from_config(config) == s

    @pytest.mark.parametrize("config", [{}, {"parameters": {"served_strategy": {"string_value": "Det"}}},
                                        {"parameters": {"strategies": {"string_value": "[1, 0"}}}])
    def test_unusable_parameters(self, config):
        """Missing or malformed fusion parameters are a DiagnosisError that says to rebuild the repository."""
        with pytest.raises(DiagnosisError, match="fusion parameters are unusable.*wff repo build"):
            settings_from_config(config)

def closed_url() -> str:
    """host:port where nothing listens: every call is answered UNAVAILABLE at once."""
    return f"127.0.0.1:{free_port()}"


def pauses_s(retries: int) -> tuple[float, float]:
    """Shortest and longest total pause of ``retries`` retries (each pause is half to all of its doubled step)."""
    steps = [min(MAX_RETRY_PAUSE_S, RETRY_PAUSE_S * 2**k) for k in range(retries)]
    return sum(steps) / 2, sum(steps)


class ScriptedTriton:
    """Stands in for tritonclient's InferenceServerClient: get_model_config raises the scripted errors in turn, then answers."""

    script: list[InferenceServerException] = []
    last: "ScriptedTriton | None" = None

    def __init__(self, url, **kwargs):
        self.url, self.kwargs, self.calls, self.errors = url, kwargs, 0, list(ScriptedTriton.script)
        ScriptedTriton.last = self

    def get_model_config(self, model, as_json, client_timeout):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        from wff.ensemble.fusion import fusion_parameters

        return {"config": {"parameters": {k: {"string_value": v} for k, v in fusion_parameters(FusionSettings()).items()}}}

    def close(self):
        pass


@pytest.fixture
def scripted(monkeypatch):
    """DiagnosisClient over ScriptedTriton; set ScriptedTriton.script before making the client."""
    import tritonclient.grpc as grpcclient

    monkeypatch.setattr(grpcclient, "InferenceServerClient", ScriptedTriton)
    monkeypatch.setattr(ScriptedTriton, "script", [])
    return ScriptedTriton


def unavailable(message: str = "failed to connect to all addresses") -> InferenceServerException:
    return InferenceServerException(message, status="StatusCode.UNAVAILABLE")


class TestRetries:
    def test_no_server_is_retried_with_growing_pauses(self):
        """UNAVAILABLE is sent again `retries` times with doubling pauses; the error says how many attempts."""
        retries, (shortest, longest) = 3, pauses_s(3)
        started = time.monotonic()
        with DiagnosisClient(closed_url(), retries=retries, timeout_s=30) as client, pytest.raises(ServerUnavailable) as e:
            client.fusion_settings()
        took = time.monotonic() - started
        assert e.value.attempts == retries + 1 and f"[{retries + 1} attempts in" in str(e.value)
        assert shortest <= took <= longest + 1.0

    def test_async_client_retries_too(self):
        """The asyncio client (wff evaluate, soak, bench) follows the same policy."""

        async def run():
            async with AsyncDiagnosisClient(closed_url(), retries=2, timeout_s=30) as client:
                await client.diagnose([("a.dcm", b"x")])

        started = time.monotonic()
        with pytest.raises(ServerUnavailable) as e:
            asyncio.run(run())
        assert e.value.attempts == 3 and "[3 attempts in" in str(e.value)
        assert pauses_s(2)[0] <= time.monotonic() - started <= pauses_s(2)[1] + 1.0

    def test_retries_stop_at_the_timeout(self):
        """However many retries are allowed, the call ends within its timeout."""
        timeout_s = 1.0
        started = time.monotonic()
        with DiagnosisClient(closed_url(), retries=50, timeout_s=timeout_s) as client, pytest.raises(ServerUnavailable) as e:
            client.diagnose([("a.dcm", b"x")])
        assert time.monotonic() - started <= timeout_s + 0.5
        assert 1 < e.value.attempts < 51 and f"[{e.value.attempts} attempts in" in str(e.value)

    def test_zero_retries_is_one_attempt(self):
        """retries=0: one attempt, and the error says so."""
        with DiagnosisClient(closed_url(), retries=0) as client, pytest.raises(ServerUnavailable, match=r"\[1 attempt in") as e:
            client.fusion_settings()
        assert e.value.attempts == 1

    def test_unavailable_then_answered(self, scripted):
        """Two UNAVAILABLE answers, then the server answers: the call succeeds on the third attempt."""
        scripted.script = [unavailable(), unavailable("in ensemble 'wff_diagnosis', Exceeds maximum queue size")]
        with DiagnosisClient("h:1", retries=3) as client:
            assert client.fusion_settings() == FusionSettings()
        assert scripted.last.calls == 3

    @pytest.mark.parametrize("status", ["StatusCode.INVALID_ARGUMENT", "StatusCode.INTERNAL", "StatusCode.DEADLINE_EXCEEDED"])
    def test_other_errors_are_final(self, scripted, status):
        """INVALID_ARGUMENT (and any status but UNAVAILABLE) is raised after one attempt."""
        scripted.script = [InferenceServerException("DICOM_FILES[0]: not DICOM", status=status)]
        with DiagnosisClient("h:1", retries=3) as client, pytest.raises(DiagnosisError) as e:
            client.fusion_settings()
        assert scripted.last.calls == 1 and e.value.attempts == 1 and "attempt" not in str(e.value)

    def test_shed_request_is_server_busy(self):
        """Triton's queue-policy rejections become ServerBusy, which says what to change."""
        for message in ("Exceeds maximum queue size", "Request timeout expired"):
            err = translate_error(unavailable(f"in ensemble 'wff_diagnosis', {message}"))
            assert isinstance(err, ServerBusy) and "overloaded" in str(err) and "serving.max_queue_size" in str(err)
        assert type(translate_error(unavailable())) is ServerUnavailable

    def test_negative_retries_refused(self):
        with pytest.raises(ValueError, match="retries must be >= 0"):
            DiagnosisClient("h:1", retries=-1)


@pytest.fixture
def pem_files(tmp_path):
    """(ca, cert, key): placeholder files; tritonclient reads them, the fake below does not check them."""
    paths = []
    for name in ("ca.pem", "client.crt", "client.key"):
        (tmp_path / name).write_text("PEM")
        paths.append(str(tmp_path / name))
    return paths


class TestChannel:
    def test_tls_files_reach_tritonclient(self, scripted, pem_files):
        """tls_ca / tls_cert / tls_key become root_certificates / certificate_chain / private_key, with TLS on."""
        ca, cert, key = pem_files
        DiagnosisClient("h:1", tls_ca=ca, tls_cert=cert, tls_key=key).close()
        kwargs = scripted.last.kwargs
        assert (kwargs["ssl"], kwargs["root_certificates"], kwargs["certificate_chain"], kwargs["private_key"]) == (True, ca, cert, key)

    @pytest.mark.parametrize("given, ssl", [({}, False), ({"ssl": True}, True), ({"tls_ca": 0}, True)])
    def test_tls_is_on_when_asked_or_implied(self, pem_files, given, ssl):
        """No TLS by default; --ssl is TLS with the system's roots; any PEM file implies TLS."""
        given = {k: pem_files[v] if k == "tls_ca" else v for k, v in given.items()}
        kwargs = channel_kwargs(**given)
        assert kwargs["ssl"] is ssl and kwargs["root_certificates"] == given.get("tls_ca")

    def test_certificate_needs_its_key(self, pem_files):
        with pytest.raises(ValueError, match="give both tls_cert and tls_key"):
            channel_kwargs(tls_cert=pem_files[1])

    def test_missing_pem_file_named(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="tls_ca .*absent.pem: no such PEM file"):
            DiagnosisClient("h:1", tls_ca=tmp_path / "absent.pem")

    def test_message_limits_follow_max_bytes(self):
        """The channel's send and receive limits are max_bytes plus framing (default: serving.max_bytes)."""
        assert DEFAULT_MAX_BYTES == ServingConfig().max_bytes
        for max_bytes in (DEFAULT_MAX_BYTES, 1000):
            args = dict(channel_kwargs(max_bytes=max_bytes)["channel_args"])
            assert args["grpc.max_send_message_length"] == args["grpc.max_receive_message_length"] == max_bytes + GRPC_FRAMING_BYTES

    def test_too_large_patient_is_not_sent(self):
        """Files beyond max_bytes are refused before any connection (no server is needed to find out)."""
        files = [("T2/IM1.dcm", b"x" * 60), ("T2/IM2.dcm", b"x" * 70)]
        with DiagnosisClient(closed_url(), max_bytes=100) as client, pytest.raises(RequestTooLarge, match=r"not sent: the patient's 2 file\(s\) total 130 bytes, beyond the limit of 100 bytes .*largest: T2/IM2.dcm, 70 bytes"):
            client.diagnose(files)

        async def run():
            async with AsyncDiagnosisClient(closed_url(), max_bytes=100) as client:
                await client.diagnose(files)

        with pytest.raises(RequestTooLarge, match="beyond the limit"):
            asyncio.run(run())


class FakeClient:
    """Stands in for AsyncDiagnosisClient: P3 is rejected, the others get a diagnosis."""

    def __init__(self):
        self.in_flight = self.max_in_flight = 0

    async def diagnose(self, files, age):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(0.01)
        self.in_flight -= 1
        if age == 3:
            raise RejectedInput("rejected by the server: no usable series", "INVALID_ARGUMENT")
        return fake_diagnosis(0.8 if age > 2 else 0.2, 0.7 if age > 2 else 0.3)


class TestEvaluation:
    def test_failures_are_counted_not_fatal(self, tmp_path):
        """A rejected patient is reported with its error; concurrency bounds the requests in flight."""
        write_dataset(tmp_path, [(f"P{i}", "malignant" if i > 2 else "benign", str(i), "lumbar", "test") for i in range(1, 6)])
        client = FakeClient()
        results = asyncio.run(diagnose_records(client, load_records(tmp_path), concurrency=2))
        assert [r.patient_id for r in results] == ["P1", "P2", "P3", "P4", "P5"]
        assert client.max_in_flight == 2
        assert results[2].diagnosis is None and "no usable series" in results[2].error
        report = Evaluation(results, FusionSettings(), wall_s=1.0, table=score(results, FusionSettings()))
        data = report.to_dict()
        assert (data["patients"], data["errors"], data["seconds_per_patient"]) == (5, 1, 0.2)
        assert list(data["strategies"]) == [*STRATEGIES, PAPER_ROW]  # Table 3 and Det-Seq-Age at the paper's weights
        assert data["strategies"]["Det-Seq"] == {"acc": 1.0, "auc": 1.0, "se": 1.0, "sp": 1.0}
        report.write_csv(tmp_path / "out.csv")
        rows = list(csv.DictReader(open(tmp_path / "out.csv")))
        assert rows[2]["error"] and rows[0]["predicted_label"] == "malignant" and rows[0]["n_series"] == "2"


    @pytest.mark.parametrize("exc", [OSError(5, "Input/output error"), KeyError("series_info"), ValueError("bad DS value")])
    def test_unexpected_exception_is_one_patients_failure(self, tmp_path, caplog, exc):
        """An exception of one patient that is no DiagnosisError becomes that patient's logged failure; the others keep their results."""

        class Breaking(FakeClient):
            async def diagnose(self, files, age):
                if age == 2:
                    raise exc
                return await super().diagnose(files, age)

        write_dataset(tmp_path, [(f"P{i}", "malignant" if i > 2 else "benign", str(i), "lumbar", "test") for i in range(1, 6)])
        with caplog.at_level(logging.ERROR, logger="wff.client.evaluate"):
            results = asyncio.run(diagnose_records(Breaking(), load_records(tmp_path), concurrency=2))
        assert [r.diagnosis is not None for r in results] == [True, False, False, True, True]
        reason = f"unexpected {type(exc).__name__}"
        assert results[1].reason == reason and results[1].error.startswith(reason)
        assert "P2" in caplog.text and "Traceback" in caplog.text  # the bug is logged, not only counted
        report = Evaluation(results, FusionSettings(), wall_s=1.0, table=score(results, FusionSettings()))
        assert report.failures() == {reason: ["P2"], "input rejected by the server": ["P3"]}
        assert report.to_dict()["failures"] == report.failures()

    def test_compare_counts_changed_decisions(self):
        """Two runs on the same patients: per strategy, decisions that flip and the largest score change; unmatched patients left out."""
        def run(ds, extra=()):
            results = [PatientResult(f"P{i}", 1, 0.1, diagnosis=fake_diagnosis(d, 0.8)) for i, d in enumerate(ds)]
            results += [PatientResult(pid, 0, 0.1, error="rejected") for pid in extra]
            return Evaluation(results, FusionSettings(), wall_s=1.0, table=score(results, FusionSettings()))

        reference, other = run([0.9, 0.2, 0.6]), run([0.88, 0.7, 0.6], extra=["P9"])
        comparison = compare_evaluations(reference, other)
        assert (comparison["patients"], comparison["left_out"]) == (3, 1)
        det = comparison["strategies"]["Det"]
        assert det["decisions_changed"] == 1 and det["max_abs_dp"] == pytest.approx(0.5)  # P1: D 0.2 -> 0.7 flips
        assert comparison["strategies"]["Seq"] == {"patients": 3, "decisions_changed": 0, "max_abs_dp": 0.0}  # M unchanged
        assert list(comparison["table_other"]) == [*STRATEGIES, PAPER_ROW]

    def test_locations_and_sequences_reach_the_dict(self, tmp_path):
        """labels.csv's locations travel with each result: Fig. 6 and Fig. 7 are in the JSON dict. P2
        (malignant, D 0.2 -> benign, wrong) is cervical and thoracic, P4 (right) lumbar and sacral, P3
        (sacral) is rejected: cervical 1/2, thoracic 1/1, lumbar 0/1, sacral 0/1."""
        rows = [("P1", "benign", "1", "cervical", "test"), ("P2", "malignant", "2", "cervical;thoracic", "test"),
                ("P3", "malignant", "3", "sacral", "test"), ("P4", "malignant", "4", "lumbar;sacral", "test")]
        write_dataset(tmp_path, rows)
        results = asyncio.run(diagnose_records(FakeClient(), load_records(tmp_path), concurrency=2))
        assert [r.locations for r in results] == [("cervical",), ("cervical", "thoracic"), ("sacral",), ("lumbar", "sacral")]
        data = Evaluation(results, FusionSettings(), wall_s=1.0, table=score(results, FusionSettings())).to_dict()
        got = {loc: (r["patients"], r["wrong"], r["error_rate"]) for loc, r in data["per_location"]["Det-Seq"].items()}
        assert got == {"cervical": (2, 1, 0.5), "thoracic": (1, 1, 1.0), "lumbar": (1, 0, 0.0), "sacral": (1, 0, 0.0)}
        # the fake series carry no sequence: nobody has a T1 or T2 series, everybody is in "All"
        assert [data["sequences"][s]["patients"] for s in ("T1", "T2", "All")] == [0, 0, 3]


class TestCli:
    def test_diagnose_connection_refused_exits_non_zero(self, tmp_path):
        """No server at --url: exit code 1 and a message on stderr."""
        (tmp_path / "IM1.dcm").write_bytes(b"x")
        result = CliRunner().invoke(main, ["diagnose", str(tmp_path), "--url", f"127.0.0.1:{free_port()}", "--timeout", "5"])
        assert result.exit_code == 1 and "no server answered" in result.output

    def test_evaluate_connection_refused_exits_non_zero(self, tmp_path):
        """evaluate fails fast (before the progress loop) when no server answers."""
        write_dataset(tmp_path, [("P1", "benign", "50", "lumbar", "test")])
        result = CliRunner().invoke(main, ["evaluate", str(tmp_path), "--url", f"127.0.0.1:{free_port()}", "--timeout", "5"])
        assert result.exit_code == 1 and "no server answered" in result.output

    @pytest.mark.parametrize(
        "args, message",
        [
            (["diagnose"], "Missing argument 'PATIENT_DIR'"),
            (["diagnose", "/nonexistent/patient"], "does not exist"),
            (["diagnose", ".", "--age", "old"], "'old' is not a valid float"),
            (["diagnose", ".", "--timeout", "0"], "--timeout"),
            (["evaluate", ".", "--concurrency", "0"], "--concurrency"),
            (["diagnose", ".", "--overlay", "x", "--profile-file", "/nonexistent/profile.json"], "--profile-file"),
            (["evaluate", ".", "--report"], "--report"),
        ],
    )
    def test_argument_errors(self, args, message):
        """Bad arguments exit 2 with click's usage message."""
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and message in result.output

    def test_diagnose_overlay_connection_refused_writes_nothing(self, tmp_path):
        """--overlay with no server: exit 1, no overlay folder."""
        (tmp_path / "IM1.dcm").write_bytes(b"x")
        args = ["diagnose", str(tmp_path), "--url", f"127.0.0.1:{free_port()}", "--timeout", "5", "--overlay", str(tmp_path / "ov")]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and "no server answered" in result.output and not (tmp_path / "ov").exists()

    def test_diagnose_says_how_many_attempts(self, tmp_path):
        """--retries 0 against no server: one attempt, said in the message."""
        (tmp_path / "IM1.dcm").write_bytes(b"x")
        result = CliRunner().invoke(main, ["diagnose", str(tmp_path), "--url", closed_url(), "--retries", "0"])
        assert result.exit_code == 1 and "no server answered" in result.output and "[1 attempt in" in result.output

    def test_diagnose_refuses_a_patient_beyond_max_bytes(self, tmp_path):
        """--max-bytes: a larger patient is refused before sending, with the limit in the message."""
        (tmp_path / "IM1.dcm").write_bytes(b"x" * 2048)
        result = CliRunner().invoke(main, ["diagnose", str(tmp_path), "--url", closed_url(), "--max-bytes", "1024"])
        assert result.exit_code == 1 and "not sent: the patient's 1 file(s) total 2048 bytes, beyond the limit of 1024 bytes" in result.output
        assert "no server answered" not in result.output

    @pytest.mark.parametrize("command", ["diagnose", "evaluate", "soak"])
    def test_tls_options_everywhere(self, command):
        """Every command that speaks gRPC takes --tls-ca/--tls-cert/--tls-key and --ssl; --root-certificates is gone."""
        text = CliRunner().invoke(main, [command, "--help"]).output
        assert all(option in text for option in ("--tls-ca", "--tls-cert", "--tls-key", "--ssl")) and "--root-certificates" not in text

    def test_client_certificate_needs_its_key(self, tmp_path):
        """--tls-cert without --tls-key is a usage error."""
        (tmp_path / "c.pem").write_text("x")
        result = CliRunner().invoke(main, ["diagnose", str(tmp_path), "--tls-cert", str(tmp_path / "c.pem")])
        assert result.exit_code == 2 and "--tls-cert and --tls-key go together" in result.output

    def test_evaluate_without_labels(self, tmp_path):
        """A folder without labels.csv is an error (exit 1) naming the file."""
        result = CliRunner().invoke(main, ["evaluate", str(tmp_path)])
        assert result.exit_code == 1 and result.stderr.startswith("wff: error: ") and "labels.csv" in result.stderr

    def test_evaluate_unknown_split(self, tmp_path):
        """A split that labels.csv does not have is an error (exit 1) naming the valid ones."""
        write_dataset(tmp_path, [("P1", "benign", "50", "lumbar", "test")])
        result = CliRunner().invoke(main, ["evaluate", str(tmp_path), "--split", "val"])
        assert result.exit_code == 1 and "split 'val' is not one of train, test" in result.stderr


def test_diagnosis_json_is_plain(tmp_path):
    """Diagnosis.to_dict() (what --json writes) serialises without numpy types."""
    json.dumps(fake_diagnosis(0.4, 0.6).to_dict())
