"""A CPU-only check that every tensor lands on the device of the data it meets.

Inside `tensors_made_without_a_device_are_meta()` every tensor created without an explicit device (a
factory call, a random draw, a tokenizer's output) is a meta tensor, so it fails as soon as it meets the
model's real tensors, where on a GPU it would have been a CPU tensor meeting CUDA ones. It is stricter
than CUDA: a tensor made on the CPU and then moved (a host-to-device copy on a GPU) is flagged too.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def tensors_made_without_a_device_are_meta() -> Iterator[None]:
    with torch.device("meta"):
        yield
