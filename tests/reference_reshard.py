"""Reference resharder (re-export): the oracle lives in :mod:`hybrid_pd.planner.reshard`
so that the NIXL bench's rank processes can use it at runtime.  No GPU or NIXL required."""

from hybrid_pd.planner.reshard import (
    FILL,
    FullState,
    RankPages,
    apply_plan,
    compare,
    make_full_state,
    shard_rank,
)

__all__ = ["FILL", "FullState", "RankPages", "apply_plan", "compare", "make_full_state", "shard_rank"]
