"""GraphPipe: pipeline-parallel training of multi-branch models as a DAG of stages (ASPLOS'25, arXiv 2406.17145).

A model is exported and coarsened into a profiled DAG of layers (`graph`), decomposed series-parallel (`sp`),
planned into a stage DAG by a dynamic program (`planner`, with the sequential PipeDream/Piper baselines),
scheduled per stage in micro-batches (`schedule`), checked and timed by an event simulator (`simulator`), and
trained on torch.distributed point-to-point sends (`runtime`); `baselines` runs the chain plans through
torch.distributed.pipelining. This file only re-exports; it must not import torch.distributed eagerly.
"""

from tapml.graphpipe.models import PipeModel, get_model, pipe_models

__all__ = ["PipeModel", "get_model", "pipe_models"]
