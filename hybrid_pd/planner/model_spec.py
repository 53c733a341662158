"""Model description for the planner: a Hugging Face ``config.json`` dict in, a frozen
:class:`HybridModelSpec` out.

Pure: no torch, vLLM or NIXL import, no I/O.  Only the fields that
decide the KV-cache layout are read: which layers carry attention KV and which carry
a Mamba2 state, the attention KV heads and head size, the Mamba2 heads, head size,
groups, state size and conv kernel, and the cache dtypes.

Supported families (field names checked against transformers 5.19):

* NemotronH: ``hybrid_override_pattern`` (``M`` Mamba2, ``*`` attention, ``-`` MLP,
  ``E`` MoE) or the newer ``layers_block_type`` list; ``mamba_num_heads``,
  ``mamba_head_dim``, ``n_groups``, ``ssm_state_size``, ``conv_kernel``.
* Bamba: ``attn_layer_indices``; ``mamba_n_heads``, ``mamba_d_head``,
  ``mamba_n_groups``, ``mamba_d_state``, ``mamba_d_conv``, ``mamba_expand``.
* GraniteMoeHybrid: ``layer_types``; same ``mamba_*`` fields as Bamba.
* FalconH1: every decoder layer runs attention and Mamba2 in parallel, so each layer
  contributes one attention cache layer and one Mamba cache layer (vLLM registers
  ``layers.i.self_attn.attn`` and ``layers.i.mamba``).

A missing field raises ``ValueError`` naming the field and the model type.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, NamedTuple

# Bytes per element.  vLLM's ``get_dtype_size`` over the cache dtypes we can meet.
DTYPE_SIZES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "fp8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}

# Aliases accepted on input (HF configs say "float", torch says "half", ...).
_DTYPE_ALIASES: dict[str, str] = {
    "float": "float32",
    "fp32": "float32",
    "half": "float16",
    "fp16": "float16",
    "bf16": "bfloat16",
}


def normalize_dtype(name: str) -> str:
    """Canonical dtype name, or ``ValueError`` listing the known ones."""
    key = str(name).removeprefix("torch.").lower()
    key = _DTYPE_ALIASES.get(key, key)
    if key not in DTYPE_SIZES:
        raise ValueError(f"unknown dtype {name!r}; known: {sorted(DTYPE_SIZES)}")
    return key


def dtype_size(name: str) -> int:
    return DTYPE_SIZES[normalize_dtype(name)]


class LayerKind(StrEnum):
    """What KV-cache state a cache layer keeps."""

    ATTENTION = "attention"
    MAMBA = "mamba"
    OTHER = "other"  # MLP / MoE: no cache


@dataclass(frozen=True)
class HybridModelSpec:
    """Everything the layout planner needs about one hybrid model (global, unsharded)."""

    model_type: str
    # One entry per *cache layer* in model order: (decoder layer index, kind).  For
    # NemotronH this is one per decoder layer (MLP layers appear as OTHER); for
    # FalconH1 a decoder layer appears twice (attention, then mamba).
    cache_layers: tuple[tuple[int, LayerKind], ...]
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    mamba_num_heads: int
    mamba_head_dim: int
    n_groups: int
    d_state: int
    conv_kernel: int
    kv_dtype: str = "bfloat16"
    conv_dtype: str = "bfloat16"
    ssm_dtype: str = "float32"
    chunk_size: int = 128
    dtype_sizes: tuple[tuple[str, int], ...] = field(
        default=tuple(sorted(DTYPE_SIZES.items())), repr=False
    )

    def __post_init__(self) -> None:
        for name in (
            "num_attention_heads",
            "num_kv_heads",
            "head_dim",
            "mamba_num_heads",
            "mamba_head_dim",
            "n_groups",
            "d_state",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{self.model_type}: {name} must be a positive int, got {value!r}")
        if not isinstance(self.conv_kernel, int) or self.conv_kernel < 2:
            raise ValueError(f"{self.model_type}: conv_kernel must be >= 2, got {self.conv_kernel!r}")
        if self.mamba_num_heads % self.n_groups:
            raise ValueError(
                f"{self.model_type}: mamba heads ({self.mamba_num_heads}) must be a multiple "
                f"of n_groups ({self.n_groups})"
            )
        for name in ("kv_dtype", "conv_dtype", "ssm_dtype"):
            object.__setattr__(self, name, normalize_dtype(getattr(self, name)))
        if not self.attention_layers or not self.mamba_layers:
            raise ValueError(
                f"{self.model_type}: a hybrid model needs at least one attention and one "
                f"Mamba layer; got {len(self.attention_layers)} attention and "
                f"{len(self.mamba_layers)} Mamba"
            )

    # -- derived sizes (global, TP=1) -------------------------------------------------
    @property
    def attention_layers(self) -> tuple[int, ...]:
        """Indices into ``cache_layers`` of the attention cache layers."""
        return tuple(i for i, (_, k) in enumerate(self.cache_layers) if k is LayerKind.ATTENTION)

    @property
    def mamba_layers(self) -> tuple[int, ...]:
        return tuple(i for i, (_, k) in enumerate(self.cache_layers) if k is LayerKind.MAMBA)

    @property
    def intermediate_size(self) -> int:
        """Mamba2 x width = heads * head_dim (vLLM's ``intermediate_size``)."""
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def conv_dim(self) -> int:
        """Global conv channels: ``[x | B | C]`` = intermediate + 2 * n_groups * d_state."""
        return self.intermediate_size + 2 * self.n_groups * self.d_state

    @property
    def kv_dtype_size(self) -> int:
        return DTYPE_SIZES[self.kv_dtype]

    @property
    def conv_dtype_size(self) -> int:
        return DTYPE_SIZES[self.conv_dtype]

    @property
    def ssm_dtype_size(self) -> int:
        return DTYPE_SIZES[self.ssm_dtype]

    def with_dtypes(
        self,
        *,
        kv_dtype: str | None = None,
        conv_dtype: str | None = None,
        ssm_dtype: str | None = None,
    ) -> HybridModelSpec:
        return replace(
            self,
            kv_dtype=kv_dtype or self.kv_dtype,
            conv_dtype=conv_dtype or self.conv_dtype,
            ssm_dtype=ssm_dtype or self.ssm_dtype,
        )


# ---------------------------------------------------------------------------------
# config.json parsing
# ---------------------------------------------------------------------------------

_PATTERN_KINDS: dict[str, LayerKind] = {
    "M": LayerKind.MAMBA,
    "*": LayerKind.ATTENTION,
    "-": LayerKind.OTHER,
    "E": LayerKind.OTHER,
}

# Layer-type names across transformers versions (legacy and the 5.x convention).
_TYPE_NAMES: dict[str, LayerKind] = {
    "mamba": LayerKind.MAMBA,
    "mamba2": LayerKind.MAMBA,
    "linear_attention": LayerKind.MAMBA,
    "attention": LayerKind.ATTENTION,
    "full_attention": LayerKind.ATTENTION,
    "mlp": LayerKind.OTHER,
    "moe": LayerKind.OTHER,
}


def _need(cfg: dict[str, Any], model_type: str, *names: str) -> Any:
    """First present field among ``names``; ValueError naming them all otherwise."""
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    shown = " or ".join(repr(n) for n in names)
    raise ValueError(f"{model_type} config.json is missing field {shown}")


def _kinds_from_types(types: Any, model_type: str, field_name: str) -> list[LayerKind]:
    if not isinstance(types, (list, tuple)):
        raise ValueError(f"{model_type}: {field_name!r} must be a list, got {type(types).__name__}")
    kinds = []
    for t in types:
        kind = _TYPE_NAMES.get(str(t).lower())
        if kind is None:
            raise ValueError(
                f"{model_type}: unknown layer type {t!r} in {field_name!r}; "
                f"known: {sorted(_TYPE_NAMES)}"
            )
        kinds.append(kind)
    return kinds


def _attention_fields(cfg: dict[str, Any], model_type: str) -> tuple[int, int, int]:
    heads = int(_need(cfg, model_type, "num_attention_heads"))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = cfg.get("head_dim") or cfg.get("attention_head_dim")
    if head_dim is None:
        head_dim = int(_need(cfg, model_type, "head_dim", "hidden_size")) // heads
    return heads, kv_heads, int(head_dim)


def _mamba_head_dim(cfg: dict[str, Any], model_type: str, heads: int, intermediate: int) -> int:
    d_head = cfg.get("mamba_d_head", "auto")
    if d_head in (None, "auto"):
        return intermediate // heads
    return int(d_head)


class _MambaFields(NamedTuple):
    heads: int
    head_dim: int
    n_groups: int
    d_state: int
    conv_kernel: int


def _model_type(cfg: dict[str, Any]) -> tuple[str, bool]:
    """``(model_type, is_nemotron)``; ValueError for a missing or unsupported type."""
    if not isinstance(cfg, dict):
        raise ValueError(f"config must be a JSON object, got {type(cfg).__name__}")
    model_type = str(cfg.get("model_type") or "")
    arch = " ".join(cfg.get("architectures") or [])
    if not model_type:
        raise ValueError("config.json is missing field 'model_type'")
    is_nemotron = model_type == "nemotron_h" or "NemotronH" in arch
    if not is_nemotron and model_type not in ("bamba", "granitemoehybrid", "falcon_h1"):
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: nemotron_h, bamba, "
            "granitemoehybrid, falcon_h1"
        )
    return model_type, is_nemotron


def _nemotron_layers(cfg: dict[str, Any], model_type: str) -> list[tuple[int, LayerKind]]:
    if cfg.get("hybrid_override_pattern") is not None:
        pattern = str(cfg["hybrid_override_pattern"])
        bad = sorted(set(pattern) - set(_PATTERN_KINDS))
        if bad:
            raise ValueError(
                f"{model_type}: hybrid_override_pattern has unknown characters {bad}; "
                "expected M (Mamba2), * (attention), - (MLP), E (MoE)"
            )
        kinds = [_PATTERN_KINDS[c] for c in pattern]
    else:
        types = _need(cfg, model_type, "hybrid_override_pattern", "layers_block_type", "layer_types")
        kinds = _kinds_from_types(types, model_type, "layers_block_type")
    return list(enumerate(kinds))


def _nemotron_mamba(cfg: dict[str, Any], model_type: str) -> _MambaFields:
    return _MambaFields(
        heads=int(_need(cfg, model_type, "mamba_num_heads")),
        head_dim=int(_need(cfg, model_type, "mamba_head_dim")),
        n_groups=int(_need(cfg, model_type, "n_groups")),
        d_state=int(_need(cfg, model_type, "ssm_state_size")),
        conv_kernel=int(_need(cfg, model_type, "conv_kernel")),
    )


def _bamba_family_mamba(cfg: dict[str, Any], model_type: str) -> _MambaFields:
    """Bamba, GraniteMoeHybrid and FalconH1 share the ``mamba_*`` field names."""
    hidden = int(_need(cfg, model_type, "hidden_size"))
    heads = int(_need(cfg, model_type, "mamba_n_heads"))
    if model_type == "falcon_h1" and cfg.get("mamba_d_ssm") is not None:
        intermediate = int(cfg["mamba_d_ssm"])
    else:
        intermediate = int(_need(cfg, model_type, "mamba_expand")) * hidden
    return _MambaFields(
        heads=heads,
        head_dim=_mamba_head_dim(cfg, model_type, heads, intermediate),
        n_groups=int(_need(cfg, model_type, "mamba_n_groups")),
        d_state=int(_need(cfg, model_type, "mamba_d_state")),
        conv_kernel=int(_need(cfg, model_type, "mamba_d_conv")),
    )


def _bamba_family_layers(
    cfg: dict[str, Any], model_type: str, num_layers: int
) -> list[tuple[int, LayerKind]]:
    if model_type == "bamba":
        attn = set(int(i) for i in _need(cfg, model_type, "attn_layer_indices"))
        return [
            (i, LayerKind.ATTENTION if i in attn else LayerKind.MAMBA) for i in range(num_layers)
        ]
    if model_type == "granitemoehybrid":
        types = _need(cfg, model_type, "layer_types", "layers_block_type")
        kinds = _kinds_from_types(types, model_type, "layer_types")
        if len(kinds) != num_layers:
            raise ValueError(
                f"{model_type}: layer_types has {len(kinds)} entries but "
                f"num_hidden_layers is {num_layers}"
            )
        return list(enumerate(kinds))
    # FalconH1: attention and Mamba2 side by side in every decoder layer.
    cache_layers = []
    for i in range(num_layers):
        cache_layers.append((i, LayerKind.ATTENTION))
        cache_layers.append((i, LayerKind.MAMBA))
    return cache_layers


def spec_from_hf_config(
    cfg: dict[str, Any],
    *,
    kv_dtype: str | None = None,
    conv_dtype: str | None = None,
    ssm_dtype: str | None = None,
) -> HybridModelSpec:
    """Parse a Hugging Face config dict of a Mamba2 hybrid.

    Dtypes default to KV bfloat16, conv bfloat16, SSM float32 (Nemotron-H's
    ``mamba_ssm_cache_dtype``); a config's ``mamba_ssm_cache_dtype`` is honoured, and
    the keyword arguments override everything.
    """
    model_type, is_nemotron = _model_type(cfg)
    heads, kv_heads, head_dim = _attention_fields(cfg, model_type)
    if is_nemotron:
        cache_layers = _nemotron_layers(cfg, model_type)
        mamba = _nemotron_mamba(cfg, model_type)
    else:
        num_layers = int(_need(cfg, model_type, "num_hidden_layers"))
        mamba = _bamba_family_mamba(cfg, model_type)
        cache_layers = _bamba_family_layers(cfg, model_type, num_layers)

    default_ssm = cfg.get("mamba_ssm_cache_dtype") or "float32"
    if default_ssm == "auto":
        default_ssm = "float32"
    return HybridModelSpec(
        model_type=model_type,
        cache_layers=tuple(cache_layers),
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        mamba_num_heads=mamba.heads,
        mamba_head_dim=mamba.head_dim,
        n_groups=mamba.n_groups,
        d_state=mamba.d_state,
        conv_kernel=mamba.conv_kernel,
        kv_dtype=kv_dtype or "bfloat16",
        conv_dtype=conv_dtype or "bfloat16",
        ssm_dtype=ssm_dtype or str(default_ssm),
        chunk_size=int(cfg.get("chunk_size") or cfg.get("mamba_chunk_size") or 128),
    )
