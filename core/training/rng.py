"""Randomness of a training run, kept apart from the rest of the process.

Two streams, both derived from ``TrainingConfig.seed``:

- initialisation (method and head weights) runs in :func:`forked_rng`, seeded with ``seed``:
  same seed, same initial weights, whatever else the process did before, and the global RNG is
  left as it was;
- dropout draws from torch's global generators, so :class:`TrainerRng` keeps the trainer's
  *own* generator states (seeded with ``seed + 1``) and swaps them in around each step and
  back out after. Other code in the process neither perturbs nor is perturbed by a job, and
  the state saved in a checkpoint is exactly the state the next step needs: resuming
  reproduces an uninterrupted run bit for bit on CPU (same seed, data, config, thread count).
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor


@contextlib.contextmanager
def forked_rng(device: torch.device) -> Iterator[None]:
    """Run a block on torch's global generators and restore them after (CPU, and ``device``'s
    CUDA generator when it is a GPU)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


class TrainerRng:
    """The generator states dropout uses during this run's steps.

    ``states``: ``"cpu"`` always, ``"cuda"`` on a GPU; each a ``uint8`` tensor as
    ``torch.get_rng_state`` returns it (``[5056]`` on CPU).
    """

    def __init__(self, device: torch.device, states: dict[str, Tensor]) -> None:
        self.device = device
        self.states = states

    @classmethod
    def seeded(cls, seed: int, device: torch.device) -> TrainerRng:
        """Initial states derived from the seed (``seed + 1``: distinct from the init stream)."""
        with forked_rng(device):
            torch.manual_seed(seed + 1)
            states = {"cpu": torch.get_rng_state()}
            if device.type == "cuda":
                states["cuda"] = torch.cuda.get_rng_state(device)
        return cls(device, states)

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Swap these states into torch's global generators for one step, then back out."""
        cuda = self.device.type == "cuda"
        outer_cpu = torch.get_rng_state()
        outer_cuda = torch.cuda.get_rng_state(self.device) if cuda else None
        torch.set_rng_state(self.states["cpu"])
        if cuda and "cuda" in self.states:
            torch.cuda.set_rng_state(self.states["cuda"], self.device)
        try:
            yield
        finally:
            self.states["cpu"] = torch.get_rng_state()
            torch.set_rng_state(outer_cpu)
            if cuda:
                self.states["cuda"] = torch.cuda.get_rng_state(self.device)
                torch.cuda.set_rng_state(outer_cuda, self.device)

    def to_json(self) -> dict[str, str]:
        """The states as base64 strings, for a checkpoint's JSON part."""
        return {
            k: base64.b64encode(v.cpu().numpy().tobytes()).decode("ascii")
            for k, v in self.states.items()
        }

    @classmethod
    def from_json(cls, data: Mapping[str, str], device: torch.device) -> TrainerRng:
        """Inverse of :meth:`to_json`."""
        states = {
            k: torch.frombuffer(bytearray(base64.b64decode(v)), dtype=torch.uint8).clone()
            for k, v in data.items()
        }
        return cls(device, states)
