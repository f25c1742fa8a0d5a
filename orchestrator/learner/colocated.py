"""ColocatedLearner: learner rank 0 with the run's rollout worker in its own process (``rollout.colocate``,
``orchestrator/colocation.py``).

The actor answers both roles' calls, so the worker group hands the same actor out as its learner rank 0
and its rollout worker 0 and the trainer and the weight syncer stay as they are. A weight sync carries no
weights: ``sync_payload`` returns a marker, and ``update_weights`` given it copies the learner's
parameters into the engine's model in memory, in the engine's dtype (the engine keeps its own copy, as
a separate worker would: the learner's fp32 masters and the engine's sampling never share a tensor; on
a GPU the copy goes through host memory, as the learner's exports do)."""

from __future__ import annotations

from dataclasses import dataclass

from ..rollout.worker import RolloutWorker
from .worker import Learner


@dataclass(frozen=True)
class InProcessWeights:
    """What ``sync_payload`` returns when the engine is in this process: the dtype to copy the weights in."""

    dtype: str | None


class ColocatedLearner(Learner):
    def __init__(self, model_path: str, *, rollout: dict, **learner_kwargs):
        """``rollout``: ``RolloutWorker``'s keyword arguments; the rest are ``Learner``'s."""
        super().__init__(model_path, **learner_kwargs)
        self.rollout = RolloutWorker(model_path, **rollout)

    def sync_payload(self, dtype: str | None = None) -> InProcessWeights:
        return InProcessWeights(dtype)

    # ---- the rollout worker's calls ------------------------------------------------------------------

    def ready(self) -> int:
        return self.rollout.ready()

    def generate(self, prompts, spec, *, step: int = 0):
        return self.rollout.generate(prompts, spec, step=step)

    def update_weights(self, weights, version: int) -> float:
        """Load the learner's current weights (``InProcessWeights``) or any payload a worker takes."""
        in_process = isinstance(weights, InProcessWeights)
        if in_process:
            weights = self._full_state(weights.dtype, copy=False)  # the engine's load copies them
        seconds = self.rollout.update_weights(weights, version)
        if in_process:
            self.rollout.last_sync = "in_process"
        return seconds

    def stats(self) -> dict:
        return {**self.rollout.stats(), "colocated": True}

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        return self.rollout.prompt_logprobs(sequences)
