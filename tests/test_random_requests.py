"""Every RPC, called with requests built at random from its message types (strings of every kind,
extreme numbers, unknown enum values, nested messages, lists): each answer is a clear status,
never INTERNAL or UNKNOWN, and the services stay healthy. Seeded, so a failure replays."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import Platform
from tests.test_hostile_input import BROKEN, SERVED_BY, _answer, _methods, channels

__all__ = ["channels"]

SEED = 20261206
ROUNDS = 25
_STRINGS = [
    "",
    " ",
    "a",
    "x" * 300,
    "users/",
    "segments/00000000-0000-0000-0000-000000000000",
    "campaigns/../x",
    "destinations/%00",
    "💥" * 50,
    "\u202e",
    "-1",
    "9" * 40,
    "a\nb",
    "{{ x }}",
    "accounts/" + "f" * 36,
    "+14155550100",
    "2026-13-45",
    "NaN",
]
_NUMBERS = [0, 1, -1, 2**31 - 1, -(2**31), 10**9]
_UNSIGNED = {
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_FIXED32,
    FieldDescriptor.TYPE_FIXED64,
}
_SIGNED_32 = {FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32}


def _fill(message: Message, descriptor: Descriptor, rng: random.Random, depth: int) -> None:
    for field in descriptor.fields:
        if rng.random() < 0.4:
            continue
        count = rng.choice([1, 1, 2, 5]) if field.is_repeated else 1
        for _ in range(count):
            value = _value(field, rng, depth)
            if value is None:
                continue
            if field.message_type is not None:
                if field.message_type.GetOptions().map_entry:
                    continue
                target = (
                    getattr(message, field.name).add() if field.is_repeated else getattr(message, field.name)
                )
                if field.message_type.full_name.startswith("google.protobuf."):
                    continue
                _fill(target, field.message_type, rng, depth + 1)
            elif field.is_repeated:
                getattr(message, field.name).append(value)
            else:
                setattr(message, field.name, value)


def _value(field: FieldDescriptor, rng: random.Random, depth: int) -> Any:
    if field.message_type is not None:
        return object() if depth < 3 else None
    if field.enum_type is not None:
        return rng.choice([v.number for v in field.enum_type.values] + [99])
    if field.type == FieldDescriptor.TYPE_STRING:
        return rng.choice(_STRINGS)
    if field.type == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return rng.choice([0.0, -1.5, 1e308, 3.0])
    if field.type == FieldDescriptor.TYPE_BYTES:
        return rng.choice([b"", b"\x00\xff", b"x" * 100])
    if field.type in _UNSIGNED:
        return rng.choice([0, 1, 2**31])
    if field.type in _SIGNED_32:
        return rng.choice(_NUMBERS)
    return rng.choice([*_NUMBERS, 2**62])


async def test_random_requests_to_every_rpc_answer_clearly(
    platform: Platform, channels: dict[str, grpc.aio.Channel]
) -> None:
    rng = random.Random(SEED)
    broken = []
    answered: Counter[grpc.StatusCode] = Counter()
    for method in _methods():
        if method.client_streaming:
            continue
        request_type = GetMessageClass(method.input_type)
        for round_ in range(ROUNDS):
            request = request_type()
            _fill(request, method.input_type, rng, 0)
            code = await _answer(
                channels[SERVED_BY[method.containing_service.full_name]], method, request.SerializeToString()
            )
            answered[code] += 1
            if code in BROKEN:
                broken.append((method.name, round_, str(request)[:300]))
    print("answers:", {code.name: count for code, count in answered.items()})
    assert not broken, broken[:5]
    for service in set(SERVED_BY.values()):
        async with grpc.aio.insecure_channel(platform.address(service)) as channel:
            health: Any = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
