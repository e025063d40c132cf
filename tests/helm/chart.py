"""Rendering the chart helm/meshtls with the real Helm engine (PyPI helm-python-sdk: Helm's
Go SDK behind a C ABI, no cluster and no network needed) and picking objects out of the
result, for the tests of tests/helm/."""

from __future__ import annotations

import base64
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python
import yaml

CHART = Path(__file__).resolve().parents[2] / "helm" / "meshtls"
RELEASE = "meshtls"
NAMESPACE = "meshtls"
# The Kubernetes version the manifests are validated against: the newest that
# kubernetes-validate ships schemas for.
KUBE_VERSION = "1.37"

Manifest = dict[str, Any]


def values_file(name: str) -> dict[str, Any]:
    data = yaml.safe_load((CHART / name).read_text()) or {}
    assert isinstance(data, dict)
    return data


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's coalescing of `-f` files and `--set`: maps merge key by key, the rest replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def user_values(*layers: dict[str, Any] | str) -> dict[str, Any]:
    """Layers in `helm install -f A -f B --set ...` order; a str names a file of the chart."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = merge(merged, values_file(layer) if isinstance(layer, str) else layer)
    return merged


def render_files(values: dict[str, Any] | None = None) -> dict[str, str]:
    """Template path -> rendered text (HelmValuesError / HelmRenderError on bad values)."""
    with helm_python.Chart.load(CHART) as chart:
        return chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def render(values: dict[str, Any] | None = None) -> list[Manifest]:
    """Every object the chart renders, in template order."""
    docs: list[Manifest] = []
    for path, text in sorted(render_files(values).items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append(doc)
    return docs


def notes(values: dict[str, Any] | None = None) -> str:
    return next(t for p, t in render_files(values).items() if p.endswith("NOTES.txt"))


def find(docs: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def kinds(docs: list[Manifest]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def pod_specs(docs: list[Manifest]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] in {"Deployment", "DaemonSet", "StatefulSet", "Job"}:
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def config_file(docs: list[Manifest], configmap: str, key: str) -> dict[str, Any]:
    data = yaml.safe_load(find(docs, "ConfigMap", configmap)["data"][key])
    assert isinstance(data, dict)
    return data


def secret_value(docs: list[Manifest], name: str, key: str) -> str:
    return base64.b64decode(find(docs, "Secret", name)["data"][key]).decode()
