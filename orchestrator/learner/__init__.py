"""Policy-gradient losses, optimizer step, safetensors checkpoints and the Learner actor."""
