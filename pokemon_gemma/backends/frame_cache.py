"""Bounded LRU of per-frame vision features keyed by frame hash.

Consecutive requests of one session slide the 4-frame window by one frame, so 3 of their 4 frames
were already encoded: with this cache the vision tower runs on ~1 new frame per request, not 4.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any


class FrameCache:
    def __init__(self, max_frames: int = 128):
        self.max_frames = max(0, int(max_frames))
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_frames > 0

    def get(self, key: str) -> Any | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: str, value: Any) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_frames:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)
