"""Runtime settings, read once from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from herald_common.bus import (
    EVENT_RETENTION_SECONDS,
    EVENT_STREAM_MAX_BYTES,
    JOB_STREAM_MAX_BYTES,
    StreamLimits,
)

DEFAULT_PORTS = {"campaign": 50051, "segmentation": 50052, "scheduler": 50053, "dispatch": 50054}
# Each service's Prometheus metrics (HTTP, `/metrics`).
DEFAULT_METRICS_PORTS = {"campaign": 9101, "segmentation": 9102, "scheduler": 9103, "dispatch": 9104}


def _port_env(service: str) -> str:
    return f"HERALD_{service.upper()}_PORT"


def _addr_env(service: str) -> str:
    return f"HERALD_{service.upper()}_ADDR"


def service_ports(env: Mapping[str, str]) -> dict[str, int]:
    """Each service's port: HERALD_<SERVICE>_PORT, or its default."""
    return {service: int(env.get(_port_env(service), port)) for service, port in DEFAULT_PORTS.items()}


@dataclass(frozen=True)
class Settings:
    """Everything a service needs to know about its surroundings."""

    database_url: str
    nats_url: str
    # Prefix of every NATS subject and stream, so several installations can share one NATS.
    namespace: str = "herald"
    host: str = "127.0.0.1"
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    # Where each service is reached by the others (host:port).
    addresses: dict[str, str] = field(default_factory=dict)
    # Where each service serves its Prometheus metrics, on `host` (0: a free port, logged at start).
    metrics_ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_METRICS_PORTS))
    log_level: str = "info"
    # How long a stopping service lets handlers finish (dispatch workers: the requests they made).
    shutdown_grace_seconds: float = 25.0
    # A message that keeps failing is retried with delays doubling from this base, then
    # dead-lettered after max_deliveries attempts.
    max_deliveries: int = 10
    redelivery_base_seconds: float = 2.0
    # How long JetStream waits for an ack before handing a message to another consumer instance
    # (a message fetched by an instance that stopped is redelivered after this).
    ack_wait_seconds: float = 30.0
    # Destinations may not point at private, loopback or link-local addresses, nor use plain http,
    # except inside these networks (CIDRs) an operator allows; `make run` and the tests allow
    # loopback.
    allowed_destination_networks: tuple[str, ...] = ()
    # A scheduler replica holds a run it plans for this long past its last progress; a run whose
    # owner died is taken over once its lease runs out.
    run_lease_seconds: float = 60.0
    # Key-encryption keys for credentials at rest (`id:base64key,...`, the first one seals).
    secret_keys: str = field(default="", repr=False)
    # Shared by our services to call each other; and the operator's token for creating accounts.
    service_token: str = field(default="", repr=False)
    # Per-account limits where an account has none of its own.
    account_requests_per_second: float = 200.0
    account_max_batch_size: int = 1000
    publishable_requests_per_second: float = 50.0
    bootstrap_token: str = field(default="", repr=False)
    # Dispatch serves providers' delivery receipts over HTTP on this port (0: not served), and
    # tells providers to call it at this public base URL (empty: http://host:port).
    receipts_port: int = 0
    receipts_url: str = ""
    # Dispatch's web pop-up worker serves the web SDK's API on this port (0: not served), and
    # lets each publishable key make this many requests a second.
    web_port: int = 0
    web_requests_per_second: float = 1000.0
    # JetStream streams: servers each is replicated on (3 on a cluster), how long events are kept
    # and how much each stream holds (a full stream refuses new events, which wait in the outbox).
    stream_replicas: int = 1
    stream_max_age_seconds: float = EVENT_RETENTION_SECONDS
    stream_max_bytes: int = EVENT_STREAM_MAX_BYTES
    job_stream_max_bytes: int = JOB_STREAM_MAX_BYTES
    # How long an SMS provider has to answer a message once it is written; past it the message is
    # UNKNOWN (perhaps sent), never sent again.
    sms_answer_timeout_seconds: float = 15.0
    # How long an unanswered message waits before the provider (Twilio) is asked whether it made it.
    sms_settle_seconds: float = 120.0
    # Delivery batches a dispatch worker holds at once, across its destinations (each holds at
    # most twice its lane's concurrency): batches are tens of KB, so many destinations fit.
    dispatch_max_in_flight: int = 256

    def port(self, service: str) -> int:
        return self.ports[service]

    @property
    def stream_limits(self) -> StreamLimits:
        return StreamLimits(
            self.stream_replicas,
            self.stream_max_age_seconds,
            self.stream_max_bytes,
            self.job_stream_max_bytes,
        )

    def address(self, service: str) -> str:
        return self.addresses.get(service) or f"127.0.0.1:{self.ports[service]}"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        database_url = env.get("DATABASE_URL", "")
        nats_url = env.get("NATS_URL", "")
        if not database_url or not nats_url:
            raise RuntimeError(
                "DATABASE_URL and NATS_URL must be set; `make run` starts embedded servers "
                "and sets them when they are missing"
            )
        ports = service_ports(env)
        addresses = {s: env[_addr_env(s)] for s in DEFAULT_PORTS if env.get(_addr_env(s))}
        metrics_ports = {
            s: int(env.get(f"HERALD_{s.upper()}_METRICS_PORT", port))
            for s, port in DEFAULT_METRICS_PORTS.items()
        }
        return cls(
            database_url=database_url,
            nats_url=nats_url,
            namespace=env.get("HERALD_NAMESPACE", "herald"),
            host=env.get("HERALD_HOST", "127.0.0.1"),
            ports=ports,
            addresses=addresses,
            metrics_ports=metrics_ports,
            log_level=env.get("LOG_LEVEL", "info"),
            shutdown_grace_seconds=float(env.get("HERALD_SHUTDOWN_GRACE_SECONDS", "25")),
            max_deliveries=int(env.get("HERALD_MAX_DELIVERIES", "10")),
            redelivery_base_seconds=float(env.get("HERALD_REDELIVERY_BASE_SECONDS", "2")),
            ack_wait_seconds=float(env.get("HERALD_ACK_WAIT_SECONDS", "30")),
            run_lease_seconds=float(env.get("HERALD_RUN_LEASE_SECONDS", "60")),
            secret_keys=env.get("HERALD_SECRET_KEYS", ""),
            service_token=env.get("HERALD_SERVICE_TOKEN", ""),
            account_requests_per_second=float(env.get("HERALD_ACCOUNT_REQUESTS_PER_SECOND", "200")),
            account_max_batch_size=int(env.get("HERALD_ACCOUNT_MAX_BATCH_SIZE", "1000")),
            publishable_requests_per_second=float(env.get("HERALD_PUBLISHABLE_REQUESTS_PER_SECOND", "50")),
            bootstrap_token=env.get("HERALD_BOOTSTRAP_TOKEN", ""),
            receipts_port=int(env.get("HERALD_RECEIPTS_PORT", "0")),
            receipts_url=env.get("HERALD_RECEIPTS_URL", ""),
            web_port=int(env.get("HERALD_WEB_PORT", "0")),
            web_requests_per_second=float(env.get("HERALD_WEB_REQUESTS_PER_SECOND", "1000")),
            sms_answer_timeout_seconds=float(env.get("HERALD_SMS_ANSWER_TIMEOUT_SECONDS", "15")),
            sms_settle_seconds=float(env.get("HERALD_SMS_SETTLE_SECONDS", "120")),
            dispatch_max_in_flight=int(env.get("HERALD_DISPATCH_MAX_IN_FLIGHT", "256")),
            stream_replicas=int(env.get("HERALD_STREAM_REPLICAS", "1")),
            stream_max_age_seconds=float(env.get("HERALD_STREAM_MAX_AGE_SECONDS", EVENT_RETENTION_SECONDS)),
            stream_max_bytes=int(env.get("HERALD_STREAM_MAX_BYTES", EVENT_STREAM_MAX_BYTES)),
            job_stream_max_bytes=int(env.get("HERALD_JOB_STREAM_MAX_BYTES", JOB_STREAM_MAX_BYTES)),
            allowed_destination_networks=tuple(
                n.strip() for n in env.get("HERALD_ALLOWED_DESTINATION_NETWORKS", "").split(",") if n.strip()
            ),
        )
