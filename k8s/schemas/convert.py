"""Turn CustomResourceDefinition YAML into the strict JSON Schemas vendored beside this file.

Usage: python k8s/schemas/convert.py CRD.yaml... (writes <kind>-<group prefix>-<version>.json here)

The test suite (tests/test_k8s.py) validates every custom resource the overlays render against these files,
offline. Where each CRD came from is in SOURCES.md. The conversion, like kubeconform's openapi2jsonschema:
- `additionalProperties: false` wherever an object lists its properties and neither allows more
  (`additionalProperties`) nor keeps unknown fields (`x-kubernetes-preserve-unknown-fields`): a misspelt
  field is an error, as the API server's strict field validation makes it;
- `x-kubernetes-int-or-string` becomes "an integer or a string", `nullable` adds null;
- descriptions and CEL rules (`x-kubernetes-validations`, which only the API server can evaluate) are dropped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
_DROP = {"description", "x-kubernetes-validations", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
         "x-kubernetes-map-type", "x-kubernetes-embedded-resource", "example", "externalDocs"}


def strict(node: Any) -> Any:
    if isinstance(node, list):
        return [strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {name: strict(sub) for name, sub in value.items()}
        elif key in ("default", "enum", "required", "format", "type", "pattern"):
            out[key] = value
        else:
            out[key] = strict(value)
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    preserve = out.pop("x-kubernetes-preserve-unknown-fields", False)
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


def convert(crd: dict[str, Any]) -> dict[str, dict[str, Any]]:
    group = crd["spec"]["group"]
    kind = crd["spec"]["names"]["kind"]
    schemas = {}
    for version in crd["spec"]["versions"]:
        if not version.get("served", True):
            continue
        schema = strict(version["schema"]["openAPIV3Schema"])
        schema["properties"]["apiVersion"] = {"enum": [f"{group}/{version['name']}"]}
        schema["properties"]["kind"] = {"enum": [kind]}
        schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        name = f"{kind.lower()}-{group.split('.')[0]}-{version['name']}.json"
        schemas[name] = schema
    return schemas


def main(paths: list[str]) -> None:
    for path in paths:
        for doc in yaml.safe_load_all(Path(path).read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            for name, schema in convert(doc).items():
                (HERE / name).write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
                print(f"wrote {name}")


if __name__ == "__main__":
    main(sys.argv[1:])
