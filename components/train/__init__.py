"""Train: configs, SFT, GRPO (rewards), the fast training passes, checkpoints and callbacks."""
