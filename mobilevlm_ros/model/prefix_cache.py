"""Per-frame prompt prefixes: the KV cache of everything up to and including the image, kept for follow-ups.

Every prompt about a frame starts the same way: the system text, ``USER: `` and the frame's 144 image tokens (the
image belongs to the first user turn, build_prompt), whatever the question or chat that follows. Keys and values
at a position depend only on the positions before it, so the cache entries of those positions are the same for
every question about the frame: kept here once per frame, a follow-up question loads them into its cache row and
prefills only its own tail, with no preprocessing, no vision pass and a prefill of a few tokens instead of ~180.

A bounded LRU of frames: the caller names each frame with a key (the node: camera and frame number) and gives the
image again on every request, so an evicted frame is simply computed again.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class FramePrefix:
    ids: tuple[int, ...]  # the prompt's token ids before the image (the same for every prompt: checked on use)
    kv: Tensor  # [layers, 2, kv heads, positions, head dim]: MobileLlama.read_cache of the prefix

    @property
    def length(self) -> int:
        return self.kv.shape[3]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


@dataclass(frozen=True)
class PrefixCacheStats:
    frames: int
    max_frames: int
    hits: int  # prompts that started from a stored prefix (also from one computed earlier in the same batch)
    misses: int  # prompts whose frame had to go through the vision encoder and a full prefill
    nbytes: int


class PrefixCache:
    """An LRU of FramePrefix by frame key, at most max_frames of them (0: nothing is kept). Used from the
    inference thread; stats() may be read from any thread."""

    def __init__(self, max_frames: int = 0):
        if max_frames < 0:
            raise ValueError(f"max_frames must be >= 0, got {max_frames}")
        self.max_frames = max_frames
        self._entries: OrderedDict[Hashable, FramePrefix] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = self._misses = 0

    def get(self, key: Hashable) -> FramePrefix | None:
        """The frame's prefix (now the most recently used), or None."""
        with self._lock:
            prefix = self._entries.get(key)
            if prefix is not None:
                self._entries.move_to_end(key)
            return prefix

    def count(self, hit: bool) -> None:
        """One prompt started from a prefix (hit) or computed it (miss)."""
        with self._lock:
            if hit:
                self._hits += 1
            else:
                self._misses += 1

    def put(self, key: Hashable, prefix: FramePrefix) -> None:
        with self._lock:
            self._entries[key] = prefix
            self._entries.move_to_end(key)
            self._evict()

    def resize(self, max_frames: int) -> None:
        if max_frames < 0:
            raise ValueError(f"max_frames must be >= 0, got {max_frames}")
        with self._lock:
            self.max_frames = max_frames
            self._evict()

    def _evict(self) -> None:
        while len(self._entries) > self.max_frames:
            self._entries.popitem(last=False)

    def stats(self) -> PrefixCacheStats:
        with self._lock:
            return PrefixCacheStats(len(self._entries), self.max_frames, self._hits, self._misses,
                                    sum(p.nbytes for p in self._entries.values()))
