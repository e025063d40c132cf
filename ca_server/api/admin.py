"""AdminService: the operator's API. On the Unix socket every caller is an admin (the
socket is mode 0600); on the agent listener only configured admin SPIFFE IDs are."""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from cryptography import x509

from ca_server.api import convert
from ca_server.api.agent import peer_certificate
from ca_server.api.errors import rpc
from ca_server.db.tx import Tx
from ca_server.errors import (
    FailedPrecondition,
    InvalidRequest,
    PermissionDenied,
    Unauthenticated,
)
from ca_server.metrics import CAMetrics
from ca_server.services import admin, nodes
from ca_server.services.audit import event
from ca_server.services.authorities import AuthorityManager
from ca_server.services.authority_import import import_intermediate
from ca_server.services.context import CAContext
from ca_server.services.jobs import expiry_warnings
from meshtls.identity.x509 import CertificateError, serial_hex, spiffe_id_of
from meshtls.v1 import admin_pb2, admin_pb2_grpc, types_pb2

T = TypeVar("T")
Authorizer = Callable[[grpc.aio.ServicerContext], Awaitable[str]]


@dataclass
class ServerInfo:
    version: str
    started_at: float
    agent_address: str
    enrollment_address: str
    database: str


def unix_socket_admin(ctx: CAContext) -> Authorizer:
    async def authorize(context: grpc.aio.ServicerContext) -> str:
        return "admin:unix"

    return authorize


def spiffe_id_admin(ctx: CAContext) -> Authorizer:
    allowed = set(ctx.config.admin_spiffe_ids)

    async def authorize(context: grpc.aio.ServicerContext) -> str:
        pem = peer_certificate(context)
        if not pem:
            raise Unauthenticated("the admin API needs a client certificate on this listener")
        if not allowed:
            raise PermissionDenied(
                "the admin API is not enabled on this listener: set admin_spiffe_ids, or use "
                "the admin Unix socket"
            )
        try:
            cert = x509.load_pem_x509_certificate(pem)
            caller = str(spiffe_id_of(cert))
        except (ValueError, CertificateError) as exc:
            raise Unauthenticated(
                f"the client certificate is not a SPIFFE identity: {exc}"
            ) from None
        if caller not in allowed:
            raise PermissionDenied(f"{caller} is not an admin")
        record = await ctx.read(lambda tx: tx.get_certificate(serial_hex(cert)))
        if record is None or record.revoked_at is not None:
            raise Unauthenticated("the admin client certificate is revoked or unknown")
        return caller

    return authorize


def _encode_page(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode()).decode() if key else ""


def _decode_page(token: str) -> str | None:
    if not token:
        return None
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest(
            "page_token is not valid; pass the next_page_token of an answer"
        ) from None


def _metrics(servicer: AdminServicer) -> CAMetrics:
    return servicer.ctx.metrics


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(
        self,
        ctx: CAContext,
        authorize: Authorizer,
        info: ServerInfo,
        authorities: AuthorityManager | None = None,
    ) -> None:
        self.ctx = ctx
        self._authorities = authorities
        self._authorize = authorize
        self._info = info

    async def _page(
        self,
        request: Any,
        fetch: Callable[[Tx, int, str | None], list[T]],
        key: Callable[[T], str],
    ) -> tuple[list[T], str]:
        """One page of a listing and the token of the next one ("" at the end)."""
        limit = admin.page_size(request.page_size)
        after = _decode_page(request.page_token)
        found = await self.ctx.read(lambda tx: fetch(tx, limit + 1, after))
        page = found[:limit]
        return page, _encode_page(key(page[-1])) if len(found) > limit else ""

    @rpc(_metrics)
    async def CreateJoinToken(
        self, request: admin_pb2.CreateJoinTokenRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CreateJoinTokenResponse:
        actor = await self._authorize(context)
        token, record = await nodes.create_join_token(
            self.ctx, request.node_name, request.ttl_seconds or None, actor
        )
        return admin_pb2.CreateJoinTokenResponse(
            token=token, node_name=record.node_name, expires_at=convert.ts(record.expires_at)
        )

    @rpc(_metrics)
    async def CreateEntry(
        self, request: admin_pb2.CreateEntryRequest, context: grpc.aio.ServicerContext
    ) -> types_pb2.RegistrationEntry:
        actor = await self._authorize(context)
        entry = await admin.create_entry(
            self.ctx,
            spiffe_id=request.spiffe_id,
            node_name=request.node_name,
            dns_names=list(request.dns_names),
            ttl_seconds=request.ttl_seconds,
            selectors=list(request.selectors),
            actor=actor,
        )
        return convert.entry(entry)

    @rpc(_metrics)
    async def ListEntries(
        self, request: admin_pb2.ListEntriesRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListEntriesResponse:
        await self._authorize(context)
        page, token = await self._page(
            request,
            lambda tx, limit, after: tx.list_entries(
                node_name=request.node_name or None,
                spiffe_id=request.spiffe_id or None,
                limit=limit,
                after=after,
            ),
            lambda e: e.id,
        )
        return admin_pb2.ListEntriesResponse(
            entries=[convert.entry(e) for e in page], next_page_token=token
        )

    @rpc(_metrics)
    async def DeleteEntry(
        self, request: admin_pb2.DeleteEntryRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.DeleteEntryResponse:
        actor = await self._authorize(context)
        await admin.delete_entry(self.ctx, request.id, actor)
        return admin_pb2.DeleteEntryResponse()

    def _issuer_fingerprints(self) -> dict[str, str]:
        return {a.id: a.fingerprint_sha256 for a in self.ctx.trust.keyring.authorities}

    @rpc(_metrics)
    async def ListCertificates(
        self, request: admin_pb2.ListCertificatesRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListCertificatesResponse:
        await self._authorize(context)
        page, token = await self._page(
            request,
            lambda tx, limit, after: tx.list_certificates(
                node_name=request.node_name or None,
                spiffe_id=request.spiffe_id or None,
                limit=limit,
                after=after,
            ),
            lambda r: r.serial,
        )
        now = self.ctx.clock.now()
        issuers = self._issuer_fingerprints()
        return admin_pb2.ListCertificatesResponse(
            certificates=[convert.certificate(r, now, issuers.get(r.issuer_id, "")) for r in page],
            next_page_token=token,
        )

    @rpc(_metrics)
    async def GetCertificate(
        self, request: admin_pb2.GetCertificateRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CertificateRecord:
        await self._authorize(context)
        record = await admin.get_certificate(self.ctx, request.serial)
        issuers = self._issuer_fingerprints()
        return convert.certificate(
            record, self.ctx.clock.now(), issuers.get(record.issuer_id, ""), with_pem=True
        )

    @rpc(_metrics)
    async def RevokeCertificate(
        self, request: admin_pb2.RevokeCertificateRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CertificateRecord:
        actor = await self._authorize(context)
        record = await admin.revoke_certificate(self.ctx, request.serial, request.reason, actor)
        return convert.certificate(record, self.ctx.clock.now())

    @rpc(_metrics)
    async def ListNodes(
        self, request: admin_pb2.ListNodesRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListNodesResponse:
        await self._authorize(context)
        page, token = await self._page(
            request,
            lambda tx, limit, after: tx.list_nodes(limit=limit, after=after),
            lambda n: n.name,
        )
        return admin_pb2.ListNodesResponse(
            nodes=[convert.node(n) for n in page], next_page_token=token
        )

    @rpc(_metrics)
    async def BanNode(
        self, request: admin_pb2.BanNodeRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.NodeRecord:
        actor = await self._authorize(context)
        node = await admin.ban_node(self.ctx, request.name, request.reason, actor)
        return convert.node(node)

    @rpc(_metrics)
    async def ListAuthorities(
        self, request: admin_pb2.ListAuthoritiesRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListAuthoritiesResponse:
        await self._authorize(context)
        found = await self.ctx.read(lambda tx: tx.list_authorities())
        return admin_pb2.ListAuthoritiesResponse(authorities=[convert.authority(a) for a in found])

    @rpc(_metrics)
    async def RotateAuthority(
        self, request: admin_pb2.RotateAuthorityRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.RotateAuthorityResponse:
        actor = await self._authorize(context)
        if self._authorities is None:
            raise FailedPrecondition("this server does not manage its authorities")
        done = await self._authorities.request_rotation(immediate=request.immediate)
        found = await self.ctx.read(lambda tx: tx.list_authorities())
        audit = event(
            self.ctx.clock.now(),
            actor,
            "authority.rotate.request",
            "ca",
            immediate=request.immediate,
            actions=[f"{a.kind}: {a.reason}" for a in done],
        )
        await self.ctx.write(lambda tx: None, [audit])
        due = self._authorities.activation_due_at(found)
        return admin_pb2.RotateAuthorityResponse(
            actions=[f"{a.kind}: {a.reason}" for a in done],
            activates_at=convert.ts(due),
            authorities=[convert.authority(a) for a in found],
        )

    @rpc(_metrics)
    async def ImportAuthority(
        self, request: admin_pb2.ImportAuthorityRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ImportAuthorityResponse:
        actor = await self._authorize(context)
        if self._authorities is None:
            raise FailedPrecondition("this server does not manage its authorities")
        done = await import_intermediate(
            self.ctx,
            self._authorities,
            cert_pem=request.certificate_pem,
            key_pem=request.private_key_pem,
            chain_pem=request.chain_pem,
            actor=actor,
        )
        return admin_pb2.ImportAuthorityResponse(
            imported=convert.authority(done.imported),
            new_root=convert.authority(done.new_root) if done.new_root else None,
            activates_at=convert.ts(done.activates_at),
            authorities=[convert.authority(a) for a in done.authorities],
        )

    @rpc(_metrics)
    async def GetCrl(
        self, request: types_pb2.GetCrlRequest, context: grpc.aio.ServicerContext
    ) -> types_pb2.Crl:
        await self._authorize(context)
        return convert.crl(self.ctx.crl.get(self.ctx))

    @rpc(_metrics)
    async def GetTrustBundle(
        self, request: types_pb2.GetTrustBundleRequest, context: grpc.aio.ServicerContext
    ) -> types_pb2.TrustBundle:
        await self._authorize(context)
        return convert.bundle(self.ctx.config.trust_domain, self.ctx.trust.snapshot)

    @rpc(_metrics)
    async def GetStatus(
        self, request: admin_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.StatusResponse:
        await self._authorize(context)
        now = self.ctx.clock.now()

        def load(tx: Tx) -> tuple[int, int, dict[str, int], list]:  # type: ignore[type-arg]
            return (
                tx.count_nodes(),
                tx.count_entries(),
                tx.certificate_counts(now),
                tx.list_authorities(),
            )

        node_count, entry_count, counts, authorities = await self.ctx.read(load)
        return admin_pb2.StatusResponse(
            trust_domain=self.ctx.config.trust_domain,
            version=self._info.version,
            started_at=convert.ts(self._info.started_at),
            agent_address=self._info.agent_address,
            enrollment_address=self._info.enrollment_address,
            database=self._info.database,
            bundle_version=self.ctx.trust.snapshot.version,
            authorities=[convert.authority(a) for a in authorities],
            nodes=node_count,
            entries=entry_count,
            certificates_valid=counts.get("valid", 0),
            certificates_revoked=counts.get("revoked", 0),
            warnings=expiry_warnings(authorities, now, self.ctx.config.upstream_warning),
        )
