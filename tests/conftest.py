import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

from tests.helpers.hyp_settings import profile_name  # noqa: E402

# "ci" (derandomized) under CI=true, else "dev" (random): see helpers/hyp_settings.py
settings.load_profile(profile_name())

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tokens4():
    """A batch of 4 different samples, 24 tokens of dim 8."""
    return torch.randn(4, 24, 8, generator=torch.Generator().manual_seed(0))
