"""Reading the errors our services answer with, where one service passes another's on."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from herald_common.errors import FieldViolation


def error_details(error: grpc.aio.AioRpcError) -> tuple[list[FieldViolation], str]:
    """The field violations and the missing resource's name an error of ours carries."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    violations: list[FieldViolation] = []
    missing = ""
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
        elif detail.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
            info = error_details_pb2.ResourceInfo()
            detail.Unpack(info)
            missing = info.resource_name
    return violations, missing
