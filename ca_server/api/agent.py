"""AgentService: what sidecars call. Thin: authenticate, call a service, convert."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from ca_server.api import convert
from ca_server.api.errors import rpc
from ca_server.attestation import NodeAttestor
from ca_server.errors import CAError
from ca_server.metrics import CAMetrics
from ca_server.services import identities, nodes
from ca_server.services.context import CAContext
from ca_server.services.nodes import AuthenticatedNode
from meshtls.v1 import agent_pb2, agent_pb2_grpc, types_pb2

log = logging.getLogger(__name__)


def peer_certificate(context: grpc.aio.ServicerContext) -> bytes | None:
    """The client's leaf certificate (PEM) if TLS verified one, else None."""
    values = context.auth_context().get("x509_pem_cert")
    return values[0] if values else None


def _metrics(servicer: AgentServicer) -> CAMetrics:
    return servicer.ctx.metrics


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, ctx: CAContext, *, kubernetes: NodeAttestor | None = None) -> None:
        self.ctx = ctx
        self.kubernetes = kubernetes  # None: Kubernetes enrollment is off

    async def _caller(
        self, context: grpc.aio.ServicerContext, *, with_entries: bool = False
    ) -> AuthenticatedNode:
        """The calling node; `with_entries` also reads its registration entries in the same
        database transaction when they are not cached (the call is about to use them)."""
        also = identities.entries_loader(self.ctx) if with_entries else None
        return await nodes.authenticate(self.ctx, peer_certificate(context), also=also)

    def _bundle(self) -> types_pb2.TrustBundle:
        return convert.bundle(self.ctx.config.trust_domain, self.ctx.trust.snapshot)

    @rpc(_metrics)
    async def Enroll(
        self, request: agent_pb2.EnrollRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.EnrollResponse:
        if request.WhichOneof("credential") == "kubernetes":
            enrolled = await nodes.enroll_kubernetes(
                self.ctx,
                self.kubernetes,
                request.kubernetes.service_account_token,
                request.kubernetes.node_name,
                request.csr,
                context.peer(),
            )
        else:
            enrolled = await nodes.enroll(self.ctx, request.join_token, request.csr, context.peer())
        return agent_pb2.EnrollResponse(
            node_name=enrolled.node_name,
            spiffe_id=str(enrolled.spiffe_id),
            node_certificate=types_pb2.CertificateChain(certificates=enrolled.issued.chain_der),
            bundle=self._bundle(),
        )

    @rpc(_metrics)
    async def RenewNode(
        self, request: agent_pb2.RenewNodeRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.RenewNodeResponse:
        caller = await self._caller(context)
        issued = await nodes.renew(self.ctx, caller, request.csr)
        return agent_pb2.RenewNodeResponse(
            node_certificate=types_pb2.CertificateChain(certificates=issued.chain_der),
            bundle=self._bundle(),
        )

    @rpc(_metrics)
    async def ListIdentities(
        self, request: agent_pb2.ListIdentitiesRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.ListIdentitiesResponse:
        caller = await self._caller(context, with_entries=True)
        entries = await identities.list_for_node(self.ctx, caller)
        return agent_pb2.ListIdentitiesResponse(entries=[convert.entry(e) for e in entries])

    @rpc(_metrics)
    async def SignIdentities(
        self, request: agent_pb2.SignIdentitiesRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.SignIdentitiesResponse:
        caller = await self._caller(context, with_entries=True)
        signed = await identities.sign_batch(
            self.ctx, caller, [(r.entry_id, r.csr) for r in request.requests]
        )
        return agent_pb2.SignIdentitiesResponse(
            identities=[
                agent_pb2.SignedIdentity(
                    entry_id=s.entry.id,
                    spiffe_id=s.entry.spiffe_id,
                    certificate=types_pb2.CertificateChain(certificates=s.issued.chain_der),
                    expires_at=convert.ts(s.issued.record.not_after),
                )
                for s in signed
            ],
            bundle=self._bundle(),
        )

    @rpc(_metrics)
    async def GetTrustBundle(
        self, request: types_pb2.GetTrustBundleRequest, context: grpc.aio.ServicerContext
    ) -> types_pb2.TrustBundle:
        return self._bundle()

    @rpc(_metrics)
    async def GetCrl(
        self, request: types_pb2.GetCrlRequest, context: grpc.aio.ServicerContext
    ) -> types_pb2.Crl:
        return convert.crl(self.ctx.crl.get(self.ctx))

    async def Watch(
        self, request: agent_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agent_pb2.TrustSnapshot]:
        try:
            caller = await self._caller(context)
        except CAError as exc:
            from ca_server.api.errors import status_for

            await context.abort(status_for(exc), exc.message)
            return
        self.ctx.metrics.watchers.inc()
        log.info("watch stream opened", extra={"node": caller.name})
        try:
            version = request.known_version
            while True:
                snapshot = await self.ctx.trust.wait_newer(version)
                version = snapshot.version
                yield agent_pb2.TrustSnapshot(
                    version=snapshot.version,
                    bundle=convert.bundle(self.ctx.config.trust_domain, snapshot),
                    revoked=[convert.revoked(r) for r in snapshot.revoked],
                )
        finally:
            self.ctx.metrics.watchers.dec()
