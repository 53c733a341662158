"""KV integrity digests (hybrid_pd.transfer.integrity): policy parsing and sampling,
digests over memory by address, labels per (layer, view), compare, wire form.

No GPU or NIXL required: a READ is emulated by copying each planned unit descriptor
from P's numpy regions into D's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import numpy as np
import pytest
import xxhash

from hybrid_pd.bench.case import build_case, make_init
from hybrid_pd.planner.model_spec import LayerKind
from hybrid_pd.planner.templates import peer_templates
from hybrid_pd.planner.views import to_addr_descs
from hybrid_pd.settings import DEFAULT_KV_INTEGRITY
from hybrid_pd.transfer.integrity import (
    VIEW_OF_RUN,
    VIEWS,
    IntegrityPolicy,
    KVDigest,
    Labels,
    Mismatch,
    compare,
    digest_descs,
    digest_rows,
    plan_labels,
    unit_views,
)

HERE = Path(__file__).parent
TINY = json.loads((HERE / "data" / "tiny_nemotron_h_config.json").read_text())
NEMO = json.loads((HERE / "data" / "nemotron-h-8b.config.json").read_text())
PAIRS = [(1, 1), (1, 2), (2, 1), (2, 4), (4, 2)]


# ----------------------------------------------------------------------------- policy


@pytest.mark.parametrize(("value", "mode", "k"), [
    ("off", "off", 0), ("every", "every", 0), ("sampled:1", "sampled", 1),
    ("sampled:16", "sampled", 16), ("sampled:1000", "sampled", 1000),
])
def test_policy_parses(value: str, mode: str, k: int) -> None:
    p = IntegrityPolicy.parse(value)
    assert (p.mode, p.k) == (mode, k)
    assert str(p) == value  # canonical form round-trips
    assert p.enabled == (mode != "off")


def test_policy_default_is_off() -> None:
    assert DEFAULT_KV_INTEGRITY == "off"
    assert IntegrityPolicy() == IntegrityPolicy.parse(DEFAULT_KV_INTEGRITY)
    assert not IntegrityPolicy().selects("any request")


@pytest.mark.parametrize("bad", ["", "on", "Every", "sampled", "sampled:", "sampled:0",
                                 "sampled:-1", "sampled:x", "sampled:1.5", "sampled: 4",
                                 "sampled:+4", "every:2"])
def test_policy_refuses(bad: str) -> None:
    with pytest.raises(ValueError) as err:
        IntegrityPolicy.parse(bad)
    msg = str(err.value)
    assert repr(bad) in msg, msg  # names the bad value
    assert "'off', 'every' or 'sampled:K'" in msg, msg  # and the accepted forms


def test_sampling_deterministic_and_about_one_in_k() -> None:
    ids = [f"cmpl-{i:06d}-0" for i in range(20_000)]
    assert all(IntegrityPolicy.parse("every").selects(r) for r in ids[:100])
    assert not any(IntegrityPolicy.parse("off").selects(r) for r in ids[:100])
    assert all(IntegrityPolicy.parse("sampled:1").selects(r) for r in ids[:100])
    for k, tol in ((2, 0.05), (16, 0.15), (100, 0.25)):
        p = IntegrityPolicy.parse(f"sampled:{k}")
        picked = [p.selects(r) for r in ids]
        assert picked == [p.selects(r) for r in ids]  # same answer on every call
        assert [p.selects(r.encode()) for r in ids[:500]] == picked[:500]  # str == bytes key
        rate = sum(picked) / len(ids)
        assert abs(rate - 1 / k) <= tol / k, f"sampled:{k}: rate {rate:.4f}, expected ~{1 / k:.4f}"


def test_sampling_same_in_another_process() -> None:
    # P and D decide without talking: another interpreter (another hash seed) agrees.
    ids = [f"req-{i}" for i in range(300)]
    p = IntegrityPolicy.parse("sampled:7")
    code = ("import json,sys; from hybrid_pd.transfer.integrity import IntegrityPolicy as P;"
            "p=P.parse('sampled:7'); print(json.dumps([p.selects(r) for r in json.load(sys.stdin)]))")
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(ids), text=True,
                         capture_output=True, timeout=60,
                         env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [p.selects(r) for r in ids]


# ----------------------------------------------------------------------------- digests


def _rows(buf: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    base = buf.ctypes.data
    return np.asarray([(base + off, n, 0) for off, n in spans], np.uint64)


def test_digests_equal_for_equal_bytes_in_different_buffers() -> None:
    rng = np.random.default_rng(1234)
    a = rng.integers(0, 256, 1 << 16, dtype=np.uint8)
    b = a.copy()  # other memory, same bytes
    spans = [(0, 1), (1, 4095), (4096, 8192), (12_345, 7), (60_000, 5536)]
    da, db = digest_rows(_rows(a, spans)), digest_rows(_rows(b, spans))
    assert da.dtype == np.uint64 and len(da) == len(spans)
    assert np.array_equal(da, db)
    # Oracle: XXH3-64 of the bytes themselves (in place read == copied read).
    assert da.tolist() == [xxhash.xxh3_64_intdigest(a[o:o + n].tobytes()) for o, n in spans]
    b[12_345 + 3] ^= 0x01
    diff = np.flatnonzero(digest_rows(_rows(b, spans)) != da)
    assert diff.tolist() == [3]
    with pytest.raises(ValueError, match="nothing to read"):
        digest_rows([(a.ctypes.data, 0, 0)])


def test_unit_views_hand_arithmetic() -> None:
    # fa ["kv"], mamba ["conv", "ssm"], 2 regions, 4 kernel blocks, 4 logical blocks:
    # num_fa = 2 * 1 * 4 = 8 -> ids 0..7 KV; Mamba id 8 + (region * 2 + run) * 4 + block:
    # 8..11 conv (region 0), 12..15 SSM, 16..19 conv (region 1), 20..23 SSM.
    got = unit_views(np.arange(24), ["kv"], ["conv", "ssm"], num_regions=2,
                     num_phys_blocks=4, num_blocks=4)
    names = [VIEWS[v] for v in got]
    assert names == ["KV"] * 8 + ["conv"] * 4 + ["SSM"] * 4 + ["conv"] * 4 + ["SSM"] * 4, names
    # Split FA (k, v) and TP-sliced Mamba (x, B, C, ssm): FA id (region*2 + run)*N_phys + kb.
    got = unit_views(np.asarray([0, 3, 4, 7, 8, 12, 16, 17, 18, 19, 20, 24]), ["k", "v"],
                     ["x", "B", "C", "ssm"], num_regions=2, num_phys_blocks=4, num_blocks=1)
    # FA: 0..3 region 0 K, 4..7 region 0 V, 8..11 region 1 K, 12..15 region 1 V;
    # num_fa = 2*2*4 = 16; Mamba 16 + (r*4 + run)*1 -> 16 x, 17 B, 18 C, 19 SSM, 20 x
    # (region 1), 24 = 16 + 8 -> run 8 % 4 = 0 -> x.
    assert [VIEWS[v] for v in got] == ["K", "K", "V", "V", "K", "V", "x", "B", "C", "SSM", "x",
                                       "x"]
    with pytest.raises(ValueError, match="unknown run names"):
        unit_views(np.arange(2), ["qk"], [], num_regions=1, num_phys_blocks=2, num_blocks=1)


def _oracle_views(case, read, template) -> list[str]:
    """Brute force: each unit's D offset inside its kernel block (attention blocks) or
    its page (Mamba blocks) is one of the template's run offsets."""
    lay = case.decode
    attention = {b for g, ids in zip(lay.hma_groups, case.decode_ids, strict=True)
                 if g.kind is LayerKind.ATTENTION for b in ids}
    out = []
    for off, _, _ in read.local:
        block = off // lay.page_size_bytes
        if block in attention:
            runs, within = template.fa_runs, off % lay.kernel_block_bytes
        else:
            runs, within = template.mamba_runs, off % lay.page_size_bytes
        (run,) = [r for r in runs if r.local_offset == within]
        out.append(VIEW_OF_RUN[run.name])
    return out


@pytest.mark.parametrize(("p_tp", "d_tp"), PAIRS)
def test_labels_match_brute_force(p_tp: int, d_tp: int) -> None:
    for cfg, n in ((TINY, 40), (TINY, 300), (NEMO, 40)):
        case = build_case(make_init(cfg, prefill_tp=p_tp, decode_tp=d_tp, num_tokens=n))
        for d in range(d_tp):
            plan = case.unmerged_plans[d]
            labels = plan_labels(spec=case.spec, decode=case.decode, prefill=case.prefill,
                                 plan=plan, decode_block_ids=case.decode_ids)
            templates = {t.prefill_rank: t for t in
                         peer_templates(case.spec, case.decode, case.prefill, d)}
            for read in plan.reads:
                lab = labels[read.prefill_rank]
                want = _oracle_views(case, read, templates[read.prefill_rank])
                got = [lab.at(i)[1] for i in range(len(lab))]
                assert got == want, f"{cfg['model_type']} N={n} P{p_tp}->D{d_tp} d={d}"
                # attention layers carry FA views only, Mamba layers Mamba views only
                for layer, view, _ in lab.groups():
                    kind = case.spec.cache_layers[layer][1]
                    fa = view in ("KV", "K", "V")
                    assert fa == (kind is LayerKind.ATTENTION), (layer, view)


# ---------------------------------------------------------------- compare (emulated READ)


class Pair:
    """P's and D's regions for one tiny case, and a READ emulated by copying units."""

    def __init__(self, p_tp: int, d_tp: int, d: int, n: int = 300) -> None:
        self.case = build_case(make_init(TINY, prefill_tp=p_tp, decode_tp=d_tp, num_tokens=n))
        rng = np.random.default_rng(7)
        lay_p, lay_d = self.case.prefill, self.case.decode
        self.p = {r: [rng.integers(0, 256, lay_p.region_bytes, dtype=np.uint8)
                      for _ in range(lay_p.num_regions)] for r in range(p_tp)}
        self.d = [np.zeros(lay_d.region_bytes, np.uint8) for _ in range(lay_d.num_regions)]
        self.plan = self.case.unmerged_plans[d]
        self.labels = plan_labels(spec=self.case.spec, decode=lay_d, prefill=lay_p,
                                  plan=self.plan, decode_block_ids=self.case.decode_ids)
        for read in self.plan.reads:
            for (lo, n, lr), (ro, _, rr) in zip(read.local, read.remote, strict=True):
                self.d[lr][lo:lo + n] = self.p[read.prefill_rank][rr][ro:ro + n]

    @staticmethod
    def rows(regions: list[np.ndarray], descs: np.ndarray) -> np.ndarray:
        return to_addr_descs(descs, [r.ctypes.data for r in regions],
                             [r.nbytes for r in regions])

    def digests(self, read, **kw) -> tuple[KVDigest, KVDigest]:
        p, d = read.prefill_rank, self.plan.decode_rank
        src = digest_descs(self.rows(self.p[p], read.remote_array), side="src", rank=p,
                           peer=d, **kw)
        dst = digest_descs(self.rows(self.d, read.local_array), side="dst", rank=d, peer=p,
                           **kw)
        return src, dst

    def find(self, read, layer: int, view: str, nth: int = 0) -> int:
        lab = self.labels[read.prefill_rank]
        hits = [i for i in range(len(lab)) if lab.at(i) == (layer, view)]
        return hits[nth]


def test_compare_equal_then_one_flipped_byte_named() -> None:
    pair = Pair(1, 2, d=1)
    (read,) = pair.plan.reads
    labels = pair.labels[0]
    src, dst = pair.digests(read, labels=labels)
    assert compare(src, dst, labels) == []
    assert src.descriptors == len(labels) and src.nbytes == read.bytes == dst.nbytes
    assert [(g.layer, g.view) for g in src.groups] == [(g.layer, g.view) for g in dst.groups]

    # One byte of layer 5's B state (TP1 -> TP2: D rank 1 reads group slice of B).
    j = pair.find(read, 5, "B")
    off, n, region = read.local[j]
    pair.d[region][off + n // 2] ^= 0x40
    _, dst = pair.digests(read, labels=labels)
    (m,) = compare(src, dst, labels)
    assert (m.layer, m.view, m.prefill_rank, m.decode_rank, m.descriptor) == (5, "B", 0, 1, j)
    assert (m.differing, m.descriptors) == (1, 1)
    assert m.src_digest == int(src.values()[j]) and m.dst_digest == int(dst.values()[j])
    text = str(m)
    assert "layer 5 view B" in text and "P rank 0 -> D rank 1" in text and f"descriptor {j}" in text

    # A second flip in the second KV unit of attention layer 6: two groups named, in order.
    k = pair.find(read, 6, "KV", nth=1)
    off, n, region = read.local[k]
    pair.d[region][off] ^= 0xFF
    _, dst = pair.digests(read, labels=labels)
    got = [(m.layer, m.view, m.descriptor, m.differing, m.descriptors)
           for m in compare(src, dst, labels)]
    # 300 tokens = cdiv(300, 16) = 19 kernel blocks, one head-slice unit each per layer.
    assert got == [(5, "B", j, 1, 1), (6, "KV", k, 1, 19)], got


def test_compare_group_digests_only() -> None:
    pair = Pair(2, 1, d=0)
    read = pair.plan.reads[1]  # from P rank 1: x and SSM slices only (B, C come from P 0)
    labels = pair.labels[1]
    assert {v for _, v, _ in labels.groups()} == {"x", "SSM", "KV"}
    src, _ = pair.digests(read, labels=labels, per_descriptor=False)
    assert src.digests == b"" and src.groups
    j = pair.find(read, 2, "SSM")
    off, n, region = read.local[j]
    pair.d[region][off + n - 1] ^= 0x01
    _, dst = pair.digests(read, labels=labels)  # D keeps per-descriptor digests
    (m,) = compare(src, dst, labels)
    assert (m.layer, m.view, m.prefill_rank, m.decode_rank) == (2, "SSM", 1, 0)
    assert (m.descriptor, m.differing) == (j, 0)  # group only: its first descriptor, unknown count
    with pytest.raises(ValueError, match="pass labels"):
        digest_descs(Pair.rows(pair.d, read.local_array), side="dst", rank=0, peer=1,
                     per_descriptor=False)


def test_compare_refuses_mismatched_inputs() -> None:
    pair = Pair(1, 1, d=0)
    (read,) = pair.plan.reads
    labels = pair.labels[0]
    src, dst = pair.digests(read)
    with pytest.raises(ValueError, match="sides"):
        compare(dst, src, labels)
    with pytest.raises(ValueError, match="different reads"):
        compare(msgspec.structs.replace(src, peer=3), dst, labels)
    short = Labels(labels.layers[:-1], labels.views[:-1])
    with pytest.raises(ValueError, match="labels"):
        compare(src, dst, short)
    with pytest.raises(ValueError, match="side must be"):
        digest_descs([], side="p", rank=0, peer=0)


def test_wire_round_trip() -> None:
    pair = Pair(1, 2, d=0)
    (read,) = pair.plan.reads
    labels = pair.labels[0]
    src, dst = pair.digests(read, labels=labels)
    blob = src.encode()
    assert isinstance(blob, bytes) and len(blob) < 64 + 8 * src.descriptors + 40 * len(src.groups)
    back = KVDigest.decode(blob)
    assert back == src and np.array_equal(back.values(), src.values())
    assert KVDigest.decode(msgspec.msgpack.encode(msgspec.msgpack.decode(blob))) == src
    with pytest.raises(msgspec.ValidationError):
        KVDigest.decode(msgspec.msgpack.encode({**msgspec.structs.asdict(src), "extra": 1}))
    m = Mismatch(5, "B", 0, 1, 3, 1, 1, 2**64 - 1, 0)  # uint64 digests survive both codecs
    assert msgspec.json.decode(msgspec.json.encode(m), type=Mismatch) == m
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(m), type=Mismatch) == m
