"""The `SpiffeWorkloadAPI` service (SPIFFE Workload API, X509-SVID profile).

* Every call must carry the metadata `workload.spiffe.io: true`, else INVALID_ARGUMENT
  (the header proves the caller meant to talk to a Workload API, so that a confused
  deputy, e.g. an HTTP proxy forwarding arbitrary requests, cannot fetch keys).
* FetchX509SVID streams the caller's identities (attestation.py): the first message at
  once, then a full snapshot whenever one of them or the bundle changes. No identity:
  PERMISSION_DENIED (also mid-stream, when the last one goes away).
* FetchX509Bundles streams `{"spiffe://<td>": roots DER}` on the same terms: a caller
  without an identity gets PERMISSION_DENIED, not the bundle (fail closed, like SPIRE's
  default).
* FetchJWTSVID, FetchJWTBundles, ValidateJWTSVID: UNIMPLEMENTED (no JWT-SVIDs yet).

The gRPC paths are the upstream ones, `/SpiffeWorkloadAPI/<Method>` (no proto package).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from meshtls.clock import Clock
from meshtls.spiffe import workloadapi_pb2 as pb
from sidecar.identity.model import Snapshot, TrustBundle, WorkloadIdentity
from sidecar.workload_api.attestation import Caller, Policy
from sidecar.workload_api.calls import CallTracker, SnapshotSource, identify

log = logging.getLogger(__name__)

SERVICE = "SpiffeWorkloadAPI"
HEADER = "workload.spiffe.io"
JWT_UNSUPPORTED = "JWT-SVIDs are not supported by meshtls yet; use the X509-SVID profile"


def check_header(stream: Stream[Any, Any]) -> None:
    if stream.metadata is None or stream.metadata.get(HEADER) != "true":
        raise GRPCError(
            Status.INVALID_ARGUMENT,
            f"security header missing from request: send the metadata `{HEADER}: true`",
        )


def svid_response(idents: tuple[WorkloadIdentity, ...], bundle: TrustBundle) -> pb.X509SVIDResponse:
    roots = bundle.der()
    return pb.X509SVIDResponse(
        svids=[
            pb.X509SVID(
                spiffe_id=str(i.svid.spiffe_id),
                x509_svid=i.svid.chain_der(),
                x509_svid_key=i.svid.key_der(),
                bundle=roots,
            )
            for i in idents
        ]
    )


def bundles_response(bundle: TrustBundle) -> pb.X509BundlesResponse:
    return pb.X509BundlesResponse(bundles={f"spiffe://{bundle.trust_domain}": bundle.der()})


class WorkloadApiService:
    """grpclib service; `tracker.shutdown()` ends its open streams with UNAVAILABLE."""

    def __init__(self, source: SnapshotSource, policy: Policy, clock: Clock) -> None:
        self.tracker = CallTracker(source)
        self._policy = policy
        self._clock = clock

    def __mapping__(self) -> Mapping[str, Handler]:
        def path(method: str) -> str:
            return f"/{SERVICE}/{method}"

        us, uu = Cardinality.UNARY_STREAM, Cardinality.UNARY_UNARY
        return {
            path("FetchX509SVID"): Handler(
                self.fetch_x509_svid, us, pb.X509SVIDRequest, pb.X509SVIDResponse
            ),
            path("FetchX509Bundles"): Handler(
                self.fetch_x509_bundles, us, pb.X509BundlesRequest, pb.X509BundlesResponse
            ),
            path("FetchJWTSVID"): Handler(self.jwt, uu, pb.JWTSVIDRequest, pb.JWTSVIDResponse),
            path("FetchJWTBundles"): Handler(
                self.jwt, us, pb.JWTBundlesRequest, pb.JWTBundlesResponse
            ),
            path("ValidateJWTSVID"): Handler(
                self.jwt, uu, pb.ValidateJWTSVIDRequest, pb.ValidateJWTSVIDResponse
            ),
        }

    def _entitled(self, snapshot: Snapshot, caller: Caller) -> tuple[WorkloadIdentity, ...]:
        idents = self._policy.entitled(snapshot, caller, self._clock.now())
        if not idents:
            raise GRPCError(
                Status.PERMISSION_DENIED,
                f"no identity issued for {caller.describe()}; {caller.hint()}",
            )
        return idents

    async def fetch_x509_svid(
        self, stream: Stream[pb.X509SVIDRequest, pb.X509SVIDResponse]
    ) -> None:
        async with self.tracker.call():
            check_header(stream)
            caller = await identify(stream, "workload_api")
            await stream.recv_message()
            sent: tuple[object, ...] | None = None
            try:
                async with self.tracker.updates() as updates:
                    async for snapshot in updates:
                        idents = self._entitled(snapshot, caller)
                        assert snapshot.bundle is not None  # entitled() needs one
                        mark = (tuple(i.svid.serial for i in idents), snapshot.bundle.der())
                        if mark == sent:
                            continue
                        await stream.send_message(svid_response(idents, snapshot.bundle))
                        log.log(
                            logging.INFO if sent is None else logging.DEBUG,
                            "X509-SVIDs sent",
                            extra={
                                "caller": caller.describe(),
                                "spiffe_ids": [str(i.svid.spiffe_id) for i in idents],
                                "serials": list(mark[0]),
                                "bundle_version": snapshot.bundle.version,
                            },
                        )
                        sent = mark
            except GRPCError as exc:
                _log_refusal(exc, "FetchX509SVID", caller)
                raise

    async def fetch_x509_bundles(
        self, stream: Stream[pb.X509BundlesRequest, pb.X509BundlesResponse]
    ) -> None:
        async with self.tracker.call():
            check_header(stream)
            caller = await identify(stream, "workload_api")
            await stream.recv_message()
            sent: bytes | None = None
            try:
                async with self.tracker.updates() as updates:
                    async for snapshot in updates:
                        self._entitled(snapshot, caller)
                        assert snapshot.bundle is not None
                        roots = snapshot.bundle.der()
                        if roots == sent:
                            continue
                        await stream.send_message(bundles_response(snapshot.bundle))
                        sent = roots
            except GRPCError as exc:
                _log_refusal(exc, "FetchX509Bundles", caller)
                raise

    async def jwt(self, stream: Stream[Any, Any]) -> None:
        async with self.tracker.call():
            check_header(stream)
            raise GRPCError(Status.UNIMPLEMENTED, JWT_UNSUPPORTED)


def _log_refusal(exc: GRPCError, method: str, caller: Caller) -> None:
    if exc.status is Status.PERMISSION_DENIED:
        log.warning(
            "Workload API call refused: %s",
            exc.message,
            extra={"method": method, "caller": caller.describe()},
        )
