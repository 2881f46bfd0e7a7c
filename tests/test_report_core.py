"""The report's core view: its data against the circuit's edges, and the page in a real browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from hap.attribution import attribute
from hap.errors import HapError
from hap.explain import explain_circuit, load_explanation, store_explanation
from hap.graph import Graph
from hap.report import write_report
from hap.report.core import core_data
from hap.tasks import ioi_task


def _explained(model, folder: Path, n_edges: int = 60):
    """A circuit of ``model`` with its explanation stored, written as a run directory."""
    scores = attribute(model, ioi_task(model.tokenizer, 8, seed=0), method="eap")
    circuit = scores.circuit(n_edges)
    store_explanation(circuit, explain_circuit(model, circuit, ioi_task(model.tokenizer, 8, seed=7), batch_size=4))
    folder.mkdir(parents=True, exist_ok=True)
    circuit.save(folder / "circuit.json")
    return circuit


def test_core_data_aggregates_every_kept_edge_between_its_nodes(tiny_llama, tmp_path):
    circuit = _explained(tiny_llama, tmp_path / "run")
    data = core_data(circuit, load_explanation(circuit))
    graph = Graph.from_model(tiny_llama)
    kept = circuit.in_graph & graph.real
    names = {node["name"] for node in data["nodes"]} | {"input", "logits"}
    per_group = tiny_llama.layout.heads_per_group
    expected: dict[tuple[str, str], int] = {}
    for source, reader in kept.nonzero().tolist():  # by hand: a group's k/v reader counts for each of its heads
        reader_name = graph.reader_names[reader]
        if reader_name == "logits":
            targets = ["logits"]
        elif ".g" in reader_name:
            layer, group = reader_name.split("<")[0].split(".g")
            targets = [f"{layer}.h{int(group) * per_group + i}" for i in range(per_group)]
        else:
            targets = [reader_name.split("<")[0]]
        for target in targets:
            if graph.source_names[source] in names and target in names:
                pair = (graph.source_names[source], target)
                expected[pair] = expected.get(pair, 0) + 1
    assert {(edge["source"], edge["target"]): edge["n"] for edge in data["edges"]} == expected
    assert [node["rank"] for node in data["nodes"]] == list(range(1, len(data["nodes"]) + 1))
    assert all(node["block"] == 2 * node["layer"] + (1 if node["kind"] == "head" else 2) for node in data["nodes"])
    assert data["has_roles"] and data["tokens"] and "END" in data["positions"]


def test_the_report_opens_on_the_core_or_says_how_to_get_it(tiny_gpt2, tmp_path):
    circuit = _explained(tiny_gpt2, tmp_path / "run")
    page = write_report(tmp_path / "run").read_text()
    assert page.index('id="core-data"') < page.index('id="circuit"')  # the core comes first
    assert '<details id="all-edges">' in page and 'id="core-table"' in page
    data = json.loads(re.search(r'<script type="application/json" id="core-data">(.*?)</script>', page).group(1))
    assert data["nodes"][0]["name"] == circuit.importance["nodes"][0]["name"]
    circuit.importance = circuit.evidence = circuit.roles = None
    (tmp_path / "bare").mkdir()
    circuit.save(tmp_path / "bare" / "circuit.json")
    bare = write_report(tmp_path / "bare").read_text()
    assert 'id="core-missing"' in bare and "hap explain" in bare and '<details id="all-edges" open>' in bare


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.slow
def test_core_view_renders_filters_and_shows_evidence_in_headless_chromium(tiny_gpt2, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium: `make browser` (as root) installs the Debian package")
    circuit = _explained(tiny_gpt2, tmp_path / "run", n_edges=80)
    url = write_report(tmp_path / "run").resolve().as_uri()
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom"]
    n_nodes = len(circuit.importance["nodes"])
    top = circuit.importance["nodes"][0]["name"]

    def dom(fragment: str = "") -> str:
        return subprocess.run([*flags, url + fragment], capture_output=True, text=True, timeout=180).stdout

    opened = dom()
    assert 'data-core-ready="1"' in opened and 'data-ready="1"' in opened
    drawn = len(re.findall(r'<g class="core-node', opened))
    assert drawn == min(30, n_nodes) and f'data-core-nodes="{min(30, n_nodes)}"' in opened
    assert opened.count('class="core-edge"') > 0
    assert opened.count('class="core-logits"') > 0  # the nodes that write to the logits are marked
    fewer = dom("#top=2")  # the slider, moved by the page's own input event
    assert len(re.findall(r'<g class="core-node', fewer)) == 2 and 'data-core-nodes="2"' in fewer
    assert "2 nodes: faithfulness lost" in fewer
    clicked = dom(f"#top=3&select={top}")  # a click on the most important node
    assert re.search(rf'<h3 id="core-selected">{re.escape(top)} ', clicked)
    assert 'id="core-evidence"' in clicked and "faithfulness lost" in clicked and 'class="tokens"' in clicked
    assert f'<g class="core-node selected" data-node="{top}"' in clicked


def test_compare_shows_which_heads_of_each_role_every_run_keeps(tiny_gpt2, tmp_path):
    from hap.report.compare import compare_runs, kept_components, read_roles

    small = _explained(tiny_gpt2, tmp_path / "small", n_edges=12)
    large = _explained(tiny_gpt2, tmp_path / "large", n_edges=80)
    kept_small, kept_large = kept_components(small), kept_components(large)
    movers = sorted(name for name in kept_large if name.startswith("a"))[:3]
    roles = {name: {"role": "name mover"} for name in movers}
    (tmp_path / "roles.json").write_text(json.dumps({"roles": roles}))
    assert read_roles(tmp_path / "roles.json") == roles
    page = compare_runs([tmp_path / "small", tmp_path / "large"], tmp_path / "compare.html",
                        read_roles(tmp_path / "roles.json")).read_text()
    section = page[page.index('id="roles-kept"'):]
    row = re.search(r"<tr><td>name mover</td>.*?</tr>", section).group(0)
    counts = re.findall(r">(\d+) of (\d+)<", row)
    assert counts == [(str(len(set(movers) & kept_small)), "3"), ("3", "3")]
    bare = compare_runs([tmp_path / "small", tmp_path / "large"], tmp_path / "bare.html").read_text()
    carried = [role["role"] for circuit in (small, large) for role in (circuit.roles or {}).values()]
    assert ("No head roles are known" in bare) == all(role == "unlabelled" for role in carried)
    with pytest.raises(HapError, match="no roles in it"):
        read_roles(_no_roles(tmp_path))


def _no_roles(tmp_path: Path) -> Path:
    path = tmp_path / "plain.json"
    path.write_text(json.dumps({"nodes": {"a0.h0": {"in_graph": True}}}))
    return path
