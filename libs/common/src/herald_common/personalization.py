"""Personalized message fields: Liquid templates over the recipient's profile.

A field such as `Hi {{ profile.first_name | default: "there" }}` is checked when the campaign
is saved, tells the scheduler which profile properties each recipient needs, and is rendered
per recipient by the destination worker.

Templates and profiles come from key holders, so one render is bounded: the template's length,
every value a filter makes (checked before a filter that multiplies size runs, and after every
filter), loop iterations, nesting, the output, and the CPU time it may take. Tags that load other
templates (`include`, `render`) do not exist here.
"""

from __future__ import annotations

import asyncio
import functools
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from liquid import BoundTemplate, Environment
from liquid.exceptions import LiquidError, ResourceLimitError

PROFILE = "profile"
MAX_TEMPLATE_LENGTH = 4096
# The most characters any rendered field, or any value made while rendering it, may hold.
MAX_OUTPUT_CHARACTERS = 32 * 1024
# The most CPU time one render may take (a template over it is refused when saved; a profile that
# makes one render exceed it fails that delivery only).
RENDER_CPU_SECONDS = 0.05
# Tags that would load other templates: there are none to load, and each is a way to make work.
_REFUSED_TAGS = ("include", "render")


class BudgetExceeded(LiquidError):
    """A render went past one of the bounds above."""

    def __init__(self, message: str) -> None:
        super().__init__(message, token=None)


_DEADLINE: ContextVar[float] = ContextVar("render_deadline", default=math.inf)


def _text(value: object) -> str:
    return value if isinstance(value, str) else str(value)


def _replaced_size(value: object, old: object = "", new: object = "", *_: object) -> int:
    text, old_text, new_text = _text(value), _text(old), _text(new)
    matches = text.count(old_text) if old_text else len(text) + 1
    return len(text) + matches * max(0, len(new_text) - len(old_text))


def _replaced_once_size(value: object, old: object = "", new: object = "", *_: object) -> int:
    return len(_text(value)) + len(_text(new))


def _joined_size(value: object, separator: object = " ", *_: object) -> int:
    if not isinstance(value, (list, tuple)):
        return len(_text(value))
    if len(value) > MAX_OUTPUT_CHARACTERS:
        return len(value)
    return sum(len(_text(item)) for item in value) + len(value) * len(_text(separator))


def _concatenated_size(value: object, other: object = "", *_: object) -> int:
    return len(_text(value)) + len(_text(other))


# The size a filter would make, worked out before it runs, for filters whose result can be far
# larger than what they are given: a chain of them would otherwise build gigabytes midway.
_SIZE_BEFORE: dict[str, Callable[..., int]] = {
    "replace": _replaced_size,
    "replace_first": _replaced_once_size,
    "replace_last": _replaced_once_size,
    "join": _joined_size,
    "append": _concatenated_size,
    "prepend": _concatenated_size,
}


def _bounded(name: str, apply: Callable[..., object]) -> Callable[..., object]:
    size_before = _SIZE_BEFORE.get(name)

    @functools.wraps(apply)  # keeps the with_context / with_environment marks Liquid reads
    def bounded(value: object, *args: object, **kwargs: object) -> object:
        if time.thread_time() > _DEADLINE.get():
            raise BudgetExceeded(f"rendering takes longer than {RENDER_CPU_SECONDS * 1000:.0f} ms")
        if size_before is not None and size_before(value, *args) > MAX_OUTPUT_CHARACTERS:
            raise BudgetExceeded(f"{name} would make a value over {MAX_OUTPUT_CHARACTERS:,} characters")
        result = apply(value, *args, **kwargs)
        if isinstance(result, (str, list)) and len(result) > MAX_OUTPUT_CHARACTERS:
            raise BudgetExceeded(f"{name} made a value over {MAX_OUTPUT_CHARACTERS:,} characters")
        return result

    return bounded


class _BoundedEnvironment(Environment):
    """Templates come from users and render once per recipient: bound what one render may do."""

    loop_iteration_limit = 10_000
    output_stream_limit = MAX_OUTPUT_CHARACTERS
    context_depth_limit = 30
    local_namespace_limit = 64 * 1024

    def setup_tags_and_filters(self, *, extra: bool = False) -> None:
        super().setup_tags_and_filters(extra=extra)
        for tag in _REFUSED_TAGS:
            self.tags.pop(tag, None)
        self.filters = {name: _bounded(name, apply) for name, apply in self.filters.items()}


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
        # A template over a bound even for an empty profile never renders for anyone.
        _render_within_budget(template, {})
    except (ResourceLimitError, BudgetExceeded) as error:
        return f"exceeds a rendering limit: {error.message or error}"
    except Exception:  # other failures depend on the recipient's data; judged per recipient
        pass
    return None


def _render_within_budget(template: BoundTemplate, profile: Mapping[str, Any]) -> str:
    """Renders with a CPU-time deadline that the filters check (time on this thread only, so a
    render that waits for the interpreter lock or the processor is not charged for it)."""
    deadline = _DEADLINE.set(time.thread_time() + RENDER_CPU_SECONDS)
    try:
        return template.render(**{PROFILE: profile})
    finally:
        _DEADLINE.reset(deadline)


def needs_engine(source: str) -> bool:
    """True when rendering `source` takes the Liquid engine (not plain text and simple outputs):
    such renders are run off the event loop, a batch at a time."""
    return not is_static(source) and _simple_parts(source) is None


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
        return _render_within_budget(_compile(source), profile)
    except LiquidError as error:
        raise PersonalizationError(str(error.message or error)[:200]) from None
    except Exception as error:  # filters raise plain Python errors on odd data (dates, base64)
        raise PersonalizationError(f"{type(error).__name__}: {error}"[:200]) from None


async def render_off_loop(source: str, profile: Mapping[str, Any]) -> str:
    """`render`, in a worker thread when it takes the Liquid engine, so the event loop goes on."""
    if needs_engine(source):
        return await asyncio.to_thread(render, source, profile)
    return render(source, profile)
