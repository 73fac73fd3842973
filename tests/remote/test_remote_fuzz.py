"""Fuzzing `tapml serve` with 10,500 malformed or random frames (hypothesis, fixed example counts): the server
answers every frame, never crashes or hangs, refuses everything before the handshake, and still serves a real
client afterwards with nothing left in its handle table."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_remote import raw_session
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tapml.ops import OpCall
from tapml.remote.client import RemoteBackend
from tapml.remote.protocol import decode_frame, encode_frame, join_frame
from tapml.remote.server import ServerThread

# The server's keepalive pings draw their payload from the global `random` (websockets' choice); hypothesis
# notices the state change and warns. It does not touch the examples.
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")

SENT = {"structured": 0, "random": 0, "corrupted": 0, "unauthenticated": 0}


def fuzz(n: int) -> settings:
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def target():
    with ServerThread("torch", max_message=1 << 20, timeout=5, max_session_bytes=64 << 20) as st:
        yield st


class Wire:
    """An authenticated raw connection that sends arbitrary frames and reads one reply per frame."""

    def __init__(self, url: str, token: str):
        self.url, self.token, self.closes = url, token, 0
        self.open()

    def open(self):
        self.ws = raw_session(self.url, self.token, legacy=True)

    def ask(self, data) -> dict | None:
        try:
            self.ws.send(data)
            reply, _ = decode_frame(self.ws.recv(timeout=30))  # a hang fails here
            return reply
        except ConnectionClosed:
            self.closes += 1
            self.open()
            return None


@pytest.fixture(scope="module")
def wire(target):
    w = Wire(target.url, target.token)
    yield w
    w.ws.close()


def _check(reply):
    assert reply is not None, "the server dropped a well-sized frame instead of answering it"
    assert isinstance(reply.get("ok"), bool)
    if not reply["ok"]:
        assert isinstance(reply["error"], str) and "\n" not in reply["error"]
        assert reply.get("kind") in ("protocol", "backend", "timeout", "server")
        assert reply["kind"] != "server", reply["error"]  # a bug of ours, caught but still a bug


json_leaf = st.none() | st.booleans() | st.integers(-4, 64) | st.floats(-1e6, 1e6) | st.text(max_size=8)
json_value = st.recursive(json_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(
    st.sampled_from(["T", "dtype", "tuple", "float", "x", ""]), c, max_size=2), max_leaves=6)
tagged = json_value | st.sampled_from([{"T": 0}, {"T": 1}, {"T": -1}, {"T": 7}, {"dtype": "float32"},
                                       {"dtype": "load"}, {"float": "nan"}, {"float": "1e9999"},
                                       {"layout": "__class__"}, {"memory_format": "x"}, {"complex": [1, "a"]},
                                       {"tuple": [1, {"T": 0}]}, {"dict": {"a": {"T": 0}}}, {"device": "cuda"}])
ops = st.sampled_from(["aten.add.Tensor", "aten.mul.Scalar", "aten.neg.default", "aten.ones.default",
                       "aten.arange.default", "aten.mm.default", "aten.cat.default", "aten.view.default",
                       "aten.sum.dim_IntList", "aten.index_select.default", "aten.zeros.default",
                       "builtins.eval.default", "aten.__class__.mro", "aten.add", "os.system.default", "x", 3])
meta = st.fixed_dictionaries({"dtype": st.sampled_from(["float32", "int64", "bool", "float16", "nope", 1]),
                              "shape": st.lists(st.integers(-1, 6), max_size=3)},
                             optional={"stride": st.lists(st.integers(-1, 6), max_size=3),
                                       "offset": st.integers(-1, 8), "id": st.integers(-1, 8),
                                       "blob": st.integers(-1, 3)})
request = st.fixed_dictionaries(
    {"type": st.sampled_from(["info", "ping", "stats", "upload", "download", "free", "supports", "run", "batch",
                              "auth", "", "nope", None])},
    optional={"id": st.integers(0, 2**40) | st.text(max_size=4), "op": ops,
              "args": st.fixed_dictionaries({"args": st.lists(tagged, max_size=3)},
                                            optional={"kwargs": st.dictionaries(st.sampled_from(["dtype", "dim"]),
                                                                                tagged, max_size=2)}) | json_value,
              "tensors": st.lists(st.integers(-1, 8) | meta | st.fixed_dictionaries({"meta": meta}), max_size=3),
              "ids": st.lists(st.integers(-1, 8), max_size=3) | json_value,
              "out": st.integers(-1, 100), "keep": st.booleans(), "fetch": st.booleans(), "rng": st.integers(-1, 3),
              "calls": st.lists(st.fixed_dictionaries({"type": st.sampled_from(["upload", "run", "free", "batch"])},
                                                      optional={"tensors": st.lists(meta, max_size=2),
                                                                "op": ops, "ids": st.lists(st.integers(0, 8))}),
                                max_size=3)})
blobs = st.lists(st.binary(max_size=48), max_size=2)


@fuzz(4000)
@given(request, blobs)
def test_structured_requests_are_answered(wire, req, bl):
    SENT["structured"] += 1
    _check(wire.ask(join_frame(encode_frame(req, bl))))


@fuzz(3500)
@given(st.binary(max_size=300) | st.text(max_size=100))
def test_random_bytes_are_answered(wire, data):
    SENT["random"] += 1
    _check(wire.ask(data))


@fuzz(2500)
@given(request, st.integers(0, 200), st.binary(min_size=1, max_size=4))
def test_corrupted_frames_are_answered(wire, req, at, junk):
    SENT["corrupted"] += 1
    frame = bytearray(join_frame(encode_frame(req, [b"0123456789abcdef"])))
    at = at % len(frame)
    frame[at:at + len(junk)] = junk
    _check(wire.ask(bytes(frame)))


@fuzz(500)
@given(st.binary(max_size=200) | request.map(lambda r: join_frame(encode_frame(r))))
def test_nothing_is_served_before_the_handshake(target, data):
    SENT["unauthenticated"] += 1
    with connect(target.url, proxy=None, compression=None) as ws:
        ws.recv(timeout=5)
        ws.send(data)
        try:
            reply, _ = decode_frame(ws.recv(timeout=15))
            assert reply["type"] == "refused"
            ws.recv(timeout=15)
        except ConnectionClosed as e:
            assert e.rcvd is not None and e.rcvd.code == 1008
        else:
            raise AssertionError("the server kept an unauthenticated connection open")


def test_after_the_fuzzing_the_server_still_serves_and_holds_nothing(target, wire):
    assert wire.closes == 0  # no frame made the server drop the connection
    wire.ws.close()
    be = RemoteBackend(target.url, token=target.token)
    assert be.ping() < 5
    assert be.execute(OpCall("aten.add.Tensor", (torch.ones(3), torch.ones(3)), {})).tolist() == [2.0] * 3
    be.close()
    import time

    end = time.monotonic() + 10
    while target.stats()["sessions"] and time.monotonic() < end:
        time.sleep(0.05)
    stats = target.stats()
    assert stats["sessions"] == 0 and stats["handles"] == 0 and stats["bytes"] == 0
    assert stats["refused"] == SENT["unauthenticated"]  # each pre-handshake frame was refused
    if all(SENT.values()):  # the whole module ran
        assert sum(SENT.values()) >= 10_000
