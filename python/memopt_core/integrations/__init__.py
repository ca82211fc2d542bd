"""Integrations of memopt optimizers into training frameworks, one submodule each. Nothing is
imported here: `import memopt_core` never pulls in a framework, and each submodule imports its
framework only when it is itself imported.

- `memopt_core.integrations.torchtitan`: `MemoptOptimizersContainer` (torchtitan 0.3.0's
  optimizer component over any registry optimizer) and `memopt_config` (a torchtitan
  `Trainer.Config` switched to it).
"""
