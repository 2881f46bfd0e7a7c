"""Converged HAP against converged Edge Pruning, judged on held-out examples (issue 8, item 4).

``run`` trains, one after another, on the same training split and measures on the same held-out test
split (templates and names no training example uses):

* ``hap``: HAP with warm start (EAP-IG on the first 64 training examples, candidates 1.5x the
  circuit, target warm-up over the first third), ``--hap-steps`` steps (default 1000, the MIB
  shared-task recipe);
* ``ep``: Edge Pruning with the published schedule (3000 steps, target warm-up 2500, lr 0.8 with
  warm-up 200; constant after it here, where the published code decays it linearly);
* ``eap-ig``: EAP-IG top-N at the same N, on all the training examples (a reference row).

Every pruning run measures the circuit read off its masks on a fixed batch of 64 test examples
every ``--eval-every`` steps (``train_log.jsonl``: ``test_kl``, ``test_faithfulness``) and keeps its
masks every ``--snapshot-every`` steps. Each run is a ``hap discover`` run directory: ``run`` again
continues where an interruption left it.

The wall-clock seconds logged by a run that shares the machine are inflated by whatever else runs;
``time`` re-times each method's steps alone, from its snapshots (the step cost changes as the masks
sparsify), and re-times HAP's attribution stage; ``time --runs hap,ep,NAME`` also re-times a HAP
variant run into ``NAME/`` with ``hap discover`` and these settings (say, another ``--candidates``),
whose stage 1 counts HAP's seconds. ``report`` draws held-out KL against those seconds and writes the
table (``table.md``; ``summary.json`` for comparison.py), with a row per re-timed variant; ``report
--stop-at 450`` adds HAP's run cut at step 450 (row ``hap@450``: the circuit of that step's snapshot on
the whole test split, from ``along_the_run.py``, and the seconds to there).

    python benchmarks/converged.py run    --out benchmarks/converged/ioi --task ioi
    python benchmarks/converged.py time   --out benchmarks/converged/ioi
    python benchmarks/converged.py report --out benchmarks/converged/ioi
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

import hap
from hap.ablation import AblationKind, run_masked
from hap.batches import ReferenceCache, TaskBatches
from hap.circuit import Circuit, write_atomically
from hap.discovery import DiscoverConfig, discover
from hap.evaluation import kl_divergence
from hap.pruning import gate_stretched, step_plan_of
from hap.report.curves import read_train_log
from hap.tasks import load_split, task_splits

METHODS = ("hap", "ep", "eap-ig")
WITHIN = 0.10  # "reaches EP's final held-out KL" = within 10% of it


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"model": args.model, "task": args.task, "sparsity": args.sparsity, "n_examples": args.n_examples,
            "n_test": args.n_test, "batch_size": args.batch_size, "seed": args.seed, "ep_steps": args.ep_steps,
            "hap_steps": args.hap_steps, "eval_every": args.eval_every, "snapshot_every": args.snapshot_every,
            "monitor_examples": args.monitor_examples}


def _config(settings: dict[str, Any], method: str, out: Path, resume: bool, memory: float) -> DiscoverConfig:
    common = {"out": str(out), "model": settings["model"], "task": settings["task"], "sparsity": settings["sparsity"],
              "n_examples": settings["n_examples"], "n_test": settings["n_test"],
              "batch_size": settings["batch_size"], "seed": settings["seed"], "resume": resume,
              "reference_memory": memory, "command": f"benchmarks/converged.py run ({method})"}
    if method == "eap-ig":
        return DiscoverConfig(method="eap-ig-inputs", **common)
    steps = settings["ep_steps"] if method == "ep" else settings["hap_steps"]
    every = max(1, round(settings["eval_every"] * steps / settings["ep_steps"]))
    return DiscoverConfig(method=method, steps=steps, eval_every=every, monitor_examples=settings["monitor_examples"],
                          snapshot_every=max(1, round(settings["snapshot_every"] * steps / settings["ep_steps"])),
                          checkpoint_every=50, warm_start=method == "hap", **common)


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    settings_path = out / "settings.json"
    settings = _settings(args)
    if settings_path.is_file():
        saved = json.loads(settings_path.read_text())
        if saved != settings:
            raise SystemExit(f"{out} was started with other settings ({saved}); use another --out")
    write_atomically(settings_path, json.dumps(settings, indent=1))
    for method in args.methods.split(","):
        folder = out / method
        if (folder / "circuit.json").is_file():
            print(f"{method}: done", flush=True)
            continue
        resume = (folder / "run.json").is_file()
        print(f"{method}: {'resuming' if resume else 'starting'}", flush=True)
        circuit = discover(_config(settings, method, folder, resume, args.reference_memory))
        print(f"{method}: test KL {circuit.held_out['kl']:.4f}, faithfulness {circuit.held_out['faithfulness']:.3f}",
              flush=True)


def _step_seconds(model: hap.Model, graph: hap.Graph, batches: TaskBatches, snapshot: dict, repeats: int) -> float:
    """Seconds of one training step (gates, step plan, masked run, KL, backward) at a snapshot's masks."""
    live = torch.zeros(graph.real.shape, dtype=torch.bool)
    live[snapshot["sources"], snapshot["readers"]] = True
    index = (snapshot["sources"], snapshot["readers"])
    log_alpha = snapshot["log_alpha"].clone().requires_grad_(True)
    generator = torch.Generator().manual_seed(0)
    batch = batches[0]

    def step() -> None:
        stretched = gate_stretched(log_alpha, 2 / 3, generator)
        mask = torch.zeros(graph.real.shape).index_put(index, stretched.clamp(0, 1))
        plan, entries = step_plan_of(graph, live, stretched, None, AblationKind.INTERCHANGE)
        logits = run_masked(model, graph, batch.clean, batch.reference, mask, plan, batch.positions,
                            grad_entries=entries)
        # (+ 0 * sum: the sparsity penalty's path, so a step whose sampled gates are all 0 still backpropagates)
        (kl_divergence(batch.clean_logits, logits).mean() + 0 * log_alpha.sum()).backward()

    step()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - started) / repeats


def retime(args: argparse.Namespace) -> None:
    out = Path(args.out)
    settings = json.loads((out / "settings.json").read_text())
    model = hap.load_model(settings["model"])
    graph = hap.Graph.from_model(model)
    train_spec, _ = task_splits(settings["task"], model.tokenizer, settings["n_examples"], settings["n_test"],
                                settings["seed"])
    train = load_split(train_spec, model.tokenizer)
    batches = TaskBatches(model, graph, train, settings["batch_size"], cache=ReferenceCache(10**11))
    runs = args.runs.split(",")
    timing_path = out / args.timing
    timing: dict[str, Any] = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    for method in runs:
        snapshots = sorted((out / method / "snapshots").glob("step-*.pt"))
        borrowed = None
        if not snapshots and args.snapshots_from:  # the run kept none: another seed's run of the method stands in
            borrowed = Path(args.snapshots_from) / method / "snapshots"
            snapshots = sorted(borrowed.glob("step-*.pt"))
        if not snapshots:
            raise SystemExit(f"{out / method}: no snapshots to re-time (not a pruning run with --snapshot-every?"
                             " --snapshots-from OTHER_OUT re-times another seed's run of the method instead)")
        steps, seconds = [], []
        for path in snapshots[:: max(1, len(snapshots) // args.points)]:
            snapshot = torch.load(path, weights_only=True)
            steps.append(int(snapshot["step"]))
            seconds.append(_step_seconds(model, graph, batches, snapshot, args.repeats))
            print(f"{method} step {steps[-1]}: {seconds[-1]:.3f} s/step", flush=True)
        timing[method] = {"steps": steps, "seconds_per_step": seconds}
        if borrowed is not None:
            timing[method]["snapshots_from"] = str(borrowed.parent)
    if "hap" in runs:
        circuit = Circuit.load(out / "hap")
        n = circuit.config.get("attribution_examples", 64)
        started = time.perf_counter()
        hap.attribute(model, train.slice(0, n), "eap-ig-inputs",
                      hap.AttributionConfig(batch_size=settings["batch_size"]),
                      data=batches.head(n))
        timing["hap"]["attribution_seconds"] = time.perf_counter() - started
    if "hap" in runs and not (args.keep_eap_ig and "eap-ig" in timing):
        started = time.perf_counter()
        hap.attribute(model, train, "eap-ig-inputs", hap.AttributionConfig(batch_size=settings["batch_size"]),
                      data=batches)
        timing["eap-ig"] = {"attribution_seconds": time.perf_counter() - started}
    for method in runs:  # a HAP variant's stage 1 is HAP's (the same examples and method): timed once, with hap
        if method != "hap" and Circuit.load(out / method).config.get("method") == "hap":
            timing[method]["attribution_seconds"] = timing.get("hap", {}).get("attribution_seconds", 0.0)
    write_atomically(timing_path, json.dumps(timing, indent=1))
    print(json.dumps(timing))


def _seconds_at(timing: dict[str, Any], steps: list[int]) -> list[float]:
    """Training seconds at each step: the per-step cost interpolated between re-timed snapshots, integrated."""
    known_steps, known = timing["steps"], timing["seconds_per_step"]

    def cost(step: float) -> float:
        if step <= known_steps[0]:
            return known[0]
        for (s0, c0), (s1, c1) in zip(zip(known_steps, known), zip(known_steps[1:], known[1:])):
            if step <= s1:
                return c0 + (c1 - c0) * (step - s0) / (s1 - s0)
        return known[-1]

    total, done, out = 0.0, 0, []
    for step in steps:
        total += sum(cost(s) for s in range(done + 1, step + 1))
        done = step
        out.append(total)
    return out


def report(args: argparse.Namespace) -> None:
    from matplotlib.figure import Figure

    out = Path(args.out)
    settings = json.loads((out / "settings.json").read_text())
    timing = json.loads((out / args.timing).read_text())
    suffix = "" if args.timing == "timing.json" else "-" + Path(args.timing).stem  # outputs of another re-timing
    curves: dict[str, tuple[list[float], list[float], list[float]]] = {}
    variants = [method for method in timing if method not in ("hap", "ep", "eap-ig")]  # re-timed with time --runs
    for method in ("hap", "ep", *variants):
        records = [r for r in read_train_log(out / method / "train_log.jsonl") if "test_kl" in r]
        steps = [r["step"] for r in records]
        seconds = _seconds_at(timing[method], steps)
        offset = timing[method].get("attribution_seconds", 0.0)
        curves[method] = ([offset + s for s in seconds], [r["test_kl"] for r in records],
                          [r["test_faithfulness"] for r in records])
    ep_final = curves["ep"][1][-1]
    threshold = (1 + WITHIN) * ep_final

    def reach(method: str) -> float | None:
        for seconds, kl in zip(curves[method][0], curves[method][1]):
            if kl <= threshold:
                return seconds
        return None

    def stay(method: str) -> float | None:
        """From when on every later measurement is within the threshold (the first crossing can be one noisy
        point of the 64-example monitor)."""
        settled = None
        for seconds, kl in zip(curves[method][0], curves[method][1]):
            settled = (settled if settled is not None else seconds) if kl <= threshold else None
        return settled

    figure = Figure(figsize=(11, 4.4), layout="constrained")
    left, right = figure.subplots(1, 2)
    colours = {"hap": "#1f5fa8", "ep": "#c0392b"}
    variant_colours = iter(["#8e44ad", "#d68910", "#17a589", "#566573"])
    for method, (seconds, kls, faith) in curves.items():
        label = {"hap": "HAP (warm start)", "ep": "Edge Pruning (published schedule)"}.get(
            method, f"HAP, --candidates {Circuit.load(out / method).config.get('candidates')} ({method})")
        colours.setdefault(method, next(variant_colours, "#000000"))
        left.plot(seconds, kls, marker="o", markersize=2.5, color=colours[method], label=label)
        right.plot(seconds, faith, marker="o", markersize=2.5, color=colours[method], label=label)
    with_eap = (out / "eap-ig" / "circuit.json").is_file()  # a reference row, not run by every seed's folder
    left.axhline(threshold, color="#888", linestyle=":", linewidth=1, label=f"within 10% of EP's final ({threshold:.3f})")
    if with_eap:
        eap = Circuit.load(out / "eap-ig").held_out
        eap_seconds = timing["eap-ig"]["attribution_seconds"]
        left.plot([eap_seconds], [eap["kl"]], marker="*", markersize=11, color="#2e8b57", linestyle="none",
                  label="EAP-IG top-N (200 test examples)")
        right.plot([eap_seconds], [eap["faithfulness"]], marker="*", markersize=11, color="#2e8b57", linestyle="none")
    left.set_yscale("log")
    for axis, title in ((left, "held-out KL (64 test examples)"), (right, "held-out faithfulness")):
        axis.set_xscale("log")
        axis.set_xlabel("seconds on 2 CPU cores (steps re-timed alone)")
        axis.set_title(title, fontsize=10)
        axis.grid(True, which="both", alpha=0.25)
    left.legend(fontsize=8, frameon=False)
    figure.suptitle(f"{settings['model']} {settings['task']}, sparsity {settings['sparsity']}, "
                    f"{settings['n_examples']} training examples, batch {settings['batch_size']}", fontsize=10)
    figure.savefig(out / f"test_kl_vs_seconds{suffix}.png", dpi=150)
    figure.savefig(out / f"test_kl_vs_seconds{suffix}.svg")

    rows = []
    for method in ("ep", "hap", *variants, *(["eap-ig"] if with_eap else [])):
        circuit = Circuit.load(out / method)
        test, train = circuit.held_out, circuit.metrics.get("train", {})
        if method == "eap-ig":
            total, steps = eap_seconds, 0
            reached = stayed = eap_seconds if test["kl"] <= threshold else None
        else:
            total, reached, stayed = curves[method][0][-1], reach(method), stay(method)
            steps = circuit.config.get("steps_done")
        rows.append((method, steps, reached, stayed, total, test, train,
                     circuit.config.get("final_expected_sparsity")))
    for stop in args.stop_at:  # HAP's run stopped at a snapshot step: its circuit there, its seconds to there
        along_path = out / "hap" / "along_the_run.json"
        along = {row["step"]: row for row in json.loads(along_path.read_text())} if along_path.is_file() else {}
        if stop not in along:
            raise SystemExit(f"--stop-at {stop}: {along_path} has no row for that step; run "
                             f"benchmarks/along_the_run.py {out / 'hap'} (snapshot steps: {sorted(along)})")
        name = f"hap@{stop}"
        shown = sum(1 for r in read_train_log(out / "hap" / "train_log.jsonl") if "test_kl" in r and r["step"] <= stop)
        curves[name] = tuple(values[:shown] for values in curves["hap"])
        total = timing["hap"].get("attribution_seconds", 0.0) + _seconds_at(timing["hap"], [stop])[0]
        test = {"kl": along[stop]["test_kl"], "faithfulness": along[stop]["test_faithfulness"], "accuracy": None,
                "logit_diff": None}
        rows.append((name, stop, reach(name), stay(name), total, test,
                     {"faithfulness": along[stop].get("train_faithfulness")}, None))
    ep_reach, ep_stay = rows[0][2], rows[0][3]
    lines = ["| method | steps | seconds to reach ≤ 1.1 × EP's final held-out KL | speed-up vs EP | "
             "seconds from which it stays there | speed-up vs EP | total seconds | "
             "test KL | test logit diff | test accuracy | test faithfulness | train faithfulness (in-sample) | "
             "expected sparsity at the end |", "|" + " --- |" * 13]
    for method, steps, reached, stayed, total, test, train, expected in rows:
        speed = f"{ep_reach / reached:.2f}" if reached and ep_reach else "n/a"
        settled_speed = f"{ep_stay / stayed:.2f}" if stayed and ep_stay else "n/a"
        lines.append(
            f"| {method} | {steps} | {_fmt(reached)} | {speed} | {_fmt(stayed)} | {settled_speed} | {_fmt(total)} | "
            f"{test['kl']:.3f} | {_number(test['logit_diff'])} | {_number(test['accuracy'])} | "
            f"{test['faithfulness']:.3f} | {_number(train.get('faithfulness'))} | "
            f"{'n/a' if expected is None else f'{expected:.4f}'} |")
    summary = {method: {"steps": steps, "seconds_to_reach": reached, "seconds_to_stay": stayed,
                        "total_seconds": total, "test": test, "train": train, "final_expected_sparsity": expected}
               for method, steps, reached, stayed, total, test, train, expected in rows}
    write_atomically(out / f"summary{suffix}.json", json.dumps({"ep_final_test_kl": ep_final, "within": WITHIN,
                                                       "methods": summary}, indent=1))
    full = rows[0][5]["full_model"]
    lines.append(f"\nFull model on the test split: logit diff {full['logit_diff']:.3f}, accuracy "
                 f"{full['accuracy']:.3f}; EP's final held-out KL (64-example monitor batch) {ep_final:.4f}.")
    for stop in args.stop_at:
        lines.append(f"\nhap@{stop}: HAP's run stopped at step {stop} (of {settings['hap_steps']}: the same schedule, "
                     "cut there); its test numbers are the circuit read off that step's snapshot on all the test "
                     "examples (`hap/along_the_run.json`), its seconds the attribution and the re-timed steps to "
                     "there.")
    for method in ("hap", "ep", *variants):
        if "snapshots_from" in timing[method]:
            lines.append(f"\n{method}: this run kept no snapshots of its masks; its step costs were re-timed from "
                         f"the snapshots of `{timing[method]['snapshots_from']}` (another seed, same settings).")
    table = "\n".join(lines)
    write_atomically(out / f"table{suffix}.md", table + "\n")
    print(table)


def _number(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def _fmt(seconds: float | None) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "not reached"
    return f"{seconds:.1f}" if seconds < 100 else f"{seconds:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("run")
    start.add_argument("--out", required=True)
    start.add_argument("--model", default="smollm2-135m")
    start.add_argument("--task", default="ioi")
    start.add_argument("--sparsity", type=float, default=0.95)
    start.add_argument("--n-examples", type=int, default=512)
    start.add_argument("--n-test", type=int, default=200)
    start.add_argument("--batch-size", type=int, default=16)
    start.add_argument("--seed", type=int, default=0)
    start.add_argument("--ep-steps", type=int, default=3000)
    start.add_argument("--hap-steps", type=int, default=1000)
    start.add_argument("--eval-every", type=int, default=60, help="for EP; HAP scales it with its step count")
    start.add_argument("--snapshot-every", type=int, default=150, help="for EP; HAP scales it likewise")
    start.add_argument("--monitor-examples", type=int, default=64)
    start.add_argument("--methods", default=",".join(METHODS))
    start.add_argument("--reference-memory", type=float, default=4.0, help="GiB (not a setting of the results)")
    start.set_defaults(run=run)
    again = commands.add_parser("time")
    again.add_argument("--out", required=True)
    again.add_argument("--points", type=int, default=10, help="snapshots re-timed per method")
    again.add_argument("--repeats", type=int, default=3)
    again.add_argument("--keep-eap-ig", action="store_true",
                       help="keep the EAP-IG run's seconds already in the timing file (only a HAP run is new)")
    again.add_argument("--runs", default="hap,ep",
                       help="pruning run folders under --out to re-time (a HAP variant, say hap-margin3, run with "
                            "`hap discover` and the settings of settings.json); merged into --timing. With hap, "
                            "also re-times the attribution of HAP's stage 1 and of EAP-IG")
    again.add_argument("--snapshots-from", default=None,
                       help="another seed's --out folder: a run here without snapshots is re-timed from that "
                            "folder's snapshots of the same method (the report says so)")
    again.add_argument("--timing", default="timing.json",
                       help="file under --out that the re-timing is merged into (another name keeps one run's "
                            "measurements apart from an earlier one's)")
    again.set_defaults(run=retime)
    summary = commands.add_parser("report")
    summary.add_argument("--out", required=True)
    summary.add_argument("--timing", default="timing.json",
                         help="re-timing to report; any other than timing.json writes table-, summary- and "
                              "test_kl_vs_seconds- files suffixed with its name")
    summary.add_argument("--stop-at", type=int, action="append", default=[],
                         help="also report HAP's run stopped at this snapshot step (a budget chosen on the "
                              "validation split, say): row hap@STEP (needs hap/along_the_run.json); repeatable")
    summary.set_defaults(run=report)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
