"""Model shapes the benchmarks build (random Qwen2, tied embeddings, the tiny tokenizer).

``tiny`` is the quickstart's model; ``small`` is the shape vllm-on-cpu.md measured (3.4M parameters);
the others extend the weight-sync sweep towards 100M. Head dim 32: vLLM's CPU attention needs a
multiple of 32.

``--fixed-length`` builds the shape so that it never samples EOS or ``</think>`` by itself: every sample
then runs to its token limit on both sides of a comparison, the fixed-length setting of throughput
benchmarks (vLLM's ``ignore_eos``) without a benchmark-only switch in either trainer. Otherwise a
random model samples EOS or ``</think>`` with about 2/128 chance a token and stops after a few dozen.
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


def never_stopping(model_dir: str | Path, out_dir: str | Path) -> Path:
    """A copy of the random ``model_dir`` that does not sample EOS or ``</think>`` (logprob about -20).

    Input embedding dimension 0 is set to 1 for every token, so it dominates a random model's residual
    stream and, after the final norm, hidden dimension 0 is large and positive whatever the input. The
    output head is untied from the embeddings and its dimension 0 set to 1 for every token and -4 for
    the two stop tokens: the others stay near-uniform, the stop tokens sit ~20 nats below them. (Tied,
    a forced ``</think>`` as input would flip the sign and make EOS certain right after it.)"""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    stops = [tok.eos_token_id, tok.convert_tokens_to_ids("</think>")]
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[:, 0] = 1.0
        head = emb.detach().clone()
        head[stops, 0] = -4.0
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(head)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def add_model_arguments(ap) -> None:
    """``--model`` (a Hugging Face directory) or ``--shape`` (a random model to build)."""
    ap.add_argument("--model", help="HF model directory (default: a random model of --shape)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny",
                    help="random model to build when --model is not given (tiny: the quickstart's)")
    ap.add_argument("--fixed-length", action="store_true",
                    help="the random model never samples EOS or </think>: every sample runs to its limit")


def resolve_model(ap, args, tmp: str | Path) -> str:
    """The absolute model directory the arguments name, building the random one into ``tmp``."""
    if args.model is None:
        path = build(args.shape, tmp)
        if args.fixed_length:
            path = never_stopping(path, Path(tmp) / f"{args.shape}-fixed-length")
        return str(path.resolve())
    if args.fixed_length:
        ap.error("--fixed-length builds a random model; it does not apply to --model")
    if not (Path(args.model) / "config.json").is_file():
        ap.error(f"--model {args.model}: not a Hugging Face model directory")
    return str(Path(args.model).resolve())
