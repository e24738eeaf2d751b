"""`make run`: the whole platform on one machine.

Starts embedded PostgreSQL and NATS when DATABASE_URL / NATS_URL are not set, then the four
services as child processes; Ctrl-C or SIGTERM stops the services first, then the servers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from herald_common.embedded import EmbeddedInfrastructure, default_data_dir
from herald_common.logging import configure_logging, get_logger
from herald_common.secret_box import new_key_setting

SERVICES = ["segmentation", "dispatch", "campaign", "scheduler"]

log = get_logger(__name__)


def local_secret_keys(data_dir: Path) -> str:
    """The key-encryption key of a local platform: made on first start, kept in the data folder."""
    path = data_dir / "secret-keys"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(new_key_setting("local"))
        log.info("secret_key_created", path=str(path))
    return path.read_text().strip()


def main() -> None:
    configure_logging(os.environ.get("LOG_LEVEL", "info"))
    env = dict(os.environ)
    embedded: EmbeddedInfrastructure | None = None
    if not env.get("DATABASE_URL") or not env.get("NATS_URL"):
        embedded = EmbeddedInfrastructure(default_data_dir())
        embedded.start()
        env = {**embedded.environment(), **{k: v for k, v in env.items() if v}}
    # Local fakes and sinks run on loopback; a deployment allows private networks explicitly.
    env.setdefault("HERALD_ALLOWED_DESTINATION_NETWORKS", "127.0.0.0/8,::1/128")
    if not env.get("HERALD_SECRET_KEYS"):
        env["HERALD_SECRET_KEYS"] = local_secret_keys(default_data_dir())
    children = [subprocess.Popen([sys.executable, "-m", f"herald_{name}.main"], env=env) for name in SERVICES]
    stopping = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        while not stopping:
            exited = [c for c in children if c.poll() is not None]
            if exited:
                log.error("service_exited", pid=exited[0].pid, code=exited[0].returncode)
                break
            time.sleep(0.2)
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
        if embedded is not None:
            embedded.stop()
        log.info("platform_stopped")
    if not stopping:
        sys.exit(1)


if __name__ == "__main__":
    main()
