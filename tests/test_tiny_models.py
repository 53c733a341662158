"""The tiny model builder: deterministic, offline, loadable, and a byte-level tokenizer."""

from __future__ import annotations

import hashlib
import json

import pytest

from hybrid_pd.tiny_models import SPECS, build_model, engine_args_for


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_builds_are_identical_and_cached(tmp_path):
    a = build_model("tiny-nemotron-h", tmp_path / "a")
    b = build_model("tiny-nemotron-h", tmp_path / "b")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert digest(a / name) == digest(b / name), name
    stamp = (a / ".hybrid_pd_build").stat().st_mtime_ns
    build_model("tiny-nemotron-h", tmp_path / "a")  # identical build present: skipped
    assert (a / ".hybrid_pd_build").stat().st_mtime_ns == stamp


def test_hybrid_layout_and_tokenizer(tiny_models):
    cfg = json.loads((tiny_models["tiny-nemotron-h"] / "config.json").read_text())
    kinds = cfg["layers_block_type"]  # transformers 5 names Mamba2 layers "linear_attention"
    assert kinds.count("linear_attention") >= 2 and kinds.count("full_attention") >= 1, kinds
    assert json.loads((tiny_models["tiny-nemotron-h-g1"] / "config.json").read_text())["n_groups"] == 1

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["tiny-nemotron-h"])
    text = "prefill → decode: 12345 ünïcödé \x00\x7f"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text  # byte-level: lossless
    assert len(tok) <= cfg["vocab_size"]


def test_tiny_models_are_served_in_float32(tiny_models):
    model = str(tiny_models["tiny-llama"])
    assert engine_args_for(model, ()) == ("--dtype", "float32")
    assert engine_args_for(model, ("--dtype", "bfloat16")) == ("--dtype", "bfloat16")
    assert engine_args_for("/some/real/model", ("-x",)) == ("-x",)


def test_unknown_model_name_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny model 'nope'; choose one of"):
        build_model("nope", tmp_path)
    assert set(SPECS) == {"tiny-nemotron-h", "tiny-nemotron-h-g1", "tiny-llama"}
