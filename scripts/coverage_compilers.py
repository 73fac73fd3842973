"""Coverage of the third-party compiler backends: zoo model × backend → cases passed / failed / unsupported / error.

Carves each zoo model (max-new-tokens 2) into a store, replays it on each backend, keeps the results in a JSON
file (so runs can be split and resumed), writes one repro (a small case store + an exported pytest file) per
backend for the cases that failed, and renders the matrix into docs/COVERAGE.md between the markers
`<!-- compilers:begin -->` and `<!-- compilers:end -->`, leaving the rest of the file as it is.

    python scripts/coverage_compilers.py [--models gpt2,resnet] [--backends tvm,iree] [--render-only]
    python scripts/coverage_compilers.py --ops '*scaled_dot_product*' [--assume-old-unsupported]

`--ops PATTERN` refreshes only part of each selected cell: the model is carved (a cached store carved by code
from before the dropout_p=0 fix is detected and carved again), only the cases whose op matches PATTERN
(fnmatch if it holds `*?[`, else a substring) are replayed, and they replace those ops' previous results in
the cell: totals = old totals − old counts of the matching cases + new counts, `fails` keeps the old entries of
other ops and takes the new fails/errors of the matching ones.

Each cell keeps `by_op` (per op: pass / fail / unsupported / error / calls) so that a later partial refresh knows
the old counts exactly; `by_op_complete` says whether every op of the cell is listed (a full run) or only the
refreshed ones. Cells written before `by_op` existed only kept the totals and the failing cases, so the old
counts of the matching ops are not known: for them the merge needs `--assume-old-unsupported`, which states the
assumption that every old matching case was `unsupported` and that the old carve had the same matching cases as
the fresh one. That holds for attention (`*scaled_dot_product*`) refreshed after the dropout_p=0 fix: the fix
only changed a case's `random` flag, not its signature, and every random case was reported `unsupported` by every
backend here. The merge checks what it can (the fresh store has the old cell's case and call totals, no old
fail is of a matching op, the old cell has at least that many unsupported cases) and refuses otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("onnxruntime", "tvm", "iree", "iree-vulkan", "inductor")
BEGIN, END = "<!-- compilers:begin -->", "<!-- compilers:end -->"


def carve_all(models: list[str], stores: Path) -> None:
    from tapml.recorder import carve

    for m in models:
        if (stores / m / "cases.sqlite").exists() and stale_store(stores / m):
            print(f"{m}: store carved before the dropout_p=0 fix (a random case that is not): carving again",
                  file=sys.stderr, flush=True)
            shutil.rmtree(stores / m)
        if not (stores / m / "cases.sqlite").exists():
            start = time.perf_counter()
            carve(m, stores / m, max_new_tokens=2, progress=False)
            print(f"{m}: carved in {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)


def stale_store(path: Path) -> bool:
    """Whether a case is flagged random although the current `is_seeded_random` says its call draws nothing
    (attention / dropout with p=0 carved by code from before the fix): such a store must be carved again."""
    from tapml.ops import is_seeded_random
    from tapml.store import CaseStore

    with CaseStore.open(path) as store:
        for case in store.cases():
            if case.random and case.replayable:
                call = store.load_call(case, store.samples(case.id)[0])
                if not is_seeded_random(call.func(), call.args, call.kwargs):
                    return True
    return False


def op_matches(pattern: str, op: str) -> bool:
    """`--ops`: an fnmatch pattern when it holds `*?[` (`*scaled_dot_product*`), else a substring of the op."""
    return fnmatch.fnmatchcase(op, pattern) if any(ch in pattern for ch in "*?[") else pattern in op


def _by_op(results) -> dict[str, dict[str, int]]:
    from tapml.results import STATUSES

    table: dict[str, dict[str, int]] = {}
    for r in results:
        row = table.setdefault(r.op, {s: 0 for s in STATUSES} | {"calls": 0})
        row[r.status] += 1
        row["calls"] += r.calls
    return dict(sorted(table.items()))


def run_cell(model: str, backend: str, stores: Path) -> dict:
    from tapml.replay import run_tests

    start = time.perf_counter()
    run = run_tests(str(stores / model), backend, progress=False)
    totals = run.totals()
    fails = [r.as_dict() for r in run.results if r.status in ("fail", "error")]
    return {"totals": totals, "fails": fails, "seconds": round(time.perf_counter() - start, 1),
            "by_op": _by_op(run.results), "by_op_complete": True}


def refresh_cell(model: str, backend: str, stores: Path, pattern: str, old: dict, assume_unsupported: bool) -> dict:
    """Replay only the cases whose op matches `pattern` and merge them into the cell's previous result `old`
    (see the module docstring for the merge rule and the `assume_unsupported` fallback)."""
    from tapml.replay import run_tests
    from tapml.results import STATUSES
    from tapml.store import CaseStore

    with CaseStore.open(stores / model) as store:
        cases = store.cases()
    ops = sorted({c.op for c in cases if op_matches(pattern, c.op)})
    start = time.perf_counter()
    results = []
    if ops:  # the store filter is a substring `or` list: exact op names, filtered again below to be safe
        run = run_tests(str(stores / model), backend, pattern=" or ".join(ops), progress=False)
        results = [r for r in run.results if op_matches(pattern, r.op)]
    seconds = round(time.perf_counter() - start, 1)
    new_by_op = _by_op(results)
    new = {s: sum(row[s] for row in new_by_op.values()) for s in (*STATUSES, "calls")}
    new["cases"] = len(results)

    if "totals" not in old:  # nothing to merge into (never run, or the backend could not start): no partial cell
        raise RuntimeError(f"{model}|{backend} has no previous totals to merge into; run the whole cell instead")
    old_by_op = old.get("by_op", {})
    complete = bool(old.get("by_op_complete"))
    # old counts of the matching ops: exact where `by_op` has the op, else (old cells) the stated assumption
    old_m = {s: 0 for s in (*STATUSES, "calls", "cases")}
    for op, row in old_by_op.items():
        if op_matches(pattern, op):
            for s in (*STATUSES, "calls"):
                old_m[s] += row[s]
            old_m["cases"] += sum(row[s] for s in STATUSES)
    unknown = [op for op in ops if op not in old_by_op] if not complete else []
    assumed = False
    if unknown:
        if not assume_unsupported:
            raise RuntimeError(f"{model}|{backend}: no stored counts for {', '.join(unknown)}; pass "
                               "--assume-old-unsupported if those cases were all unsupported before, or rerun "
                               "the whole cell")
        t = old["totals"]
        n = sum(new_by_op[op]["pass"] + new_by_op[op]["fail"] + new_by_op[op]["unsupported"] + new_by_op[op]["error"]
                for op in unknown)
        calls = sum(new_by_op[op]["calls"] for op in unknown)
        problems = []
        if len(cases) != t["cases"] or sum(c.count for c in cases) != t["calls_covered"]:
            problems.append(f"fresh store has {len(cases)} cases / {sum(c.count for c in cases)} calls, the old "
                            f"cell {t['cases']} / {t['calls_covered']}: not the same carve")
        if any(f.get("op") in unknown for f in old.get("fails", [])):
            problems.append("an old fail/error is of one of these ops: they were not all unsupported")
        if t["unsupported"] - old_m["unsupported"] < n:
            problems.append(f"the old cell has only {t['unsupported']} unsupported cases, fewer than {n}")
        if problems:
            raise RuntimeError(f"{model}|{backend}: cannot assume the old {', '.join(unknown)} cases were "
                               f"unsupported: {'; '.join(problems)}")
        old_m["unsupported"] += n
        old_m["calls"] += calls
        old_m["cases"] += n
        assumed = True

    totals = dict(old["totals"])
    for s in STATUSES:
        totals[s] = totals[s] - old_m[s] + new[s]
    totals["cases"] = totals["cases"] - old_m["cases"] + new["cases"]
    totals["calls_covered"] = totals["calls_covered"] - old_m["calls"] + new["calls"]
    assert all(totals[s] >= 0 for s in (*STATUSES, "cases")) and sum(totals[s] for s in STATUSES) == totals["cases"]
    fails = [f for f in old.get("fails", []) if not op_matches(pattern, f.get("op", ""))]
    fails += [r.as_dict() for r in results if r.status in ("fail", "error")]
    by_op = {op: row for op, row in old_by_op.items() if not op_matches(pattern, op)} | new_by_op
    refresh = {"ops": pattern, "date": datetime.date.today().isoformat(), "seconds": seconds,
               "old": {s: old_m[s] for s in (*STATUSES, "cases")}, "new": {s: new[s] for s in (*STATUSES, "cases")},
               "old_assumed_unsupported": assumed}
    cell = {k: v for k, v in old.items() if k not in ("totals", "fails", "by_op", "by_op_complete", "refreshed")}
    return cell | {"totals": totals, "fails": fails, "by_op": dict(sorted(by_op.items())), "by_op_complete": complete,
                   "refreshed": [*old.get("refreshed", []), refresh]}


def run_whole(model: str, backend: str) -> dict:
    from tapml.frontends.whole import check_model

    start = time.perf_counter()
    try:
        c = check_model(model, backend)
        v = c.verdict
        return {"passed": v.passed, "rule": v.rule, "reason": v.reason, "seconds": round(time.perf_counter() - start, 1),
                "max_abs": v.metrics.get("max_abs"), "e_tgt": v.metrics.get("e_tgt"), "e_ref": v.metrics.get("e_ref")}
    except Exception as e:  # the compiler's one-line reason (TapmlError) is the result
        return {"passed": False, "rule": "compile", "reason": f"{e}"[:200],
                "seconds": round(time.perf_counter() - start, 1)}


def write_repro(backend: str, failures: list[tuple[str, dict]], stores: Path, out_dir: Path) -> Path | None:
    """A case store holding only the failing cases (first sample each) and a pytest file replaying them."""
    from tapml.store import CaseStore, PendingSample
    from tapml.testing.export import export_pytest

    if not failures:
        return None
    target = out_dir / backend
    shutil.rmtree(target, ignore_errors=True)
    sub = CaseStore.create(target / "store")
    run_id = sub.begin_run(f"repro:{backend}", f"cases that fail on {backend}", {})
    blobs, samples, counts, seen = {}, [], {}, set()
    for model, fail in failures:
        if fail["signature"] in seen:
            continue
        seen.add(fail["signature"])
        with CaseStore.open(stores / model) as src:
            # by signature: case ids are per store, and the store may have been carved again since the fail
            case = next((c for c in src.cases() if c.signature == fail["signature"]), None)
            if case is None:
                raise RuntimeError(f"{model}: the store at {stores / model} has no case {fail['signature']} "
                                   f"({fail['op']}): carved differently from the results; rerun the cell")
            s = src.samples(case.id)[0]
            for h, _ in s.inputs + s.outputs["tensors"]:
                blobs[h] = src.blob(h)
            prov = s.provenance
            prov.module = f"{model}:{prov.module}"
            samples.append(PendingSample(case.signature, case.op, case.spec, case.metas, True, None, False,
                                         prov, s.inputs, s.outputs, None))
            counts[case.signature] = (case.op, case.spec, case.metas, True, None, False, 1)
    sub.commit(run_id, blobs, samples, counts, len(samples))
    sub.finish_run(run_id, len(samples))
    sub.close()
    test = target / f"test_{backend.replace('-', '_')}_repro.py"
    export_pytest(str(target / "store"), backend, str(test))
    text = test.read_text()
    text = re.sub(r"^STORE = .*$", "STORE = str(__import__('pathlib').Path(__file__).parent / 'store')", text,
                  count=1, flags=re.MULTILINE)
    test.write_text(text)
    return test


def render(results: dict, models: list[str], repros: dict[str, str]) -> str:
    lines = [BEGIN, "", "## Third-party compilers (generated by `scripts/coverage_compilers.py`)", "",
             ("Each zoo model carved with `--max-new-tokens 2` and replayed on each compiler backend; a cell is "
             "`passed / failed / unsupported / error` cases (— : not run). `unsupported` always carries the "
             "backend's reason (no lowering, a Python-scalar result, a seeded random op, an ATen fallback for "
             "inductor).")]
    refreshed = [x for r in results.values() for x in r.get("refreshed", [])]
    if refreshed:
        last = max(x["date"] for x in refreshed)
        ops = sorted({x["ops"] for x in refreshed if x["date"] == last})
        lines[-1] += f" Last refreshed {last} (cases of ops matching {', '.join(f'`{o}`' for o in ops)} replayed again"
        lines[-1] += " on freshly carved stores and merged into each cell)."
        if any("scaled_dot_product" in x["ops"] for x in refreshed):
            lines[-1] += (" Attention cases (`aten._scaled_dot_product_*`) are included since the fix that no longer "
                          "counts attention with `dropout_p=0` as a seeded random op; before it they were all "
                          "`unsupported`.")
    lines.append("")
    lines.append("| model | " + " | ".join(BACKENDS) + " |")
    lines.append("|---|" + "---|" * len(BACKENDS))
    for m in models:
        cells = []
        for b in BACKENDS:
            r = results.get(f"{m}|{b}")
            if r is None:
                cells.append("—")
            elif "error" in r and "totals" not in r:
                cells.append(f"error: {r['error'][:60]}")
            else:
                t = r["totals"]
                cells.append(f"{t['pass']} / {t['fail']} / {t['unsupported']} / {t['error']}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    whole = {k: r for k, r in results.items() if k.startswith("whole|")}
    if whole:
        wm = sorted({k.split("|")[1] for k in whole})
        lines += ["", "### Whole-graph compiles (`tapml.frontends.whole.check_model`)", "",
                  ("Each model's whole forward (LLMs: one prefill forward, logits at non-padded positions) compiled "
                   "end to end and judged against PyTorch with the model run in float64 as the oracle."), "",
                  "| model | " + " | ".join(BACKENDS) + " |", "|---|" + "---|" * len(BACKENDS)]
        for m in wm:
            cells = []
            for b in BACKENDS:
                r = whole.get(f"whole|{m}|{b}")
                if r is None:
                    cells.append("—")
                elif r["passed"]:
                    cells.append(f"pass ({r['rule']}, max abs {r['max_abs']:.2g})")
                else:
                    cells.append(f"{'fail' if r['rule'] != 'compile' else 'no compile'}: {r['reason'][:90]}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "### Disagreements found (fail or error)", ""]
    any_fail = False
    for b in BACKENDS:
        rows: dict[str, list[str]] = {}
        for key, r in results.items():
            if key.startswith("whole|"):
                continue
            m, bb = key.split("|")
            if bb != b or "fails" not in r:
                continue
            for f in r["fails"]:
                if "op" not in f:
                    continue
                label = f"{f['op']} `{f['args'][:70]}`: {f['status']}: {f['reason'][:140]}"
                rows.setdefault(label, []).append(m)
        if not rows:
            continue
        any_fail = True
        repro = repros.get(b)
        lines.append(f"**{b}**" + (f" — repro: `{repro}`" if repro else ""))
        lines.append("")
        for label, ms in sorted(rows.items()):
            lines.append(f"- {label} ({', '.join(sorted(set(ms)))})")
        lines.append("")
    if not any_fail:
        lines.append("None.")
    lines += ["", END]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="", help="comma-separated zoo names (default: all)")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--stores", default=str(ROOT / ".tapml-cache" / "coverage-stores"))
    ap.add_argument("--results", default=str(ROOT / "docs" / "coverage_compilers.json"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "COVERAGE.md"))
    ap.add_argument("--repros", default=str(ROOT / "docs" / "repros"))
    ap.add_argument("--whole", default="", help="also compile these models' whole forward (comma-separated)")
    ap.add_argument("--no-cases", action="store_true", help="skip the per-case matrix (with --whole)")
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--no-render", action="store_true", help="only update the results JSON (no repros, no doc)")
    ap.add_argument("--ops", default="", help="replay only the cases whose op matches (fnmatch, or substring) and "
                    "merge them into each cell's previous result, e.g. '*scaled_dot_product*'")
    ap.add_argument("--assume-old-unsupported", action="store_true",
                    help="with --ops, for cells without per-op counts: the old matching cases were all unsupported")
    a = ap.parse_args()
    from tapml import zoo

    models = [m for m in a.models.split(",") if m] or zoo.names()
    stores, results_path = Path(a.stores), Path(a.results)
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if not a.render_only:
        backends = [b for b in a.backends.split(",") if b and not a.no_cases]
        if not a.no_cases and not a.ops:
            carve_all(models, stores)
        # a partial refresh goes model by model (carve once, then every backend), so it can be stopped part way
        cells = [(m, b) for m in models for b in backends] if a.ops else [(m, b) for b in backends for m in models]
        for m, b in cells:
            if a.ops:  # a partial refresh: a failure leaves the previous cell as it was
                fresh = json.loads(results_path.read_text()) if results_path.exists() else {}
                try:
                    carve_all([m], stores)
                    results[f"{m}|{b}"] = refresh_cell(m, b, stores, a.ops, fresh.get(f"{m}|{b}", {}),
                                                       a.assume_old_unsupported)
                except Exception as e:
                    print(f"{m:12s} {b:12s} not refreshed: {type(e).__name__}: {e}", flush=True)
                    continue
            else:
                try:
                    results[f"{m}|{b}"] = run_cell(m, b, stores)
                except Exception as e:  # a backend that cannot start here: recorded, the matrix goes on
                    results[f"{m}|{b}"] = {"error": f"{type(e).__name__}: {e}"}
            fresh = json.loads(results_path.read_text()) if results_path.exists() else {}
            fresh[f"{m}|{b}"] = results[f"{m}|{b}"]
            results = fresh
            results_path.write_text(json.dumps(results, indent=1))
            t = results[f"{m}|{b}"].get("totals")
            extra = f" refreshed {results[f'{m}|{b}']['refreshed'][-1]}" if a.ops else ""
            print(f"{m:12s} {b:12s} {t if t else results[f'{m}|{b}']}{extra}", flush=True)
        for b in [b for b in a.backends.split(",") if b]:
            for m in [m for m in a.whole.split(",") if m]:
                r = run_whole(m, b)
                fresh = json.loads(results_path.read_text()) if results_path.exists() else {}
                fresh[f"whole|{m}|{b}"] = r
                results = fresh
                results_path.write_text(json.dumps(results, indent=1))
                print(f"whole {m:10s} {b:12s} {r}", flush=True)
    if a.no_render:
        return
    all_models = zoo.names()
    repros = {}
    for b in BACKENDS:
        fails = [(k.split("|")[0], f) for k, r in results.items()
                 if k.endswith("|" + b) and not k.startswith("whole|") for f in r.get("fails", [])]
        test = write_repro(b, [x for x in fails if x[1]["status"] == "fail"], stores, Path(a.repros))
        if test:
            repros[b] = os.path.relpath(test, ROOT)
    doc = Path(a.doc)
    text = doc.read_text() if doc.exists() else "# Coverage\n"
    block = render(results, all_models, repros)
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(text)
    print(f"wrote {doc}", file=sys.stderr)


if __name__ == "__main__":
    main()
