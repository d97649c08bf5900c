"""Environments: tasks, the env protocol, search (BM25 / HTTP retrievers), math (sandboxed python),
answer scoring, readers of real task files, and synthetic worlds (fwm.envs.synthetic)."""
