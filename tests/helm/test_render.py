"""The chart renders with the real Helm engine for the default values, values-ha.yaml, an
upstream-CA values set and a values set with every option on; `helm lint` finds no error;
every object validates against the Kubernetes schemas (kubernetes-validate, strict: unknown
fields are errors); and the security properties the chart promises hold in what it renders."""

from __future__ import annotations

from typing import Any

import helm_python
import kubernetes_validate  # type: ignore[import-untyped]
import pytest

from tests.helm.chart import (
    CHART,
    KUBE_VERSION,
    NAMESPACE,
    Manifest,
    config_file,
    containers,
    find,
    kinds,
    pod_specs,
    render,
    secret_value,
    user_values,
)
from tests.support.pki import ThrowawayCA

ROOT_PEM = ThrowawayCA.root(common_name="meshtls test root").cert_pem.decode()

# The agent needs a trust anchor to be deployed; everything optional switched on.
EVERYTHING: dict[str, Any] = {
    "agent": {
        "trustBundle": {"pem": ROOT_PEM},
        "hostNetwork": True,
        "inbound": [
            {
                "name": "web",
                "listen": "0.0.0.0:15443",
                "forward": "unix:/run/meshtls/apps/web.sock",
                "identity": "spiffe://example.org/svc/web",
                "allow": ["spiffe://example.org/svc/api"],
            }
        ],
        "outbound": [
            {
                "name": "db",
                "listen": "127.0.0.1:15001",
                "connect": "db.example.internal:15443",
                "identity": "spiffe://example.org/svc/web",
                "expect": "spiffe://example.org/svc/db",
            }
        ],
        "renewal": {"fraction": 0.5, "refresh_seconds": 120},
        "networkPolicy": {"enabled": True},
    },
    "ca": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "networkPolicy": {
            "enabled": True,
            "metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
            "egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}],
        },
        "podDisruptionBudget": {"enabled": True},
        "config": {"node_ttl": "12h", "signing_rate_limit": 500},
        "workers": 2,
    },
}
UPSTREAM: dict[str, Any] = {"ca": {"upstream": {"existingSecret": "meshtls-upstream"}}}

VALUE_SETS = {
    "default": lambda: user_values(),
    "ha": lambda: user_values("values-ha.yaml"),
    "upstream": lambda: user_values(UPSTREAM),
    "everything": lambda: user_values(EVERYTHING),
    "ha-everything": lambda: user_values("values-ha.yaml", EVERYTHING, UPSTREAM),
}
CRDS = {"ServiceMonitor"}  # not Kubernetes' own: checked by test_service_monitor


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_lint_reports_no_errors(name: str) -> None:
    report = helm_python.lint(CHART, VALUE_SETS[name](), namespace=NAMESPACE, strict=False)
    errors = [m for m in report["messages"] if m["severity"] >= 3]
    assert report["errors"] == [], report
    assert errors == [], report


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_object_validates_against_the_kubernetes_schema(name: str) -> None:
    docs = render(VALUE_SETS[name]())
    assert docs
    for doc in docs:
        if doc["kind"] in CRDS:
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {exc.path}")


def test_default_install_is_the_ca_on_sqlite_and_waits_for_a_trust_anchor() -> None:
    docs = render()
    assert kinds(docs) == sorted(
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "Deployment",
            "PersistentVolumeClaim",
            "Role",
            "RoleBinding",
            "Secret",
            "Service",
            "ServiceAccount",
            "ServiceAccount",
        ]
    )
    deployment = find(docs, "Deployment", "meshtls-ca")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "meshtls-ca-data"
    pvc = find(docs, "PersistentVolumeClaim", "meshtls-ca-data")
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    config = config_file(docs, "meshtls-ca", "config.yaml")
    assert config["trust_domain"] == "example.org"
    assert "database_url" not in config  # SQLite in the data dir
    assert config["kubernetes"] == {
        "audience": "meshtls-ca",
        "allowed_service_accounts": ["meshtls/meshtls-agent"],
    }
    assert "meshtls-ca.meshtls.svc" in config["server_dns_names"]
    service = find(docs, "Service", "meshtls-ca")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
        "grpc-agent": 8443,
        "grpc-enroll": 8444,
        "http-metrics": 8480,
    }


def test_generated_kek_is_32_random_bytes_kept_on_uninstall_and_immutable() -> None:
    import base64

    first, second = render(), render()
    secret = find(first, "Secret", "meshtls-ca-kek")
    assert secret["immutable"] is True
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    kek = secret_value(first, "meshtls-ca-kek", "kek")
    assert len(base64.b64decode(kek, validate=True)) == 32
    # Nothing to look up offline: each fresh install draws a new one.
    assert kek != secret_value(second, "meshtls-ca-kek", "kek")
    env = _env(first, "meshtls-ca", "ca")
    assert env["MESHTLS_CA_KEK"]["valueFrom"]["secretKeyRef"] == {
        "name": "meshtls-ca-kek",
        "key": "kek",
    }


def test_an_existing_kek_secret_is_used_and_none_is_generated() -> None:
    docs = render(user_values({"ca": {"kek": {"existingSecret": "my-kek", "key": "value"}}}))
    assert not [d for d in docs if d["kind"] == "Secret"]
    ref = _env(docs, "meshtls-ca", "ca")["MESHTLS_CA_KEK"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "my-kek", "key": "value"}


def test_ha_overlay() -> None:
    docs = render(user_values("values-ha.yaml"))
    deployment = find(docs, "Deployment", "meshtls-ca")
    spec = deployment["spec"]
    assert spec["replicas"] == 3
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    pod = spec["template"]["spec"]
    anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["topologyKey"] == "kubernetes.io/hostname"
    assert anti[0]["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
    pdb = find(docs, "PodDisruptionBudget", "meshtls-ca")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"] == spec["selector"]
    assert "PersistentVolumeClaim" not in kinds(docs)
    env = _env(docs, "meshtls-ca", "ca")
    assert env["MESHTLS_CA_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "meshtls-db",
        "key": "url",
    }
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes["data"]


def test_upstream_mode_mounts_the_secret_and_names_its_files_in_the_config() -> None:
    docs = render(user_values(UPSTREAM))
    config = config_file(docs, "meshtls-ca", "config.yaml")
    assert config["upstream"] == {
        "cert_file": "/etc/meshtls-ca/upstream/tls.crt",
        "key_file": "/etc/meshtls-ca/upstream/tls.key",
        "chain_file": "/etc/meshtls-ca/upstream/ca.crt",
    }
    pod = find(docs, "Deployment", "meshtls-ca")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "upstream")
    assert volume["secret"]["secretName"] == "meshtls-upstream"
    assert {i["path"] for i in volume["secret"]["items"]} == {"tls.crt", "tls.key", "ca.crt"}
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "upstream")
    assert mount == {"name": "upstream", "mountPath": "/etc/meshtls-ca/upstream", "readOnly": True}


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_container_is_hardened(name: str) -> None:
    docs = render(VALUE_SETS[name]())
    for workload, spec in pod_specs(docs):
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, workload
        assert pod["runAsUser"] != 0, workload
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, workload
        for container in containers(spec):
            sc = container["securityContext"]
            where = f"{workload}/{container['name']}"
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert "privileged" not in sc, where
            assert container["resources"]["requests"], where
            if container["name"] == "host-dirs":
                # The one exception: root with CAP_CHOWN only, to hand the hostPath
                # directories to the agent's user before it starts.
                assert sc["runAsUser"] == 0
                assert sc["capabilities"]["add"] == ["CHOWN"]
                assert container["command"][0] == "chown"
            else:
                assert "add" not in sc["capabilities"], where
                assert sc.get("runAsUser", pod["runAsUser"]) != 0, where


def test_rbac_is_tokenreview_create_and_pod_get_for_the_ca_and_nothing_for_the_agent() -> None:
    docs = render(user_values(EVERYTHING))
    rules: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for doc in docs:
        if doc["kind"] in {"ClusterRole", "Role"}:
            scope = doc["metadata"].get("namespace", "<cluster>")
            rules[(doc["kind"], scope)] = doc["rules"]
    assert rules == {
        ("ClusterRole", "<cluster>"): [
            {
                "apiGroups": ["authentication.k8s.io"],
                "resources": ["tokenreviews"],
                "verbs": ["create"],
            }
        ],
        ("Role", NAMESPACE): [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}],
    }
    subjects = [
        s for d in docs if d["kind"] in {"ClusterRoleBinding", "RoleBinding"} for s in d["subjects"]
    ]
    assert {s["name"] for s in subjects} == {"meshtls-ca"}
    agent_sa = find(docs, "ServiceAccount", "meshtls-agent")
    assert agent_sa["automountServiceAccountToken"] is False
    agent = find(docs, "DaemonSet", "meshtls-agent")["spec"]["template"]["spec"]
    assert agent["automountServiceAccountToken"] is False
    token = next(v for v in agent["volumes"] if v["name"] == "token")
    assert token["projected"]["sources"] == [
        {
            "serviceAccountToken": {
                "path": "meshtls-ca",
                "audience": "meshtls-ca",
                "expirationSeconds": 3600,
            }
        }
    ]


def test_pods_of_allowed_service_accounts_elsewhere_get_a_role_in_their_namespace() -> None:
    accounts = ["meshtls/meshtls-agent", "edge/edge-agent", "edge/other"]
    docs = render(user_values({"ca": {"kubernetes": {"allowedServiceAccounts": accounts}}}))
    assert sorted(d["metadata"]["namespace"] for d in docs if d["kind"] == "Role") == [
        "edge",
        "meshtls",
    ]
    config = config_file(docs, "meshtls-ca", "config.yaml")
    assert config["kubernetes"]["allowed_service_accounts"] == accounts


def test_agent_with_listeners_runs_on_the_host_network() -> None:
    docs = render(user_values(EVERYTHING))
    spec = find(docs, "DaemonSet", "meshtls-agent")["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    agent = spec["containers"][0]
    env = {e["name"]: e for e in agent["env"]}
    assert env["MESHTLS_NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    # The status server stays on the node's loopback; the kubelet probes it there.
    assert agent["readinessProbe"]["httpGet"]["host"] == "127.0.0.1"
    config = config_file(docs, "meshtls-agent", "agent.yaml")
    assert config["status"] == {"listen": "127.0.0.1:15000"}
    assert config["inbound"] == EVERYTHING["agent"]["inbound"]
    assert config["outbound"] == EVERYTHING["agent"]["outbound"]
    assert config["ca"]["address"] == "meshtls-ca.meshtls.svc.cluster.local:8443"
    assert config["ca"]["kubernetes_token_file"] == "/var/run/secrets/tokens/meshtls-ca"
    assert "node" not in config  # from MESHTLS_NODE_NAME
    bundle = find(docs, "ConfigMap", "meshtls-agent-bundle")
    assert bundle["data"]["bundle.pem"].strip() == ROOT_PEM.strip()
    hostpaths = {v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert hostpaths == {"/run/meshtls", "/var/lib/meshtls"}


def test_agent_without_host_network_exposes_status_in_its_pod_only() -> None:
    docs = render(user_values({"agent": {"rootFingerprint": "AB" * 32}}))
    spec = find(docs, "DaemonSet", "meshtls-agent")["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is False
    assert "dnsPolicy" not in spec
    assert "host" not in spec["containers"][0]["readinessProbe"]["httpGet"]
    config = config_file(docs, "meshtls-agent", "agent.yaml")
    assert config["status"] == {"listen": "0.0.0.0:15000", "unsafe_listen": True}
    assert config["ca"]["root_fingerprint"] == "ab" * 32
    assert "trust_bundle" not in config["ca"]
    assert not [v for v in spec["volumes"] if v["name"] == "bundle"]


def test_service_monitor_scrapes_the_service_metrics_port() -> None:
    docs = render(user_values(EVERYTHING))
    monitor = find(docs, "ServiceMonitor", "meshtls-ca")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = find(docs, "Service", "meshtls-ca")
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["http-metrics"]
    assert "http-metrics" in port_names
    assert monitor["metadata"]["labels"]["release"] == "prometheus"


def test_network_policies_select_the_pods_they_protect() -> None:
    docs = render(
        user_values(EVERYTHING, {"agent": {"hostNetwork": False, "inbound": [], "outbound": []}})
    )
    for name, workload in (("meshtls-ca", "Deployment"), ("meshtls-agent", "DaemonSet")):
        policy = find(docs, "NetworkPolicy", name)
        selector = find(docs, workload, name)["spec"]["selector"]["matchLabels"]
        assert policy["spec"]["podSelector"]["matchLabels"] == selector
    ca_policy = find(docs, "NetworkPolicy", "meshtls-ca")["spec"]
    assert ca_policy["policyTypes"] == ["Ingress", "Egress"]
    # No NetworkPolicy applies to pods on the host network: none is rendered for them.
    on_host = render(user_values(EVERYTHING))
    assert [d["metadata"]["name"] for d in on_host if d["kind"] == "NetworkPolicy"] == [
        "meshtls-ca"
    ]


def test_config_changes_roll_the_pods() -> None:
    def checksum(docs: list[Manifest], kind: str, name: str) -> str:
        annotations = find(docs, kind, name)["spec"]["template"]["metadata"]["annotations"]
        return str(annotations["checksum/config"])

    base = user_values(EVERYTHING)
    changed = user_values(EVERYTHING, {"ca": {"config": {"node_ttl": "6h"}}})
    changed_agent = user_values(EVERYTHING, {"agent": {"renewal": {"fraction": 0.6}}})
    a, b, c = render(base), render(changed), render(changed_agent)
    assert checksum(a, "Deployment", "meshtls-ca") != checksum(b, "Deployment", "meshtls-ca")
    assert checksum(a, "DaemonSet", "meshtls-agent") == checksum(b, "DaemonSet", "meshtls-agent")
    assert checksum(a, "DaemonSet", "meshtls-agent") != checksum(c, "DaemonSet", "meshtls-agent")


def _env(docs: list[Manifest], deployment: str, container: str) -> dict[str, Any]:
    spec = find(docs, "Deployment", deployment)["spec"]["template"]["spec"]
    found = next(c for c in spec["containers"] if c["name"] == container)
    return {e["name"]: e for e in found["env"]}
