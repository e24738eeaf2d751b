"""Domain errors. Raised by the domain layer; one interceptor turns them into gRPC status."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class DomainError(Exception):
    """Base of every error the API reports on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(DomainError):
    """The request is malformed; names every offending field."""

    def __init__(self, violations: Iterable[FieldViolation]) -> None:
        self.violations = list(violations)
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in self.violations))


class NotFound(DomainError):
    """A named resource does not exist. `field` names the request field that referred to it."""

    def __init__(self, resource_name: str, field: str = "name") -> None:
        self.resource_name = resource_name
        self.field = field
        super().__init__(f"{resource_name} not found")


class FailedPrecondition(DomainError):
    """The resource is not in a state that allows the request."""

    def __init__(self, subject: str, description: str, kind: str = "STATE") -> None:
        self.subject = subject
        self.kind = kind
        super().__init__(description)


class ResourceExhausted(DomainError):
    """A quota of the caller's account is used up; `retry_after` says when waiting helps."""

    def __init__(self, subject: str, description: str, retry_after: float | None = None) -> None:
        self.subject = subject
        self.retry_after = retry_after
        super().__init__(description)


class Unavailable(DomainError):
    """A dependency could not be reached; the caller may retry."""


class Validator:
    """Collects field violations so a request reports all its problems at once."""

    def __init__(self) -> None:
        self.violations: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.violations.append(FieldViolation(field, description))

    def require(self, condition: bool, field: str, description: str) -> bool:
        if not condition:
            self.add(field, description)
        return condition

    def raise_if_any(self) -> None:
        if self.violations:
            raise InvalidArgument(self.violations)


def invalid(field: str, description: str) -> InvalidArgument:
    return InvalidArgument([FieldViolation(field, description)])
