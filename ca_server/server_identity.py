"""The CA's own TLS identity: an X509-SVID for spiffe://<td>/meshtls/ca that the CA signs
for itself, served on both listeners and renewed in place at half its lifetime, so a CA
that runs for months never presents an expired certificate and never restarts to renew."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca_server.api.tls import ReloadableServerCredentials
from ca_server.errors import CAError
from ca_server.services.audit import event
from ca_server.services.context import CAContext
from ca_server.services.issuing import Issued, issue
from meshtls.clock import utc
from meshtls.identity.ids import SpiffeId
from meshtls.identity.pem import certs_to_pem
from meshtls.identity.rotation import Backoff, renewal_time
from meshtls.identity.x509 import SubjectPublicKey

log = logging.getLogger(__name__)

SERVER_CERT_TTL = 24 * 3600.0


class ServerIdentity:
    def __init__(self, ctx: CAContext, ttl: float = SERVER_CERT_TTL) -> None:
        self._ctx = ctx
        self._ttl = ttl
        self._current: Issued | None = None
        self._task: asyncio.Task[None] | None = None
        self._pems: tuple[bytes, bytes] | None = None  # (key, chain) being served
        self.agent: ReloadableServerCredentials | None = None
        self.enrollment: ReloadableServerCredentials | None = None

    @property
    def current(self) -> Issued:
        if self._current is None:
            raise RuntimeError("the server identity is not issued yet")
        return self._current

    async def _issue(self) -> tuple[bytes, bytes]:
        ctx = self._ctx
        key = ec.generate_private_key(ec.SECP256R1())
        now = ctx.clock.now()
        issued = issue(
            ctx.trust.keyring.signer,
            SubjectPublicKey.of(key.public_key()),
            spiffe_id=SpiffeId.for_ca(ctx.config.trust_domain),
            ttl_seconds=self._ttl,
            now=now,
            kind="ca-server",
            node_name="",
            dns_names=ctx.config.server_dns_names,
            ip_addresses=ctx.config.server_ip_addresses,
        )
        record = issued.record
        audit = event(
            now,
            "system",
            "certificate.issue",
            record.serial,
            kind="ca-server",
            spiffe_id=record.spiffe_id,
            not_after=utc(record.not_after).isoformat(),
        )
        await ctx.write(lambda tx: tx.add_certificates([record]), [audit])
        self._current = issued
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self._pems = (key_pem, certs_to_pem(issued.chain))
        return self._pems

    async def start(self) -> None:
        """Issue the first certificate and build the two listeners' credentials."""
        key_pem, chain_pem = await self._issue()
        roots = self._ctx.trust.snapshot.roots_pem
        self.agent = ReloadableServerCredentials(key_pem, chain_pem, client_roots_pem=roots)
        self.enrollment = ReloadableServerCredentials(key_pem, chain_pem, client_roots_pem=None)
        self._task = asyncio.create_task(self._renew_forever(), name="ca-server-identity")

    async def renew(self) -> None:
        """Issue a new certificate now and serve it on every new handshake."""
        key_pem, chain_pem = await self._issue()
        assert self.agent is not None
        assert self.enrollment is not None
        self.agent.update(key_pem, chain_pem, self._ctx.trust.snapshot.roots_pem)
        self.enrollment.update(key_pem, chain_pem, None)
        log.info(
            "CA server certificate renewed",
            extra={
                "serial": self.current.record.serial,
                "not_after": utc(self.current.record.not_after).isoformat(),
            },
        )

    def update_client_roots(self, roots_pem: bytes) -> None:
        """The trust bundle changed (a root was added or dropped): accept client
        certificates chaining to exactly these roots on every new handshake."""
        if self.agent is not None and self._pems is not None:
            self.agent.update(*self._pems, roots_pem)

    async def _renew_forever(self) -> None:
        backoff = Backoff(initial=1.0, maximum=60.0)
        while True:
            record = self.current.record
            # From issuance, not from the backdated NotBefore: the backdate is for peers'
            # clock skew, not lifetime.
            await self._ctx.clock.sleep_until(
                renewal_time(record.issued_at, record.not_after, jitter=0.0)
            )
            try:
                await self.renew()
                backoff.reset()
            except CAError as exc:
                delay = backoff.next_delay()
                log.error(
                    "cannot renew the CA server certificate; retrying",
                    extra={"reason": exc.message, "retry_in_seconds": round(delay, 1)},
                )
                await asyncio.sleep(delay)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
