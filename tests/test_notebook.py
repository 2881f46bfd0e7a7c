"""The example notebook runs (on the tiny model, its parameters cell replaced), and circuits, explanations
and metrics render as HTML tables with their numbers, escaped."""

from __future__ import annotations

import os
from pathlib import Path

import nbclient  # the test extra's: runs the notebook in a Jupyter kernel
import nbformat
import pytest

import hap
from hap.circuit import generalisation_gap
from hap.display import circuit_html, explanation_html
from hap.explain import store_explanation

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "find_and_read_a_circuit.ipynb"
MAX_STORED_OUTPUT = 20_000  # characters of outputs the committed notebook may carry


def _tiny_parameters(out: Path) -> str:
    return (f'MODEL = "tiny-llama"\nN_TRAIN = 8\nN_TEST = 8\nSPARSITY = 0.95\nEXPLAIN_EXAMPLES = 4\n'
            f'ALLOW_WEAK_MODEL = True\nOUT = {str(out)!r}\n')


def test_the_notebook_runs_on_the_tiny_model(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    stored = sum(len(str(cell.get("outputs", ""))) for cell in notebook.cells if cell.cell_type == "code")
    assert stored < MAX_STORED_OUTPUT
    [parameters] = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert 'MODEL = "smollm2-135m"' in parameters.source  # the notebook's own run is on the default model
    parameters.source = _tiny_parameters(tmp_path / "run")
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    client = nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3", resources={
        "metadata": {"path": str(tmp_path)}})
    client.execute(env=environment)  # raises CellExecutionError on any cell's exception
    html = "".join(output.get("data", {}).get("text/html", "") for cell in notebook.cells
                   for output in cell.get("outputs", []))
    assert html.count('class="hap-circuit"') == 3  # before and after measuring, and explained
    assert 'class="hap-metrics"' in html and 'class="hap-explanation"' in html
    assert "test (held out)" in html and "faithfulness lost" in html
    saved = hap.Circuit.load(tmp_path / "run" / "circuit.json")
    assert saved.model == "tiny-llama" and saved.held_out and saved.importance is not None


@pytest.fixture(scope="module")
def explained(tiny_llama):
    """A tiny circuit measured held out and in-sample, with its explanation."""
    train_spec, test_spec = hap.task_splits("ioi", tiny_llama.tokenizer, n_train=8, n_test=8)
    train = hap.load_split(train_spec, tiny_llama.tokenizer)
    test = hap.load_split(test_spec, tiny_llama.tokenizer)
    circuit = hap.attribute(tiny_llama, train, method="eap").top(20)
    held_out, in_sample = hap.evaluate(tiny_llama, circuit, test), hap.evaluate(tiny_llama, circuit, train)
    circuit.metrics = {"test": held_out.to_dict(), "train": in_sample.to_dict(),
                       "gap": generalisation_gap(held_out.to_dict(), in_sample.to_dict())}
    circuit.splits = {"train": train_spec.to_dict(), "test": test_spec.to_dict()}
    explanation = hap.explain_circuit(tiny_llama, circuit, test.slice(0, 4))
    return circuit, held_out, explanation


def test_a_circuit_renders_its_size_and_held_out_metrics(explained):
    circuit, held_out, explanation = explained
    total = hap.Graph.from_layout(circuit.layout).n_edges
    html = circuit._repr_html_()
    assert "tiny-llama / ioi / eap" in html
    assert f"{circuit.n_edges:,} of {total:,} ({1 - circuit.n_edges / total:.2%} sparsity" in html
    assert "test (held out)" in html and "train (in-sample)" in html and "gap" in html
    assert f"<td>{held_out.faithfulness:.4f}</td>" in html and f"<td>{held_out.kl:.4f}</td>" in html
    assert "8 templates, 21 names held out of training" in html
    assert "needs most" not in html  # not explained yet
    store_explanation(circuit, explanation)
    html = circuit._repr_html_()
    first = explanation.nodes()[0]
    assert "needs most" in html and f"<td>{first.name}</td>" in html


def test_a_circuit_without_metrics_says_how_to_measure_them(explained):
    circuit = explained[0]
    bare = hap.Circuit(circuit.model, circuit.task, circuit.method, circuit.layout, circuit.scores,
                       circuit.in_graph)
    html = bare._repr_html_()
    assert "No held-out metrics yet" in html and "edges kept" in html and "test (held out)" not in html


def test_metrics_render_beside_the_full_model_and_the_empty_circuit(explained):
    held_out = explained[1]
    html = held_out._repr_html_()
    assert f"{held_out.n_edges:,} edges on {held_out.n_examples} examples" in html
    assert f"<td>accuracy</td><td>{held_out.accuracy:.4f}</td><td>{held_out.full_model['accuracy']:.4f}</td>" in html


def test_the_explanation_renders_its_roles_table(explained):
    explanation = explained[2]
    html = explanation._repr_html_()
    for header in ("rank", "node", "role", "faithfulness lost", "KL added", "direct effect", "evidence"):
        assert f"<th>{header}</th>" in html
    rows = html.count("<tr>") - 1  # less the header
    assert rows == min(20, len(explanation.nodes()))
    first = explanation.nodes()[0]
    assert (f"<td>1</td><td>{first.name}</td><td>{first.role.role if first.role else '-'}</td>"
            f"<td>{first.importance.faithfulness_drop:+.4f}</td>") in html
    assert "held-out test examples" in html and "The role rules" in html and "name mover" in html
    assert len(explanation_html(explanation, top=1).split("<tr>")) == 3  # header, one row
    assert "more nodes" in explanation_html(explanation, top=1)


def test_every_text_is_escaped(explained):
    circuit = explained[0]
    hostile = hap.Circuit("<script>alert(1)</script>", "a&b", "<i>", circuit.layout, circuit.scores,
                          circuit.in_graph, metrics=circuit.metrics)
    html = circuit_html(hostile)
    assert "<script>" not in html and "<i>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; / a&amp;b / &lt;i&gt;" in html
