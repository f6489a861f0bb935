"""The gateway's OpenAPI schema, saying what the API really does: the errors it answers with, the streams and
files it sends, and the constraints it enforces that FastAPI cannot read from the route signatures.

FastAPI's generated schema documents a 422 that never goes out (validation errors are OpenAI-shaped 400s, see
``axl_mesh.errors``), omits every error the routes raise, calls file downloads and SSE streams JSON, and knows
nothing of the checks made inside the routes (id formats, the upload's ``purpose`` and content, the samples cap,
the specialists). Fuzzers and client generators read this schema, so it must state those limits
(tests/services/api_gateway/test_fuzz.py checks that requests valid by it are accepted).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from axl_mesh.jobs_protocol import FILE_ID_PATTERN, FT_JOB_ID_PATTERN, QUANT_JOB_ID_PATTERN, FilePurpose
from axl_mesh.protocol import MAX_N

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
ERROR_DESCRIPTIONS = {
    "400": "Invalid request (the error's `param` names the field)",
    "401": "Missing or invalid API key",
    "404": "No such model, file or job",
    "413": "Request body (or uploaded file) over its limit",
    "503": "A dependency (registry, worker, Redis, the code sandbox) cannot serve now; `Retry-After` when it is "
    "worth retrying",
}
# Path parameters whose format the routes check (anything else is a 404), by path prefix.
ID_PATTERNS = {
    "/v1/files/{file_id}": FILE_ID_PATTERN,
    "/v1/fine_tuning/jobs/{job_id}": FT_JOB_ID_PATTERN,
    "/v1/quantization/jobs/{job_id}": QUANT_JOB_ID_PATTERN,
}
# With ``stream: true``: one event per chunk (the JSON object of the 200 answer's streamed form), then [DONE].
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string", "description": "a JSON chunk, or `[DONE]` at the end"}},
}
STREAMING = {"/v1/completions", "/v1/chat/completions", "/v1/agent/solve"}
DOWNLOADS = {"/v1/files/{file_id}/content", "/v1/quantization/jobs/{job_id}/files/{filename}"}


def install_openapi(app: FastAPI) -> None:
    """Serve the amended schema at ``/openapi.json`` (built once, on first use)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            amend(schema, max_samples=app.state.settings.max_samples_per_request)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def amend(schema: dict[str, Any], *, max_samples: int) -> None:
    """Errors, media types and the route-level constraints, written into FastAPI's ``schema`` in place."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["ErrorResponse"] = ERROR_SCHEMA
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for path, item in schema["paths"].items():
        for operation in item.values():
            _document_errors(path, operation)
            _state_path_parameters(path, operation)
            if path in STREAMING:
                operation["responses"]["200"]["content"]["text/event-stream"] = {"schema": SSE_EVENT}
            if path in DOWNLOADS:
                operation["responses"]["200"]["content"] = {
                    "application/octet-stream": {
                        "schema": {"type": "string", "contentMediaType": "application/octet-stream"}
                    }
                }
    _state_upload(schema)
    _state_samples_cap(components, max_samples)
    _state_specialists(components, schema)


def _document_errors(path: str, operation: dict[str, Any]) -> None:
    responses = operation["responses"]
    responses.pop("422", None)
    if not path.startswith("/v1"):
        if path == "/readyz":
            responses["503"] = _error("503")
        return
    statuses = ["401", "503"]
    if operation.get("parameters") or operation.get("requestBody"):
        statuses.append("400")
    if "{" in path or path in STREAMING:
        statuses.append("404")
    if operation.get("requestBody"):
        statuses.append("413")
    for status in statuses:
        responses.setdefault(status, _error(status))


def _error(status: str) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": ERROR_DESCRIPTIONS[status],
        "content": {"application/json": {"schema": ERROR_REF}},
    }
    if status == "503":
        response["headers"] = {
            "Retry-After": {
                "description": "seconds to wait before retrying",
                "schema": {"type": "string", "pattern": "^[0-9]+$"},
            }
        }
    return response


def _state_path_parameters(path: str, operation: dict[str, Any]) -> None:
    for prefix, pattern in ID_PATTERNS.items():
        if path.startswith(prefix):
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path" and f"{{{parameter['name']}}}" in prefix:
                    parameter["schema"]["pattern"] = pattern


def _state_upload(schema: dict[str, Any]) -> None:
    """``POST /v1/files``: one non-blank UTF-8 text file (JSON objects per line when its name ends ``.jsonl``) and
    ``purpose`` ``fine-tune``; the routes check both (routes/files.py)."""
    body = schema["paths"]["/v1/files"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    form = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[-1]]
    form["properties"]["purpose"] = {"type": "string", "enum": [p.value for p in FilePurpose], "title": "Purpose"}
    form["properties"]["file"] = {
        "type": "string",
        "contentMediaType": "application/octet-stream",
        "pattern": r"\S",
        "title": "File",
        "description": "UTF-8 text, not blank; a name ending .jsonl holds one JSON object per line with "
        "source_code/target_code, prompt/completion or text (strings)",
    }


def _state_samples_cap(components: dict[str, Any], max_samples: int) -> None:
    """Prompts x n is capped per request (a gateway setting): no prompt list or n may exceed it alone."""
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        properties = components[name]["properties"]
        properties["n"]["maximum"] = min(MAX_N, max_samples)
        properties["n"]["description"] = f"samples per prompt; prompts x n is at most {max_samples}"
    for variant in components["CompletionRequest"]["properties"]["prompt"]["anyOf"]:
        if variant.get("type") == "array":
            variant["minItems"] = 1  # CompletionRequest._non_empty
            if variant["items"].get("type") != "integer":
                variant["maxItems"] = max_samples


def _state_specialists(components: dict[str, Any], schema: dict[str, Any]) -> None:
    from axl_model.specialists import SPECIALISTS

    names = list(SPECIALISTS)
    specialist = components["Hyperparameters"]["properties"]["specialist"]
    specialist.pop("anyOf", None)
    specialist.update({"anyOf": [{"type": "string", "enum": names}, {"type": "null"}]})
    for parameter in schema["paths"]["/v1/specialists/{name}"]["get"]["parameters"]:
        if parameter["name"] == "name":
            parameter["schema"]["enum"] = names
