"""SMS encoding, length and segments, as carriers count them (GSM 03.38 and UCS-2)."""

from __future__ import annotations

import pytest

from herald_common.sms import Encoding, measure

GSM, UCS = Encoding.GSM7, Encoding.UCS2
EMOJI = "\U0001f600"  # outside the BMP: a surrogate pair in UTF-16

CASES = [
    # (name, text, encoding, characters, units, segments)
    ("empty", "", GSM, 0, 0, 0),
    ("one character", "a", GSM, 1, 1, 1),
    ("160 plain fit one", "a" * 160, GSM, 160, 160, 1),
    ("161 plain need two", "a" * 161, GSM, 161, 161, 2),
    ("306 plain fill two", "a" * 306, GSM, 306, 306, 2),
    ("307 plain need three", "a" * 307, GSM, 307, 307, 3),
    ("accents of the basic table stay GSM", "Ñoño déjà vu, ¿Qué? Ça!", GSM, 23, 23, 1),
    ("ç is not GSM (only Ç is)", "Café à Besançon", UCS, 15, 15, 1),
    ("û is not GSM", "Ça coûte 5€ à Zürich", UCS, 20, 20, 1),
    ("euro is an extension", "€" * 80, GSM, 80, 160, 1),
    ("81 extensions spill", "€" * 81, GSM, 81, 162, 2),
    ("extension set", "\f^{}\\[~]|", GSM, 9, 18, 1),
    ("backtick is not GSM", "`", UCS, 1, 1, 1),
    ("an escape pair is never split", "a" * 152 + "{" + "a" * 152, GSM, 305, 306, 3),
    ("newline and CR are GSM", "line\r\nline", GSM, 10, 10, 1),
    ("greek capitals are GSM", "ΔΦΓΛΩΠΨΣΘΞ", GSM, 10, 10, 1),
    ("greek small letters are not", "αβγ", UCS, 3, 3, 1),
    ("one non-GSM character switches all", "a" * 100 + "ж", UCS, 101, 101, 2),
    ("70 UCS-2 fit one", "ж" * 70, UCS, 70, 70, 1),
    ("71 UCS-2 need two", "ж" * 71, UCS, 71, 71, 2),
    ("134 UCS-2 fill two", "ж" * 134, UCS, 134, 134, 2),
    ("135 UCS-2 need three", "ж" * 135, UCS, 135, 135, 3),
    ("35 emoji fill one", EMOJI * 35, UCS, 35, 70, 1),
    ("36 emoji need two", EMOJI * 36, UCS, 36, 72, 2),
    ("a surrogate pair is never split", "ж" * 66 + EMOJI + "ж" * 66, UCS, 133, 134, 3),
    ("hindi", "नमस्ते", UCS, 6, 6, 1),
    ("1600 plain", "a" * 1600, GSM, 1600, 1600, 11),
]


@pytest.mark.parametrize(
    ("text", "encoding", "characters", "units", "segments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_measure(text: str, encoding: Encoding, characters: int, units: int, segments: int) -> None:
    found = measure(text)
    assert (found.encoding, found.characters, found.units, found.segments) == (
        encoding,
        characters,
        units,
        segments,
    )
