"""The four abstract parts every memkit recipe is built from."""

from memkit.interfaces.injector import Injector, MemoryPrefix
from memkit.interfaces.pool import Evicted, MemoryPool
from memkit.interfaces.retriever import Retriever
from memkit.interfaces.store import LongTermStore, StoreEntries

__all__ = ["Evicted", "Injector", "LongTermStore", "MemoryPool", "MemoryPrefix", "Retriever", "StoreEntries"]
