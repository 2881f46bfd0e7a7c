"""Help, argument errors and unknown model names are answered before torch is imported; the light
constants in ``hap.settings`` agree with the modules that do the work."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hap import settings
from hap.attribution import Method
from hap.discovery import DiscoverConfig
from hap.errors import ModelNotFoundError
from hap.models.loading import BUILT_IN_MODELS
from hap.report.export import EXPORTERS

HEAVY = ("torch", "transformers", "matplotlib")


def _imports_after(code: str) -> list[str]:
    """The heavy modules a fresh interpreter has imported after running ``code``."""
    probe = f"import sys\n{code}\nprint('HEAVY:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    marked = [line for line in result.stdout.splitlines() if line.startswith("HEAVY:")]
    assert marked, result.stderr
    return [name for name in marked[-1].removeprefix("HEAVY:").split(",") if name]


def test_the_cli_and_its_help_import_nothing_heavy():
    assert _imports_after("import hap.cli") == []
    assert _imports_after("from hap.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass") == []
    assert _imports_after("from hap.cli import main\ntry:\n    main(['discover', '--method', 'nope'])\n"
                          "except SystemExit:\n    pass") == []


def test_an_unknown_name_offline_is_refused_before_torch_with_the_closest_name():
    code = ("from hap.cli import main\nimport contextlib, io\nerr = io.StringIO()\n"
            "with contextlib.redirect_stderr(err):\n    code = main(['verify', '--model', 'smollm2-13m'])\n"
            "print(code, err.getvalue().strip())")
    result = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint('torch' in sys.modules)"],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    first, torch_loaded = result.stdout.strip().splitlines()
    assert first.startswith("2 hap: error: unknown model 'smollm2-13m'") and "did you mean 'smollm2-135m'" in first
    assert torch_loaded == "False"


def test_check_model_name_accepts_what_can_load(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in (*settings.built_in_models(), str(tmp_path)):
        settings.check_model_name(name)  # no error
    with pytest.raises(ModelNotFoundError, match="hub unreachable"):
        settings.check_model_name("someone/not-cached-model")
    cache = tmp_path / "hub"
    (cache / "models--someone--cached-model" / "snapshots").mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    settings.check_model_name("someone/cached-model")  # in the cache: left to the loader


def test_light_constants_agree_with_the_modules_that_do_the_work():
    assert settings.ATTRIBUTION_METHODS == tuple(method.value for method in Method)
    config = DiscoverConfig(out="x")
    assert (config.method, config.n_test, config.batch_size, config.steps, config.attribution_examples,
            config.monitor_examples, config.reference_memory, config.test_fraction) == (
        settings.DEFAULT_METHOD, settings.DEFAULT_N_TEST, settings.DEFAULT_BATCH_SIZE, settings.DEFAULT_STEPS,
        settings.DEFAULT_ATTRIBUTION_EXAMPLES, settings.DEFAULT_MONITOR_EXAMPLES,
        settings.DEFAULT_REFERENCE_MEMORY_GIB, settings.DEFAULT_TEST_FRACTION)
    from hap.report.commands import EXPORT_FORMATS

    assert EXPORT_FORMATS == tuple(sorted(EXPORTERS))
    assert BUILT_IN_MODELS == settings.built_in_models()
