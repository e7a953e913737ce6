from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Hello(_message.Message):
    __slots__ = ("client_id", "token", "version", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    token: str
    version: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, client_id: _Optional[str] = ..., token: _Optional[str] = ..., version: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("server_version", "keepalive_interval_ms", "client_id")
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    KEEPALIVE_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    server_version: str
    keepalive_interval_ms: int
    client_id: str
    def __init__(self, server_version: _Optional[str] = ..., keepalive_interval_ms: _Optional[int] = ..., client_id: _Optional[str] = ...) -> None: ...

class Reject(_message.Message):
    __slots__ = ("code", "message")
    class Code(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        CODE_UNSPECIFIED: _ClassVar[Reject.Code]
        CODE_BAD_CLIENT_ID: _ClassVar[Reject.Code]
        CODE_ALREADY_EXISTS: _ClassVar[Reject.Code]
        CODE_UNSUPPORTED_VERSION: _ClassVar[Reject.Code]
        CODE_UNAUTHENTICATED: _ClassVar[Reject.Code]
        CODE_PERMISSION_DENIED: _ClassVar[Reject.Code]
        CODE_RESOURCE_EXHAUSTED: _ClassVar[Reject.Code]
        CODE_INVALID_HELLO: _ClassVar[Reject.Code]
    CODE_UNSPECIFIED: Reject.Code
    CODE_BAD_CLIENT_ID: Reject.Code
    CODE_ALREADY_EXISTS: Reject.Code
    CODE_UNSUPPORTED_VERSION: Reject.Code
    CODE_UNAUTHENTICATED: Reject.Code
    CODE_PERMISSION_DENIED: Reject.Code
    CODE_RESOURCE_EXHAUSTED: Reject.Code
    CODE_INVALID_HELLO: Reject.Code
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: Reject.Code
    message: str
    def __init__(self, code: _Optional[_Union[Reject.Code, str]] = ..., message: _Optional[str] = ...) -> None: ...

class BackendHealth(_message.Message):
    __slots__ = ("status", "detail")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNKNOWN: _ClassVar[BackendHealth.Status]
        STATUS_SERVING: _ClassVar[BackendHealth.Status]
        STATUS_NOT_SERVING: _ClassVar[BackendHealth.Status]
    STATUS_UNKNOWN: BackendHealth.Status
    STATUS_SERVING: BackendHealth.Status
    STATUS_NOT_SERVING: BackendHealth.Status
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    status: BackendHealth.Status
    detail: str
    def __init__(self, status: _Optional[_Union[BackendHealth.Status, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class ClientMessage(_message.Message):
    __slots__ = ("backend_health",)
    BACKEND_HEALTH_FIELD_NUMBER: _ClassVar[int]
    backend_health: BackendHealth
    def __init__(self, backend_health: _Optional[_Union[BackendHealth, _Mapping]] = ...) -> None: ...

class ServerMessage(_message.Message):
    __slots__ = ("welcome", "reject")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    REJECT_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    reject: Reject
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., reject: _Optional[_Union[Reject, _Mapping]] = ...) -> None: ...
