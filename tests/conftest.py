"""Test-wide settings: one intra-op thread per pytest-xdist worker (the CI box has 2 cores, 2 workers).

Small models run no faster on more threads, and two workers with two threads each oversubscribe
the cores; determinism tests also rely on a fixed thread count.
"""

import torch

torch.set_num_threads(1)
