"""What a commit carries into a store: `CaseSpec` (a signature's case row and the calls counted since the last
commit), `PendingSample` (one captured call, its tensors referenced by content hash, and how it was chosen) and `Batch` (a commit
prepared in the thread that records). It must not touch files or SQLite; `Recording` writes batches."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import safetensors
import torch

from tapml.ops import canonical_json

# safetensors cannot hold these dtypes; their bytes are stored as uint8 and viewed back on load.
RAW_DTYPES = {torch.complex64, torch.complex128, torch.uint16, torch.uint32, torch.uint64}


@dataclass(slots=True, eq=False)
class CaseSpec:
    """One signature as a case row will hold it, plus the calls of it counted since the last commit.

    `spec_json`/`metas_json`: the canonical JSON of `spec`/`metas` when the caller has it already (the halves
    of the signature's text); computed on demand otherwise."""

    signature: str
    op: str
    spec: Any
    metas: list[dict]
    replayable: bool = True
    reason: str | None = None
    random: bool = False
    spec_json: str | None = None
    metas_json: str | None = None
    calls: int = 0

    def row(self) -> list:
        return [self.signature, self.op, self.spec_json or canonical_json(self.spec),
                self.metas_json or canonical_json(self.metas), self.replayable, self.reason, self.random]


@dataclass(slots=True, eq=False)
class PendingSample:
    """A captured call not yet committed: where it ran, its inputs and outputs as [hash, tensor meta] (outputs
    under their pytree spec) and the hash of the generator state for seeded random ops."""

    signature: str
    module: str
    phase: str
    index: int
    inputs: list
    outputs: dict  # {"spec": json, "tensors": [[hash, meta], ...]}
    rng: str | None = None
    chosen: dict | None = None  # how it was chosen (K > 1: the first call, or why it is distinct); None: K = 1

    def row(self) -> list:
        return [self.signature, self.module, self.phase, self.index, self.inputs, self.outputs, self.rng,
                self.chosen]


class Batch:
    """One commit, prepared in the thread that records: blobs laid out for safetensors and every row encoded as
    one JSON array per table, which SQLite unpacks itself (json_each). The writer thread's commit is then file and
    SQLite I/O that takes the GIL a handful of times, not once per row: on a busy interpreter each hand-over of
    the GIL costs the recording thread a thread switch.

    `cases`: the signatures the store may not hold yet; `counts`: every signature with calls since the last
    commit (`CaseSpec.calls`); `samples`: the captured calls.
    """

    def __init__(self, blobs: dict[str, torch.Tensor], cases: list[CaseSpec], counts: list[CaseSpec],
                 samples: list[PendingSample]):
        self.blobs = blobs
        self.n_counts, self.n_samples = len(counts), len(samples)
        # The specs point into the (contiguous) tensors' memory, flat; no torch op runs here, since a Recorder
        # builds batches while it records.
        self.specs: dict[str, Any] = {}
        rows = []
        for h, t in blobs.items():
            if not t.is_contiguous():
                raise ValueError(f"blob {h} is not contiguous")
            n, nbytes = t.numel(), t.numel() * t.element_size()
            dtype = str(t.dtype).removeprefix("torch.")
            rows.append([h, dtype, f"[{n}]", nbytes])
            raw = t.dtype in RAW_DTYPES  # stored as bytes
            self.specs[h] = safetensors.TensorSpec(dtype="uint8" if raw else dtype, shape=[nbytes if raw else n],
                                                   data_ptr=t.data_ptr(), data_len=nbytes)
        self.blobs_json = json.dumps(rows)
        self.cases_json = json.dumps([c.row() for c in cases]) if cases else None
        self.counts_json = json.dumps([[c.signature, c.calls] for c in counts])
        self.samples_json = json.dumps([x.row() for x in samples])

    @classmethod
    def of(cls, blobs: dict[str, torch.Tensor], samples: list[PendingSample], cases: dict[str, CaseSpec]) -> Batch:
        """Every signature of `cases` (with their call counts) and the samples, for a caller that does not track
        which cases the store holds already (rows it holds are kept as they are)."""
        return cls(blobs, list(cases.values()), [c for c in cases.values() if c.calls], samples)
