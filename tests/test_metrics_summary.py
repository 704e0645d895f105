"""Parsing and summarising Triton's Prometheus metrics."""

import pytest

from wff.client.metrics import delta, parse_metrics, per_model, summarise

TEXT = """# HELP nv_inference_request_success Number of successful inference requests
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="detector",version="1"} 10
nv_inference_request_failure{model="preprocess",reason="REJECTED",version="1"} 2
nv_inference_request_success{model="preprocess",version="1"} 8
nv_inference_count{model="detector",version="1"} 400
nv_inference_exec_count{model="detector",version="1"} 5
nv_inference_queue_duration_us{model="detector",version="1"} 20000
nv_inference_compute_infer_duration_us{model="detector",version="1"} 500000
nv_cpu_utilization 0.5
"""


class TestParse:
    def test_labels_and_values(self):
        """Names, sorted labels and float values are read; comments are skipped."""
        samples = parse_metrics(TEXT)
        assert samples[0].name == "nv_inference_request_success" and samples[0].label("model") == "detector"
        assert samples[-1].value == 0.5

    def test_malformed_line_named(self):
        """A line that is not Prometheus text is an error with its line number."""
        with pytest.raises(ValueError, match="line 2"):
            parse_metrics("a 1\n{broken\n")


class TestSummary:
    def test_means_per_request_and_batch(self):
        """Queue/compute means divide by successes; mean batch = inferences / executions."""
        rows = summarise(per_model(parse_metrics(TEXT)))
        assert rows["detector"]["mean_batch"] == 80
        assert rows["detector"]["queue_ms"] == pytest.approx(2.0)
        assert rows["detector"]["compute_infer_ms"] == pytest.approx(50.0)
        assert rows["preprocess"]["failures"] == 2 and rows["preprocess"]["failure[REJECTED]"] == 2

    def test_delta_between_snapshots(self):
        """A run's share is the difference of two snapshots."""
        before = per_model(parse_metrics(TEXT))
        after = per_model(parse_metrics(TEXT.replace("} 10", "} 25")))
        assert delta(after, before)["detector"]["success"] == 15


class TestFormat:
    def test_zero_failure_reasons_hidden(self):
        """Only the failure reasons that occurred are listed under a model."""
        from wff.client.metrics import format_summary

        text = TEXT + 'nv_inference_request_failure{model="preprocess",reason="BACKEND",version="1"} 0\n'
        out = format_summary(summarise(per_model(parse_metrics(text))))
        assert "failure[REJECTED]: 2" in out and "BACKEND" not in out

    def test_gauges_readable(self):
        """CPU as a percentage, memory in GiB, both marked as the machine's."""
        from wff.client.metrics import format_gauges

        lines = format_gauges({"cpu_utilization": 0.5, "cpu_memory_used_bytes": 2**31, "cpu_memory_total_bytes": 2**33})
        assert lines == ["CPU utilisation (machine): 50 %", "memory used (machine): 2.0 of 8.0 GiB"]

    def test_custom_counters_keep_model_label(self):
        """The project's counters are listed with their labels (model and reason), version dropped."""
        from wff.client.metrics import custom_counters

        text = 'wff_rejected_inputs_total{model="preprocess",reason="not_dicom"} 3\nwff_diagnoses_total{diagnosis="benign"} 5\n'
        assert custom_counters(parse_metrics(text)) == {
            "wff_rejected_inputs_total{model=preprocess,reason=not_dicom}": 3.0, "wff_diagnoses_total{diagnosis=benign}": 5.0}
