"""Enrollment: exchange a one-time join token and a CSR for the node certificate.

The token is read afresh on every attempt (from `ca.join_token_file`, else the
MESHTLS_JOIN_TOKEN captured at startup), so an operator can drop a new one in while the
sidecar runs. A token the CA consumed or rejected is remembered (by hash) and not sent
again.

On Kubernetes (`ca.kubernetes_token_file`) the credential is the pod's projected
service-account token instead, sent with the node name: it is re-read at every attempt
(the kubelet rotates it), never logged, and sent again after a refusal (the cause, e.g.
the CA's allow-list, may be fixed meanwhile; the manager backs off between attempts).

The enrollment listener is verified against the configured bootstrap roots plus the
last known bundle or, with `ca.root_fingerprint`, against a bundle bootstrapped from the pin
(`sidecar.identity.trust`).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from cryptography import x509

from meshtls.identity.x509 import CertificateError, fingerprint_sha256
from sidecar.config import TOKEN_ENV, SidecarConfig
from sidecar.errors import CAInvalidResponse, CAPermissionDenied, CAUnauthenticated, NoJoinToken
from sidecar.identity import trust
from sidecar.identity.ca_client import CAClient
from sidecar.identity.ca_messages import EnrollResult, KubernetesCredential
from sidecar.identity.keys import PrivateKey, build_csr, new_private_key
from sidecar.identity.model import Svid, TrustBundle
from sidecar.identity.verify import check_bundle, verify_svid

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Enrolled:
    node_name: str
    svid: Svid
    bundle: TrustBundle


class Enroller:
    def __init__(self, config: SidecarConfig, client: CAClient) -> None:
        self._config = config
        self._client = client
        self._spent_token: str | None = None  # SHA-256 of the last token sent
        self._pinned_roots: tuple[x509.Certificate, ...] = ()
        # Why the current token cannot be used, for the operator; None when unknown.
        self.token_problem: str | None = None

    @property
    def _what(self) -> str:
        if self._config.ca.kubernetes_token_file is not None:
            return "service-account token"
        return "join token"

    def read_token(self) -> tuple[str | None, str]:
        """(token or None, where it came from / where to put one)."""
        ca = self._config.ca
        token_file = ca.kubernetes_token_file or ca.join_token_file
        if token_file is not None:
            try:
                text = token_file.read_text().strip()
            except FileNotFoundError:
                text = ""
            except (OSError, UnicodeDecodeError) as exc:
                log.warning(
                    f"cannot read the {self._what} file",
                    extra={"path": str(token_file), "error": str(exc)},
                )
                text = ""
            if text:
                return text, str(token_file)
        if ca.join_token_env and ca.kubernetes_token_file is None:
            return ca.join_token_env, TOKEN_ENV
        return None, ca.token_hint()

    async def enroll(self, now: float, known: TrustBundle | None) -> Enrolled:
        """Enroll with the current token; raises CAError (NoJoinToken when there is none)."""
        token, source = self.read_token()
        if token is None:
            self.token_problem = None
            raise NoJoinToken(f"no {self._what} in {source}", operation="enroll")
        if self._config.ca.kubernetes_token_file is not None:
            return await self._enroll_kubernetes(token, source, now, known)
        digest = hashlib.sha256(token.encode()).hexdigest()
        if digest == self._spent_token:
            if self.token_problem is None:
                self.token_problem = (
                    f"the join token in {source} was already used; join tokens are single-use"
                )
            raise NoJoinToken(
                f"the join token in {source} was already used or rejected", operation="enroll"
            )
        await self._set_roots(known)
        key = new_private_key()
        try:
            result = await self._client.enroll(token, build_csr(key))
        except (CAUnauthenticated, CAPermissionDenied) as exc:
            self._spent_token = digest
            self.token_problem = f"the CA rejected the join token from {source}: {exc.message}"
            raise
        self._spent_token = digest  # single use, whatever happens next
        self.token_problem = None
        return Enrolled(result.node_name, self._accept(result, key, now), result.bundle)

    async def _enroll_kubernetes(
        self, token: str, source: str, now: float, known: TrustBundle | None
    ) -> Enrolled:
        await self._set_roots(known)
        key = new_private_key()
        credential = KubernetesCredential(token, self._config.node)
        try:
            result = await self._client.enroll(credential, build_csr(key))
        except (CAUnauthenticated, CAPermissionDenied) as exc:
            self.token_problem = (
                f"the CA refused the service-account token from {source}: {exc.message}"
            )
            raise
        self.token_problem = None
        return Enrolled(result.node_name, self._accept(result, key, now), result.bundle)

    async def _set_roots(self, known: TrustBundle | None) -> None:
        ca = self._config.ca
        roots = list(ca.bootstrap_roots) or list(self._pinned_roots)
        if known is not None:
            seen = {fingerprint_sha256(r) for r in roots}
            roots += [r for r in known.roots if fingerprint_sha256(r) not in seen]
        if not roots and ca.root_fingerprint:
            roots = list(await self._bootstrap_pinned(ca.root_fingerprint))
        await self._client.set_enrollment_roots(roots)

    async def _bootstrap_pinned(self, fingerprint: str) -> tuple[x509.Certificate, ...]:
        ca = self._config.ca
        candidate = await trust.fetch_unverified_bundle(
            ca.enroll_address, ca.server_name, ca.timeout_seconds
        )
        root = trust.pinned_root(candidate, fingerprint, ca.enroll_address)
        await self._client.set_enrollment_roots([root])
        verified = await self._client.enrollment_bundle()
        trust.require_root(verified, root, ca.enroll_address)
        self._pinned_roots = verified.roots
        log.info(
            "trust bundle bootstrapped from the pinned root",
            extra={"root_sha256": fingerprint, "roots": len(verified.roots)},
        )
        return verified.roots

    def _accept(self, result: EnrollResult, key: PrivateKey, now: float) -> Svid:
        config = self._config
        node_id = config.node_id
        if result.node_name != config.node:
            raise CAInvalidResponse(
                f"the join token was issued for node {result.node_name!r} but this sidecar is "
                f"configured as node {config.node!r} (config key: node); create a token "
                "for this node",
                operation="enroll",
            )
        svid = Svid(node_id, result.chain, key)
        try:
            if result.spiffe_id != str(node_id):
                raise CertificateError(f"the CA named the node {result.spiffe_id}, not {node_id}")
            check_bundle(result.bundle, config.trust_domain)
            verify_svid(svid, result.bundle, now, node_id)
        except CertificateError as exc:
            raise CAInvalidResponse(
                f"the node certificate from the CA is not acceptable: {exc}", operation="enroll"
            ) from None
        return svid
