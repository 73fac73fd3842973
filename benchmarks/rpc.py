"""RPC figures: per-call latency and upload/download throughput of TapML's protocol over loopback, side by side
with TVM RPC (`tvm.rpc`, apache-tvm) in the same run; optionally the replay rate of a carved store through it.

    .venv/bin/python benchmarks/rpc.py                      # TapML vs TVM RPC, 1 KB / 1 MB / 64 MB
    .venv/bin/python benchmarks/rpc.py --small              # 1 KB / 1 MB only, few repeats (a smoke run)
    TAPML_TOKEN=... .venv/bin/python benchmarks/rpc.py --url ws://127.0.0.1:8765 --store DIR [--local torch-cuda]

Both servers run in their own process (`tapml serve`, TVM's popen RPC server); medians of interleaved repeats.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

SIZES = {"1 KB": 1 << 10, "1 MB": 1 << 20, "64 MB": 64 << 20}
REPEATS = {1 << 10: 200, 1 << 20: 30, 64 << 20: 3}


def median_seconds(fn, n: int) -> float:
    fn()  # warm
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def start_tapml(backend: str) -> tuple[subprocess.Popen, str, str]:
    """A `tapml serve` process, its URL and the token it generated."""
    proc = subprocess.Popen([sys.executable, "-m", "tapml.cli", "serve", "--backend", backend, "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    m = re.search(r"ws://[\d.]+:\d+", line)
    t = re.search(r"token (\S+) \(generated", proc.stdout.readline()) if m else None
    if not (m and t):
        proc.kill()
        raise SystemExit(f"tapml serve did not start: {line!r}")
    return proc, m.group(0), t.group(1)


def bench_tapml(url: str, token: str | None) -> dict:
    from tapml.ops import OpCall
    from tapml.remote.client import RemoteBackend

    be = RemoteBackend(url, token=token)
    out = {"ping": median_seconds(be.ping, REPEATS[1 << 10] * 2)}
    one = be.upload(torch.ones(1))
    out["call"] = median_seconds(lambda: be.run(OpCall("aten.add.Tensor", (one, one), {})), REPEATS[1 << 10])
    for label, n in SIZES.items():
        host = torch.from_numpy(np.random.randint(0, 255, size=n, dtype=np.uint8))
        box = {}

        def up(host=host, box=box):
            box["h"] = be.upload(host)
            be.ping()  # the queued upload rides in front of the ping: it has landed when the reply comes

        out[f"up {label}"] = median_seconds(up, REPEATS[n])
        out[f"down {label}"] = median_seconds(lambda box=box: be.download(box["h"]), REPEATS[n])
        assert torch.equal(be.download(box["h"]), host)
        box.clear()
    be.close()
    return out


def bench_tvm() -> dict | None:
    try:
        import tvm
        from tvm import rpc
    except ImportError:
        return None
    server = rpc.Server(host="127.0.0.1", port=9190, port_end=9290)
    try:
        sess = rpc.connect("127.0.0.1", server.port)
        dev = sess.cpu()
        addone = sess.get_function("rpc.test.addone")
        out = {"ping": median_seconds(lambda: addone(1), REPEATS[1 << 10] * 2)}
        one = tvm.runtime.tensor(np.ones(1, dtype=np.float32), dev)
        out["call"] = out["ping"]  # TVM has no eager op call; a remote packed-function call is its unit
        del one
        for label, n in SIZES.items():
            host = np.random.randint(0, 255, size=n, dtype=np.uint8)
            box = {}

            def up(host=host, box=box):
                box["x"] = tvm.runtime.tensor(host, dev)

            out[f"up {label}"] = median_seconds(up, REPEATS[n])
            out[f"down {label}"] = median_seconds(lambda box=box: box["x"].numpy(), REPEATS[n])
            assert (box["x"].numpy() == host).all()
            box.clear()
        return out
    finally:
        server.terminate()


def bench_replay(url: str, token: str | None, stores: list[str], local: str | None) -> None:
    """Replay carved stores through the server (and, for comparison, in-process on `local`)."""
    from tapml.backends import get_backend
    from tapml.remote.client import RemoteBackend
    from tapml.replay import run_tests

    be = RemoteBackend(url, token=token)
    here = get_backend(local) if local else None
    print(f"\nreplay through {url}: {be.name} on {be.info.get('device')}")
    print(f"{'store':<12}{'cases':>7}{'pass':>6}{'fail':>6}{'unsup':>6}{'error':>6}{'cases/s':>9}{'wire MB':>9}"
          f"{'MB/s':>8}{'reqs':>7}" + (f"{'local cases/s':>15}" if here else ""))
    for store in stores:
        b0, r0 = be.bytes_sent + be.bytes_received, be.requests
        t0 = time.perf_counter()
        run = run_tests(store, be, progress=False)
        dt = time.perf_counter() - t0
        moved, reqs = be.bytes_sent + be.bytes_received - b0, be.requests - r0
        t = run.totals()
        row = (f"{os.path.basename(store.rstrip('/')):<12}{t['cases']:>7}{t['pass']:>6}{t['fail']:>6}"
               f"{t['unsupported']:>6}{t['error']:>6}{t['cases'] / dt:>9.1f}{moved / 1e6:>9.1f}{moved / 1e6 / dt:>8.1f}"
               f"{reqs:>7}")
        if here:
            t0 = time.perf_counter()
            run_tests(store, here, progress=False)
            row += f"{t['cases'] / (time.perf_counter() - t0):>15.1f}"
        print(row, flush=True)
    be.close()
    if here:
        here.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="an already running `tapml serve` (default: start one on the torch backend)")
    ap.add_argument("--backend", default="torch", help="backend for the server this script starts")
    ap.add_argument("--store", action="append", default=[], help="also replay this carved store (repeatable)")
    ap.add_argument("--local", help="with --store: also replay in-process on this backend, for comparison")
    ap.add_argument("--no-tvm", action="store_true", help="skip TVM RPC")
    ap.add_argument("--small", action="store_true", help="1 KB and 1 MB only, few repeats")
    ap.add_argument("--smoke", action="store_true", help="the smallest configuration: seconds, checks the script runs (tests/test_benchmarks.py)")
    a = ap.parse_args()
    if a.small or a.smoke:
        SIZES.pop("64 MB")
        for n in REPEATS:
            REPEATS[n] = 3
    os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")
    torch.set_num_threads(1)
    proc = None
    url, token = a.url, os.environ.get("TAPML_TOKEN")
    if url is None:
        proc, url, token = start_tapml(a.backend)
    try:
        ours = bench_tapml(url, token)
        theirs = None if a.no_tvm else bench_tvm()
        print(f"loopback RPC, medians ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs)")
        print(f"{'measure':<14}{'TapML':>16}{'TVM RPC':>16}{'TVM time / TapML time':>24}")
        for key in ours:
            mine = ours[key]
            other = theirs.get(key) if theirs else None
            if key in ("ping", "call"):
                cells = (f"{mine * 1e6:.0f} µs", f"{other * 1e6:.0f} µs" if other else "-",
                         f"{other / mine:.2f}x" if other else "")
            else:
                n = SIZES[key.split(" ", 1)[1]]
                cells = (f"{n / mine / 1e6:.1f} MB/s", f"{n / other / 1e6:.1f} MB/s" if other else "-",
                         f"{other / mine:.2f}x" if other else "")
            print(f"{key:<14}{cells[0]:>16}{cells[1]:>16}{cells[2]:>24}")
        if theirs and "64 MB" in SIZES:
            ratio = min(theirs[k] / ours[k] for k in ("up 64 MB", "down 64 MB"))
            print(f"64 MB throughput ratio (worse of up/down): {ratio:.2f}x TVM RPC — goal ≥ 3x "
                  f"{'met' if ratio >= 3 else 'NOT met'}")
        if a.store:
            bench_replay(url, token, a.store, a.local)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
