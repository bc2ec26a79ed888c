"""The running system: the worker app, engines, worker processes, stores, change feed, replay, reads.

Imports neither streams.surface nor streams.tools (tests/unit/streams/test_layout.py)."""
