"""Shared fixtures: the tiny models (built once per session), an OTLP receiver, a PostgreSQL cluster, headless Chromium."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ROTEL, Rotel
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pg_cluster import PgCluster, missing_requirements


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The deterministic tiny models; reuses the user's cache when an identical build is there."""
    from hybrid_pd.tiny_models import SPECS, model_path

    return {name: model_path(name) for name in SPECS}


@pytest.fixture(scope="session")
def bench_spans_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A spans database written by a real traced ``hybrid-pd bench`` run (NIXL/UCX on DRAM).

    Tiny Nemotron-H config, P TP=1 -> D TP=2, per-layer reads: requests r0..r4 (r0..r3
    plus the bench's extra one), each with 2 transfers x 5 layer READs.  ~20 s, once.
    """
    import subprocess
    import sys

    db = tmp_path_factory.mktemp("bench_spans") / "spans.db"
    config = Path(__file__).parent / "data" / "tiny_nemotron_h_config.json"
    cmd = [sys.executable, "-m", "hybrid_pd.cli", "bench", "--config", str(config),
           "--prefill-tp", "1", "--decode-tp", "2", "--num-tokens", "300", "--requests", "4",
           "--granularity", "layer", "--telemetry", "sqlite", "--telemetry-db", str(db), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and db.exists(), f"bench failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return db


@pytest.fixture(scope="module")
def rotel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rotel]:
    """A real OTLP receiver (the ``rotel`` collector from PyPI, test extra)."""
    if ROTEL is None:
        if os.environ.get("CI"):  # CI installs the test extra: a missing rotel is a failure
            pytest.fail("rotel collector binary not found: pip install -e '.[test]'")
        pytest.skip("rotel collector binary not found (pip install rotel)")
    r = Rotel(tmp_path_factory.mktemp("rotel"))
    yield r
    r.stop()


@pytest.fixture
def mem() -> tuple[TracerProvider, InMemorySpanExporter]:
    """A private tracer provider recording into memory: (provider, exporter)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (tests/pg_cluster.py), once per session."""
    why = missing_requirements()
    if why is not None:
        if os.environ.get("CI"):  # CI's set-up runs as root and installs it: missing = failure
            pytest.fail(why)
        pytest.skip(why)
    cluster = PgCluster()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def pg_url(pg_cluster: PgCluster) -> str:
    """SQLAlchemy URL (``postgresql+psycopg://...``) of an empty database in that cluster."""
    return pg_cluster.create_database("hybrid_pd")


# ----------------------------------------------------- headless Chromium (dashboard tests)
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture
def browser() -> Iterator[object]:
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        # CI's set-up installs them (it runs as root): there a missing browser is a failure.
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} / {CHROMEDRIVER} missing in CI: scripts/setup.sh should install them")
        pytest.skip("needs Debian chromium + chromium-driver: run scripts/setup.sh as root "
                    "(apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="hybrid-pd-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--window-size=1280,800",
                f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
