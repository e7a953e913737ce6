"""The address of one yamux stream."""

from dataclasses import dataclass
from typing import Any, Optional

from zope.interface import implementer
from twisted.internet.interfaces import IAddress


@implementer(IAddress)
@dataclass(frozen=True)
class StreamAddress:
    """A stream of a session: the session transport's address plus the stream id."""

    session_address: Any
    stream_id: Optional[int]
