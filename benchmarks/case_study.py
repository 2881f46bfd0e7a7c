"""The HAP paper's IOI case study on SmolLM2-135M: which role classes each method's circuit keeps.

1. Roles on the full model (``hap.explain``'s rules: attention between IOI's named positions, direct
   effect, path patching for S-inhibition) on the first 64 examples of the held-out test split that
   every run below is judged on: ``benchmarks/case_study/roles.json``.
2. ``hap discover`` with EAP, EAP-IG (inputs), Edge Pruning and HAP at sparsities 0.90, 0.94, 0.96 and
   0.98 (the default budget of each method: ``make demo``'s; Edge Pruning and HAP are then NOT converged
   runs, the table says so), one run directory each under ``benchmarks/case_study/runs/``. A finished run
   is kept; an interrupted pruning run resumes. Rows of `results.json` whose run directory is gone (the
   directories are not in git) stay in the table.
3. The table: per run, the held-out faithfulness, KL and accuracy (test split, 200 examples) and how
   many heads of each role class the circuit keeps (a kept edge out of the head); written as
   ``table.md`` and ``results.json``, and one ``hap compare`` page per sparsity with the roles side by side.

Run it alone (other CPU work slows pruning many times over):
``.venv/bin/python benchmarks/case_study.py [--sparsities 0.94 0.98] [--methods eap hap]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent / "case_study"
METHODS = ("eap", "eap-ig-inputs", "ep", "hap")
SPARSITIES = (0.90, 0.94, 0.96, 0.98)
ROLE_EXAMPLES = 64
MODEL = "smollm2-135m"


def find_roles(out: Path) -> dict:
    """The roles of every head of the full model on the runs' held-out split (computed once, then read)."""
    path = out / "roles.json"
    if path.exists():
        return json.loads(path.read_text())
    import hap
    from hap.circuit import write_atomically
    from hap.discovery import DiscoverConfig, split_specs
    from hap.evidence import node_evidence
    from hap.roles import head_roles
    from hap.tasks import load_split
    from hap.tasks.splits import with_examples

    model = hap.load_model(MODEL)
    config = DiscoverConfig(out=str(out / "unused"), model=MODEL, task="ioi", method="eap")
    _, test_spec = split_specs(config, model)
    task = load_split(with_examples(test_spec, ROLE_EXAMPLES), model.tokenizer)
    started = time.perf_counter()
    evidence = node_evidence(model, task, 16)
    roles = head_roles(model, task, evidence, 16)
    assert roles is not None
    document = {"model": MODEL, "task": "ioi", "split": {**test_spec.to_dict(), "n_examples": ROLE_EXAMPLES},
                "seconds": round(time.perf_counter() - started, 1), "full_metric": evidence.full_metric,
                "roles": {name: role.to_dict() for name, role in roles.items()}}
    write_atomically(path, json.dumps(document, indent=1))
    return document


def run_discover(method: str, sparsity: float, out: Path) -> Path:
    """One ``hap discover`` run (kept if finished, resumed if a pruning run was interrupted)."""
    folder = out / "runs" / f"{method}-{sparsity:.2f}"
    if (folder / "circuit.json").exists():
        return folder
    hap_command = str(Path(sys.executable).with_name("hap"))
    if (folder / "run.json").exists() and method in ("ep", "hap"):
        command = [hap_command, "discover", "--resume", str(folder)]
    else:
        command = [hap_command, "discover", "--model", MODEL, "--task", "ioi", "--method", method,
                   "--sparsity", str(sparsity), "--out", str(folder), "--force", "--explain-examples", "0",
                   "--no-report"]
    print("$", " ".join(command), flush=True)
    env = {**os.environ, "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "17179869184"}
    subprocess.run(command, check=True, env=env)
    return folder


def finished_runs(out: Path) -> dict[tuple[str, float], Path]:
    """Every finished run under ``out/runs`` (this invocation's and earlier ones'), by (method, sparsity)."""
    found = {}
    for folder in (out / "runs").glob("*-*"):
        method, _, sparsity = folder.name.rpartition("-")
        if method in METHODS and (folder / "circuit.json").exists():
            found[(method, float(sparsity))] = folder
    return found


def kept_heads(circuit) -> set[str]:
    return {name for name, kept in circuit.node_in_graph().items() if kept and name.startswith("a")}


def s_inhibition_paths(circuit, roles: dict) -> tuple[int, int]:
    """(kept, possible) edges from the S-inhibition heads into the name movers' queries: the path the
    path-patching test measured, and the paper's claim is about."""
    graph = circuit.graph()
    senders = [name for name, role in roles.items() if role["role"] == "S-inhibition"]
    movers = [name for name, role in roles.items() if role["role"] == "name mover"]
    pairs = [(graph.source_index(s), graph.reader_index(f"{m}<q>")) for s in senders for m in movers
             if graph.real[graph.source_index(s), graph.reader_index(f"{m}<q>")]]
    return sum(bool(graph.in_graph[s, r]) for s, r in pairs), len(pairs)


def earlier_rows(out: Path, folders: dict[tuple[str, float], Path]) -> list[dict]:
    """The rows of ``results.json`` whose run directory is not here (run directories are not kept in git,
    so a new checkout re-runs only what it is asked to and keeps the table's other rows)."""
    path = out / "results.json"
    if not path.exists():
        return []
    return [row for row in json.loads(path.read_text())["runs"]
            if (row["method"], row["sparsity"]) not in folders]


def summarise(out: Path, roles: dict, folders: dict[tuple[str, float], Path]) -> list[dict]:
    from hap.circuit import Circuit
    from hap.roles import IOI_RULES

    classes = [rule.role for rule in IOI_RULES]
    members = {role: sorted(name for name, held in roles["roles"].items() if held["role"] == role)
               for role in classes}
    rows = earlier_rows(out, folders)
    for (method, sparsity), folder in folders.items():
        circuit = Circuit.load(folder / "circuit.json")
        kept = kept_heads(circuit)
        paths = s_inhibition_paths(circuit, roles["roles"])
        test = circuit.held_out
        rows.append({"method": method, "sparsity": sparsity, "edges": circuit.n_edges,
                     "faithfulness": test.get("faithfulness"), "kl": test.get("kl"), "accuracy": test.get("accuracy"),
                     "converged": circuit.config.get("converged"), "steps": circuit.config.get("steps_done"),
                     "seconds": round(sum(v for v in circuit.runtime_s.values() if isinstance(v, (int, float))), 1),
                     "heads_kept": len(kept), "s_inhibition_to_name_mover_queries": paths,
                     "kept": {role: sorted(set(heads) & kept) for role, heads in members.items()}})
    rows.sort(key=lambda row: (row["sparsity"], METHODS.index(row["method"])))
    lines = [f"Roles on the full model ({roles['split']['n_examples']} held-out IOI examples): "
             + "; ".join(f"{role} {', '.join(heads) or 'none'}" for role, heads in members.items()), "",
             "| sparsity | method | edges | held-out faithfulness | KL | accuracy | heads kept | "
             + " | ".join(classes) + " | S-inhibition heads kept | S-inh. -> name mover q edges |",
             "|" + "---|" * (9 + len(classes))]
    for row in rows:
        budget = "" if row["steps"] is None else (f" ({row['steps']} steps, "
                                                  + ("at" if row["converged"] else "NOT at") + " the target sparsity)")
        counts = " | ".join(f"{len(row['kept'][role])}/{len(members[role])}" for role in classes)
        kept_paths, possible = row["s_inhibition_to_name_mover_queries"]
        lines.append(f"| {row['sparsity']:.2f} | {row['method']}{budget} | {row['edges']:,} | "
                     f"{row['faithfulness']:.3f} | {row['kl']:.3f} | {row['accuracy']:.3f} | {row['heads_kept']} | "
                     f"{counts} | {', '.join(row['kept']['S-inhibition']) or 'none'} | {kept_paths}/{possible} |")
    from hap.circuit import write_atomically

    write_atomically(out / "table.md", "\n".join(lines) + "\n")
    write_atomically(out / "results.json", json.dumps({"roles": members, "runs": rows}, indent=1))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(HERE))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--sparsities", nargs="+", type=float, default=list(SPARSITIES))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    roles = find_roles(out)
    folders = {}
    for sparsity in args.sparsities:
        for method in args.methods:
            folders[(method, sparsity)] = run_discover(method, sparsity, out)
        done = [folders[(method, sparsity)] for method in args.methods]
        if len(done) > 1:
            from hap.report.compare import compare_runs

            compare_runs(done, out / f"compare-{sparsity:.2f}.html", roles["roles"])
        summarise(out, roles, finished_runs(out))
    print((out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
