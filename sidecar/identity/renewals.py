"""The calls on the agent listener (mutual TLS with the node certificate): renew the node
certificate, re-list the node's registration entries with the trust bundle, and sign a
batch of workload identities. Every answer is checked before it replaces anything."""

from __future__ import annotations

import logging

from meshtls.identity.x509 import CertificateError
from sidecar.config import SidecarConfig
from sidecar.errors import CAInvalidResponse, CAPermissionDenied
from sidecar.identity.ca_client import CAClient
from sidecar.identity.health import Health
from sidecar.identity.holder import Holder, Scheduler, iso
from sidecar.identity.keys import build_csr, new_private_key
from sidecar.identity.model import Entry, NodeIdentity, Svid, WorkloadIdentity
from sidecar.identity.verify import verify_svid

log = logging.getLogger(__name__)


class Renewer:
    def __init__(
        self,
        config: SidecarConfig,
        client: CAClient,
        holder: Holder,
        health: Health,
        schedule: Scheduler,
    ) -> None:
        self._config = config
        self._client = client
        self._holder = holder
        self._health = health
        self._schedule = schedule
        # When the entries and the bundle are next re-read; 0: at the next cycle.
        self.next_refresh = 0.0
        # Set when the CA answered "banned" (or similar) to a node-level call.
        self.refused: str | None = None

    async def renew_node(self, now: float) -> None:
        holder = self._holder
        key = new_private_key()
        chain, bundle = await self._client.renew_node(build_csr(key))
        self._health.contacted(now)
        self.refused = None
        await holder.install_bundle(bundle)
        assert holder.bundle is not None
        node_id = self._config.node_id
        svid = Svid(node_id, chain, key)
        try:
            verify_svid(svid, holder.bundle, now, node_id)
        except CertificateError as exc:
            raise CAInvalidResponse(
                f"the renewed node certificate is not acceptable: {exc}", operation="renew_node"
            ) from None
        previous = holder.node.svid.serial if holder.node else None
        await holder.set_node(
            NodeIdentity(self._config.node, svid, now, self._schedule(svid, now, True))
        )
        self._health.renewed("node")
        self.next_refresh = now  # first use of the new certificate: at once, by the manager
        log.info(
            "node certificate renewed",
            extra={
                "serial": svid.serial,
                "previous_serial": previous,
                "not_after": iso(svid.not_after),
            },
        )

    async def refresh(self, now: float) -> None:
        """Re-read the node's entries and the trust bundle."""
        entries = await self._client.list_identities()
        self._health.contacted(now)
        self.refused = None
        await self._holder.install_bundle(await self._client.trust_bundle())
        self._holder.set_entries({e.id: e for e in entries})
        self.next_refresh = now + self._config.renewal.refresh_seconds

    async def sign(self, batch: list[Entry], now: float) -> None:
        """Sign `batch` in ONE SignIdentities call and adopt every valid answer; raises
        CAInvalidResponse afterwards if some were missing or invalid."""
        holder = self._holder
        keys = {e.id: new_private_key() for e in batch}
        requested = {e.id: e for e in batch}
        try:
            signed, bundle = await self._client.sign_identities(
                [(e.id, build_csr(keys[e.id])) for e in batch]
            )
        except CAPermissionDenied:
            self.next_refresh = now  # an entry may have been deleted: list again first
            raise
        self._health.contacted(now)
        if bundle is not None:
            await holder.install_bundle(bundle)
        assert holder.bundle is not None
        problems: list[str] = []
        accepted = 0
        for item in signed:
            entry = requested.pop(item.entry_id, None)
            if entry is None:
                problems.append(f"a certificate for entry {item.entry_id!r} we did not ask for")
                continue
            svid = Svid(entry.spiffe_id, item.chain, keys[entry.id])
            try:
                if item.spiffe_id and item.spiffe_id != str(entry.spiffe_id):
                    raise CertificateError(f"the CA signed {item.spiffe_id} instead")
                verify_svid(svid, holder.bundle, now, entry.spiffe_id)
            except CertificateError as exc:
                problems.append(f"{entry.spiffe_id}: {exc}")
                continue
            holder.put_identity(WorkloadIdentity(entry, svid, now, self._schedule(svid, now, True)))
            accepted += 1
        if accepted:
            self._health.renewed("workload", accepted)
        if requested:
            names = ", ".join(sorted(str(e.spiffe_id) for e in requested.values()))
            problems.append(f"no certificate returned for {names}")
        if problems:
            raise CAInvalidResponse("; ".join(problems), operation="sign_identities")
