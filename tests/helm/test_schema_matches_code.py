"""values.schema.json and the code agree on the keys: every key of the CA's config is either
set by the chart or passed through `ca.config`; the agent's listener and renewal keys are
exactly the sidecar's. A key added to the code without the chart fails here."""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

from ca_server import config as ca_config
from sidecar.config import RenewalConfig
from sidecar.proxy.config import INBOUND_KEYS, OUTBOUND_KEYS
from tests.helm.chart import CHART, config_file, render, user_values

# CA config keys the chart sets itself (templates/ca-configmap.yaml, the Deployment's env).
MANAGED = {
    "trust_domain",
    "data_dir",
    "listen",
    "enroll_listen",
    "http_listen",
    "health_listen",
    "allow_public_listen",
    "server_dns_names",
    "admin_spiffe_ids",
    "database_url",  # MESHTLS_CA_DATABASE_URL from ca.database.existingSecret
    "kek_file",  # the KEK comes as MESHTLS_CA_KEK from a Secret
    "dev",
    "admin_socket",  # stays in the data dir, where `kubectl exec ... meshtls-ca` finds it
    "upstream",
    "kubernetes",
}


def _schema() -> dict[str, Any]:
    data = json.loads((CHART / "values.schema.json").read_text())
    assert isinstance(data, dict)
    return data


def test_every_ca_config_key_is_set_by_the_chart_or_passed_through() -> None:
    passthrough = set(_schema()["properties"]["ca"]["properties"]["config"]["properties"])
    assert not passthrough & MANAGED
    assert passthrough | MANAGED == set(ca_config.KNOWN_KEYS)


def test_listener_and_renewal_keys_are_the_sidecars() -> None:
    agent = _schema()["properties"]["agent"]["properties"]
    assert set(agent["inbound"]["items"]["properties"]) == INBOUND_KEYS
    assert set(agent["outbound"]["items"]["properties"]) == OUTBOUND_KEYS
    assert set(agent["renewal"]["properties"]) == {f.name for f in fields(RenewalConfig)}


def test_passed_through_ca_keys_reach_the_config_file_and_the_ca_accepts_them() -> None:
    extra = {"node_ttl": "12h", "max_leaf_ttl": "12h", "signing_rate_limit": 250}
    docs = render(user_values({"ca": {"config": extra}}))
    rendered = config_file(docs, "meshtls-ca", "config.yaml")
    assert {k: rendered[k] for k in extra} == extra
    # What the kubelet puts into every pod's environment.
    environ = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    parsed = ca_config.load(file=None, environ=environ, overrides=rendered)
    assert parsed.node_ttl == 12 * 3600
    assert parsed.signing_rate_limit == 250
    assert parsed.kubernetes is not None
    assert parsed.kubernetes.api_server == "https://10.96.0.1:443"
    assert parsed.kubernetes.allowed_service_accounts == ("meshtls/meshtls-agent",)
