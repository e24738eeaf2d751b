"""Personalized message fields: Liquid templates over the recipient's profile.

A field such as `Hi {{ profile.first_name | default: "there" }}` is checked when the campaign
is saved, tells the scheduler which profile properties each recipient needs, and is rendered
per recipient by the destination worker.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from liquid import BoundTemplate, Environment
from liquid.exceptions import (
    ContextDepthError,
    LiquidError,
    LocalNamespaceLimitError,
    LoopIterationLimitError,
    OutputStreamLimitError,
)

PROFILE = "profile"
MAX_TEMPLATE_LENGTH = 4096
MAX_OUTPUT_CHARACTERS = 32 * 1024


class _BoundedEnvironment(Environment):
    """Templates come from users and render once per recipient: bound what one render may do."""

    loop_iteration_limit = 10_000
    output_stream_limit = MAX_OUTPUT_CHARACTERS
    context_depth_limit = 30
    local_namespace_limit = 64 * 1024


class PersonalizationError(Exception):
    """A template could not be rendered for one recipient (bad profile data, a limit reached)."""


_environment = _BoundedEnvironment()


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
    try:
        # A loop or output that exceeds the limits even for an empty profile never can render.
        template.render(**{PROFILE: {}})
    except (
        LoopIterationLimitError,
        OutputStreamLimitError,
        ContextDepthError,
        LocalNamespaceLimitError,
    ) as error:
        return f"exceeds a rendering limit: {error.message or error}"
    except Exception:  # other failures depend on the recipient's data; judged per recipient
        pass
    return None


def is_static(source: str) -> bool:
    """True when the field has no Liquid markup, so it is the same for every recipient."""
    return "{{" not in source and "{%" not in source


def profile_properties(sources: Iterable[str]) -> set[str]:
    """The profile properties the templates read."""
    needed: set[str] = set()
    for source in sources:
        for segments in _compile(source).global_variable_segments():
            if len(segments) >= 2 and segments[0] == PROFILE and isinstance(segments[1], str):
                needed.add(segments[1])
    return needed


# Most fields are literal text around `{{ profile.key }}` or `{{ profile.key | default: "text" }}`.
# Those render without the Liquid engine, which costs far more per recipient; a value the plain way
# would not render exactly as Liquid does (not a string or an integer) takes the engine's way.
_SIMPLE_OUTPUT = re.compile(
    r"""\{\{\s*profile\.([A-Za-z_][A-Za-z0-9_]*)\s*"""
    r"""(?:\|\s*default:\s*(?:"([^"\\]*)"|'([^'\\]*)')\s*)?\}\}"""
)
# Liquid answers these for a hash that lacks such a key.
_SPECIAL_PROPERTIES = {"size", "first", "last"}


@dataclass(frozen=True)
class _Output:
    key: str
    default: str | None


@lru_cache(maxsize=1024)
def _simple_parts(source: str) -> tuple[str | _Output, ...] | None:
    """The field as literal text and simple outputs, or None when it uses more of Liquid."""
    parts: list[str | _Output] = []
    position = 0
    for match in _SIMPLE_OUTPUT.finditer(source):
        parts.append(source[position : match.start()])
        default = match.group(2) if match.group(2) is not None else match.group(3)
        parts.append(_Output(match.group(1), default))
        position = match.end()
    parts.append(source[position:])
    if any(isinstance(p, str) and ("{{" in p or "{%" in p) for p in parts):
        return None
    return tuple(p for p in parts if p != "")


def _render_simple(parts: tuple[str | _Output, ...], profile: Mapping[str, Any]) -> str | None:
    rendered: list[str] = []
    for part in parts:
        if isinstance(part, str):
            rendered.append(part)
            continue
        value = profile.get(part.key)
        if value is None:
            if part.key in _SPECIAL_PROPERTIES and part.key not in profile:
                return None
            if part.default is not None:
                rendered.append(part.default)
        elif type(value) is str:
            rendered.append(part.default if value == "" and part.default is not None else value)
        elif type(value) is int:
            rendered.append(str(value))
        else:
            return None
    text = "".join(rendered)
    return text if len(text) <= MAX_OUTPUT_CHARACTERS else None


def render(source: str, profile: Mapping[str, Any]) -> str:
    """The field for one recipient; any failure (bad profile data, a limit) is a
    PersonalizationError with a short reason."""
    if is_static(source):
        return source
    parts = _simple_parts(source)
    if parts is not None:
        text = _render_simple(parts, profile)
        if text is not None:
            return text
    try:
        return _compile(source).render(**{PROFILE: profile})
    except LiquidError as error:
        raise PersonalizationError(str(error.message or error)[:200]) from None
    except Exception as error:  # filters raise plain Python errors on odd data (dates, base64)
        raise PersonalizationError(f"{type(error).__name__}: {error}"[:200]) from None
