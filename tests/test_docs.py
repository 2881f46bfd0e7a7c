"""The documentation holds true: the tutorials' commands run, every other command parses, the site renders.

Tutorials (``docs/tutorials/*.md``) hold the real commands, for the real model and budget. This test
derives a tiny run from each one mechanically and runs every ```` ```sh ```` block of the page in order,
in one fresh directory:

* ``--model smollm2-135m`` or a hub id becomes ``tiny-llama`` (the tiny models and a local directory the
  page made stay); ``--device cuda*`` becomes ``cpu``;
* ``discover``'s budget flags (``BUDGET_FLAGS``) become ``TINY_BUDGET``; re-scoring commands lose
  ``--n-examples`` (they re-score the recorded split); every command that checks the full model gets
  ``--allow-weak-model`` (the tiny models have random weights);
* ``torchrun LAUNCHER -m hap ARGS``: the launcher's flags go through torch's own parser, ``hap ARGS``
  runs as one process (the slow test below runs the CPU ones under torchrun for real);
* ``hf download REPO --local-dir DIR`` writes a tiny Llama checkpoint to DIR with ``save_pretrained``;
* a code block with ``title="FILE"`` is written to FILE; ``python FILE``, ``head``, ``cat`` and ``ls`` run
  as written; any other command fails the test;
* afterwards, every ``runs/...`` file the page names in backticks must exist.

``hap`` runs in this process (``hap.cli.main``), so torch is imported once. Every ``hap`` command in the
other pages and in README.md is parsed by the real argument parser. The slow test builds the site and
opens it in headless Chromium.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import http.server
import io
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
TUTORIALS = sorted((DOCS / "tutorials").glob("*.md"))
PAGES = sorted(DOCS.rglob("*.md"))

TINY_MODEL = "tiny-llama"
KEPT_MODELS = ("tiny-llama", "tiny-gpt2")
BUDGET_FLAGS = ("--steps", "--n-examples", "--n-test", "--batch-size", "--attribution-examples",
                "--monitor-examples", "--explain-examples")
TINY_BUDGET = ["--steps", "4", "--n-examples", "8", "--n-test", "8"]
CHECKS_FULL_MODEL = ("discover", "evaluate", "curve", "explain")
RESCORES = ("evaluate", "curve", "explain")
PLAIN_COMMANDS = ("head", "cat", "ls")
NAMED_FILE = re.compile(r"`(runs/[^`\s]+\.(?:json|jsonl|html|svg|png|dot|pt))`")


# -- reading the pages ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    """A fenced code block: its language, its ``title="..."`` if any, its text and its first line."""

    language: str
    title: str | None
    text: str
    line: int


FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")


def fenced_blocks(text: str) -> list[Block]:
    blocks, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, info = opening["fence"], opening["info"].strip()
        language = info.split()[0] if info else ""
        title = re.search(r'title="([^"]+)"', info)
        body, j = [], i + 1
        while j < len(lines) and not re.match(rf"^ {{0,3}}{fence[0]}{{{len(fence)},}}\s*$", lines[j]):
            body.append(lines[j])
            j += 1
        blocks.append(Block(language, title[1] if title else None, "\n".join(body) + "\n", i + 1))
        i = j + 1
    return blocks


def commands(block: Block) -> list[list[str]]:
    """The commands of a shell block: continuation lines joined, comments dropped, split as a shell would."""
    text = re.sub(r"\\\n", " ", block.text)
    return [words for line in text.split("\n") if (words := shlex.split(line, comments=True))]


def shell_blocks(path: Path) -> list[Block]:
    return [b for b in fenced_blocks(path.read_text(encoding="utf-8")) if b.language in ("sh", "bash", "shell")]


def _hap_argv(words: list[str]) -> tuple[list[str] | None, list[str]]:
    """(the launcher's arguments or None, hap's arguments) of a command that runs hap, or (None, [])."""
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value before the program
        words = words[1:]
    if not words:
        return None, []
    program = Path(words[0]).name
    if program == "hap":
        return None, words[1:]
    if program == "torchrun":
        return words[1:], _torchrun_parse(words[1:]).training_script_args
    return None, []


def _torchrun_parse(launcher_and_script: list[str]):
    """torchrun's own parser; the script must be ``-m hap``."""
    from torch.distributed.run import get_args_parser

    parsed = get_args_parser().parse_args(launcher_and_script)
    assert parsed.module and parsed.training_script == "hap", f"torchrun must run -m hap: {launcher_and_script}"
    return parsed


def _parse_hap(argv: list[str], where: str) -> None:
    from hap.cli import build_parser

    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        try:
            build_parser().parse_args(argv)
        except SystemExit as exit_:
            if exit_.code:
                pytest.fail(f"{where}: `hap {shlex.join(argv)}` does not parse: {errors.getvalue().strip()}")


# -- every command parses ---------------------------------------------------------------------------------
def _all_commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in [ROOT / "README.md", *PAGES]:
        for block in shell_blocks(path):
            for words in commands(block):
                found.append((f"{path.relative_to(ROOT)}:{block.line}", words))
    return found


def test_every_documented_hap_command_parses():
    checked = 0
    for where, words in _all_commands():
        launcher, argv = _hap_argv(words)
        if argv:
            _parse_hap(argv, where)
            checked += 1
    assert checked >= 30, f"only {checked} hap commands found in README.md and docs/: is the parser of this test broken?"


def test_commands_outside_sh_blocks_are_not_hidden_from_these_tests():
    """A `hap` command in a tutorial's text block would be untested: commands go in ```sh blocks."""
    for path in TUTORIALS:
        for block in fenced_blocks(path.read_text(encoding="utf-8")):
            if block.language in ("sh", "bash", "shell", "python", "json", ""):
                continue
            for line in block.text.split("\n"):
                assert not re.match(r"^\s*(\$ )?(hap|torchrun) ", line), \
                    f"{path.name}:{block.line}: a command in a ```{block.language} block; put it in a ```sh block"


def test_readme_shows_the_command_make_demo_runs():
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^demo:.*\n\t(.+)$", makefile, re.M)[1]
    demo = [word for word in shlex.split(recipe)[1:] if word != "--force"]  # after $(VENV)/bin/hap
    readme = [_hap_argv(words)[1] for where, words in _all_commands() if where.startswith("README")]
    assert demo in readme, f"README.md should show `hap {shlex.join(demo)}`, what make demo runs"
    assert len((ROOT / "README.md").read_bytes()) <= 10 * 1024, "README.md is over 10 KB: move detail into docs/"


def test_the_python_api_example_uses_names_hap_exports():
    import hap

    used = set()
    for block in fenced_blocks((DOCS / "reference" / "api.md").read_text()):
        if block.language == "python":
            for node in ast.walk(ast.parse(block.text)):
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "hap":
                    used.add(node.attr)
    assert used and used <= set(hap.__all__), f"not exported by hap: {sorted(used - set(hap.__all__))}"


# -- the tutorials run --------------------------------------------------------------------------------------
def _tiny_model_dir(directory: Path) -> None:
    """What `hf download ... --local-dir DIR` gives, for a tiny model: a save_pretrained checkpoint."""
    from hap.models.tiny import build_tiny_model

    model, tokenizer = build_tiny_model(TINY_MODEL)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def tiny(argv: list[str], cwd: Path) -> list[str]:
    """hap's arguments as the tutorial wrote them -> the same command on a tiny model and budget."""
    command, out, i = argv[0], [argv[0]], 1
    resuming = "--resume" in argv
    while i < len(argv):
        word = argv[i]
        value = argv[i + 1] if i + 1 < len(argv) else None
        if word == "--model" and value is not None:
            local = (cwd / value).exists()
            out += [word, value if value in KEPT_MODELS or local else TINY_MODEL]
            i += 2
        elif word == "--device" and value is not None:
            out += [word, "cpu"]
            i += 2
        elif (command == "discover" and word in BUDGET_FLAGS) or (command in RESCORES and word == "--n-examples"):
            i += 2
        else:
            out.append(word)
            i += 1
    if command == "discover" and not resuming:
        out += TINY_BUDGET
    if command in CHECKS_FULL_MODEL and not resuming and "--allow-weak-model" not in out:
        out.append("--allow-weak-model")
    return out


def _run_hap(argv: list[str], where: str) -> None:
    from hap.cli import main

    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        code = main(argv)
    assert code == 0, f"{where}: `hap {shlex.join(argv)}` exited {code}: {errors.getvalue()[-2000:]}"


def run_tutorial(path: Path, cwd: Path) -> int:
    """Run every command of the page in ``cwd``; returns how many ran."""
    ran = 0
    for block in fenced_blocks(path.read_text(encoding="utf-8")):
        where = f"{path.name}:{block.line}"
        if block.title:
            (cwd / block.title).parent.mkdir(parents=True, exist_ok=True)
            (cwd / block.title).write_text(block.text, encoding="utf-8")
        if block.language not in ("sh", "bash", "shell"):
            continue
        for words in commands(block):
            launcher, argv = _hap_argv(words)
            if argv:
                _run_hap(tiny(argv, cwd), where)
            elif words[:2] == ["hf", "download"] and "--local-dir" in words:
                _tiny_model_dir(cwd / words[words.index("--local-dir") + 1])
            elif words[0] == "python" and len(words) == 2:
                subprocess.run([sys.executable, words[1]], cwd=cwd, check=True, timeout=60)
            elif words[0] in PLAIN_COMMANDS:
                subprocess.run(words, cwd=cwd, check=True, capture_output=True, timeout=60)
            else:
                pytest.fail(f"{where}: this test does not know how to run `{shlex.join(words)}`")
            ran += 1
    return ran


@pytest.fixture(autouse=False)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


@pytest.mark.parametrize("page", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs_on_a_tiny_model(page, in_tmp):
    assert run_tutorial(page, in_tmp) >= 2
    named = set(NAMED_FILE.findall(page.read_text(encoding="utf-8")))
    missing = sorted(name for name in named if not (in_tmp / name).exists())
    assert not missing, f"{page.name} names files its commands did not write: {missing}"


def test_tiny_rewrites_models_budgets_and_devices(tmp_path):
    (tmp_path / "models" / "mine").mkdir(parents=True)
    assert tiny(["discover", "--model", "smollm2-135m", "--steps", "1000", "--device", "cuda:1", "--out", "r"],
                tmp_path) == ["discover", "--model", TINY_MODEL, "--device", "cpu", "--out", "r", *TINY_BUDGET,
                              "--allow-weak-model"]
    assert tiny(["verify", "--model", "Qwen/Qwen2.5-7B-Instruct"], tmp_path) == ["verify", "--model", TINY_MODEL]
    assert tiny(["verify", "--model", "models/mine"], tmp_path) == ["verify", "--model", "models/mine"]
    assert tiny(["evaluate", "runs/x", "--n-examples", "500"], tmp_path) == ["evaluate", "runs/x",
                                                                               "--allow-weak-model"]
    assert tiny(["discover", "--resume", "runs/x"], tmp_path) == ["discover", "--resume", "runs/x"]


def test_a_wrong_tutorial_command_fails(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    page = tmp_path / "wrong.md"
    page.write_text("```sh\nhap discover --model smollm2-135m --methd hap --out runs/x\n```\n")
    with pytest.raises(BaseException):
        run_tutorial(page, tmp_path)
    page.write_text("```sh\nhap evaluate runs/never-made\n```\n")
    with pytest.raises(AssertionError, match="exited 2"):
        run_tutorial(page, tmp_path)
    page.write_text("```sh\nrm -rf runs\n```\n")
    with pytest.raises(pytest.fail.Exception, match="does not know"):
        run_tutorial(page, tmp_path)


# -- slow: torchrun for real, and the site in a browser -------------------------------------------------------
@pytest.mark.slow
def test_cpu_torchrun_commands_of_the_tutorials_run_under_torchrun(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    ran = 0
    for page in TUTORIALS:
        for block in shell_blocks(page):
            for words in commands(block):
                launcher, argv = _hap_argv(words)
                if launcher is None or "cpu" not in argv:
                    continue
                script = launcher[: launcher.index("-m")]
                env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
                result = subprocess.run([str(torchrun), *script, "-m", "hap", *tiny(argv, tmp_path)], cwd=tmp_path,
                                        capture_output=True, text=True, env=env, timeout=600)
                assert result.returncode == 0, result.stderr[-3000:]
                ran += 1
    assert ran >= 1


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_site_renders_in_headless_chromium(tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium: `make browser` (as root) installs the Debian package")
    mkdocs = Path(sys.executable).with_name("mkdocs")
    if not mkdocs.exists():
        pytest.skip("mkdocs is not installed: `make docs` installs the docs extra")
    site = tmp_path / "site"
    build = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                           capture_output=True, text=True, timeout=600,
                           env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert build.returncode == 0, build.stderr[-3000:]

    requests: list[tuple[str, int]] = []  # every file the browser asked for, with the answer's status

    class Recording(http.server.SimpleHTTPRequestHandler):
        def log_request(self, code="-", size="-"):
            requests.append((self.path, int(getattr(code, "value", code))))

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", _free_port()),
                                             functools.partial(Recording, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        pages = {"index.html": ["hap-circuits", "The methods", "Install and first run"],
                 "tutorials/ioi-circuit.html": ["Find and read the IOI circuit of SmolLM2", "Find the circuit",
                                                "Read the summary", "report.png"]}
        for page, texts in pages.items():
            url = f"http://127.0.0.1:{server.server_port}/{page}"
            flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run",
                     f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
                     "--virtual-time-budget=5000"]
            result = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=180)
            dom = result.stdout
            for text in texts:
                assert text in dom, f"{page}: {text!r} missing from the rendered page"
            assert 'class="md-nav' in dom and "md-search" in dom, f"{page}: Material's navigation did not render"
            console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
            assert not console, f"{page}: console messages (a script failed?): {console[:5]}"
            missing = [(path, status) for path, status in requests if status >= 400 and path != "/favicon.ico"]
            assert not missing, f"{page}: assets the page asked for and did not get: {missing[:5]}"
            assert any(path.endswith(".css") for path, _ in requests) and \
                any(path.endswith(".js") for path, _ in requests), f"{page}: no stylesheet or script was loaded"
            for src in re.findall(r'<img[^>]+src="([^"]+)"', dom):  # every image the page shows is in the site
                assert (site / Path(page).parent / src).resolve().is_file(), f"{page}: image {src} missing"
            requests.clear()
    finally:
        server.shutdown()
