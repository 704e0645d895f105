"""Fig. 6, Fig. 7 and ROC from the served components, the report files, the ablation writer,
and (with the real tritonserver) that a request with only some series equals the restriction."""

import csv
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import write_dicom_patient
from PIL import Image

from wff.cli import main
from wff.client.evaluate import Evaluation, PatientResult, score
from wff.client.grpc_client import DiagnosisClient, read_patient_files
from wff.client.report import format_per_location, format_sequences, per_location_title, write_ablation, write_report
from wff.config import LOCATIONS
from wff.ensemble.diagnosis import Diagnosis
from wff.ensemble.fusion import PAPER_ROW, PAPER_WEIGHTS, STRATEGIES, Components, FusionSettings, fuse
from wff.ensemble.metrics import auc
from wff.ensemble.report_metrics import SEQUENCE_SUBSETS, location_errors, restrict_components, roc_curve, sequence_table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SERVED_ATOL = 1e-5  # the same code on the same slices; only float summation order may differ
DET_ONLY = FusionSettings("Det", 0.5, {"Det": (1.0, 0.0, 0.0)})
REPORT_FILES = {
    "evaluation.json", "table3.json", "table3.csv", "per_location.json", "per_location.csv", "per_location.png",
    "sequences.json", "sequences.csv", "sequences.png", "roc.csv", "roc.png", "patients.csv",
}


def components(series_d: list[list[float]], series_m: list[float] | None = None, age_a: float = math.nan) -> Components:
    """One patient: series_d[q] = the D of series q's slices (every box scores 0.9)."""
    d = np.array([v for s in series_d for v in s], np.float32)
    owners = np.array([q for q, s in enumerate(series_d) for _ in s], np.int32)
    m = np.array(series_m if series_m is not None else [0.5] * len(series_d), np.float32)
    return Components(d, np.full(len(d), 0.9, np.float32), owners, m, age_a)


def fake_result(pid: str, label: int, location: str | tuple[str, ...], series: list[tuple[str, list[float], float]], age_a: float = math.nan) -> PatientResult:
    """A diagnosed patient at one location (a string) or several (a tuple); series = [(sequence, D of its slices, M)]."""
    c = components([d for _, d, _ in series], [m for _, _, m in series], age_a)
    q = len(series)
    dx = Diagnosis(
        label="malignant", p_malignant=0.5, series_votes=np.ones(q, np.int32), series_m=c.series_m,
        series_info=tuple({"index": i, "sequence": s} for i, (s, _, _) in enumerate(series)), series_regions=np.zeros((q, 5), np.float32),
        slice_d=c.slice_d, slice_score=c.slice_score, slice_box=np.zeros((len(c.slice_d), 4), np.float32), slice_series=c.slice_series,
        age_a=age_a, age_used=math.nan, notes={},
    )
    return PatientResult(pid, label, 0.1, dx, locations=(location,) if isinstance(location, str) else location)


def three_patients() -> list[PatientResult]:
    """A (malignant; T1 says benign, T2 malignant), B (benign; T2 only), C (malignant; T1 only)."""
    return [
        fake_result("A", 1, "cervical", [("T1", [0.2], 0.5), ("T2", [0.9], 0.5)]),
        fake_result("B", 0, "lumbar", [("STIR", [0.3], 0.5)]),
        fake_result("C", 1, "lumbar", [("T1", [0.8], 0.5)]),
    ]


def evaluation(results, settings=FusionSettings()) -> Evaluation:
    return Evaluation(results, settings, wall_s=1.0, table=score(results, settings))


def assert_png(path, min_px: int = 300, max_px: int = 4000) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
    assert min_px <= w <= max_px and min_px <= h <= max_px, (path, w, h)
    return w, h


class TestRestrictComponents:
    SEQS = ["T1", "T2", "STIR"]

    def full(self) -> Components:
        return components([[0.1, 0.2], [0.3, 0.4, 0.5], [0.6]], [0.7, 0.8, 0.9], age_a=0.25)

    def test_t2_keeps_t2_and_stir_renumbered(self):
        """T2 keeps series 1 and 2 (T2, STIR): their slices in order, series renumbered 0 and 1, A unchanged."""
        r = restrict_components(self.full(), self.SEQS, SEQUENCE_SUBSETS["T2"])
        np.testing.assert_allclose(r.slice_d, [0.3, 0.4, 0.5, 0.6])
        np.testing.assert_array_equal(r.slice_series, [0, 0, 0, 1])
        np.testing.assert_allclose(r.series_m, [0.8, 0.9])
        assert r.slice_series.dtype == np.int32 and r.age_a == 0.25

    def test_t1_keeps_the_first_series(self):
        """T1 keeps series 0 only."""
        r = restrict_components(self.full(), self.SEQS, ("T1",))
        np.testing.assert_allclose(r.slice_d, [0.1, 0.2])
        np.testing.assert_array_equal(r.slice_series, [0, 0])
        np.testing.assert_allclose(r.series_m, [0.7])

    def test_no_series_of_the_subset_is_none(self):
        """A patient without any series of the subset gives None (left out of that subset)."""
        assert restrict_components(self.full(), ["T2", "T2", "STIR"], ("T1",)) is None

    def test_every_sequence_is_the_identity(self):
        """Keeping every sequence returns the same components."""
        r = restrict_components(self.full(), self.SEQS, ("T1", "T2", "STIR"))
        for name in ("slice_d", "slice_score", "slice_series", "series_m"):
            np.testing.assert_array_equal(getattr(r, name), getattr(self.full(), name))

    def test_one_sequence_per_series(self):
        """A sequence list of the wrong length is an error saying what to pass."""
        with pytest.raises(ValueError, match="one per served series"):
            restrict_components(self.full(), ["T1"], ("T1",))


class TestSequenceTable:
    def test_by_hand(self):
        """Det: T1 gets A wrong and C right (0.5), T2 gets A and B right (1.0), all series get all three right."""
        results = three_patients()
        table = sequence_table([r.diagnosis.components() for r in results], [r.series_sequences for r in results], [1, 0, 1], DET_ONLY)
        assert list(table) == ["T1", "T2", "All"]
        assert (table["T1"]["patients"], table["T1"]["left_out"], table["T1"]["sequences"]) == (2, 1, ["T1"])
        assert (table["T2"]["patients"], table["T2"]["left_out"], table["T2"]["sequences"]) == (2, 1, ["T2", "STIR"])
        assert (table["All"]["patients"], table["All"]["left_out"], table["All"]["sequences"]) == (3, 0, "all")
        assert table["T1"]["strategies"]["Det"]["acc"] == 0.5 and math.isnan(table["T1"]["strategies"]["Det"]["auc"])  # one class
        assert table["T2"]["strategies"]["Det"]["acc"] == 1.0
        # A with all series: votes benign (0.2) and malignant (0.9) tie -> mean P 0.55 -> malignant
        assert table["All"]["strategies"]["Det"]["acc"] == 1.0 and table["All"]["strategies"]["Det"]["auc"] == 1.0

    def test_all_equals_table3(self):
        """The "All" subset is Table 3 itself (its six strategies; the paper-λ row is Table 3's only)."""
        results = three_patients()
        table = sequence_table([r.diagnosis.components() for r in results], [r.series_sequences for r in results], [1, 0, 1], FusionSettings())
        assert table["All"]["strategies"] == {k: v for k, v in score(results, FusionSettings()).items() if k != PAPER_ROW}

    def test_nobody_left(self):
        """A subset no patient has: every patient left out and no metrics."""
        results = three_patients()[1:2]
        table = sequence_table([r.diagnosis.components() for r in results], [r.series_sequences for r in results], [0], DET_ONLY)
        assert (table["T1"]["patients"], table["T1"]["left_out"], table["T1"]["strategies"]) == (0, 1, {})


class TestLocationErrors:
    def test_by_hand(self):
        """Wrong patients and error rate per location; a location without patients has NaN error rate."""
        table = location_errors([1, 0, 1, 0, 1], [1, 1, 0, 0, 1], ["cervical", "cervical", "lumbar", "lumbar", "sacral"])
        assert list(table) == list(LOCATIONS)
        assert table["cervical"] == {"patients": 2, "wrong": 1, "error_rate": 0.5}
        assert table["lumbar"] == {"patients": 2, "wrong": 1, "error_rate": 0.5}
        assert table["sacral"] == {"patients": 1, "wrong": 0, "error_rate": 0.0}
        assert table["thoracic"]["patients"] == 0 and math.isnan(table["thoracic"]["error_rate"])

    def test_two_locations_count_at_each(self):
        """4 patients, 5 locations: P1 (malignant, predicted benign) at cervical and thoracic counts as a
        patient and a wrong one at both; P2 (benign, predicted malignant) thoracic; P3 right, cervical;
        P4 right, lumbar. Cervical 1/2, thoracic 2/2, lumbar 0/1, sacral 0/0."""
        table = location_errors(
            [1, 0, 1, 0], [0, 1, 1, 0], [("cervical", "thoracic"), ("thoracic",), ("cervical",), ("lumbar",)]
        )
        assert table["cervical"] == {"patients": 2, "wrong": 1, "error_rate": 0.5}
        assert table["thoracic"] == {"patients": 2, "wrong": 2, "error_rate": 1.0}
        assert table["lumbar"] == {"patients": 1, "wrong": 0, "error_rate": 0.0}
        assert table["sacral"]["patients"] == 0 and math.isnan(table["sacral"]["error_rate"])
        assert sum(row["patients"] for row in table.values()) == 5 and sum(row["wrong"] for row in table.values()) == 3

    def test_a_location_named_twice_counts_once_and_a_string_is_one(self):
        """("lumbar", "lumbar") is one lumbar patient; "lumbar" is the location, not its letters."""
        table = location_errors([1, 1], [0, 1], [("lumbar", "lumbar"), "lumbar"])
        assert table["lumbar"] == {"patients": 2, "wrong": 1, "error_rate": 0.5} and list(table) == list(LOCATIONS)

    def test_lengths_must_agree(self):
        """Mismatched inputs are an error naming the lengths."""
        with pytest.raises(ValueError, match="differ in length: 2, 1, 2"):
            location_errors([1, 0], [1], ["cervical", "lumbar"])


class TestRocCurve:
    def test_by_hand(self):
        """Scores 0.8 (M), 0.4 (B), 0.35 (M), 0.1 (B): one point per threshold, from (0, 0) to (1, 1)."""
        fpr, tpr, thr = roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
        np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
        np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
        np.testing.assert_allclose(thr, [np.inf, 0.8, 0.4, 0.35, 0.1])

    def test_ties_move_diagonally_and_area_is_auc(self):
        """A benign and a malignant patient tied at 0.5 make one diagonal step; the area is AUC (3.5 / 4)."""
        labels, scores = [0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]
        fpr, tpr, _ = roc_curve(labels, scores)
        np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
        np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
        area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
        assert area == pytest.approx(auc(labels, scores)) == pytest.approx(0.875)

    def test_one_class_is_an_error(self):
        """Without benign patients the curve is undefined, and the error says so."""
        with pytest.raises(ValueError, match="0 benign and 2 malignant"):
            roc_curve([1, 1], [0.2, 0.3])


class TestEvaluationDict:
    def test_per_location_and_sequences_in_json(self):
        """to_dict carries Fig. 6 and Fig. 7 over the diagnosed patients; NaN becomes null."""
        results = [*three_patients(), PatientResult("E", 0, 0.1, error="rejected", locations=("sacral",))]
        data = evaluation(results, DET_ONLY).to_dict()
        json.dumps(data, allow_nan=False)
        assert data["served_strategy"] == "Det" and (data["patients"], data["errors"]) == (4, 1)
        assert data["per_location"]["Det"]["lumbar"] == {"patients": 2, "wrong": 0, "error_rate": 0.0}
        assert data["per_location"]["Det"]["sacral"] == {"patients": 0, "wrong": 0, "error_rate": None}
        assert data["sequences"]["T1"]["strategies"]["Det"] == {"acc": 0.5, "auc": None, "se": 0.5, "sp": None}
        assert data["sequences"]["T2"]["left_out"] == 1
        assert data["fusion"]["strategies"]["Det"] == [1.0, 0.0, 0.0] and data["fusion"]["vote_thresholds"]["Det"] == 0.5

    def test_two_locations_in_every_output(self, tmp_path):
        """Det decides on the slice D at 0.5: A (malignant, D 0.2) and B (benign, D 0.9) are wrong, C and D
        right; A is cervical and thoracic. Fig. 6 in the dict, per_location.csv, the text table, patients.csv
        and the title: cervical 1/2, thoracic 2/2, lumbar 0/1, sacral 0/0; 4 patients with 5 locations."""
        results = [
            fake_result("A", 1, ("cervical", "thoracic"), [("T2", [0.2], 0.5)]),
            fake_result("B", 0, "thoracic", [("T2", [0.9], 0.5)]),
            fake_result("C", 1, "cervical", [("T2", [0.9], 0.5)]),
            fake_result("D", 0, "lumbar", [("T2", [0.1], 0.5)]),
        ]
        ev = evaluation(results, DET_ONLY)
        files = write_report(ev, tmp_path)
        data = ev.to_dict()
        expected = {"cervical": (2, 1, 0.5), "thoracic": (2, 2, 1.0), "lumbar": (1, 0, 0.0), "sacral": (0, 0, None)}
        got = {loc: (r["patients"], r["wrong"], r["error_rate"]) for loc, r in data["per_location"]["Det"].items()}
        assert got == expected and json.loads(files["per_location.json"].read_text()) == data["per_location"]
        rows = {r["location"]: r for r in csv.DictReader(open(files["per_location.csv"]))}
        assert (rows["thoracic"]["patients"], rows["thoracic"]["wrong"], rows["sacral"]["error_rate"]) == ("2", "2", "")
        assert format_per_location(data["per_location"]).splitlines()[2].split()[1:] == ["1/2", "0.50", "2/2", "1.00", "0/1", "0.00", "0/0", "n/a"]
        patients = {r["patient_id"]: r for r in csv.DictReader(open(files["patients.csv"]))}
        assert (patients["A"]["location"], patients["B"]["location"]) == ("cervical;thoracic", "thoracic")
        assert (patients["A"]["Det_label"], patients["C"]["Det_label"]) == ("benign", "malignant")
        assert per_location_title(data["per_location"], len(ev.diagnosed)).endswith("4 diagnosed patients with 5 tumour locations")
        assert_png(files["per_location.png"])


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A 25-patient evaluation (one failed) and the report written from it: (evaluation, files, folder)."""
    rng = np.random.default_rng(0)
    results = []
    for i in range(24):
        label = i % 2
        seqs = [("T1", "T2", "STIR"), ("T2",), ("T1", "STIR")][i % 3]
        series = [(s, list(np.clip(rng.normal(0.35 + 0.3 * label, 0.2, 3), 0, 1)), float(rng.random())) for s in seqs]
        results.append(fake_result(f"P{i}", label, LOCATIONS[i % 4], series, age_a=0.3 + 0.4 * label))
    results.append(PatientResult("PX", 1, 0.1, error="rejected by the server", locations=("lumbar",)))
    ev = evaluation(results)
    out = tmp_path_factory.mktemp("report")
    return ev, write_report(ev, out), out


class TestWriteReport:
    def test_every_file_is_written(self, report):
        """The report folder holds the listed JSON, CSV and PNG files."""
        _, files, out = report
        assert set(files) == REPORT_FILES and {p.name for p in out.iterdir()} == REPORT_FILES

    def test_json_and_csv_parse_and_agree(self, report):
        """table3/per_location/sequences JSON equal the evaluation dict; CSVs have one row per entry."""
        ev, _, out = report
        data = ev.to_dict()
        assert json.loads((out / "evaluation.json").read_text()) == json.loads(json.dumps(data))
        table3 = json.loads((out / "table3.json").read_text())
        assert list(table3["strategies"]) == [*STRATEGIES, PAPER_ROW] and table3["errors"] == 1
        assert table3["strategies"]["Det-Seq-Age"]["acc"] == data["strategies"]["Det-Seq-Age"]["acc"]
        assert json.loads((out / "per_location.json").read_text()) == data["per_location"]
        assert json.loads((out / "sequences.json").read_text()) == json.loads(json.dumps(data["sequences"]))
        rows = list(csv.DictReader(open(out / "table3.csv")))
        assert [r["strategy"] for r in rows] == [*STRATEGIES, PAPER_ROW] and float(rows[0]["acc"]) == data["strategies"]["Det"]["acc"]
        assert float(rows[-1]["acc"]) == data["strategies"][PAPER_ROW]["acc"] == table3["strategies"][PAPER_ROW]["acc"]
        assert len(list(csv.DictReader(open(out / "per_location.csv")))) == 6 * 4
        seq_rows = list(csv.DictReader(open(out / "sequences.csv")))
        assert len(seq_rows) == 3 * 6 and {r["subset"] for r in seq_rows} == {"T1", "T2", "All"}
        assert {r["left_out"] for r in seq_rows if r["subset"] == "T1"} == {"8"}  # the T2-only patients

    def test_paper_weights_row(self, tmp_path):
        """With cross-validated Det-Seq-Age weights 0.1/0.1/0.8 both patients are wrong (P = 0.31 for the
        malignant one, 0.77 for the benign one); at the paper's 0.45/0.45/0.1 both are right (P = 0.695,
        0.315): table3.json, table3.csv and evaluation.json carry both rows."""
        settings = FusionSettings(strategies={**PAPER_WEIGHTS, "Det-Seq-Age": (0.1, 0.1, 0.8)})
        results = [fake_result("A", 1, "lumbar", [("T2", [0.8], 0.7)], age_a=0.2), fake_result("B", 0, "lumbar", [("T2", [0.3], 0.2)], age_a=0.9)]
        write_report(evaluation(results, settings), tmp_path)
        table3 = json.loads((tmp_path / "table3.json").read_text())["strategies"]
        assert (table3["Det-Seq-Age"]["acc"], table3[PAPER_ROW]["acc"]) == (0.0, 1.0)
        assert (table3[PAPER_ROW]["tp"], table3[PAPER_ROW]["tn"]) == (1, 1)
        rows = {r["strategy"]: r for r in csv.DictReader(open(tmp_path / "table3.csv", encoding="utf-8"))}
        assert (float(rows["Det-Seq-Age"]["acc"]), float(rows[PAPER_ROW]["acc"])) == (0.0, 1.0)
        assert json.loads((tmp_path / "evaluation.json").read_text())["strategies"][PAPER_ROW]["acc"] == 1.0

    def test_patients_csv(self, report):
        """One row per patient: location, sequences, per-strategy label and score; the failed one has its error."""
        _, _, out = report
        rows = list(csv.DictReader(open(out / "patients.csv")))
        assert len(rows) == 25 and rows[0]["sequences"] == "T1;T2;STIR" and rows[1]["location"] == "thoracic"
        assert rows[0]["Det-Seq-Age_label"] in ("benign", "malignant") and 0 <= float(rows[0]["Det_p"]) <= 1
        assert rows[-1]["error"] and rows[-1]["Det_p"] == ""

    def test_roc_points_match_auc(self, report):
        """roc.csv's curve of each strategy has the area of Table 3's AUC."""
        ev, _, out = report
        rows = list(csv.DictReader(open(out / "roc.csv")))
        for name in STRATEGIES:
            fpr = np.array([float(r["fpr"]) for r in rows if r["strategy"] == name])
            tpr = np.array([float(r["tpr"]) for r in rows if r["strategy"] == name])
            assert float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)) == pytest.approx(ev.table[name]["auc"])

    @pytest.mark.parametrize("name", ["per_location.png", "sequences.png", "roc.png"])
    def test_pngs_are_valid(self, report, name):
        """Each figure is a valid PNG of sane size."""
        assert_png(report[2] / name)

    def test_one_class_roc_still_drawn(self, tmp_path):
        """With one class the ROC is undefined: roc.png says so and roc.csv has no points."""
        files = write_report(evaluation(three_patients()[:1]), tmp_path)
        assert_png(files["roc.png"]) and list(csv.DictReader(open(files["roc.csv"]))) == []

    def test_text_tables(self, report):
        """The terminal tables name every strategy, location and subset, with patient counts."""
        data = report[0].to_dict()
        loc = format_per_location(data["per_location"])
        lines = loc.splitlines()
        assert lines[1].split()[2:] == list(LOCATIONS) and [line.split()[0] for line in lines[2:]] == list(STRATEGIES)
        assert all(line.count("/6 ") == 4 for line in lines[2:])  # 6 diagnosed patients per location
        seq = format_sequences(data["sequences"])
        assert seq.splitlines()[1].split() == ["Fusion", "method", "T1", "T2", "All"]
        assert seq.splitlines()[-1].split()[2:5] == ["8", "0", "0"]  # left out: the T2-only patients lack T1


class TestWriteAblation:
    def test_files_and_values(self, tmp_path):
        """Three runs -> ablation.json/csv/png; values are those of each run's strategies, runs in order."""
        runs = {}
        for n, acc in (("N=4", 0.6), ("N=8", 0.7), ("N=16", 0.8)):
            runs[n] = {"strategies": {s: {"acc": acc, "auc": acc + 0.05, "se": acc, "sp": None} for s in STRATEGIES}, "patients": 10}
        files = write_ablation(runs, tmp_path)
        assert set(files) == {"ablation.json", "ablation.csv", "ablation.png"}
        table = json.loads(files["ablation.json"].read_text())
        assert list(table) == ["N=4", "N=8", "N=16"] and table["N=8"]["Det-Seq"] == {"acc": 0.7, "auc": 0.75, "se": 0.7, "sp": None}
        rows = list(csv.DictReader(open(files["ablation.csv"])))
        assert len(rows) == 18 and (rows[-1]["run"], rows[-1]["strategy"], rows[-1]["sp"]) == ("N=16", "Det-Seq-Age", "")
        assert float(rows[-1]["auc"]) == pytest.approx(0.85)
        assert_png(files["ablation.png"])

    def test_accepts_a_written_evaluation(self, tmp_path):
        """The evaluation.json of a report (what --json writes) is a valid row."""
        data = evaluation(three_patients()).to_dict()
        files = write_ablation({"run": json.loads(json.dumps(data))}, tmp_path)
        assert json.loads(files["ablation.json"].read_text())["run"]["Det"]["acc"] == data["strategies"]["Det"]["acc"]

    @pytest.mark.parametrize("rows, match", [({}, "no evaluations"), ({"N=4": {"patients": 3}}, "'N=4': no 'strategies'")])
    def test_bad_rows(self, tmp_path, rows, match):
        """Empty input or a dict without strategies is an error saying what to pass."""
        with pytest.raises(ValueError, match=match):
            write_ablation(rows, tmp_path)


def files_of(patient_dir, folders: tuple[str, ...]) -> list[tuple[str, bytes]]:
    return [(name, data) for name, data in read_patient_files(patient_dir) if name.split("/")[0] in folders]


@pytest.mark.server
class TestServedSubsets:
    @pytest.mark.parametrize("subset, folders", [("T1", ("SAG T1",)), ("T2", ("SAG T2", "SAG STIR"))])
    def test_request_with_subset_equals_restriction(self, limited_server, dicom_patient, subset, folders):
        """Serving only a subset's series gives the restriction of the full request's components: every strategy's label and P (<= SERVED_ATOL)."""
        with DiagnosisClient(limited_server.grpc_url, timeout_s=60) as client:
            full = client.diagnose(read_patient_files(dicom_patient), age=None)
            part = client.diagnose(files_of(dicom_patient, folders), age=None)
            settings = client.fusion_settings()
        sequences = [info["sequence"] for info in full.series_info]
        assert sequences == ["T1", "T2", "STIR"]
        restricted = restrict_components(full.components(), sequences, SEQUENCE_SUBSETS[subset])
        served = part.components()
        assert [info["sequence"] for info in part.series_info] == [s for s in sequences if s in SEQUENCE_SUBSETS[subset]]
        np.testing.assert_array_equal(served.slice_series, restricted.slice_series)
        for name in ("slice_d", "slice_score", "series_m"):
            np.testing.assert_allclose(getattr(served, name), getattr(restricted, name), atol=SERVED_ATOL, err_msg=name)
        mine = fuse(restricted, settings.served_weights, settings.det_threshold)
        assert part.label == ("malignant" if mine.label else "benign") and abs(part.p_malignant - mine.p_malignant) <= SERVED_ATOL
        for name, weights in settings.strategies.items():
            a, b = fuse(served, weights, settings.det_threshold), fuse(restricted, weights, settings.det_threshold)
            assert a.label == b.label and abs(a.p_malignant - b.p_malignant) <= SERVED_ATOL, name

    def test_evaluate_report_command(self, limited_server, tmp_path):
        """wff evaluate --report writes every file from served predictions and prints Fig. 6 and Fig. 7 tables; --overlay draws the misclassified."""
        data = tmp_path / "data"
        rows = ["patient_id,label,age,location,split"]
        layouts = [{"SAG T1": 3, "SAG T2": 3}, {"SAG T2": 3, "SAG STIR": 3}, {"SAG T1": 4}]
        for i, (series, label, location) in enumerate(zip(layouts, ("benign", "malignant", "malignant"), ("cervical;thoracic", "lumbar", "lumbar"))):
            write_dicom_patient(data / f"P{i}", series, seed=10 + i)
            rows.append(f"P{i},{label},{50 + 5 * i},{location},test")
        (data / "labels.csv").write_text("\n".join(rows) + "\n")
        out, overlays = tmp_path / "report", tmp_path / "overlays"
        args = ["evaluate", str(data), "--url", limited_server.grpc_url, "--report", str(out), "--json", str(tmp_path / "m.json"),
                "--overlay", str(overlays)]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        assert {p.name for p in out.iterdir()} == REPORT_FILES
        patients = list(csv.DictReader(open(out / "patients.csv")))
        wrong = {r["patient_id"] for r in patients if r["predicted_label"] != r["label"]}
        assert wrong and {p.name.split("_")[0] for p in overlays.iterdir()} == wrong  # overlays of the misclassified only
        metrics = json.loads((tmp_path / "m.json").read_text())
        assert [metrics["per_location"]["Det"][loc]["patients"] for loc in LOCATIONS] == [1, 1, 2, 0]  # P0 at two locations
        assert patients[0]["location"] == "cervical;thoracic"
        assert [metrics["sequences"][s]["left_out"] for s in ("T1", "T2", "All")] == [1, 1, 0]
        assert "vertebral location" in result.output and "ACC by MRI sequence" in result.output
        for name in ("per_location.png", "sequences.png", "roc.png"):
            assert_png(out / name)
