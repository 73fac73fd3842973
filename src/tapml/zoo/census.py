"""How many distinct architectures the zoo holds across every table `tapml zoo` prints: the zoo's own entries,
the placement models, the graph-pipeline models and the long-context decode shapes. It builds no model."""

from __future__ import annotations

TABLES = ("zoo", "placement", "graphpipe", "parallel")


def entries() -> list[tuple[str, str, str]]:
    """(table, name, architecture) of every entry of every table, in the order `tapml zoo` prints them."""
    from tapml import zoo
    from tapml.graphpipe.models import pipe_models
    from tapml.parallel.models import zoo_specs
    from tapml.place.models import catalog as place_models

    rows = [("zoo", s.name, s.architecture) for s in zoo.catalog()]
    rows += [("placement", m.name, m.architecture) for m in place_models()]
    rows += [("graphpipe", m.name, m.architecture) for m in pipe_models()]
    rows += [("parallel", s.name, s.architecture) for s in zoo_specs()]
    return rows


def architectures() -> dict[str, list[str]]:
    """Each distinct architecture → the entries that run it (`table:name`), first seen first: the zoo's Llama, the
    placement Llama and the decode shapes are one architecture, mmt2 and mmt4 another."""
    out: dict[str, list[str]] = {}
    for table, name, arch in entries():
        out.setdefault(arch, []).append(f"{table}:{name}")
    return out
