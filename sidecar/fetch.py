"""`meshtls-sidecar fetch`: write one identity's files once, then exit (init containers,
cron jobs, hosts that run no sidecar).

    meshtls-sidecar fetch --config sidecar.yaml --spiffe-id spiffe://td/svc/web --out DIR

writes DIR/svid.pem (leaf + intermediates), DIR/svid_key.pem (0600) and DIR/bundle.pem,
each atomically, with the files writer of `run` (sidecar/files.py).

Where the certificate comes from: the state directory first, the CA only when needed.
1. The state directory (`state_dir` of the config) is loaded as `run` loads it. If it holds
   the identity and it is not yet due for renewal, that is written: no CA call, so a fetch
   works while the CA is down and never disturbs a sidecar running on the same state.
2. Otherwise one lifecycle cycle runs against the CA, exactly as `run` would do it: enroll
   with the join token if there is no node certificate, renew the node certificate if due,
   list the entries and sign every identity that is due. The result is persisted to the
   state directory (so the next fetch, or a later `run`, reuses it) and then written.
3. If the CA cannot be reached or refuses, a held certificate that has not expired is still
   written, with a warning; with none, the command fails (exit 1) with the CA's message.

"Due" here is the latest renewal point a running sidecar with this config could pick
(renewal.fraction + renewal.jitter of the lifetime): a fetch next to a healthy running
sidecar therefore always finds that sidecar's fresh certificate and never renews on its
own, which would make the CA supersede the running sidecar's node certificate.
Revocations are not known offline: a certificate revoked while no sidecar ran is written
until it is due for renewal.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from meshtls.clock import Clock, SystemClock, utc
from meshtls.identity.ids import InvalidSpiffeId, SpiffeId
from meshtls.logs import configure as configure_logging
from sidecar.config import FileSink, SidecarConfig, load_config
from sidecar.errors import CAError, SidecarError
from sidecar.files import FileWriter
from sidecar.identity.ca_client import CAClient
from sidecar.identity.manager import IdentityManager
from sidecar.identity.model import Snapshot, WorkloadIdentity
from sidecar.identity.state import StateStore

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS = 60.0


class FetchError(SidecarError):
    """The identity could not be obtained or written; the message says what to do."""


@dataclass(frozen=True)
class Fetched:
    spiffe_id: SpiffeId
    serial: str
    not_after: float
    source: str  # "state", "ca" or "state (CA failed: ...)"
    out: Path


def _conservative(config: SidecarConfig) -> SidecarConfig:
    """The config with renewal at the latest point a running sidecar could choose."""
    r = config.renewal
    latest = min(0.95, r.fraction + r.jitter)
    return replace(config, renewal=replace(r, fraction=latest, jitter=0.0))


def _find(snapshot: Snapshot, spiffe_id: SpiffeId, now: float) -> WorkloadIdentity | None:
    ident = snapshot.by_spiffe_id(spiffe_id)
    if ident is None or ident.svid.expired(now) or snapshot.bundle is None:
        return None
    return ident


def _stored_snapshot(store: StateStore, now: float) -> Snapshot:
    """What the state directory holds now (after a cycle persisted its results)."""
    state = store.load(now)
    identities = {
        entry_id: WorkloadIdentity(entry, stored.svid, stored.issued_at, stored.issued_at)
        for entry_id, (entry, stored) in state.identities.items()
    }
    return Snapshot.build(1, None, state.bundle, identities)


async def fetch_identity(
    config: SidecarConfig, spiffe_id: SpiffeId, out: Path, *, clock: Clock | None = None
) -> Fetched:
    """Obtain `spiffe_id` (state first, then the CA) and write its files into `out`."""
    clock = clock or SystemClock()
    if not spiffe_id.member_of(config.trust_domain):
        raise FetchError(f"{spiffe_id} is not in this sidecar's trust domain {config.trust_domain}")
    client = CAClient(config.ca)
    store = StateStore(config.state_dir, config.trust_domain, config.node)
    manager = IdentityManager(_conservative(config), clock=clock, client=client, store=store)
    try:
        await manager.start()
        now = clock.now()
        held = _find(manager.snapshot(), spiffe_id, now)
        if held is not None and now < held.renew_at:
            return await _write(held, manager.snapshot(), out, "state")
        try:
            await manager.cycle()
        except CAError as exc:
            if held is None:
                raise FetchError(f"cannot obtain {spiffe_id} from the CA: {exc}") from None
            log.warning(
                "the CA failed; writing the held certificate, which is due for renewal",
                extra={"error": str(exc), "not_after": utc(held.svid.not_after).isoformat()},
            )
            return await _write(held, manager.snapshot(), out, f"state (CA failed: {exc})")
        snapshot = _stored_snapshot(store, clock.now())
        fresh = _find(snapshot, spiffe_id, clock.now())
        if fresh is None:
            raise FetchError(_missing(config, spiffe_id, manager, store))
        return await _write(fresh, snapshot, out, "ca")
    finally:
        await client.close()


def _missing(
    config: SidecarConfig, spiffe_id: SpiffeId, manager: IdentityManager, store: StateStore
) -> str:
    entries = manager.entries() or ()
    if not any(e.spiffe_id == spiffe_id for e in entries):
        return (
            f"the CA has no registration entry for {spiffe_id} on node {config.node}; create "
            f"one with `meshtls-ca entry create --spiffe-id {spiffe_id} --node {config.node}`"
        )
    if manager.persist_failures:
        return f"{spiffe_id} was signed but could not be saved in {store.directory}; see the log"
    return f"the CA did not sign {spiffe_id}; see the log above"


async def _write(ident: WorkloadIdentity, snapshot: Snapshot, out: Path, source: str) -> Fetched:
    sink = FileSink(ident.entry.spiffe_id, out, (), 30.0)
    writer = FileWriter((sink,))
    await writer.apply(snapshot)
    if writer.failures:
        raise FetchError(f"cannot write the identity files into {out}; see the error above")
    return Fetched(ident.entry.spiffe_id, ident.svid.serial, ident.svid.not_after, source, out)


# -- command line ------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    fetch = sub.add_parser(
        "fetch", help="write one identity's files once and exit (init containers, cron)"
    )
    fetch.add_argument("--config", required=True, type=Path, help="YAML config file")
    fetch.add_argument("--spiffe-id", required=True, help="the identity to write")
    fetch.add_argument("--out", required=True, type=Path, help="directory for the files")
    fetch.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_SECONDS, help="seconds (default 60)"
    )
    fetch.add_argument("--log-format", choices=["text", "json"], default="text")
    fetch.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], default="warning"
    )


def command(args: argparse.Namespace) -> int:
    """Run `fetch`; 0 written, 1 not obtained (message on stderr). Usage errors raise."""
    config = load_config(args.config)
    try:
        spiffe_id = SpiffeId.parse(args.spiffe_id)
    except InvalidSpiffeId as exc:
        raise SidecarError(f"--spiffe-id: {exc}") from None
    configure_logging(args.log_format, args.log_level)
    try:
        done = asyncio.run(_bounded(config, spiffe_id, args.out.resolve(), args.timeout))
    except FetchError as exc:
        print(f"meshtls-sidecar fetch: {exc}", file=sys.stderr)
        return 1
    print(
        f"wrote {done.spiffe_id} (serial {done.serial}, expires "
        f"{utc(done.not_after).isoformat(timespec='seconds')}) to {done.out} from {done.source}"
    )
    return 0


async def _bounded(
    config: SidecarConfig, spiffe_id: SpiffeId, out: Path, limit_seconds: float
) -> Fetched:
    try:
        async with asyncio.timeout(limit_seconds):
            return await fetch_identity(config, spiffe_id, out)
    except TimeoutError:
        raise FetchError(
            f"gave up after {limit_seconds:g}s; is the CA at {config.ca.address} reachable?"
        ) from None
