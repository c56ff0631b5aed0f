"""Which replica holds which KV blocks, kept from the replicas' KV events.

Each replica's block pool publishes ``BlockStored`` (a full block got a content hash),
``BlockRemoved`` (its content is gone: evicted or reset) and ``AllBlocksCleared`` events
(engine/kv_events.py). The router applies them here, per replica, and reads the result as the
``cached`` container of ``policy.ReplicaState``. The same hash can sit in several pages of one
replica (two requests computed the same block before either was cached), so a replica keeps
the hash while any of its pages still holds it.

Events are told apart by their fields (a stored event carries ``token_ids``, a removed one a
``block_hash`` only, a clear neither), so the index depends on the event shapes of the fixed
interface rather than on importing the engine's classes.
"""
from __future__ import annotations

from typing import Iterable, Iterator


class ReplicaIndex:
    """The block hashes one replica holds: ``hash in index`` is the routing question."""

    def __init__(self) -> None:
        self._pages: dict[bytes, set[int]] = {}   # hash -> block ids holding it
        self._hash_of: dict[int, bytes] = {}      # block id -> the hash it holds
        self.num_events = 0

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._pages

    def __len__(self) -> int:
        return len(self._pages)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._pages)

    def stored(self, block_hash: bytes, block_id: int) -> None:
        old = self._hash_of.get(block_id)
        if old is not None and old != block_hash:   # a missed removal: the page was reused
            self.removed(old, block_id)
        self._hash_of[block_id] = block_hash
        self._pages.setdefault(block_hash, set()).add(block_id)

    def removed(self, block_hash: bytes, block_id: int) -> None:
        pages = self._pages.get(block_hash)
        if pages is not None:
            pages.discard(block_id)
            if not pages:
                del self._pages[block_hash]
        if self._hash_of.get(block_id) == block_hash:
            del self._hash_of[block_id]

    def clear(self) -> None:
        self._pages.clear()
        self._hash_of.clear()

    def apply(self, events: Iterable[object]) -> None:
        """Apply a batch of KV events in order."""
        for ev in events:
            self.num_events += 1
            block_hash = getattr(ev, "block_hash", None)
            if block_hash is None:
                self.clear()                                   # AllBlocksCleared
            elif getattr(ev, "token_ids", None) is not None:
                self.stored(block_hash, ev.block_id)           # BlockStored
            else:
                self.removed(block_hash, ev.block_id)          # BlockRemoved


class PrefixIndex:
    """One ``ReplicaIndex`` per replica; a replica that dies loses its entries at once."""

    def __init__(self, num_replicas: int) -> None:
        self.replicas = [ReplicaIndex() for _ in range(num_replicas)]

    def __getitem__(self, replica: int) -> ReplicaIndex:
        return self.replicas[replica]

    def __len__(self) -> int:
        return len(self.replicas)

    def apply(self, replica: int, events: Iterable[object]) -> None:
        self.replicas[replica].apply(events)

    def drop_replica(self, replica: int) -> None:
        """Forget everything a replica held (it died, or restarted with an empty cache)."""
        self.replicas[replica].clear()

    def holders(self, block_hash: bytes) -> list[int]:
        """Replicas holding ``block_hash`` (tests, debugging)."""
        return [i for i, r in enumerate(self.replicas) if block_hash in r]
