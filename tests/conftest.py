import os
import random

import numpy as np
import pytest
import torch

# CPU-only, small and reproducible: never let a test grab every core of a shared CI box.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
