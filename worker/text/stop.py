"""Stop strings matched on streamed text: the one stop matcher of the engine and the router.

Text arrives in pieces (`feed`). A piece is released unless its end could still be the start of a
stop string: that tail (at most longest-stop - 1 characters) is held back and released once it can no
longer match, or by `feed(..., final=True)` when generation ends for another reason. A match cuts the
text right before the stop string; nothing after it is ever released.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    def __init__(self, stop: Sequence[str]) -> None:
        for s in stop:
            if not s:
                raise ValueError(f"stop: stop strings must be non-empty, got {list(stop)!r}")
        self.stop = tuple(stop)
        self._held = ""  # text not yet released because it may start a stop string

    def feed(self, new_text: str, *, final: bool) -> tuple[str, str | None]:
        """Appends new_text after the held-back text: (text to release, the stop string matched or
        None). final: nothing follows, so nothing is held back."""
        buf = self._held + new_text
        self._held = ""
        if not self.stop:
            return buf, None
        match = _find_stop(buf, self.stop, already_checked=len(buf) - len(new_text))
        if match is not None:
            pos, stop = match
            return buf[:pos], stop
        keep = 0 if final else _partial_stop_len(buf, self.stop)
        cut = len(buf) - keep
        self._held = buf[cut:]
        return buf[:cut], None


def _find_stop(buf: str, stops: Sequence[str], already_checked: int) -> tuple[int, str] | None:
    """Earliest (position, stop) of a stop string in buf. buf[:already_checked] is known to hold no whole
    stop string, so a match must end past it."""
    best: tuple[int, str] | None = None
    for s in stops:
        pos = buf.find(s, max(0, already_checked - len(s) + 1))
        if pos != -1 and (best is None or pos < best[0]):
            best = (pos, s)
    return best


def _partial_stop_len(buf: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of buf that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        # Only a start within the last len(s) - 1 characters can be a proper prefix; the earliest such
        # start that matches gives the longest suffix for this stop string.
        start = max(0, len(buf) - len(s) + 1)
        i = buf.find(s[0], start)
        while i != -1 and len(buf) - i > best:
            if s.startswith(buf[i:]):
                best = len(buf) - i
                break
            i = buf.find(s[0], i + 1)
    return best
