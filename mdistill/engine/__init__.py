"""The one training loop, evaluation, checkpoints and the experiment builder."""
