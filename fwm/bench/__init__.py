"""`fwm bench`: speed side by side with the peers (transformers + PyTorch, google-tunix) and the host's limit.

peak.py (float32 matmul peaks), shapes.py (the S / M / L models), train.py (train step), sampler.py
(decode), rl.py (one FC-RL iteration), run.py (the parts in child processes, the table and the JSON).
"""
