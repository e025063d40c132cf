"""Bad values fail at install time, before anything reaches the cluster, with a message that
names the value and says what to do: single values by values.schema.json, rules across
values by the chart's templates (templates/_validate.tpl)."""

from __future__ import annotations

from typing import Any

import helm_python
import pytest

from meshtls.identity.ids import InvalidSpiffeId, validate_trust_domain
from tests.helm.chart import render, user_values

LISTENER = {
    "name": "web",
    "listen": "0.0.0.0:15443",
    "forward": "127.0.0.1:8080",
    "identity": "spiffe://example.org/svc/web",
    "allow": ["spiffe://example.org/svc/api"],
}

CASES: dict[str, tuple[dict[str, Any] | list[Any], type[Exception], list[str]]] = {
    "two replicas on sqlite": (
        {"ca": {"replicaCount": 2}},
        helm_python.HelmRenderError,
        ["ca.replicaCount is 2 but ca.database.type is sqlite", "postgresql", "ca.workers"],
    ),
    "ha without a database secret": (
        ["values-ha.yaml", {"ca": {"database": {"existingSecret": ""}}}],
        helm_python.HelmRenderError,
        ["ca.database.existingSecret is empty", "kubectl create secret generic"],
    ),
    "malformed trust domain": (
        {"global": {"trustDomain": "Example.ORG"}},
        helm_python.HelmValuesError,
        ["/global/trustDomain", "does not match pattern"],
    ),
    "trust domain with a scheme": (
        {"global": {"trustDomain": "spiffe://example.org"}},
        helm_python.HelmValuesError,
        ["/global/trustDomain"],
    ),
    "unknown database type": (
        {"ca": {"database": {"type": "mysql"}}},
        helm_python.HelmValuesError,
        ["/ca/database/type", "sqlite", "postgresql"],
    ),
    "a misspelt value": (
        {"ca": {"replicas": 3}},
        helm_python.HelmValuesError,
        ["/ca", "replicas"],
    ),
    "a ca config key the chart sets itself": (
        {"ca": {"config": {"listen": "0.0.0.0:9443"}}},
        helm_python.HelmValuesError,
        ["/ca/config", "listen"],
    ),
    "listeners without host network": (
        {"agent": {"rootFingerprint": "ab" * 32, "inbound": [LISTENER]}},
        helm_python.HelmRenderError,
        ["need agent.hostNetwork=true"],
    ),
    "a privileged listener port": (
        {
            "agent": {
                "rootFingerprint": "ab" * 32,
                "hostNetwork": True,
                "inbound": [{**LISTENER, "listen": "0.0.0.0:443"}],
            }
        },
        helm_python.HelmRenderError,
        ['listener "web" listens on port 443', ">= 1024"],
    ),
    "a listener without its identity": (
        {
            "agent": {
                "hostNetwork": True,
                "inbound": [{k: v for k, v in LISTENER.items() if k != "identity"}],
            }
        },
        helm_python.HelmValuesError,
        ["/agent/inbound/0", "identity"],
    ),
    "two trust anchors": (
        {"agent": {"rootFingerprint": "ab" * 32, "trustBundle": {"existingConfigMap": "x"}}},
        helm_python.HelmRenderError,
        ["set only one of them"],
    ),
    "a fingerprint that is not sha-256": (
        {"agent": {"rootFingerprint": "abc"}},
        helm_python.HelmValuesError,
        ["/agent/rootFingerprint"],
    ),
    "a bundle that is no pem": (
        {"agent": {"trustBundle": {"pem": "hello"}}},
        helm_python.HelmRenderError,
        ["agent.trustBundle.pem holds no PEM certificate"],
    ),
    "an allowed service account without namespace": (
        {"ca": {"kubernetes": {"allowedServiceAccounts": ["meshtls-agent"]}}},
        helm_python.HelmValuesError,
        ["/ca/kubernetes/allowedServiceAccounts/0"],
    ),
    "a socket path over the kernel's limit": (
        {"agent": {"rootFingerprint": "ab" * 32, "socketDir": "/run/" + "d" * 100}},
        helm_python.HelmRenderError,
        ["a Unix socket path is at most 107 bytes"],
    ),
    "replicas below one": (
        {"ca": {"replicaCount": 0}},
        helm_python.HelmValuesError,
        ["/ca/replicaCount"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_values_fail_with_a_clear_message(case: str) -> None:
    layers, error, fragments = CASES[case]
    values = user_values(*(layers if isinstance(layers, list) else [layers]))
    with pytest.raises(error) as caught:
        render(values)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize(
    "domain",
    [
        "example.org",
        "a",
        "my-org_1.example",
        "Example.org",
        "ex ample",
        "spiffe://x",
        "é.org",
        "x" * 255,
        "x" * 256,
        "",
    ],
)
def test_schema_and_the_code_agree_on_trust_domains(domain: str) -> None:
    try:
        validate_trust_domain(domain)
        valid = True
    except InvalidSpiffeId:
        valid = False
    try:
        render(user_values({"global": {"trustDomain": domain}}))
        accepted = True
    except helm_python.HelmValuesError:
        accepted = False
    assert accepted == valid
