"""The committed generated code matches proto/, and Discovery stays wire-compatible."""

import ast
import importlib.util
import pathlib

from grpcmux._proto.grpc.multiplexer.v1 import discovery_pb2
from grpcmux._proto.grpcmux.v1 import tunnel_pb2

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _generated_files(directory):
    return sorted(p.relative_to(directory) for p in directory.rglob("*.py*")
                  if "__pycache__" not in p.parts)


def _serialized_descriptor(path):
    """The descriptor bytes a _pb2.py module registers (independent of tool versions)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "AddSerializedFile"):
            return node.args[0].value
    raise AssertionError(f"no descriptor in {path}")


def test_generated_code_is_up_to_date(tmp_path):
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts/gen_protos.py")
    gen_protos = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_protos)
    fresh = tmp_path / "out"
    gen_protos.main(fresh)
    committed = ROOT / "grpcmux" / "_proto"
    assert _generated_files(fresh) == _generated_files(committed)
    for name in _generated_files(committed):
        if name.name.endswith("_pb2.py"):
            assert _serialized_descriptor(fresh / name) == _serialized_descriptor(
                committed / name), f"{name} is stale: run scripts/gen_protos.py"


def _fields(message):
    """name -> (number, type, repeated)."""
    return {f.name: (f.number, f.type, f.is_repeated) for f in message.DESCRIPTOR.fields}


def test_discovery_keeps_the_go_original_wire_format():
    service = discovery_pb2.DESCRIPTOR.services_by_name["DiscoveryService"]
    assert service.full_name == "grpc.multiplexer.v1.DiscoveryService"
    methods = {m.name: (m.input_type.name, m.output_type.name, m.server_streaming)
               for m in service.methods}
    assert methods == {
        "ListGRPCServer": ("ListGRPCServerRequest", "ListGRPCServerResponse", False),
        "WatchGRPCServer": ("WatchGRPCServerRequest", "WatchGRPCServerResponse", True),
    }
    string, enum, message, boolean = 9, 14, 11, 8
    optional, repeated = False, True
    assert _fields(discovery_pb2.ListGRPCServerRequest) == {}
    assert _fields(discovery_pb2.ListGRPCServerResponse) == {
        "servers": (1, string, repeated), "details": (2, message, repeated)}
    # updates (2): a grpcmux addition that Go callers never set.
    assert _fields(discovery_pb2.WatchGRPCServerRequest) == {
        "replay": (1, boolean, optional), "updates": (2, boolean, optional)}
    assert _fields(discovery_pb2.WatchGRPCServerResponse) == {
        "server": (1, string, optional), "event": (2, enum, optional),
        "details": (3, message, optional)}
    event = discovery_pb2.WatchGRPCServerResponse.Event
    # EVENT_UPDATED goes only to watchers that set updates.
    assert dict(event.items()) == {
        "EVENT_UNSPECIFIED": 0, "EVENT_CONNECTED": 1, "EVENT_DISCONNECTED": 2,
        "EVENT_UPDATED": 3}
    assert _fields(discovery_pb2.GRPCServer)["health"] == (6, enum, optional)
    assert dict(discovery_pb2.GRPCServer.Health.items()) == {
        "HEALTH_UNKNOWN": 0, "HEALTH_SERVING": 1, "HEALTH_NOT_SERVING": 2}


def test_tunnel_messages():
    reject = tunnel_pb2.ServerMessage(
        reject=tunnel_pb2.Reject(code=tunnel_pb2.Reject.CODE_ALREADY_EXISTS, message="taken"))
    parsed = tunnel_pb2.ServerMessage.FromString(reject.SerializeToString())
    assert parsed.WhichOneof("kind") == "reject"
    assert tunnel_pb2.Reject.Code.Name(parsed.reject.code) == "CODE_ALREADY_EXISTS"
    hello = tunnel_pb2.Hello(client_id="a", token="t", version="1", labels={"k": "v"})
    assert tunnel_pb2.Hello.FromString(hello.SerializeToString()) == hello
    assert [f.number for f in tunnel_pb2.Hello.DESCRIPTOR.fields] == [1, 2, 3, 4]
    report = tunnel_pb2.ClientMessage(backend_health=tunnel_pb2.BackendHealth(
        status=tunnel_pb2.BackendHealth.STATUS_NOT_SERVING, detail="connection refused"))
    assert tunnel_pb2.ClientMessage.FromString(report.SerializeToString()) == report
    assert [f.number for f in tunnel_pb2.BackendHealth.DESCRIPTOR.fields] == [1, 2]
