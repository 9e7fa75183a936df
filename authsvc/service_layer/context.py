"""Who is acting: an API token's organization and role, or a system process."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Actor:
    org_id: str
    role: str  # clinician|coordinator|billing|admin|system|payer
    token_id: str | None = None
    name: str | None = None
    request_id: str | None = None
    source_ip: str | None = None

    @property
    def label(self) -> str:
        """What the timeline shows: a role and a token id, never a person's details."""
        if self.token_id:
            return f"{self.role}:{self.token_id}"
        return self.role


def system(org_id: str, what: str = "system") -> Actor:
    return Actor(org_id=org_id, role=what)
