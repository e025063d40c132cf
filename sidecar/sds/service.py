"""`envoy.service.secret.v3.SecretDiscoveryService`: StreamSecrets and FetchSecrets.

Who may use it: the caller (Envoy) is attested exactly like a Workload API caller, from
its kernel peer credentials (sidecar/workload_api/attestation.py). It receives only the
identities whose entry selectors match it; a caller matching none gets PERMISSION_DENIED,
and with it no trust bundle either (fail closed). So an Envoy running as uid 101 needs an
entry such as `--selector unix:uid:101`.

StreamSecrets follows the SotW handshake in `xds.py` and pushes a new response when a
rotation, a new bundle or a revocation changes what the stream's names resolve to.
DeltaSecrets is not offered (grpclib answers UNIMPLEMENTED): configure Envoy's SDS
`api_type: GRPC`, not DELTA_GRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2  # type: ignore[import-untyped]
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from meshtls.clock import Clock
from sidecar.identity.model import Snapshot
from sidecar.identity.publisher import Subscription
from sidecar.sds.resources import SECRET_TYPE_URL, Resolved, resolve
from sidecar.sds.xds import Kind, SotwStream
from sidecar.workload_api.attestation import Caller, Policy
from sidecar.workload_api.calls import CallTracker, SnapshotSource, identify

log = logging.getLogger(__name__)

SERVICE = "envoy.service.secret.v3.SecretDiscoveryService"


async def _next_snapshot(updates: Subscription) -> Snapshot | None:
    try:
        return await anext(updates)
    except StopAsyncIteration:
        return None


def _error_text(request: Any) -> str | None:
    if not request.HasField("error_detail"):
        return None
    detail = request.error_detail
    return str(detail.message) or f"code {detail.code}"


class SdsService:
    def __init__(self, source: SnapshotSource, policy: Policy, clock: Clock) -> None:
        self.tracker = CallTracker(source)
        self._policy = policy
        self._clock = clock

    def __mapping__(self) -> Mapping[str, Handler]:
        req, resp = discovery_pb2.DiscoveryRequest, discovery_pb2.DiscoveryResponse
        return {
            f"/{SERVICE}/StreamSecrets": Handler(
                self.stream_secrets, Cardinality.STREAM_STREAM, req, resp
            ),
            f"/{SERVICE}/FetchSecrets": Handler(
                self.fetch_secrets, Cardinality.UNARY_UNARY, req, resp
            ),
        }

    def _resolve(self, snapshot: Snapshot, caller: Caller, names: tuple[str, ...]) -> Resolved:
        idents = self._policy.entitled(snapshot, caller, self._clock.now())
        if not idents or snapshot.bundle is None:
            raise GRPCError(
                Status.PERMISSION_DENIED,
                f"no identity issued for {caller.describe()}; {caller.hint()}",
            )
        return resolve(names, idents, snapshot.bundle)

    @staticmethod
    def _check_type(request: Any) -> None:
        if request.type_url and request.type_url != SECRET_TYPE_URL:
            raise GRPCError(
                Status.INVALID_ARGUMENT,
                f"this is the SDS service; type_url must be {SECRET_TYPE_URL}, "
                f"got {request.type_url}",
            )

    async def fetch_secrets(self, stream: Stream[Any, Any]) -> None:
        async with self.tracker.call():
            caller = await identify(stream, "sds")
            request = await stream.recv_message()
            assert request is not None
            self._check_type(request)
            names = tuple(request.resource_names)
            async with self.tracker.updates() as updates:
                snapshot = await _next_snapshot(updates)
            assert snapshot is not None  # a subscription yields the current one at once
            resolved = self._resolve(snapshot, caller, names)
            _log_unavailable(caller, resolved)
            await stream.send_message(
                discovery_pb2.DiscoveryResponse(
                    version_info=resolved.version,
                    resources=resolved.packed(),
                    type_url=SECRET_TYPE_URL,
                    nonce="1",
                )
            )

    async def stream_secrets(self, stream: Stream[Any, Any]) -> None:
        async with self.tracker.call():
            caller = await identify(stream, "sds")
            try:
                async with self.tracker.updates() as updates:
                    await self._serve(stream, caller, updates)
            except GRPCError as exc:
                if exc.status is Status.PERMISSION_DENIED:
                    log.warning(
                        "SDS stream refused: %s", exc.message, extra={"caller": caller.describe()}
                    )
                raise

    async def _serve(self, stream: Stream[Any, Any], caller: Caller, updates: Subscription) -> None:
        state = SotwStream()
        snapshot = await _next_snapshot(updates)  # the current one, at once
        if snapshot is None:
            return
        next_request = asyncio.ensure_future(stream.recv_message())
        next_update = asyncio.ensure_future(_next_snapshot(updates))
        try:
            while True:
                done, _ = await asyncio.wait(
                    {next_request, next_update}, return_when=asyncio.FIRST_COMPLETED
                )
                forced = False
                if next_update in done:
                    update = next_update.result()
                    if update is None:
                        return  # shut down: updates() raises UNAVAILABLE
                    snapshot = update
                    next_update = asyncio.ensure_future(_next_snapshot(updates))
                if next_request in done:
                    request = next_request.result()
                    if request is None:
                        return  # Envoy closed its side
                    next_request = asyncio.ensure_future(stream.recv_message())
                    forced = self._on_request(state, request, caller)
                if state.names is not None:
                    await self._maybe_send(stream, state, snapshot, caller, forced=forced)
        finally:
            for pending in (next_request, next_update):
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending

    def _on_request(self, state: SotwStream, request: Any, caller: Caller) -> bool:
        self._check_type(request)
        error = _error_text(request)
        verdict = state.on_request(
            tuple(request.resource_names), request.version_info, request.response_nonce, error
        )
        extra = {
            "caller": caller.describe(),
            "names": list(request.resource_names),
            "version": request.version_info,
            "nonce": request.response_nonce,
            "envoy_node": request.node.id if request.HasField("node") else "",
        }
        if verdict.kind is Kind.NACK:
            log.warning("Envoy rejected SDS secrets: %s", error, extra=extra)
        elif verdict.kind is Kind.STALE:
            log.debug("stale SDS request ignored", extra=extra)
        elif verdict.kind is Kind.INITIAL:
            log.info("SDS stream opened", extra=extra)
        return verdict.respond

    async def _maybe_send(
        self,
        stream: Stream[Any, Any],
        state: SotwStream,
        snapshot: Snapshot,
        caller: Caller,
        *,
        forced: bool,
    ) -> None:
        assert state.names is not None
        resolved = self._resolve(snapshot, caller, state.names)
        version = resolved.version
        if not state.wants(version, forced=forced):
            return
        previous = state.sent_version
        nonce = state.sent(version)
        await stream.send_message(
            discovery_pb2.DiscoveryResponse(
                version_info=version,
                resources=resolved.packed(),
                type_url=SECRET_TYPE_URL,
                nonce=nonce,
            )
        )
        if version != previous:
            _log_unavailable(caller, resolved)
            log.info(
                "SDS secrets sent",
                extra={
                    "caller": caller.describe(),
                    "names": list(state.names),
                    "version": version,
                    "serials": list(resolved.serials),
                },
            )


def _log_unavailable(caller: Caller, resolved: Resolved) -> None:
    if resolved.unavailable:
        log.warning(
            "SDS resources not available to this caller (not a SPIFFE ID it is entitled to, "
            "nor default, ROOTCA, ALL or the trust domain)",
            extra={"caller": caller.describe(), "names": list(resolved.unavailable)},
        )
