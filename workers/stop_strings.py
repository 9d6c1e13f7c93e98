"""Streaming stop-string matching: O(new characters) per token, whatever the text length and stop set.

A request's stop strings are compiled once into an Aho–Corasick automaton (a trie of the strings with
failure links). The matcher then reads only the characters each token adds; its state is the longest suffix
of the text so far that is a prefix of some stop string. That one state answers both questions the engine
asks after every token:

- did a stop string just appear, and where does it start? (vLLM semantics: the output is cut right before
  the earliest stop string, which is not returned), and
- how much of the text's tail must be held back from the stream because the next tokens may complete a stop
  string? (the state's depth).

Searching the whole text for every stop string after every token (the obvious way) costs
O(text × stops) per token, so a long answer with many stop strings slows every step of the batch.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

_ROOT = 0


class StopAutomaton:
    """Aho–Corasick automaton over characters. Immutable once built, so requests with the same stop strings
    share one (see `compile_stops`)."""

    def __init__(self, stops: Sequence[str]):
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self.max_len = max((len(s) for s in stops), default=0)
        self.goto: list[dict[str, int]] = [{}]
        self.depth: list[int] = [0]
        for s in stops:
            self._insert(s)
        self.fail: list[int] = [_ROOT] * len(self.goto)
        # Length of the longest stop string that ends at this state (a suffix of the state's string), 0 if
        # none: the longest one that ends at a position is the one that starts earliest there.
        self.match_len: list[int] = [0] * len(self.goto)
        for s in stops:
            self.match_len[self._node_of(s)] = len(s)
        self._link()

    def _insert(self, s: str) -> None:
        node = _ROOT
        for ch in s:
            nxt = self.goto[node].get(ch)
            if nxt is None:
                nxt = len(self.goto)
                self.goto[node][ch] = nxt
                self.goto.append({})
                self.depth.append(self.depth[node] + 1)
            node = nxt

    def _node_of(self, s: str) -> int:
        node = _ROOT
        for ch in s:
            node = self.goto[node][ch]
        return node

    def _link(self) -> None:
        """Failure links in breadth-first order (a node's link is shallower, so already final)."""
        queue = list(self.goto[_ROOT].values())
        for node in queue:  # the list grows while we walk it: a BFS without a deque
            for ch, child in self.goto[node].items():
                self.fail[child] = self.step(self.fail[node], ch) if node != _ROOT else _ROOT
                # A state that is not itself a stop string still ends with one if its failure state does.
                if self.match_len[child] == 0:
                    self.match_len[child] = self.match_len[self.fail[child]]
                queue.append(child)

    def step(self, state: int, ch: str) -> int:
        """The state after reading `ch` (amortised O(1): each failure hop undoes an earlier depth gain)."""
        while True:
            nxt = self.goto[state].get(ch)
            if nxt is not None:
                return nxt
            if state == _ROOT:
                return _ROOT
            state = self.fail[state]


@lru_cache(maxsize=64)
def compile_stops(stops: tuple[str, ...]) -> StopAutomaton:
    """One automaton per distinct stop set (chat stop strings repeat across requests)."""
    return StopAutomaton(stops)


class StopStringMatcher:
    """One request's stop-string state. Feed it the text each token adds, in order."""

    def __init__(self, stops: Sequence[str]):
        self._automaton = compile_stops(tuple(stops))
        self._state = _ROOT
        self._length = 0  # characters fed so far

    def feed(self, new_text: str) -> int | None:
        """Read `new_text` (appended to everything fed before). Returns the index, in the whole text, where the
        earliest stop string that ends inside `new_text` starts (cut the output there), or None.

        Earlier text had no stop string (the request would have stopped), so only occurrences that end in
        `new_text` are new; among them the earliest start wins, even if it ends after a shorter one."""
        automaton, state, best = self._automaton, self._state, None
        for i, ch in enumerate(new_text, start=self._length):
            # No occurrence ending here or later can start before `best` once it is this far behind.
            if best is not None and i - automaton.max_len + 1 >= best:
                break
            state = automaton.step(state, ch)
            n = automaton.match_len[state]
            if n and (best is None or i - n + 1 < best):
                best = i - n + 1
        self._state = state
        self._length += len(new_text)
        return best

    @property
    def holdback(self) -> int:
        """How many trailing characters may be the start of a stop string that later text completes (the
        longest suffix of the text that is a proper prefix of a stop string): not safe to stream yet.
        Meaningful while `feed` has found no stop string."""
        return self._automaton.depth[self._state]
