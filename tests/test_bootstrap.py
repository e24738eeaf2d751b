"""The bootstrap token, which creates and deletes accounts, resists guessing: it must be long, is
compared in constant time, and an address that keeps guessing wrong is refused for a while."""

from __future__ import annotations

import dataclasses

import pytest

from herald_common.auth import Authenticator, FailedGuesses, KeyRegistry, Permission, Unauthenticated
from herald_common.errors import ResourceExhausted
from herald_common.runtime import StartupError
from herald_segmentation import main as segmentation_main
from tests.conftest import Platform

TOKEN = "b" * 40


def _bootstrap(token: str) -> dict[str, str]:
    return {"authorization": f"Bootstrap {token}"}


async def test_an_address_that_keeps_guessing_is_refused_even_the_right_token() -> None:
    authenticator = Authenticator(KeyRegistry(), "s" * 40, TOKEN)
    guesser, operator = "ipv4:203.0.113.9", "ipv4:10.0.0.7"
    for i in range(FailedGuesses.MAX_FAILURES):
        with pytest.raises(Unauthenticated):
            await authenticator.authenticate(_bootstrap(f"guess-{i}"), Permission.BOOTSTRAP, guesser)
    with pytest.raises(ResourceExhausted) as refused:
        await authenticator.authenticate(_bootstrap(TOKEN), Permission.BOOTSTRAP, guesser)
    assert refused.value.retry_after is not None and 0 < refused.value.retry_after <= 60
    # Another address is not held back by that one.
    caller = await authenticator.authenticate(_bootstrap(TOKEN), Permission.BOOTSTRAP, operator)
    assert caller.role == "BOOTSTRAP"


@pytest.mark.parametrize("setting", ["bootstrap_token", "service_token"])
async def test_a_short_token_stops_the_service_from_starting(platform: Platform, setting: str) -> None:
    too_short = "only-31-characters-long-token!!"
    if setting == "bootstrap_token":
        short = dataclasses.replace(platform.settings, bootstrap_token=too_short)
    else:
        short = dataclasses.replace(platform.settings, service_token=too_short)
    with pytest.raises(StartupError, match=f"HERALD_{setting.upper()} is too short"):
        await segmentation_main.start(short, port=0)
