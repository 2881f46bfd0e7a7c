"""The ``hap`` command line. User mistakes end in one line on stderr and exit 2.

Each subcommand is a small handler that turns arguments into a library call;
the work itself lives in the library (``discovery``, ``evaluation``, ``verify``).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path

from . import __version__
from . import progress, settings
from .errors import HapError
from .report.commands import register as register_report_commands
from .settings import DEFAULT_MODEL
from .threads import prepare_threads

# Heavy modules (torch, transformers) are imported inside the handlers, so help and argument errors
# are answered at once.


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the CLI's error style: one line ``hap: error: ...`` (naming the subcommand's help), exit 2."""

    def error(self, message: str):  # type: ignore[override]
        command = self.prog.removeprefix("hap").strip()
        see = f"hap {command} --help" if command else "hap --help"
        self.exit(2, f"hap: error: {message}; see {see}\n")


def _add_model_options(parser: argparse.ArgumentParser, default: str | None = DEFAULT_MODEL,
                       shown_default: str | None = None) -> None:
    """--model (``shown_default`` names the default applied later when the flag itself defaults to None),
    --device and --dtype."""
    named = default or shown_default
    help_model = f"model name or path (default {named})" if named else "model (default: the circuit's)"
    parser.add_argument("--model", default=default, help=help_model)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32 (default), float64, float16, bfloat16")
    parser.add_argument("--device-map", default=None, metavar="auto|balanced|FILE.json",
                        help="spread a model larger than one device over several: its layers run where their "
                        "weights are (accelerate's device map; instead of --device)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads (default: $HAP_THREADS, else the CPUs this process may use: its "
                        "affinity and cgroup quota, not every core of the host)")


def _add_task_options(parser: argparse.ArgumentParser) -> None:
    """The options of commands that re-run a saved circuit on examples: by default its recorded test split."""
    parser.add_argument("--split", default="test", choices=("test", "train"),
                        help="which recorded split of the circuit to use (default test: the held-out examples)")
    parser.add_argument("--task", default=None,
                        help="another task or .jsonl file instead of the recorded split (default: the circuit's)")
    parser.add_argument("--n-examples", type=int, default=None,
                        help="default: as many as the recorded split (64 for --task or a circuit without splits)")
    parser.add_argument("--seed", type=int, default=None,
                        help="with --task: the draw's seed (default: the discovery seed + 1)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the circuit's")
    _add_bos_option(parser, "default: as the circuit was found")
    parser.add_argument("--allow-weak-model", action="store_true", default=None,
                        help="measure even when the full model fails the task (at or below chance)")


def _add_quiet_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true",
                        help="no progress (bars on a terminal, progress lines in a log), for scripts; the "
                        "summary, warnings and errors still print")


def _add_bos_option(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                        help=f"begin every prompt with the tokenizer's BOS token, or not ({default}); answers are "
                        "always bare tokens")


def _circuit_bos(circuit, tokenizer) -> tuple[bool | None, str]:
    """How the circuit's prompts began (None: as the tokenizer does, for a circuit with no recorded split,
    e.g. an imported MIB file) and a note for circuits found before hap recorded it."""
    from .tasks import default_prefix, is_program_task

    recorded = [spec for spec in circuit.splits.values() if isinstance(spec, dict)]
    if not recorded or is_program_task(circuit.task):
        return None, ""
    if any(spec.get("bos") is not None for spec in recorded):
        return bool(recorded[0].get("bos")), ""
    note = ""
    if default_prefix(tokenizer):
        note = (" (found before hap recorded the BOS token: rebuilt without it, as it was fitted, although this "
                "tokenizer prepends one by default; --bos measures it with BOS)")
    return False, note


def _examples(args: argparse.Namespace, circuit, tokenizer, source: str):
    """The task examples a re-scoring command uses and a line saying which they are.

    Default: the circuit's recorded split (exactly the examples ``discover`` used, with the BOS token
    exactly when they had it; ``--bos``/``--no-bos`` override). With ``--task`` or ``--seed``, or for a
    circuit that records no split, a fresh draw.
    """
    from dataclasses import replace

    from .tasks import TaskSpec, is_program_task, load_split, load_task

    bos, note = _circuit_bos(circuit, tokenizer)
    if args.bos is not None:
        bos, note = args.bos, ""
    recorded = circuit.splits.get(args.split)
    if recorded and args.task is None and args.seed is None:
        spec = TaskSpec.from_dict(recorded, source=f"{source}: splits.{args.split}")
        measured = (circuit.metrics.get(args.split) or {}).get("n_examples")  # in-sample: the first N examples
        n_examples = args.n_examples or (measured if isinstance(measured, int) else None)
        if n_examples is not None:
            spec = replace(spec, n_examples=n_examples)
        if not spec.is_program:
            spec = replace(spec, bos=bool(bos))
        return load_split(spec, tokenizer), spec.describe() + note, spec.to_dict()
    if args.split == "train" and not recorded:
        raise HapError(f"{source} records no training split (it predates held-out splits); "
                       "use --task and --seed to draw examples")
    n = args.n_examples or 64
    seed = args.seed if args.seed is not None else int(circuit.config.get("seed", 0)) + 1
    name = args.task or circuit.task
    task = load_task(name, tokenizer, n, seed=seed, bos=None if is_program_task(name) else bos)
    note = f"{n} examples of {name} drawn with seed {seed} from the whole vocabulary" + \
        ("; BOS first" if task.bos and not is_program_task(name) else "") + note
    if not recorded:
        note += " (this circuit records no split: they may share templates and names with its training examples)"
    return task, note, {"task": name, "split": "drawn", "n_examples": n, "seed": seed,
                        **({} if is_program_task(name) else {"bos": task.bos})}


def _measured_data(model, task, batch_size: int, ablation: str, label: str, allow_weak_model: bool | None):
    """The batches a re-scoring command measures (kept for it to reuse), once the full model is known to do
    the task on their first examples (``WeakModelError`` otherwise, unless ``allow_weak_model``)."""
    from .batches import ReferenceCache, TaskBatches
    from .evaluation import check_full_model, require_capable_model
    from .graph import Graph

    data = TaskBatches(model, Graph.from_model(model), task, batch_size, ablation, cache=ReferenceCache())
    weak = require_capable_model([check_full_model(model, data, label)], task.bos, bool(allow_weak_model), model.name)
    if weak:
        print(f"hap: warning: the full model fails the task ({weak[0].describe()}); measured anyway "
              "(--allow-weak-model)", file=sys.stderr)
    return data


def _verify(args: argparse.Namespace) -> int:
    settings.check_model_name(args.model)
    from .models.loading import load_model
    from .verify import describe_task_check, verify_model

    model = load_model(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map)
    report = verify_model(model, random_tokens=args.random_tokens, seed=args.seed, bos=args.bos)
    print(json.dumps(report))
    print(describe_task_check(report["full_model_task"]), file=sys.stderr)
    return 0 if report["passed"] else 1


def _discover(args: argparse.Namespace) -> int:
    if args.model is not None:
        settings.check_model_name(args.model)
    from .discovery import DiscoverConfig, discover, format_summary

    if args.resume is not None:
        if args.out is not None and args.out != args.resume:
            raise HapError(f"--resume {args.resume} continues that run in place; drop --out {args.out}")
        args.out = args.resume
    elif args.out is None:
        raise HapError("--out DIR is required (the run directory), or --resume DIR to continue a run")
    subset = tuple(name.strip() for name in args.edges_subset.split(",")) if args.edges_subset else None
    flags = {
        "out": args.out, "model": args.model, "task": args.task, "method": args.method, "edges": args.edges,
        "sparsity": args.sparsity, "n_examples": args.n_examples, "n_test": args.n_test, "test_task": args.test_task,
        "test_fraction": args.test_fraction, "batch_size": args.batch_size, "seed": args.seed,
        "ig_steps": args.ig_steps, "loss": args.loss, "ablation": args.ablation, "edges_subset": subset,
        "per_head_kv": args.per_head_kv, "kv_graph": args.kv_graph,
        "curve": args.curve, "explain_examples": args.explain_examples, "ground_truth": args.ground_truth, "threshold": args.threshold,
        "acdc_metric": args.acdc_metric, "tests_per_forward": args.tests_per_forward,
        "threshold_runs": args.threshold_runs, "threshold_tolerance": args.threshold_tolerance,
        "threshold_start": args.threshold_start,
        "mixed_precision": args.mixed_precision, "steps": args.steps, "lr": args.lr, "lambda_lr": args.lambda_lr,
        "init_mean": args.mask_init,
        "lr_warmup": args.lr_warmup, "sparsity_warmup": args.sparsity_warmup,
        "project_warmup": args.project_warmup, "node_masks": args.node_masks,
        "max_extra_steps": args.max_extra_steps, "node_sparsity": args.node_sparsity, "candidates": args.candidates,
        "attribution": args.attribution, "attribution_examples": args.attribution_examples,
        "warm_start": args.warm_start, "eval_every": args.eval_every, "monitor_examples": args.monitor_examples,
        "checkpoint_every": args.checkpoint_every, "snapshot_every": args.snapshot_every,
        "readoff_every": args.readoff_every, "readoff_on": args.readoff_on, "cache_dir": args.cache_dir,
        "reference_memory": args.reference_memory,
        "bos": args.bos, "allow_weak_model": args.allow_weak_model,
        "device": args.device, "device_map": args.device_map, "dtype": args.dtype, "force": args.force, "resume": args.resume is not None,
        "report": not args.no_report,
    }
    given = {key: value for key, value in flags.items() if value is not None}
    if args.resume is not None:  # the run's own settings, with whatever flags were given on top (checked)
        config = DiscoverConfig.from_run(given.pop("out"), **given)
    else:
        config = DiscoverConfig(**given)
    circuit = discover(config)
    from .distributed import is_main_process

    if is_main_process():  # in a data-parallel run the main process reports
        print(format_summary(circuit))
        print(f"wrote {Path(config.out) / 'circuit.json'}" + ("" if args.no_report else " and report.html"))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .circuit import Circuit
    from .discovery import format_summary
    from .evaluation import evaluate
    from .graph import Graph
    from .ground_truth import judge, read_ground_truth
    from .models.loading import load_model
    from .models.tracr import TracrTransformer

    circuit = Circuit.load(args.circuit, model=args.model)
    model = load_model(circuit.model, device=args.device, dtype=args.dtype, device_map=args.device_map,
                       per_head_kv_graph=circuit.layout.kv_ungrouped)
    circuit.check_fits(model.layout, str(args.circuit))
    task, note, split = _examples(args, circuit, model.tokenizer, args.circuit)
    started = time.perf_counter()
    ablation = args.ablation or circuit.config.get("ablation", "interchange")
    batch_size = args.batch_size or int(circuit.config.get("batch_size", 16))
    graph = Graph.from_model(model)
    if args.ground_truth is not None:
        read_ground_truth(args.ground_truth, graph)  # refuse a bad file before the work
    data = _measured_data(model, task, batch_size, ablation, split.get("split", "drawn"), args.allow_weak_model)
    metrics = evaluate(model, circuit, task, batch_size, ablation, progress=not args.json, data=data).to_dict()
    metrics["n_full_model_wrong"] = round((1.0 - metrics["full_model"]["accuracy"]) * len(task))
    recovery = None
    if args.ground_truth is not None or isinstance(model.hf_model, TracrTransformer):
        recovery = judge(model, graph, circuit.in_graph, circuit.scores,
                         data, ablation,
                         args.ground_truth)
    if args.json:
        print(json.dumps({"circuit": str(args.circuit), "model": circuit.model, "task": task.name, "split": split,
                          **metrics, **({"ground_truth": recovery} if recovery else {})}))
    else:
        label = "train" if split.get("split") == "train" else "test"
        circuit.metrics = {label: metrics, **({"ground_truth": recovery} if recovery else {})}
        circuit.splits = {}
        circuit.runtime_s = {"evaluation": time.perf_counter() - started}
        print(format_summary(circuit))
        print(f"  examples      {note}")
        if label == "train":
            print("  (these are the examples the circuit was fitted on: in-sample numbers, not held out)")
    return 0


def _ensemble(args: argparse.Namespace) -> int:
    import shlex

    from .discovery import format_summary
    from .ensemble import ensemble_run

    circuit = ensemble_run(args.runs, args.how, args.out, edges=args.edges, sparsity=args.sparsity,
                           device=args.device, dtype=args.dtype, force=args.force, report=not args.no_report,
                           command=shlex.join(["hap", *sys.argv[1:]]))
    print(format_summary(circuit))
    print(f"wrote {Path(args.out) / 'circuit.json'}" + ("" if args.no_report else " and report.html"))
    return 0


def _circuit_and_model(given: str, args: argparse.Namespace):
    """(the circuit file's path, the circuit, its model loaded as ``--device``/``--dtype``/``--device-map``
    say, checked to fit) for the commands that re-run a saved circuit."""
    from .circuit import Circuit
    from .models.loading import load_model

    path = Path(given)
    path = path / "circuit.json" if path.is_dir() else path
    circuit = Circuit.load(path, model=args.model)
    model = load_model(circuit.model, device=args.device, dtype=args.dtype, device_map=args.device_map,
                       per_head_kv_graph=circuit.layout.kv_ungrouped)
    circuit.check_fits(model.layout, str(path))
    return path, circuit, model


def _curve(args: argparse.Namespace) -> int:
    from .circuit import Scores, write_atomically
    from .evaluation import faithfulness_curve

    path, circuit, model = _circuit_and_model(args.scores, args)
    task, note, split = _examples(args, circuit, model.tokenizer, str(path))
    scores = Scores(circuit.model, circuit.task, circuit.method, circuit.layout, circuit.scores, circuit.config)
    ablation = circuit.config.get("ablation", "interchange")
    batch_size = args.batch_size or int(circuit.config.get("batch_size", 16))
    data = _measured_data(model, task, batch_size, ablation, split.get("split", "drawn"), args.allow_weak_model)
    curve = faithfulness_curve(model, scores, task, batch_size=batch_size, ablation=ablation, progress=True,
                               data=data)
    document = {**curve.to_dict(), "split": split.get("split", "drawn")}
    print(json.dumps(document))
    print(f"examples: {note}", file=sys.stderr)
    if not args.no_write:
        circuit.metrics = {**circuit.metrics, "curve": document}
        write_atomically(path, json.dumps(circuit.to_dict()))
    return 0


EXPLAIN_EXAMPLES = 64  # hap explain's default: the first 64 examples of the recorded split


def _explain(args: argparse.Namespace) -> int:
    from .circuit import write_atomically
    from .explain import explain_circuit, store_explanation

    path, circuit, model = _circuit_and_model(args.circuit, args)
    if args.n_examples is None:
        recorded = (circuit.metrics.get(args.split) or {}).get("n_examples")
        args.n_examples = min(EXPLAIN_EXAMPLES, recorded) if isinstance(recorded, int) else EXPLAIN_EXAMPLES
    task, note, split = _examples(args, circuit, model.tokenizer, str(path))
    ablation = circuit.config.get("ablation", "interchange")
    batch_size = args.batch_size or int(circuit.config.get("batch_size", 16))
    data = _measured_data(model, task, batch_size, ablation, split.get("split", "drawn"), args.allow_weak_model)
    started = time.perf_counter()
    explanation = explain_circuit(model, circuit, task, batch_size, ablation, data=data,
                                  split=split.get("split", "drawn"), progress=not args.json)
    seconds = time.perf_counter() - started
    table = explanation.importance
    if args.json:
        print(json.dumps({"circuit": str(path), "model": circuit.model, "split": table.split,
                          "n_examples": table.n_examples, "faithfulness": table.faithfulness, "kl": table.kl,
                          **explanation.to_json()}))
    else:
        print(f"{circuit.model} / {circuit.task} / {circuit.method}: {len(table.nodes)} heads and MLPs")
        print(explanation.format(top=args.top))
        print(f"examples: {note}; {seconds:.1f} s")
        if table.split == "train":
            print("(these are the examples the circuit was fitted on: in-sample numbers, not held out)")
    if not args.no_write:
        store_explanation(circuit, explanation, {"examples": split, "seconds": round(seconds, 1)})
        write_atomically(path, json.dumps(circuit.to_dict()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .settings import ATTRIBUTION_METHODS, METHODS

    parser = ArgumentParser(prog="hap", description="Find circuits in transformer language models.")
    parser.add_argument("--version", action="version", version=f"hap-circuits {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    verify = commands.add_parser(
        "verify",
        help="check the adapter and the ablation primitive against the Hugging Face model",
        description="Print one JSON line of invariants; exit 0 only if every *_max_abs_diff is within tolerance "
        "(1e-4 in float32).",
    )
    _add_model_options(verify)
    verify.add_argument("--seed", type=int, default=0)
    verify.add_argument("--random-tokens", action="store_true", help="stress test on random token ids")
    _add_bos_option(verify, "default: as the tokenizer does")
    _add_quiet_option(verify)
    verify.set_defaults(run=_verify)

    discover = commands.add_parser(
        "discover", help="find a circuit and write a run directory (circuit.json, report.html)",
        description="Find a circuit for a task, evaluate it, and write the run directory. Pruning defaults are a "
        "CPU budget (make demo runs in under 10 minutes on 2 cores); the published Edge Pruning settings are "
        "--steps 3000 --batch-size 32 --n-examples 200.")
    _add_model_options(discover, default=None, shown_default=DEFAULT_MODEL)  # --resume: the run's model
    discover.add_argument("--task", default=None, help="ioi, greater-than, a .jsonl file, or for a tracr model "
                          "its program (default: ioi; a tracr model's own program)")
    discover.add_argument("--method", default=None, choices=METHODS, help="default eap-ig-inputs")
    size = discover.add_mutually_exclusive_group()
    size.add_argument("--edges", type=int, help="keep this many edges")
    size.add_argument("--sparsity", type=float, help="fraction of edges removed, in (0, 1)")
    discover.add_argument("--n-examples", type=int, default=None,
                          help="training examples (default 256 for ep/hap, 64 for attribution methods)")
    discover.add_argument("--n-test", type=int, default=None,
                          help=f"held-out test examples every metric is measured on (default {settings.DEFAULT_N_TEST})")
    discover.add_argument("--test-task", default=None, metavar="FILE",
                          help="a .jsonl file of test examples (default: held-out templates and names for the "
                          "built-in tasks, a hashed share of a custom file)")
    discover.add_argument("--test-fraction", type=float, default=None,
                          help=f"custom file without --test-task: share held out for test "
                          f"(default {settings.DEFAULT_TEST_FRACTION})")
    discover.add_argument("--batch-size", type=int, default=None, help=f"default {settings.DEFAULT_BATCH_SIZE}")
    discover.add_argument("--seed", type=int, default=None)
    _add_bos_option(discover, "default: as the tokenizer does, e.g. BOS for Llama, Gemma, Mistral; none for "
                    "GPT-2, SmolLM2")
    discover.add_argument("--allow-weak-model", action="store_true", default=None,
                          help="find a circuit even when the full model fails the task (at or below chance, or a "
                          "negative mean metric on either split); refused by default")
    discover.add_argument("--ig-steps", type=int, default=None, help="integrated-gradient steps (default 5)")
    discover.add_argument("--loss", default=None, choices=("logit-diff", "kl"),
                          help="what attribution explains (default: the task metric)")
    discover.add_argument("--ablation", default=None, choices=("interchange", "mean", "zero"))
    discover.add_argument("--edges-subset", help="exact only: comma-separated edge names, e.g. a3.h1->m5")
    discover.add_argument("--per-head-kv", action="store_true", default=None,
                          help="eap/eap-ig: also score each query head's own copy of its group's key/value input "
                          "(the graph MIB uses; hap export --format mib then writes those scores)")
    discover.add_argument("--kv-graph", default=None, choices=("grouped", "per-head"),
                          help="per-head: discover on MIB's graph, where every query head has its own key/value "
                          "input (edge counts comparable with MIB under grouped-query attention); default grouped")
    discover.add_argument("--curve", action="store_true", default=None, help="also compute the MIB curve")
    discover.add_argument("--explain-examples", type=int, default=None, metavar="N",
                          help="explain the circuit (node importance, evidence, roles: hap explain) on the first N "
                          f"held-out examples (default {settings.DEFAULT_EXPLAIN_EXAMPLES}; 0 skips it; about one "
                          "masked run of the blocks after each node per example)")
    discover.add_argument("--ground-truth", default=None, metavar="FILE",
                          help="true edges (JSON list or {\"edges\": [...]}): report precision, recall, exact "
                          "recovery and ROC AUC (automatic for tracr models)")
    sweep = discover.add_argument_group("ACDC")
    sweep.add_argument("--threshold", type=float, default=None, metavar="TAU",
                       help="acdc: remove an edge when the metric rises by less than TAU (without it, "
                       "--edges/--sparsity search TAU)")
    sweep.add_argument("--acdc-metric", default=None, choices=("kl", "logit-diff"), help="acdc: default kl")
    sweep.add_argument("--tests-per-forward", type=int, default=None,
                       help="acdc: edge tests batched in one forward (default: as --reference-memory allows)")
    sweep.add_argument("--threshold-runs", type=int, default=None,
                       help="acdc with --edges/--sparsity: at most this many sweeps of the TAU search (default 6)")
    sweep.add_argument("--threshold-tolerance", type=float, default=None,
                       help="acdc with --edges/--sparsity: stop the TAU search at a sweep keeping N to N * (1 + "
                       "this) edges (default 0.1)")
    sweep.add_argument("--threshold-start", type=float, default=None, metavar="TAU",
                       help="acdc with --edges/--sparsity: the TAU of the search's first sweep (default: the log "
                       "midpoint of 1e-5..1); a good guess saves whole sweeps")
    sweep.add_argument("--mixed-precision", default=None, choices=settings.PRECISIONS,
                       help="acdc/exact (PAHQ): compute every block but the tested edge's reader's in reduced "
                       "precision (auto: the closer of float16 and bfloat16 to the model on CUDA, int8 MLPs on CPU); "
                       "refused where it is not faster, or where its answers are further from the model's than TAU")
    pruning = discover.add_argument_group("Edge Pruning and HAP")
    pruning.add_argument("--steps", type=int, default=None, help=f"training steps (default {settings.DEFAULT_STEPS}; tracr models 1000)")
    pruning.add_argument("--lr", type=float, default=None, help="mask learning rate (default 0.8; tracr models 0.1)")
    pruning.add_argument("--lambda-lr", type=float, default=None, help="Lagrangian learning rate (default 0.8; tracr models 0.1)")
    pruning.add_argument("--mask-init", type=float, default=None, metavar="LOG_ALPHA",
                         help="log alpha at which masks start when not warm-started (ep; hap --no-warm-start): "
                         "N(LOG_ALPHA, 0.01) (default 10, Edge Pruning's; tracr models 3)")
    pruning.add_argument("--lr-warmup", type=int, default=None, help="default steps/15")
    pruning.add_argument("--sparsity-warmup", type=int, default=None,
                         help="steps over which the target sparsity warms up (default: 5/6 of the steps for ep, "
                         "1/6 for hap, which starts near the target; 1/3 with --no-warm-start)")
    pruning.add_argument("--project-warmup", action=argparse.BooleanOptionalAction, default=None,
                         help="end every warm-up step with the expected sparsity exactly at the warming target "
                         "(default: on for hap with its warm start, off for ep, whose published schedule leaves "
                         "the warm-up to the Lagrangian)")
    pruning.add_argument("--max-extra-steps", type=int, default=None,
                         help="steps allowed past --steps, at the target, until the expected sparsity is within "
                         "0.5 pp of it (default steps/2)")
    pruning.add_argument("--node-masks", action="store_true", default=None, help="also learn a mask per source")
    pruning.add_argument("--node-sparsity", type=float, default=None, help="target for node masks (default 0)")
    pruning.add_argument("--candidates", type=float, default=None,
                         help="hap: fraction of edges kept as candidates (default: 1 - sparsity, times 1.5 up to "
                         "120 --steps, growing to 3 at 1,000 steps and more)")
    pruning.add_argument("--attribution", default=None, choices=ATTRIBUTION_METHODS,
                         help="hap: stage-1 method (default eap-ig-inputs)")
    pruning.add_argument("--attribution-examples", type=int, default=None,
                         help=f"hap: training examples scored by stage 1 (default {settings.DEFAULT_ATTRIBUTION_EXAMPLES})")
    pruning.add_argument("--warm-start", action=argparse.BooleanOptionalAction, default=None,
                         help="hap: initialise masks from the scores (default on)")
    pruning.add_argument("--eval-every", type=int, default=None,
                         help="measure the current circuit on held-out examples every N steps (default steps/25)")
    pruning.add_argument("--monitor-examples", type=int, default=None,
                         help=f"held-out examples measured during training (default {settings.DEFAULT_MONITOR_EXAMPLES})")
    pruning.add_argument("--checkpoint-every", type=int, default=None,
                         help="save a checkpoint every N steps (default: every 3 minutes of work)")
    pruning.add_argument("--snapshot-every", type=int, default=None,
                         help="also keep the masks every N steps in DIR/snapshots/ (default: never)")
    pruning.add_argument("--readoff-every", type=int, default=None, metavar="N",
                         help="every N steps, record the circuit read off the masks, and return whichever recorded "
                         "circuit fits best the examples --readoff-on names (the final one on ties); 0: never "
                         "(default: a tracr program every 1%% of the steps, other models never: each distinct "
                         "circuit costs one pass over those examples at the end)")
    pruning.add_argument("--readoff-on", choices=("train", "validation"), default="train",
                         help="the examples --readoff-every compares the circuits on: the training examples "
                         "(default), or as many fresh draws of the training distribution as --n-test (built-in "
                         "tasks only), so the choice does not reward fitting the training examples")
    pruning.add_argument("--reference-memory", type=float, default=None, metavar="GIB",
                         help=f"memory for corrupted activations kept between steps (default "
                         f"{settings.DEFAULT_REFERENCE_MEMORY_GIB:g} GiB; batches beyond it are recomputed)")
    pruning.add_argument("--cache-dir", default=None,
                         help="keep the corrupted activations that do not fit in --reference-memory on disk here")
    discover.add_argument("--out", default=None, help="run directory")
    discover.add_argument("--resume", default=None, metavar="DIR", help="continue the interrupted run in DIR")
    discover.add_argument("--force", action="store_true", default=None, help="overwrite a run in --out")
    discover.add_argument("--no-report", action="store_true", help="skip report.html")
    _add_quiet_option(discover)
    discover.set_defaults(run=_discover)

    evaluate = commands.add_parser(
        "evaluate", help="re-score a saved circuit on its held-out test split (or other examples)",
        description="Re-score a circuit. By default on exactly the held-out test split discover measured (the same "
        "examples, so the same numbers); --split train gives the in-sample numbers, --task/--seed a fresh draw.")
    evaluate.add_argument("circuit", help="circuit.json or a run directory")
    _add_model_options(evaluate, default=None)
    _add_task_options(evaluate)
    evaluate.add_argument("--ablation", default=None, choices=("interchange", "mean", "zero"))
    evaluate.add_argument("--json", action="store_true", help="one JSON line instead of a table")
    evaluate.add_argument("--ground-truth", default=None, metavar="FILE",
                          help="true edges (JSON list or {\"edges\": [...]}): precision, recall, exact recovery, "
                          "ROC AUC of the circuit's scores (automatic for tracr models)")
    _add_quiet_option(evaluate)
    evaluate.set_defaults(run=_evaluate)

    curve = commands.add_parser("curve", help="MIB faithfulness curve (CPR, CMD) of a circuit file's scores",
                                description="The MIB curve of the circuit's scores, by default on its held-out "
                                "test split; stored in the file unless --no-write.")
    curve.add_argument("scores", help="circuit.json (its edge scores are ranked) or a run directory")
    _add_model_options(curve, default=None)
    _add_task_options(curve)
    curve.add_argument("--no-write", action="store_true", help="do not store the curve in the circuit file")
    _add_quiet_option(curve)
    curve.set_defaults(run=_curve)
    explain = commands.add_parser(
        "explain", help="each head and MLP of the circuit: how much the circuit needs it, what it does, its role",
        description="Node importance: each head and MLP of the circuit is removed with all its edges, one at a "
        f"time, and the held-out faithfulness lost and KL added are measured (by default on the first "
        f"{EXPLAIN_EXAMPLES} examples of the recorded test split). Evidence, on the full model and the same "
        "examples: each head's attention between the task's named positions, each node's direct effect on the "
        "metric (direct logit attribution) and the circuit nodes that read it. Roles (IOI: name movers, negative "
        "name movers, S-inhibition confirmed by path patching, induction, duplicate-token, previous-token) "
        "from rules printed with the table. Stored in the circuit file (nodes.*.importance, .evidence, .role) "
        "unless --no-write.")
    explain.add_argument("circuit", help="circuit.json or a run directory")
    _add_model_options(explain, default=None)
    _add_task_options(explain)
    explain.add_argument("--top", type=int, default=20, help="rows shown (default 20; --json gives all)")
    explain.add_argument("--json", action="store_true", help="one JSON line: {\"nodes\": [{\"name\", \"role\", "
                         "\"importance\", \"evidence\"}, ...]}")
    explain.add_argument("--no-write", action="store_true", help="do not store the table in the circuit file")
    _add_quiet_option(explain)
    explain.set_defaults(run=_explain)
    ensemble = commands.add_parser(
        "ensemble", help="combine the edge scores of finished runs and evaluate the circuit they choose",
        description="Parallel ensemble (MIB shared task): each run's |scores| are rank-normalised, combined by "
        "--how, the top edges chosen, and the circuit measured on the runs' shared held-out split.")
    ensemble.add_argument("runs", nargs="+", metavar="RUN", help="run directories (or circuit.json paths)")
    ensemble.add_argument("--how", default="mean", choices=("mean", "min", "max"))
    size = ensemble.add_mutually_exclusive_group(required=True)
    size.add_argument("--edges", type=int, help="keep this many edges")
    size.add_argument("--sparsity", type=float, help="fraction of edges removed, in (0, 1)")
    ensemble.add_argument("--out", required=True, help="run directory for the ensemble's circuit")
    ensemble.add_argument("--device", default=None)
    ensemble.add_argument("--dtype", default=None)
    ensemble.add_argument("--force", action="store_true", help="overwrite a circuit in --out")
    ensemble.add_argument("--no-report", action="store_true", help="skip report.html")
    _add_quiet_option(ensemble)
    ensemble.set_defaults(run=_ensemble)
    register_report_commands(commands)
    return parser


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hap`` command. SIGTERM (a job scheduler stopping the job, ``kill``) ends a run as
    Ctrl-C does: what the run keeps for ``--resume`` is written first."""
    args = build_parser().parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    try:
        prepare_threads(getattr(args, "threads", None))  # before torch starts its thread pool
        with progress.quiet(getattr(args, "quiet", False)):  # --quiet: no progress, the results still print
            return args.run(args)
    except HapError as error:
        print(f"hap: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hap: interrupted", file=sys.stderr)
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
