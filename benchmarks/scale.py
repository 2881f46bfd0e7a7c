"""Step time and peak memory of Edge Pruning and HAP against edges and width, on random-weight models built
from published configs (issue 32, point 5): nothing is downloaded.

For each model (Qwen2.5-0.5B, Llama-3.2-1B, Llama-3.1-8B; ``CHECKPOINTS`` below, from their config.json)
and each method, a fresh child process builds the model from its config with seeded random weights, wraps
it as a hap ``Model`` with the tiny word-level tokenizer, makes one IOI batch (its reference and the full
model's logits) and times ``--steps`` steps after one warm-up step of

* ``plain``: a forward+backward of the Hugging Face model (``step_cost.plain_step``);
* ``ep``: an Edge Pruning step with every edge live, half the masks open (``step_cost.py``'s "EP, middle");
* ``hap``: a HAP step on its default candidates for a 1,000-step run at 95% sparsity
  (``candidate_margin(1000)`` x 5% = 15% of the edges, top |EAP score|), warm-started masks.

The EAP scores that choose EP's open half and HAP's candidates come from one more child per model, so that
attribution's own peak does not hide a step's. Peak memory is the process's ``ru_maxrss`` on CPU and
``torch.cuda.max_memory_allocated`` on a GPU; the step's memory is that peak after the steps minus the peak
before them (model, batch, reference and logits already held), set beside ``step_memory.predict_gib``.

Writes ``results-<device>.json`` (after every child, so a stopped run keeps what it measured),
``results-<device>.md`` and ``scale-<device>.png``/``.svg`` into ``--out``, and prints the table.

    # CPU, the two small models (alone on the machine; estimated 10 to 20 minutes on 2 cores):
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/scale.py --device cpu
    # a GPU, all three (8B in bfloat16), under ten minutes: benchmarks/scale_gpu.sh
    # seconds, a shrunken config to try the script: NAME:field=value,... overrides config.json fields
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scale.py --out /tmp/scale --steps 1 --batch-size 2 \\
        --models qwen2.5-0.5b:num_hidden_layers=2,vocab_size=512 llama-3.2-1b:num_hidden_layers=1,vocab_size=512
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from step_memory import predict_gib  # the sibling script (this folder is on the path when a script runs)

HERE = Path(__file__).resolve().parent

# The published config.json values that shape the graph and the cost (head_dim is hidden / heads where the
# file has none), checked 2026-12-06 against public copies of each file, the hub not being reachable here:
# Qwen2.5-0.5B's as quoted on its model pages, Llama-3.2-1B's in kevinstephano/thunder_model_blocks
# (hf_llama/llama_config.py), Llama-3.1-8B's as LlamaConfig prints it and in zyzshishui/slime
# (scripts/models/llama3.1-8B.sh). They give 0.49B, 1.24B and 8.03B parameters, as published
# (tests/test_scale.py).
CHECKPOINTS: dict[str, dict] = {
    # https://huggingface.co/Qwen/Qwen2.5-0.5B/blob/main/config.json (q/k/v biases are Qwen2's own; no
    # rope_scaling; sliding window off)
    "qwen2.5-0.5b": {
        "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 151936,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True, "use_sliding_window": False,
    },
    # https://huggingface.co/meta-llama/Llama-3.2-1B/blob/main/config.json
    "llama-3.2-1b": {
        "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
    },
    # https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json
    "llama-3.1-8b": {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
    },
}
METHODS = ("plain", "ep", "hap")
DEFAULT_MODELS = {"cpu": ["qwen2.5-0.5b", "llama-3.2-1b"], "cuda": list(CHECKPOINTS)}
STEPS = 1000  # HAP's candidates: its default for a run of this many steps ...
TARGET = 0.05  # ... at this fraction of the edges kept


def parse_model(spec: str) -> dict:
    """``NAME`` or ``NAME:field=value,...`` -> the config fields of checkpoint NAME with those overridden
    (a shrunken model for a quick try: ``qwen2.5-0.5b:num_hidden_layers=2,vocab_size=512``)."""
    name, _, overrides = spec.partition(":")
    if name not in CHECKPOINTS:
        raise SystemExit(f"unknown model '{name}'; known: {', '.join(CHECKPOINTS)}")
    fields = dict(CHECKPOINTS[name])
    for item in filter(None, overrides.split(",")):
        key, equals, value = item.partition("=")
        if not equals:
            raise SystemExit(f"'{item}' in '{spec}': give field=value, e.g. num_hidden_layers=2")
        try:
            fields[key] = json.loads(value)
        except ValueError:
            fields[key] = value
    return fields


def peak_gib(device: str) -> float:
    """This process's peak memory so far: resident (CPU, ``ru_maxrss`` in KiB on Linux) or allocated by
    torch on the GPU."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def child(job: dict) -> dict:
    """One (model, method) measured in this process; ``job`` as ``run_child`` writes it. Returns the row."""
    import time

    import torch
    from transformers import AutoConfig

    import hap
    from hap.batches import ReferenceCache, TaskBatches
    from hap.hybrid import candidate_margin
    from hap.models.loading import resolve_dtype
    from hap.models.tiny import tiny_tokenizer
    from step_cost import ep_middle_log_alpha, hap_start, plain_step, pruning_step
    from step_memory import random_model

    device, method = job["device"], job["method"]
    fields = parse_model(job["model"])
    tokens_needed = len(tiny_tokenizer())
    if fields["vocab_size"] < tokens_needed:
        raise SystemExit(f"vocab_size {fields['vocab_size']} is below the tiny tokenizer's {tokens_needed} ids")
    config = AutoConfig.for_model(**fields)
    model = random_model(config, job["model"], "cuda:0" if device == "cuda" else device, resolve_dtype(job["dtype"]))
    graph = hap.Graph.from_model(model)
    task = hap.load_task("ioi", model.tokenizer, job["batch_size"], seed=0)
    row = {"model": job["model"], "method": method, "device": device, "dtype": job["dtype"],
           "batch": job["batch_size"], "d_model": config.hidden_size, "layers": config.num_hidden_layers,
           "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
           "intermediate": config.intermediate_size, "vocab": config.vocab_size,
           "params": sum(p.numel() for p in model.hf_model.parameters()),
           "weights_gib": sum(p.numel() * p.element_size() for p in model.hf_model.parameters()) / 2**30,
           "edges": graph.n_edges, "sources": graph.n_sources, "readers": graph.n_readers,
           "threads": torch.get_num_threads(), "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name() if device == "cuda" else None}
    if method == "scores":  # the EAP scores the ep and hap children read
        torch.save(hap.attribute(model, task, "eap").values.cpu(), job["scores"])
        return row
    batch = TaskBatches(model, graph, task, job["batch_size"], cache=ReferenceCache(10**11))[0]
    if method == "plain":
        step, live = plain_step(model, batch), None
    else:
        scores = torch.load(job["scores"])
        if method == "ep":
            live, log_alpha = graph.real, ep_middle_log_alpha(graph, scores)
        else:
            live, log_alpha = hap_start(graph, scores, candidate_margin(STEPS) * TARGET, TARGET)
        step = pruning_step(model, graph, batch, live, log_alpha)

    def synchronise() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    synchronise()
    setup_gib = peak_gib(device)
    if device == "cuda":  # from here the peak is the steps' alone, over what is held now
        before = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    else:
        before = setup_gib
    plans, seconds = [step()], []  # the first step warms up
    for _ in range(job["steps"]):
        synchronise()
        started = time.perf_counter()
        plans.append(step())
        synchronise()
        seconds.append(time.perf_counter() - started)
    after = peak_gib(device)
    row.update(tokens=int(batch.clean.shape[1]), live=int(live.sum()) if live is not None else None,
               seconds=seconds, seconds_per_step=sum(seconds) / len(seconds),
               peak_gib=max(setup_gib, after), step_gib=after - before)
    if method != "plain":
        counts = {"batch": job["batch_size"], "tokens": row["tokens"], "d_model": config.hidden_size,
                  "layers": config.num_hidden_layers, "intermediate": config.intermediate_size,
                  "sources": graph.n_sources, "bytes": model.dtype.itemsize,
                  "contributing": max(int(plan.contributing.sum()) for plan in plans),
                  "formed": max(int(plan.formed.sum()) for plan in plans)}
        row.update(contributing=counts["contributing"], formed=counts["formed"], formula_gib=predict_gib(counts))
        if model.weights_dtype != model.dtype:  # half weights: blocks compute in 2 bytes, the sums in float32
            row["formula_gib_weights_bytes"] = predict_gib({**counts, "bytes": model.weights_dtype.itemsize})
    return row


def run_child(job: dict) -> dict:
    """``child(job)`` in a fresh process; a failure (out of memory, say) comes back as a row with ``error``.
    A child's ``ru_maxrss`` starts at its parent's peak (exec keeps the high-water mark), so this process
    imports neither torch nor hap."""
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True,
                          check=False)
    if done.returncode == 0:
        return json.loads(done.stdout.strip().splitlines()[-1])
    sys.stderr.write(done.stderr[-3000:])
    last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    return {"model": job["model"], "method": job["method"], "device": job["device"], "dtype": job["dtype"],
            "batch": job["batch_size"], "error": last[:300]}


def table(rows: list[dict]) -> str:
    """The Markdown table of the measured rows (EP and HAP also against the plain step of their model)."""
    plain = {row["model"]: row["seconds_per_step"] for row in rows if row["method"] == "plain" and "error" not in row}
    header = ("| model | d_model x layers | edges | method | live edges | B x T | s/step | / plain | peak GiB | "
              "step GiB | formula GiB | step / formula |")
    lines = [header, "|" + " --- |" * 12]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['model']} | | | {row['method']} | | | failed: {row['error']} | | | | | |")
            continue
        live = f"{row['live']:,}" if row.get("live") is not None else ""
        ratio = f"{row['seconds_per_step'] / plain[row['model']]:.2f}" if row["model"] in plain else ""
        formula = check = ""
        if "formula_gib" in row:
            formula = f"{row['formula_gib']:.3f}"
            if "formula_gib_weights_bytes" in row:
                formula += f" ({row['formula_gib_weights_bytes']:.3f} at 2 bytes)"
            check = f"{row['step_gib'] / row['formula_gib']:.2f}"
        lines.append(f"| {row['model']} | {row['d_model']} x {row['layers']} | {row['edges']:,} | {row['method']} | "
                     f"{live} | {row['batch']} x {row['tokens']} | {row['seconds_per_step']:.3f} | {ratio} | "
                     f"{row['peak_gib']:.2f} | {row['step_gib']:.3f} | {formula} | {check} |")
    return "\n".join(lines)


def plot(rows: list[dict], title: str, stem: Path) -> None:
    """Seconds per step, peak memory, and the step's memory against the formula, each against the model's
    edges (log-log), one line per method; written as ``stem``.png and .svg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [row for row in rows if "error" not in row]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    colours = {"plain": "tab:gray", "ep": "tab:red", "hap": "tab:blue"}
    for method in METHODS:
        points = sorted((row for row in measured if row["method"] == method), key=lambda row: row["edges"])
        if not points:
            continue
        edges = [row["edges"] for row in points]
        axes[0].plot(edges, [row["seconds_per_step"] for row in points], "o-", color=colours[method], label=method)
        axes[1].plot(edges, [row["peak_gib"] for row in points], "o-", color=colours[method], label=method)
        if method != "plain":
            axes[2].plot(edges, [row["step_gib"] for row in points], "o-", color=colours[method],
                         label=f"{method}, measured")
            axes[2].plot(edges, [row["formula_gib"] for row in points], "s--", color=colours[method],
                         fillstyle="none", label=f"{method}, formula")
        if method == "plain":
            for row in points:
                name = row["model"].split(":")[0] + ("*" if ":" in row["model"] else "")  # *: shrunken
                note = axes[0].annotate(f"{name}, d={row['d_model']}", (row["edges"], row["seconds_per_step"]),
                                        textcoords="offset points", xytext=(0, -13), ha="center", fontsize=7)
                note.set_in_layout(False)
    peak = "peak allocated memory, GiB" if measured and measured[0]["device"] == "cuda" else "peak resident memory, GiB"
    for axis, label in zip(axes, ("seconds per step", peak, "memory of the step, GiB")):
        axis.set(xscale="log", yscale="log", xlabel="edges of the model's graph", ylabel=label)
        axis.margins(x=0.25, y=0.15)  # room for the labels at the ends
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    for suffix in (".png", ".svg"):
        figure.savefig(stem.with_suffix(suffix), dpi=120)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", help="NAME or NAME:field=value,... (default: the two small "
                        f"models on cpu, all three on cuda); names: {', '.join(CHECKPOINTS)}")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the weights' dtype (bfloat16: hap keeps its sums in float32)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps, after one warm-up step")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--out", type=Path, default=HERE / "scale")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    models = args.models or DEFAULT_MODELS[args.device]
    for spec in models:
        parse_model(spec)  # a typo fails now, not after the first model's runs
    sees_gpu = "import sys, torch; sys.exit(not torch.cuda.is_available())"
    if args.device == "cuda" and subprocess.run([sys.executable, "-c", sees_gpu], check=False).returncode:
        raise SystemExit(f"{sys.executable}'s torch sees no GPU here; run on one, or with --device cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"scale-{args.device}"
    results = args.out / f"results-{args.device}.json"
    meta = {"date": datetime.date.today().isoformat(), "device": args.device, "dtype": args.dtype,
            "batch_size": args.batch_size, "steps": args.steps, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "hap_candidates": f"candidate_margin({STEPS}) x {TARGET:.0%} of the edges"}
    rows: list[dict] = []
    # plain first, then the EAP scores that ep and hap read; small models first, so a run stopped at a time
    # limit keeps them
    order = [method for method in ("plain", "scores", "ep", "hap")
             if method in args.methods or method == "scores" and {"ep", "hap"} & set(args.methods)]
    with tempfile.TemporaryDirectory(prefix="hap-scale-") as scratch:
        for index, spec in enumerate(models):
            scores_failed = None
            for method in order:
                job = {"model": spec, "method": method, "device": args.device, "dtype": args.dtype,
                       "batch_size": args.batch_size, "steps": args.steps, "scores": f"{scratch}/{index}.pt"}
                row = run_child(job) if scores_failed is None else {**job, "error": scores_failed}
                print(f"{spec} {method}: " + (f"failed: {row['error']}" if "error" in row else
                      "EAP scores made" if method == "scores" else
                      f"{row['seconds_per_step']:.3f} s/step, peak {row['peak_gib']:.2f} GiB"), flush=True)
                if "error" not in row and row.get("gpu"):
                    meta["gpu"] = row["gpu"]
                if method == "scores":
                    scores_failed = f"no EAP scores ({row['error']})" if "error" in row else None
                    continue
                rows.append(row)
                results.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    title = (f"{meta['date']}, {args.device}{' (' + meta['gpu'] + ')' if meta.get('gpu') else ''}, {args.dtype}, "
             f"IOI batch {args.batch_size}, mean of {args.steps} timed step{'s' * (args.steps != 1)} after a warm-up")
    text = f"{title}\n\n{table(rows)}\n"
    (args.out / f"results-{args.device}.md").write_text(text)
    results.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    plot(rows, title, stem)
    print("\n" + text + f"\nwritten: {results}, {stem}.png, {stem}.svg")
    return 0 if all("error" not in row for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
