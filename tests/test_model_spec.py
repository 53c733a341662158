"""config.json parsing for the planner.  No GPU or NIXL required."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hybrid_pd.planner.model_spec import (
    DTYPE_SIZES,
    LayerKind,
    dtype_size,
    spec_from_hf_config,
)

TINY = json.loads((Path(__file__).parent / "data" / "tiny_nemotron_h_config.json").read_text())
A, M, X = LayerKind.ATTENTION, LayerKind.MAMBA, LayerKind.OTHER


def test_tiny_nemotron_h() -> None:
    spec = spec_from_hf_config(TINY)
    # "M-M*-M*-": Mamba at 0, 2, 5; attention at 3, 6; MLP elsewhere.
    assert [k for _, k in spec.cache_layers] == [M, X, M, A, X, M, A, X]
    assert spec.mamba_layers == (0, 2, 5) and spec.attention_layers == (3, 6)
    assert (spec.num_kv_heads, spec.head_dim) == (4, 32)
    assert (spec.mamba_num_heads, spec.mamba_head_dim, spec.n_groups) == (8, 64, 1)
    assert (spec.d_state, spec.conv_kernel) == (64, 4)
    # conv_dim = 8*64 + 2*1*64 = 640
    assert spec.conv_dim == 640
    assert (spec.kv_dtype, spec.conv_dtype, spec.ssm_dtype) == ("bfloat16", "bfloat16", "float32")


def test_nemotron_8b_counts() -> None:
    cfg = json.loads((Path(__file__).parent / "data" / "nemotron-h-8b.config.json").read_text())
    spec = spec_from_hf_config(cfg)
    assert len(spec.mamba_layers) == 24 and len(spec.attention_layers) == 4
    # conv_dim = 128*64 + 2*8*128 = 10240 (its public config)
    assert spec.conv_dim == 10240


def test_layers_block_type_and_dtype_overrides() -> None:
    cfg = dict(TINY)
    del cfg["hybrid_override_pattern"]
    cfg["layers_block_type"] = ["linear_attention", "mlp", "full_attention", "moe"]
    spec = spec_from_hf_config(cfg, kv_dtype="fp8", ssm_dtype="bf16", conv_dtype="float32")
    assert [k for _, k in spec.cache_layers] == [M, X, A, X]
    assert (spec.kv_dtype_size, spec.ssm_dtype_size, spec.conv_dtype_size) == (1, 2, 4)
    assert DTYPE_SIZES["bfloat16"] == dtype_size("torch.bfloat16") == 2


def test_bamba_granite_falcon() -> None:
    common = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
              "mamba_n_heads": 8, "mamba_n_groups": 1, "mamba_d_state": 16,
              "mamba_d_conv": 4, "mamba_expand": 2, "num_hidden_layers": 3}
    bamba = spec_from_hf_config({**common, "model_type": "bamba", "attn_layer_indices": [1],
                                 "mamba_d_head": "auto"})
    assert [k for _, k in bamba.cache_layers] == [M, A, M]
    assert bamba.mamba_head_dim == 2 * 64 // 8 == 16 and bamba.head_dim == 16
    granite = spec_from_hf_config({**common, "model_type": "granitemoehybrid",
                                   "layer_types": ["mamba", "attention", "mamba"]})
    assert granite.mamba_layers == (0, 2)
    falcon = spec_from_hf_config({**common, "model_type": "falcon_h1", "mamba_d_ssm": 64,
                                  "mamba_d_head": 8})
    # Parallel hybrid: each decoder layer is one attention and one Mamba cache layer.
    assert falcon.cache_layers[:2] == ((0, A), (0, M)) and len(falcon.cache_layers) == 6
    assert falcon.intermediate_size == 64


@pytest.mark.parametrize(
    ("drop", "field"),
    [("mamba_num_heads", "mamba_num_heads"), ("ssm_state_size", "ssm_state_size"),
     ("num_attention_heads", "num_attention_heads"), ("conv_kernel", "conv_kernel")],
)
def test_missing_field_is_named(drop: str, field: str) -> None:
    cfg = {k: v for k, v in TINY.items() if k != drop}
    with pytest.raises(ValueError, match=field):
        spec_from_hf_config(cfg)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="model_type"):
        spec_from_hf_config({})
    with pytest.raises(ValueError, match="unsupported model_type 'llama'"):
        spec_from_hf_config({"model_type": "llama", "num_attention_heads": 4})
    with pytest.raises(ValueError, match="unknown characters"):
        spec_from_hf_config({**TINY, "hybrid_override_pattern": "MX*"})
    with pytest.raises(ValueError, match="at least one attention"):
        spec_from_hf_config({**TINY, "hybrid_override_pattern": "MM--"})
    with pytest.raises(ValueError, match="attn_layer_indices"):
        spec_from_hf_config({"model_type": "bamba", "num_attention_heads": 4, "hidden_size": 64,
                             "num_hidden_layers": 2, "mamba_n_heads": 8, "mamba_expand": 2,
                             "mamba_n_groups": 1, "mamba_d_state": 16, "mamba_d_conv": 4})
    with pytest.raises(ValueError, match="unknown dtype"):
        spec_from_hf_config(TINY, kv_dtype="float128")
