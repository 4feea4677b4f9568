from pathlib import Path

import pytest
import torch

from benchmark.models import tiny_text_to_image

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model():
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return tiny_text_to_image(seed=0)


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not beside the repo")
    return SHARED_DATA


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
