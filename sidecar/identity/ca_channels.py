"""The sidecar's two grpc.aio channels to the CA and the credentials they are built from.

* The enrollment channel (server-authenticated TLS) verifies the CA against the bootstrap
  roots; it carries Enroll and GetTrustBundle.
* The agent channel (mutual TLS) presents the node certificate and verifies the CA against
  the current trust bundle. gRPC Python cannot swap a client certificate in place, so the
  channel is closed whenever the node certificate or the bundle changes and dialled afresh
  by the next call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import grpc
from cryptography import x509

from meshtls.identity.pem import certs_to_pem
from meshtls.v1 import agent_pb2_grpc
from sidecar.config import CAConfig
from sidecar.errors import CAError, CAUnauthenticated
from sidecar.identity.model import Svid, TrustBundle

# gRPC's own reconnect backoff grows to 120 s by default, which would delay recovery long
# after the CA is back; our Backoff decides when to retry, so keep gRPC's short. A local
# subchannel pool makes a rebuilt channel really start afresh.
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.enable_retries", 0),
)

NodeKey = tuple[str, tuple[str, ...]]  # (node certificate serial, bundle fingerprints)


class CAChannels:
    """Dials each channel on first use after its credentials changed. Create inside the
    event loop that will use it."""

    def __init__(self, ca: CAConfig) -> None:
        self._ca = ca
        self._enroll_roots: bytes | None = None
        self._enroll_channel: Any = None
        self._node_key: NodeKey | None = None
        self._node_creds: tuple[bytes, bytes, bytes] | None = None  # roots, key, chain
        self._agent_channel: Any = None
        # Set (by the client) once a unary call succeeded with the current node
        # certificate; cleared here when the node certificate changes.
        self.credentials_confirmed = asyncio.Event()

    @property
    def has_node_credentials(self) -> bool:
        return self._node_creds is not None

    @property
    def node_key(self) -> NodeKey | None:
        """Which node credentials the agent channel uses now (None: none)."""
        return self._node_key

    def _options(self) -> list[tuple[str, Any]]:
        options = list(CHANNEL_OPTIONS)
        if self._ca.server_name:
            options.append(("grpc.ssl_target_name_override", self._ca.server_name))
        return options

    async def set_enrollment_roots(self, roots: Sequence[x509.Certificate]) -> None:
        """Verify the enrollment listener against `roots` from now on."""
        pem = certs_to_pem(roots)
        if pem != self._enroll_roots:
            self._enroll_roots = pem
            await self._close_enroll()

    async def use_node(self, svid: Svid, bundle: TrustBundle) -> None:
        """Authenticate agent calls with `svid`, verifying the CA against `bundle`."""
        key = (svid.serial, bundle.fingerprints())
        previous = self._node_key
        if key == previous:
            return
        self._node_key = key
        self._node_creds = (bundle.pem(), svid.key_pem(), svid.chain_pem())
        if key[0] != (previous[0] if previous else None):
            self.credentials_confirmed.clear()
        await self._close_agent()

    async def forget_node(self) -> None:
        self._node_key = None
        self._node_creds = None
        self.credentials_confirmed.clear()
        await self._close_agent()

    async def close(self) -> None:
        """Drop both channels; the next call dials afresh."""
        await self._close_enroll()
        await self._close_agent()

    async def _close_enroll(self) -> None:
        channel, self._enroll_channel = self._enroll_channel, None
        if channel is not None:
            await channel.close(None)

    async def _close_agent(self) -> None:
        channel, self._agent_channel = self._agent_channel, None
        if channel is not None:
            await channel.close(None)

    def enroll_stub(self) -> Any:
        """An AgentService stub on the enrollment channel."""
        if self._enroll_roots is None:
            raise CAError("no trust roots for the enrollment listener yet", operation="enroll")
        if self._enroll_channel is None:
            creds = grpc.ssl_channel_credentials(root_certificates=self._enroll_roots)
            self._enroll_channel = grpc.aio.secure_channel(
                str(self._ca.enroll_address), creds, options=self._options()
            )
        return agent_pb2_grpc.AgentServiceStub(self._enroll_channel)

    def agent_stub(self, operation: str) -> Any:
        """An AgentService stub on the mutual-TLS channel; CAUnauthenticated without a
        node certificate."""
        if self._node_creds is None:
            raise CAUnauthenticated("this node has no certificate yet", operation=operation)
        if self._agent_channel is None:
            roots, key, chain = self._node_creds
            creds = grpc.ssl_channel_credentials(
                root_certificates=roots, private_key=key, certificate_chain=chain
            )
            self._agent_channel = grpc.aio.secure_channel(
                str(self._ca.address), creds, options=self._options()
            )
        return agent_pb2_grpc.AgentServiceStub(self._agent_channel)
