"""Inbound listeners: mutual TLS in from a remote sidecar, plaintext out to a local app.

Per connection: the TLS handshake with the listener's identity (a client certificate is
required and verified against the current bundle), then the policy (one SPIFFE URI SAN,
not revoked, in the allow-list, or let through and logged in audit mode), then the
connection to the app (TCP on loopback or a Unix socket), optionally starting with a PROXY
v2 header naming the peer, then the relay. The app never sees a connection from a peer
that was refused.
"""

from __future__ import annotations

from sidecar.proxy.access_log import log_audit_denied
from sidecar.proxy.config import InboundConfig, OutboundConfig, UnixAddress
from sidecar.proxy.connection import Connection
from sidecar.proxy.listener import Listener
from sidecar.proxy.peer import Peer, Refusal, no_identity, peer_of
from sidecar.proxy.proxy_protocol import encode_v2
from sidecar.proxy.relay import Side, pause
from sidecar.proxy.tls import ContextKey
from sidecar.proxy.tls_side import TlsSide


class InboundListener(Listener):
    direction = "inbound"
    config: InboundConfig

    def key_for(self, config: InboundConfig | OutboundConfig) -> ContextKey:
        return ContextKey(config.identity, "server", config.min_tls_version)

    def protocol(self) -> Side:
        return TlsSide(InboundConnection(self))


class InboundConnection(Connection):
    __slots__ = ("config", "peer")

    listener: InboundListener

    def __init__(self, listener: InboundListener) -> None:
        super().__init__(listener)
        self.config = listener.config  # the settings at accept time, for its whole life
        self.peer: Peer | None = None

    def side_made(self, side: Side) -> None:
        if self.down is None:
            assert isinstance(side, TlsSide)
            if not self.accept(side):
                return
            context = self.listener.context()
            if context is None:
                self.refuse(no_identity(self.config.identity))
                return
            side.start_tls(context, self.listener.service.tls.native)
        # The app side: nothing to do until the connect coroutine returns.

    def handshake_failed(self, side: TlsSide, refusal: Refusal) -> None:
        self.listener.record_handshake("refused")
        self.refuse(refusal)

    def handshake_done(self, side: TlsSide) -> None:
        assert side.sslobj is not None
        service = self.listener.service
        try:
            peer = peer_of(side.sslobj)
        except Refusal as refusal:
            self.handshake_failed(side, refusal)
            return
        self.peer = peer
        peer_id = str(peer.spiffe_id)
        if peer.serial in service.tls.revoked:
            self.handshake_failed(
                side,
                Refusal("revoked", f"{peer_id}'s certificate {peer.serial} is revoked", peer_id),
            )
            return
        if peer.resumed_not_after is not None and peer.resumed_not_after <= service.clock.now():
            self.handshake_failed(
                side,
                Refusal(
                    "expired_certificate",
                    f"{peer_id} resumed a session whose certificate has expired",
                    peer_id,
                ),
            )
            return
        self.peer_id = peer_id
        if not self.config.allow.allows(peer.spiffe_id):
            denial = Refusal(
                "not_allowed",
                f"{peer_id} is not in the allow-list ({self.config.allow})",
                peer_id,
            )
            if not self.config.audit:
                self.handshake_failed(side, denial)
                return
            self.listener.record_handshake("audited", resumed=peer.resumed)
            service.metrics.audit_denied.labels(self.listener.name, denial.reason).inc()
            log_audit_denied(self.listener.name, self.client, denial)
        else:
            self.listener.record_handshake("accepted", resumed=peer.resumed)
        pause(side.transport)  # hold early data until the app is connected
        self.connect_task = self.loop.create_task(self._connect_app())
        self.connect_task.add_done_callback(self._connect_done)

    async def _connect_app(self) -> None:
        forward = self.config.forward
        try:
            if isinstance(forward, UnixAddress):
                await self.loop.create_unix_connection(self._app_side, str(forward.path))
            else:
                await self.loop.create_connection(self._app_side, forward.host, forward.port)
        except OSError as exc:
            self.connect_failed(
                Refusal(
                    "upstream_unreachable",
                    f"cannot connect to the app at {forward}: {exc.strerror or exc}",
                    self.peer_id,
                )
            )
            return
        up, down = self.up, self.down
        if up is None or down is None or self.result is not None or down.lost:
            self.close()
            return
        if self.config.proxy_protocol:
            assert isinstance(down, TlsSide)
            assert down.sslobj is not None
            assert self.peer is not None
            cipher = down.sslobj.cipher()
            up.send(
                encode_v2(
                    down.address("peername"),  # type: ignore[arg-type]
                    down.address("sockname"),  # type: ignore[arg-type]
                    spiffe_id=self.peer_id,
                    tls_version=down.sslobj.version(),
                    cipher=cipher[0] if cipher else None,
                    resumed=self.peer.resumed,
                )
            )
        self.start_relay()

    def _app_side(self) -> Side:
        side = Side(self)
        self.up = side
        return side
