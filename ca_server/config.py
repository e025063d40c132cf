"""CA configuration: one frozen dataclass, read from a YAML file, `MESHTLS_CA_*` environment
variables and command-line flags (flags win over env, env over the file), and validated
before anything listens.

Nested sections take their keys from the environment one by one:
`MESHTLS_CA_UPSTREAM_<KEY>` and `MESHTLS_CA_KUBERNETES_<KEY>` (e.g.
`MESHTLS_CA_KUBERNETES_AUDIENCE`; lists comma-separated)."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from ca_server.errors import ConfigError
from meshtls.durations import parse_duration
from meshtls.identity.ids import InvalidSpiffeId, SpiffeId, validate_trust_domain

ENV_PREFIX = "MESHTLS_CA_"
KEK_ENV = "MESHTLS_CA_KEK"


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, *, what: str) -> HostPort:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise ConfigError(f"{what}: expected HOST:PORT, got {text!r}")
        return cls(host.strip("[]"), int(port_text))

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class UpstreamConfig:
    cert_file: Path
    key_file: Path
    chain_file: Path


# In-cluster defaults of a pod (Kubernetes mounts its service account's files here).
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
DEFAULT_K8S_AUDIENCE = "meshtls-ca"
_K8S_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")


@dataclass(frozen=True)
class KubernetesConfig:
    """Node enrollment with projected service-account tokens (ca_server.attestation.k8s)."""

    api_server: str  # https://host:port of the Kubernetes API
    ca_file: Path  # PEM roots that verify the API server
    token_file: Path  # the CA's own service-account token (re-read on every call)
    audience: str  # the audience the agents' tokens must carry
    allowed_service_accounts: tuple[str, ...]  # "namespace/name"


@dataclass(frozen=True)
class CAConfig:
    trust_domain: str = "example.org"
    data_dir: Path = Path(".meshtls/ca")
    # Agent listener: mutual TLS, every agent call after enrollment (and admin for admin IDs).
    listen: HostPort = HostPort("127.0.0.1", 8443)
    # Enrollment listener: server-authenticated TLS for Enroll and GetTrustBundle.
    enroll_listen: HostPort = HostPort("127.0.0.1", 8444)
    # Plain HTTP on loopback: /healthz, /readyz, /metrics.
    http_listen: HostPort | None = HostPort("127.0.0.1", 8480)
    # Plaintext gRPC health checking only, for probes that cannot speak TLS (the kubelet's
    # grpc probe); off unless set.
    health_listen: HostPort | None = None
    admin_socket: Path | None = None  # default: <data_dir>/admin.sock
    admin_spiffe_ids: tuple[str, ...] = ()
    database_url: str | None = None  # default: SQLite file <data_dir>/ca.db
    migrate_on_start: bool = True
    kek_file: Path | None = None
    dev: bool = False
    # DNS names clients use to reach the CA; its certificate always carries the IPs below.
    server_dns_names: tuple[str, ...] = ()
    server_ip_addresses: tuple[str, ...] = ("127.0.0.1", "::1")
    server_cert_ttl: float = 24 * 3600  # the CA's own TLS certificate, renewed at half-life
    root_ttl: float = 10 * 365 * 86400
    intermediate_ttl: float = 30 * 86400
    node_ttl: float = 24 * 3600
    default_leaf_ttl: float = 3600
    max_leaf_ttl: float = 24 * 3600
    rotation_check_interval: float = 60  # how often the rotation job looks at the journal
    trust_poll_interval: float = 1  # how often to look for other replicas' changes
    # How long a replica's claim on the rotation job lasts; a replica that dies mid-rotation
    # is replaced by another once this runs out (each step it took is already committed).
    rotation_lease: float = 300
    rotation_min_propagation: float = 60  # a requested rotation activates this long after
    certificate_retention: float = 30 * 86400  # expired certificate rows kept this long
    prune_interval: float = 3600
    upstream_warning: float = 30 * 86400  # warn this long before an upstream CA expires
    retired_root_grace: float = 3600  # a retired root stays trusted this long after its last leaf
    join_token_ttl: float = 600
    max_join_token_ttl: float = 7 * 86400
    upstream: UpstreamConfig | None = None
    kubernetes: KubernetesConfig | None = None  # None: Kubernetes enrollment is off
    max_message_bytes: int = 1024 * 1024
    max_csrs_per_batch: int = 256
    rate_limit_per_node: float = 50.0  # sustained requests per second per node
    rate_limit_burst: int = 200
    # Certificates this replica signs per second at most (burst: twice that); beyond it a
    # renewal storm gets RESOURCE_EXHAUSTED with a retry hint instead of timing out.
    signing_rate_limit: float = 1000.0
    allow_public_listen: bool = False

    @property
    def admin_socket_path(self) -> Path:
        return self.admin_socket or self.data_dir / "admin.sock"

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'ca.db').resolve()}"

    @property
    def dev_kek_path(self) -> Path:
        return self.data_dir / "dev-kek"


_DURATIONS = {
    "rotation_lease",
    "upstream_warning",
    "certificate_retention",
    "prune_interval",
    "rotation_min_propagation",
    "rotation_check_interval",
    "trust_poll_interval",
    "retired_root_grace",
    "server_cert_ttl",
    "root_ttl",
    "intermediate_ttl",
    "node_ttl",
    "default_leaf_ttl",
    "max_leaf_ttl",
    "join_token_ttl",
    "max_join_token_ttl",
}
_PATHS = {"data_dir", "admin_socket", "kek_file"}
_BOOLS = {"migrate_on_start", "dev", "allow_public_listen"}
_LISTS = {"admin_spiffe_ids", "server_dns_names", "server_ip_addresses"}
_INTS = {"max_message_bytes", "max_csrs_per_batch", "rate_limit_burst"}
_FLOATS = {"rate_limit_per_node", "signing_rate_limit"}
_ADDRESSES = {"listen", "enroll_listen", "http_listen", "health_listen"}
_STRINGS = {"trust_domain", "database_url"}
_UPSTREAM_KEYS = ("cert_file", "key_file", "chain_file")
_KUBERNETES_KEYS = ("api_server", "ca_file", "token_file", "audience", "allowed_service_accounts")
_NESTED = {"upstream": _UPSTREAM_KEYS, "kubernetes": _KUBERNETES_KEYS}
KNOWN_KEYS = (
    _DURATIONS | _PATHS | _BOOLS | _LISTS | _INTS | _FLOATS | _ADDRESSES | _STRINGS | set(_NESTED)
)


def _convert(key: str, value: Any) -> Any:
    if key in _DURATIONS:
        try:
            return parse_duration(value, what=key)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if key in _PATHS:
        return Path(str(value)).expanduser() if value not in (None, "") else None
    if key in _BOOLS:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in {"1", "true", "yes", "on"}:
            return True
        if text in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if key in _LISTS:
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        if isinstance(value, list | tuple):
            return tuple(str(v) for v in value)
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    if key in _INTS:
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a whole number, got {value!r}") from None
    if key in _FLOATS:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if key in _ADDRESSES:
        if key in {"http_listen", "health_listen"} and str(value).strip().lower() in {
            "",
            "off",
            "none",
        }:
            return None
        return HostPort.parse(str(value), what=key)
    if key == "upstream":
        if not isinstance(value, Mapping):
            raise ConfigError("upstream: expected a mapping with cert_file, key_file, chain_file")
        unknown = set(value) - set(_UPSTREAM_KEYS)
        missing = [k for k in _UPSTREAM_KEYS if not value.get(k)]
        if unknown:
            raise ConfigError(f"upstream: unknown keys {sorted(unknown)}")
        if missing:
            raise ConfigError(f"upstream: missing {', '.join(missing)}")
        return UpstreamConfig(*(Path(str(value[k])).expanduser() for k in _UPSTREAM_KEYS))
    return None if value is None else str(value)


def read_file(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys")
    return raw


def _nested_env_key(key: str) -> tuple[str, str] | None:
    """("kubernetes", "audience") for "kubernetes_audience"; None if not a nested key."""
    for section, keys in _NESTED.items():
        sub = key.removeprefix(section + "_")
        if sub != key and sub in keys:
            return section, sub
    return None


def read_env(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == KEK_ENV:
            continue
        key = name[len(ENV_PREFIX) :].lower()
        nested = _nested_env_key(key)
        if nested is not None:
            values.setdefault(nested[0], {})[nested[1]] = value
        elif key in KNOWN_KEYS:
            values[key] = value
        else:
            raise ConfigError(f"unknown environment variable {name}")
    return values


def _merge(merged: dict[str, Any], layer: Mapping[str, Any]) -> None:
    """Later layers win; the `kubernetes` section merges key by key (the environment can
    set one key of a section the file holds)."""
    for key, value in layer.items():
        current = merged.get(key)
        if key == "kubernetes" and isinstance(current, Mapping) and isinstance(value, Mapping):
            merged[key] = {**current, **value}
        else:
            merged[key] = value


def _kubernetes(value: Any, environ: Mapping[str, str]) -> KubernetesConfig | None:
    """The `kubernetes` section; the API server defaults to the in-cluster address."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(
            "kubernetes: expected a mapping with api_server, ca_file, token_file, audience, "
            "allowed_service_accounts"
        )
    unknown = sorted(set(value) - set(_KUBERNETES_KEYS))
    if unknown:
        raise ConfigError(
            f"kubernetes: unknown keys {unknown} (known: {', '.join(_KUBERNETES_KEYS)})"
        )
    api_server = str(value.get("api_server") or "").strip().rstrip("/")
    if not api_server:
        host = environ.get("KUBERNETES_SERVICE_HOST", "").strip()
        port = environ.get("KUBERNETES_SERVICE_PORT", "").strip() or "443"
        if not host:
            raise ConfigError(
                "kubernetes.api_server: not set, and KUBERNETES_SERVICE_HOST is not in the "
                "environment (the CA is not running in a pod); set it, e.g. "
                "https://kubernetes.default.svc"
            )
        api_server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    if not re.fullmatch(r"https://[^/?#@\s]+", api_server):
        raise ConfigError(
            f"kubernetes.api_server: expected https://HOST[:PORT], got {api_server!r} (the "
            "CA sends its service-account token to it, so only TLS is accepted)"
        )
    audience = str(value.get("audience") or DEFAULT_K8S_AUDIENCE).strip()
    accounts = value.get("allowed_service_accounts")
    if isinstance(accounts, str):
        accounts = [a.strip() for a in accounts.split(",") if a.strip()]
    if not isinstance(accounts, list | tuple) or not accounts:
        raise ConfigError(
            "kubernetes.allowed_service_accounts: list the service accounts whose pods may "
            'enroll nodes, as namespace/name, e.g. ["meshtls/meshtls-agent"]'
        )
    for account in accounts:
        namespace, sep, name = str(account).partition("/")
        if not sep or not _K8S_NAME.fullmatch(namespace) or not _K8S_NAME.fullmatch(name):
            raise ConfigError(
                f"kubernetes.allowed_service_accounts: {account!r} is not namespace/name "
                "(lower-case Kubernetes names, e.g. meshtls/meshtls-agent)"
            )
    return KubernetesConfig(
        api_server=api_server,
        ca_file=Path(str(value.get("ca_file") or SERVICE_ACCOUNT_DIR / "ca.crt")).expanduser(),
        token_file=Path(str(value.get("token_file") or SERVICE_ACCOUNT_DIR / "token")).expanduser(),
        audience=audience,
        allowed_service_accounts=tuple(dict.fromkeys(str(a) for a in accounts)),
    )


def load(
    *,
    file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> CAConfig:
    """Merge file < environment < overrides (flags), convert, then validate."""
    env = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    if file is not None:
        _merge(merged, read_file(file))
    _merge(merged, read_env(env))
    _merge(merged, {k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = sorted(set(merged) - KNOWN_KEYS)
    if unknown:
        raise ConfigError(f"unknown configuration keys: {', '.join(unknown)}")
    converted = {k: _convert(k, v) for k, v in merged.items() if k != "kubernetes"}
    if "kubernetes" in merged:
        converted["kubernetes"] = _kubernetes(merged["kubernetes"], env)
    config = replace(CAConfig(), **converted)
    validate(config)
    return config


def validate(config: CAConfig) -> None:
    """Fail fast, before anything listens, with a message that says what to change."""
    try:
        validate_trust_domain(config.trust_domain)
    except InvalidSpiffeId as exc:
        raise ConfigError(f"trust_domain: {exc}") from None
    for admin_id in config.admin_spiffe_ids:
        try:
            parsed = SpiffeId.parse(admin_id)
        except InvalidSpiffeId as exc:
            raise ConfigError(f"admin_spiffe_ids: {exc}") from None
        if parsed.trust_domain != config.trust_domain:
            raise ConfigError(f"admin_spiffe_ids: {admin_id} is not in {config.trust_domain}")
    # The gRPC listeners authenticate with TLS and may be opened to the network by
    # configuration; the HTTP status endpoint has no authentication and stays on loopback
    # unless the operator says otherwise.
    http = config.http_listen
    if http is not None and not http.is_loopback and not config.allow_public_listen:
        raise ConfigError(
            f"http_listen: {http} is not a loopback address and the metrics endpoint has no "
            "authentication; set allow_public_listen: true to expose it anyway"
        )
    health = config.health_listen
    if health is not None and not health.is_loopback and not config.allow_public_listen:
        raise ConfigError(
            f"health_listen: {health} is not a loopback address and the probe port has no "
            "authentication; set allow_public_listen: true to expose it anyway"
        )
    for ip in config.server_ip_addresses:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise ConfigError(f"server_ip_addresses: {ip!r} is not an IP address") from None
    if config.default_leaf_ttl > config.max_leaf_ttl:
        raise ConfigError("default_leaf_ttl must not exceed max_leaf_ttl")
    if config.intermediate_ttl >= config.root_ttl:
        raise ConfigError("intermediate_ttl must be shorter than root_ttl")
    for key in ("default_leaf_ttl", "node_ttl", "max_leaf_ttl"):
        if getattr(config, key) > config.intermediate_ttl / 6:
            raise ConfigError(
                f"{key} ({getattr(config, key):.0f}s) is above 1/6 of intermediate_ttl "
                f"({config.intermediate_ttl:.0f}s): certificates would be cut short by their "
                "issuer's expiry and rotation could not overlap them. Lower it or raise "
                "intermediate_ttl"
            )
    if config.max_csrs_per_batch < 1 or config.max_message_bytes < 16 * 1024:
        raise ConfigError("max_csrs_per_batch must be >= 1 and max_message_bytes >= 16384")
    if config.rate_limit_per_node <= 0 or config.rate_limit_burst < 1:
        raise ConfigError("rate_limit_per_node must be > 0 and rate_limit_burst >= 1")
    if config.signing_rate_limit <= 0:
        raise ConfigError("signing_rate_limit must be > 0 (certificates per second)")


def describe(config: CAConfig) -> dict[str, str]:
    """The effective configuration for the startup log (no secrets: the KEK is never here)."""
    out = {f.name: str(getattr(config, f.name)) for f in fields(config)}
    out["database_url"] = config.effective_database_url.split("@")[-1]
    return out
