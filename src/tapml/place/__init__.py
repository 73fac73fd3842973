"""Automatic backend placement (Collage): backends declare what they can run (`rules`), every candidate subgraph is
compiled, judged against fp64 and timed (`measure`), a DP and an evolutionary search pick the fastest correct
placement (`search`), and the placed model runs (`placed`). Nothing heavy is imported until a name is used.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Chain", "Pattern", "PlacedModel", "Placement", "Region", "Rule", "place", "register"]


def __getattr__(name: str) -> Any:
    if name in ("Rule", "Chain", "Pattern", "Region", "register"):
        from tapml.place import rules

        return getattr(rules, name)
    if name in ("place", "Placement"):
        from tapml.place import api

        return getattr(api, name)
    if name == "PlacedModel":
        from tapml.place.placed import PlacedModel

        return PlacedModel
    raise AttributeError(name)
