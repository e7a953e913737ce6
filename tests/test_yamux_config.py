"""Tests for grpcmux.yamux.config."""

import dataclasses

import pytest

from grpcmux.yamux.config import YamuxConfig
from grpcmux.yamux.errors import YamuxConfigError


def test_defaults_match_hashicorp():
    config = YamuxConfig()
    assert config.accept_backlog == 256
    assert config.enable_keepalive is True
    assert config.keepalive_interval == 30.0
    assert config.connection_write_timeout == 10.0
    assert config.max_stream_window_size == 256 * 1024
    assert config.stream_open_timeout == 75.0
    assert config.stream_close_timeout == 300.0
    assert config.max_stream_send_buffer > 0


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        YamuxConfig().accept_backlog = 1


def test_all_settable():
    config = YamuxConfig(accept_backlog=1, enable_keepalive=False, keepalive_interval=1.5,
                         connection_write_timeout=2, max_stream_window_size=1 << 20,
                         stream_open_timeout=3, stream_close_timeout=4,
                         max_stream_send_buffer=5, max_frame_size=6, max_control_buffer=7)
    assert config.max_stream_window_size == 1 << 20


@pytest.mark.parametrize("kwargs", [
    {"accept_backlog": 0},
    {"accept_backlog": 1.5},
    {"keepalive_interval": 0},
    {"connection_write_timeout": -1},
    {"stream_open_timeout": "1"},
    {"stream_close_timeout": 0},
    {"max_stream_window_size": 256 * 1024 - 1},
    {"max_stream_window_size": 1 << 32},
    {"max_stream_send_buffer": 0},
    {"max_frame_size": 0},
    {"enable_keepalive": 1},
    {"accept_backlog": True},
])
def test_invalid_values_rejected(kwargs):
    with pytest.raises(YamuxConfigError) as info:
        YamuxConfig(**kwargs)
    assert isinstance(info.value, ValueError)
