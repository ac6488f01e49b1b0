"""Match a topic against many MQTT filters in time proportional to the topic's depth.

Each trie level is one topic level; a node has literal children, at most one `+` child and a
list of values stored under `#`. Matching walks the topic's levels once, following the literal
child and the `+` child, and collects `#` values on the way, so the cost does not grow with the
number of filters (only with how many wildcard branches the filters actually share).
"""

from __future__ import annotations

from typing import Generic, Iterable, TypeVar

V = TypeVar("V")


class _Node(Generic[V]):
    __slots__ = ("children", "plus", "hash_values", "values")

    def __init__(self) -> None:
        self.children: dict[str, _Node[V]] = {}
        self.plus: _Node[V] | None = None
        self.hash_values: list[V] = []  # values of filters ending in `#` at this node
        self.values: list[V] = []  # values of filters ending exactly at this node


def validate_filter(topic_filter: str) -> None:
    """Raise ValueError if `topic_filter` is not a valid MQTT topic filter."""
    if not topic_filter:
        raise ValueError("a topic filter must not be empty")
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if level == "#":
            if index != len(levels) - 1:
                raise ValueError(f"'#' must be the last level of a filter: {topic_filter!r}")
        elif level != "+" and ("+" in level or "#" in level):
            raise ValueError(f"'+' and '#' must occupy a whole level: {topic_filter!r}")


def filter_matches(topic_filter: str, topic: str) -> bool:
    """Reference matcher for one filter (MQTT 3.1.1 §4.7 / MQTT 5 §4.7), used by tests and 3.1.1 checks."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for i, f in enumerate(f_levels):
        if f == "#":
            return True
        if i >= len(t_levels):
            return False
        if f != "+" and f != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


class TopicTrie(Generic[V]):
    """A set of (filter, value) pairs, queried by topic."""

    __slots__ = ("_root", "_size")

    def __init__(self) -> None:
        self._root: _Node[V] = _Node()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def insert(self, topic_filter: str, value: V) -> None:
        validate_filter(topic_filter)
        node = self._root
        for level in topic_filter.split("/"):
            if level == "#":
                node.hash_values.append(value)
                self._size += 1
                return
            if level == "+":
                if node.plus is None:
                    node.plus = _Node()
                node = node.plus
            else:
                child = node.children.get(level)
                if child is None:
                    child = node.children[level] = _Node()
                node = child
        node.values.append(value)
        self._size += 1

    def match(self, topic: str) -> list[V]:
        """All values whose filter matches `topic`, in no guaranteed order."""
        levels = topic.split("/")
        found: list[V] = []
        last = len(levels)
        # A topic starting with '$' is not matched by a leading wildcard (MQTT-4.7.2-1).
        dollar = topic.startswith("$")
        stack: list[tuple[_Node[V], int]] = [(self._root, 0)]
        while stack:
            node, depth = stack.pop()
            wild_ok = not (dollar and depth == 0)
            if node.hash_values and wild_ok:
                # `a/#` also matches `a` itself (the parent level).
                found.extend(node.hash_values)
            if depth == last:
                found.extend(node.values)
                continue
            level = levels[depth]
            child = node.children.get(level)
            if child is not None:
                stack.append((child, depth + 1))
            if node.plus is not None and wild_ok:
                stack.append((node.plus, depth + 1))
        return found

    def extend(self, pairs: Iterable[tuple[str, V]]) -> None:
        for topic_filter, value in pairs:
            self.insert(topic_filter, value)
