"""Who may connect: allow-lists of exact SPIFFE IDs or whole trust domains (`spiffe://td`).

The same type states which servers an outbound listener accepts (`expect`). Matching is
exact: no prefixes, no wildcards, so that an allow-list reads as what it permits.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshtls.identity.ids import SCHEME, InvalidSpiffeId, SpiffeId, validate_trust_domain


@dataclass(frozen=True)
class AllowList:
    """Exact SPIFFE IDs and whole trust domains; deny everything else."""

    ids: frozenset[SpiffeId]
    trust_domains: frozenset[str]

    @classmethod
    def parse(cls, entries: list[str] | tuple[str, ...]) -> AllowList:
        """Parse `spiffe://td/path` and `spiffe://td` entries; InvalidSpiffeId on a bad one."""
        ids: set[SpiffeId] = set()
        domains: set[str] = set()
        for entry in entries:
            rest = entry.removeprefix(SCHEME)
            if entry.startswith(SCHEME) and "/" not in rest:
                domains.add(validate_trust_domain(rest))
            else:
                ids.add(SpiffeId.parse(entry))
        return cls(frozenset(ids), frozenset(domains))

    def allows(self, spiffe_id: SpiffeId) -> bool:
        return spiffe_id in self.ids or spiffe_id.trust_domain in self.trust_domains

    @property
    def empty(self) -> bool:
        return not self.ids and not self.trust_domains

    def __str__(self) -> str:
        items = sorted(str(i) for i in self.ids) + sorted(SCHEME + d for d in self.trust_domains)
        return ", ".join(items) if items else "nobody"


__all__ = ["AllowList", "InvalidSpiffeId"]
