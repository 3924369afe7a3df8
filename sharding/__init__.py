"""Work split over several processes or machines: `--shard i/n`, or `mlx.launch`.

The eval harness (utterances) and the bench (cases) share this layer. A run is split into
`n` shards; shard `i` (0-based, the rank) takes the items whose position in the run's
order is `i` modulo `n` (`Shard.take`): deterministic, so a rerun (`--resume`), another
launcher or another machine count gives every rank the same items as before.

Two ways to start the ranks:

- `mlx.launch -n 2 -- python -m eval run ...` (or `--hostfile hosts.json` over several
  Macs): MLX's own distributed layer (`mx.distributed`, the ring backend over TCP or MPI)
  gives each process its rank; at the end every rank sends its part to rank 0 through
  it (`Shard.gather_bytes`) and rank 0 writes the merged results;
- `--shard i/n` on any launcher (CI matrix jobs): no communication; each run writes its
  part, and a merge step (`python -m eval merge`, `python -m bench merge`) joins the
  parts once they are in one place.

Without either, a run is shard 0 of 1 and nothing changes.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

LAUNCH_ENV = ("MLX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
"""Variables a launcher of MLX's distributed layer sets in each rank (`mlx.launch` sets
`MLX_RANK`, MPI its own): their presence means the process was launched as a rank."""

MAX_PART_BYTES = 1 << 30
"""The most one rank may send to rank 0 at the end (a part is JSON text: rows or cases)."""


class ShardError(ValueError):
    """A bad `--shard` value or an inconsistent set of ranks (one line)."""


def parse_shard(text: str) -> tuple[int, int]:
    """`i/n` (0 <= i < n) as `(i, n)`; ShardError naming the problem otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if m is None:
        raise ShardError(f"--shard: expected i/n (e.g. 0/2, 1/2), got {text!r}")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1:
        raise ShardError(f"--shard {text}: the number of shards must be at least 1")
    if i >= n:
        raise ShardError(f"--shard {text}: shards are numbered 0 to {n - 1} (0-based)")
    return i, n


def launched() -> bool:
    """Whether this process was started as a rank by `mlx.launch` (or MPI)."""
    return any(k in os.environ for k in LAUNCH_ENV)


@dataclass(frozen=True)
class Shard:
    """This process's share of a run: `rank` of `size`; `group` is MLX's distributed group
    when the ranks were launched together (`mlx.launch`), None with `--shard` or alone."""

    rank: int = 0
    size: int = 1
    group: Any = None

    @property
    def name(self) -> str:
        """`<rank>-of-<size>`: the name of this rank's part (files and folders)."""
        return f"{self.rank}-of-{self.size}"

    @property
    def connected(self) -> bool:
        """Whether the ranks can talk (launched together) and rank 0 can merge at the end."""
        return self.group is not None and self.size > 1

    def owns(self, position: int) -> bool:
        return position % self.size == self.rank

    def take(self, items: Sequence[T]) -> list[T]:
        """The items of this shard: positions `rank`, `rank + size`, ... of `items`."""
        return [x for i, x in enumerate(items) if self.owns(i)]

    def take_groups(self, items: Sequence[T], key: Callable[[T], Any]) -> list[T]:
        """The items of this shard when items with the same `key` must stay together: the
        groups, in the order of their first item, are dealt out as `take` deals items."""
        order: dict[Any, int] = {}
        for x in items:
            order.setdefault(key(x), len(order))
        return [x for x in items if self.owns(order[key(x)])]

    # ----------------------------------------------------------------- communication

    def gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's `data`, in rank order, on every rank (all ranks must call it)."""
        if not self.connected:
            return [data]
        if len(data) > MAX_PART_BYTES:
            raise ShardError(f"a part of {len(data)} bytes is more than {MAX_PART_BYTES}")
        import mlx.core as mx
        import numpy as np

        sizes = mx.distributed.all_gather(
            mx.array([len(data)], dtype=mx.int64), group=self.group, stream=mx.cpu
        )
        sizes = [int(s) for s in np.array(sizes)]
        width = max(max(sizes), 1)
        buf = np.zeros(width, dtype=np.uint8)
        buf[: len(data)] = np.frombuffer(data, dtype=np.uint8)
        rows = mx.distributed.all_gather(mx.array(buf), group=self.group, stream=mx.cpu)
        rows = np.array(rows).reshape(self.size, width)
        return [rows[r, : sizes[r]].tobytes() for r in range(self.size)]

    def share_text(self, text: str | None) -> str:
        """Rank 0's `text` on every rank (the other ranks' values are ignored)."""
        if not self.connected:
            if text is None:
                raise ShardError("nothing to share")
            return text
        parts = self.gather_bytes((text or "").encode("utf-8") if self.rank == 0 else b"")
        return parts[0].decode("utf-8")

    def check_same(self, what: str, text: str) -> None:
        """ShardError on every rank when the ranks do not agree on `text` (e.g. a plan built
        from different code or arguments on one machine)."""
        if not self.connected:
            return
        parts = self.gather_bytes(text.encode("utf-8"))
        differ = [r for r, p in enumerate(parts) if p != parts[0]]
        if differ:
            raise ShardError(
                f"ranks {differ} have another {what} than rank 0: run the same code with the "
                "same arguments on every rank"
            )


def from_args(shard: str | None) -> Shard:
    """This process's shard: `--shard i/n` when given, else its rank in an `mlx.launch`
    group, else shard 0 of 1. ShardError for `--shard` under a launcher (one or the other)."""
    if shard is not None:
        if launched():
            raise ShardError(
                "--shard is for runs started one by one (e.g. CI matrix jobs); under mlx.launch "
                "each rank takes its shard from the launcher: leave --shard out"
            )
        rank, size = parse_shard(shard)
        return Shard(rank, size, None)
    if not launched():
        return Shard()
    import mlx.core as mx

    group = mx.distributed.init()
    return Shard(group.rank(), group.size(), group if group.size() > 1 else None)


def host_record() -> dict[str, Any]:
    """Where a rank ran: host name and process id (recorded with each part)."""
    return {"hostname": socket.gethostname(), "pid": os.getpid()}
