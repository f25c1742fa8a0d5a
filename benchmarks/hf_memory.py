"""Peak memory of one HF-engine generate at vocabulary 8k vs 64k, same batch and length, side by side.

The HF engine (``orchestrator/rollout/engine.py``) keeps each step's sampled-token logprob
(``SampledLogprobs``, one float per row and step). ``generate(output_scores=True)``, what it called
before, keeps every step's whole score row, batch x tokens x vocabulary floats, and the engine then
stacked them and took their log-softmax (two more copies of that size). Both ways run here on random
Qwen2 models that differ only in vocabulary size, one after the other in one process, on the same
prompts; each figure is the peak of tensor bytes allocated during the call above what was held before
it: the weights (whose embedding grows with the vocabulary) are not counted. On a CPU the bytes come
from torch's allocator events (``torch.profiler`` with ``profile_memory``), on a GPU from
``max_memory_allocated``. Prints the table and the 64k/8k ratio of each way.

    .venv/bin/python benchmarks/hf_memory.py                         # medium shape, 8 x 256 tokens
    .venv/bin/python benchmarks/hf_memory.py --shape tiny --batch 4 --tokens 32
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the project's packages resolve from the checkout

WAYS = ("engine", "output_scores")


def build_vocab(base: Path, out: Path, vocab: int, seed: int = 0) -> Path:
    """A random copy of the model at ``base`` (its shape and tokenizer) with a ``vocab``-entry vocabulary."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(base)
    config.vocab_size = vocab
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def peak_bytes(fn) -> tuple[int, object]:
    """(peak tensor bytes allocated while ``fn`` ran, above those held before it; ``fn``'s result)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - held, out
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, n in events:  # allocations positive, frees negative, in time order
        live += n
        peak = max(peak, live)
    return peak, out


def scores_generate(engine, requests, temperature: float = 1.0):
    """The HF engine's generate before ``SampledLogprobs``: ``output_scores=True``, then the scores stacked
    and log-softmaxed (one group of requests: same ``max_tokens``, no stop ids of their own)."""
    import torch

    ids, mask = engine._left_padded([r.prompt_token_ids for r in requests])
    torch.manual_seed(requests[0].seed or 0)
    with torch.no_grad():
        out = engine.model.generate(
            input_ids=ids.to(engine.device), attention_mask=mask.to(engine.device), do_sample=True,
            max_new_tokens=requests[0].max_tokens,
            temperature=temperature, top_p=1.0, top_k=0, eos_token_id=list(engine.end_token_ids),
            pad_token_id=engine.pad_token_id, output_scores=True, return_dict_in_generate=True)
        new = out.sequences[:, ids.shape[1]:]
        scores = torch.stack(out.scores, dim=1).float().log_softmax(-1)
        return new, scores.gather(2, new[:, :, None])[:, :, 0]


def measure(model: str, batch: int, tokens: int, ways=WAYS) -> dict[str, dict]:
    """Peak bytes of one generate of ``batch`` rows x ``tokens`` new tokens on the model at ``model``, each way,
    and the longest row's length."""
    from orchestrator.rollout.engine import GenRequest, HFEngine

    engine = HFEngine(model, dtype="float32")
    prompts = [[1, 4] + [10 + (7 * i + j) % 90 for j in range(8 + i % 5)] for i in range(batch)]
    requests = [GenRequest(p, tokens, [], seed=0) for p in prompts]
    engine.generate([GenRequest(p, 2, [], seed=0) for p in prompts], 1.0, 1.0)  # warm-up
    result = {}
    for way in ways:
        if way == "engine":
            peak, outs = peak_bytes(lambda: engine.generate(requests, 1.0, 1.0))
            steps = max(len(o.token_ids) for o in outs)
        else:
            peak, (new, _) = peak_bytes(lambda: scores_generate(engine, requests))
            steps = int(new.shape[1])
        result[way] = {"peak": peak, "steps": steps}
    return result


def main() -> int:
    from shapes import SHAPES, build  # beside this script (tests load this file without that folder on the path)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="medium", help="the random model's shape")
    ap.add_argument("--vocabs", type=int, nargs=2, default=(8192, 65536), metavar=("SMALL", "LARGE"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256, help="new tokens per row (max_tokens)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-scores", action="store_true", help="skip the output_scores=True way (its memory)")
    args = ap.parse_args()
    for name in ("batch", "tokens", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    import torch

    torch.set_num_threads(args.threads)
    ways = ("engine",) if args.no_scores else WAYS
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = build(args.shape, tmp, max_position_embeddings=max(512, args.tokens + 32))
        for vocab in args.vocabs:
            path = build_vocab(base, Path(tmp) / f"vocab-{vocab}", vocab)
            results[vocab] = measure(str(path), args.batch, args.tokens, ways)
    small, large = args.vocabs
    hidden, layers, _, _ = SHAPES[args.shape]
    device = "cuda" if torch.cuda.is_available() else f"cpu ({os.cpu_count()} CPUs)"
    print(f"random Qwen2, shape {args.shape} (hidden {hidden}, {layers} layers), batch {args.batch}, "
          f"{args.tokens} new tokens, temperature 1; {device}; peak MiB above the memory held before the call\n")
    print(f"{'vocabulary':>10} {'steps':>6} {'HF engine':>10} {'output_scores=True':>19} {'its kept scores':>16}")
    for vocab in args.vocabs:
        r = results[vocab]
        kept = args.batch * r["engine"]["steps"] * vocab * 4 / 2**20
        old = f"{r['output_scores']['peak'] / 2**20:>19.1f}" if "output_scores" in r else f"{'-':>19}"
        print(f"{vocab:>10} {r['engine']['steps']:>6} {r['engine']['peak'] / 2**20:>10.1f} {old} {kept:>16.1f}")
    ratio = results[large]["engine"]["peak"] / results[small]["engine"]["peak"]
    line = f"ratio peak {large}/{small} vocabulary, HF engine: {ratio:.2f}x (goal <= 1.3x)"
    if "output_scores" in results[small]:
        old = results[large]["output_scores"]["peak"] / results[small]["output_scores"]["peak"]
        line += f"; generate(output_scores=True): {old:.2f}x"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
