"""Model shapes the benchmarks build (random Qwen2, tied embeddings, the tiny tokenizer).

``tiny`` is the quickstart's model; ``small`` is the shape vllm-on-cpu.md measured (3.4M parameters);
the others extend the weight-sync sweep towards 100M. Head dim 32: vLLM's CPU attention needs a
multiple of 32.
"""

from __future__ import annotations

from pathlib import Path

# name: (hidden, layers, heads, ffn)
SHAPES = {"tiny": (128, 3, 4, 512), "small": (256, 4, 8, 1024), "medium": (512, 8, 16, 2048),
          "large": (768, 14, 24, 3072)}


def build(shape: str, out_dir: str | Path, max_position_embeddings: int = 512) -> Path:
    from orchestrator.tiny_model import build_tiny_model

    hidden, layers, heads, ffn = SHAPES[shape]
    return build_tiny_model(Path(out_dir) / shape, hidden_size=hidden, num_layers=layers, num_heads=heads,
                            intermediate_size=ffn, max_position_embeddings=max_position_embeddings)
