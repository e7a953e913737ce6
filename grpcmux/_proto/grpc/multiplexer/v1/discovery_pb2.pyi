import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GRPCServer(_message.Message):
    __slots__ = ("client_id", "connected_since", "remote_address", "wire_protocol", "labels", "health")
    class Health(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        HEALTH_UNKNOWN: _ClassVar[GRPCServer.Health]
        HEALTH_SERVING: _ClassVar[GRPCServer.Health]
        HEALTH_NOT_SERVING: _ClassVar[GRPCServer.Health]
    HEALTH_UNKNOWN: GRPCServer.Health
    HEALTH_SERVING: GRPCServer.Health
    HEALTH_NOT_SERVING: GRPCServer.Health
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_SINCE_FIELD_NUMBER: _ClassVar[int]
    REMOTE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WIRE_PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    connected_since: _timestamp_pb2.Timestamp
    remote_address: str
    wire_protocol: str
    labels: _containers.ScalarMap[str, str]
    health: GRPCServer.Health
    def __init__(self, client_id: _Optional[str] = ..., connected_since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., remote_address: _Optional[str] = ..., wire_protocol: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., health: _Optional[_Union[GRPCServer.Health, str]] = ...) -> None: ...

class ListGRPCServerRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListGRPCServerResponse(_message.Message):
    __slots__ = ("servers", "details")
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    servers: _containers.RepeatedScalarFieldContainer[str]
    details: _containers.RepeatedCompositeFieldContainer[GRPCServer]
    def __init__(self, servers: _Optional[_Iterable[str]] = ..., details: _Optional[_Iterable[_Union[GRPCServer, _Mapping]]] = ...) -> None: ...

class WatchGRPCServerRequest(_message.Message):
    __slots__ = ("replay", "updates")
    REPLAY_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    replay: bool
    updates: bool
    def __init__(self, replay: _Optional[bool] = ..., updates: _Optional[bool] = ...) -> None: ...

class WatchGRPCServerResponse(_message.Message):
    __slots__ = ("server", "event", "details")
    class Event(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        EVENT_UNSPECIFIED: _ClassVar[WatchGRPCServerResponse.Event]
        EVENT_CONNECTED: _ClassVar[WatchGRPCServerResponse.Event]
        EVENT_DISCONNECTED: _ClassVar[WatchGRPCServerResponse.Event]
        EVENT_UPDATED: _ClassVar[WatchGRPCServerResponse.Event]
    EVENT_UNSPECIFIED: WatchGRPCServerResponse.Event
    EVENT_CONNECTED: WatchGRPCServerResponse.Event
    EVENT_DISCONNECTED: WatchGRPCServerResponse.Event
    EVENT_UPDATED: WatchGRPCServerResponse.Event
    SERVER_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    server: str
    event: WatchGRPCServerResponse.Event
    details: GRPCServer
    def __init__(self, server: _Optional[str] = ..., event: _Optional[_Union[WatchGRPCServerResponse.Event, str]] = ..., details: _Optional[_Union[GRPCServer, _Mapping]] = ...) -> None: ...
