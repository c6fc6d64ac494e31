"""What can go wrong with a run store, as exceptions whose message is the one line a user sees."""
from __future__ import annotations


class StoreError(RuntimeError):
    """The run store cannot be used as asked (missing, not SQLite, damaged, newer schema, unknown run, ...)."""


class StoreMissing(StoreError):
    """A reader (create=False) found no store, or an empty one: nothing has been run with this runs root yet."""


class StoreDamaged(StoreError):
    """The store file fails SQLite's integrity check (or a read hits a malformed page): refused, never written to."""


class RunNotFound(StoreError, KeyError):
    """No run with this id in the store."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else "run not found"
