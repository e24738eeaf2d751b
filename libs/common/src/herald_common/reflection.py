"""Server reflection (grpc.reflection.v1 and v1alpha) that serves Herald's descriptors with their
source info, so `grpcurl describe` shows every comment in the protos.

The generated modules register descriptors without comments; `make proto` also writes
`herald/descriptors.binpb`, a FileDescriptorSet with source info and every import. Files not in it
(health, reflection itself) come from the process's descriptor pool. The two reflection versions
differ only in their package name, so one servicer speaks both: v1 requests decode as v1alpha
messages, field for field.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from importlib import resources
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2 as pb

V1_SERVICE = "grpc.reflection.v1.ServerReflection"
V1ALPHA_SERVICE = "grpc.reflection.v1alpha.ServerReflection"
_V1ALPHA_FILE = "grpc_reflection/v1alpha/reflection.proto"
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _with_source_info() -> list[descriptor_pb2.FileDescriptorProto]:
    data = resources.files("herald").joinpath("descriptors.binpb").read_bytes()
    return list(descriptor_pb2.FileDescriptorSet.FromString(data).file)


def _v1_file() -> descriptor_pb2.FileDescriptorProto:
    """grpc.reflection.v1's file: v1alpha's, under the v1 package."""
    v1 = descriptor_pb2.FileDescriptorProto()
    descriptor_pool.Default().FindFileByName(_V1ALPHA_FILE).CopyToProto(v1)
    old, new = f".{v1.package}.", ".grpc.reflection.v1."
    v1.name, v1.package = _V1_FILE, "grpc.reflection.v1"

    def renamed(name: str) -> str:
        return new + name.removeprefix(old) if name.startswith(old) else name

    messages = list(v1.message_type)
    while messages:
        message = messages.pop()
        messages.extend(message.nested_type)
        for field in message.field:
            field.type_name = renamed(field.type_name)
    for service in v1.service:
        for method in service.method:
            method.input_type, method.output_type = renamed(method.input_type), renamed(method.output_type)
    return v1


def _symbols(file: descriptor_pb2.FileDescriptorProto) -> Iterable[str]:
    """Every fully qualified name a file defines."""
    prefix = f"{file.package}." if file.package else ""

    def of_message(message: descriptor_pb2.DescriptorProto, outer: str) -> Iterable[str]:
        name = f"{outer}{message.name}"
        yield name
        yield from (f"{name}.{field.name}" for field in message.field)
        yield from (f"{name}.{enum.name}" for enum in message.enum_type)
        for nested in message.nested_type:
            yield from of_message(nested, f"{name}.")

    for message in file.message_type:
        yield from of_message(message, prefix)
    yield from (f"{prefix}{enum.name}" for enum in file.enum_type)
    yield from (f"{prefix}{extension.name}" for extension in file.extension)
    for service in file.service:
        yield f"{prefix}{service.name}"
        yield from (f"{prefix}{service.name}.{method.name}" for method in service.method)


class Reflection:
    """Answers reflection requests from a set of files (each with its imports)."""

    def __init__(self, service_names: Sequence[str]) -> None:
        self.service_names = sorted({*service_names, V1_SERVICE, V1ALPHA_SERVICE})
        self._files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
        self._by_symbol: dict[str, str] = {}
        self._extensions: dict[str, dict[int, str]] = {}
        for file in [*_with_source_info(), _v1_file()]:
            self._add(file)

    def _add(self, file: descriptor_pb2.FileDescriptorProto) -> None:
        self._files[file.name] = file
        for symbol in _symbols(file):
            self._by_symbol.setdefault(symbol, file.name)
        prefix = f"{file.package}." if file.package else ""
        for extension in file.extension:
            extended = extension.extendee.lstrip(".")
            self._extensions.setdefault(extended, {})[extension.number] = f"{prefix}{extension.name}"

    def _file(self, name: str) -> descriptor_pb2.FileDescriptorProto | None:
        """A file by name: ours, with comments; else from the process's pool."""
        found = self._files.get(name)
        if found is None:
            try:
                described = descriptor_pool.Default().FindFileByName(name)
            except KeyError:
                return None
            found = descriptor_pb2.FileDescriptorProto()
            described.CopyToProto(found)
            self._add(found)
        return found

    def _file_of_symbol(self, symbol: str) -> str | None:
        name = self._by_symbol.get(symbol)
        if name is None:
            try:
                name = descriptor_pool.Default().FindFileContainingSymbol(symbol).name
            except KeyError:
                return None
        return name

    def _with_imports(self, name: str) -> list[bytes] | None:
        """The file and every file it imports, each once, the file first."""
        ordered: list[bytes] = []
        seen: set[str] = set()
        pending = [name]
        while pending:
            current = pending.pop()
            if current in seen:
                continue
            seen.add(current)
            file = self._file(current)
            if file is None:
                if current == name:
                    return None
                continue
            ordered.append(file.SerializeToString())
            pending.extend(file.dependency)
        return ordered

    def answer(self, request: pb.ServerReflectionRequest) -> pb.ServerReflectionResponse:
        kind = request.WhichOneof("message_request")
        name: str | None = None
        if kind == "list_services":
            services = [pb.ServiceResponse(name=n) for n in self.service_names]
            return pb.ServerReflectionResponse(
                original_request=request, list_services_response=pb.ListServiceResponse(service=services)
            )
        if kind == "file_by_filename":
            name = request.file_by_filename
        elif kind == "file_containing_symbol":
            name = self._file_of_symbol(request.file_containing_symbol)
        elif kind == "file_containing_extension":
            wanted = request.file_containing_extension
            extension = self._extensions.get(wanted.containing_type, {}).get(wanted.extension_number)
            name = self._by_symbol.get(extension) if extension else None
        elif kind == "all_extension_numbers_of_type":
            numbers = self._extensions.get(request.all_extension_numbers_of_type, {})
            if numbers or self._file_of_symbol(request.all_extension_numbers_of_type):
                return pb.ServerReflectionResponse(
                    original_request=request,
                    all_extension_numbers_response=pb.ExtensionNumberResponse(
                        base_type_name=request.all_extension_numbers_of_type, extension_number=sorted(numbers)
                    ),
                )
        else:
            return _error(request, grpc.StatusCode.INVALID_ARGUMENT, "unknown reflection request")
        files = self._with_imports(name) if name else None
        if files is None:
            return _error(request, grpc.StatusCode.NOT_FOUND, "not found")
        return pb.ServerReflectionResponse(
            original_request=request,
            file_descriptor_response=pb.FileDescriptorResponse(file_descriptor_proto=files),
        )

    async def serve(self, requests: AsyncIterator[pb.ServerReflectionRequest], _: Any) -> AsyncIterator[Any]:
        async for request in requests:
            yield self.answer(request)


def _error(
    request: pb.ServerReflectionRequest, code: grpc.StatusCode, message: str
) -> pb.ServerReflectionResponse:
    return pb.ServerReflectionResponse(
        original_request=request,
        error_response=pb.ErrorResponse(error_code=int(code.value[0]), error_message=message),
    )


def enable_reflection(server: grpc.aio.Server, service_names: Sequence[str]) -> None:
    """Serves reflection, both versions, for these services (and reflection itself)."""
    reflection = Reflection(service_names)
    handler = grpc.stream_stream_rpc_method_handler(
        reflection.serve,
        request_deserializer=pb.ServerReflectionRequest.FromString,
        response_serializer=pb.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(service, {"ServerReflectionInfo": handler})
            for service in (V1_SERVICE, V1ALPHA_SERVICE)
        ]
    )
