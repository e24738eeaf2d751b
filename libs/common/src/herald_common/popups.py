"""Web Exit Intent pop-ups: their content's shape, the variant a visitor gets, and the pop-up as
the web SDK receives it. The campaign service checks and previews with it; dispatch renders with it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from herald.campaign.v1 import campaign_service_pb2 as pb
from herald_common import personalization
from herald_common.errors import Validator

MAX_TITLE = 200
MAX_BODY = 2_000
MAX_BUTTON = 100
MAX_URL = 2_000
MAX_VARIANTS = 20
MAX_VALUE = 200
MAX_FUNCTION = 100
# What `herald.registerAction` accepts: a JavaScript identifier (ASCII).
_IDENTIFIER = re.compile(r"[A-Za-z_$][A-Za-z0-9_$]*")


def _url(value: str, schemes: tuple[str, ...]) -> bool:
    scheme, sep, rest = value.partition("://")
    return (
        bool(sep)
        and scheme.lower() in schemes
        and bool(rest)
        and not rest.startswith("/")
        and len(value) <= MAX_URL
        and value.isprintable()
        and " " not in value
    )


def _check_template(text: str, path: str, check: Validator) -> None:
    problem = personalization.problem(text)
    if problem:
        check.add(path, problem)


def _check_message(message: pb.PopupMessage, path: str, check: Validator) -> None:
    if check.require(len(message.title.strip()) > 0, f"{path}.title", "required"):
        check.require(len(message.title) <= MAX_TITLE, f"{path}.title", f"at most {MAX_TITLE} characters")
        _check_template(message.title, f"{path}.title", check)
    check.require(len(message.body) <= MAX_BODY, f"{path}.body", f"at most {MAX_BODY:,} characters")
    _check_template(message.body, f"{path}.body", check)
    if message.image_url:
        check.require(
            _url(message.image_url, ("https",)),
            f"{path}.image_url",
            f"an https URL of at most {MAX_URL:,} characters",
        )
    if not message.HasField("button"):
        return
    button = message.button
    here = f"{path}.button"
    if check.require(len(button.text.strip()) > 0, f"{here}.text", "required with a button"):
        check.require(len(button.text) <= MAX_BUTTON, f"{here}.text", f"at most {MAX_BUTTON} characters")
        _check_template(button.text, f"{here}.text", check)
    action = button.WhichOneof("action")
    if action == "open_link":
        check.require(
            _url(button.open_link.url, ("http", "https")),
            f"{here}.open_link.url",
            f"required: an http or https URL of at most {MAX_URL:,} characters",
        )
    elif action == "call_function":
        name = button.call_function
        check.require(
            len(name) <= MAX_FUNCTION and _IDENTIFIER.fullmatch(name) is not None,
            f"{here}.call_function",
            f"required: a JavaScript identifier (letters, digits, _ or $), at most {MAX_FUNCTION} long",
        )


def check_popup(content: pb.WebPopupContent, path: str, check: Validator) -> None:
    """A pop-up's messages, variants and frequency."""
    if check.require(content.HasField("message"), f"{path}.message", "required"):
        _check_message(content.message, f"{path}.message", check)
    check.require(
        content.frequency in pb.PopupFrequency.values(), f"{path}.frequency", "a PopupFrequency value"
    )
    variants = content.variants
    if not variants:
        check.require(not content.variant_property, f"{path}.variants", "required with variant_property")
        return
    check.require(len(variants) <= MAX_VARIANTS, f"{path}.variants", f"at most {MAX_VARIANTS} variants")
    check.require(
        0 < len(content.variant_property.strip()) <= 200,
        f"{path}.variant_property",
        "required with variants: 1-200 characters",
    )
    seen: set[str] = set()
    for i, variant in enumerate(variants[: MAX_VARIANTS + 1]):
        here = f"{path}.variants[{i}]"
        if check.require(
            0 < len(variant.value) <= MAX_VALUE, f"{here}.value", f"required: 1-{MAX_VALUE} characters"
        ):
            check.require(variant.value not in seen, f"{here}.value", f"{variant.value!r} is given twice")
            seen.add(variant.value)
        if check.require(variant.HasField("message"), f"{here}.message", "required"):
            _check_message(variant.message, f"{here}.message", check)


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "" if value is None else str(value)


def variant_for(content: pb.WebPopupContent, profile: Mapping[str, Any]) -> tuple[str, pb.PopupMessage]:
    """(variant value, message) for a visitor: the variant of their property's value, else the
    default ('' for it)."""
    if content.variant_property:
        value = _as_text(profile.get(content.variant_property))
        for variant in content.variants:
            if variant.value == value:
                return variant.value, variant.message
    return "", content.message


def rendered(message: pb.PopupMessage, profile: Mapping[str, Any]) -> dict[str, Any]:
    """The pop-up as the web SDK takes it, its texts rendered for the visitor's profile. The SDK
    shows every text as text."""

    def render(template: str) -> str:
        return personalization.render(template, profile)

    popup: dict[str, Any] = {"title": render(message.title), "body": render(message.body)}
    if message.image_url:
        popup["image_url"] = message.image_url
    if message.HasField("button"):
        button: dict[str, Any] = {"text": render(message.button.text), "action": "close"}
        action = message.button.WhichOneof("action")
        if action == "open_link":
            button.update(
                action="open_link", url=message.button.open_link.url, new_tab=message.button.open_link.new_tab
            )
        elif action == "call_function":
            button.update(action="call_function", function=message.button.call_function)
        popup["button"] = button
    return popup
