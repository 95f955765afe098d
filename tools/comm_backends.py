"""Backends that bench_comm can measure: how members connect, average, and hand over state.

Add a backend: subclass `CommBackend`, implement its four members, register the class in
`BACKENDS` under the name `--backends` will accept. The benchmark then times its
`group.average` (the dilo `Group` the product uses), its `barrier`, and its `download`
(a joiner receiving the global state from a live member).
"""

from __future__ import annotations

import datetime
from abc import ABC, abstractmethod

import torch

from dilo.comm.protocol import Group


class CommBackend(ABC):
    """One member's connection for the benchmark. Register subclasses in BACKENDS."""

    def __init__(self, rank: int, size: int, addr0: str, port: int, timeout_s: float):
        self.rank, self.size = rank, size

    @property
    @abstractmethod
    def group(self) -> Group:
        """The dilo Group whose `average` is measured."""

    @abstractmethod
    def barrier(self) -> None:
        """Return once every member has called it."""

    @abstractmethod
    def download(self, state: torch.Tensor, src: int, dst: int) -> None:
        """Member dst receives src's `state` in place (the joiner's download); others return."""

    def close(self) -> None:
        pass


class TorchBackend(CommBackend):
    def __init__(self, rank: int, size: int, addr0: str, port: int, timeout_s: float):
        super().__init__(rank, size, addr0, port, timeout_s)
        import torch.distributed as dist

        from dilo.comm.torch_dist import TorchGroup

        self.dist = dist
        dist.init_process_group("gloo", init_method=f"tcp://{addr0}:{port}", rank=rank,
                                world_size=size, timeout=datetime.timedelta(seconds=timeout_s))
        self._group = TorchGroup()
        self._pairs: dict[tuple[int, int], object] = {}

    @property
    def group(self) -> Group:
        return self._group

    def barrier(self) -> None:
        self.dist.barrier()

    def download(self, state: torch.Tensor, src: int, dst: int) -> None:
        if (src, dst) not in self._pairs:  # new_group is collective: every member calls it
            self._pairs[(src, dst)] = self.dist.new_group(sorted({src, dst}))
        if self.rank in (src, dst):
            self.dist.broadcast(state, src=src, group=self._pairs[(src, dst)])

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()


BACKENDS: dict[str, type[CommBackend]] = {"torch": TorchBackend}
