"""Grafana and the Prometheus alert rules of the compose mesh (deploy/grafana/, deploy/alerts.yml).

The dashboard is valid Grafana JSON on the provisioned datasource; the alert rules pass ``promtool check rules``
(where promtool is installed: Debian's ``prometheus`` package) and are loaded by the compose Prometheus; and every
metric a panel or a rule queries is one some service really serves on ``/metrics``: a mesh of real processes
(registry, a tiny model worker, gateway, trainer, quantizer) is booted, used once (a streamed completion, a
failed request, a fine-tuning job that runs and is cancelled) so that labelled families exist, and scraped.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.checkpoints import make_tiny_checkpoint
from tests.deploy.conftest import env_of
from tests.e2e.conftest import Mesh
from tests.services.trainer_worker.mesh import PAIRS, wait_for, wait_for_status
from tests.support import REPO_ROOT, RedisServer, ServiceProcess

DEPLOY = REPO_ROOT / "deploy"
GRAFANA = DEPLOY / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
ALERTS = DEPLOY / "alerts.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus.yml"

# Series Prometheus makes itself rather than scraping them, and the labels it puts on every scraped series. A
# scraped label named like a target label is renamed ``exported_<name>`` (honor_labels is off): our own series use
# other names (the fine-tuning job id is ``job_id``), and a test keeps it so.
SYNTHETIC_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
TARGET_LABELS = {"job", "instance"}
# Words of PromQL that look like metric names: keywords, and the modifiers whose "(...)" holds label names.
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right",
             "inf", "nan"}
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """The series selectors of a PromQL expression: (metric name, label names its matchers use)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values may hold anything
    text = re.sub(r"\$\{?\w+\}?", "", text)  # Grafana's variables ($__rate_interval)
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery durations
    text = _GROUPING.sub(" ", text)
    found = []
    for match in re.finditer(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?\s*(\()?", text):
        name, matchers, call = match.groups()
        if call or name.lower() in _KEYWORDS:
            continue
        found.append((name, set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers or ""))))
    return found


def test_selectors_finds_metrics_and_matcher_labels() -> None:
    expr = ('histogram_quantile(0.9, sum by (le, model) (rate(axl_a_bucket{status=~"5..", x="a{b}"}[5m]))) '
            '/ on (model) group_left max_over_time(axl_b[1h:1m]) > 1e3 and up{job!="p"} offset 5m')
    assert selectors(expr) == [("axl_a_bucket", {"status", "x"}), ("axl_b", set()), ("up", {"job"})]


# --- the dashboard ------------------------------------------------------------------------------------------------


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]


def _datasource() -> dict[str, Any]:
    provisioned = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = provisioned["datasources"]
    return source


@pytest.fixture(scope="module", params=[p.name for p in DASHBOARDS])
def dashboard(request: pytest.FixtureRequest) -> dict[str, Any]:
    return json.loads((GRAFANA / "dashboards" / request.param).read_text())


def test_there_is_a_dashboard() -> None:
    assert [p.name for p in DASHBOARDS] == ["axl-mesh.json"]


def test_dashboard_is_valid_grafana_json(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    source = _datasource()
    for panel in _panels(dashboard):
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel["targets"], panel["title"]
        for ref in [panel["datasource"], *(t["datasource"] for t in panel["targets"])]:
            assert ref == {"type": "prometheus", "uid": source["uid"]}, panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"], panel["title"]


def test_dashboard_covers_what_operators_look_at(dashboard: dict[str, Any]) -> None:
    """Requests, TTFT and inter-token percentiles, tokens/s, queues, worker health, job progress and loss."""
    exprs = "\n".join(_exprs(dashboard))
    for needed in ("axl_gateway_requests_total", "histogram_quantile(0.99, sum by (le, model) "
                   "(rate(axl_gateway_time_to_first_token_seconds_bucket",
                   "rate(axl_gateway_inter_token_latency_seconds_bucket", "axl_gateway_generation_tokens_total",
                   "axl_worker_num_requests_waiting", "axl_worker_num_requests_running", "axl_job_queue_depth",
                   "sum by (specialist) (axl_registry_instances)", "axl_training_step", "axl_training_loss", "axl_jobs"):
        assert needed in exprs, needed


def _check_promql_with_promtool(exprs: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """promtool parses PromQL only inside rule files: each expression as a recording rule."""
    rules = {"groups": [{"name": "exprs", "rules": [
        {"record": f"check:expr_{i}", "expr": re.sub(r"\$\{?__\w+\}?", "5m", e)} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump(rules))
    return subprocess.run([_promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return found


def test_dashboard_queries_parse(dashboard: dict[str, Any], tmp_path: Path) -> None:
    result = _check_promql_with_promtool(_exprs(dashboard), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promql_check_can_fail(tmp_path: Path) -> None:
    result = _check_promql_with_promtool(["sum by (model (rate(axl_gateway_requests_total[5m]))"], tmp_path)
    assert result.returncode != 0


# --- provisioning and the compose service -------------------------------------------------------------------------


def test_datasource_is_the_compose_prometheus(compose: dict[str, Any]) -> None:
    source = _datasource()
    assert source["type"] == "prometheus" and source["access"] == "proxy" and source["isDefault"] is True
    assert source["url"] == "http://prometheus:9090"
    assert "9090" in compose["services"]["prometheus"]["ports"][0]
    scrape = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["global"]["scrape_interval"]
    assert source["jsonData"]["timeInterval"] == scrape  # $__rate_interval needs the real scrape interval


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host source (with its mode) of a service's bind mounts and volumes."""
    return {volume.split(":")[1]: volume for volume in service["volumes"]}


def test_grafana_loads_the_provisioning_files_and_dashboards(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = _mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro"
    provider_file = GRAFANA / "provisioning" / "dashboards" / "axl-mesh.yml"
    (provider,) = yaml.safe_load(provider_file.read_text())["providers"]
    assert provider["type"] == "file"
    dashboards_in_container = provider["options"]["path"]
    assert mounts[dashboards_in_container] == f"./deploy/grafana/dashboards:{dashboards_in_container}:ro"
    home = env_of(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dashboards_in_container + "/")
    assert (GRAFANA / "dashboards" / home.rsplit("/", 1)[1]).is_file()
    assert mounts["/var/lib/grafana"] == "grafana-data:/var/lib/grafana" and "grafana-data" in compose["volumes"]


def test_grafana_is_pinned_non_root_and_private(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    image, _, tag = grafana["image"].partition(":")
    assert image.startswith("grafana/grafana") and re.fullmatch(r"\d+\.\d+\.\d+", tag), grafana["image"]
    assert str(grafana["user"]) not in ("0", "root", "0:0") and str(grafana["user"]).split(":")[0].isdigit()
    assert grafana["ports"] == ["127.0.0.1:${AXL_GRAFANA_PORT:-3000}:3000"]
    env = env_of(grafana)
    assert re.fullmatch(r"\$\{AXL_GRAFANA_ADMIN_PASSWORD:\?[^}]+\}", env["GF_SECURITY_ADMIN_PASSWORD"])
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false" and env["GF_USERS_ALLOW_SIGN_UP"] == "false"
    assert grafana["depends_on"] == {"prometheus": {"condition": "service_healthy"}}


# --- the alert rules ----------------------------------------------------------------------------------------------


def _alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_compose_prometheus_loads_the_alert_rules(compose: dict[str, Any]) -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    prometheus = compose["services"]["prometheus"]
    config_in_container = Path(_mounts(prometheus)["/etc/prometheus/prometheus.yml"].split(":")[1])
    for rule_file in config["rule_files"]:
        in_container = config_in_container.parent / rule_file  # relative to the config file, as Prometheus reads
        assert _mounts(prometheus)[str(in_container)] == f"./deploy/{rule_file}:{in_container}:ro"
        assert (PROMETHEUS_CONFIG.parent / rule_file).resolve() == ALERTS.resolve()


def test_alert_rules_are_the_expected_alerts() -> None:
    rules = _alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    assert {"AxlServiceDown", "AxlSpecialistHasNoHealthyWorker", "AxlWorkerQueueSaturated", "AxlJobQueueStalled",
            "AxlJobFailed", "AxlGateway5xxRate"} <= set(names)
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


def test_promtool_accepts_the_alert_rules_and_the_config() -> None:
    promtool = _promtool()
    rules = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(_alert_rules())} rules found" in rules.stdout
    config = subprocess.run([promtool, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True,
                            timeout=60)
    assert config.returncode == 0, config.stdout + config.stderr


def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    promtool = _promtool()
    broken = tmp_path / "alerts.yml"
    broken.write_text(ALERTS.read_text().replace("> 0.05", "> > 0.05", 1))
    result = subprocess.run([promtool, "check", "rules", str(broken)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0


# --- against a running mesh ---------------------------------------------------------------------------------------


def _scrape(url: str) -> dict[str, set[str]]:
    """Sample name -> label names, from one /metrics page."""
    response = httpx.get(url + "/metrics", timeout=10)
    response.raise_for_status()
    samples: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return samples


def _merge(into: dict[str, set[str]], more: dict[str, set[str]]) -> None:
    for name, labels in more.items():
        into.setdefault(name, set()).update(labels)


@pytest.fixture(scope="module")
def served_metrics(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """Every sample name (with its label names) the services serve once each has done its work."""
    root = tmp_path_factory.mktemp("monitoring-mesh")
    redis_server = RedisServer(root / "redis.log").start()
    mesh = Mesh(redis_url=redis_server.url, workdir=root)
    jobs_env = {"AXL_DATA_DIR": str(root / "data"), "AXL_REAPER_INTERVAL_SECONDS": "1",
                "AXL_HEARTBEAT_INTERVAL_SECONDS": "1", "AXL_CANCEL_GRACE_SECONDS": "5", "AXL_NUM_THREADS": "1",
                "OMP_NUM_THREADS": "1", "AXL_LOG_LEVEL": "warning", "AXL_REDIS_URL": redis_server.url}
    job_workers: list[ServiceProcess] = []
    try:
        mesh.start_registry()
        mesh.start_worker(make_tiny_checkpoint(root / "checkpoint"), "coder")
        mesh.start_gateway(**jobs_env)
        for module in ("services.trainer_worker", "services.quantizer"):
            name = module.rsplit(".", 1)[1]
            job_workers.append(ServiceProcess(module, jobs_env, log_path=root / f"{name}.log").start(60))
        trainer = job_workers[0]
        services = [mesh.registry, mesh.gateway, *mesh.workers, *job_workers]

        client = mesh.client()
        stream = client.chat.completions.create(model="axl-coder", stream=True, max_tokens=8,
                                                messages=[{"role": "user", "content": "def f():"}])
        assert len([chunk for chunk in stream if chunk.choices]) > 1  # first token, then inter-token gaps
        client.completions.create(model="axl-coder", prompt="x = ", max_tokens=4)
        with pytest.raises(openai.NotFoundError):  # another status
            client.completions.create(model="no-such-model", prompt="x", max_tokens=1)

        file_id = client.files.create(file=("pairs.jsonl", io.BytesIO(PAIRS.encode())), purpose="fine-tune").id
        job = client.fine_tuning.jobs.create(model="tiny", training_file=file_id, hyperparameters={
            "max_steps": 100_000, "batch_size": 2, "seq_len": 32, "specialist": "coder"})
        running = ("axl_training_step", "axl_training_loss", "axl_training_bytes_per_second")
        wait_for(lambda: all(m in _scrape(trainer.url) for m in running), 120, "a running job's gauges")

        served: dict[str, set[str]] = {}
        for service in services:
            _merge(served, _scrape(service.url))
        client.fine_tuning.jobs.cancel(job.id)
        wait_for_status(client, job.id, {"cancelled"}, 60)
        time.sleep(0.5)
        _merge(served, _scrape(trainer.url))  # the ended job's duration
        return served
    finally:
        for process in job_workers:
            process.stop()
        mesh.stop()
        redis_server.stop()


def _unknown_metrics(exprs: list[str], served: dict[str, set[str]]) -> list[str]:
    problems = []
    for expr in exprs:
        for name, labels in selectors(expr):
            if name in SYNTHETIC_SERIES:
                continue
            if name not in served:
                problems.append(f"{name} (in {expr!r}) is not served by any service")
                continue
            scraped = served[name] | {f"exported_{label}" for label in served[name] & TARGET_LABELS}
            missing = labels - scraped - (TARGET_LABELS - served[name])
            if missing:
                problems.append(f"{name} has no label {sorted(missing)} (in {expr!r}); it has {sorted(scraped)}")
    return problems


def test_the_mesh_serves_what_the_checks_need(served_metrics: dict[str, set[str]]) -> None:
    """The scrape is complete: histograms as _bucket/_sum/_count, labelled families present."""
    for name in ("axl_gateway_time_to_first_token_seconds_bucket", "axl_gateway_inter_token_latency_seconds_count",
                 "axl_gateway_requests_total", "axl_registry_instances", "axl_worker_num_requests_waiting",
                 "axl_job_queue_depth", "axl_jobs", "axl_training_loss", "axl_job_duration_seconds_bucket"):
        assert name in served_metrics, name
    assert "job_id" in served_metrics["axl_training_loss"]
    clashing = {name: labels & TARGET_LABELS for name, labels in served_metrics.items() if labels & TARGET_LABELS}
    assert not clashing, f"labels Prometheus would rename to exported_*: {clashing}"


def test_every_dashboard_metric_is_served(dashboard: dict[str, Any], served_metrics: dict[str, set[str]]) -> None:
    problems = _unknown_metrics(_exprs(dashboard), served_metrics)
    assert not problems, "\n".join(problems)


def test_every_alert_metric_is_served(served_metrics: dict[str, set[str]]) -> None:
    problems = _unknown_metrics([rule["expr"] for rule in _alert_rules()], served_metrics)
    assert not problems, "\n".join(problems)


def test_the_metric_check_catches_a_wrong_name_or_label(served_metrics: dict[str, set[str]]) -> None:
    assert _unknown_metrics(["rate(axl_gateway_request_total[5m])"], served_metrics)
    assert _unknown_metrics(['axl_gateway_requests_total{code="500"}'], served_metrics)
    assert not _unknown_metrics(['max by (job_id) (axl_training_loss{job_id="x"})'], served_metrics)
