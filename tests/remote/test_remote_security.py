"""`tapml serve` as an attacker sees it (docs/SECURITY.md): the op allow-list, views checked against their storage,
uninitialized memory, authentication by default, Origin and Host checks, pre-authentication limits, connection
caps, per-session memory and element limits, a crash that ends one session only."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import TAPML
from test_remote import _wait, raw_session
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tapml.backends.reference import TorchBackend
from tapml.errors import TapmlError
from tapml.ops import OpCall
from tapml.remote.client import RemoteBackend
from tapml.remote.oppolicy import DENIED, OpPolicy, denied_reason, shipped
from tapml.remote.protocol import ProtocolError, RemoteError, decode_frame, encode_frame, join_frame
from tapml.remote.server import PREAUTH_MAX_MESSAGE, ServerThread
from tapml.remote.worker import check_storage


@pytest.fixture(scope="module")
def server():
    with ServerThread("torch", max_session_bytes=64 << 20, max_op_elements=1 << 28) as st:
        yield st


@pytest.fixture
def client(server):
    be = RemoteBackend(server.url, token=server.token)
    yield be
    be.close()


# --- the op surface ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op, args, why", [
    ("aten.from_file.default", ("/etc/passwd", True, 4096), "reads and writes files"),
    ("aten._print.default", ("written into the server's log",), "writes to the server's log"),
    ("aten._reshape_alias.default", ("T16", [4096], [1]), "without checking it against its storage"),
    ("aten._reshape_alias_copy.default", ("T16", [4096], [1]), "without checking it against its storage"),
    ("aten.set_.source_Tensor", ("T16", "T16"), "arbitrary storage"),
    ("aten.resize_.default", ("T16", [1 << 20]), "without initializing"),
    ("aten._unsafe_index.Tensor", ("T16", [None]), "without bounds checks"),
])
def test_file_printing_seeding_and_storage_ops_are_refused_by_name(client, op, args, why):
    args = tuple(torch.ones(4) if a == "T16" else a for a in args)  # a 16-byte tensor
    with pytest.raises(RemoteError, match=f"refused by this server: it .*{why}") as e:
        client.execute(OpCall(op, args, {}))
    assert "\n" not in str(e.value)


def test_only_the_allow_list_runs_and_it_is_small():
    all_ops = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith(("aten::", "prims::"))]
    allowed = shipped()
    assert len(allowed) < len(all_ops) / 4
    assert all(denied_reason(op) is None for op in allowed)
    policy = OpPolicy()
    assert "not on this server's allow-list" in policy.refusal("aten.kthvalue.default")
    assert policy.refusal("aten.mm.default") is None
    for pattern in DENIED:
        assert denied_reason(pattern.replace("*", "x") + ".default"), pattern


def test_the_allow_list_covers_every_op_the_zoo_carves(zoo_stores):
    from tapml.store import CaseStore

    missing = set()
    for path in zoo_stores.values():
        with CaseStore.open(path) as st:
            missing |= {c.op for c in st.cases() if c.op.startswith("aten.") and c.op not in shipped()}
    assert not missing, f"zoo ops a server would refuse: {sorted(missing)} (run scripts/allowlist.py)"


def test_allow_ops_extends_the_list_but_never_past_the_deny_list(tmp_path):
    extra = tmp_path / "ops.txt"
    extra.write_text("# what my model needs\naten.kthvalue.default\n")
    x = torch.tensor([3.0, 1.0, 2.0])
    with ServerThread("torch") as st:
        be = RemoteBackend(st.url, token=st.token)
        with pytest.raises(RemoteError, match="--allow-ops"):
            be.execute(OpCall("aten.kthvalue.default", (x, 2), {}))
        be.close()
    with ServerThread("torch", allow_ops=(extra,)) as st:
        be = RemoteBackend(st.url, token=st.token)
        assert be.execute(OpCall("aten.kthvalue.default", (x, 2), {}))[0].item() == 2.0
        be.close()
    extra.write_text("aten.from_file.default\n")
    with pytest.raises(TapmlError, match=r"ops\.txt:1: aten\.from_file\.default cannot be allowed"):
        ServerThread("torch", allow_ops=(extra,))


def test_a_view_outside_its_storage_is_refused():
    t = torch.ones(4)
    check_storage(t[1:3])
    with pytest.raises(ProtocolError, match="outside its storage"):
        check_storage(torch.ops.aten._reshape_alias.default(t, [4096], [1]))  # torch itself builds it


def test_empty_never_returns_another_sessions_memory(server):
    a = RemoteBackend(server.url, token=server.token)
    secret = torch.full((1 << 16,), 1234.5)
    for _ in range(3):
        h = a.upload(secret)
        a.run(OpCall("aten.mul.Tensor", (h, 1.0), {}))
        del h
    a.stats()  # frees applied
    b = RemoteBackend(server.url, token=server.token)
    for op, args, kwargs in [("aten.empty.memory_format", ([1 << 16],), {"dtype": torch.float32}),
                             ("aten.empty_strided.default", ([1 << 16], [1]), {"dtype": torch.float32})]:
        assert not b.execute(OpCall(op, args, kwargs)).any()
    assert not a.execute(OpCall("aten.empty.memory_format", ([1 << 16],), {"dtype": torch.float32})).any()
    a.close()
    b.close()


# --- limits per session --------------------------------------------------------------------------------------

def test_session_memory_and_elements_are_capped(server, client):
    with pytest.raises(RemoteError, match="hold 83,886,080 bytes, more than this server's limit of 67,108,864"):
        client.upload(torch.ones(80 << 20, dtype=torch.uint8))
        client.stats()
    with pytest.raises(RemoteError, match="--max-session-mb"):  # refused before it is allocated
        client.execute(OpCall("aten.zeros.default", ([20 << 20],), {}))
    one = client.upload(torch.ones(1))  # 4 bytes seen as 4e10 elements
    with pytest.raises(RemoteError, match="40,000,000,000 elements, more than this server's limit"):
        client.run(OpCall("aten.expand.default", (one, [40_000_000_000]), {}))
    assert client.execute(OpCall("aten.neg.default", (torch.ones(2),), {})).tolist() == [-1.0, -1.0]


class _Crashing(TorchBackend):
    """Fault injection: `aten.neg` kills the process it runs in, as a segfaulting kernel would."""

    name = "crashing"

    def run(self, call):
        if call.kind == "aten.neg":
            os.kill(os.getpid(), signal.SIGSEGV)
        return super().run(call)


def test_a_crash_in_the_backend_ends_one_session_and_no_other():
    with ServerThread(_Crashing) as st:
        a, b = RemoteBackend(st.url, token=st.token), RemoteBackend(st.url, token=st.token)
        hb = b.upload(torch.arange(3.0))
        with pytest.raises(RemoteError, match="session's process ended"):
            a.execute(OpCall("aten.neg.default", (torch.ones(2),), {}))
        assert b.download(hb).tolist() == [0.0, 1.0, 2.0]
        assert a.execute(OpCall("aten.abs.default", (-torch.ones(2),), {})).tolist() == [1.0, 1.0]
        a.close()
        b.close()


# --- who may connect -----------------------------------------------------------------------------------------

def test_browsers_are_refused_unless_their_origin_is_named():
    with ServerThread("torch") as st:
        with pytest.raises(InvalidStatus) as e:
            connect(st.url, proxy=None, origin="http://evil.example")
        assert e.value.response.status_code == 403
        with pytest.raises(InvalidStatus) as e:  # two Host headers: ambiguous
            connect(st.url, proxy=None, additional_headers={"Host": "evil.example:80"})
        assert e.value.response.status_code == 403
        assert _upgrade(st.server.port, "evil.example").startswith(b"HTTP/1.1 403")  # a rebound page's own name
        assert _upgrade(st.server.port, f"127.0.0.1:{st.server.port}").startswith(b"HTTP/1.1 101")
    with ServerThread("torch", allow_origins=("http://localhost:3000",)) as st, \
            connect(st.url, proxy=None, origin="http://localhost:3000") as ws:
        assert decode_frame(ws.recv(timeout=10))[0]["type"] == "hello"


def _upgrade(port: int, host: str) -> bytes:
    """The status line of a WebSocket upgrade request sent with this Host header and no other."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        return sock.recv(64)


def test_before_authentication_a_frame_is_tiny_and_connections_are_few():
    with ServerThread("torch", max_unauthenticated=2, max_connections=3) as st:
        with connect(st.url, proxy=None, max_size=None) as ws:  # a big first frame is cut at its header
            ws.recv(timeout=10)
            ws.send(bytes(PREAUTH_MAX_MESSAGE + 1))
            with pytest.raises(ConnectionClosed) as e:
                ws.recv(timeout=10)
            assert e.value.rcvd.code == 1009
        idle = [connect(st.url, proxy=None, legacy=True) for _ in range(2)]  # connected, never authenticating
        with pytest.raises(InvalidStatus) as e:
            connect(st.url, proxy=None)
        assert e.value.response.status_code == 503
        for ws in idle:
            ws.close()
        time.sleep(0.3)
        clients = [RemoteBackend(st.url, token=st.token) for _ in range(3)]
        with pytest.raises(TapmlError, match="503"):  # the connection cap counts sessions too
            RemoteBackend(st.url, token=st.token)
        for c in clients:
            c.close()


def test_a_nan_in_a_header_is_an_error_reply_not_a_dropped_connection(server):
    ws = raw_session(server.url, server.token)
    ws.send(join_frame(encode_frame({"type": "ping", "id": 1})).replace(b'"id":1', b'"t":NaN'))
    reply, _ = decode_frame(ws.recv(timeout=10))
    assert reply["ok"] is False and "NaN is not JSON" in reply["error"]
    ws.send(join_frame(encode_frame({"type": "ping", "id": 2, "t": 1.5})))
    assert decode_frame(ws.recv(timeout=10))[0]["pong"] == 1.5
    ws.close()


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) << 10


def test_unauthenticated_connections_cannot_make_the_server_hold_memory():
    """Four connections each send a 256 MiB first frame (what the old server buffered before auth)."""
    proc = subprocess.Popen([*TAPML, "serve", "--backend", "torch", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        url = re.search(r"ws://127\.0\.0\.1:\d+", proc.stdout.readline()).group(0)
        before = _rss(proc.pid)
        blob = bytes(256 << 20)
        peak = before
        for _ in range(4):
            with connect(url, proxy=None, max_size=None) as ws:
                ws.recv(timeout=10)
                try:
                    ws.send(blob)
                    ws.recv(timeout=10)
                except (ConnectionClosed, OSError):
                    pass
                peak = max(peak, _rss(proc.pid))
        grown = peak - before
        print(f"\nserver RSS {before / 2**20:.1f} MiB before, {peak / 2**20:.1f} MiB at the peak of 4 x 256 MiB "
              f"unauthenticated frames (+{grown / 2**20:.1f} MiB)")
        assert grown < 32 << 20
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


def test_serve_prints_a_generated_token_and_refuses_bad_numbers():
    proc = subprocess.Popen([*TAPML, "serve", "--backend", "torch", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        url = re.search(r"ws://127\.0\.0\.1:\d+", proc.stdout.readline()).group(0)
        token = re.search(r"token (\S+) \(generated", proc.stdout.readline()).group(1)
        with pytest.raises(TapmlError, match="requires a token"):
            RemoteBackend(url, token="")
        be = RemoteBackend(url, token=token)
        assert be.execute(OpCall("aten.neg.default", (torch.ones(1),), {})).tolist() == [-1.0]
        be.close()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    for flags, message in [(["--timeout", "-1"], "--timeout must be"), (["--timeout", "nan"], "--timeout must be"),
                           (["--max-message-mb", "0"], "--max-message-mb must be in"),
                           (["--max-session-mb", "0"], "--max-session-mb must be in"),
                           (["--max-op-elements", "0"], "--max-op-elements must be in"),
                           (["--max-connections", "0"], "--max-connections must be in"),
                           (["--port", "-5"], "--port must be in"), (["--port", "65536"], "--port must be in")]:
        r = subprocess.run([*TAPML, "serve", "--backend", "torch", *flags], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2, (flags, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tapml: error:") and message in lines[0], (flags, r.stderr)


def test_a_session_process_goes_when_its_client_does(server):
    before = _session_pids()
    be = RemoteBackend(server.url, token=server.token)
    be.stats()
    assert len(_session_pids() - before) == 1  # one process for the session, forked from the zygote
    be.close()
    assert _wait(lambda: _session_pids() <= before, 20)


def _session_pids() -> set[int]:
    out = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if b"tapml.remote.worker" in f.read():
                        out.add(int(d))
            except OSError:
                pass
    return out


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
