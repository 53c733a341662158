"""`hybrid-pd dashboard`: parser wiring and the streamlit command line (no server started)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from hybrid_pd import cli
from hybrid_pd.dashboard import cli as dcli
from hybrid_pd.settings import ENV_TELEMETRY_DB


def test_registered_and_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_TELEMETRY_DB, raising=False)
    args = cli.build_parser("dashboard").parse_args(["dashboard", "--db", "x.db", "--port", "9999"])
    assert args.func is dcli.run and args.db == "x.db" and args.port == 9999


def test_streamlit_command_is_loopback_headless() -> None:
    cmd = dcli.streamlit_command(12345)
    assert cmd[1:4] == ["-m", "streamlit", "run"] and Path(cmd[4]) == dcli.APP
    flags = dict(zip(cmd[5::2], cmd[6::2], strict=True))
    assert flags["--server.address"] == "127.0.0.1"
    assert flags["--server.port"] == "12345" and flags["--server.headless"] == "true"


def test_streamlit_command_shows_the_viewer_toolbar() -> None:
    """No "Deploy" (nor rerun / clear cache) button: the toolbar of an app's viewer."""
    cmd = dcli.streamlit_command(12345)
    flags = dict(zip(cmd[5::2], cmd[6::2], strict=True))
    assert flags["--client.toolbarMode"] == "viewer"


def test_free_port_is_bindable() -> None:
    port = dcli.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_run_passes_resolved_db(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    seen: dict[str, object] = {}

    def fake_call(cmd: list[str], env: dict[str, str]) -> int:
        seen.update(cmd=cmd, db=env.get(ENV_TELEMETRY_DB))
        return 0

    monkeypatch.setattr(dcli.subprocess, "call", fake_call)
    monkeypatch.chdir(tmp_path)
    args = cli.build_parser("dashboard").parse_args(["dashboard", "--db", "spans.db", "--port", "8765"])
    assert dcli.run(args) == 0
    assert seen["db"] == str(tmp_path / "spans.db")
    assert "open http://127.0.0.1:8765/" in capsys.readouterr().out
    assert not (tmp_path / "spans.db").exists()  # starting the dashboard creates nothing
