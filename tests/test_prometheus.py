"""docker/prometheus: the shipped scrape config and rules, checked by Prometheus' own tools.

* ``promtool check config`` / ``promtool check rules`` on the files as shipped;
* ``promtool test rules``: every alert fires on the series it is about and stays silent on a
  healthy service (the rules' expressions, durations and labels; annotations are only checked
  for template syntax by ``check rules``);
* a real Prometheus (Debian's ``prometheus`` package, started here on loopback with a scratch
  storage folder) loads the shipped config and rules, scrapes the shared ``limited_server``
  after a diagnosis, and returns a Triton counter and a ``wff_*`` counter through its query API.

Prometheus and promtool come from the distribution (scripts/setup.sh installs them); a
missing binary fails these tests instead of skipping them.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from wff.client.grpc_client import DiagnosisClient, read_patient_files
from wff.contracts import ENSEMBLE_NAME
from wff.serving.custom_metrics import COUNTERS
from wff.processes import free_port

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "docker" / "prometheus"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULES = PROMETHEUS_DIR / "rules.yml"
SCRAPE_INTERVAL = "1s"
STARTUP_S = 30.0
QUERY_DEADLINE_S = 60.0


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run scripts/setup.sh (it installs Debian's prometheus package, which has "
                    f"prometheus and promtool), or install Prometheus 2.x yourself")
    return path


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([binary("promtool"), *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def alert_rules() -> dict[str, dict]:
    return {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}


class TestPromtool:
    def test_check_config(self):
        """prometheus.yml is valid and its rule file is found and valid."""
        result = promtool("check", "config", str(CONFIG))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "1 rule files found" in result.stdout

    def test_check_rules(self):
        """rules.yml: valid PromQL and annotation templates."""
        result = promtool("check", "rules", str(RULES))
        assert result.returncode == 0, result.stdout + result.stderr

    def test_config_loads_the_rules_compose_mounts(self):
        """The config's rule file is the one compose mounts beside it."""
        config = yaml.safe_load(CONFIG.read_text())
        assert config["rule_files"] == [RULES.name]
        compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
        assert f"./prometheus/{RULES.name}:/etc/prometheus/{RULES.name}:ro" in compose["services"]["prometheus"]["volumes"]

    def test_only_triton_251_metrics(self):
        """Every nv_* name the rules read is one Triton 2.51 exports (a misspelt name would only give empty results)."""
        exported = set(json.loads((ROOT / "docker" / "triton-metrics-2.51.json").read_text())["metrics"])
        names = set(re.findall(r"\bnv_[a-z_]+", RULES.read_text()))
        assert names, "no Triton metric in the rules"
        for name in names:  # a name ending in "_" is the fixed prefix of a __name__ regex
            assert name in exported or (name.endswith("_") and any(m.startswith(name) for m in exported)), name

    def test_alerts_cover_the_service(self):
        """Server down, rejected inputs, failures inside the ensemble, load shedding, queue time of the GPU models and of preprocess."""
        assert set(alert_rules()) == {"SpineWffServerDown", "SpineWffRejectedInputsHigh", "SpineWffRequestsFailing",
                                      "SpineWffShedding", "SpineWffModelQueueHigh", "SpineWffPreprocessQueueHigh"}
        assert all(r["labels"]["severity"] in ("critical", "warning") and r["annotations"]["summary"] for r in alert_rules().values())


def counter(per_minute: float, minutes: int = 30, start: float = 0.0) -> str:
    """promtool's expanding notation for a counter growing by ``per_minute`` each minute."""
    return f"{start:g}+{per_minute:g}x{minutes}"


# (alert, input series at 1 m intervals, evaluation minute, expected alerts' labels); each alert
# has a case where it fires and one where the same kind of traffic is healthy.
ALERT_CASES = [
    ("SpineWffServerDown", {'up{job="triton",instance="triton:8002"}': "1 1 0 0 0 0"}, 4,
     [{"severity": "critical", "job": "triton", "instance": "triton:8002"}]),
    ("SpineWffServerDown", {'up{job="triton",instance="triton:8002"}': "1 1 1 1 0 1"}, 5, []),
    # Triton 2.51, measured: a refused input is a success of preprocess and two OTHER failures of the ensemble
    ("SpineWffRejectedInputsHigh", {
        'wff_rejected_inputs_total{model="preprocess",reason="not_dicom"}': counter(3),
        'nv_inference_request_success{model="preprocess",version="1"}': counter(9),
        f'nv_inference_request_failure{{model="{ENSEMBLE_NAME}",version="1",reason="OTHER"}}': counter(6),
    }, 20, [{"severity": "warning"}]),
    ("SpineWffRejectedInputsHigh", {
        'wff_rejected_inputs_total{model="preprocess",reason="not_dicom"}': counter(1),
        'nv_inference_request_success{model="preprocess",version="1"}': counter(20),
        f'nv_inference_request_failure{{model="{ENSEMBLE_NAME}",version="1",reason="OTHER"}}': counter(2),
    }, 20, []),
    # measured: a killed crop stub makes each request a BACKEND failure of crop (and two of the ensemble)
    ("SpineWffRequestsFailing", {
        'nv_inference_request_failure{model="crop",version="1",reason="BACKEND"}': counter(2),
        f'nv_inference_request_failure{{model="{ENSEMBLE_NAME}",version="1",reason="OTHER"}}': counter(4),
    }, 15, [{"severity": "critical", "model": "crop"}]),
    ("SpineWffRequestsFailing", {
        'nv_inference_request_failure{model="detector",version="1",reason="REJECTED"}': counter(5),
        f'nv_inference_request_failure{{model="{ENSEMBLE_NAME}",version="1",reason="OTHER"}}': counter(4),
    }, 15, []),
    ("SpineWffShedding", {'nv_inference_request_failure{model="detector",version="1",reason="REJECTED"}': counter(5)}, 15,
     [{"severity": "warning", "model": "detector"}]),
    ("SpineWffShedding", {'nv_inference_request_failure{model="detector",version="1",reason="REJECTED"}': "0x30"}, 15, []),
    ("SpineWffModelQueueHigh", {
        'nv_inference_queue_duration_us{model="detector",version="1"}': counter(60 * 50_000),  # 50 ms per request
        'nv_inference_request_success{model="detector",version="1"}': counter(60),
        'nv_inference_queue_duration_us{model="classifier",version="1"}': counter(60 * 1_000),  # 1 ms per request
        'nv_inference_request_success{model="classifier",version="1"}': counter(60),
    }, 20, [{"severity": "warning", "model": "detector"}]),
    ("SpineWffPreprocessQueueHigh", {
        'nv_inference_queue_duration_us{model="preprocess",version="1"}': counter(10 * 3_000_000),  # 3 s per patient
        'nv_inference_request_success{model="preprocess",version="1"}': counter(10),
    }, 20, [{"severity": "warning", "model": "preprocess"}]),
    ("SpineWffPreprocessQueueHigh", {
        'nv_inference_queue_duration_us{model="preprocess",version="1"}': counter(10 * 100_000),  # 0.1 s per patient
        'nv_inference_request_success{model="preprocess",version="1"}': counter(10),
    }, 20, []),
]


class TestAlertRules:
    def test_alerts_fire_when_they_should(self, tmp_path):
        """promtool test rules: each alert fires on its failure and not on healthy traffic."""
        rules = yaml.safe_load(RULES.read_text())
        bare = copy.deepcopy(rules)  # annotations are prose with templates; the test is about expressions
        for group in bare["groups"]:
            for rule in group["rules"]:
                rule.pop("annotations", None)
        (tmp_path / "rules.yml").write_text(yaml.safe_dump(bare))
        tests = [{
            "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in series.items()],
            "alert_rule_test": [{"eval_time": f"{minute}m", "alertname": alert,
                                 "exp_alerts": [{"exp_labels": labels} for labels in expected]}],
        } for alert, series, minute, expected in ALERT_CASES]
        (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump({"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": tests}))
        assert {case[0] for case in ALERT_CASES} == set(alert_rules())
        result = promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- a real Prometheus scraping a real server


def scrape_config(metrics_url: str, storage: Path) -> Path:
    """The shipped config with its triton target pointed at ``metrics_url``, a 1 s scrape and evaluation interval,
    and the shipped rules by absolute path."""
    config = yaml.safe_load(CONFIG.read_text())
    config["global"].update(scrape_interval=SCRAPE_INTERVAL, evaluation_interval=SCRAPE_INTERVAL)
    config["rule_files"] = [str(RULES)]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "triton"]
    target = urllib.parse.urlsplit(metrics_url)
    assert target.path == job["metrics_path"]
    for static in job["static_configs"]:
        static["targets"] = [target.netloc]
    path = storage / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def api(base: str, path: str, **params) -> dict:
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (loopback)
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


def wait_for(what: str, probe, deadline_s: float, log: Path):
    """Call ``probe`` until it returns something truthy; fail with Prometheus' log after ``deadline_s``."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            result = probe()
        except OSError:
            result = None
        if result:
            return result
        if time.monotonic() > end:
            pytest.fail(f"{what}: nothing after {deadline_s:.0f} s; Prometheus log:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)


@pytest.fixture
def prometheus(limited_server, tmp_path):
    """Prometheus on a free loopback port, scraping the shared server every second; yields its base URL."""
    port = free_port("127.0.0.1")
    log = tmp_path / "prometheus.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [binary("prometheus"), f"--config.file={scrape_config(limited_server.metrics_url, tmp_path)}",
             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for("Prometheus /-/ready", lambda: urllib.request.urlopen(f"{base}/-/ready", timeout=2).status == 200, STARTUP_S, log)
        yield base, log
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def query_value(base: str, expr: str) -> float | None:
    """The first sample's value of an instant query, or None when the result is empty."""
    result = api(base, "/api/v1/query", query=expr)["result"]
    return float(result[0]["value"][1]) if result else None


@pytest.mark.server
class TestScrapesRealServer:
    def test_triton_and_wff_counters_through_the_query_api(self, prometheus, limited_server, dicom_patient):
        """After one diagnosis, Prometheus returns Triton's success counter of the ensemble and wff_diagnoses_total > 0."""
        base, log = prometheus
        with DiagnosisClient(limited_server.grpc_url, timeout_s=60) as client:
            assert client.diagnose(read_patient_files(dicom_patient)).label in ("benign", "malignant")
        assert "wff_diagnoses_total" in COUNTERS
        for expr in (f'sum(nv_inference_request_success{{model="{ENSEMBLE_NAME}"}})', "sum(wff_diagnoses_total)"):
            value = wait_for(expr, lambda expr=expr: (query_value(base, expr) or 0) > 0 and query_value(base, expr), QUERY_DEADLINE_S, log)
            assert value >= 1, expr
        assert query_value(base, 'up{job="triton"}') == 1

    def test_shipped_rules_evaluate_on_the_real_metrics(self, prometheus):
        """Every rule group of rules.yml is loaded and evaluates without error; the queue-time recording rule has series."""
        base, log = prometheus
        expected = {g["name"] for g in yaml.safe_load(RULES.read_text())["groups"]}

        def evaluated():
            groups = api(base, "/api/v1/rules")["groups"]
            rules = [r for g in groups for r in g["rules"]]
            return groups if rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules) else None

        groups = wait_for("rule evaluation", evaluated, QUERY_DEADLINE_S, log)
        assert {g["name"] for g in groups} == expected
        errors = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"] if r["health"] != "ok"]
        assert not errors, errors
        queue = wait_for("model:wff_queue_time_per_request_us:rate1m",
                         lambda: api(base, "/api/v1/query", query="model:wff_queue_time_per_request_us:rate1m")["result"],
                         QUERY_DEADLINE_S, log)
        assert {s["metric"]["model"] for s in queue} >= {"preprocess", "detector", "classifier"}
