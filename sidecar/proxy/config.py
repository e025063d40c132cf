"""The `inbound:` and `outbound:` sections of the sidecar config, validated into frozen
dataclasses (same rules as `sidecar.config`: every problem reported at once, unknown keys
rejected, relative paths resolved against the config file's directory).

Safety rules checked here rather than at run time:
* an inbound listener forwards plaintext only to a loopback address or a Unix socket,
  unless `unsafe_forward: true` (then the service logs a loud warning at every start);
* an outbound listener takes plaintext and sends it out under this node's identity, so it
  listens on loopback only, unless `unsafe_listen: true`;
* an inbound listener with an empty allow-list would refuse everyone: an error, except in
  `audit: true` mode (used to discover who calls a service before enforcing).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from meshtls.identity.ids import InvalidSpiffeId, SpiffeId
from sidecar.fields import Address, Problems, is_loopback, parse_address, reject_unknown
from sidecar.proxy.policy import AllowList

TlsVersion = Literal["1.2", "1.3"]
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
UNIX_PREFIX = "unix:"


@dataclass(frozen=True)
class UnixAddress:
    path: Path

    def __str__(self) -> str:
        return f"{UNIX_PREFIX}{self.path}"


@dataclass(frozen=True)
class Limits:
    """Timeouts and limits of one listener (defaults shown)."""

    handshake_timeout_seconds: float = 10.0  # accept -> relaying (TLS + connecting onward)
    idle_timeout_seconds: float = 3600.0  # no byte either way for this long: close
    max_connections: int = 16384  # open connections of this listener; more are refused
    max_lifetime_seconds: float | None = None  # close connections older than this
    drain_timeout_seconds: float = 30.0  # on SIGTERM/removal: wait this long, then close


@dataclass(frozen=True)
class InboundConfig:
    """mTLS in on `listen` -> plaintext to `forward` (a local app)."""

    name: str
    listen: Address
    forward: Address | UnixAddress
    identity: SpiffeId  # the certificate presented
    allow: AllowList  # peers allowed (deny by default)
    audit: bool = False  # let denied peers through, but log and count them as denied
    proxy_protocol: bool = False  # PROXY v2 header with the peer's SPIFFE ID to the app
    unsafe_forward: bool = False  # allow a non-loopback `forward`
    min_tls_version: TlsVersion = "1.3"
    limits: Limits = Limits()


@dataclass(frozen=True)
class OutboundConfig:
    """Plaintext in on `listen` (from a local app) -> mTLS to `connect` (a remote sidecar)."""

    name: str
    listen: Address
    connect: Address
    identity: SpiffeId  # the client certificate presented
    expect: AllowList  # the server identities accepted
    server_name: str | None = None  # SNI sent to the server (default: none)
    unsafe_listen: bool = False  # allow a non-loopback `listen`
    min_tls_version: TlsVersion = "1.3"
    limits: Limits = Limits()
    pool_size: int = 0  # pre-established upstream connections kept ready
    pool_max_idle_seconds: float = 30.0  # a pooled connection older than this is replaced


@dataclass(frozen=True)
class ProxyConfig:
    inbound: tuple[InboundConfig, ...] = ()
    outbound: tuple[OutboundConfig, ...] = ()

    @property
    def listeners(self) -> tuple[InboundConfig | OutboundConfig, ...]:
        return (*self.inbound, *self.outbound)


_LIMIT_KEYS = {
    "handshake_timeout_seconds",
    "idle_timeout_seconds",
    "max_connections",
    "max_lifetime_seconds",
    "drain_timeout_seconds",
}
_COMMON_KEYS = {"name", "listen", "identity", "min_tls_version", *_LIMIT_KEYS}
INBOUND_KEYS = {*_COMMON_KEYS, "forward", "allow", "audit", "proxy_protocol", "unsafe_forward"}
OUTBOUND_KEYS = {
    *_COMMON_KEYS,
    "connect",
    "expect",
    "server_name",
    "unsafe_listen",
    "pool_size",
    "pool_max_idle_seconds",
}


def parse_proxy(
    p: Problems, data: Mapping[Any, Any], *, base_dir: Path, trust_domain: str
) -> ProxyConfig:
    """Validate the `inbound` and `outbound` keys of a sidecar config document."""
    parser = _Parser(p, base_dir, trust_domain)
    inbound: list[InboundConfig] = []
    for i, item in enumerate(parser.items("inbound", data.get("inbound"))):
        if (inbound_cfg := parser.inbound(f"inbound[{i}]", item)) is not None:
            inbound.append(inbound_cfg)
    outbound: list[OutboundConfig] = []
    for i, item in enumerate(parser.items("outbound", data.get("outbound"))):
        if (outbound_cfg := parser.outbound(f"outbound[{i}]", item)) is not None:
            outbound.append(outbound_cfg)
    return ProxyConfig(tuple(inbound), tuple(outbound))


class _Parser:
    def __init__(self, p: Problems, base_dir: Path, trust_domain: str) -> None:
        self.p = p
        self.base_dir = base_dir
        self.trust_domain = trust_domain
        self.names: set[str] = set()
        self.listens: set[Address] = set()

    def items(self, key: str, value: object) -> list[dict[Any, Any] | None]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.p.add(key, "expected a list of listeners (mappings with name, listen, ...)")
            return []
        out: list[dict[Any, Any] | None] = []
        for i, item in enumerate(value):
            if isinstance(item, dict):
                out.append(item)
            else:
                self.p.add(f"{key}[{i}]", "expected a mapping with name, listen, identity, ...")
                out.append(None)
        return out

    def inbound(self, key: str, item: dict[Any, Any] | None) -> InboundConfig | None:
        if item is None:
            return None
        reject_unknown(self.p, f"{key}.", item, INBOUND_KEYS)
        name = self.name(key, item.get("name"))
        listen = self.listen(f"{key}.listen", item.get("listen"))
        forward = self.forward(f"{key}.forward", item.get("forward"))
        identity = self.spiffe_id(f"{key}.identity", item.get("identity"))
        audit = self.flag(f"{key}.audit", item.get("audit", False))
        allow = self.allow_list(f"{key}.allow", item.get("allow"), may_be_empty=audit)
        proxy_protocol = self.flag(f"{key}.proxy_protocol", item.get("proxy_protocol", False))
        unsafe = self.flag(f"{key}.unsafe_forward", item.get("unsafe_forward", False))
        if isinstance(forward, Address) and not unsafe and not is_loopback(forward.host):
            self.p.add(
                f"{key}.forward",
                f"{forward.host} is not a loopback address: plaintext would cross the "
                "network. Forward to 127.0.0.1/::1/localhost or a unix:/path socket, or set "
                "unsafe_forward: true",
            )
        version = self.tls_version(f"{key}.min_tls_version", item.get("min_tls_version", "1.3"))
        limits = self.limits(key, item)
        if None in (name, listen, forward, identity, allow):
            return None
        assert name is not None
        assert listen is not None
        assert forward is not None
        assert identity is not None
        assert allow is not None
        return InboundConfig(
            name=name,
            listen=listen,
            forward=forward,
            identity=identity,
            allow=allow,
            audit=audit,
            proxy_protocol=proxy_protocol,
            unsafe_forward=unsafe,
            min_tls_version=version,
            limits=limits,
        )

    def outbound(self, key: str, item: dict[Any, Any] | None) -> OutboundConfig | None:
        if item is None:
            return None
        reject_unknown(self.p, f"{key}.", item, OUTBOUND_KEYS)
        name = self.name(key, item.get("name"))
        listen = self.listen(f"{key}.listen", item.get("listen"))
        unsafe = self.flag(f"{key}.unsafe_listen", item.get("unsafe_listen", False))
        if listen is not None and not unsafe and not is_loopback(listen.host):
            self.p.add(
                f"{key}.listen",
                f"{listen.host} is not a loopback address: anyone who reaches it could speak "
                "with this node's identity. Listen on 127.0.0.1/::1/localhost, or set "
                "unsafe_listen: true",
            )
        connect = self.address(f"{key}.connect", item.get("connect"), allow_zero=False)
        identity = self.spiffe_id(f"{key}.identity", item.get("identity"))
        expect = self.allow_list(f"{key}.expect", item.get("expect"), may_be_empty=False)
        server_name = item.get("server_name")
        if server_name is not None and (not isinstance(server_name, str) or not server_name):
            self.p.add(f"{key}.server_name", f"expected a host name, got {server_name!r}")
            server_name = None
        version = self.tls_version(f"{key}.min_tls_version", item.get("min_tls_version", "1.3"))
        limits = self.limits(key, item)
        pool_size = self.integer(f"{key}.pool_size", item.get("pool_size", 0), low=0, high=64)
        pool_idle = self.number(
            f"{key}.pool_max_idle_seconds", item.get("pool_max_idle_seconds", 30.0), low=0.1
        )
        if None in (name, listen, connect, identity, expect):
            return None
        assert name is not None
        assert listen is not None
        assert connect is not None
        assert identity is not None
        assert expect is not None
        return OutboundConfig(
            name=name,
            listen=listen,
            connect=connect,
            identity=identity,
            expect=expect,
            server_name=server_name,
            unsafe_listen=unsafe,
            min_tls_version=version,
            limits=limits,
            pool_size=pool_size,
            pool_max_idle_seconds=pool_idle,
        )

    # -- single values -------------------------------------------------------------

    def name(self, key: str, value: object) -> str | None:
        if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
            self.p.add(
                f"{key}.name",
                "required, a short name of lower-case letters, digits, '.', '-' and '_' "
                f"(used in logs and metrics), got {value!r}",
            )
            return None
        if value in self.names:
            self.p.add(f"{key}.name", f"{value!r} is already the name of another listener")
            return None
        self.names.add(value)
        return value

    def address(self, key: str, value: object, *, allow_zero: bool) -> Address | None:
        if not isinstance(value, str):
            self.p.add(key, f"required, HOST:PORT, got {value!r}")
            return None
        try:
            address = parse_address(value)
        except ValueError as exc:
            self.p.add(key, str(exc))
            return None
        if address.port == 0 and not allow_zero:
            self.p.add(key, "port 0 is not a port to connect to")
            return None
        return address

    def listen(self, key: str, value: object) -> Address | None:
        address = self.address(key, value, allow_zero=True)
        if address is not None and address.port != 0:
            if address in self.listens:
                self.p.add(key, f"{address} is already the address of another listener")
            self.listens.add(address)
        return address

    def forward(self, key: str, value: object) -> Address | UnixAddress | None:
        if isinstance(value, str) and value.startswith(UNIX_PREFIX):
            raw = value[len(UNIX_PREFIX) :]
            if not raw:
                self.p.add(key, "expected unix:/path/to/socket")
                return None
            path = Path(raw).expanduser()
            return UnixAddress(path if path.is_absolute() else self.base_dir / path)
        return self.address(key, value, allow_zero=False)

    def spiffe_id(self, key: str, value: object) -> SpiffeId | None:
        example = f"spiffe://{self.trust_domain or 'example.org'}/svc/web"
        if not isinstance(value, str):
            self.p.add(key, f"required, the SPIFFE ID to present, such as {example}")
            return None
        try:
            sid = SpiffeId.parse(value)
        except InvalidSpiffeId as exc:
            self.p.add(key, str(exc))
            return None
        if self.trust_domain and not sid.member_of(self.trust_domain):
            self.p.add(key, f"{value} is not in this sidecar's trust domain {self.trust_domain!r}")
            return None
        return sid

    def allow_list(self, key: str, value: object, *, may_be_empty: bool) -> AllowList | None:
        if isinstance(value, str):
            value = [value]
        if value is None:
            value = []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.p.add(key, "expected a list of SPIFFE IDs or trust domains (spiffe://td)")
            return None
        try:
            allow = AllowList.parse(value)
        except InvalidSpiffeId as exc:
            self.p.add(key, str(exc))
            return None
        if allow.empty and not may_be_empty:
            self.p.add(
                key,
                "required, a list of SPIFFE IDs or whole trust domains (spiffe://td); "
                "an empty list would refuse every peer",
            )
            return None
        return allow

    def flag(self, key: str, value: object) -> bool:
        if not isinstance(value, bool):
            self.p.add(key, f"expected true or false, got {value!r}")
            return False
        return value

    def tls_version(self, key: str, value: object) -> TlsVersion:
        text = str(value) if isinstance(value, int | float | str) else ""
        if text == "1.3":
            return "1.3"
        if text == "1.2":
            return "1.2"
        self.p.add(key, f'expected "1.2" or "1.3", got {value!r}')
        return "1.3"

    def number(self, key: str, value: object, *, low: float) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or value < low:
            self.p.add(key, f"expected a number of at least {low}, got {value!r}")
            return low
        return float(value)

    def integer(self, key: str, value: object, *, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.p.add(key, f"expected a whole number from {low} to {high}, got {value!r}")
            return low
        return value

    def limits(self, key: str, item: Mapping[Any, Any]) -> Limits:
        d = Limits()
        lifetime = item.get("max_lifetime_seconds")
        return Limits(
            handshake_timeout_seconds=self.number(
                f"{key}.handshake_timeout_seconds",
                item.get("handshake_timeout_seconds", d.handshake_timeout_seconds),
                low=0.01,
            ),
            idle_timeout_seconds=self.number(
                f"{key}.idle_timeout_seconds",
                item.get("idle_timeout_seconds", d.idle_timeout_seconds),
                low=0.01,
            ),
            max_connections=self.integer(
                f"{key}.max_connections",
                item.get("max_connections", d.max_connections),
                low=1,
                high=1_000_000,
            ),
            max_lifetime_seconds=None
            if lifetime is None
            else self.number(f"{key}.max_lifetime_seconds", lifetime, low=0.01),
            drain_timeout_seconds=self.number(
                f"{key}.drain_timeout_seconds",
                item.get("drain_timeout_seconds", d.drain_timeout_seconds),
                low=0.0,
            ),
        )
