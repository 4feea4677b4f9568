"""A plain `pip install` gives a working suite (issue #15, section 5): what the suite needs at run time is
declared or shipped, and a job's output carries no library warnings a user cannot act on."""
import hashlib
import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sd_tokenizer_works_without_open_clip(monkeypatch):
    """`pip install -e .` alone: the tiny model, SD's tokenizer and random captions failed (open_clip_torch is
    not installed); CLIP's vocabulary now ships with the package."""
    from benchmark.models import text_to_image as models

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "open_clip" else real(name, *a))
    monkeypatch.setitem(sys.modules, "open_clip", None)
    models._clip_vocab_and_merges.cache_clear()
    try:
        tokenizer = models.clip_tokenizer()
        assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    finally:
        models._clip_vocab_and_merges.cache_clear()
    vocab = models.clip_vocabulary_file()
    assert vocab.is_relative_to(ROOT / "benchmark")
    assert hashlib.sha256(vocab.read_bytes()).hexdigest() == models.CLIP_VOCAB_SHA256


def test_run_time_needs_are_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needs = " ".join(project["project"]["dependencies"])
    for package in ("pyarrow", "accelerate", "hydra-core", "diffusers", "transformers"):
        assert package in needs, package
    assert "open_clip" not in needs  # optional: the CLIP score only (`.[clip]`)
    data = project["tool"]["setuptools"]["package-data"]["benchmark.models"]
    assert any(Path("benchmark/models").joinpath(pattern).parent == Path("benchmark/models/clip_vocab")
               for pattern in data)
    assert importlib.util.find_spec("pyarrow") and importlib.util.find_spec("accelerate")


def test_loading_a_model_prints_no_library_warnings(tmp_path):
    """Loading through the runners printed `accelerate` and 'modules that should be kept in float32' warnings
    and weight-loading bars; what a job prints now is what its user needs."""
    code = ("import runners.common\n"
            "from benchmark.models.text_to_image import get_model, save_text_to_image, tiny_text_to_image\n"
            f"folder = save_text_to_image(tiny_text_to_image(), {str(tmp_path / 'm')!r})\n"
            "get_model(str(folder), 'cpu', 'float32')\n"
            "get_model('tiny', 'cpu', 'float32')\n"
            "print('loaded')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "loaded"
    for noise in ("float32", "accelerate", "Loading weights", "torchvision", "Warning", "warn"):
        assert noise not in out.stderr, out.stderr[-2000:]
