import sys
from pathlib import Path

import torch

# test helper modules (zoo models, fixtures) live beside the tests
sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)
