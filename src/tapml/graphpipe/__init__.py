"""GraphPipe: pipeline-parallel training of multi-branch models as a DAG of stages (ASPLOS'25, arXiv 2406.17145).

A model is exported and coarsened into a profiled DAG of layers (`graph`), decomposed series-parallel (`sp`),
planned into a stage DAG by a dynamic program (`planner`, with the sequential PipeDream/Piper baselines),
scheduled per stage in micro-batches (`schedule`), checked and timed by an event simulator (`simulator`), and
trained on torch.distributed point-to-point sends (`runtime`, `launch`); `baselines` runs the chain plans
through torch.distributed.pipelining. This file only re-exports; it must not import torch.distributed eagerly.
"""

from tapml.graphpipe.cost import Hardware, evaluate
from tapml.graphpipe.graph import LayerGraph, Program, layer_graph
from tapml.graphpipe.launch import Job, launch, train_local, train_reference
from tapml.graphpipe.models import PipeModel, get_model, pipe_models
from tapml.graphpipe.planner import Plan, make_plan, plan_graphpipe, plan_pipedream, plan_piper
from tapml.graphpipe.schedule import Schedule, build
from tapml.graphpipe.simulator import Deadlock, simulate
from tapml.graphpipe.sp import decompose

__all__ = ["Deadlock", "Hardware", "Job", "LayerGraph", "PipeModel", "Plan", "Program", "Schedule", "build",
           "decompose", "evaluate", "get_model", "launch", "layer_graph", "make_plan", "pipe_models",
           "plan_graphpipe", "plan_pipedream", "plan_piper", "simulate", "train_local", "train_reference"]
