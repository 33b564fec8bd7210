"""Stop sequences on a text stream: cut at the first match, never emit a partial one.

The engine usually stops on the stop strings itself; this keeps the contract with
engines that include the stop string in their output (TensorRT-LLM does), and holds
back a tail that could still become a stop string when streaming.
"""
from __future__ import annotations


class StopChecker:
    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buffer = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was found)."""
        if not self.stops:
            return piece, False
        self.buffer += piece
        cut = min((i for i in (self.buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.buffer = self.buffer[:cut], ""
            return out, True
        # Keep the longest tail that is a prefix of some stop string.
        keep = 0
        for k in range(min(self.hold, len(self.buffer)), 0, -1):
            tail = self.buffer[-k:]
            if any(s.startswith(tail) for s in self.stops):
                keep = k
                break
        out = self.buffer[:len(self.buffer) - keep]
        self.buffer = self.buffer[len(self.buffer) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out
