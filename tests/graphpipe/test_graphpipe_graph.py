"""The layer graph: torch.export grouped by module path into a DAG, glue and tied weights, measured costs and
their disk cache."""

import json

import torch
from torch import nn

from tapml.graphpipe import api
from tapml.graphpipe.graph import LayerGraph, Program, layer_graph, layer_key
from tapml.graphpipe.models import get_model
from tapml.graphpipe.sp import PARALLEL, decompose


def program(name: str, b: int = 2) -> Program:
    spec = get_model(name)
    model = spec.build("tiny", torch.float64)
    return Program(model, tuple(t[:b] for t in spec.batch(b, "tiny", torch.float64)[0]))


def test_layer_key():
    assert layer_key("text.blocks.3.qkv") == "text.blocks.3"
    assert layer_key("text.embed.tok") == "text.embed"
    assert layer_key("head") == "head"
    assert layer_key("") == ""
    assert layer_key("a.b.c.d", depth=3) == "a.b.c"


def test_mmt_branches_stay_apart():
    p = program("mmt4")
    names = [lay.name for lay in p.layers]
    for tower in ("text", "image", "audio", "table"):
        assert [n for n in names if n.startswith(tower)] == [f"{tower}.embed", f"{tower}.blocks.0",
                                                            f"{tower}.blocks.1", f"{tower}.out.0", f"{tower}.out.1"]
    # the concatenation of the towers (glue of `fuse`) went to its consumer, never into a tower
    edges = {(names[u], names[v]) for u, v in p.edges()}
    assert {(f"{t}.out.1", "fuse.blocks.0") for t in ("text", "image", "audio", "table")} <= edges
    towers = [n.split(".")[0] for n in names]
    assert not [(a, b) for a, b in edges if a.split(".")[0] != b.split(".")[0] and not b.startswith("fuse")]
    top = decompose(LayerGraph.synthetic(_graph(p), dict.fromkeys(range(len(names)), 1.0)).graph)
    assert top.children[0].kind == PARALLEL and len(top.children[0].children) == 4
    assert towers.count("fuse") == 3


def _graph(p: Program):
    import networkx as nx

    g = nx.DiGraph()
    g.add_nodes_from(range(len(p.layers)))
    g.add_edges_from(p.edges())
    return g


def test_dlrm_tables_and_uno_towers_are_parallel():
    d = program("dlrm")
    t = decompose(_graph(d))
    assert str(t) == "(((0 → 1) | 2 | 3 | 4 | 5) → 6 → 7 → 8 → 9)"
    assert [d.layers[i].name for i in (2, 6)] == ["sparse.tables.0", "inter"]
    assert d.model_inputs(2) == ["sparse_idx"]  # the slice of the index tensor went to its table
    u = program("uno")
    assert str(decompose(_graph(u))) == "(((0 → 1) | (2 → 3) | (4 → 5)) → 6 → 7 → 8)"


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 4)
        self.mid = nn.Linear(4, 4)
        self.dec = nn.Linear(4, 4)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.dec(torch.relu(self.mid(self.enc(x))))


def test_tied_weights_share_a_layer():
    p = Program(Tied(), (torch.randn(2, 4),))
    assert [lay.name for lay in p.layers] == ["enc+mid+dec"]
    stage = p.stage([0])
    out = stage.module(torch.ones(2, 4))[0]
    assert torch.equal(out, p.gm(torch.ones(2, 4)))


def test_profile_measures_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TAPML_CACHE_DIR", str(tmp_path))
    lg = api.profile("uno", "tiny", "cpu", 8)
    assert len(lg) == 9 and lg.output == 8
    assert all(lg.fwd(i, 4) > 0 and lg.bwd(i, 4) > 0 and lg.act(i, 4) > 0 for i in range(len(lg)))
    assert lg.layers[0].params == (64 * 32 + 32) * 4  # cell.0: Linear(64, 32) in float32
    assert lg.edges[(1, 6)] == 32 * 4  # cell.1 → top.0: 32 floats per sample
    files = list((tmp_path / "graphpipe").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["model"] == "uno:tiny:float32"

    def boom(*a, **k):
        raise AssertionError("measured again instead of reading the cache")

    monkeypatch.setattr("tapml.graphpipe.graph.profile", boom)
    again = api.profile("uno", "tiny", "cpu", 8)
    assert [x.fwd for x in again.layers] == [x.fwd for x in lg.layers]


def test_layer_graph_of_any_model(tmp_path, monkeypatch):
    monkeypatch.setenv("TAPML_CACHE_DIR", str(tmp_path))
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    lg, prog = layer_graph("mine", model, lambda b: (torch.randn(b, 8),), (2, 8), cache=False)
    assert [x.name for x in lg.layers] == ["0", "1", "2"] and set(lg.edges) == {(0, 1), (1, 2)}
    assert prog.batch == 8 and not list((tmp_path / "graphpipe").glob("*.json"))
