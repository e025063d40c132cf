"""The Kubernetes configuration keys: the CA's `kubernetes` section (YAML and
MESHTLS_CA_KUBERNETES_* variables, in-cluster defaults) and the sidecar's
`ca.kubernetes_token_file` with the node name from MESHTLS_NODE_NAME."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from ca_server.config import KubernetesConfig, load
from ca_server.errors import ConfigError as CAConfigError
from sidecar.config import load_config
from sidecar.errors import ConfigError as SidecarConfigError
from tests.k8s.apiserver import StandInApiServer
from tests.k8s.conftest import kubernetes_config
from tests.sidecar.helpers import sidecar_document, write_config
from tests.support.ca import running_ca

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
IN_CLUSTER = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}


def ca_file(tmp_path: Path, document: dict[str, Any]) -> Path:
    path = tmp_path / "ca.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_ca_section_from_yaml_with_in_cluster_defaults(tmp_path: Path) -> None:
    config = load(
        file=ca_file(tmp_path, {"kubernetes": {"allowed_service_accounts": ["meshtls/agent"]}}),
        environ=IN_CLUSTER,
    )
    assert config.kubernetes == KubernetesConfig(
        api_server="https://10.96.0.1:443",
        ca_file=SA_DIR / "ca.crt",
        token_file=SA_DIR / "token",
        audience="meshtls-ca",
        allowed_service_accounts=("meshtls/agent",),
    )
    assert load(environ={}).kubernetes is None
    assert load(file=ca_file(tmp_path, {"kubernetes": None}), environ={}).kubernetes is None


def test_ca_section_from_the_environment_key_by_key(tmp_path: Path) -> None:
    document = {
        "kubernetes": {
            "api_server": "https://kubernetes.default.svc",
            "audience": "from-the-file",
            "allowed_service_accounts": ["meshtls/meshtls-agent"],
        }
    }
    config = load(
        file=ca_file(tmp_path, document),
        environ={
            "MESHTLS_CA_KUBERNETES_AUDIENCE": "from-env",
            "MESHTLS_CA_KUBERNETES_CA_FILE": "/etc/k8s/ca.crt",
            "MESHTLS_CA_KUBERNETES_TOKEN_FILE": "/etc/k8s/token",
        },
    )
    assert config.kubernetes == KubernetesConfig(
        api_server="https://kubernetes.default.svc",
        ca_file=Path("/etc/k8s/ca.crt"),
        token_file=Path("/etc/k8s/token"),
        audience="from-env",
        allowed_service_accounts=("meshtls/meshtls-agent",),
    )
    only_env = load(
        environ={
            "MESHTLS_CA_KUBERNETES_ALLOWED_SERVICE_ACCOUNTS": "meshtls/meshtls-agent, ops/agent",
            "KUBERNETES_SERVICE_HOST": "fd00::1",
            "KUBERNETES_SERVICE_PORT": "6443",
        }
    )
    assert only_env.kubernetes is not None
    assert only_env.kubernetes.api_server == "https://[fd00::1]:6443"
    assert only_env.kubernetes.allowed_service_accounts == ("meshtls/meshtls-agent", "ops/agent")


@pytest.mark.parametrize(
    ("section", "environ", "expected"),
    [
        ({}, IN_CLUSTER, "kubernetes.allowed_service_accounts: list the service accounts"),
        ({"allowed_service_accounts": ["meshtls"]}, IN_CLUSTER, "'meshtls' is not namespace/name"),
        (
            {"allowed_service_accounts": ["Meshtls/Agent"]},
            IN_CLUSTER,
            "'Meshtls/Agent' is not namespace/name",
        ),
        (
            {"api_server": "http://10.0.0.1", "allowed_service_accounts": ["a/b"]},
            {},
            "kubernetes.api_server: expected https://HOST[:PORT]",
        ),
        (
            {"allowed_service_accounts": ["a/b"]},
            {},
            "KUBERNETES_SERVICE_HOST is not in the environment",
        ),
        ({"allowed_service_accounts": ["a/b"], "audiences": ["x"]}, IN_CLUSTER, "unknown keys"),
    ],
)
def test_ca_section_mistakes_are_named(
    tmp_path: Path, section: dict[str, Any], environ: dict[str, str], expected: str
) -> None:
    with pytest.raises(CAConfigError) as refused:
        load(file=ca_file(tmp_path, {"kubernetes": section}), environ=environ)
    assert expected in str(refused.value)


def test_unknown_kubernetes_variable_is_refused() -> None:
    with pytest.raises(CAConfigError, match="MESHTLS_CA_KUBERNETES_AUDIENCES"):
        load(environ={"MESHTLS_CA_KUBERNETES_AUDIENCES": "x"})


async def test_ca_does_not_start_without_its_kubernetes_files(
    api: StandInApiServer, tmp_path: Path
) -> None:
    missing = kubernetes_config(api, ca_file=tmp_path / "nowhere" / "ca.crt")
    with pytest.raises(CAConfigError, match=r"kubernetes.ca_file: .*nowhere/ca.crt does not exist"):
        async with running_ca(tmp_path, kubernetes=missing):
            pass


# The sidecar -------------------------------------------------------------------------------


def sidecar_file(tmp_path: Path, *, node: str | None = None, **ca: Any) -> Path:
    document = sidecar_document(
        tmp_path,
        agent_address="ca.example:8443",
        enroll_address="ca.example:8444",
        bundle_path=None,
        root_fingerprint="ab" * 32,
        **ca,
    )
    if node is None:
        del document["node"]
    else:
        document["node"] = node
    return write_config(tmp_path / "sidecar.yaml", document)


def test_sidecar_takes_the_node_name_from_the_environment(tmp_path: Path) -> None:
    token = tmp_path / "tokens" / "meshtls-ca"
    config = load_config(
        sidecar_file(tmp_path, kubernetes_token_file=str(token)),
        env={"MESHTLS_NODE_NAME": "ip-10-0-1-7.ec2.internal"},
    )
    assert config.node == "ip-10-0-1-7.ec2.internal"
    assert config.ca.kubernetes_token_file == token
    assert config.ca.join_token_file is None
    assert str(token) in config.ca.token_hint()
    same = load_config(
        sidecar_file(tmp_path, node="web-1", kubernetes_token_file=str(token)),
        env={"MESHTLS_NODE_NAME": "web-1"},
    )
    assert same.node == "web-1"


@pytest.mark.parametrize(
    ("node", "ca", "env", "expected"),
    [
        (None, {"kubernetes_token_file": "t"}, {}, "node: required: set MESHTLS_NODE_NAME"),
        (
            "web-1",
            {"kubernetes_token_file": "t"},
            {"MESHTLS_NODE_NAME": "web-2"},
            "node: is 'web-1' but MESHTLS_NODE_NAME says 'web-2'",
        ),
        (
            None,
            {"kubernetes_token_file": "t"},
            {"MESHTLS_NODE_NAME": "../etc"},
            "MESHTLS_NODE_NAME: node name '../etc'",
        ),
        # Without Kubernetes enrollment the node is named in the file, as before.
        (None, {}, {"MESHTLS_NODE_NAME": "web-1"}, "node: required, the node name the join"),
        (
            None,
            {"kubernetes_token_file": "t", "join_token_file": "j"},
            {"MESHTLS_NODE_NAME": "web-1"},
            "ca.kubernetes_token_file: enrolls instead of a join token",
        ),
        (
            None,
            {"kubernetes_token_file": "t"},
            {"MESHTLS_NODE_NAME": "web-1", "MESHTLS_JOIN_TOKEN": "mjt_x"},
            "set it or ca.join_token_file / MESHTLS_JOIN_TOKEN, not both",
        ),
    ],
)
def test_sidecar_node_and_token_mistakes_are_named(
    tmp_path: Path, node: str | None, ca: dict[str, str], env: dict[str, str], expected: str
) -> None:
    with pytest.raises(SidecarConfigError) as refused:
        load_config(sidecar_file(tmp_path, node=node, **ca), env=env)
    assert expected in str(refused.value)
