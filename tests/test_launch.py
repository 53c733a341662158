"""Launch planning: engine commands, kv-transfer config, CPU binding (pure, no engines)."""

from __future__ import annotations

import json

import pytest

from hybrid_pd.launch import (
    EngineSpec,
    LaunchConfig,
    default_kv_extra,
    engine_command,
    engine_env,
    kv_transfer_config,
    plan_cpu_binding,
)


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
    assert json.loads(cmd[cmd.index("--kv-transfer-config") + 1])["kv_role"] == "kv_producer"
    assert cmd[-2:] == ["--max-model-len", "4096"] and "--enforce-eager" in cmd
    extra = json.loads(cmd[cmd.index("--kv-transfer-config") + 1])["kv_connector_extra_config"]
    assert extra["kv_lease_duration"] == 120
    ref = engine_command(LaunchConfig(model="/m", enforce_eager=False), EngineSpec("reference", "single", 1), python="py")
    assert "--kv-transfer-config" not in ref and "--enforce-eager" not in ref


def test_default_kv_extra_limits_nixl_threads_on_small_machines():
    assert dict(default_kv_extra(2)) == {"kv_lease_duration": 120, "num_threads": 1,
                                         "hybrid_read_timeout_s": 60.0}
    assert dict(default_kv_extra(64, lease_s=45, read_timeout_s=5)) == {
        "kv_lease_duration": 45, "hybrid_read_timeout_s": 5}


def test_engine_env_ports_binding_and_reference_layout():
    cfg = LaunchConfig(model="/m")
    env = engine_env(cfg, EngineSpec("decode", "decode", 1, side_channel_port=5700), {}, "1")
    assert env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "5700" and env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "127.0.0.1"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "1" and env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    # the user's own binding and cache size win
    env = engine_env(cfg, EngineSpec("decode", "decode", 1), {"VLLM_CPU_OMP_THREADS_BIND": "0-3",
                                                              "VLLM_CPU_KVCACHE_SPACE": "8"}, "1")
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-3" and env["VLLM_CPU_KVCACHE_SPACE"] == "8"
    ref = engine_env(cfg, EngineSpec("reference", "single", 1), {}, None)
    assert ref["VLLM_SSM_CONV_STATE_LAYOUT"] == "DS" and "VLLM_CPU_OMP_THREADS_BIND" not in ref


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
    cfg = LaunchConfig(model="m", kv_extra=(("kv_lease_duration", 5),))
    cmd = engine_command(cfg, EngineSpec("decode", "decode", 8200, 1, 5700))
    kvt = json.loads(cmd[cmd.index("--kv-transfer-config") + 1])
    extra = kvt["kv_connector_extra_config"]
    assert extra["kv_lease_duration"] == 5 and extra["hybrid_read_timeout_s"] == 60.0
    assert kvt["kv_connector"] == "HybridNixlConnector"  # ours is the default
