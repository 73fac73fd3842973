"""`tapml serve` and the `remote` backend over real WebSockets: replay, resident handles, auth, limits,
reconnects, a server killed mid-run, a client killed mid-upload, concurrent clients."""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import TAPML, model_ref

from tapml.backends import get_backend
from tapml.errors import TapmlError
from tapml.ops import OpCall
from tapml.recorder import carve
from tapml.remote.client import RemoteBackend, RemoteTensor
from tapml.remote.protocol import RemoteError, decode_frame, encode_frame, join_frame
from tapml.remote.server import ServerThread
from tapml.replay import run_tests


@pytest.fixture
def server():
    with ServerThread("torch") as st:
        yield st


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("remote") / "tiny"
    carve(model_ref("make_model"), path, progress=False)
    return path


def raw_session(url: str, token: str, **options):
    """A raw WebSocket through the handshake (HMAC, then the ping that takes the pre-auth-sized slot)."""
    from websockets.sync.client import connect

    from tapml.remote.protocol import auth_mac

    ws = connect(url, proxy=None, compression=None, max_size=None, **{"legacy": True, **options})
    hello, _ = decode_frame(ws.recv(timeout=10))
    cnonce = "c" * 32
    ws.send(join_frame(encode_frame({"type": "auth", "protocol": 1, "cnonce": cnonce,
                                     "mac": auth_mac(token, "client", hello["nonce"], cnonce)})))
    assert decode_frame(ws.recv(timeout=10))[0]["type"] == "welcome"
    ws.send(join_frame(encode_frame({"type": "ping", "id": 0})))
    assert decode_frame(ws.recv(timeout=10))[0]["pong"] is None
    return ws


def _wait(pred, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_replay_over_the_wire_matches_local(server, tiny_store):
    local = run_tests(str(tiny_store), "torch", progress=False)
    be = RemoteBackend(server.url, token=server.token)
    remote = run_tests(str(tiny_store), be, progress=False)
    assert be.name == "remote:torch"
    assert [(r.case_id, r.status) for r in remote.results] == [(r.case_id, r.status) for r in local.results]
    assert remote.totals()["pass"] == len(remote.results) > 0
    be.close()
    assert _wait(lambda: server.stats() == {"sessions": 0, "handles": 0, "bytes": 0, "refused": 0})


def test_resident_handles_chain_like_a_mixed_run(server):
    be = get_backend("remote", url=server.url, token=server.token)
    x, w, b = torch.randn(8, 16), torch.randn(16, 4), torch.randn(4)
    hx, hw, hb = be.upload(x), be.upload(w), be.upload(b)
    h = be.run(OpCall("aten.addmm.default", (hb, hx, hw), {}))
    h = be.run(OpCall("aten.relu.default", (h,), {}))
    vals, idx = be.run(OpCall("aten.max.dim", (h, 1), {}))
    assert isinstance(vals, RemoteTensor) and vals.shape == (8,) and idx.dtype == torch.int64
    ref = torch.relu(torch.addmm(b, x, w)).max(1)
    assert torch.allclose(be.download(vals), ref.values) and torch.equal(be.download(idx), ref.indices)
    # A strided view keeps its layout across the wire.
    t = torch.arange(24.0).reshape(4, 6)[:, 1::2]
    assert torch.equal(be.download(be.upload(t)), t)
    assert be.stats()["handles"] >= 5
    del hx, hw, hb, h, vals, idx
    assert be.stats()["handles"] == 0  # frees rode along with the stats request
    be.close()


def test_backend_errors_and_unsupported_come_back_as_such(server):
    be = RemoteBackend(server.url, token=server.token)
    with pytest.raises(RemoteError, match="RuntimeError"):
        be.execute(OpCall("aten.mm.default", (torch.ones(2, 3), torch.ones(2, 3)), {}))
    assert be.execute(OpCall("aten.add.Tensor", (torch.ones(2), 1.0), {})).tolist() == [2.0, 2.0]
    assert be.supports(OpCall("aten.mm.default", (torch.ones(2, 3), torch.ones(3, 2)), {})) is None
    be.close()


def test_token_handshake(tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-" * 8)
    with ServerThread("torch", token="s3cret-" * 8) as st:
        with pytest.raises(TapmlError, match="requires a token"):
            RemoteBackend(st.url, token="")
        with pytest.raises(TapmlError, match="refused this client"):
            RemoteBackend(st.url, token="wrong")
        be = RemoteBackend(st.url, token_file=token)
        assert be.execute(OpCall("aten.neg.default", (torch.ones(2),), {})).tolist() == [-1.0, -1.0]
        be.close()
        assert st.stats()["refused"] == 1


def test_unauthenticated_requests_are_refused(server):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    with connect(server.url, proxy=None, compression=None) as ws:
        hello, _ = decode_frame(ws.recv(timeout=5))
        assert hello["type"] == "hello" and len(hello["nonce"]) == 64
        ws.send(join_frame(encode_frame({"type": "run", "id": 1, "op": "aten.add.Tensor"})))
        refused, _ = decode_frame(ws.recv(timeout=5))
        assert refused["type"] == "refused" and refused["error"] == "authentication failed"
        with pytest.raises(ConnectionClosed) as exc:
            ws.recv(timeout=5)
        assert exc.value.rcvd.code == 1008
    assert server.stats()["refused"] == 1


def test_a_server_without_a_token_generates_one_and_still_requires_it():
    with ServerThread("torch") as st:
        assert st.server.generated_token and len(st.token) >= 32
        with pytest.raises(TapmlError, match="requires a token"):
            RemoteBackend(st.url, token="")
        with pytest.raises(TapmlError, match="refused this client"):
            RemoteBackend(st.url, token="not-the-token")
        be = RemoteBackend(st.url, token=st.token)
        assert be.execute(OpCall("aten.neg.default", (torch.ones(2),), {})).tolist() == [-1.0, -1.0]
        be.close()


def test_oversized_messages_are_refused_and_the_server_goes_on():
    with ServerThread("torch", max_message=1 << 20) as st:
        be = RemoteBackend(st.url, token=st.token)
        with pytest.raises(TapmlError, match="maximum message size"):
            be.execute(OpCall("aten.neg.default", (torch.ones(1 << 19),), {}))  # 2 MiB
        from websockets.exceptions import ConnectionClosed

        with raw_session(st.url, st.token) as ws:  # a client that ignores the limit
            ws.send(bytes(2 << 20))
            with pytest.raises(ConnectionClosed) as exc:
                ws.recv(timeout=5)
            assert exc.value.rcvd.code == 1009
        assert be.execute(OpCall("aten.neg.default", (torch.ones(4),), {})).tolist() == [-1.0] * 4
        be.close()


def test_strict_decoding_refuses_anything_but_ops_and_tables(server):
    be = RemoteBackend(server.url, token=server.token)
    for op in ("builtins.eval.default", "aten.__class__.mro", "os.system.default", "aten.mm"):
        with pytest.raises(RemoteError, match="op name|allow-list"):
            be._request({"type": "run", "op": op, "args": {"args": [], "kwargs": {}}, "tensors": []})
    with pytest.raises(RemoteError, match="unknown dtype"):
        be._request({"type": "run", "op": "aten.ones.default", "args": {"args": [[2]], "kwargs": {
            "dtype": {"dtype": "load"}}}, "tensors": []})
    with pytest.raises(RemoteError, match="out of range"):
        be._request({"type": "run", "op": "aten.neg.default", "args": {"args": [{"T": 9}], "kwargs": {}},
                     "tensors": []})
    be.close()


def test_concurrent_clients_are_isolated(server):
    import threading

    a, b = RemoteBackend(server.url, token=server.token), RemoteBackend(server.url, token=server.token)
    ha, hb = a.upload(torch.full((3,), 1.0)), b.upload(torch.full((3,), 2.0))
    assert ha.id == hb.id  # the same id in two sessions names two different tensors
    errors = []

    def work(be, h, value):
        try:
            for _ in range(50):
                out = be.run(OpCall("aten.mul.Tensor", (h, 2.0), {}))
                assert be.download(out).tolist() == [value * 2] * 3
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(a, ha, 1.0)), threading.Thread(target=work, args=(b, hb, 2.0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert server.stats()["sessions"] == 2
    a.close()
    assert _wait(lambda: server.stats()["sessions"] == 1)
    assert b.download(hb).tolist() == [2.0] * 3  # closing a does not touch b's tensors
    b.close()


def test_reconnect_resends_host_tensors_and_fails_lost_ones_cleanly():
    with ServerThread("torch") as st:
        port = st.server.port
        be = RemoteBackend(st.url, token=st.token)
        x = torch.arange(6.0)
        hx = be.upload(x)
        hy = be.run(OpCall("aten.mul.Tensor", (hx, 3.0), {}))
        assert be.download(hy).tolist() == (x * 3).tolist()
    with ServerThread("torch", port=port, token=st.token) as st2:  # the server restarted on the same port
        assert be.download(hx).tolist() == x.tolist()  # uploaded from the host again
        assert be.reconnects == 1
        with pytest.raises(TapmlError, match="lost when the connection"):
            be.download(hy)  # computed on the old server: gone, and said so
        assert be.execute(OpCall("aten.neg.default", (x,), {})).tolist() == (-x).tolist()
        be.close()
        assert _wait(lambda: st2.stats()["handles"] == 0)


def _serve(*extra, env=None):
    """A real `tapml serve` process; returns it, its URL and the token it generated (or was given)."""
    proc = subprocess.Popen([*TAPML, "serve", "--backend", "torch", "--port", "0", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    m = re.search(r"ws://127\.0\.0\.1:\d+", line)
    assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
    token = None
    if "--token-file" not in extra:
        t = re.search(r"token (\S+) \(generated", proc.stdout.readline())
        assert t, "tapml serve did not print the token it generated"
        token = t.group(1)
    return proc, m.group(0), token


def _token_file(st, tmp_path) -> str:
    path = tmp_path / "token"
    path.write_text(st.token)
    return str(path)


def test_server_killed_mid_run_gives_a_clear_error_and_no_passes(tiny_store):
    proc, url, token = _serve()
    try:
        be = RemoteBackend(url, token=token)
        h = be.upload(torch.ones(3))
        assert be.download(be.run(OpCall("aten.neg.default", (h,), {}))).tolist() == [-1.0] * 3
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)  # a clean shutdown; generous for a loaded 2-core CI machine
        with pytest.raises(TapmlError, match=r"remote server ws://127\.0\.0\.1:\d+ is gone"):
            be.run(OpCall("aten.neg.default", (h,), {}))
        t0 = time.monotonic()
        with pytest.raises(TapmlError, match="is gone"):
            run_tests(str(tiny_store), be, progress=False)
        assert time.monotonic() - t0 < 5  # a gone server fails fast, it does not back off again
    finally:
        proc.kill()
        proc.wait()


def test_cli_run_aborts_with_one_line_when_the_server_dies_mid_run(zoo_stores, tmp_path):
    proc, url, token = _serve()
    try:
        run = subprocess.Popen([*TAPML, "test", str(zoo_stores["llama"]), "--backend", "remote", "--remote", url,
                                "--json", tmp_path / "r.json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "TAPML_TOKEN": token})
        monitor = RemoteBackend(url, token=token)
        assert _wait(lambda: monitor.stats()["server"]["sessions"] == 2, 60), "the test run never connected"
        time.sleep(0.5)  # a few cases
        assert run.poll() is None, run.communicate()
        proc.send_signal(signal.SIGKILL)
        out, err = run.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert run.returncode == 2, (out, err)
    assert re.fullmatch(r"tapml: error: remote server ws://127\.0\.0\.1:\d+ is gone \(.*\); start `tapml serve` "
                        r"again\n", err), err
    assert "passed" not in out


def test_client_killed_mid_upload_leaves_the_server_clean(server):
    child = textwrap.dedent(f"""
        import sys, torch
        from tapml.remote.client import RemoteBackend
        be = RemoteBackend({server.url!r}, token={server.token!r})
        keep = [be.upload(torch.ones(1 << 16)) for _ in range(4)]
        be.stats()
        print("ready", flush=True)
        held = None
        while True:  # each 48 MiB upload is one message; the kill lands in the middle of one
            held = be.upload(torch.ones(48 << 20, dtype=torch.uint8))
            be.stats()
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert server.stats()["handles"] >= 4
        assert _wait(lambda: server.stats()["bytes"] > (48 << 20), 30)  # big uploads are landing
        time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)  # a clean shutdown; generous for a loaded 2-core CI machine
        assert _wait(lambda: server.stats() == {"sessions": 0, "handles": 0, "bytes": 0, "refused": 0})
    finally:
        proc.kill()
        proc.wait()
    be = RemoteBackend(server.url, token=server.token)
    assert be.execute(OpCall("aten.neg.default", (torch.ones(2),), {})).tolist() == [-1.0, -1.0]
    be.close()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_stops_on_a_signal_even_with_sigint_inherited_as_ignored(sig):
    """A server started with SIGINT ignored (what some parents hand down) still stops on Ctrl-C and SIGTERM."""
    proc = subprocess.Popen([*TAPML, "serve", "--backend", "torch", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # noqa: PLW1509
    try:
        assert "ws://127.0.0.1:" in proc.stdout.readline()
        proc.send_signal(sig)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()


def test_cli_serve_and_test_remote(tmp_path, tiny_store):
    token = tmp_path / "token"
    token.write_text("cli-token-0123456789")
    proc, url, _ = _serve("--token-file", str(token))
    try:
        r = subprocess.run([*TAPML, "test", str(tiny_store), "--backend", "remote", "--remote", url,
                            "--token-file", str(token), "--json", str(tmp_path / "r.json")],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert "passed" in r.stdout and "remote:torch" in r.stdout
        r = subprocess.run([*TAPML, "test", str(tiny_store), "--backend", "torch64", "--remote", url,
                            "--token-file", str(token)], capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
        assert "hosts backend 'torch', not 'torch64'" in r.stderr
        r = subprocess.run([*TAPML, "test", str(tiny_store), "--backend", "remote", "--remote", url],
                           capture_output=True, text=True, env={**os.environ, "TAPML_TOKEN": ""})
        assert r.returncode == 2 and "requires a token" in r.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)  # a clean shutdown; generous for a loaded 2-core CI machine
    r = subprocess.run([*TAPML, "test", str(tiny_store), "--backend", "remote", "--remote", url],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "cannot reach" in r.stderr
    r = subprocess.run([*TAPML, "serve", "--backend", "torch", "--port", "70000"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("tapml: error: --port must be in [0, 65535]"), r.stderr


def test_torch_cuda_says_why_not_without_a_gpu():
    from tapml.backends.torch_cuda import TorchCudaBackend

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert "no CUDA device" in TorchCudaBackend.unavailable()
    with pytest.raises(TapmlError, match="torch-cuda is not usable here"):
        get_backend("torch-cuda")


def test_tls_with_a_trusted_certificate_and_refusal_without(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                        "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
                        "-out", str(cert)], capture_output=True)
    if r.returncode:
        pytest.skip(f"openssl cannot make a test certificate: {r.stderr[-200:]}")
    with ServerThread("torch", tls_cert=cert, tls_key=key, token="tls-token-123") as st:
        assert st.url.startswith("wss://127.0.0.1:")
        with pytest.raises(TapmlError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            RemoteBackend(st.url, token="tls-token-123")  # an unknown certificate is not trusted
        be = RemoteBackend(st.url, token="tls-token-123", cafile=cert)
        assert be.execute(OpCall("aten.neg.default", (torch.ones(2),), {})).tolist() == [-1.0, -1.0]
        be.close()


def test_prefetched_outputs_save_a_round_trip_and_never_go_stale(server):
    be = RemoteBackend(server.url, token=server.token)
    h = be.upload(torch.arange(6.0))
    out = be.run(OpCall("aten.mul.Tensor", (h, 2.0), {}))
    view = be.run(OpCall("aten.view.default", (out, [2, 3]), {}))
    sent = be.requests
    assert be.download(out).tolist() == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    assert be.requests == sent  # came with the run's reply
    be.run(OpCall("aten.add_.Scalar", (out, 1.0), {}))  # in place: the view's prefetched value is stale now
    assert be.download(view).tolist() == [[1.0, 3.0, 5.0], [7.0, 9.0, 11.0]]
    assert be.download(out).tolist() == [1.0, 3.0, 5.0, 7.0, 9.0, 11.0]
    small = RemoteBackend(server.url, token=server.token, prefetch=8)  # outputs above the budget stay on the server
    big = small.run(OpCall("aten.mul.Tensor", (small.upload(torch.ones(4)), 3.0), {}))
    sent = small.requests
    assert small.download(big).tolist() == [3.0] * 4 and small.requests == sent + 1
    be.close()
    small.close()


def test_a_mixed_run_of_zoo_llama_on_the_remote_target_matches_the_reference(server):
    from tapml.migration import Placement, run_mixed
    from tapml.workload import load_workload

    _, w = load_workload("llama", max_new_tokens=2)
    ref = run_mixed(w, None, Placement.none())
    be = RemoteBackend(server.url, token=server.token)
    run = run_mixed(w, be, Placement.all())  # every op on the server, tensors kept resident between them
    assert len(run.records) > 0.9 * len(ref.trace) and not run.refused
    assert torch.equal(run.output, ref.output)  # the same tokens (torch on both sides: the same numbers)
    assert all(torch.equal(a, b) for a, b in zip(run.logits, ref.logits))
    assert be.requests < 1.5 * len(run.records)  # about one round trip per op: uploads and downloads ride along
    be.close()


def test_backend_options_are_given_where_the_backend_is_served(tmp_path):
    from tapml.backends import open_backend
    from tapml.remote.server import parse_options

    assert parse_options(["tf32=false", "target=llvm -mcpu=skylake", "n=3"]) == {
        "tf32": False, "target": "llvm -mcpu=skylake", "n": 3}
    with pytest.raises(TapmlError, match="KEY=VALUE"):
        parse_options(["tf32"])
    with pytest.raises(TapmlError, match="set where it is served"):
        open_backend("tvm", remote="ws://127.0.0.1:1", target="cuda")
    with ServerThread("torch64", backend_options={"narrow": False}) as st:
        be = open_backend("torch64", remote=st.url, token_file=_token_file(st, tmp_path))
        assert be.execute(OpCall("aten.mul.Tensor", (torch.ones(2), 3.0), {})).dtype == torch.float64
        be.close()


def test_a_request_over_its_time_budget_stops_its_own_session_and_no_other():
    """A 4-byte upload seen as 2^31 elements (an expand), then `var` over it four times in one request: ~10-30 s
    of CPU. The request is stopped at the budget by killing its session's process; another client is served all
    along."""
    import threading

    with ServerThread("torch", timeout=2.0) as st:
        a, b = RemoteBackend(st.url, token=st.token), RemoteBackend(st.url, token=st.token)
        huge = a.run(OpCall("aten.expand.default", (a.upload(torch.ones(1)), [(1 << 31) - 1]), {}))
        var = {"type": "run", "op": "aten.var.correction", "args": {"args": [{"T": 0}], "kwargs": {}},
               "tensors": [huge.id], "keep": False}
        result = {}

        def hog():
            t0 = time.monotonic()
            try:
                a._request({"type": "batch", "calls": [var] * 4})
            except RemoteError as e:
                result["error"] = str(e)
            result["seconds"] = time.monotonic() - t0

        t = threading.Thread(target=hog)
        t.start()
        time.sleep(0.2)
        while t.is_alive():  # b's requests go on while a's runs: no worker is shared
            t0 = time.monotonic()
            assert b.execute(OpCall("aten.neg.default", (torch.ones(2),), {})).tolist() == [-1.0, -1.0]
            assert time.monotonic() - t0 < 1.5
        t.join()
        assert "time budget of 2s" in result["error"], result
        assert result["seconds"] < 5
        assert _wait(lambda: st.stats()["sessions"] == 1)  # a's session is gone, with its process and tensors
        with pytest.raises(TapmlError, match="lost"):
            a.download(huge)
        assert a.execute(OpCall("aten.abs.default", (-torch.ones(2),), {})).tolist() == [1.0, 1.0]  # a new session
        assert a.ping() < 0.5
        a.close()
        b.close()
