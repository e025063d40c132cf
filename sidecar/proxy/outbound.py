"""Outbound listeners: plaintext in from a local app, mutual TLS out to a remote sidecar.

Per connection: the app's side stops reading at once; the proxy takes a ready connection
from the listener's pool (when `pool_size` > 0) or connects to `connect` and runs the TLS
handshake with the listener's identity, resuming the last session the server gave this
listener when there is one (TLS 1.3 tickets: no certificate chain to verify, no
signature). The server must present a verified certificate whose single SPIFFE ID
matches `expect` and is not revoked; only then does the app's data flow.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from sidecar.proxy.config import InboundConfig, OutboundConfig
from sidecar.proxy.connection import Connection
from sidecar.proxy.listener import Listener
from sidecar.proxy.peer import Peer, Refusal, no_identity, peer_of
from sidecar.proxy.pool import UpstreamPool
from sidecar.proxy.relay import Side, pause
from sidecar.proxy.sessions import TicketStore
from sidecar.proxy.tls import ContextKey
from sidecar.proxy.tls_side import TlsSide

if TYPE_CHECKING:
    from sidecar.proxy.service import ProxyService


class OutboundListener(Listener):
    direction = "outbound"
    config: OutboundConfig

    def __init__(self, config: OutboundConfig, service: ProxyService) -> None:
        super().__init__(config, service)
        self.tickets = TicketStore(service.tls.native)
        self.pool = UpstreamPool(self)

    def key_for(self, config: InboundConfig | OutboundConfig) -> ContextKey:
        return ContextKey(config.identity, "client", config.min_tls_version)

    def protocol(self) -> Side:
        return Side(OutboundConnection(self))

    # -- TLS ---------------------------------------------------------------------------

    def start_tls(self, side: TlsSide, context: ssl.SSLContext) -> None:
        side.connect_tls(
            context, self.tickets, self.config.server_name, native=self.service.tls.native
        )

    def handshake_refused(self, side: TlsSide) -> None:
        self.record_handshake("refused")
        self.forget_tickets(side)

    def forget_tickets(self, side: TlsSide) -> None:
        """After a refused resumption: the other tickets carry the same certificates."""
        if side.offered_ticket:
            self.tickets.clear()

    def check_server(self, side: TlsSide) -> Peer:
        """The verified server, if it is the one expected; Refusal otherwise."""
        assert side.sslobj is not None
        peer = peer_of(side.sslobj)
        peer_id = str(peer.spiffe_id)
        if peer.serial in self.service.tls.revoked:
            raise Refusal("revoked", f"{peer_id}'s certificate {peer.serial} is revoked", peer_id)
        expiry = peer.resumed_not_after
        if expiry is not None and expiry <= self.service.clock.now():
            raise Refusal(
                "expired_certificate",
                f"{peer_id} resumed a session whose certificate has expired",
                peer_id,
            )
        if not self.config.expect.allows(peer.spiffe_id):
            raise Refusal(
                "unexpected_identity",
                f"expected {self.config.expect}, got {peer_id}",
                peer_id,
            )
        return peer

    # -- pool and lifecycle ----------------------------------------------------------

    def pooled(self) -> int:
        return self.pool.ready_count

    def sweep_extra(self, now: float) -> None:
        self.pool.sweep(now)

    async def start(self) -> None:
        await super().start()
        self.pool.refill()

    def reconfigure(self, config: InboundConfig | OutboundConfig) -> None:
        assert isinstance(config, OutboundConfig)
        old = self.config
        super().reconfigure(config)
        if (old.connect, old.identity, old.expect, old.server_name) != (
            config.connect,
            config.identity,
            config.expect,
            config.server_name,
        ):
            self.tickets.clear()
            self.pool.flush()
        self.pool.refill()

    def stop_accepting(self) -> None:
        super().stop_accepting()
        self.pool.close()


class OutboundConnection(Connection):
    __slots__ = ("config", "context")

    listener: OutboundListener

    def __init__(self, listener: OutboundListener) -> None:
        super().__init__(listener)
        self.config = listener.config
        self.context: ssl.SSLContext | None = None

    def side_made(self, side: Side) -> None:
        if self.down is None:
            if not self.accept(side):
                return
            pause(side.transport)  # nothing flows until the server is verified
            self.context = self.listener.context()
            if self.context is None:
                self.refuse(no_identity(self.config.identity))
                return
            pooled = self.listener.pool.take(self.context)
            if pooled is not None:
                side_up, peer = pooled
                side_up.owner = self
                self.up = side_up
                self.peer_id = str(peer.spiffe_id)
                self.start_relay()
                return
            self.connect_task = self.loop.create_task(self._connect())
            self.connect_task.add_done_callback(self._connect_done)
            return
        assert isinstance(side, TlsSide)
        assert self.context is not None
        self.listener.start_tls(side, self.context)

    async def _connect(self) -> None:
        target = self.config.connect
        try:
            await self.loop.create_connection(self._server_side, target.host, target.port)
        except OSError as exc:
            self.connect_failed(
                Refusal(
                    "upstream_unreachable",
                    f"cannot connect to {target}: {exc.strerror or exc}",
                )
            )

    def _server_side(self) -> TlsSide:
        side = TlsSide(self)
        self.up = side
        return side

    def handshake_failed(self, side: TlsSide, refusal: Refusal) -> None:
        self.listener.handshake_refused(side)
        self.refuse(refusal)

    def side_error(self, side: Side, error: Refusal) -> None:
        if side is self.up and isinstance(side, TlsSide) and side.received == 0:
            self.listener.forget_tickets(side)  # the server refused us after its Finished
        super().side_error(side, error)

    def handshake_done(self, side: TlsSide) -> None:
        try:
            peer = self.listener.check_server(side)
        except Refusal as refusal:
            self.handshake_failed(side, refusal)
            return
        self.listener.record_handshake("accepted", resumed=peer.resumed)
        self.peer_id = str(peer.spiffe_id)
        if self.down is None or self.down.lost or self.result is not None:
            self.close()
            return
        self.start_relay()
