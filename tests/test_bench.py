"""wff bench: the load generator's arithmetic, the server's memory, and runs against the real
tritonserver on the stand-in repository (counts and fields only: no timing thresholds)."""

from __future__ import annotations

import asyncio
import json
import os
import types

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY, write_dicom_patient

from wff.cli import main
from wff.client.metrics import parse_metrics, per_model
from wff.loadtest.bench import (
    Budget,
    Dispatcher,
    Outcome,
    add_speedups,
    check_loopback,
    drive,
    format_table4,
    load_patients,
    model_deltas,
    parse_concurrency,
    percentile_ms,
    result_row,
    settled_snapshot,
    table4,
    TreeMemory,
)
from wff.serving.custom_metrics import OTHER_REASON, rejection_reason
from wff.processes import child_pids

ROW_FIELDS = {"pipeline", "concurrency", "patients_per_s", "slices_per_s", "p50_ms", "p95_ms", "p99_ms", "errors"}
SLICES_PER_PATIENT = 10  # two series of 5 slices (see bench_dataset)


@pytest.fixture(scope="module")
def bench_artifacts(tiny_artifacts, tmp_path_factory):
    """The stand-in artifacts plus random-init PyTorch checkpoints of the tiny profile (for the eager baseline)."""
    import shutil

    from wff.training.checkpoint import save_checkpoint
    from wff.training.models import build_classifier, build_detector

    out = tmp_path_factory.mktemp("bench_artifacts") / "run"
    shutil.copytree(tiny_artifacts, out)
    save_checkpoint(out / "detector.pt", build_detector(TINY), TINY, "detector")
    save_checkpoint(out / "classifier.pt", build_classifier(TINY), TINY, "classifier")
    return out


@pytest.fixture(scope="module")
def bench_dataset(tmp_path_factory):
    """Test split: two good two-series patients and one whose only file is not DICOM."""
    root = tmp_path_factory.mktemp("bench_data")
    rows = ["patient_id,label,age,location,split"]
    for i, label in enumerate(("benign", "malignant")):
        write_dicom_patient(root / f"B{i}", {"SAG T1": 5, "SAG T2": 5}, size=TINY.image.size, seed=i)
        rows.append(f"B{i},{label},{40 + 20 * i},lumbar,test")
    (root / "BAD").mkdir()
    (root / "BAD" / "IM0001.dcm").write_bytes(b"not a dicom file")
    rows.append("BAD,benign,,lumbar,test")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


class TestPercentile:
    def test_linear_interpolation_in_ms(self):
        """Percentiles interpolate between ranks (numpy's default) and come back in milliseconds."""
        latencies = [0.1, 0.2, 0.3, 0.4]
        assert percentile_ms(latencies, 50) == pytest.approx(250.0)
        assert percentile_ms(latencies, 99) == pytest.approx(397.0)

    def test_empty_is_none(self):
        """Without a successful request there is no latency to report."""
        assert percentile_ms([], 95) is None


class TestResultRow:
    def test_rates_count_successes_only(self):
        """patients/s and slices/s count diagnoses; errors are counted, their latency ignored."""
        outcomes = [Outcome(0.5, 10, 2), Outcome(1.5, 30, 3), Outcome(9.0, error="bad")]
        row = result_row("served", 2, outcomes, wall_s=4.0)
        assert row["patients_per_s"] == 0.5 and row["slices_per_s"] == 10.0 and row["series_per_s"] == 1.25
        assert row["errors"] == 1 and row["requests"] == 3 and row["error_examples"] == ["bad"]
        assert row["p50_ms"] == pytest.approx(1000.0) and row["mean_ms"] == pytest.approx(1000.0)


class TestTable4:
    """Table 4's view from fake measurements: latencies of the concurrency-1 level, throughput of the highest."""

    @staticmethod
    def rows():
        one = result_row("served", 1, [Outcome(s, 10, 2) for s in (0.2, 0.4, 0.3, 1.1)] + [Outcome(5.0, error="bad")], wall_s=2.0)
        four = result_row("served", 4, [Outcome(0.9, 10, 2)] * 12, wall_s=3.0)
        baseline = result_row("eager_pytorch", 1, [Outcome(0.05, 10, 2)] * 4, wall_s=0.2)
        return [one, four, baseline]

    def test_per_patient_and_throughput(self):
        """Concurrency 1 gives p50 0.35 s, p95 0.995 s (linear between 0.4 and 1.1), mean 0.5 s over its 4
        diagnoses (the error left out); throughput is the concurrency-4 row's 4 patients/s; baselines are ignored."""
        t4 = table4(self.rows())
        one = t4["per_patient"]
        assert (one["concurrency"], one["diagnosed"]) == (1, 4)
        assert (one["p50_s"], one["p95_s"], one["mean_s"]) == pytest.approx((0.35, 0.995, 0.5))
        assert t4["throughput"] == pytest.approx({"concurrency": 4, "patients_per_s": 4.0, "seconds_per_patient": 0.25})
        assert t4["paper_avg_time_s"] == {"Det-Seq": 0.850, "Det-Seq-Age": 0.742}

    def test_text(self):
        """The text names Table 4, the three per-patient times, the throughput and the paper's times."""
        text = format_table4(table4(self.rows()))
        assert text.startswith("Table 4")
        assert "p50 0.350, p95 0.995, mean 0.500" in text and "concurrency 1, 4 diagnosed" in text
        assert "throughput at concurrency 4: 4.00 patients/s (0.250 s per patient)" in text
        assert "Det-Seq 0.850, Det-Seq-Age 0.742" in text

    def test_without_concurrency_one(self):
        """Without a concurrency-1 level the per-patient time is None and the text says what to add; no
        served row at all gives None."""
        rows = self.rows()[1:]
        t4 = table4(rows)
        assert t4["per_patient"] is None and t4["throughput"]["concurrency"] == 4
        assert "include 1 in --concurrency" in format_table4(t4)
        assert table4(rows[1:]) is None and format_table4(None) == "Table 4: no served rows"

    def test_unknown_pipeline_rejected(self):
        """Rows name one of the three pipelines."""
        with pytest.raises(ValueError, match="expected one of"):
            result_row("tensorflow", 1, [], 1.0)

    def test_speedup_against_best_served(self):
        """Baselines get the best served patients/s divided by their own."""
        rows = [{"pipeline": "served", "patients_per_s": 2.0}, {"pipeline": "served", "patients_per_s": 3.0},
                {"pipeline": "eager_pytorch", "patients_per_s": 1.0}]
        add_speedups(rows)
        assert rows[2]["served_speedup"] == 3.0 and "served_speedup" not in rows[0]


class TestBudget:
    def test_request_budget_hands_out_exactly_n(self):
        """A request budget gives numbers 0..n-1, then None."""
        d = Dispatcher(Budget(requests=3))
        assert [d.next() for _ in range(5)] == [0, 1, 2, None, None]

    def test_duration_budget_stops(self):
        """A spent duration gives None."""
        d = Dispatcher(Budget(duration_s=1.0))
        d.started -= 2.0
        assert d.next() is None

    @pytest.mark.parametrize("kwargs", [{}, {"requests": 1, "duration_s": 1.0}, {"requests": 0}, {"duration_s": 1e6}])
    def test_unbounded_or_ambiguous_rejected(self, kwargs):
        """Exactly one of requests / duration, within bounds."""
        with pytest.raises(ValueError):
            Budget(**kwargs)

    def test_drive_cycles_patients_with_bounded_concurrency(self):
        """N requests over the patients in turn, never more than K in flight; errors recorded."""
        from wff.client.grpc_client import DiagnosisError

        in_flight, peak, seen = 0, 0, []

        async def diagnose(files, age):
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.001)
            in_flight -= 1
            seen.append(files[0][0])
            if files[0][0] == "bad":
                raise DiagnosisError("rejected")
            return types.SimpleNamespace(slice_d=np.zeros(4), series_m=np.zeros(2))  # what drive reads of a Diagnosis

        from wff.loadtest.bench import BenchPatient

        patients = [BenchPatient(0, (("a", b""),), None), BenchPatient(1, (("bad", b""),), None)]
        outcomes, wall = asyncio.run(drive(diagnose, patients, 3, Budget(requests=7)))
        assert len(outcomes) == 7 and peak <= 3 and wall > 0
        assert sorted(seen) == ["a"] * 4 + ["bad"] * 3
        assert sum(o.error is not None for o in outcomes) == 3


class TestParsing:
    def test_concurrency_list(self):
        """Comma-separated levels; zero, negatives and words are refused."""
        assert parse_concurrency("1,2, 4,8") == (1, 2, 4, 8)
        for bad in ("0", "1,x", "", "1000"):
            with pytest.raises(ValueError, match="concurrency"):
                parse_concurrency(bad)

    def test_loopback_only(self):
        """Only servers on this machine are driven."""
        check_loopback("127.0.0.1:8001")
        check_loopback("localhost:8001")
        with pytest.raises(ValueError, match="this machine only"):
            check_loopback("10.0.0.5:8001")


class TestMetricDeltas:
    BEFORE = """nv_inference_request_success{model="wff_diagnosis",version="1"} 4
nv_inference_request_success{model="detector",version="1"} 4
nv_inference_exec_count{model="detector",version="1"} 4
nv_inference_count{model="detector",version="1"} 40
nv_inference_queue_duration_us{model="detector",version="1"} 1000
nv_inference_compute_infer_duration_us{model="detector",version="1"} 400000
"""
    AFTER = """nv_inference_request_success{model="wff_diagnosis",version="1"} 10
nv_inference_request_success{model="detector",version="1"} 10
nv_inference_exec_count{model="detector",version="1"} 7
nv_inference_count{model="detector",version="1"} 100
nv_inference_queue_duration_us{model="detector",version="1"} 7000
nv_inference_compute_infer_duration_us{model="detector",version="1"} 1000000
"""

    def test_deltas_per_model(self):
        """Requests, executions, mean batch and times cover only the growth between the snapshots."""
        d = model_deltas(per_model(parse_metrics(self.AFTER)), per_model(parse_metrics(self.BEFORE)))["detector"]
        assert d["requests"] == 6 and d["executions"] == 3 and d["mean_batch"] == 20
        assert d["queue_ms"] == pytest.approx(1.0) and d["compute_infer_ms"] == pytest.approx(100.0)
        assert d["compute_s"] == pytest.approx(0.6)

    def test_settles_once_expected_requests_counted(self):
        """The snapshot is taken once the ensemble counted every request and two reads agree."""
        reads = iter([self.BEFORE, self.AFTER, self.AFTER])
        after, _, settled = settled_snapshot("x", per_model(parse_metrics(self.BEFORE)), 6, 0, read=lambda url: parse_metrics(next(reads)))
        assert settled and after["wff_diagnosis"]["success"] == 10


class TestRejectionReason:
    @pytest.mark.parametrize("message, reason", [
        ("DICOM_FILES[0]: not a DICOM file (no DICM preamble); send DICOM Part 10 files only", "not_dicom"),
        ("AGE_YEARS: age 500.0 is out of range", "bad_age"),
        ("DICOM_FILES[2]: pixel data cannot be decoded (JPEG 2000: RuntimeError); the file may be truncated", "undecodable_pixels"),
        ("no usable sagittal T1/T2/STIR series (series 1 'x': not a DICOM file)", "no_usable_series"),
        ("97 sagittal slices exceed the limit of 96 per patient (serving.max_slices)", "over_limit"),
        ("something new", OTHER_REASON),
    ])
    def test_reasons(self, message, reason):
        """Messages map to a small fixed set of reason labels."""
        assert rejection_reason(message) == reason


class TestMemory:
    def test_tree_of_this_process(self):
        """This process's tree includes a child it starts; its PSS is positive."""
        import subprocess
        import sys

        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
        try:
            assert child.pid in child_pids(os.getpid())
            with TreeMemory(os.getpid(), interval_s=0.05) as memory:
                pass
            assert memory.peak_mib > 1
        finally:
            child.kill()
            child.wait()

    def test_missing_process_named(self):
        """A pid that does not exist is an error that says what to give."""
        with pytest.raises(ValueError, match="tritonserver pid"):
            TreeMemory(2**22 + 7)


def test_load_patients_reads_split(bench_dataset):
    """Patients come from labels.csv order, ages parsed, unknown age None."""
    patients = load_patients(bench_dataset, "test", 10)
    assert [len(p.files) for p in patients] == [10, 10, 1]
    assert patients[0].age == 40.0 and patients[2].age is None


@pytest.fixture(scope="module")
def result(bench_artifacts, bench_dataset, tmp_path_factory):
    """``wff bench`` on a server it starts (two Python instances per step), 6 requests per level, with baselines."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    args = ["bench", "--artifacts", str(bench_artifacts), "--dataset", str(bench_dataset), "--concurrency", "1,3",
            "--requests", "6", "--baseline", "--json", str(out), "--set", "serving.instances_python=2"]
    run = CliRunner().invoke(main, args)
    assert run.exit_code == 0, run.output
    return json.loads(out.read_text()), run.output


@pytest.mark.server
class TestBenchServed:

    def test_rows_have_every_field(self, result):
        """One served row per level, then the two baselines, each with the fields of the JSON contract."""
        report, _ = result
        rows = report["rows"]
        assert [(r["pipeline"], r["concurrency"]) for r in rows] == [
            ("served", 1), ("served", 3), ("eager_pytorch", 1), ("onnxruntime_inprocess", 1)]
        for r in rows:
            assert ROW_FIELDS <= set(r)
        assert all(r["server_rss_mib"] > 0 for r in rows if r["pipeline"] == "served")
        assert report["server"]["repository_serving"]["instances_python"] == 2

    def test_bad_patient_counted_as_error(self, result):
        """Of 6 requests cycling over 3 patients, the 2 sends of the bad one fail, the rest diagnose."""
        for r in result[0]["rows"]:
            assert r["requests"] == 6 and r["errors"] == 2
            assert r["slices_per_s"] == pytest.approx(SLICES_PER_PATIENT * r["patients_per_s"])

    def test_metric_deltas_match_requests(self, result):
        """Triton counted exactly this level's requests: 6 executed by preprocess, 4 diagnosed; none negative.

        (Triton counts a Python step's error response as executed, and a failed ensemble request
        as at least one failure; the rejections by reason come from the custom counter.)
        """
        for r in result[0]["rows"]:
            if r["pipeline"] != "served":
                continue
            models = r["models"]
            assert r["metrics_settled"]
            assert models["wff_diagnosis"]["success"] == 4 and models["wff_diagnosis"]["failures"] >= 2
            assert models["preprocess"]["requests"] == 6 and models["fusion"]["requests"] == 4
            detector = models["detector"]  # the batcher may merge patients: count slices, not executions
            assert detector["requests"] == 4 and detector["mean_batch"] * detector["executions"] == 4 * SLICES_PER_PATIENT
            assert all(v >= 0 for m in models.values() for v in m.values())
            custom = r["custom_metrics"]
            assert custom.pop("wff_rejected_inputs_total{model=preprocess,reason=not_dicom}") == 2
            assert sum(custom.values()) == 4 and all(k.startswith("wff_diagnoses_total{diagnosis=") for k in custom)

    def test_table_printed(self, result):
        """The table and the per-model breakdown are printed."""
        _, output = result
        assert "patients_per_s" not in output and "pat/s" in output and "per model over the level" in output

    def test_table4(self, result):
        """Table 4 in the JSON and the text: concurrency 1's latencies of its 4 diagnoses, concurrency 3's throughput."""
        report, output = result
        t4, (one, three) = report["table4"], report["rows"][:2]
        assert t4["per_patient"]["diagnosed"] == 4
        assert t4["per_patient"]["p50_s"] == pytest.approx(one["p50_ms"] / 1000) and 0 < t4["per_patient"]["mean_s"] <= one["p99_ms"] / 1000
        assert t4["throughput"]["concurrency"] == 3 and t4["throughput"]["patients_per_s"] == three["patients_per_s"]
        assert "Table 4, time per patient" in output and f"p95 {t4['per_patient']['p95_s']:.3f}" in output


class TestBenchCli:
    def test_needs_a_server(self, bench_dataset):
        """Without --artifacts or --url the command says what to give."""
        run = CliRunner().invoke(main, ["bench", "--dataset", str(bench_dataset)])
        assert run.exit_code == 2 and "--artifacts" in run.output

    def test_remote_url_refused(self, bench_dataset):
        """A non-loopback server is refused before anything is sent."""
        run = CliRunner().invoke(main, ["bench", "--url", "192.0.2.1:8001", "--dataset", str(bench_dataset)])
        assert run.exit_code == 2 and "this machine only" in run.output

    def test_only_serving_overrides(self, tiny_artifacts, bench_dataset):
        """--set may change serving settings only."""
        run = CliRunner().invoke(main, ["bench", "--artifacts", str(tiny_artifacts), "--dataset", str(bench_dataset), "--set", "detector.top_k=2"])
        assert run.exit_code == 2 and "serving.KEY=VALUE" in run.output


class TestRuntimeChunk:
    def test_chunked_equals_whole_batch(self, tiny_artifacts):
        """A batch run in chunks of 3 gives the same outputs, in order, as one run."""
        from wff.contracts import contracts_for
        from wff.ensemble.runtime import OnnxRunner

        c = contracts_for(TINY).detector
        batch = np.random.default_rng(0).random((8, 1, TINY.image.size, TINY.image.size), dtype=np.float32)
        whole = OnnxRunner(tiny_artifacts / "detector.onnx", c, threads=1)(batch)
        chunked = OnnxRunner(tiny_artifacts / "detector.onnx", c, threads=1, chunk=3)(batch)
        for name, value in whole.items():
            np.testing.assert_array_equal(chunked[name], value)

    def test_bad_chunk_rejected(self, tiny_artifacts):
        """A chunk below 1 is refused with what is allowed."""
        from wff.contracts import contracts_for
        from wff.ensemble.runtime import OnnxRunner

        with pytest.raises(ValueError, match="chunk must be >= 1"):
            OnnxRunner(tiny_artifacts / "detector.onnx", contracts_for(TINY).detector, threads=1, chunk=0)


class TestOpenVinoRunner:
    def test_matches_onnxruntime(self, tiny_artifacts):
        """OpenVINO (fp32) gives ONNX Runtime's outputs on the same model, chunked or not."""
        from wff.contracts import contracts_for
        from wff.ensemble.runtime import make_runner

        for step, model in (("detector", "detector.onnx"), ("classifier", "classifier.onnx")):
            contract = contracts_for(TINY).step(step)
            shape = (5, *contract.inputs[0].dims)
            batch = np.random.default_rng(1).random(shape, dtype=np.float32)
            expected = make_runner("onnxruntime", tiny_artifacts / model, contract, threads=1)(batch)
            got = make_runner("openvino", tiny_artifacts / model, contract, threads=1, chunk=2)(batch)
            for name, value in expected.items():
                assert got[name].dtype == value.dtype
                np.testing.assert_allclose(got[name], value, atol=1e-5)

    def test_unknown_runtime_named(self, tiny_artifacts):
        """An unknown runtime is refused with the choices."""
        from wff.contracts import contracts_for
        from wff.ensemble.runtime import make_runner

        with pytest.raises(ValueError, match="expected one of"):
            make_runner("tflite", tiny_artifacts / "detector.onnx", contracts_for(TINY).detector, threads=1)

    def test_bf16_close_to_f32(self, tiny_artifacts):
        """bf16 keeps the contract (names, dtypes, shapes) and stays near fp32 on the classifier's probabilities."""
        from wff.contracts import contracts_for
        from wff.ensemble.runtime import make_runner

        contract = contracts_for(TINY).classifier
        batch = np.random.default_rng(2).random((4, *contract.inputs[0].dims), dtype=np.float32)
        f32 = make_runner("openvino", tiny_artifacts / "classifier.onnx", contract, threads=1, precision="f32")
        bf16 = make_runner("openvino", tiny_artifacts / "classifier.onnx", contract, threads=1, precision="bf16")
        assert bf16.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() in ("bf16", "f32")  # f32 where the CPU lacks bf16
        expected, got = f32(batch), bf16(batch)
        for spec in contract.outputs:
            assert got[spec.name].dtype == expected[spec.name].dtype and got[spec.name].shape == expected[spec.name].shape
        np.testing.assert_allclose(got["classifier_probs"], expected["classifier_probs"], atol=0.05)
        detector = contracts_for(TINY).detector
        slices = np.random.default_rng(3).random((2, *detector.inputs[0].dims), dtype=np.float32)
        out = make_runner("openvino", tiny_artifacts / "detector.onnx", detector, threads=1, precision="bf16")(slices)
        assert {o.name for o in detector.outputs} == set(out)

    @pytest.mark.parametrize("runtime, precision, match", [
        ("onnxruntime", "bf16", "serving.runtime_precision"),
        ("openvino", "int4", "serving.runtime_precision"),
        ("tflite", "f32", "serving.runtime"),
    ])
    def test_unserved_precision_named(self, runtime, precision, match):
        """A runtime/precision pair that is not served is refused with the serving field to fix."""
        from wff.ensemble.runtime import check_runtime

        with pytest.raises(ValueError, match=match):
            check_runtime(runtime, precision)


class TestFlops:
    def test_deformable_convolution_counted(self):
        """deform_conv2d counts as the convolution it computes: 2 x outputs x Cin x kh x kw."""
        import torch
        from torch.utils.flop_counter import FlopCounterMode
        from torchvision.ops import deform_conv2d

        from wff.loadtest.bench_baselines import _custom_flop_formulas

        x, weight = torch.rand(1, 4, 8, 8), torch.rand(6, 4, 3, 3)
        offset = torch.zeros(1, 2 * 9, 8, 8)
        counter = FlopCounterMode(display=False, custom_mapping=_custom_flop_formulas())
        with counter:
            deform_conv2d(x, offset, weight, padding=1)
        assert counter.get_total_flops() == 2 * 6 * 8 * 8 * 4 * 3 * 3

    def test_patient_flops_scale_with_slices_and_series(self):
        """A patient costs its slices through the detector plus one clip per series."""
        from wff.loadtest.bench_baselines import model_flops, patient_flops

        counts = model_flops(TINY)
        assert counts["detector_per_slice"] > 0 and counts["classifier_per_clip"] > 0
        assert patient_flops(counts, 10, 2) == 10 * counts["detector_per_slice"] + 2 * counts["classifier_per_clip"]
