"""Batch memory that is reused, not allocated afresh for every batch.

Fresh memory is not free: the kernel finds and zeroes every page on first touch. On the 2-core
VM this project is developed on that costs ~0.7 ms per MB (a sample of the seed config is
~1 MB of float32) — as much as reading and decoding the sample; on bare metal still ~0.1–0.2
ms per MB. So the reader writes its batches into a ring of slots, each one batch, and reuses a
slot once nothing references its batch any more:

* a batch's arrays are views of one *owner* array over its slot; numpy views keep their base
  alive, so the owner is garbage-collected only when no array of the batch (nor a view of one,
  nor a JAX transfer holding one) is left — its finalizer then frees the slot;
* when every slot is taken (a consumer holding many batches), a batch simply gets fresh memory:
  the ring never makes the reader wait, so it cannot deadlock.

`LocalRing` serves a reader in the training process (``data.worker_count = 0``). `SharedRing`
serves a Grain worker process: its slots are shared-memory segments, a batch crosses to the
training process as a `RingBatch` (names and offsets, a few hundred bytes), and `RingOpener`
there maps each segment once (then unlinks its name: the memory lives while either process
maps it, so nothing leaks even if a worker is killed) and frees the slot through a shared
flag byte when the batch dies. Without free slot the worker falls back to Grain's own protocol
(a fresh `SharedMemoryArray` per array, unlinked by the receiver).
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
import threading
import weakref
from collections.abc import Mapping
from multiprocessing import shared_memory
from typing import Any

import numpy as np

_ALIGN = 64  # bytes: every array of a slot starts on a cache line


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each key's ``(batch, *shape)`` array sits in a slot: key → (offset, shape, dtype)."""

    arrays: tuple[tuple[str, int, tuple[int, ...], str], ...]
    nbytes: int

    @classmethod
    def of(cls, shapes: Mapping[str, tuple[tuple[int, ...], str]]) -> Layout:
        arrays, offset = [], 0
        for key, (shape, dtype) in shapes.items():
            arrays.append((key, offset, tuple(shape), str(np.dtype(dtype))))
            size = math.prod(shape) * np.dtype(dtype).itemsize
            offset += -(-size // _ALIGN) * _ALIGN
        return cls(tuple(arrays), max(offset, _ALIGN))

    def views(self, owner: np.ndarray) -> dict[str, np.ndarray]:
        """The batch's arrays as views of ``owner`` (uint8, ``nbytes`` long)."""
        out = {}
        for key, offset, shape, dtype in self.arrays:
            size = math.prod(shape) * np.dtype(dtype).itemsize
            out[key] = owner[offset : offset + size].view(dtype).reshape(shape)
        return out

    def fresh(self) -> dict[str, np.ndarray]:
        return {key: np.empty(shape, dtype) for key, _, shape, dtype in self.arrays}


class LocalRing:
    """Up to ``max_slots`` reusable batches in this process (anonymous memory)."""

    def __init__(self, layout: Layout, max_slots: int):
        self.layout = layout
        self.max_slots = max_slots
        self._slots: list[mmap.mmap] = []
        self._busy: list[bool] = []
        self._lock = threading.Lock()
        self.fresh_batches = 0  # batches that found no free slot (for tests and benchmarks)

    def _release(self, slot: int) -> None:
        self._busy[slot] = False

    def batch(self) -> dict[str, np.ndarray]:
        """Empty arrays for one batch, in a free slot if there is one."""
        with self._lock:
            slot = next((s for s, busy in enumerate(self._busy) if not busy), None)
            if slot is None and len(self._slots) < self.max_slots:
                self._slots.append(mmap.mmap(-1, self.layout.nbytes))
                self._busy.append(False)
                slot = len(self._slots) - 1
            if slot is None:
                self.fresh_batches += 1
                return self.layout.fresh()
            self._busy[slot] = True
        owner = np.frombuffer(self._slots[slot], np.uint8, count=self.layout.nbytes)
        weakref.finalize(owner, self._release, slot)
        return self.layout.views(owner)


@dataclasses.dataclass(frozen=True)
class RingBatch:
    """A batch in slot ``slot`` of a worker's `SharedRing`: what crosses the process boundary."""

    segment: str  # shared-memory name of the slot
    flags: str  # shared-memory name of the ring's flag bytes (1 = slot taken)
    slot: int
    layout: Layout
    pid: int  # the worker process that owns the ring


class _Segment(shared_memory.SharedMemory):
    """A shared-memory segment whose arrays may outlive it at interpreter exit (quietly)."""

    def __del__(self):
        try:
            self.close()
        except BufferError:  # views of it still exist: the mapping goes with the process
            pass


def _attach(name: str) -> shared_memory.SharedMemory:
    """Map the segment ``name`` and remove its name (it lives while mapped anywhere)."""
    shm = _Segment(name)
    shm.unlink()  # also unregisters it from the resource tracker: nothing left to clean up
    return shm


class SharedRing:
    """Up to ``max_slots`` reusable batches of a Grain worker, in shared memory.

    A slot is taken by the worker (flag byte 1) when it starts a batch and freed by the
    training process (flag 0) when that batch dies there (`RingOpener`).
    """

    def __init__(self, layout: Layout, max_slots: int):
        self.layout = layout
        self.max_slots = max_slots
        self._flags_shm = _Segment(create=True, size=max_slots)
        self._flags = np.frombuffer(self._flags_shm.buf, np.uint8, count=max_slots)
        self._flags[:] = 0
        self._slots: list[shared_memory.SharedMemory] = []
        self._lock = threading.Lock()
        self.fresh_batches = 0
        # at the worker's exit, remove the names the training process has not (batches in
        # flight when the iterator closed); it removes each name as it first maps it
        weakref.finalize(self, _unlink_all, self._slots, self._flags_shm)

    def batch(self) -> tuple[RingBatch | None, dict[str, np.ndarray]]:
        """(handle, arrays to fill) of a free slot; (None, fresh shared arrays) if none is free."""
        with self._lock:
            taken = self._flags[: len(self._slots)]
            free = np.flatnonzero(taken == 0)
            if free.size:
                slot = int(free[0])
            elif len(self._slots) < self.max_slots:
                self._slots.append(_Segment(create=True, size=self.layout.nbytes))
                slot = len(self._slots) - 1
            else:
                slot = None
            if slot is not None:
                self._flags[slot] = 1
        if slot is None:
            from grain.multiprocessing import SharedMemoryArray

            self.fresh_batches += 1
            return None, {
                key: SharedMemoryArray(shape, dtype) for key, _, shape, dtype in self.layout.arrays
            }
        shm = self._slots[slot]
        owner = np.frombuffer(shm.buf, np.uint8, count=self.layout.nbytes)
        handle = RingBatch(shm.name, self._flags_shm.name, slot, self.layout, os.getpid())
        return handle, self.layout.views(owner)

    def discard(self, handle: RingBatch | None, arrays: Mapping[str, Any]) -> None:
        """Give back a batch that will never be sent (its decoding failed)."""
        if handle is not None:
            self._flags[handle.slot] = 0
        else:
            for a in arrays.values():
                a.unlink_on_del()


def _unlink_all(slots: list[shared_memory.SharedMemory], flags: shared_memory.SharedMemory):
    for shm in [*slots, flags]:
        try:
            shm.unlink()
        except FileNotFoundError:  # already mapped (and unlinked) by the training process
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover — exists, another user's (a reused pid)
        return True
    return True


class RingOpener:
    """In the training process: `RingBatch` → the batch's arrays (views of the mapped slot).

    Each segment is mapped once and kept while its worker lives (one mapping per slot of each
    ring); when a new ring shows up, the rings of workers that have exited are let go (their
    memory is freed once their last batch is). Other elements (Grain's fresh shared arrays,
    when a ring was full) pass through unchanged.
    """

    def __init__(self):
        self._rings: dict[str, tuple[int, dict[str, shared_memory.SharedMemory]]] = {}
        self._lock = threading.Lock()

    def _segments(self, element: RingBatch) -> tuple[np.ndarray, shared_memory.SharedMemory]:
        with self._lock:
            ring = self._rings.get(element.flags)
            if ring is None:
                for key, (pid, _) in list(self._rings.items()):
                    if not _alive(pid):
                        del self._rings[key]
                ring = self._rings[element.flags] = (element.pid, {})
                ring[1][element.flags] = _attach(element.flags)
            maps = ring[1]
            if element.segment not in maps:
                maps[element.segment] = _attach(element.segment)
            return np.frombuffer(maps[element.flags].buf, np.uint8), maps[element.segment]

    def __call__(self, element: Any) -> Any:
        if not isinstance(element, RingBatch):
            return element
        flags, shm = self._segments(element)
        owner = np.frombuffer(shm.buf, np.uint8, count=element.layout.nbytes)
        weakref.finalize(owner, flags.__setitem__, element.slot, 0)
        return element.layout.views(owner)

    def mapped(self) -> int:
        """Segments mapped now (for tests)."""
        return sum(len(maps) for _, maps in self._rings.values())

    def __getstate__(self):  # a fresh opener in whatever process unpickles it
        return {}

    def __setstate__(self, state):
        self.__init__()
