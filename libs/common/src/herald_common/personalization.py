"""Personalized message fields: Liquid templates over the recipient's profile.

A field such as `Hi {{ profile.first_name | default: "there" }}` is checked when the campaign
is saved, tells the scheduler which profile properties each recipient needs, and is rendered
per recipient by the destination worker.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

from liquid import BoundTemplate, Environment
from liquid.exceptions import LiquidError

PROFILE = "profile"
MAX_TEMPLATE_LENGTH = 4096

_environment = Environment()


@lru_cache(maxsize=1024)
def _compile(source: str) -> BoundTemplate:
    return _environment.from_string(source)


def problem(source: str) -> str | None:
    """Why `source` cannot be used as a personalized field, or None when it can."""
    if len(source) > MAX_TEMPLATE_LENGTH:
        return f"at most {MAX_TEMPLATE_LENGTH} characters"
    try:
        template = _compile(source)
    except LiquidError as error:
        return f"not a valid template: {error.message or error}"
    for segments in template.global_variable_segments():
        if segments[0] != PROFILE or len(segments) < 2 or not isinstance(segments[1], str):
            name = ".".join(str(s) for s in segments)
            return f"unknown variable {name!r}; use profile.<property>"
    return None


def profile_properties(sources: Iterable[str]) -> set[str]:
    """The profile properties the templates read."""
    needed: set[str] = set()
    for source in sources:
        for segments in _compile(source).global_variable_segments():
            if len(segments) >= 2 and segments[0] == PROFILE and isinstance(segments[1], str):
                needed.add(segments[1])
    return needed


def render(source: str, profile: Mapping[str, Any]) -> str:
    return _compile(source).render(**{PROFILE: dict(profile)})
