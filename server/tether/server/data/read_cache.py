"""An instance-local cache of what its live queries read, valid at the version it has applied.

A live query re-runs when a commit writes what it read. Reading again from Redis costs a round
trip per re-run, on every instance, for data the commit has just written: the commit's stream
entry carries the new state of each document it wrote (``commit.lua``'s field ``w``, up to
``TETHER_COMMIT_VALUES_BYTES``), so an instance that follows the stream knows it already.

One :class:`ReadCache` per followed partition (the :class:`~tether.server.data.live.
SubscriptionManager`'s), shared by all its queries. It holds documents (key → version, JSON
text, creation score) and index ranges (the range read → the index key's version and the keys
and scores of its documents, in order), and is **valid at** :attr:`ReadCache.version`: every
entry equals what ``read.lua`` would answer for it at that version. That holds because

* an entry is filled only from a read whose snapshot is that version (:meth:`ReadCache.fill`);
* each commit is applied in order (:meth:`ReadCache.apply`): a written document whose new state
  the commit carries is updated, every other written key is evicted (a document written without
  its value, an index key whose membership changed: every range over it);
* anything else (a commit out of order, a gap in the stream, a resync) starts it over empty
  (:meth:`ReadCache.reset`).

A read is served from the cache (:meth:`ReadCache.lookup`) only when every op of it hits, and
answers at the cache's version; a query whose snapshot is newer than that reads Redis instead,
so a snapshot never mixes two versions. Bounded by :attr:`ReadCache.max_bytes` (an estimate of
the memory its entries hold), least recently used first out.

Pure: no I/O. The store's :class:`~tether.server.data.store.QueryDB` consults it.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from tether.server.data.store import CommitValues, _compact, _Doc, _DocOp, _Range, _RangeOp

__all__ = ["ReadCache"]

#: Bytes counted per cached entry beyond its text: the objects that hold it.
_ENTRY_OVERHEAD = 200
#: Bytes counted per document of a cached range.
_MEMBER_OVERHEAD = 100


@dataclass(slots=True)
class _DocEntry:
    version: int
    text: str | None  # None: absent or deleted
    score: int
    size: int


@dataclass(slots=True)
class _RangeEntry:
    version: int  # the index key's version (the commit that last changed its membership)
    members: tuple[tuple[str, int], ...]  # (document key, score), in the range's order
    size: int


class ReadCache:
    """Documents and index ranges as of :attr:`version` (see the module's docstring).

    ``partition`` is the data partition whose keys and version it holds (``None``: the
    default); a store of another partition never uses it. ``max_bytes``: the estimated memory
    its entries may hold (``TETHER_READ_CACHE_BYTES``); 0 caches nothing.
    """

    def __init__(self, partition: str | None = None, *, max_bytes: int = 8 * 1024 * 1024) -> None:
        self.partition = partition
        self.max_bytes = max_bytes
        #: The version every entry is valid at; ``None`` until :meth:`reset` says where it is.
        self.version: int | None = None
        self._entries: OrderedDict[str | _RangeOp, _DocEntry | _RangeEntry] = OrderedDict()
        self._ranges: dict[str, set[_RangeOp]] = {}  # index key -> the cached ranges over it
        self.bytes = 0
        #: Reads answered here, and reads that went to Redis (for tests and profiling).
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    # ------------------------------------------------------------------ following commits

    def reset(self, version: int | None) -> None:
        """Forget everything: the cache is (empty and) valid at ``version`` (``None``: unknown,
        nothing is filled or served until the next reset)."""
        self._entries.clear()
        self._ranges.clear()
        self.bytes = 0
        self.version = version

    def apply(
        self, version: int, written_keys: frozenset[str], values: CommitValues | None
    ) -> None:
        """The commit at ``version`` wrote ``written_keys``; ``values`` holds the new state of
        the documents among them that its stream entry carried (see :data:`CommitValues`).

        It must be the commit right after :attr:`version`: any other starts the cache over."""
        if self.version is None or version != self.version + 1:
            self.reset(version)
            return
        self.version = version
        entries = self._entries
        if not entries:
            return
        for key in written_keys:
            ranges = self._ranges.get(key)
            if ranges is not None:
                # An index key whose membership changed: every range over it is stale.
                for op in list(ranges):
                    self._evict(op)
            entry = entries.get(key)
            if entry is None:
                continue
            value = None if values is None else values.get(key)
            if value is None or not isinstance(entry, _DocEntry):
                self._evict(key)
                continue
            text, slot = value
            entry.version = version
            entry.text = text
            if text is None:
                entry.score = 0  # a tombstone has no creation score
            elif slot >= 0:
                entry.score = version * 1000 + slot
            self._resize(entry, _doc_size(text))

    # ------------------------------------------------------------------ reads

    def lookup(
        self, ops: Sequence[_DocOp | _RangeOp], snapshot: int | None
    ) -> tuple[int, list[_Doc | _Range]] | None:
        """``read.lua``'s answer to ``ops`` at :attr:`version`, if every op hits; else ``None``.

        Also ``None`` when the caller's ``snapshot`` (its earlier reads') is newer than the
        cache: an answer at an older version could hide a write between the two."""
        version = self.version
        if version is None or (snapshot is not None and snapshot > version) or not ops:
            return None
        entries = self._entries
        results: list[_Doc | _Range] = []
        for op in ops:
            if isinstance(op, _DocOp):
                entry = entries.get(op.key)
                if not isinstance(entry, _DocEntry):
                    self.misses += 1
                    return None
                results.append(_doc(op.key, entry))
                continue
            found = entries.get(op)
            if not isinstance(found, _RangeEntry):
                self.misses += 1
                return None
            docs: list[_Doc] = []
            for key, _ in found.members:
                member = entries.get(key)
                if not isinstance(member, _DocEntry):
                    self.misses += 1
                    return None
                if member.text is not None:  # read.lua leaves out a member without a document
                    docs.append(_doc(key, member))
            results.append(_Range(op.key, found.version, tuple(docs)))
        # Only now, when the whole read is answered here, mark what it used as recently used.
        for op in ops:
            if isinstance(op, _RangeOp):
                entries.move_to_end(op)
                found = entries[op]
                assert isinstance(found, _RangeEntry)
                for key, _ in found.members:
                    entries.move_to_end(key)
            else:
                entries.move_to_end(op.key)
        self.hits += 1
        return version, results

    def fill(
        self, version: int, ops: Sequence[_DocOp | _RangeOp], results: Sequence[_Doc | _Range]
    ) -> None:
        """Keep what ``read.lua`` answered to ``ops`` at ``version``: only if that is the
        version the cache is valid at (a read that saw a commit not applied here yet, or
        missed one applied since, is not kept)."""
        if version != self.version or self.max_bytes <= 0:
            return
        for op, result in zip(ops, results, strict=True):
            if isinstance(result, _Doc):
                self._put_doc(result)
                continue
            assert isinstance(op, _RangeOp)
            for doc in result.docs:
                self._put_doc(doc)
            members = tuple((doc.key, doc.score) for doc in result.docs)
            self._evict(op)
            entry = _RangeEntry(result.version, members, _ENTRY_OVERHEAD)
            entry.size += _MEMBER_OVERHEAD * len(members)
            self._entries[op] = entry
            self._ranges.setdefault(op.key, set()).add(op)
            self.bytes += entry.size
        self._shrink()

    # ------------------------------------------------------------------ bookkeeping

    def _put_doc(self, doc: _Doc) -> None:
        entries = self._entries
        entry = entries.get(doc.key)
        if isinstance(entry, _DocEntry) and entry.version == doc.version:
            entries.move_to_end(doc.key)  # the same state: keep the text it has
            return
        text = None if doc.doc is None else _compact(doc.doc)
        self._evict(doc.key)
        fresh = _DocEntry(doc.version, text, doc.score, _doc_size(text))
        entries[doc.key] = fresh
        self.bytes += fresh.size

    def _resize(self, entry: _DocEntry, size: int) -> None:
        self.bytes += size - entry.size
        entry.size = size
        self._shrink()

    def _evict(self, key: str | _RangeOp) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self.bytes -= entry.size
        if isinstance(key, _RangeOp):
            ranges = self._ranges.get(key.key)
            if ranges is not None:
                ranges.discard(key)
                if not ranges:
                    del self._ranges[key.key]

    def _shrink(self) -> None:
        entries = self._entries
        while self.bytes > self.max_bytes and entries:
            self._evict(next(iter(entries)))


def _doc_size(text: str | None) -> int:
    return _ENTRY_OVERHEAD + (0 if text is None else len(text))


def _doc(key: str, entry: _DocEntry) -> _Doc:
    # A fresh object each time: the application may change what a read returns to it.
    doc = None if entry.text is None else json.loads(entry.text)
    return _Doc(key, entry.version, doc, entry.score)
