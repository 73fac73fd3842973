"""GraphPipe: pipeline-parallel training of multi-branch models as a DAG of stages (ASPLOS'25, arXiv 2406.17145).

A model is exported and coarsened into a profiled DAG of layers (`graph`), decomposed series-parallel (`sp`),
planned into a stage DAG by a dynamic program (`planner`, with the sequential PipeDream/Piper baselines),
scheduled per stage in micro-batches (`schedule`), checked and timed by an event simulator (`simulator`), and
trained on torch.distributed point-to-point sends (`runtime`, `launch`); `baselines` runs the chain plans
through torch.distributed.pipelining. This file only re-exports, lazily; it must not import torch eagerly.
"""

from importlib import import_module
from typing import Any

_LAZY = {"Hardware": "cost", "evaluate": "cost", "LayerGraph": "graph", "Program": "graph", "layer_graph": "graph",
         "Job": "job", "launch": "launch", "train_local": "launch", "train_reference": "launch",
         "PipeModel": "models", "get_model": "models", "pipe_models": "models", "Plan": "planner",
         "make_plan": "planner", "plan_graphpipe": "planner", "plan_pipedream": "planner", "plan_piper": "planner",
         "Schedule": "schedule", "build": "schedule", "Deadlock": "simulator", "simulate": "simulator",
         "decompose": "sp"}
__all__ = ["Deadlock", "Hardware", "Job", "LayerGraph", "PipeModel", "Plan", "Program", "Schedule", "build",
           "decompose", "evaluate", "get_model", "launch", "layer_graph", "make_plan", "pipe_models",
           "plan_graphpipe", "plan_pipedream", "plan_piper", "simulate", "train_local", "train_reference"]


def __getattr__(name: str) -> Any:  # imported on first use, so `tapml graphpipe --help` stays fast
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tapml.graphpipe' has no attribute {name!r}")
    return getattr(import_module(f"tapml.graphpipe.{module}"), name)
