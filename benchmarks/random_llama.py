"""Random-weight Llama models of a chosen size on local disk (no model hub here).

The tokenizer is the tiny model's (tests/tiny_model.py: byte-level BPE, 512 tokens, a chat
template) and the vocabulary matches it, so every token the model samples decodes. The size
comes from the layers: hidden size, MLP width, heads and depth as in the presets below.
Weights are drawn from N(0, 0.02) in bfloat16 straight into a safetensors file (a few
seconds for 1.1 B parameters, no transformers model in memory).

    .venv/bin/python -m benchmarks.random_llama 1.1b DIR
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

_MARKER = ".complete"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int  # head_dim = hidden / heads: 64 here (vLLM's CPU attention supports it)
    kv_heads: int


# ~0.1, ~0.5 and ~1.1 billion parameters; 1.1b is TinyLlama's shape (hidden 2048, MLP 5632,
# 32 heads, 4 KV heads) with 25 layers instead of 22 to make up for the 512-token vocabulary.
PRESETS = {
    "0.1b": Shape(hidden=768, intermediate=2048, layers=16, heads=12, kv_heads=4),
    "0.5b": Shape(hidden=1536, intermediate=4096, layers=20, heads=24, kv_heads=4),
    "1.1b": Shape(hidden=2048, intermediate=5632, layers=25, heads=32, kv_heads=4),
}


def parameter_count(shape: Shape, vocab: int = 512) -> int:
    head_dim = shape.hidden // shape.heads
    attention = shape.hidden * (shape.hidden + 2 * shape.kv_heads * head_dim) + shape.hidden * shape.hidden
    mlp = 3 * shape.hidden * shape.intermediate
    return 2 * vocab * shape.hidden + shape.layers * (attention + mlp + 2 * shape.hidden) + shape.hidden


def build_random_llama(target: Path, shape: Shape, tokenizer_dir: Path, seed: int = 1234) -> Path:
    """Build the model into ``target`` (unless already built there) and return it."""
    target = Path(target)
    if (target / _MARKER).is_file():
        return target
    import torch
    from safetensors.torch import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy(tokenizer_dir / name, tmp / name)
        tiny_config = json.loads((tokenizer_dir / "config.json").read_text())
        vocab = int(tiny_config["vocab_size"])
        head_dim = shape.hidden // shape.heads
        config = {
            **{key: tiny_config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if key in tiny_config},
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": vocab,
            "hidden_size": shape.hidden,
            "intermediate_size": shape.intermediate,
            "num_hidden_layers": shape.layers,
            "num_attention_heads": shape.heads,
            "num_key_value_heads": shape.kv_heads,
            "head_dim": head_dim,
            "max_position_embeddings": 2048,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "dtype": "bfloat16",
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generator = torch.Generator().manual_seed(seed)

        def normal(*size: int) -> torch.Tensor:
            return (torch.randn(*size, generator=generator) * 0.02).to(torch.bfloat16)

        tensors: dict[str, torch.Tensor] = {
            "model.embed_tokens.weight": normal(vocab, shape.hidden),
            "model.norm.weight": torch.ones(shape.hidden, dtype=torch.bfloat16),
            "lm_head.weight": normal(vocab, shape.hidden),
        }
        for layer in range(shape.layers):
            prefix = f"model.layers.{layer}."
            tensors[prefix + "self_attn.q_proj.weight"] = normal(shape.heads * head_dim, shape.hidden)
            tensors[prefix + "self_attn.k_proj.weight"] = normal(shape.kv_heads * head_dim, shape.hidden)
            tensors[prefix + "self_attn.v_proj.weight"] = normal(shape.kv_heads * head_dim, shape.hidden)
            tensors[prefix + "self_attn.o_proj.weight"] = normal(shape.hidden, shape.heads * head_dim)
            tensors[prefix + "mlp.gate_proj.weight"] = normal(shape.intermediate, shape.hidden)
            tensors[prefix + "mlp.up_proj.weight"] = normal(shape.intermediate, shape.hidden)
            tensors[prefix + "mlp.down_proj.weight"] = normal(shape.hidden, shape.intermediate)
            tensors[prefix + "input_layernorm.weight"] = torch.ones(shape.hidden, dtype=torch.bfloat16)
            tensors[prefix + "post_attention_layernorm.weight"] = torch.ones(shape.hidden, dtype=torch.bfloat16)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / _MARKER).write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in PRESETS:
        print(f"usage: python -m benchmarks.random_llama {{{','.join(PRESETS)}}} DIR", file=sys.stderr)
        return 2
    from tests.tiny_model import build_tiny_model

    target = Path(args[1]).resolve()
    tiny = build_tiny_model(target.parent / ".tiny-tokenizer")
    print(build_random_llama(target, PRESETS[args[0]], tiny))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
