"""One error type per failure kind; the API maps each to one HTTP status in one place."""

from __future__ import annotations


class DomainError(Exception):
    """Base class of every error the domain raises on purpose."""


class IllegalTransition(DomainError):
    """A case was asked to move to a state its current state does not allow."""

    def __init__(self, current: str, target: str):
        super().__init__(f"a case in state {current!r} cannot move to {target!r}")
        self.current = current
        self.target = target


class StateConflict(DomainError):
    """An action does not fit the object's current state (HTTP 409)."""

    def __init__(self, message: str, current_state: str | None = None):
        super().__init__(message)
        self.current_state = current_state


class NotFound(DomainError):
    """The object does not exist in the caller's organization (HTTP 404)."""
