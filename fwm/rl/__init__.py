"""FC-RL: rewards, advantages, the clipped-surrogate loss and rl_step (see PAPER.md, "FC-RL")."""
