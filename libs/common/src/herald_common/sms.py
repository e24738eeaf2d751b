"""How an SMS body travels: its encoding (GSM-7 or UCS-2), length and segment count.

One SMS carries 140 octets: 160 GSM-7 characters or 70 UCS-2 code units. A longer message is
split into segments that each lose 6 octets to the concatenation header: 153 GSM-7 characters or
67 UCS-2 code units. A single character outside GSM-7 makes the whole message UCS-2. GSM-7's
extension characters take two septets (an escape and the character) and an emoji outside the
Basic Multilingual Plane takes two UTF-16 code units; neither pair is split across segments.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from herald.campaign.v1 import campaign_service_pb2 as campaign_pb
from herald_common import personalization
from herald_common.errors import Validator

# GSM 03.38 basic character set (the escape 0x1B aside).
GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
# Characters of the extension table: each costs an escape septet too.
GSM7_EXTENSION = frozenset("\f^{}\\[~]|€")
_GSM7 = GSM7_BASIC | GSM7_EXTENSION
MAX_BODY_CHARACTERS = 1600
# A phone number in E.164: +, a country code, at most 15 digits in all.
E164 = re.compile(r"^\+[1-9]\d{6,14}\Z")
DLT_ID_DIGITS = 19
_SINGLE = {"GSM-7": 160, "UCS-2": 70}
_PER_SEGMENT = {"GSM-7": 153, "UCS-2": 67}


class Encoding(enum.StrEnum):
    GSM7 = "GSM-7"
    UCS2 = "UCS-2"


@dataclass(frozen=True)
class Measure:
    encoding: Encoding
    characters: int  # Unicode characters, as a person counts them
    units: int  # septets (GSM-7) or UTF-16 code units (UCS-2)
    segments: int


def _cost(character: str, encoding: Encoding) -> int:
    if encoding is Encoding.GSM7:
        return 2 if character in GSM7_EXTENSION else 1
    return 2 if ord(character) > 0xFFFF else 1


def measure(text: str) -> Measure:
    """The encoding a body needs, its length in that encoding's units and its segment count."""
    # Counted over the distinct characters, not one by one: a provider's request measures each
    # message's body.
    characters = set(text)
    if characters <= _GSM7:
        encoding = Encoding.GSM7
        units = len(text) + sum(text.count(c) for c in characters & GSM7_EXTENSION)
    else:
        encoding = Encoding.UCS2
        units = len(text.encode("utf-16-le", "surrogatepass")) // 2
    if units <= _SINGLE[encoding]:
        return Measure(encoding, len(text), units, 1 if text else 0)
    costs = [_cost(c, encoding) for c in text]
    room = _PER_SEGMENT[encoding]
    segments, used = 1, 0
    for cost in costs:  # a two-unit character never straddles two segments
        if used + cost > room:
            segments, used = segments + 1, 0
        used += cost
    return Measure(encoding, len(text), units, segments)


def is_dlt_id(text: str) -> bool:
    """India DLT template and entity ids are 19 digits."""
    return len(text) == DLT_ID_DIGITS and text.isascii() and text.isdigit()


def body_problem(body: str) -> str | None:
    """Why an SMS body cannot be sent, or None."""
    if not body.strip():
        return "required"
    if len(body) > MAX_BODY_CHARACTERS:
        return f"at most {MAX_BODY_CHARACTERS:,} characters"
    return personalization.problem(body)


def check_sms_content(content: campaign_pb.SmsContent, path: str, check: Validator) -> None:
    """An SMS body that parses as a template, within the providers' length, and a DLT template id
    of the right shape."""
    problem = body_problem(content.body)
    if problem:
        check.add(f"{path}.body", problem)
    if content.dlt_template_id:
        check.require(is_dlt_id(content.dlt_template_id), f"{path}.dlt_template_id", "19 digits")
