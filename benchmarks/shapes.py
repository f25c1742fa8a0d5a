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


def add_model_arguments(ap) -> None:
    """``--model`` (a Hugging Face directory) or ``--shape`` (a random model to build)."""
    ap.add_argument("--model", help="HF model directory (default: a random model of --shape)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny",
                    help="random model to build when --model is not given (tiny: the quickstart's)")


def resolve_model(ap, args, tmp: str | Path) -> str:
    """The absolute model directory the arguments name, building the random one into ``tmp``."""
    if args.model is None:
        return str(build(args.shape, tmp).resolve())
    if not (Path(args.model) / "config.json").is_file():
        ap.error(f"--model {args.model}: not a Hugging Face model directory")
    return str(Path(args.model).resolve())
