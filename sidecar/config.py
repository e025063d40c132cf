"""The sidecar's configuration: a YAML file validated at startup into frozen dataclasses.

Every problem names the key and what is wrong with it; all problems are reported at once
in one `ConfigError`. Unknown keys are rejected so that a typo never silently falls back
to a default. Relative paths are resolved against the directory of the config file.

`ca.enroll_address` defaults to the host of `ca.address` with its port plus one (the CA's
default agent port is 8443 and its enrollment port 8444).

On Kubernetes the sidecar enrolls with its pod's projected service-account token
(`ca.kubernetes_token_file`, instead of a join token); `node` may then be left out and
comes from MESHTLS_NODE_NAME (a fieldRef to the pod's spec.nodeName).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509

from meshtls.identity.ids import (
    InvalidSpiffeId,
    SpiffeId,
    validate_node_name,
    validate_trust_domain,
)
from meshtls.identity.pem import certs_from_pem
from sidecar.errors import ConfigError
from sidecar.fields import (
    Address,
    Problems,
    address_field,
    is_loopback,
    number_field,
    path_field,
    reject_unknown,
)
from sidecar.proxy.config import InboundConfig, OutboundConfig, parse_proxy
from sidecar.workload_api.settings import SocketApiConfig, check_distinct, parse_socket_api

TOKEN_ENV = "MESHTLS_JOIN_TOKEN"  # noqa: S105 - a variable name, not a secret
NODE_ENV = "MESHTLS_NODE_NAME"
_FINGERPRINT_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class CAConfig:
    address: Address  # agent listener (mutual TLS)
    enroll_address: Address  # enrollment listener (server-authenticated TLS)
    trust_bundle: Path | None
    # The roots read from `trust_bundle` at startup; empty when a fingerprint is pinned.
    bootstrap_roots: tuple[x509.Certificate, ...]
    root_fingerprint: str | None  # lower-case SHA-256 hex of a root's DER
    join_token_file: Path | None
    # MESHTLS_JOIN_TOKEN as read at startup; never printed.
    join_token_env: str | None = field(repr=False)
    server_name: str | None
    timeout_seconds: float
    # The pod's projected service-account token (Kubernetes); re-read at every enrollment.
    kubernetes_token_file: Path | None = None

    def token_hint(self) -> str:
        """Where an operator puts a join token, for messages."""
        if self.kubernetes_token_file is not None:
            return f"{self.kubernetes_token_file} (the pod's projected service-account token)"
        if self.join_token_file is not None:
            return str(self.join_token_file)
        return f"the {TOKEN_ENV} environment variable (then restart the sidecar)"

    def enroll_action(self, *, new: bool = False) -> str:
        """What an operator does so that this node can enroll, for messages."""
        if self.kubernetes_token_file is not None:
            return (
                f"the sidecar retries with the pod's service-account token in "
                f"{self.kubernetes_token_file}; check the CA's `kubernetes` settings and that "
                "this pod's service account is allowed"
            )
        return f"provide a {'new ' if new else ''}join token in {self.token_hint()}"


@dataclass(frozen=True)
class FileSink:
    """Write one identity to a directory as svid.pem, svid_key.pem and bundle.pem."""

    spiffe_id: SpiffeId
    dir: Path
    reload_command: tuple[str, ...]
    reload_timeout_seconds: float


@dataclass(frozen=True)
class StatusConfig:
    listen: Address
    unsafe_listen: bool


@dataclass(frozen=True)
class RenewalConfig:
    fraction: float = 0.5
    jitter: float = 0.1
    retry_initial_seconds: float = 1.0
    retry_max_seconds: float = 300.0
    # How often registration entries and the trust bundle are re-read from the CA.
    refresh_seconds: float = 300.0
    # While the Watch stream is down, how often the bundle and the revocation list are
    # polled instead (GetTrustBundle + GetCrl).
    trust_poll_seconds: float = 5.0


@dataclass(frozen=True)
class SidecarConfig:
    trust_domain: str
    node: str
    state_dir: Path
    ca: CAConfig
    files: tuple[FileSink, ...]
    status: StatusConfig
    renewal: RenewalConfig
    source: Path | None = None
    workload_api: SocketApiConfig | None = None  # SPIFFE Workload API socket
    sds: SocketApiConfig | None = None  # Envoy SDS socket
    inbound: tuple[InboundConfig, ...] = ()  # mTLS proxy listeners (sidecar/proxy/)
    outbound: tuple[OutboundConfig, ...] = ()

    @property
    def node_id(self) -> SpiffeId:
        return SpiffeId.for_node(self.trust_domain, self.node)


def load_config(path: Path, env: Mapping[str, str] | None = None) -> SidecarConfig:
    """Read and validate the YAML file at `path`; ConfigError with every problem found."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    config = parse_config(
        data, base_dir=path.resolve().parent, env=os.environ if env is None else env
    )
    return replace(config, source=path)


def parse_config(data: object, *, base_dir: Path, env: Mapping[str, str]) -> SidecarConfig:
    """Validate an already-parsed YAML document."""
    p = Problems()
    if not isinstance(data, dict):
        raise ConfigError("the config must be a YAML mapping with trust_domain, node, ca, ...")
    known = {"trust_domain", "node", "state_dir", "ca", "files", "status", "renewal"}
    known |= {"inbound", "outbound"}
    reject_unknown(p, "", data, known | {"workload_api", "sds"})
    trust_domain = _trust_domain(p, data)
    node = _node(p, data, env)
    state_dir = path_field(p, "state_dir", data.get("state_dir"), base_dir, required=True)
    ca = _ca(p, data.get("ca"), base_dir, env)
    files = _files(p, data.get("files", []), base_dir, trust_domain)
    status = _status(p, data.get("status", {}))
    renewal = _renewal(p, data.get("renewal", {}))
    workload_api = parse_socket_api(p, "workload_api", data.get("workload_api"), base_dir)
    sds = parse_socket_api(p, "sds", data.get("sds"), base_dir)
    check_distinct(p, {"workload_api": workload_api, "sds": sds})
    proxy = parse_proxy(p, data, base_dir=base_dir, trust_domain=trust_domain)
    if p.items or ca is None or status is None or renewal is None or state_dir is None:
        raise ConfigError("invalid configuration: " + "; ".join(p.items))
    return SidecarConfig(
        trust_domain=trust_domain,
        node=node,
        state_dir=state_dir,
        ca=ca,
        files=files,
        status=status,
        renewal=renewal,
        workload_api=workload_api,
        sds=sds,
        inbound=proxy.inbound,
        outbound=proxy.outbound,
    )


def _trust_domain(p: Problems, data: dict[Any, Any]) -> str:
    value = data.get("trust_domain")
    if not isinstance(value, str):
        p.add("trust_domain", "required, a trust domain name such as example.org")
        return ""
    try:
        return validate_trust_domain(value)
    except InvalidSpiffeId as exc:
        p.add("trust_domain", str(exc))
        return ""


def _node(p: Problems, data: dict[Any, Any], env: Mapping[str, str]) -> str:
    value = data.get("node")
    ca = data.get("ca")
    kubernetes = isinstance(ca, dict) and ca.get("kubernetes_token_file") is not None
    from_env = env.get(NODE_ENV, "").strip() if kubernetes else ""
    key = "node"
    if value is None and from_env:
        key, value = NODE_ENV, from_env
    if not isinstance(value, str):
        if kubernetes:
            p.add("node", f"required: set {NODE_ENV} (from the pod's spec.nodeName) or node")
        else:
            p.add("node", "required, the node name the join token was issued for")
        return ""
    if from_env and value != from_env:
        p.add("node", f"is {value!r} but {NODE_ENV} says {from_env!r}; set only one of them")
    try:
        return validate_node_name(value)
    except InvalidSpiffeId as exc:
        p.add(key, str(exc))
        return ""


def _ca(p: Problems, data: object, base_dir: Path, env: Mapping[str, str]) -> CAConfig | None:
    if not isinstance(data, dict):
        p.add("ca", "required, a mapping with address and trust_bundle or root_fingerprint")
        return None
    known = {
        "address",
        "enroll_address",
        "trust_bundle",
        "root_fingerprint",
        "join_token_file",
        "kubernetes_token_file",
        "server_name",
        "timeout_seconds",
    }
    reject_unknown(p, "ca.", data, known)
    address = address_field(p, "ca.address", data.get("address"), allow_zero=False)
    if "enroll_address" in data:
        enroll = address_field(p, "ca.enroll_address", data["enroll_address"], allow_zero=False)
    elif address is not None:
        if address.port >= 65535:
            p.add("ca.enroll_address", "cannot default to the port of ca.address + 1; set it")
            enroll = None
        else:
            enroll = Address(address.host, address.port + 1)
    else:
        enroll = None
    bundle_path = path_field(
        p, "ca.trust_bundle", data.get("trust_bundle"), base_dir, required=False
    )
    fingerprint = _fingerprint(p, data.get("root_fingerprint"))
    roots: tuple[x509.Certificate, ...] = ()
    if bundle_path is not None and "root_fingerprint" in data:
        p.add("ca", "set either trust_bundle or root_fingerprint, not both")
    elif bundle_path is None and "root_fingerprint" not in data:
        p.add(
            "ca",
            "set trust_bundle (a PEM file of CA roots) or root_fingerprint (SHA-256 hex of a "
            "root certificate); meshtls never trusts a CA on first use",
        )
    elif bundle_path is not None:
        roots = _read_roots(p, bundle_path)
    token_file = path_field(
        p, "ca.join_token_file", data.get("join_token_file"), base_dir, required=False
    )
    server_name = data.get("server_name")
    if server_name is not None and (not isinstance(server_name, str) or not server_name):
        p.add("ca.server_name", f"expected a host name, got {server_name!r}")
        server_name = None
    timeout = number_field(p, "ca.timeout_seconds", data.get("timeout_seconds", 10.0), low=0.1)
    env_token = env.get(TOKEN_ENV, "").strip() or None
    k8s_token_file = path_field(
        p, "ca.kubernetes_token_file", data.get("kubernetes_token_file"), base_dir, required=False
    )
    if k8s_token_file is not None and (token_file is not None or env_token is not None):
        p.add(
            "ca.kubernetes_token_file",
            f"enrolls instead of a join token: set it or ca.join_token_file / {TOKEN_ENV}, "
            "not both",
        )
    if address is None or enroll is None:
        return None
    return CAConfig(
        address=address,
        enroll_address=enroll,
        trust_bundle=bundle_path,
        bootstrap_roots=roots,
        root_fingerprint=fingerprint,
        join_token_file=token_file,
        join_token_env=env_token,
        server_name=server_name,
        timeout_seconds=timeout,
        kubernetes_token_file=k8s_token_file,
    )


def _fingerprint(p: Problems, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        p.add("ca.root_fingerprint", "expected 64 hexadecimal characters (SHA-256)")
        return None
    cleaned = value.strip().lower().replace(":", "").removeprefix("sha256:")
    if not _FINGERPRINT_RE.match(cleaned):
        p.add(
            "ca.root_fingerprint",
            f"expected the SHA-256 of a root certificate's DER as 64 hex characters, got {value!r}",
        )
        return None
    return cleaned


def _read_roots(p: Problems, path: Path) -> tuple[x509.Certificate, ...]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        p.add("ca.trust_bundle", f"cannot read {path}: {exc.strerror or exc}")
        return ()
    try:
        return tuple(certs_from_pem(data))
    except ValueError as exc:
        p.add("ca.trust_bundle", f"{path} holds no valid PEM certificate: {exc}")
        return ()


def _files(p: Problems, data: object, base_dir: Path, trust_domain: str) -> tuple[FileSink, ...]:
    if data is None:
        return ()
    if not isinstance(data, list):
        p.add("files", "expected a list of {spiffe_id, dir, reload_command}")
        return ()
    sinks: list[FileSink] = []
    seen_dirs: set[Path] = set()
    for i, item in enumerate(data):
        key = f"files[{i}]"
        if not isinstance(item, dict):
            p.add(key, "expected a mapping with spiffe_id and dir")
            continue
        reject_unknown(
            p, f"{key}.", item, {"spiffe_id", "dir", "reload_command", "reload_timeout_seconds"}
        )
        spiffe_id = _spiffe_id(p, f"{key}.spiffe_id", item.get("spiffe_id"), trust_domain)
        directory = path_field(p, f"{key}.dir", item.get("dir"), base_dir, required=True)
        if directory is not None:
            if directory in seen_dirs:
                p.add(f"{key}.dir", f"{directory} is used by another files entry")
            seen_dirs.add(directory)
        command = _command(p, f"{key}.reload_command", item.get("reload_command"))
        timeout = number_field(
            p, f"{key}.reload_timeout_seconds", item.get("reload_timeout_seconds", 30), low=0.1
        )
        if spiffe_id is not None and directory is not None:
            sinks.append(FileSink(spiffe_id, directory, command, timeout))
    return tuple(sinks)


def _spiffe_id(p: Problems, key: str, value: object, trust_domain: str) -> SpiffeId | None:
    if not isinstance(value, str):
        p.add(key, f"required, a SPIFFE ID such as spiffe://{trust_domain or 'td'}/svc/web")
        return None
    try:
        sid = SpiffeId.parse(value)
    except InvalidSpiffeId as exc:
        p.add(key, str(exc))
        return None
    if trust_domain and not sid.member_of(trust_domain):
        p.add(key, f"{value} is not in the trust domain {trust_domain!r}")
        return None
    return sid


def _command(p: Problems, key: str, value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        p.add(
            key,
            'expected a non-empty list of strings such as ["systemctl", "reload", "web"] '
            "(it runs without a shell)",
        )
        return ()
    return tuple(value)


def _status(p: Problems, data: object) -> StatusConfig | None:
    if not isinstance(data, dict):
        p.add("status", "expected a mapping with listen")
        return None
    reject_unknown(p, "status.", data, {"listen", "unsafe_listen"})
    unsafe = data.get("unsafe_listen", False)
    if not isinstance(unsafe, bool):
        p.add("status.unsafe_listen", f"expected true or false, got {unsafe!r}")
        unsafe = False
    listen = address_field(
        p, "status.listen", data.get("listen", "127.0.0.1:15000"), allow_zero=True
    )
    if listen is not None and not unsafe and not is_loopback(listen.host):
        p.add(
            "status.listen",
            f"{listen.host} is not a loopback address; the status server exposes "
            "identity details, so bind it to 127.0.0.1/::1/localhost or set "
            "status.unsafe_listen: true",
        )
    return StatusConfig(listen, unsafe) if listen is not None else None


def _renewal(p: Problems, data: object) -> RenewalConfig | None:
    if not isinstance(data, dict):
        p.add("renewal", "expected a mapping")
        return None
    defaults = RenewalConfig()
    reject_unknown(
        p,
        "renewal.",
        data,
        {
            "fraction",
            "jitter",
            "retry_initial_seconds",
            "retry_max_seconds",
            "refresh_seconds",
            "trust_poll_seconds",
        },
    )
    fraction = number_field(
        p, "renewal.fraction", data.get("fraction", defaults.fraction), low=0.05, high=0.95
    )
    jitter = number_field(
        p, "renewal.jitter", data.get("jitter", defaults.jitter), low=0.0, high=0.5
    )
    if jitter >= min(fraction, 1 - fraction):
        p.add(
            "renewal.jitter",
            f"must be below both fraction and 1 - fraction ({min(fraction, 1 - fraction):g}) "
            "so that renewal always falls inside the certificate's lifetime",
        )
    initial = number_field(
        p,
        "renewal.retry_initial_seconds",
        data.get("retry_initial_seconds", defaults.retry_initial_seconds),
        low=0.01,
    )
    maximum = number_field(
        p,
        "renewal.retry_max_seconds",
        data.get("retry_max_seconds", defaults.retry_max_seconds),
        low=0.01,
    )
    if maximum < initial:
        p.add("renewal.retry_max_seconds", "must not be below renewal.retry_initial_seconds")
    refresh = number_field(
        p, "renewal.refresh_seconds", data.get("refresh_seconds", defaults.refresh_seconds), low=1
    )
    trust_poll = number_field(
        p,
        "renewal.trust_poll_seconds",
        data.get("trust_poll_seconds", defaults.trust_poll_seconds),
        low=0.1,
    )
    return RenewalConfig(fraction, jitter, initial, maximum, refresh, trust_poll)
