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

from herald_common.embedded import EmbeddedInfrastructure, default_data_dir
from herald_common.logging import configure_logging, get_logger

SERVICES = ["segmentation", "dispatch", "campaign", "scheduler"]

log = get_logger(__name__)


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
