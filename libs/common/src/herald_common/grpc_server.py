"""The gRPC server every service runs: reflection, health, error mapping, request ids, shutdown."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, NamedTuple

import grpc
import structlog
from google.protobuf import any_pb2, descriptor_pool
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from opentelemetry.trace import SpanKind

from herald_common import deadlines, tracing
from herald_common.auth import (
    Authenticator,
    Permission,
    PermissionDenied,
    Unauthenticated,
    act_as,
    source_address,
)
from herald_common.errors import (
    DomainError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    invalid,
)
from herald_common.faults import is_transient
from herald_common.limits import (
    CHECKS_OWN_TEXT,
    GRPC_RECEIVE_BYTES,
    HEAVY_BYTES_AT_ONCE,
    HEAVY_METHODS,
    MAX_CONCURRENT_RPCS,
    request_limit,
)
from herald_common.logging import get_logger
from herald_common.metrics import Metrics
from herald_common.reflection import enable_reflection
from herald_common.validation import nul_fields

log = get_logger(__name__)

ERROR_DOMAIN = "herald.dev"


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


# A BadRequest names at most this many violations, each field path at most this long, all of
# them at most MAX_VIOLATION_CHARACTERS (the status message half that).
MAX_VIOLATIONS = 20
MAX_FIELD_CHARACTERS = 512
MAX_VIOLATION_CHARACTERS = 4000


def _clipped(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def status_for(error: DomainError) -> status_pb2.Status:
    """The google.rpc.Status a domain error is reported as, with machine-readable details."""
    if isinstance(error, InvalidArgument):
        # At most MAX_VIOLATIONS (fewer if they are long), then how many more: the status travels
        # in trailing metadata, which clients refuse past a few kilobytes.
        violations: list[error_details_pb2.BadRequest.FieldViolation] = []
        size = 0
        for v in error.violations[:MAX_VIOLATIONS]:
            shown = error_details_pb2.BadRequest.FieldViolation(
                field=_clipped(v.field, MAX_FIELD_CHARACTERS), description=_clipped(v.description, 300)
            )
            size += len(shown.field) + len(shown.description)
            if violations and size > MAX_VIOLATION_CHARACTERS:
                break
            violations.append(shown)
        more = len(error.violations) - len(violations)
        if more:
            violations.append(
                error_details_pb2.BadRequest.FieldViolation(
                    field="request", description=f"and {more:,} more problems not listed"
                )
            )
        message = "; ".join(f"{v.field}: {v.description}" for v in violations)
        return status_pb2.Status(
            code=code_pb2.INVALID_ARGUMENT,
            message=_clipped(message, MAX_VIOLATION_CHARACTERS // 2),
            details=[_pack(error_details_pb2.BadRequest(field_violations=violations))],
        )
    if isinstance(error, NotFound):
        resource_type, _, _ = error.resource_name.partition("/")
        info = error_details_pb2.ResourceInfo(resource_type=resource_type, resource_name=error.resource_name)
        violation = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=error.field, description=f"{error.resource_name} does not exist"
                )
            ]
        )
        return status_pb2.Status(
            code=code_pb2.NOT_FOUND, message=error.message, details=[_pack(info), _pack(violation)]
        )
    if isinstance(error, FailedPrecondition):
        precondition = error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(
                    type=error.kind, subject=error.subject, description=error.message
                )
            ]
        )
        return status_pb2.Status(
            code=code_pb2.FAILED_PRECONDITION, message=error.message, details=[_pack(precondition)]
        )
    if isinstance(error, Unavailable):
        return status_pb2.Status(code=code_pb2.UNAVAILABLE, message=error.message)
    if isinstance(error, ResourceExhausted):
        failure = error_details_pb2.QuotaFailure(
            violations=[
                error_details_pb2.QuotaFailure.Violation(subject=error.subject, description=error.message)
            ]
        )
        details = [_pack(failure)]
        if error.retry_after is not None:
            retry = error_details_pb2.RetryInfo()
            retry.retry_delay.FromMilliseconds(max(1, int(error.retry_after * 1000)))
            details.append(_pack(retry))
        return status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=error.message, details=details)
    if isinstance(error, Unauthenticated):
        return status_pb2.Status(code=code_pb2.UNAUTHENTICATED, message=error.message)
    if isinstance(error, PermissionDenied):
        return status_pb2.Status(code=code_pb2.PERMISSION_DENIED, message=error.message)
    info = error_details_pb2.ErrorInfo(reason="UNKNOWN_DOMAIN_ERROR", domain=ERROR_DOMAIN)
    return status_pb2.Status(code=code_pb2.INTERNAL, message=error.message, details=[_pack(info)])


def _metadata(details: Any) -> dict[str, str]:
    return {k: v for k, v in details.invocation_metadata or () if isinstance(v, str)}


def _bind_request(details: Any, context: Any) -> None:
    deadlines.serving(context.time_remaining())
    metadata = dict(details.invocation_metadata or ())
    request_id = metadata.get("x-request-id") or uuid.uuid4().hex
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id, rpc=details.method)


async def _abort(context: Any, error: DomainError) -> None:
    log.info("rpc_rejected", error=error.message, kind=type(error).__name__)
    status = rpc_status.to_status(status_for(error))
    await context.abort(status.code, status.details, trailing_metadata=status.trailing_metadata)


async def _internal(context: Any, error: Exception) -> None:
    if is_transient(error):  # the database or NATS is away for a moment: the caller may retry
        log.warning("rpc_unavailable", error=repr(error)[:300])
        await context.abort(grpc.StatusCode.UNAVAILABLE, "a dependency is unavailable; retry shortly")
    # A bug, not a bad request: keep the details in the log, not in the caller's hands.
    log.exception("rpc_failed")
    await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the service log")


class _Undecodable:
    """Stands for a request message whose bytes did not decode."""


_UNDECODABLE = _Undecodable()


def _tolerant(
    deserialize: Callable[[bytes], Any] | None, limit: int, check_text: bool = True
) -> Callable[[bytes], Any] | None:
    """The request decoder, answering _UNDECODABLE instead of raising: gRPC would report a
    decoding failure as UNKNOWN; the handler reports it as INVALID_ARGUMENT. A request over the
    method's size limit, or (with `check_text`) with a NUL in a string, is refused the same way,
    undecoded or unused."""
    if deserialize is None:
        return None

    def decode(data: bytes) -> _Arrived:
        if len(data) > limit:
            description = f"{len(data):,} bytes; this call takes at most {limit:,}"
            return _Arrived(InvalidArgument([FieldViolation("request", description)]), len(data))
        try:
            request = deserialize(data)
        except Exception:
            return _Arrived(_UNDECODABLE, len(data))
        # PostgreSQL stores no NUL: such a request is refused here, naming the fields, before any
        # work. Only a request with a zero byte somewhere can hold one, so most are not walked.
        if check_text and b"\x00" in data:
            fields = nul_fields(request)
            if fields:
                refused = (FieldViolation(f, "must not contain NUL characters") for f in fields)
                return _Arrived(InvalidArgument(refused), len(data))
        return _Arrived(request, len(data))

    return decode


class _Arrived(NamedTuple):
    """What the decoder made of a request (the message, or why it is refused), and its size in
    bytes as it came, by which heavy methods take turns."""

    request: Any
    size: int


def _decoded(arrived: _Arrived) -> Any:
    request = arrived.request
    if request is _UNDECODABLE:
        raise invalid("request", "not a valid protobuf message of the method's request type")
    if isinstance(request, InvalidArgument):
        raise request
    return request


async def _each_decoded(requests: AsyncIterator[_Arrived]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _decoded(request)


# Probes and grpcurl's discovery need no key.
_OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


class ByteTurns:
    """Work on at most `total` bytes of requests at once; the others wait, first come first
    served (a large request is not passed by a stream of small ones)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._waiting: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @contextlib.asynccontextmanager
    async def turn(self, size: int) -> AsyncIterator[None]:
        if size <= 0:
            yield
            return
        size = min(size, self.total)
        if self._waiting or self.free < size:
            waiter = asyncio.get_running_loop().create_future()
            self._waiting.append((size, waiter))
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._give_back(size)  # granted as it was cancelled
                else:
                    self._waiting.remove((size, waiter))
                    self._grant()  # a smaller one behind it may fit now
                raise
        else:
            self.free -= size
        try:
            yield
        finally:
            self._give_back(size)

    def _give_back(self, size: int) -> None:
        self.free += size
        self._grant()

    def _grant(self) -> None:
        while self._waiting and self._waiting[0][0] <= self.free:
            size, waiter = self._waiting.popleft()
            self.free -= size
            waiter.set_result(None)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call against the permission its method needs, binds a request id to
    its log lines and reports domain errors as gRPC status."""

    def __init__(
        self,
        authenticator: Authenticator | None,
        permissions: dict[str, Permission],
        metrics: Metrics | None = None,
    ) -> None:
        self.authenticator = authenticator
        self.permissions = permissions
        self.metrics = metrics
        # The heavy methods take turns (see herald_common.limits).
        self._heavy = ByteTurns(HEAVY_BYTES_AT_ONCE)

    async def _authenticate(self, details: Any, context: Any) -> None:
        if details.method.startswith(_OPEN_PREFIXES) or self.authenticator is None:
            return
        needed = self.permissions.get(details.method)
        if needed is None:  # every method declares its permission; refuse rather than guess
            raise PermissionDenied(f"{details.method} is not open to callers")
        metadata = {k: v for k, v in details.invocation_metadata or () if isinstance(v, str)}
        source = source_address(context.peer() or "")
        act_as(await self.authenticator.authenticate(metadata, needed, source))

    def _observe(self, method: str, context: Any, started: float) -> None:
        """Counts a finished call by its status code, and how long it took."""
        if self.metrics is None:
            return
        service, _, name = method.lstrip("/").partition("/")
        code = context.code()
        code_name = code.name if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK.name
        self.metrics.grpc_handled.labels(service, name, code_name).inc()
        self.metrics.grpc_seconds.labels(service, name).observe(time.perf_counter() - started)

    @contextlib.asynccontextmanager
    async def _call(self, details: Any, context: Any) -> AsyncIterator[None]:
        """One call of a servicer method: its request id and span, the caller authenticated,
        errors reported as gRPC status, and its metrics."""
        started = time.perf_counter()
        _bind_request(details, context)
        with tracing.span(details.method, SpanKind.SERVER, parent=_metadata(details)):
            try:
                await self._authenticate(details, context)
                yield
            except DomainError as error:
                await _abort(context, error)
            except Exception as error:
                await _internal(context, error)
            finally:
                self._observe(details.method, context, started)

    async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_OPEN_PREFIXES):
            return handler
        limit = request_limit(handler_call_details.method)
        method = handler_call_details.method
        decode = _tolerant(handler.request_deserializer, limit, method not in CHECKS_OWN_TEXT)
        # The heavy methods (unary or uploads) take turns, by their size; the others go at once.
        heavy = method in HEAVY_METHODS
        if handler.unary_unary is not None:
            inner_unary = handler.unary_unary

            async def unary(request: _Arrived, context: Any) -> Any:
                async with (
                    self._call(handler_call_details, context),
                    self._heavy.turn(request.size if heavy else 0),
                ):
                    return await inner_unary(_decoded(request), context)

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=decode,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request: _Arrived, context: Any) -> AsyncIterator[Any]:
                async with self._call(handler_call_details, context):
                    async for response in inner_stream(_decoded(request), context):
                        yield response

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=decode,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            inner_upload = handler.stream_unary

            async def upload(requests: Any, context: Any) -> Any:
                # An upload holds one message at a time, of at most the method's limit.
                async with self._call(handler_call_details, context), self._heavy.turn(limit if heavy else 0):
                    return await inner_upload(_each_decoded(requests), context)

            return grpc.stream_unary_rpc_method_handler(
                upload,
                request_deserializer=decode,
                response_serializer=handler.response_serializer,
            )
        # No method streams both ways; one added without its own wrapper here is refused, never
        # served unauthenticated.
        raise PermissionDenied(f"{handler_call_details.method} streams both ways and is not served")


# Health service name that stays SERVING while the process runs, for liveness and startup probes:
# a database outage makes a service not ready ("" and its own names), but restarting it would
# not help.
LIVENESS_SERVICE = "liveness"


def _status(serving: bool) -> int:
    return health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING


class PortInUse(RuntimeError):
    """The service's port is taken (another instance, or another program)."""


Registrar = Callable[[grpc.aio.Server], None]


class GrpcServer:
    """A started gRPC server with health and reflection for the given service names."""

    def __init__(
        self,
        service_names: Sequence[str],
        register: Registrar,
        authenticator: Authenticator | None = None,
        permissions: dict[str, Permission] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        permissions = permissions or {}
        missing = [
            f"/{name}/{method.name}"
            for name in service_names
            for method in descriptor_pool.Default().FindServiceByName(name).methods
            if f"/{name}/{method.name}" not in permissions
        ]
        if authenticator is not None and missing:
            raise RuntimeError(f"methods without a declared permission: {missing}")
        interceptor = ErrorInterceptor(authenticator, permissions, metrics)
        # No SO_REUSEPORT: a second process on the same port must fail, not share it silently.
        self.server = grpc.aio.server(
            interceptors=[interceptor],
            options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", GRPC_RECEIVE_BYTES)],
            maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
        )
        self.health = health.aio.HealthServicer()
        self.service_names = list(service_names)
        register(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        enable_reflection(self.server, [*self.service_names, health.SERVICE_NAME])
        self.port = 0

    async def start(self, host: str, port: int, port_setting: str = "the port setting") -> int:
        try:
            self.port = self.server.add_insecure_port(f"{host}:{port}")
        except RuntimeError:
            raise PortInUse(
                f"{host}:{port} is already in use; choose another port with {port_setting}"
            ) from None
        await self.server.start()
        await self.set_serving(True)
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def set_component(self, name: str, serving: bool) -> None:
        """The health of one part of the service, under its own health service name."""
        await self.health.set(name, _status(serving))

    async def set_serving(self, serving: bool) -> None:
        for name in ["", *self.service_names]:
            await self.health.set(name, _status(serving))

    async def stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def health_status(address: str, service: str = "") -> str:
    """What a service at `address` reports to a probe for `service` (its health service name;
    "" for the whole service): SERVING, NOT_SERVING, or UNREACHABLE."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # the generated stub knows only the sync API
        try:
            answer = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
        except grpc.aio.AioRpcError:
            return "UNREACHABLE"
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))


async def wait_for_termination_signal() -> None:
    """Returns when SIGTERM or SIGINT arrives."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
