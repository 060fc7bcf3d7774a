"""Unit-test fixtures: a hard guard that nothing reaches the network."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import huggingface_hub.constants
import pytest

_real_connect = socket.socket.connect


def _guarded_connect(self: socket.socket, address: object) -> None:
    if self.family == socket.AF_UNIX:
        return _real_connect(self, address)
    raise RuntimeError(f"unit tests must not use the network (tried to connect to {address})")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Hub offline mode (env and the already-imported constant) plus a hard socket guard."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)
    yield
