"""Shared fixtures: the tiny models (built once per session) and free loopback ports."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The deterministic tiny models; reuses the user's cache when an identical build is there."""
    from hybrid_pd.tiny_models import SPECS, model_path

    return {name: model_path(name) for name in SPECS}
