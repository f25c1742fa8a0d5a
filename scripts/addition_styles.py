"""Which reasoning style a hinted addition checkpoint writes, per told budget, and what each style is worth.

The addition task's references come in two styles with the same arithmetic (workloads/tasks/arithmetic.py):
verbose restates the problem ("347+586: 7+6=13 ..."), concise does not ("7+6=13 ..."). Their first character
tells them apart (the first operand's first digit vs its last; problems where the two coincide are skipped
for the shares). For each told budget this prints, over held-out problems (eval split, seed 0, 2-4 digits):

- the share of each style greedy and sampled at T=1 (the first character of the reasoning), overall and per number
  of digits;
- greedy accuracy and mean tokens (reasoning + ``</think>`` + answer + EOS) with the model's own choice, and with
  the reasoning committed to each style (``committed_prefix``), per number of digits: what that style costs. Generation
  stops at told + solution tokens without the two-phase forcing of training and eval, so these accuracies are
  the eval grid's only where the budget never binds (told 64 on this task).

Why (docs/elastic.md): a price on tokens can only shorten the loose-budget answers by making the concise style
win, and it wins only where it is about as accurate as the verbose one.

    .venv/bin/python scripts/addition_styles.py CHECKPOINT [--told 16 32 64] [--n 300] [--hint "[think {thinking}] "]

Greedy decoding with transformers on the CPU (fp32, one thread); a minute or less for the tiny model.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STYLES = ("own", "verbose", "concise")


def first_char(prompt: str, style: str) -> str:
    a = prompt.split("+")[0]
    return a[0] if style == "verbose" else a[-1]


def committed_prefix(row: dict, style: str) -> str:
    """The start that commits the reasoning to a style: the restatement ("347+586: "), or the first column's step
    ("7+6=13 "). One character is not enough: forced to start with the last digit, the model often goes on
    with a (wrong) restatement."""
    if style == "own":
        return ""
    steps = reasoning_of(row, "concise").split(" ")
    return row["prompt"].rstrip("=") + ": " if style == "verbose" else steps[0] + " "


def reasoning_of(row: dict, style: str) -> str:
    from workloads.tasks.arithmetic import reasoning

    a, b = (int(x) for x in row["prompt"].rstrip("=").split("+"))
    return reasoning(a, b, style)


def generate(model, tok, prompts: list[str], max_new: int, sample: bool) -> list[str]:
    import torch

    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False, padding_side="left")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new, do_sample=sample, temperature=1.0 if sample else None,
                             top_p=1.0 if sample else None, top_k=0 if sample else None,
                             pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=False)
    return [t.replace(tok.pad_token or "\0", "") for t in texts]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--told", type=int, nargs="+", default=[16, 32, 64], help="thinking budgets told in the hint")
    p.add_argument("--solution", type=int, default=8, help="solution budget (generation stops at told + this)")
    p.add_argument("--n", type=int, default=300, help="held-out problems, a third per digit count")
    p.add_argument("--hint", default="[think {thinking}] ", help="budget.prompt_hint of the run")
    p.add_argument("--template", default="<s>{prompt}<think>", help="model.prompt_template of the run")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestrator.config import Budget
    from orchestrator.prompt_hint import budget_hint
    from orchestrator.rollout.worker import render_prompt
    from workloads.tasks.arithmetic import TASK

    torch.set_num_threads(1)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    rows = TASK.generate(args.n, difficulties=(2, 3, 4), seed=0, split="eval").to_pylist()
    clear = [i for i, r in enumerate(rows) if first_char(r["prompt"], "verbose") != first_char(r["prompt"], "concise")]
    eos = tok.eos_token
    for told in args.told:
        hint = budget_hint(args.hint, Budget(told, args.solution))  # as training, eval and serving render it
        base = [render_prompt(args.template, r["prompt"], hint=hint) for r in rows]
        shares, by_digit = {}, defaultdict(dict)
        for mode in ("greedy", "sampled"):
            firsts = [t[:1] for t in generate(model, tok, base, 1, mode == "sampled")]
            counts = {s: sum(firsts[i] == first_char(rows[i]["prompt"], s) for i in clear) for s in ("verbose", "concise")}
            shares[mode] = {s: c / len(clear) for s, c in counts.items()}
            for d in sorted({rows[i]["difficulty"] for i in clear}):
                of_d = [i for i in clear if rows[i]["difficulty"] == d]
                by_digit[d][mode] = sum(firsts[i] == first_char(rows[i]["prompt"], "concise") for i in of_d) / len(of_d)
        print(f"told {told}: concise share greedy {shares['greedy']['concise']:.2f} (verbose "
              f"{shares['greedy']['verbose']:.2f}), sampled T=1 {shares['sampled']['concise']:.2f} (verbose "
              f"{shares['sampled']['verbose']:.2f}), of {len(clear)} problems; concise share greedy / sampled by digits: "
              + "  ".join(f"{d}: {v['greedy']:.2f} / {v['sampled']:.2f}" for d, v in by_digit.items()), flush=True)
        for style in STYLES:
            forced = [committed_prefix(r, style) for r in rows]
            texts = generate(model, tok, [b + f for b, f in zip(base, forced)], told + args.solution, False)
            by_digits: dict[int, list[tuple[bool, int]]] = defaultdict(list)
            for r, f, t in zip(rows, forced, texts):
                text = (f + t).split(eos)[0] if eos else f + t
                answer = text.split("</think>", 1)[1] if "</think>" in text else None
                tokens = len(tok(text, add_special_tokens=False)["input_ids"]) + 1  # + EOS
                by_digits[r["difficulty"]].append((answer == r["answer"], tokens))
            every = [x for v in by_digits.values() for x in v]
            cells = "  ".join(f"{d} digits {sum(ok for ok, _ in v) / len(v):.3f} / {sum(n for _, n in v) / len(v):.1f}"
                              for d, v in sorted(by_digits.items()))
            print(f"  {style:8s} all {sum(ok for ok, _ in every) / len(every):.3f} / "
                  f"{sum(n for _, n in every) / len(every):.1f} tokens   ({cells})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
