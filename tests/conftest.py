"""Shared fixtures: the tiny models (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The deterministic tiny models; reuses the user's cache when an identical build is there."""
    from hybrid_pd.tiny_models import SPECS, model_path

    return {name: model_path(name) for name in SPECS}
