"""Data generation job: N problems -> N shortcut/journey pairs (same problem, same final answer) -> Parquet.

Deterministic given the config (problems from the task generator's train split with ``seed``; one
``random.Random`` per problem derived from the seed and the prompt id drives proposals and the
journey's choices). A problem whose tree has no correct leaf or no wrong child on the correct path
(possible with the policy proposer) is skipped; more problems are drawn until N pairs exist.
Rows: for each problem its shortcut, then its journey (schema ``JOURNEY_SCHEMA``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .steps import get_step_task
from .tree import ProgrammaticProposer, build_tree, journey, replay, shortcut

JOURNEY_SCHEMA = pa.schema([
    ("prompt_id", pa.string()),
    ("task", pa.string()),
    ("difficulty", pa.int32()),
    ("prompt", pa.string()),       # the bare task prompt ("347+586=")
    ("answer", pa.string()),       # the reference answer; both trajectories end at it
    ("kind", pa.string()),         # shortcut | journey
    ("reasoning", pa.string()),    # the text inside <think> ... </think>
    ("text", pa.string()),         # the SFT target after the prompt template: reasoning </think> answer
    ("num_steps", pa.int32()),     # steps written (wrong ones included)
    ("num_wrong", pa.int32()),     # wrong steps tried (each followed by a reflection and a backtrack)
    ("num_tokens", pa.int32()),    # tokens of ``text`` (the model's tokenizer; characters + 1 without one)
    ("tree_nodes", pa.int32()),    # nodes in the problem's search tree
    ("proposer", pa.string()),     # programmatic | policy
    ("seed", pa.int64()),
])


@dataclass
class DataGenConfig:
    n: int = 327                # pairs (the paper's 327)
    task: str = "addition"
    difficulties: list[int] = field(default_factory=lambda: [2, 3, 4])
    seed: int = 0
    width: int = 3              # children per expanded node
    beam: int = 2               # top-K kept per depth
    proposer: str = "programmatic"  # programmatic | policy
    wrong_branches: int = 1     # nodes of the correct path that try a wrong child
    trials_per_node: int = 1    # wrong children tried at such a node
    # policy proposer only
    policy_engine: str = "hf"   # hf | vllm (a project rollout engine)
    policy_temperature: float = 1.0


def validate(cfg: DataGenConfig) -> None:
    for key in ("n", "width", "beam", "wrong_branches", "trials_per_node"):
        v = getattr(cfg, key)
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"data.{key} must be a positive integer, got {v!r}")
    if cfg.width < 2:
        raise ValueError(f"data.width={cfg.width}: a journey needs at least one wrong child (width >= 2)")
    if cfg.proposer not in ("programmatic", "policy"):
        raise ValueError(f"data.proposer must be 'programmatic' or 'policy', got {cfg.proposer!r}")
    if cfg.policy_engine not in ("hf", "vllm"):
        raise ValueError(f"data.policy_engine must be 'hf' or 'vllm', got {cfg.policy_engine!r}")
    get_step_task(cfg.task)


def policy_proposer(cfg: DataGenConfig, model_path: str, prompt_template: str, max_model_len: int = 256):
    from transformers import AutoTokenizer

    from orchestrator.rollout.engine import make_engine

    from .tree import PolicyProposer

    kwargs = {"dtype": "float32", "seed": cfg.seed}
    if cfg.policy_engine == "vllm":
        kwargs["max_model_len"] = max_model_len
    engine = make_engine(cfg.policy_engine, model_path, **kwargs)
    return PolicyProposer(engine, AutoTokenizer.from_pretrained(model_path), prompt_template=prompt_template,
                          temperature=cfg.policy_temperature)


def generate_pairs(cfg: DataGenConfig, *, tokenizer=None, proposer=None, think_end: str = "</think>") -> pa.Table:
    """``cfg.n`` shortcut/journey pairs as a ``JOURNEY_SCHEMA`` table (2n rows)."""
    from orchestrator.data.tasks import get_task

    validate(cfg)
    step_task = get_step_task(cfg.task)
    proposer = proposer or ProgrammaticProposer()
    gen = get_task(cfg.task).generate
    rows: list[dict] = []
    pool_size, done = cfg.n, set()
    while len(rows) < 2 * cfg.n:
        problems = gen(pool_size, difficulties=tuple(cfg.difficulties), seed=cfg.seed, split="train").to_pylist()
        for p in problems:
            if len(rows) >= 2 * cfg.n:
                break
            if p["prompt_id"] in done:
                continue
            done.add(p["prompt_id"])
            rng = random.Random(f"journey/{cfg.seed}/{p['prompt_id']}")
            tree = build_tree(step_task, p["prompt"], p["answer"], proposer, width=cfg.width, beam=cfg.beam, rng=rng)
            pair = (shortcut(tree, step_task),
                    journey(tree, step_task, rng, wrong_branches=cfg.wrong_branches,
                            trials_per_node=cfg.trials_per_node))
            if None in pair or pair[0].answer != pair[1].answer:
                continue
            for traj in pair:
                if not step_task.verify(replay(step_task, p["prompt"], traj.reasoning).answer, p["answer"]):
                    raise AssertionError(f"{p['prompt_id']}: {traj.kind} does not replay to the answer")
                text = f"{traj.reasoning}{think_end}{traj.answer}"
                n_tok = (len(tokenizer(text, add_special_tokens=False)["input_ids"]) if tokenizer is not None
                         else len(traj.reasoning) + 1 + len(traj.answer))
                rows.append({"prompt_id": p["prompt_id"], "task": cfg.task, "difficulty": p["difficulty"],
                             "prompt": p["prompt"], "answer": p["answer"], "kind": traj.kind,
                             "reasoning": traj.reasoning, "text": text, "num_steps": traj.num_steps,
                             "num_wrong": traj.num_wrong, "num_tokens": n_tok, "tree_nodes": len(tree.nodes),
                             "proposer": proposer.name, "seed": cfg.seed})
        if len(rows) < 2 * cfg.n:
            if pool_size >= 64 * cfg.n:
                raise RuntimeError(f"only {len(rows) // 2} of {cfg.n} problems gave a shortcut/journey pair "
                                   f"after {pool_size} problems (proposer {proposer.name})")
            pool_size *= 2
    return pa.Table.from_pylist(rows, schema=JOURNEY_SCHEMA)


def write(table: pa.Table, path: str | Path) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return str(path)


def length_summary(table: pa.Table) -> dict[str, float]:
    """Mean tokens / steps / wrong steps per kind."""
    out = {}
    for kind in ("shortcut", "journey"):
        rows = [r for r in table.to_pylist() if r["kind"] == kind]
        if rows:
            for col in ("num_tokens", "num_steps", "num_wrong"):
                out[f"{kind}/mean_{col}"] = sum(r[col] for r in rows) / len(rows)
            out[f"{kind}/n"] = float(len(rows))
    return out
