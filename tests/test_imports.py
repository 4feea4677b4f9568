"""The import contracts in pyproject.toml hold (no cycles, no Hydra in the library, the testbed a plug-in)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    assert lint.exists(), "lint-imports not found: pip install -e '.[dev]' (import-linter)"
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


@pytest.mark.slow  # a fresh interpreter importing torch and diffusers: 10-40 s on 2 busy cores
def test_the_generic_library_loads_without_the_testbed():
    """Importing every generic module, and scoring with the tiny model's builders, leaves the testbed unimported:
    it is loaded only when a registry is asked for it."""
    code = ("import sys; import benchmark.detectors.detection, benchmark.localization.evaluation, "
            "benchmark.mitigation.embedding, benchmark.data.prompt_files, benchmark.models.text_to_image; "
            "from benchmark.registry import DETECTORS, MODEL_BUILDERS; "
            "list(DETECTORS); MODEL_BUILDERS['tiny']; assert 'benchmark.testbed' not in sys.modules; "
            "MODEL_BUILDERS['testbed']; assert 'benchmark.testbed.plugin' in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
