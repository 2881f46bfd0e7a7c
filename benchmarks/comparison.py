"""The Edge Pruning paper's comparison table on our model (issue 10, item 4).

Every method at the same sparsity, fitted on the same training examples and judged on the same held-out
test split as the converged benchmark (``converged.py``, whose settings it reads):

* Edge Pruning, HAP and EAP-IG top-N: the converged runs themselves (seconds: their steps re-timed
  alone, ``converged.py time``; HAP's include its attribution stage);
* EAP top-N: run here;
* the MIB parallel ensembles (mean, min, max of the rank-normalised scores of EAP, EAP-IG, EP and HAP,
  and of EP and HAP alone): run here; the row shown is the one with the lowest *training* KL (chosen
  in-sample, judged held out);
* ACDC (and ACDC + PAHQ) where a finished run directory is given (``--acdc DIR``), else marked not run;
  ``--acdc-only`` reads the other rows back from ``OUT/rows.json`` instead of re-running them (an ACDC
  search on 2 cores ends sittings after the rest of the table).

Peak memory: each method's own peak resident set size, every measurement in a fresh process
(``memory.py --child``). For Edge Pruning and HAP that is a run of ``--memory-steps`` steps with the same
settings (memory does not grow with the step count beyond the reference cache, which it fills from
its first batches). The wall-clock of the runs made here is measured alone; keep the machine quiet.

    python benchmarks/comparison.py --converged benchmarks/converged/ioi --out benchmarks/comparison/ioi
    python benchmarks/comparison.py --converged benchmarks/converged/ioi --out benchmarks/comparison/ioi \
        --acdc benchmarks/converged/ioi/acdc --acdc-only --acdc-peak-gib 2.90
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from hap.circuit import Circuit, write_atomically

HERE = Path(__file__).resolve().parent


def measured(argv: list[str]) -> tuple[float, float]:
    """(peak RSS GiB, seconds) of ``argv`` run in a fresh interpreter (``memory.py --child``)."""
    done = subprocess.run([sys.executable, str(HERE / "memory.py"), "--child", json.dumps(argv)], check=True,
                          capture_output=True, text=True)
    peak, seconds = json.loads(done.stdout.strip().splitlines()[-1])
    return float(peak), float(seconds)


def discover_argv(settings: dict[str, Any], method: str, out: Path, extra: list[str]) -> list[str]:
    hap = str(Path(sys.executable).with_name("hap"))
    return [hap, "discover", "--model", settings["model"], "--task", settings["task"], "--method", method,
            "--sparsity", str(settings["sparsity"]), "--n-examples", str(settings["n_examples"]),
            "--n-test", str(settings["n_test"]), "--batch-size", str(settings["batch_size"]),
            "--seed", str(settings["seed"]), "--out", str(out), "--no-report", "--force", *extra]


def row(name: str, circuit: Circuit, seconds: float | None, peak: float | None, note: str = "") -> dict[str, Any]:
    """One row of the table: the circuit's held-out numbers beside its cost."""
    test = circuit.held_out
    print(f"{name}: {circuit.n_edges} edges, test KL {test['kl']:.4f}", flush=True)
    return {"method": name, "edges": circuit.n_edges, "test_kl": test["kl"], "test_faithfulness": test["faithfulness"],
            "seconds": seconds, "peak_gib": peak, "note": note}


def measured_rows(args: argparse.Namespace, converged: Path, out: Path) -> list[dict[str, Any]]:
    """Every row but ACDC's: the converged runs read back, EAP and the ensembles run here."""
    settings = json.loads((converged / "settings.json").read_text())
    summary = json.loads((converged / "summary.json").read_text())["methods"]
    rows: list[dict[str, Any]] = []
    # The converged runs: their results and re-timed seconds; their memory from a short run of the same settings.
    for method, name in (("ep", "Edge Pruning"), ("hap", "HAP"), ("eap-ig", "EAP-IG top-N")):
        peak = None
        if method == "eap-ig":
            if not args.skip_memory:
                peak, _ = measured(discover_argv(settings, "eap-ig-inputs", out / "memory-eap-ig", []))
            note = "attribution on all training examples"
        else:
            steps = ["--steps", str(args.memory_steps)] + (["--warm-start"] if method == "hap" else [])
            if not args.skip_memory:
                peak, _ = measured(discover_argv(settings, method, out / f"memory-{method}", steps))
            note = f"{summary[method]['steps']} steps" + ("" if args.skip_memory else
                                                          f"; memory from a {args.memory_steps}-step run")
        rows.append(row(name, Circuit.load(converged / method), summary[method]["total_seconds"], peak, note))
    peak, _ = measured(discover_argv(settings, "eap", out / "eap", []))
    eap = Circuit.load(out / "eap")
    eap_seconds = eap.runtime_s.get("attribution", 0.0) + eap.runtime_s.get("selection", 0.0)
    rows.append(row("EAP top-N", eap, eap_seconds, peak,
                    "attribution and selection (the method's own work, measured alone)"))

    # The parallel ensembles of the four runs and of the two pruning runs (added after
    # ensemble_anatomy.py showed the two attribution runs outvoting them); the lowest training KL is the table's.
    seconds = {entry["method"]: entry["seconds"] for entry in rows}
    families = {"": ([str(converged / "eap-ig"), str(converged / "hap"), str(converged / "ep"), str(out / "eap")],
                     sum(seconds.values()), "all four runs"),
                "ep-hap-": ([str(converged / "ep"), str(converged / "hap")],
                            seconds["Edge Pruning"] + seconds["HAP"], "EP and HAP")}
    hap = str(Path(sys.executable).with_name("hap"))
    ensembles = []
    for prefix, (runs, members, label) in families.items():
        for how in ("mean", "min", "max"):
            folder = out / f"ensemble-{prefix}{how}"
            peak, _ = measured([hap, "ensemble", *runs, "--how", how, "--sparsity", str(settings["sparsity"]),
                                "--out", str(folder), "--force", "--no-report"])
            circuit = Circuit.load(folder)
            ensembles.append((circuit.metrics.get("train", {}).get("kl", float("inf")), f"{how} of {label}", circuit,
                              peak, members))
    _, name, circuit, peak, members = min(ensembles, key=lambda entry: entry[0])
    others = ", ".join(f"{entry[1]} {entry[2].held_out['kl']:.3f}" for entry in ensembles)
    rows.append(row(f"ensemble ({name})", circuit, members, peak,
                    f"chosen by training KL; held-out KL of each: {others}; seconds: its runs' summed"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--converged", required=True, help="a finished converged.py directory (after report)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--acdc", action="append", default=[], help="finished ACDC run directories (repeatable)")
    parser.add_argument("--acdc-only", action="store_true",
                        help="keep the other rows of OUT/rows.json and only (re)place the ACDC rows")
    parser.add_argument("--acdc-peak-gib", type=float, action="append", default=[],
                        help="peak RSS of each --acdc run, in order, measured outside this script (a resumable "
                             "search spans processes: e.g. VmHWM sampled from /proc while it ran)")
    parser.add_argument("--memory-steps", type=int, default=30)
    parser.add_argument("--skip-memory", action="store_true",
                        help="do not re-run EP, HAP and EAP-IG to measure their peak memory (their column stays empty)")
    args = parser.parse_args()
    converged, out = Path(args.converged), Path(args.out)
    if args.acdc_peak_gib and len(args.acdc_peak_gib) != len(args.acdc):
        parser.error(f"--acdc-peak-gib given {len(args.acdc_peak_gib)} times for {len(args.acdc)} --acdc runs")
    if args.acdc_only:
        previous = out / "rows.json"
        if not args.acdc:
            parser.error("--acdc-only needs at least one --acdc DIR")
        if not previous.is_file():
            parser.error(f"--acdc-only reads the other rows from {previous}, which does not exist: "
                         "run this script once without --acdc-only")
        rows = [entry for entry in json.loads(previous.read_text()) if not entry["method"].startswith("ACDC")]
    else:
        out.mkdir(parents=True, exist_ok=True)
        rows = measured_rows(args, converged, out)

    for folder, peak in zip(args.acdc, args.acdc_peak_gib or [None] * len(args.acdc)):
        circuit = Circuit.load(folder)
        label = "ACDC + PAHQ" if circuit.config.get("mixed_precision") else "ACDC"
        search = circuit.config.get("threshold_search") or []
        note = (f"tau {circuit.config.get('threshold')}; seconds: its {max(1, len(search))} sweep(s), every "
                f"sitting that resumed them; {circuit.config.get('n_examples', '?')} training examples")
        rows.append(row(label, circuit, circuit.runtime_s.get("acdc"), peak, note))
    for label in ("ACDC", "ACDC + PAHQ"):
        if not any(entry["method"] == label for entry in rows):
            rows.append({"method": label, "edges": None, "test_kl": None, "test_faithfulness": None,
                         "seconds": None, "peak_gib": None,
                         "note": "no finished run given (--acdc DIR): see benchmarks/README.md"})

    lines = ["| method | edges | test KL | test faithfulness | seconds | peak RSS (GiB) | note |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for entry in rows:
        cells = [entry["method"], _number(entry["edges"], "{:,}"), _number(entry["test_kl"], "{:.3f}"),
                 _number(entry["test_faithfulness"], "{:.3f}"), _number(entry["seconds"], "{:,.0f}"),
                 _number(entry["peak_gib"], "{:.2f}"), entry["note"]]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    write_atomically(out / "table.md", table + "\n")
    write_atomically(out / "rows.json", json.dumps(rows, indent=1))
    print(table)


def _number(value: Any, pattern: str) -> str:
    return "" if value is None else pattern.format(value)


if __name__ == "__main__":
    main()
