"""Seeded, offline synthetic worlds: a knowledge world for search and multi-step arithmetic for python."""
from fwm.envs.synthetic.arithmetic import (ArithmeticConfig, generate_arithmetic_tasks,
                                           write_arithmetic_tasks)
from fwm.envs.synthetic.knowledge import (KnowledgeWorld, KnowledgeWorldConfig, generate_knowledge_world,
                                          write_knowledge_world)

__all__ = ["ArithmeticConfig", "generate_arithmetic_tasks", "write_arithmetic_tasks", "KnowledgeWorld",
           "KnowledgeWorldConfig", "generate_knowledge_world", "write_knowledge_world"]
