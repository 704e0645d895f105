"""The gRPC client, the evaluation loop and their CLI, without a server (see test_server.py for the real one)."""

import asyncio
import csv
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from tritonclient.utils import InferenceServerException

from wff.cli import main
from wff.training.dataset import load_records
from wff.client.evaluate import Evaluation, PatientResult, compare_evaluations, diagnose_records, score
from wff.client.grpc_client import (
    DiagnosisError,
    RejectedInput,
    ServerUnavailable,
    build_inputs,
    read_patient_files,
    settings_from_config,
    translate_error,
)
from wff.ensemble.diagnosis import Diagnosis
from wff.ensemble.fusion import STRATEGIES, FusionSettings
from wff.serving.server import free_port


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
        from wff.serving.repository import fusion_parameters

        s = FusionSettings(det_threshold=0.2, vote_thresholds={"Seq": 0.6})
        config = {"parameters": {k: {"string_value": v} for k, v in fusion_parameters(s).items()}}
        assert settings_from_config(config) == s

    @pytest.mark.parametrize("config", [{}, {"parameters": {"served_strategy": {"string_value": "Det"}}},
                                        {"parameters": {"strategies": {"string_value": "[1, 0"}}}])
    def test_unusable_parameters(self, config):
        """Missing or malformed fusion parameters are a DiagnosisError that says to rebuild the repository."""
        with pytest.raises(DiagnosisError, match="fusion parameters are unusable.*wff repo build"):
            settings_from_config(config)

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
        assert set(data["strategies"]) == set(STRATEGIES)
        assert data["strategies"]["Det-Seq"] == {"acc": 1.0, "auc": 1.0, "se": 1.0, "sp": 1.0}
        report.write_csv(tmp_path / "out.csv")
        rows = list(csv.DictReader(open(tmp_path / "out.csv")))
        assert rows[2]["error"] and rows[0]["predicted_label"] == "malignant" and rows[0]["n_series"] == "2"


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
        assert set(comparison["table_other"]) == set(STRATEGIES)

    def test_locations_and_sequences_reach_the_dict(self, tmp_path):
        """labels.csv's location travels with each result: Fig. 6 and Fig. 7 are in the JSON dict."""
        write_dataset(tmp_path, [(f"P{i}", "malignant" if i > 2 else "benign", str(i), loc, "test")
                                 for i, loc in zip(range(1, 5), ("cervical", "cervical", "sacral", "lumbar"))])
        results = asyncio.run(diagnose_records(FakeClient(), load_records(tmp_path), concurrency=2))
        assert [r.location for r in results] == ["cervical", "cervical", "sacral", "lumbar"]
        data = Evaluation(results, FusionSettings(), wall_s=1.0, table=score(results, FusionSettings())).to_dict()
        assert data["per_location"]["Det-Seq"]["cervical"] == {"patients": 2, "wrong": 0, "error_rate": 0.0}
        assert data["per_location"]["Det-Seq"]["sacral"]["patients"] == 0  # P3 was rejected
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
            (["diagnose", ".", "--overlay", "x", "--profile", "/nonexistent/profile.json"], "--profile"),
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

    def test_evaluate_without_labels(self, tmp_path):
        """A folder without labels.csv is a usage error naming the file."""
        result = CliRunner().invoke(main, ["evaluate", str(tmp_path)])
        assert result.exit_code == 2 and "labels.csv" in result.output

    def test_evaluate_unknown_split(self, tmp_path):
        """An unknown split is a usage error naming the valid ones."""
        write_dataset(tmp_path, [("P1", "benign", "50", "lumbar", "test")])
        result = CliRunner().invoke(main, ["evaluate", str(tmp_path), "--split", "val"])
        assert result.exit_code == 2 and "split 'val' is not one of train, test" in result.output


def test_diagnosis_json_is_plain(tmp_path):
    """Diagnosis.to_dict() (what --json writes) serialises without numpy types."""
    json.dumps(fake_diagnosis(0.4, 0.6).to_dict())
