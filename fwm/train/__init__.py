"""Supervised training: TrainState and optimiser (state), losses, step functions (steps), the stage inputs
(inputs), the resumable loop (loop), checkpoints and metrics."""
