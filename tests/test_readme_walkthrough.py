"""The README's and the runbook's grpcurl examples, run as written against `make run` with the
sandbox: the shell blocks marked `<!-- walkthrough -->` are taken from the documents and run in
order in one shell, so the documents and the API cannot drift apart."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from herald_common.settings import DEFAULT_PORTS, Settings
from herald_sandbox.sandbox import journal_path
from tests.harness import fresh_settings

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", ROOT / "docs" / "operations.md"]
MARK = "<!-- walkthrough -->"
PLATFORM_START_SECONDS = 120
# Between the README and the runbook: the runbook's recipes name the resources they act on with
# variables (its text says so); these give them the README walkthrough's resources.
RUNBOOK_NAMES = """
FIRST_RUN='
import json, sys
print(json.load(sys.stdin)["runs"][0]["name"])'
KEY_NAMED_CI='
import json, sys
print(next(k["name"] for k in json.load(sys.stdin)["apiKeys"] if k["displayName"] == "CI"))'
CAMPAIGN="$WEEKLY"
RUN=$(grpcurl -plaintext -H "$AUTH" -d "{\\"parent\\":\\"$WEEKLY\\"}" 127.0.0.1:50053 \\
  herald.scheduler.v1.SchedulerService/ListRuns | python3 -c "$FIRST_RUN")
USER_ID=u1
DESTINATION="$TWILIO"
NEW_TOKEN=sandbox-auth-token
KEY=$(grpcurl -plaintext -H "$AUTH" -d '{}' 127.0.0.1:50051 herald.accounts.v1.AccountService/ListApiKeys \\
  | python3 -c "$KEY_NAMED_CI")
"""


def walkthrough_blocks(document: Path) -> list[str]:
    """The shell blocks marked as the walkthrough, in order."""
    text = document.read_text()
    return re.findall(re.escape(MARK) + r"\n```sh\n(.*?)\n```", text, flags=re.S)


def _script(workdir: Path) -> str:
    readme, runbook = (("\n".join(walkthrough_blocks(d))) for d in DOCUMENTS)
    preamble = f"""set -euo pipefail
export PATH="{ROOT / ".tools" / "bin"}:$PATH"
# `make` targets of the repository, from the walkthrough's own folder (its .data is the platform's).
make() {{ command make --no-print-directory -C "{ROOT}" "$@"; }}
cd "{workdir}"
"""
    return preamble + readme + "\n" + RUNBOOK_NAMES + runbook + "\n"


def test_every_document_has_walkthrough_blocks_with_grpcurl() -> None:
    for document in DOCUMENTS:
        blocks = walkthrough_blocks(document)
        assert len(blocks) >= 8, document
        assert sum("grpcurl" in b for b in blocks) >= 8, document


async def _serving(log: Path, process: asyncio.subprocess.Process) -> None:
    """Reads make run's output as it goes until it says the platform is up."""
    deadline = time.monotonic() + PLATFORM_START_SECONDS
    while "Herald is running" not in (text := await asyncio.to_thread(log.read_text, errors="replace")):
        if process.returncode is not None or time.monotonic() > deadline:
            raise AssertionError("make run did not start:\n" + text[-4000:])
        await asyncio.sleep(0.5)


@pytest.mark.timeout(600)
async def test_the_readme_and_runbook_examples_run_against_make_run_with_the_sandbox(
    servers: tuple[str, str], tmp_path: Path
) -> None:
    # A database and namespace of its own: `make run` makes its own keys, as on a new machine.
    async with fresh_settings(*servers) as settings:
        await _walk_through(settings, tmp_path)


async def _walk_through(settings: Settings, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    workdir = tmp_path / "walkthrough"
    workdir.mkdir()
    (workdir / ".data").symlink_to(data_dir)  # the documents read `.data/dev-admin-key`
    env = {
        **os.environ,
        "HERALD_SANDBOX": "1",
        "HERALD_DATA_DIR": str(data_dir),
        "DATABASE_URL": settings.database_url,
        "NATS_URL": settings.nats_url,
        "HERALD_NAMESPACE": settings.namespace,
        "LOG_LEVEL": "warning",
    }
    log = tmp_path / "make-run.log"
    with log.open("wb") as output:
        # The README's command, as a reader runs it (the documents use its default ports).
        platform = await asyncio.create_subprocess_exec(
            "make",
            "--no-print-directory",
            "-C",
            str(ROOT),
            "run",
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        await _serving(log, platform)
        script = tmp_path / "walkthrough.sh"
        script.write_text(_script(workdir))
        ran = await asyncio.to_thread(
            subprocess.run,
            ["bash", str(script)],
            env={**env, "HERALD_DATA_DIR": str(data_dir)},
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert ran.returncode == 0, (
            f"{ran.stdout[-3000:]}\n--- stderr ---\n{ran.stderr[-3000:]}\n--- make run ---\n"
            + log.read_text(errors="replace")[-3000:]
        )
        # The Segment export reached the sandbox's Segment, as the README says it will.
        journal = [json.loads(line) for line in journal_path(data_dir).read_text().splitlines()]
        exported = [
            event
            for entry in journal
            if entry["destination"] == "segment" and entry["path"] == "/v1/batch"
            for event in entry["body"]["batch"]
        ]
        assert {"u1"} <= {e["userId"] for e in exported if e["event"] == "Herald Export"}
        assert all(e["properties"]["coupon"] == "VIP20" for e in exported if e["event"] == "Herald Export")
        assert "segment   POST /v1/batch  -> 200" in ran.stdout  # make sandbox-log, as the README runs it
    finally:
        os.killpg(platform.pid, signal.SIGTERM)  # make run stops the services, then its servers
        try:
            await asyncio.wait_for(platform.wait(), 60)
        except TimeoutError:
            os.killpg(platform.pid, signal.SIGKILL)
            await platform.wait()


def test_the_walkthrough_uses_the_default_ports() -> None:
    """The documents call the services where `make run` puts them."""
    text = "\n".join("\n".join(walkthrough_blocks(d)) for d in DOCUMENTS)
    used = {int(port) for port in re.findall(r"127\.0\.0\.1:(\d{4,5}) herald\.", text)}
    assert used <= set(DEFAULT_PORTS.values())
