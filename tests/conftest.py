import random

import numpy as np
import pytest
import torch

# Tests use tiny models, where one thread beats two (no sync overhead) on the 2-core CI box.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
