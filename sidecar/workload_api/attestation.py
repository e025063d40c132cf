"""Workload attestation: which of the node's identities a local caller may receive.

A caller is described by selectors derived from its kernel peer credentials:

    unix:uid:<uid>      unix:gid:<gid>      (always)
    unix:user:<name>    unix:group:<name>   (when this host's user/group database names them)

`gid` is the caller's effective primary group at connect() time; supplementary groups are
not considered (the kernel does not report them with the connection, and reading them from
/proc later could name another process after a pid reuse).

A registration entry matches a caller when *every* one of its selectors is among the
caller's: `unix:uid:1000` + `unix:gid:50` means uid 1000 running with gid 50. An entry with
a selector of another kind (e.g. `k8s:ns:web`) never matches a Unix caller. An entry with
no selectors matches nobody unless `allow_entries_without_selectors` is set, in which case
it matches every local caller. The node's own identity is never handed out.

Among the matches, identities that have expired (by the sidecar's clock) or whose serial
has been revoked are left out; several entries with one SPIFFE ID give the freshest
certificate once. The result is ordered by SPIFFE ID, so "the default" identity (the first)
is the same on every call and on both APIs.
"""

from __future__ import annotations

import contextlib
import grp
import pwd
from dataclasses import dataclass

from sidecar.identity.model import Entry, Snapshot, WorkloadIdentity
from sidecar.workload_api.unixgrpc import PeerCredentials


@dataclass(frozen=True)
class Caller:
    credentials: PeerCredentials
    selectors: frozenset[str]

    def describe(self) -> str:
        c = self.credentials
        return f"pid {c.pid} (uid {c.uid}, gid {c.gid})"

    def hint(self) -> str:
        """What an operator registers to give this caller an identity."""
        c = self.credentials
        return (
            "register one with `meshtls-ca entry create --spiffe-id ... --node ... "
            f"--selector unix:uid:{c.uid}` (or unix:gid:{c.gid}, unix:user:NAME)"
        )


def attest(credentials: PeerCredentials) -> Caller:
    """The selectors of a caller. Looks up user and group names (may read /etc/passwd)."""
    selectors = {f"unix:uid:{credentials.uid}", f"unix:gid:{credentials.gid}"}
    # A uid (gid) without a name can only be matched by its unix:uid (unix:gid) selector.
    with contextlib.suppress(KeyError):
        selectors.add(f"unix:user:{pwd.getpwuid(credentials.uid).pw_name}")
    with contextlib.suppress(KeyError):
        selectors.add(f"unix:group:{grp.getgrgid(credentials.gid).gr_name}")
    return Caller(credentials, frozenset(selectors))


@dataclass(frozen=True)
class Policy:
    allow_entries_without_selectors: bool = False

    def matches(self, entry: Entry, caller: Caller) -> bool:
        if not entry.selectors:
            return self.allow_entries_without_selectors
        return all(s in caller.selectors for s in entry.selectors)

    def entitled(
        self, snapshot: Snapshot, caller: Caller, now: float
    ) -> tuple[WorkloadIdentity, ...]:
        """The identities `caller` receives from `snapshot`, default first; may be empty."""
        if snapshot.bundle is None:
            return ()
        best: dict[str, WorkloadIdentity] = {}
        for ident in snapshot.identities.values():
            if not self.matches(ident.entry, caller):
                continue
            if ident.svid.expired(now) or ident.svid.serial in snapshot.revoked:
                continue
            key = str(ident.svid.spiffe_id)
            held = best.get(key)
            if held is None or ident.svid.not_after > held.svid.not_after:
                best[key] = ident
        return tuple(best[k] for k in sorted(best))
