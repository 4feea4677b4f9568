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
