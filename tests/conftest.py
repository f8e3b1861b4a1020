"""Test-wide settings: one torch thread (the models are small; 2 threads on 2 busy cores thrash)."""

import torch

torch.set_num_threads(1)
