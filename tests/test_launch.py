"""``hybrid-pd serve`` without engines: engine commands, kv-transfer config, CPU binding
(hybrid_pd.serve.engines), the serve arguments (hybrid_pd.serve.cli) and the supervisor
on plain Python children (hybrid_pd.serve.supervisor)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from helpers import free_port

from hybrid_pd import cli, settings
from hybrid_pd.serve import engines as E
from hybrid_pd.serve.cli import kv_extra_from_args, launch_config_from_args, ports_from_args
from hybrid_pd.serve.engines import (
    EngineSpec,
    LaunchConfig,
    default_kv_extra,
    engine_command,
    engine_env,
    kv_transfer_config,
    plan_cpu_binding,
)
from hybrid_pd.serve.supervisor import (
    Child,
    LaunchError,
    Ports,
    Supervisor,
    build_reference_supervisor,
    build_supervisor,
    proxy_command,
)


def kv_config_of(cmd: list[str]) -> dict:
    return json.loads(cmd[cmd.index("--kv-transfer-config") + 1])


def serve_args(*argv: str):
    args, extra = cli.build_parser("serve").parse_known_args(["serve", *argv])
    args.extra = extra
    return args


# -- engines: command, kv-transfer config, environment ---------------------------------


def test_kv_transfer_config_roles():
    assert kv_transfer_config("single", "upstream") is None
    p = kv_transfer_config("prefill", "upstream")
    d = kv_transfer_config("decode", "upstream")
    assert p == {"kv_connector": "NixlConnector", "kv_role": "kv_producer", "kv_buffer_device": "cpu"}
    assert d["kv_role"] == "kv_consumer"
    with pytest.raises(ValueError, match="unknown connector 'nope'"):
        kv_transfer_config("prefill", "nope")


def test_engine_command_passes_user_args_and_connector():
    cfg = LaunchConfig(model="/m", engine_args=("--max-model-len", "4096"))
    cmd = engine_command(cfg, EngineSpec("prefill", "prefill", 8100, tp=2, side_channel_port=5600), python="py")
    assert cmd[:5] == ["py", "-m", "hybrid_pd.vllm_cli", "serve", "/m"]
    assert cmd[cmd.index("--port") + 1] == "8100" and cmd[cmd.index("--tensor-parallel-size") + 1] == "2"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"  # loopback by default
    assert kv_config_of(cmd)["kv_role"] == "kv_producer"
    assert cmd[-2:] == ["--max-model-len", "4096"] and "--enforce-eager" in cmd
    assert kv_config_of(cmd)["kv_connector_extra_config"][settings.KEY_LEASE] == settings.DEFAULT_LEASE_S
    ref = engine_command(LaunchConfig(model="/m", enforce_eager=False), EngineSpec("reference", "single", 1), python="py")
    assert "--kv-transfer-config" not in ref and "--enforce-eager" not in ref


def test_default_kv_extra_limits_nixl_threads_on_small_machines():
    assert dict(default_kv_extra(settings.FEW_CORES - 1)) == {
        settings.KEY_LEASE: settings.DEFAULT_LEASE_S, settings.KEY_NUM_THREADS: 1,
        settings.KEY_READ_TIMEOUT: settings.DEFAULT_READ_TIMEOUT_S,
        settings.KEY_READ_GRANULARITY: "sampled:16"}
    assert dict(default_kv_extra(settings.FEW_CORES, lease_s=45, read_timeout_s=5)) == {
        settings.KEY_LEASE: 45, settings.KEY_READ_TIMEOUT: 5,
        settings.KEY_READ_GRANULARITY: settings.SERVE_READ_GRANULARITY}


def test_engine_env_ports_binding_and_reference_layout():
    cfg = LaunchConfig(model="/m")
    env = engine_env(cfg, EngineSpec("decode", "decode", 1, side_channel_port=5700), {}, "1")
    assert env[settings.ENV_SIDE_CHANNEL_PORT] == "5700" and env[E.ENV_SIDE_CHANNEL_HOST] == "127.0.0.1"
    assert env[E.ENV_CPU_THREADS_BIND] == "1" and env[E.ENV_CPU_KVCACHE_SPACE] == "1"
    # the user's own binding and cache size win
    env = engine_env(cfg, EngineSpec("decode", "decode", 1), {E.ENV_CPU_THREADS_BIND: "0-3",
                                                              E.ENV_CPU_KVCACHE_SPACE: "8"}, "1")
    assert env[E.ENV_CPU_THREADS_BIND] == "0-3" and env[E.ENV_CPU_KVCACHE_SPACE] == "8"
    ref = engine_env(cfg, EngineSpec("reference", "single", 1), {}, None)
    assert ref[settings.ENV_CONV_LAYOUT] == "DS" and E.ENV_CPU_THREADS_BIND not in ref


def test_engine_env_telemetry_only_for_connector_engines():
    cfg = LaunchConfig(model="/m", telemetry_db="/tmp/t.db", extra_env=((settings.ENV_ROLE, "x"),))
    env = engine_env(cfg, EngineSpec("prefill", "prefill", 1), {}, None)
    assert env[settings.ENV_TELEMETRY_DB] == "/tmp/t.db"
    assert env[settings.ENV_ROLE] == "x"  # extra_env is applied last
    ref = engine_env(LaunchConfig(model="/m", telemetry_db="/tmp/t.db"), EngineSpec("r", "single", 1), {}, None)
    assert settings.ENV_TELEMETRY_DB not in ref and settings.ENV_ROLE not in ref


@pytest.mark.parametrize(
    ("engines", "cores", "expected"),
    [
        # 2 cores, P and D at TP 1: one core each
        ([("prefill", 1), ("decode", 1)], [0, 1], {"prefill": "0", "decode": "1"}),
        # 8 cores, P TP 2 + D TP 1 (3 ranks): 2 cores per rank, disjoint
        ([("prefill", 2), ("decode", 1)], range(8), {"prefill": "0,1|2,3", "decode": "4,5"}),
        # fewer cores than ranks: let the OS schedule
        ([("prefill", 2), ("decode", 1)], [0, 1], {"prefill": "nobind", "decode": "nobind"}),
        ([("reference", 1)], [0, 1], {"reference": "0,1"}),
    ],
)
def test_split_binding(engines, cores, expected):
    assert plan_cpu_binding(engines, list(cores), "split") == expected


def test_split_binding_never_shares_a_core():
    for n_cores in range(1, 17):
        for tps in [(1, 1), (2, 1), (1, 2), (2, 2), (4, 2)]:
            engines = [("prefill", tps[0]), ("decode", tps[1])]
            plan = plan_cpu_binding(engines, list(range(n_cores)), "split")
            groups = [g for v in plan.values() if v != "nobind" for g in v.split("|")]
            used = [c for g in groups for c in g.split(",")]
            assert len(used) == len(set(used)), (n_cores, tps, plan)
            if n_cores >= sum(tps):
                assert len(groups) == sum(tps)


def test_other_binding_modes():
    assert plan_cpu_binding([("p", 1)], [0, 1], "auto") == {"p": None}
    assert plan_cpu_binding([("p", 2)], [0, 1, 2, 3], "nobind") == {"p": "nobind"}
    with pytest.raises(ValueError, match="unknown CPU binding 'x'"):
        plan_cpu_binding([("p", 1)], [0], "x")


def test_kv_extra_overrides_defaults_one_key_at_a_time():
    cfg = LaunchConfig(model="m", kv_extra=((settings.KEY_LEASE, 5),))
    kvt = kv_config_of(engine_command(cfg, EngineSpec("decode", "decode", 8200, 1, 5700)))
    extra = kvt["kv_connector_extra_config"]
    assert extra[settings.KEY_LEASE] == 5 and extra[settings.KEY_READ_TIMEOUT] == settings.DEFAULT_READ_TIMEOUT_S
    assert kvt["kv_connector"] == "HybridNixlConnector"  # ours is the default


# -- the serve arguments -----------------------------------------------------------------


def test_serve_defaults_are_the_settings_ports():
    args = serve_args("/m")
    assert (args.port, args.prefill_port, args.decode_port) == (
        settings.PORT_PROXY, settings.PORT_PREFILL, settings.PORT_DECODE)
    assert (args.prefill_side_channel_port, args.decode_side_channel_port) == (
        settings.PORT_PREFILL_SIDE_CHANNEL, settings.PORT_DECODE_SIDE_CHANNEL)
    # Ports from the defaults is Ports(): one set of numbers
    assert ports_from_args(args) == Ports()
    assert args.host == LaunchConfig(model="m").host and args.connector == E.DEFAULT_CONNECTOR


def test_proxy_cli_defaults_match_serve():
    args = cli.build_parser("proxy").parse_args(["proxy", "--prefill-url", "p", "--decode-url", "d"])
    assert args.port == settings.PORT_PROXY and args.host == E.DEFAULT_HOST
    assert args.timeout == E.DEFAULT_PROXY_TIMEOUT_S


def test_serve_kv_options_become_settings_keys(tmp_path: Path):
    args = serve_args("/m", "--kv-read-timeout", "5", "--kv-read-granularity", "sampled:3",
                      "--no-telemetry", "--max-model-len", "64")
    assert dict(kv_extra_from_args(args)) == {settings.KEY_READ_TIMEOUT: 5.0,
                                              settings.KEY_READ_GRANULARITY: "sampled:3"}
    cfg = launch_config_from_args(args, tmp_path)
    assert cfg.telemetry_db is None and cfg.engine_args == ("--max-model-len", "64")
    sup = build_supervisor(cfg, tmp_path, ports_from_args(args))
    assert [c.name for c in sup.children] == ["prefill", "decode", "proxy"]
    for child, role in zip(sup.children[:2], ("kv_producer", "kv_consumer"), strict=True):
        kvt = kv_config_of(child.cmd)
        assert kvt["kv_role"] == role
        assert kvt["kv_connector_extra_config"] == {
            **dict(default_kv_extra(len(os.sched_getaffinity(0)))),
            settings.KEY_READ_TIMEOUT: 5.0, settings.KEY_READ_GRANULARITY: "sampled:3"}
    assert sup.children[0].env[settings.ENV_SIDE_CHANNEL_PORT] == str(settings.PORT_PREFILL_SIDE_CHANNEL)
    assert sup.children[1].env[settings.ENV_SIDE_CHANNEL_PORT] == str(settings.PORT_DECODE_SIDE_CHANNEL)


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--kv-read-timeout", "0", "must be > 0 seconds"),
    ("--kv-read-granularity", "sometimes", "--kv-read-granularity"),
])
def test_serve_rejects_bad_kv_options(flag: str, value: str, message: str):
    with pytest.raises(SystemExit, match=message):
        kv_extra_from_args(serve_args("/m", flag, value))


def test_telemetry_db_defaults_to_the_run_dir(tmp_path: Path):
    cfg = launch_config_from_args(serve_args("/m"), tmp_path / "run")
    assert cfg.telemetry_db == str((tmp_path / "run" / "telemetry.db").resolve())
    sup = build_supervisor(cfg, tmp_path / "run", Ports())
    proxy = sup.children[-1].cmd
    assert proxy[proxy.index("--telemetry-db") + 1] == cfg.telemetry_db
    assert sup.children[0].env[settings.ENV_TELEMETRY_DB] == cfg.telemetry_db
    assert sup.children[0].env[settings.ENV_ROLE] == "prefill"


def test_proxy_command_points_at_p_and_d():
    cmd = proxy_command(LaunchConfig(model="m"), Ports(), 7.0, python="py")
    assert cmd[:4] == ["py", "-m", "hybrid_pd.cli", "proxy"]
    assert cmd[cmd.index("--prefill-url") + 1] == f"http://127.0.0.1:{settings.PORT_PREFILL}"
    assert cmd[cmd.index("--decode-url") + 1] == f"http://127.0.0.1:{settings.PORT_DECODE}"
    assert cmd[cmd.index("--port") + 1] == str(settings.PORT_PROXY)
    assert cmd[cmd.index("--timeout") + 1] == "7.0" and "--telemetry-db" not in cmd


def test_reference_supervisor_is_one_plain_engine(tmp_path: Path):
    sup = build_reference_supervisor(LaunchConfig(model="m"), tmp_path, Ports().reference)
    (child,) = sup.children
    assert child.name == "reference" and "--kv-transfer-config" not in child.cmd
    assert child.health_url == f"http://127.0.0.1:{Ports().reference}/health"


# -- the supervisor on plain Python children ----------------------------------------------


def python_child(tmp: Path, name: str, code: str) -> Child:
    return Child(name, [sys.executable, "-c", code], {}, tmp / f"{name}.log",
                 f"http://127.0.0.1:{free_port()}/health")


def test_child_that_dies_while_starting_is_named_with_its_log(tmp_path: Path):
    sup = Supervisor(tmp_path)
    sup.add(python_child(tmp_path, "p", "print('no such model', flush=True); raise SystemExit(3)"))
    with sup:
        sup.start()
        with pytest.raises(LaunchError, match=r"p exited with code 3 while starting") as err:
            sup.wait_healthy(30, progress=False)
    assert "no such model" in str(err.value)
    assert sup.dead() == sup.children


def test_slow_child_times_out_and_is_stopped(tmp_path: Path, capsys: pytest.CaptureFixture):
    sup = Supervisor(tmp_path)
    child = sup.add(python_child(tmp_path, "d", "import time; time.sleep(60)"))
    with sup:
        sup.start()
        with pytest.raises(LaunchError, match=r"not healthy after 0 s: d"):
            sup.wait_healthy(0)
    assert child.proc is not None and child.proc.poll() is not None  # stopped on exit
    assert "[hybrid-pd]" in (err := capsys.readouterr().err) and "d: starting" in err


# -- exposure: the proxy's address is its own; engines, logs and spans stay private --------


def test_engines_and_side_channels_bind_the_engine_host_not_the_proxy_host(tmp_path: Path):
    args = serve_args("/m", "--host", "0.0.0.0", "--no-telemetry")
    cfg = launch_config_from_args(args, tmp_path)
    assert (cfg.host, cfg.engine_host) == ("0.0.0.0", E.DEFAULT_HOST)
    sup = build_supervisor(cfg, tmp_path, ports_from_args(args))
    for child in sup.children[:2]:  # P and D
        assert child.cmd[child.cmd.index("--host") + 1] == "127.0.0.1"
        assert child.env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "127.0.0.1"
    proxy = sup.children[2]
    assert proxy.cmd[proxy.cmd.index("--host") + 1] == "0.0.0.0"
    assert proxy.cmd[proxy.cmd.index("--prefill-url") + 1].startswith("http://127.0.0.1:")
    assert proxy.health_url.startswith("http://127.0.0.1:")  # 0.0.0.0 is reached via loopback
    # an explicit engine host (a private network) is used for engines, side channels, URLs
    cfg = launch_config_from_args(serve_args("/m", "--engine-host", "10.77.0.2", "--no-telemetry"),
                                  tmp_path)
    sup = build_supervisor(cfg, tmp_path, Ports())
    assert sup.children[0].env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "10.77.0.2"
    assert sup.children[0].health_url.startswith("http://10.77.0.2:")
    assert sup.children[2].cmd[sup.children[2].cmd.index("--host") + 1] == E.DEFAULT_HOST


def test_run_dir_logs_and_span_database_are_owner_only(tmp_path: Path):
    run = tmp_path / "run"
    cfg = launch_config_from_args(serve_args("/m"), run)
    assert oct(run.stat().st_mode & 0o777) == "0o700"
    assert oct(Path(cfg.telemetry_db).stat().st_mode & 0o777) == "0o600"
    sup = Supervisor(tmp_path / "run2")
    sup.add(python_child(tmp_path / "run2", "c", "print('hi')"))
    with sup:
        sup.start()
    assert oct((tmp_path / "run2").stat().st_mode & 0o777) == "0o700"
    assert oct((tmp_path / "run2" / "c.log").stat().st_mode & 0o777) == "0o600"


def test_api_key_reaches_every_child_by_environment_never_by_command_line(tmp_path: Path,
                                                                         monkeypatch):
    monkeypatch.delenv(settings.ENV_API_KEY, raising=False)
    cfg = launch_config_from_args(serve_args("/m", "--api-key", "sk-secret", "--no-telemetry"),
                                  tmp_path)
    assert "sk-secret" not in repr(cfg)
    sup = build_supervisor(cfg, tmp_path, Ports())
    for child in sup.children:  # P, D and the proxy
        assert child.env[settings.ENV_API_KEY] == "sk-secret", child.name
        assert not any("sk-secret" in part for part in child.cmd), child.cmd
    # from the environment alone, as vLLM reads it
    monkeypatch.setenv(settings.ENV_API_KEY, "sk-env")
    assert launch_config_from_args(serve_args("/m", "--no-telemetry"), tmp_path).api_key == "sk-env"
    with pytest.raises(SystemExit, match="without spaces"):
        launch_config_from_args(serve_args("/m", "--api-key", "two words", "--no-telemetry"),
                                tmp_path)


# -- multi-host: one engine per host (serve --role), the router in front (proxy) ------------


def role_supervisor(tmp_path: Path, *argv: str):
    from hybrid_pd.serve.cli import supervisor_from_args

    args = serve_args("/m", *argv)
    cfg = launch_config_from_args(args, tmp_path)
    return args, cfg, supervisor_from_args(args, cfg, tmp_path)


def test_serve_role_prefill_builds_one_engine_and_no_proxy(tmp_path: Path, monkeypatch):
    monkeypatch.delenv(E.ENV_SIDE_CHANNEL_HOST, raising=False)
    args, cfg, sup = role_supervisor(tmp_path, "--role", "prefill", "--engine-host", "10.0.0.5",
                                     "--prefill-side-channel-port", "5611")
    (p,) = sup.children  # P alone: no D, no proxy
    assert p.name == "prefill" and not any("proxy" in part for part in p.cmd)
    assert kv_config_of(p.cmd)["kv_role"] == "kv_producer"
    assert p.cmd[p.cmd.index("--host") + 1] == "10.0.0.5"
    assert p.cmd[p.cmd.index("--port") + 1] == str(settings.PORT_PREFILL)
    # the side channel D is told to connect to: this host's address, the chosen port
    assert p.env[E.ENV_SIDE_CHANNEL_HOST] == "10.0.0.5" and p.env[settings.ENV_SIDE_CHANNEL_PORT] == "5611"
    assert p.health_url == f"http://10.0.0.5:{settings.PORT_PREFILL}/health"
    # its telemetry, as the all-in-one serve gives P
    assert p.env[settings.ENV_TELEMETRY_DB] == cfg.telemetry_db and p.env[settings.ENV_ROLE] == "prefill"
    if E.ENV_CPU_THREADS_BIND not in os.environ:  # the whole machine is this engine's
        cores = sorted(os.sched_getaffinity(0))
        assert p.env[E.ENV_CPU_THREADS_BIND] == plan_cpu_binding([("prefill", 1)], cores, "split")["prefill"]


def test_serve_role_decode_on_every_interface_with_an_explicit_side_channel(tmp_path: Path,
                                                                            monkeypatch):
    from hybrid_pd.serve.cli import describe_engine

    monkeypatch.setenv(E.ENV_SIDE_CHANNEL_HOST, "127.0.0.1")  # the flag wins over it
    args, cfg, sup = role_supervisor(tmp_path, "--role", "decode", "--host", "0.0.0.0",
                                     "--side-channel-host", "10.0.0.6", "--decode-port", "8201",
                                     "--no-telemetry")
    (d,) = sup.children
    assert d.name == "decode" and kv_config_of(d.cmd)["kv_role"] == "kv_consumer"
    assert d.cmd[d.cmd.index("--host") + 1] == "0.0.0.0"  # --host names the engine with --role
    assert d.env[E.ENV_SIDE_CHANNEL_HOST] == "10.0.0.6"
    assert d.env[settings.ENV_SIDE_CHANNEL_PORT] == str(settings.PORT_DECODE_SIDE_CHANNEL)
    assert d.health_url == "http://127.0.0.1:8201/health"  # checked locally
    text = describe_engine(cfg, d, "decode")
    assert "decode engine serving on http://10.0.0.6:8201/v1" in text
    assert "NIXL side channel 10.0.0.6:5700" in text and "hybrid-pd proxy --decode http://10.0.0.6:8201" in text
    assert "loopback" not in text


def test_serve_role_refuses_a_side_channel_nobody_can_connect_to(tmp_path: Path, monkeypatch):
    monkeypatch.delenv(E.ENV_SIDE_CHANNEL_HOST, raising=False)
    with pytest.raises(SystemExit, match="--side-channel-host"):
        role_supervisor(tmp_path, "--role", "prefill", "--engine-host", "0.0.0.0", "--no-telemetry")
    with pytest.raises(SystemExit, match="give one"):
        role_supervisor(tmp_path, "--role", "prefill", "--host", "10.0.0.5", "--engine-host",
                        "10.0.0.6", "--no-telemetry")


def test_serve_role_defaults_to_all_and_loopback(tmp_path: Path):
    from hybrid_pd.serve.cli import describe_engine

    args, _, sup = role_supervisor(tmp_path, "--no-telemetry")
    assert args.role == "all" and [c.name for c in sup.children] == ["prefill", "decode", "proxy"]
    _, cfg, sup = role_supervisor(tmp_path, "--role", "decode", "--no-telemetry")
    (d,) = sup.children
    assert d.env[E.ENV_SIDE_CHANNEL_HOST] == os.environ.get(E.ENV_SIDE_CHANNEL_HOST, "127.0.0.1")
    assert "loopback: reachable from this host only" in describe_engine(cfg, d, "decode")


def proxy_config(*argv: str):
    from hybrid_pd.serve.proxy_cli import config_from_args

    return config_from_args(cli.build_parser("proxy").parse_args(["proxy", *argv]))


def test_proxy_cli_takes_pools_and_keeps_the_one_url_flags():
    cfg = proxy_config("--prefill", "http://a:1", "http://b:1/", "--decode", "http://c:1",
                       "--policy", "round-robin", "--kv-aware", "--health-interval", "2")
    assert cfg.urls("prefill") == ("http://a:1", "http://b:1") and cfg.urls("decode") == ("http://c:1",)
    assert (cfg.policy, cfg.kv_aware, cfg.health_interval_s) == ("round-robin", True, 2.0)
    old = proxy_config("--prefill-url", "http://a:1", "--decode-url", "http://c:1")
    assert (old.urls("prefill"), old.urls("decode")) == (("http://a:1",), ("http://c:1",))
    assert (old.policy, old.kv_aware) == ("least-outstanding", False)
    mixed = proxy_config("--prefill-url", "http://a:1", "--prefill", "http://b:1", "--decode", "http://c:1")
    assert mixed.urls("prefill") == ("http://a:1", "http://b:1")
    # what the all-in-one serve starts its proxy with still parses to one P and one D
    cmd = proxy_command(LaunchConfig(model="m"), Ports(), 7.0, python="py")
    one = proxy_config(*cmd[4:])
    assert one.urls("prefill") == (f"http://127.0.0.1:{settings.PORT_PREFILL}",)
    assert one.urls("decode") == (f"http://127.0.0.1:{settings.PORT_DECODE}",) and one.timeout_s == 7.0


@pytest.mark.parametrize(("argv", "message"), [
    (("--decode", "http://c:1"), "at least one --prefill"),
    (("--prefill", "http://a:1"), "at least one --decode"),
    (("--prefill", "a:1", "--decode", "http://c:1"), "not an http"),
    (("--prefill", "http://a:1", "http://a:1/", "--decode", "http://c:1"), "twice"),
    (("--prefill", "http://a:1", "--decode", "http://a:1"), "one KV role"),
    (("--prefill", "http://a:1", "--decode", "http://c:1", "--health-interval", "0"), "> 0"),
])
def test_proxy_cli_refuses_bad_pools(argv, message):
    with pytest.raises(SystemExit, match=message):
        proxy_config(*argv)
