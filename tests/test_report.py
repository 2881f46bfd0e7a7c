"""Reports: the circuit drawing, HTML report (also in a real browser), comparison, MIB and DOT exports.

Circuits here are built without weights on real model shapes (SmolLM2-135M:
30 layers, 9 heads, 3 key/value heads; GPT-2 small: 12 x 12).
"""

import json
import math
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from itertools import combinations
from pathlib import Path

import pytest
import torch

from hap.circuit import Circuit, Scores, generalisation_gap, prune_dangling
from hap.cli import main
from hap.graph import Graph
from hap.models.adapter import Layout
from hap.report import (IncomparableRunsError, MibFormatError, compare_runs, draw_circuit, jaccard, load_mib,
                        read_train_log, to_dot, to_mib, write_mib, write_report)
from hap.report.compare import kept_components, kept_edges, load_runs
from hap.report.svg import DrawingStyle

SMOLLM2 = Layout(family="llama", n_layers=30, n_heads=9, n_kv_heads=3, d_model=576, head_dim=64, vocab_size=49152)
GPT2 = Layout(family="gpt2", n_layers=12, n_heads=12, n_kv_heads=12, d_model=768, head_dim=64, vocab_size=50257)
# Smaller shapes where loading circuit.json (70,651 edges for SmolLM2) would only slow the test down.
SMALL_GQA = Layout(family="llama", n_layers=8, n_heads=6, n_kv_heads=2, d_model=64, head_dim=16, vocab_size=1000)
SMALL = Layout(family="gpt2", n_layers=9, n_heads=10, n_kv_heads=10, d_model=64, head_dim=16, vocab_size=1000)
SVG = "{http://www.w3.org/2000/svg}"
FRACTIONS = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]


def connected_circuit(layout: Layout, n_edges: int, n_nodes: int, seed: int = 0, **names) -> Circuit:
    """Exactly ``n_edges`` kept edges on ``n_nodes`` heads/MLPs, all on input->logits paths (so pruning keeps
    them all): each chosen node reads ``input`` and writes ``logits``; the rest are random edges among them."""
    generator = torch.Generator().manual_seed(seed)
    graph = Graph.from_layout(layout)
    feeds = graph.feeds()  # [R, S]
    chosen = 1 + torch.randperm(graph.n_sources - 1, generator=generator)[:n_nodes]
    member = torch.zeros(graph.n_sources, dtype=torch.bool)
    member[chosen] = True
    in_graph = torch.zeros(graph.real.shape, dtype=torch.bool)
    for source in chosen.tolist():
        in_graph[source, -1] = True
        in_graph[0, feeds[:, source].nonzero()[0, 0]] = True
    useful_reader = feeds[:, member].any(1)
    useful_reader[-1] = True
    writers = member.clone()
    writers[0] = True
    allowed = (graph.real & writers[:, None] & useful_reader[None] & ~in_graph).flatten().nonzero().flatten()
    extra = allowed[torch.randperm(len(allowed), generator=generator)[: n_edges - int(in_graph.sum())]]
    in_graph.view(-1)[extra] = True
    assert int(in_graph.sum()) == n_edges and torch.equal(prune_dangling(graph, in_graph), in_graph)
    scores = torch.randn(graph.real.shape, generator=generator) * graph.real
    scores[in_graph] *= 3
    return Circuit(names.get("model", "smollm2-135m"), names.get("task", "ioi"), names.get("method", "hap"),
                   layout, scores, in_graph)


def kept_edge_names(circuit: Circuit) -> set[str]:
    graph = circuit.graph()
    s, r = graph.in_graph.nonzero(as_tuple=True)
    return {f"{graph.source_names[i]}->{graph.reader_names[j]}" for i, j in zip(s.tolist(), r.tolist())}


def write_run(folder: Path, circuit: Circuit, full_metrics: bool = True, train_log: bool = True) -> Path:
    """A run directory as ``hap discover`` leaves it: circuit.json with metrics, curve, runtimes, settings."""
    folder.mkdir(parents=True, exist_ok=True)
    if full_metrics:
        signed = [min(1.0, 0.15 + 8 * k) for k in FRACTIONS]
        test = {"kl": 0.19, "logit_diff": 3.0, "accuracy": 0.76, "faithfulness": 0.88, "n_examples": 200,
                "full_model": {"logit_diff": 3.35, "accuracy": 0.8, "kl": 0.0},
                "empty_circuit": {"logit_diff": 0.4, "accuracy": 0.3, "kl": 2.1}}
        train = {**test, "kl": 0.11, "faithfulness": 0.93, "logit_diff": 3.3}
        circuit.metrics = {
            "test": test, "train": train, "gap": generalisation_gap(test, train),
            "curve": {"fractions": FRACTIONS, "faithfulness_signed": signed, "split": "test",
                      "faithfulness_abs": [min(1.0, 0.3 + 6 * k) for k in FRACTIONS], "cpr": 0.97, "cmd": 0.04}}
        circuit.splits = {
            "train": {"task": "ioi", "split": "train", "n_examples": 512, "seed": 0,
                      "vocabulary": {"templates": ["t"] * 24, "names": ["n"] * 63}},
            "test": {"task": "ioi", "split": "test", "n_examples": 200, "seed": 1,
                     "vocabulary": {"templates": ["u"] * 8, "names": ["m"] * 21}}}
    circuit.runtime_s = {"attribution": 12.5, "pruning": 1579.3, "evaluation": 38.0}
    circuit.config = {"seed": 0, "target_sparsity": 0.997, "lr": 0.8, "warm_start": {"tau": 0.2},
                      "command": f"hap discover --method {circuit.method} --out {folder}"}
    circuit.save(folder / "circuit.json")
    if train_log:
        lines = [json.dumps({"step": step, "loss": 2 / (1 + step), "kl": 1 / (1 + step),
                             "expected_sparsity": step / 100, "target_sparsity": step / 110,
                             "lambda1": step / 50, "lambda2": step / 70, "lr": 0.8})
                 for step in range(0, 101, 10)]
        (folder / "train_log.jsonl").write_text("\n".join(lines) + '\n{"step": 11')  # killed mid-line
    return folder


# -- the drawing ---------------------------------------------------------------------------------------------
def _label_box(text: ET.Element, style: DrawingStyle) -> tuple[float, float, float, float]:
    width = len(text.text) * style.char_width * style.font_size
    x, y = float(text.get("x")), float(text.get("y"))
    return x - width / 2, y - style.font_size, x + width / 2, y  # text-anchor middle, y is the baseline


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.parametrize("n_edges, n_nodes", [(50, 14), (500, 120)])
def test_svg_draws_every_kept_node_and_edge_without_overlapping_labels(n_edges, n_nodes):
    circuit = connected_circuit(SMOLLM2, n_edges, n_nodes)
    root = ET.fromstring(draw_circuit(circuit, max_edges=None))
    nodes = [g for g in root.iter(f"{SVG}g") if g.get("class") == "node"]
    edges = [p for p in root.iter(f"{SVG}path") if p.get("class") == "edge"]
    kept_nodes = {name for name, kept in circuit.node_in_graph().items() if kept} | {"input"}
    assert len(edges) == circuit.n_edges == n_edges
    assert {p.get("data-edge") for p in edges} == kept_edge_names(circuit)
    assert len(nodes) == len(kept_nodes) == n_nodes + 2
    assert {g.get("data-node") for g in nodes} == kept_nodes

    style = DrawingStyle()
    labelled = [g for g in root.iter(f"{SVG}g") if g.get("class") in ("node", "kv")]
    boxes = {}
    for g in labelled:
        rect, text = g.find(f"{SVG}rect"), g.find(f"{SVG}text")
        label = _label_box(text, style)
        box = tuple(float(rect.get(k)) for k in ("x", "y", "width", "height"))
        assert box[0] <= label[0] and label[2] <= box[0] + box[2], f"label {text.text} wider than its box"
        boxes[g.get("data-node")] = (box[0], box[1], box[0] + box[2], box[1] + box[3])
    for (a, box_a), (b, box_b) in combinations(boxes.items(), 2):
        assert not _overlap(box_a, box_b), f"{a} and {b} overlap"

    # every edge leaves the top of its source and ends on the bottom of its reader's box, going up
    for path in edges:
        x1, y1, *_, x2, y2 = map(float, re.findall(r"-?\d+(?:\.\d+)?", path.get("d")))
        source, target = boxes[path.get("data-source")], boxes[path.get("data-target")]
        assert source[0] <= x1 <= source[2] and y1 == pytest.approx(source[1], abs=0.06)
        assert target[0] <= x2 <= target[2] and y2 == pytest.approx(target[3], abs=0.06)
        assert y2 < y1


def test_svg_tells_q_k_v_and_sign_apart_and_omits_unused_nodes():
    circuit = connected_circuit(GPT2, 80, 20, model="gpt2")
    root = ET.fromstring(draw_circuit(circuit))
    edges = [p for p in root.iter(f"{SVG}path") if p.get("class") == "edge"]
    dashes = {p.get("data-port"): p.get("stroke-dasharray") for p in edges}
    assert {"q", "k", "v"} <= set(dashes) and len({dashes["q"], dashes["k"], dashes["v"]}) == 3
    colours = {float(re.search(r"score (\S+)", p.find(f"{SVG}title").text).group(1)) > 0: p.get("stroke")
               for p in edges}
    assert colours[True] != colours[False]
    widths = {abs(float(re.search(r"score (\S+)", p.find(f"{SVG}title").text).group(1))): float(p.get("stroke-width"))
              for p in edges}
    ordered = [widths[k] for k in sorted(widths)]
    assert ordered == sorted(ordered) and ordered[0] < ordered[-1]
    assert not [g for g in root.iter(f"{SVG}g") if g.get("class") == "kv"]  # no GQA in GPT-2
    drawn = {g.get("data-node") for g in root.iter(f"{SVG}g") if g.get("class") == "node"}
    assert "a0.h0" not in drawn or circuit.node_in_graph()["a0.h0"]
    assert "legend" in {t.get("class") for t in root.iter(f"{SVG}text")}


def test_svg_caps_the_drawing_and_draws_an_empty_circuit():
    circuit = connected_circuit(SMOLLM2, 300, 60)
    root = ET.fromstring(draw_circuit(circuit, max_edges=100))
    assert len([p for p in root.iter(f"{SVG}path") if p.get("class") == "edge"]) == 100
    empty = Circuit("smollm2-135m", "ioi", "eap", SMOLLM2, torch.zeros(circuit.scores.shape),
                    torch.zeros(circuit.in_graph.shape, dtype=torch.bool))
    root = ET.fromstring(draw_circuit(empty))
    assert not [g for g in root.iter(f"{SVG}g") if g.get("class") in ("node", "edge")]
    assert "no kept edges" in ET.tostring(root, encoding="unicode")


# -- the report page -----------------------------------------------------------------------------------------
class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.external, self.tables = set(), [], 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.ids.add(attrs.get("id"))
        self.tables += tag == "table"
        for key in ("src", "href"):
            if attrs.get(key) and not attrs[key].startswith(("data:", "#")):
                self.external.append(attrs[key])


def test_report_is_one_self_contained_file_with_everything(tmp_path):
    circuit = connected_circuit(SMALL_GQA, 120, 30)
    run = write_run(tmp_path / "demo", circuit)
    path = write_report(run)
    assert path == run / "report.html"
    for name in ("circuit.svg", "faithfulness.png", "faithfulness.svg", "training.png", "training.svg"):
        assert (run / name).stat().st_size > 1000, name
    assert (run / "faithfulness.png").read_bytes().startswith(b"\x89PNG")
    ET.parse(run / "circuit.svg")
    html = path.read_text()
    page = _Page()
    page.feed(html)
    assert page.external == []
    assert not re.search(r"(?:src|href)=[\"']?(?:https?:)?//", html)
    assert {"metrics", "summary", "runtime", "circuit", "edges", "nodes", "settings", "command"} <= page.ids
    assert html.count("data:image/png;base64,") == 2  # faithfulness and training curves
    assert html.count('class="edge"') == 120
    assert "hap discover --method hap" in html and "target_sparsity" in html and "warm_start" in html
    assert "full model (all edges)" in html and "empty circuit (no edges)" in html
    assert "CPR" in html and "0.97" in html and "26 min 19 s" in html
    # Held-out numbers lead; in-sample ones follow, labelled, with the gap.
    assert {"metrics-train", "gap"} <= page.ids
    assert html.index('id="metrics"') < html.index('id="metrics-train"') < html.index('id="gap"')
    assert "8 templates, 21 names held out of training" in html and "In-sample" in html
    assert "-0.05" in html  # faithfulness gap 0.88 - 0.93


def test_report_copes_with_missing_metrics_and_logs(tmp_path):
    circuit = connected_circuit(SMALL_GQA, 40, 10, method="ep")
    run = write_run(tmp_path / "bare", circuit, full_metrics=False, train_log=False)
    document = json.loads((run / "circuit.json").read_text())
    document["metrics"], document["config"] = {"test": {"kl": 0.3, "full_model": {"accuracy": 0.8}}}, {}
    (run / "circuit.json").write_text(json.dumps(document))
    html = write_report(run / "circuit.json", out=tmp_path / "elsewhere" / "r.html").read_text()
    metrics = html[html.index('id="metrics"'):html.index("</table>", html.index('id="metrics"'))]
    assert metrics.count("n/a") == 8  # 3 rows x 4 metrics, minus kl, full accuracy and the two definitional f
    assert "did not record its command" in html and "No faithfulness curve" in html
    assert "No train_log.jsonl" in html
    assert (tmp_path / "elsewhere" / "circuit.svg").is_file()


def test_a_format_1_file_is_read_with_its_metrics_labelled_in_sample(tmp_path):
    circuit = connected_circuit(SMALL_GQA, 40, 10, method="hap")
    run = write_run(tmp_path / "old", circuit, full_metrics=False, train_log=False)
    document = json.loads((run / "circuit.json").read_text())
    document["format"] = "hap-circuit/1"
    del document["splits"]
    document["metrics"] = {"kl": 0.3, "logit_diff": 2.0, "accuracy": 0.9, "faithfulness": 0.7, "n_examples": 32,
                           "curve": {"fractions": FRACTIONS, "faithfulness_signed": FRACTIONS,
                                     "faithfulness_abs": FRACTIONS, "cpr": 0.5, "cmd": 0.5}}
    (run / "circuit.json").write_text(json.dumps(document))
    loaded = Circuit.load(run)
    assert loaded.held_out == {} and loaded.splits == {}
    assert loaded.metrics["train"]["faithfulness"] == 0.7 and loaded.metrics["curve"]["cpr"] == 0.5
    html = write_report(run).read_text()
    assert "no held-out metrics" in html and 'id="metrics-train"' in html
    loaded.save(run / "again.json")  # saved again, it is a format-2 file with the same metrics
    again = json.loads((run / "again.json").read_text())
    assert again["format"] == "hap-circuit/4" and again["metrics"] == loaded.metrics


def test_train_log_skips_a_truncated_last_line_only(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 0, "loss": 1}\n\n{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    assert [r["step"] for r in read_train_log(log)] == [0, 1]
    log.write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(Exception, match=r"train_log.jsonl:2"):
        read_train_log(log)


# -- comparison ----------------------------------------------------------------------------------------------
def _with_edges(base: Circuit, names: list[str], method: str) -> Circuit:
    graph = Graph.from_layout(base.layout)
    in_graph = torch.zeros(graph.real.shape, dtype=torch.bool)
    for name in names:
        in_graph[graph.edge_index(name)] = True
    return Circuit(base.model, base.task, method, base.layout, base.scores.clone(), in_graph)


def test_compare_gives_the_jaccard_of_a_known_overlap(tmp_path):
    base = connected_circuit(SMALL, 10, 3, model="gpt2")
    a_edges = ["input->a0.h0<q>", "a0.h0->logits", "input->a7.h3<q>", "a7.h3->logits", "input->m2", "m2->logits"]
    b_edges = ["input->a0.h0<q>", "a0.h0->logits", "input->a7.h9<k>", "a7.h9->logits", "input->m2", "m2->logits",
               "input->a8.h6<v>", "a8.h6->logits"]
    a, b = _with_edges(base, a_edges, "eap"), _with_edges(base, b_edges, "hap")
    assert jaccard(kept_edges(a), kept_edges(b)) == pytest.approx(4 / 10)
    assert kept_components(a) == {"a0.h0", "a7.h3", "m2"}
    assert jaccard(kept_components(a), kept_components(b)) == pytest.approx(2 / 5)
    write_run(tmp_path / "eap", a)
    write_run(tmp_path / "hap", b, full_metrics=False)
    out = compare_runs([tmp_path / "eap", tmp_path / "hap"], tmp_path / "compare.html")
    html = out.read_text()
    page = _Page()
    page.feed(html)
    assert page.external == [] and {"metrics", "edge-jaccard", "node-jaccard", "differences"} <= page.ids
    edge_matrix = html[html.index('id="edge-jaccard"'):]
    assert 'data-v="0.4"' in edge_matrix[:edge_matrix.index("</table>")]
    pairwise = html[html.index('id="pairwise"'):]
    assert "<b>eap</b> keeps, <b>hap</b> drops (1 heads): <code>a7.h3</code>" in pairwise
    assert "<b>hap</b> keeps, <b>eap</b> drops (2 heads): <code>a7.h9, a8.h6</code>" in pairwise
    assert [run.label for run in load_runs([tmp_path / "eap", tmp_path / "eap"])] == ["eap #1", "eap #2"]


def test_compare_refuses_runs_of_different_models_or_tasks(tmp_path, capsys):
    write_run(tmp_path / "a", connected_circuit(SMALL_GQA, 30, 8), full_metrics=False, train_log=False)
    write_run(tmp_path / "b", connected_circuit(SMALL_GQA, 30, 8, task="greater-than"), full_metrics=False,
              train_log=False)
    write_run(tmp_path / "c", connected_circuit(SMALL, 30, 8, model="gpt2"), full_metrics=False, train_log=False)
    with pytest.raises(IncomparableRunsError, match="different tasks"):
        compare_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "x.html")
    with pytest.raises(IncomparableRunsError, match="at least two"):
        compare_runs([tmp_path / "a"], tmp_path / "x.html")
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(tmp_path / "x.html")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different models" in err and "Traceback" not in err
    assert not (tmp_path / "x.html").exists()


# -- exports -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout, model", [(GPT2, "gpt2"), (SMALL_GQA, "small-llama")])
def test_mib_export_round_trips_and_uses_eap_ig_names(tmp_path, layout, model):
    circuit = connected_circuit(layout, 200, 40, model=model)
    if layout is GPT2:  # (loading a GPT-2-sized circuit.json is slow; the CLI is exercised on the small one)
        circuit.config, circuit.metrics, circuit.runtime_s = {"seed": 1}, {"kl": 0.2}, {"attribution": 3.0}
        write_mib(circuit, tmp_path / "importances.json")
    else:
        run = write_run(tmp_path / "run", circuit, full_metrics=True, train_log=False)
        assert main(["export", str(run), "--format", "mib", "--out", str(tmp_path / "importances.json")]) == 0
    document = json.loads((tmp_path / "importances.json").read_text())
    assert {"cfg", "nodes", "edges"} <= set(document)
    assert document["cfg"]["n_layers"] == layout.n_layers and document["cfg"]["n_heads"] == layout.n_heads
    # EAP-IG names one k/v input per query head: its graph is ours without grouping.
    ungrouped = Graph.from_layout(Layout("x", layout.n_layers, layout.n_heads, layout.n_heads, 0, 0, 0))
    assert set(document["edges"]) == set(ungrouped.edge_names())
    if layout is GPT2:
        assert len(document["edges"]) == 32491
    edge = next(iter(document["edges"].values()))
    assert set(edge) == {"score", "in_graph"} and isinstance(edge["in_graph"], bool)
    assert sum(e["in_graph"] for e in document["edges"].values()) >= circuit.n_edges
    assert document["nodes"]["logits"] == {"in_graph": True}

    loaded = load_mib(tmp_path / "importances.json")
    assert (loaded.model, loaded.task, loaded.method, loaded.layout) == (model, "ioi", "hap", layout)
    assert torch.equal(loaded.in_graph, circuit.in_graph)
    assert torch.equal(loaded.scores, circuit.scores)  # GQA scores are split and summed back exactly
    assert (loaded.config, loaded.metrics, loaded.runtime_s) == (circuit.config, circuit.metrics, circuit.runtime_s)
    assert loaded.splits == circuit.splits


def test_mib_import_splits_nothing_it_cannot_place(tmp_path):
    circuit = connected_circuit(SMALL_GQA, 30, 8)
    document = to_mib(circuit)
    document["edges"]["a7.h0->a3.h1<q>"] = {"score": 1.0, "in_graph": True}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(document))
    with pytest.raises(MibFormatError, match="a7.h0->a3.h1<q>"):
        load_mib(path)
    path.write_text(json.dumps({"edges": {}}))
    with pytest.raises(MibFormatError, match="cfg, nodes, edges"):
        load_mib(path)
    eap_ig_file = to_mib(circuit)
    del eap_ig_file["metadata"]  # as EAP-IG writes it
    path.write_text(json.dumps(eap_ig_file))
    loaded = load_mib(path, model="smollm2-135m", task="ioi")
    assert loaded.method == "unknown" and torch.equal(loaded.in_graph, circuit.in_graph)
    assert write_mib(loaded, tmp_path / "again.json").is_file()


def test_dot_export_parses_and_names_every_kept_edge(tmp_path):
    circuit = connected_circuit(SMALL_GQA, 60, 15)
    run = write_run(tmp_path / "run", circuit, False, False)
    assert main(["export", str(run / "circuit.json"), "--format", "dot", "--out", str(tmp_path / "c.dot")]) == 0
    dot = (tmp_path / "c.dot").read_text()
    assert dot == to_dot(circuit)
    body = "\n".join(line for line in dot.splitlines() if not line.lstrip().startswith("//"))
    assert body.count("{") == body.count("}") and body.strip().startswith("digraph circuit {")
    statement = re.compile(r'^\s*"([^"]+)" -> "([^"]+)" \[(.*)\];$')
    edges = [statement.match(line) for line in body.splitlines() if " -> " in line]
    assert all(edges)
    circuit_edges = [m for m in edges if "id=" in m.group(3)]
    assert all('class="group"' in m.group(3) or 'class="layer"' in m.group(3) for m in edges if "id=" not in m.group(3))
    ids = [re.search(r'id="([^"]+)"', m.group(3)).group(1) for m in circuit_edges]
    assert len(ids) == circuit.n_edges and set(ids) == kept_edge_names(circuit)
    declared = set(re.findall(r'^\s*"([^"]+)" \[', body, flags=re.M))
    used = {name for m in edges for name in m.group(1, 2)}
    assert used <= declared
    if shutil.which("dot"):  # Graphviz itself, when installed
        subprocess.run(["dot", "-Tsvg", "-o", str(tmp_path / "c.svg"), str(tmp_path / "c.dot")], check=True)


def test_cli_report_writes_the_report(tmp_path, capsys):
    run = write_run(tmp_path / "demo", Scores("smollm2-135m", "ioi", "eap", SMALL_GQA,
                                             torch.randn(Graph.from_layout(SMALL_GQA).real.shape)).top(100))
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.html")
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no circuit file" in capsys.readouterr().err


# -- a real browser ------------------------------------------------------------------------------------------
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium: `make browser` (as root) installs the Debian package; the report browser test "
                    "is skipped")
    run = write_run(tmp_path / "demo", connected_circuit(SMOLLM2, 200, 45))
    url = write_report(run).resolve().as_uri()
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
    assert 'data-ready="1"' in dom  # the inline script ran to its end
    assert re.search(r'<svg[^>]*class="hap-circuit"', dom) and dom.count('class="edge"') == 200
    assert 'id="metrics"' in dom and "full model (all edges)" in dom
    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1400,2000", url], capture_output=True,
                   timeout=180, check=True)
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    assert image.size == (1400, 2000)
    small = image.resize((350, 500))
    colours = small.getcolors(maxcolors=350 * 500)
    assert len(colours) > 200, "the screenshot is nearly uniform: the page did not render"
    white = sum(count for count, rgb in colours if min(rgb) > 245)
    assert white < 0.97 * 350 * 500
    assert not math.isclose(max(count for count, _ in colours), 350 * 500)
