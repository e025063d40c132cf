"""TLS 1.3 session tickets an outbound listener keeps, so that its next connections resume
instead of running a full handshake (no certificate chain sent, parsed or verified, no
signature made or checked).

Servers (inbound listeners) issue stateful, single-use tickets (`tls.py`): one per
handshake, each good for one resumption, as RFC 8446 recommends. So a client keeps a
small stack of them per listener: every connection takes the newest one (if any) and gives
back the one the server sends once the handshake is over. A ticket belongs to the client
context it came from: when the context changes (rotation, new bundle) the stack is
emptied. A refused resumption also empties it (a ticket chain carries the peer certificate
of its first, full handshake: if that is refused, the rest would be too).

Tickets are held by pointer when the native helpers are available (`native_tls.py`), else
as Python `SSLSession` objects (each taken and offered through a copy that costs about
0.3 ms with OpenSSL 3.0: still cheaper than a full handshake).
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass

from sidecar.proxy.native_tls import NativeSession, NativeTls, NativeTlsError

MAX_TICKETS = 64  # per listener: more than enough for the connections opened at once


@dataclass(slots=True)
class Offer:
    """What a client connection offered, to recognise the new ticket when it comes."""

    native: NativeTls | None
    offered: bool = False  # a ticket was offered (the handshake may still not resume)
    mark: int = 0  # native: the session pointer after the handshake
    offered_id: bytes = b""  # Python sessions: the id of the session offered


Ticket = NativeSession | ssl.SSLSession


class TicketStore:
    """The newest tickets of one outbound listener, for one client context."""

    def __init__(self, native: NativeTls | None) -> None:
        self.native = native
        self._context: ssl.SSLContext | None = None
        self._tickets: list[Ticket] = []

    def __len__(self) -> int:
        return len(self._tickets)

    def clear(self) -> None:
        self._tickets.clear()

    def wrap(
        self,
        context: ssl.SSLContext,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_hostname: str | None,
    ) -> tuple[ssl.SSLObject, Offer]:
        """A client connection on `context`, offering the newest ticket if there is one."""
        ticket = self._take(context)
        native = self.native
        offer = Offer(native)
        if native is None or isinstance(ticket, ssl.SSLSession):
            session = ticket if isinstance(ticket, ssl.SSLSession) else None
            sslobj = context.wrap_bio(
                incoming, outgoing, server_hostname=server_hostname, session=session
            )
            if session is not None:
                offer.offered, offer.offered_id = True, session.id
            return sslobj, offer
        sslobj = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
        if ticket is not None:
            try:
                native.offer(sslobj, ticket)
                offer.offered = True
            except NativeTlsError:
                self.native = offer.native = None  # keep working, on Python's sessions
        return sslobj, offer

    def handshake_done(self, sslobj: ssl.SSLObject, offer: Offer) -> None:
        if offer.native is not None:
            try:
                offer.mark = offer.native.session_mark(sslobj)
            except NativeTlsError:
                self.native = offer.native = None

    def collect(self, sslobj: ssl.SSLObject, offer: Offer) -> bool:
        """Keep the ticket the server sent, if it came; True once it has."""
        ticket: Ticket | None
        if offer.native is not None:
            try:
                ticket = offer.native.new_ticket(sslobj, offer.mark)
            except NativeTlsError:
                self.native = offer.native = None
                return True
        else:
            session = sslobj.session
            if session is None or not session.has_ticket or session.id == offer.offered_id:
                return False
            ticket = session
        if ticket is None:
            return False
        self._put(sslobj.context, ticket)
        return True

    def _take(self, context: ssl.SSLContext) -> Ticket | None:
        if context is not self._context:
            self._context = context
            self._tickets.clear()
            return None
        now = time.time()
        while self._tickets:
            ticket = self._tickets.pop()
            if not _expired(ticket, now):
                return ticket
        return None

    def _put(self, context: ssl.SSLContext, ticket: Ticket) -> None:
        if context is not self._context:
            return  # from a connection made before the context changed
        self._tickets.append(ticket)
        if len(self._tickets) > MAX_TICKETS:
            del self._tickets[0]


def _expired(ticket: Ticket, now: float) -> bool:
    if isinstance(ticket, NativeSession):
        return now - ticket.time >= ticket.lifetime
    return now - ticket.time >= ticket.ticket_lifetime_hint
