"""``grpcmux call``: call any method of a connected gRPC server, in JSON.

The types come from the server itself: grpcio-reflection's client-side
``ProtoReflectionDescriptorDatabase`` asks the server's reflection service (through
the proxy, routed like any call) and feeds a protobuf ``DescriptorPool``; requests
are parsed and replies printed with ``json_format``.  An interceptor gives every
call, the reflection ones included, the routing and user metadata and what is left
of the one ``--timeout``.  Blocking grpc, no reactor.
"""

import collections
import json
import sys
import time

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from grpcmux.commands import EXIT_OK, CommandFailed, UsageError, one_line
from grpcmux.listing import TOKEN_ENV, channel_for, token_metadata

CLIENT_ID_METADATA_KEY = "client-id"
# Method kinds by (client streaming, server streaming): the channel's factory name.
_KINDS = {
    (False, False): "unary_unary",
    (False, True): "unary_stream",
    (True, False): "stream_unary",
    (True, True): "stream_stream",
}


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


class _Defaults(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``metadata`` to every call and bounds it by the command's one deadline."""

    def __init__(self, metadata, deadline):
        self._metadata = tuple(metadata)
        self._deadline = deadline

    def _details(self, details):
        remaining = max(0.0, self._deadline - time.monotonic())
        return _CallDetails(
            details.method, remaining, tuple(details.metadata or ()) + self._metadata,
            details.credentials, details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    intercept_unary_stream = intercept_unary_unary

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._details(details), requests)

    intercept_stream_stream = intercept_stream_unary


# The request


def read_data(data, stdin=None):
    """The text of ``-d``: itself, ``@FILE``'s contents, or standard input for ``-``."""
    if data is None:
        return "{}"
    if data == "-":
        return (stdin or sys.stdin).read()
    if data.startswith("@"):
        path = data[1:]
        try:
            with open(path, encoding="utf-8") as file:
                return file.read()
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(f"grpcmux call: -d @{path}: cannot read it: "
                             f"{getattr(error, 'strerror', None) or error}") from None
    return data


def json_values(text):
    """The JSON values in ``text``: one, or several separated by whitespace (JSON lines)."""
    decoder = json.JSONDecoder()
    values, position = [], 0
    while True:
        while position < len(text) and text[position].isspace():
            position += 1
        if position == len(text):
            return values
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise UsageError(f"grpcmux call: -d is not valid JSON: {error}") from None
        values.append(value)


def requests_of(values, message_class, streaming):
    """Request messages from JSON values; a streaming method also takes one array."""
    if streaming and len(values) == 1 and isinstance(values[0], list):
        values = values[0]
    if not streaming and len(values) != 1:
        raise UsageError(f"grpcmux call: -d must hold one JSON object for a method taking "
                         f"one request, got {len(values)} values")
    name = message_class.DESCRIPTOR.full_name
    requests = []
    for value in values:
        if not isinstance(value, dict):
            raise UsageError(f"grpcmux call: -d: a {name} request is a JSON object, "
                             f"got {json.dumps(value)[:40]}")
        try:
            requests.append(json_format.ParseDict(value, message_class()))
        except json_format.ParseError as error:
            raise UsageError(f"grpcmux call: -d does not fit {name}: {one_line(str(error))}") \
                from None
    return requests


# The server's types


class _Target:
    """The gRPC server a call reaches, and what its reflection service tells of it."""

    def __init__(self, channel, args):
        self.args = args
        self.database = ProtoReflectionDescriptorDatabase(channel)
        self.pool = descriptor_pool.DescriptorPool(self.database)

    def _who(self):
        client_id = self.args.client_id
        return f"client {client_id!r}" if client_id else "the proxy's default route"

    def _reflect(self, ask):
        try:
            return ask()
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise CommandFailed(
                    f"UNIMPLEMENTED: the gRPC server of {self._who()} offers no server "
                    "reflection (grpc.reflection.v1alpha), which grpcmux call needs to "
                    "know its types") from None
            raise CommandFailed(problem(error, self.args)) from None
        except AssertionError as error:  # the database's word on a reflection error reply
            raise CommandFailed(f"reflection failed: {one_line(str(error))}") from None

    def services(self):
        return sorted(self._reflect(self.database.get_services))

    def _knows(self, symbol):
        try:
            self._reflect(lambda: self.database.FindFileContainingSymbol(symbol))
        except KeyError:
            return False
        return True

    def service(self, name):
        if not self._knows(name):
            raise CommandFailed(f"NOT_FOUND: the gRPC server of {self._who()} has no "
                                f"service {name!r} (see --list)")
        try:
            return self.pool.FindServiceByName(name)
        except KeyError:
            raise CommandFailed(f"NOT_FOUND: {name!r} is not a service (see --list)") from None

    def method(self, name):
        service_name, method_name = split_method(name)
        service = self.service(service_name)
        method = service.methods_by_name.get(method_name)
        if method is None:
            offered = ", ".join(sorted(service.methods_by_name)) or "none"
            raise CommandFailed(f"NOT_FOUND: service {service_name} has no method "
                                f"{method_name!r} (it has: {offered})")
        return method

    def describe(self, name):
        """Lines describing service or message type ``name``, .proto style."""
        if not self._knows(name):
            raise CommandFailed(f"NOT_FOUND: the gRPC server of {self._who()} has no "
                                f"service or message type {name!r} (see --list)")
        try:
            service = self.pool.FindServiceByName(name)
        except KeyError:
            try:
                return describe_message(self.pool.FindMessageTypeByName(name))
            except KeyError:
                raise CommandFailed(f"NOT_FOUND: {name!r} is neither a service nor a "
                                    "message type") from None
        lines = [f"service {service.full_name} {{"]
        messages = {}
        for method in service.methods:
            lines.append(f"  {describe_method(method)}")
            for message in (method.input_type, method.output_type):
                messages.setdefault(message.full_name, message)
        lines.append("}")
        for message in messages.values():
            lines += [""] + describe_message(message)
        return lines


def split_method(name):
    """``SERVICE/METHOD`` (or grpcurl's ``SERVICE.METHOD``) as ``(service, method)``."""
    service, slash, method = name.lstrip("/").rpartition("/")
    if not slash:
        service, _, method = name.rpartition(".")
    if not service or not method:
        raise UsageError(f"grpcmux call: expected SERVICE/METHOD "
                         f"(e.g. grpcmux.v1.DemoService/Hello), got {name!r}")
    return service, method


def describe_method(method):
    def side(streaming, message):
        return f"{'stream ' if streaming else ''}{message.full_name}"

    return (f"rpc {method.name}({side(method.client_streaming, method.input_type)}) "
            f"returns ({side(method.server_streaming, method.output_type)});")


def describe_message(message):
    lines = [f"message {message.full_name} {{"]
    for field in message.fields:
        if field.message_type is not None:
            kind = field.message_type.full_name
        elif field.enum_type is not None:
            kind = field.enum_type.full_name
        else:
            kind = _SCALARS.get(field.type, str(field.type))
        repeated = "repeated " if _is_repeated(field) else ""
        lines.append(f"  {repeated}{kind} {field.name} = {field.number};")
    lines.append("}")
    return lines


def _is_repeated(field):
    is_repeated = getattr(field, "is_repeated", None)  # protobuf >= 5.29; label before
    return is_repeated if is_repeated is not None else field.label == field.LABEL_REPEATED


def _scalar_names():
    from google.protobuf.descriptor import FieldDescriptor

    return {
        value: name[len("TYPE_"):].lower()
        for name, value in vars(FieldDescriptor).items()
        if name.startswith("TYPE_") and isinstance(value, int)
    }


_SCALARS = _scalar_names()


# Running


def problem(error, args):
    """One line for a failed call: the gRPC code and message, and a hint where clear."""
    code = error.code()
    details = one_line(error.details() or "")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        details = f"no answer within {args.timeout:g} s (--timeout)"
    elif code == grpc.StatusCode.UNAVAILABLE and details.startswith("failed to connect"):
        details = f"cannot reach the grpcmux proxy at {args.proxy_address}: {details}"
    elif code == grpc.StatusCode.UNAUTHENTICATED:
        details += f" (pass a valid --token or set {TOKEN_ENV})"
    return f"{code.name}: {details}"


def _metadata(args):
    metadata = list(token_metadata(args))
    if args.client_id:
        metadata.append((CLIENT_ID_METADATA_KEY, args.client_id))
    for key, value in args.headers:
        metadata.append((key, value.encode() if key.endswith("-bin") else value))
    return metadata


def invoke(channel, method, requests):
    """Call ``method`` with ``requests``; yields the replies (blocking)."""
    request_class = message_factory.GetMessageClass(method.input_type)
    reply_class = message_factory.GetMessageClass(method.output_type)
    kind = _KINDS[method.client_streaming, method.server_streaming]
    path = f"/{method.containing_service.full_name}/{method.name}"
    call = getattr(channel, kind)(path, request_serializer=request_class.SerializeToString,
                                  response_deserializer=reply_class.FromString)
    argument = iter(requests) if method.client_streaming else requests[0]
    if method.server_streaming:
        yield from call(argument)
    else:
        yield call(argument)


def _write(out, reply):
    out.write(json.dumps(json_format.MessageToDict(reply), ensure_ascii=False) + "\n")
    out.flush()  # one reply, one line, now: a stream is often piped


def run(args, out, err):
    """``grpcmux call``: the exit status; errors raise UsageError or CommandFailed."""
    asked = [bool(args.method), args.list, args.describe is not None]
    if sum(asked) != 1:
        raise UsageError("grpcmux call: give one of SERVICE/METHOD, --list or --describe "
                         "NAME (see 'grpcmux call --help')")
    values = json_values(read_data(args.data)) if args.method else None
    if args.method:
        split_method(args.method)  # a malformed name needs no network to be refused
    deadline = time.monotonic() + args.timeout
    with channel_for(args) as plain:
        channel = grpc.intercept_channel(plain, _Defaults(_metadata(args), deadline))
        target = _Target(channel, args)
        if args.list:
            for name in target.services():
                out.write(name + "\n")
            return EXIT_OK
        if args.describe is not None:
            for line in target.describe(args.describe):
                out.write(line + "\n")
            return EXIT_OK
        method = target.method(args.method)
        request_class = message_factory.GetMessageClass(method.input_type)
        requests = requests_of(values, request_class, method.client_streaming)
        try:
            for reply in invoke(channel, method, requests):
                _write(out, reply)
        except grpc.RpcError as error:
            raise CommandFailed(problem(error, args)) from None
    return EXIT_OK
