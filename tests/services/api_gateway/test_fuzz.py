"""Schemathesis against the gateway's own OpenAPI schema, on a real mesh on loopback (registry, one tiny FIM-capable
worker, a model in the store, the gateway with an API key, a private Redis).

What it asserts, for every operation and a few fixed seeds:
- no server error: no 5xx but a deliberate 503 with ``Retry-After``;
- every response conforms to the schema (status code, content type, body);
- requests the schema calls valid are accepted: the share of positive cases answered 4xx stays under a bound per
  operation (the rest are documented, data-dependent refusals: an unknown model, a file that is not JSONL, ...).

Stateful: schemathesis chains operations through the schema's links (upload a file, create a job with it, read
and cancel that job, ...).

CI runs a few examples per operation (``AXL_TEST_FUZZ_EXAMPLES``, default 6) with seeds ``AXL_TEST_FUZZ_SEEDS``;
``make fuzz`` runs many more.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck
from schemathesis import GenerationMode
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi import checks as openapi_checks

from axl_mesh.model_store import ModelStore
from tests.checkpoints import make_tiny_checkpoint
from tests.support import ServiceProcess

SECRET = "fuzz-registry-secret"
KEY = "sk-fuzz"
AUTH = {"Authorization": f"Bearer {KEY}"}
SERVED_MODEL = "axl-coder"
STORED_MODEL = "fuzz-stored"
EXAMPLES = int(os.environ.get("AXL_TEST_FUZZ_EXAMPLES", "6"))
SEEDS = [int(s) for s in os.environ.get("AXL_TEST_FUZZ_SEEDS", "1,2,3").split(",")]
# Per operation: the most positive (valid-by-schema) cases that may be refused with a 4xx.
MAX_REFUSED_SHARE = 0.5
# Answers that do not refuse valid data (as schemathesis's positive_data_acceptance check sees it): a missing
# model or id, a conflict, a rate limit.
NOT_REFUSALS = {401, 403, 404, 409, 429}
WINDOW = 128  # the tiny preset's context window, in bytes

CHECKS = [
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_schema_conformance,
]


@dataclass
class FuzzMesh:
    gateway: ServiceProcess
    schema: schemathesis.BaseSchema
    statuses: dict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))


@pytest.fixture(scope="module")
def fuzz_mesh(redis_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzMesh]:
    workdir = tmp_path_factory.mktemp("fuzz")
    checkpoint = make_tiny_checkpoint(workdir / "ckpt", seed=0, fim=True)
    gateway_data = workdir / "gateway-data"
    ModelStore(gateway_data / "models").add(STORED_MODEL, checkpoint, move=False, specialist="coder", base="tiny")
    services: list[ServiceProcess] = []
    try:
        registry = ServiceProcess("services.mesh_registry", {
            "AXL_REDIS_URL": redis_server, "AXL_REGISTRY_SECRET": SECRET, "AXL_INSTANCE_TTL_SECONDS": "30",
            "AXL_REGISTRY_KEY_PREFIX": "fuzz", "AXL_LOG_LEVEL": "warning",
        }, log_path=workdir / "registry.log").start()
        services.append(registry)
        services.append(ServiceProcess("services.model_worker", {
            "AXL_CHECKPOINT": str(checkpoint), "AXL_SPECIALIST": "coder", "AXL_MODEL_ID": SERVED_MODEL,
            "AXL_REGISTRY_URL": registry.url, "AXL_REGISTRY_SECRET": SECRET, "AXL_NUM_THREADS": "1",
            "AXL_MAX_BATCH": "16", "AXL_LOG_LEVEL": "warning",
        }, log_path=workdir / "worker.log").start(60))
        gateway = ServiceProcess("services.api_gateway", {
            "AXL_REGISTRY_URL": registry.url, "AXL_REGISTRY_SECRET": SECRET, "AXL_API_KEYS": KEY,
            "AXL_REDIS_URL": redis_server, "AXL_DATA_DIR": str(gateway_data), "AXL_LOOKUP_TTL_SECONDS": "1",
            # Short generations keep the run fast: max_tokens above this is clamped (finish_reason "length").
            "AXL_MAX_TOKENS_CEILING": "4", "AXL_LOG_LEVEL": "warning",
        }, log_path=workdir / "gateway.log").start()
        services.append(gateway)
        _wait_until_served(gateway)
        upload = httpx.post(gateway.url + "/v1/files", headers=AUTH, data={"purpose": "fine-tune"},
                            files={"file": ("train.jsonl", b'{"text": "def f():\\n    return 1\\n"}\n')})
        assert upload.status_code == 200, upload.text
        raw = httpx.get(gateway.url + "/openapi.json").json()
        schema = schemathesis.openapi.from_dict(this_mesh(raw, file_id=upload.json()["id"]))
        yield FuzzMesh(gateway, schema)
    finally:
        for service in reversed(services):
            service.stop()


def this_mesh(raw: dict[str, Any], *, file_id: str) -> dict[str, Any]:
    """The gateway's schema narrowed to this mesh's data, which no static schema can list: the served and stored
    models, the uploaded file, the stored model's window. Everything else is the product's schema as served."""
    components = raw["components"]["schemas"]
    for name, models in {"CompletionRequest": [SERVED_MODEL, "coder"], "ChatCompletionRequest": [SERVED_MODEL],
                         "FineTuningJobCreate": [STORED_MODEL, "tiny"], "QuantizationJobCreate": [STORED_MODEL]}.items():
        components[name]["properties"]["model"] = {"type": "string", "enum": models}
    for name in ("training_file", "validation_file"):
        components["FineTuningJobCreate"]["properties"][name]["anyOf" if name == "validation_file" else "enum"] = (
            [{"type": "string", "enum": [file_id]}, {"type": "null"}] if name == "validation_file" else [file_id])
    components["Hyperparameters"]["properties"]["seq_len"]["anyOf"][0]["maximum"] = WINDOW
    return raw


def _wait_until_served(gateway: ServiceProcess) -> None:
    for _ in range(300):
        if httpx.get(gateway.url + "/readyz").status_code == 200:
            return
        import time

        time.sleep(0.1)
    raise AssertionError("the gateway never saw the worker")


def _server_error(response: schemathesis.Response) -> bool:
    """5xx, but a deliberate 503 with Retry-After (no replica, Redis down) is an answer, not a crash."""
    if response.status_code < 500:
        return False
    return not (response.status_code == 503 and "retry-after" in {k.lower() for k in response.headers})


def _describe(case: schemathesis.Case, response: schemathesis.Response) -> str:
    return (f"{case.method} {case.formatted_path} body={case.body!r:.300} query={case.query} -> "
            f"{response.status_code} {response.text[:300]}")


@dataclass
class Findings:
    failures: list[str] = field(default_factory=list)
    refused: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    positives: Counter[str] = field(default_factory=Counter)

    def report(self) -> str:
        return "\n".join(
            f"{label}: {len(self.refused[label])}/{self.positives[label]} valid cases refused; "
            f"e.g. {self.refused[label][0]}" for label in sorted(self.refused))


def fuzz_operation(mesh: FuzzMesh, operation: schemathesis.APIOperation, mode: GenerationMode, seed: int,
                   findings: Findings) -> None:
    """EXAMPLES cases of ``operation`` in ``mode``, each sent and checked; findings collected, not raised."""

    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis.settings(max_examples=EXAMPLES, deadline=None, database=None,
                         suppress_health_check=list(HealthCheck), phases=[hypothesis.Phase.generate])
    @hypothesis.seed(seed)
    def run(case: schemathesis.Case) -> None:
        response = case.call(base_url=mesh.gateway.url, headers=AUTH, timeout=60)
        mesh.statuses[operation.label][response.status_code] += 1
        if _server_error(response):
            findings.failures.append("server error: " + _describe(case, response))
            return
        try:
            case.validate_response(response, checks=CHECKS)
        except FailureGroup as group:  # every check failure is reported together below
            for failure in group.exceptions:
                findings.failures.append(f"{failure.title}: {str(failure)[:300]}\n  " + _describe(case, response))
        if mode == GenerationMode.POSITIVE:
            findings.positives[operation.label] += 1
            if 400 <= response.status_code < 500 and response.status_code not in NOT_REFUSALS:
                findings.refused[operation.label].append(_describe(case, response))

    try:
        run()
    except hypothesis.errors.Unsatisfiable:
        assert mode == GenerationMode.NEGATIVE, f"no valid case of {operation.label}"  # nothing there to negate


@pytest.mark.parametrize("seed", SEEDS)
def test_every_operation(fuzz_mesh: FuzzMesh, seed: int) -> None:
    findings = Findings()
    for operation in fuzz_mesh.schema.get_all_operations():
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz_operation(fuzz_mesh, operation.ok(), mode, seed, findings)
    print(findings.report())
    assert not findings.failures, "\n".join(dict.fromkeys(findings.failures))
    refused, positives = findings.refused, findings.positives
    too_many = [label for label in refused if len(refused[label]) > MAX_REFUSED_SHARE * positives[label]]
    assert not too_many, findings.report()


@pytest.mark.parametrize("seed", SEEDS)
def test_stateful(fuzz_mesh: FuzzMesh, seed: int) -> None:
    """Sequences linked through the schema (an uploaded file's id into a job, a created job's id into retrieve,
    events and cancel, ...), each step checked as above."""
    machine = fuzz_mesh.schema.as_state_machine()
    steps: Counter[str] = Counter()
    failures: list[str] = []

    class Stateful(machine):  # type: ignore[misc,valid-type]
        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"base_url": fuzz_mesh.gateway.url, "headers": AUTH, "timeout": 60}

        def validate_response(self, response: schemathesis.Response, case: schemathesis.Case,
                              additional_checks: Any = None, **kwargs: Any) -> None:
            # Collected, not raised: a raise makes hypothesis replay the sequence, and the server's state (the
            # files and jobs made so far) has moved on, so the replay draws differently (FlakyStrategyDefinition).
            steps[f"{case.operation.label} {response.status_code}"] += 1
            if _server_error(response):
                failures.append("server error: " + _describe(case, response))
                return
            try:
                case.validate_response(response, checks=CHECKS)
            except FailureGroup as group:
                failures.extend(f"{f.title}: {str(f)[:300]}\n  " + _describe(case, response) for f in group.exceptions)

    test_case = hypothesis.seed(seed)(Stateful.TestCase)
    test_case.settings = hypothesis.settings(
        max_examples=EXAMPLES, stateful_step_count=6, deadline=None, database=None,
        suppress_health_check=list(HealthCheck), phases=[hypothesis.Phase.generate])
    test_case().runTest()
    print(sorted(steps.items()))
    assert not failures, "\n".join(dict.fromkeys(failures))
    assert sum(steps.values()) > EXAMPLES


def test_regression_tiny_penalties_then_the_worker_still_serves(fuzz_mesh: FuzzMesh) -> None:
    """Found by schemathesis: this request was a 500 (NaN probabilities), and each such failure kept a worker row
    until every later request failed with 'no free rows in this batch'."""
    url = fuzz_mesh.gateway.url + "/v1/completions"
    body = {"model": SERVED_MODEL, "prompt": [[228, 215, 88], [16], [], [], [], [98, 0]], "best_of": 1,
            "frequency_penalty": 5e-324, "ignore_eos": False, "max_tokens": 1, "repetition_penalty": 5e-324,
            "seed": 16, "stop": None, "stream": None, "stream_options": None, "top_k": 0, "top_p": 5e-324}
    for _ in range(20):  # more than the worker's 16 rows
        answer = httpx.post(url, json=body, headers=AUTH, timeout=60)
        assert answer.status_code == 200, answer.text
    assert httpx.post(url, json={"model": SERVED_MODEL, "prompt": ""}, headers=AUTH, timeout=60).status_code == 200
