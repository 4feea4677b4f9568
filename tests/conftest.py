"""Shared fixtures. Test modules never import from each other: what several need lives here."""
from pathlib import Path

import pytest
import torch
import yaml

from benchmark.models.text_to_image import tiny_text_to_image

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model():
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return tiny_text_to_image(seed=0)


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not beside the repo")
    return SHARED_DATA


def _compose(task: str, overrides: list[str], root: Path):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(task, overrides=[f"paths.root={root}", *overrides])


@pytest.fixture(scope="session")
def compose_at():
    """``compose_at(root, task, *overrides)``: a primary config (``detect``, ``mitigate``, ``ddpm``...) composed as
    the runner composes it, every path under ``root`` (for fixtures wider than one test)."""
    return lambda root, task, *overrides: _compose(task, list(overrides), Path(root))


@pytest.fixture
def compose(tmp_path):
    """``compose(task, *overrides)``: a primary config with every path under this test's ``tmp_path``; overrides
    come after ``paths.root``, so a test can still move one path (``paths.data_dir=...``)."""
    return lambda task, *overrides: _compose(task, list(overrides), tmp_path)


@pytest.fixture(scope="session")
def tiny_testbed_spec():
    """The testbed spec of conf/testbed/tiny.yaml over default.yaml: a testbed trained in seconds."""
    from benchmark.testbed.build import spec_from_dict

    default = yaml.safe_load((ROOT / "conf/testbed/default.yaml").read_text())
    tiny = yaml.safe_load((ROOT / "conf/testbed/tiny.yaml").read_text())
    return spec_from_dict({k: {**default[k], **tiny.get(k, {})} for k in ("recipe", "architecture", "training")})


# Batched and single-image kernels (and other CPUs' vector widths) sum in different orders, so equal computations
# differ by float32 reassociation: errors that scale with the values' magnitude, not with each element's. 1e-4 of the
# largest value is ~800 float32 epsilons: room for a few dozen layers x steps of rounding, and still four orders of
# magnitude below what another seed or another prompt changes (each test using it asserts that too).
FLOAT32_REL = 1e-4


@pytest.fixture
def same_up_to_float_order():
    """``check(actual, expected, rel=FLOAT32_REL) -> tolerance``: max |actual - expected| <= rel * max |expected|."""
    def check(actual, expected, rel: float = FLOAT32_REL) -> float:
        a, e = (torch.as_tensor(x).double() for x in (actual, expected))
        assert a.shape == e.shape, (a.shape, e.shape)
        tolerance = rel * e.abs().max().item()
        worst = (a - e).abs().max().item()
        assert worst <= tolerance, f"largest difference {worst:.3g} > {rel:g} x the values' scale ({tolerance:.3g})"
        return tolerance
    return check
