"""Arrow schemas for prompts and rollout records.

Every stage hands the next one an Arrow table with one of these schemas; training and evaluation
write rollout records to Parquet with ``ROLLOUT_SCHEMA`` so any analysis job can read either.
"""

from __future__ import annotations

import pyarrow as pa

# One row per problem. ``prompt`` is the task text without any model template; ``answer`` is the
# reference final answer; ``reasoning`` is an optional step-by-step reference (used for warm-start SFT
# and for hints/prefixes). ``difficulty`` is an integer level, ``domain`` a free-form label.
PROMPT_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("difficulty", pa.int32()),
        pa.field("domain", pa.string()),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("answer", pa.string(), nullable=False),
        pa.field("reasoning", pa.string()),
    ]
)

# One row per sampled response. Token counts never include the prompt. ``thinking_tokens`` counts the
# tokens the model generated in phase 1 (a naturally emitted end-of-thinking marker included) and is
# always <= ``budget_thinking``; a marker the rollout had to force is not counted there but appears in
# ``response_token_ids`` with ``injected`` set, as are a curriculum's response-prefix tokens (which
# ``thinking`` shows but ``thinking_tokens`` does not count). ``loss_mask`` is 1 for tokens the learner trains on.
ROLLOUT_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("step", pa.int64()),
        pa.field("policy_version", pa.int64()),
        pa.field("task", pa.string()),
        pa.field("difficulty", pa.int32()),
        pa.field("domain", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("answer", pa.string()),
        pa.field("thinking", pa.string()),
        pa.field("solution", pa.string()),
        pa.field("thinking_tokens", pa.int32()),
        pa.field("solution_tokens", pa.int32()),
        pa.field("thinking_truncated", pa.bool_()),
        pa.field("finish_reason", pa.string()),
        pa.field("budget_thinking", pa.int32()),
        pa.field("budget_solution", pa.int32()),
        pa.field("reward", pa.float32()),
        pa.field("correct", pa.bool_()),
        pa.field("reward_error", pa.string()),
        pa.field("prompt_token_ids", pa.list_(pa.int32())),
        pa.field("response_token_ids", pa.list_(pa.int32())),
        pa.field("response_logprobs", pa.list_(pa.float32())),
        pa.field("injected", pa.list_(pa.bool_())),
        pa.field("loss_mask", pa.list_(pa.int8())),
    ]
)

PROMPT_COLUMNS = tuple(PROMPT_SCHEMA.names)
ROLLOUT_COLUMNS = tuple(ROLLOUT_SCHEMA.names)
