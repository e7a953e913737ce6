"""Interop fixtures: the Go peers are built once per session (failing, never skipping)."""

import pytest

import gobuild


@pytest.fixture(scope="session")
def go_program():
    """``go_program(name) -> Path`` of a built Go peer; a build problem fails the test."""
    return gobuild.build
