"""The one error hierarchy of memstream.

Every error carries its policy: ``retriable`` says whether doing the same thing again can succeed. Adapters
wrap driver errors (``raise StoreError(...) from exc``) so that callers decide on policy, not on driver types.
"""

from __future__ import annotations


class MemStreamError(Exception):
    """Root of every error memstream raises on purpose."""

    retriable: bool = False


class SchemaError(MemStreamError, ValueError):
    """Input that does not match its schema (an event, a request, an argument), with the field at fault.

    Never retried: an event goes to the dead-letter topic, a request is a 400. Also a ``ValueError``, so Python
    callers of ``memstream.Memory`` catch bad arguments the way they catch them from any library.
    """

    retriable = False

    def __init__(self, reason: str, *, field: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field


class ScopeMismatchError(SchemaError):
    """An update or delete (or an add reusing an id) naming another user than the one the memory belongs to.

    Refused and dead-lettered, the memory untouched: an event may change only memories of its own scope.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason, field="user_id")


class NotFoundError(SchemaError):
    """An update or delete of a memory the tenant does not have (never added, deleted, or only another tenant's:
    the same words for each). A 404 over HTTP."""

    def __init__(self, memory_id: str) -> None:
        super().__init__(f"no such memory {memory_id!r} (or it was deleted)", field="memory_id")
        self.memory_id = memory_id


class PoisonBatchError(SchemaError):
    """A record batch the consumer could not decode (unknown codec, corrupt bytes, bad CRC, too large to fetch).

    Its records cannot be read, so the whole batch goes to the dead-letter topic (raw bytes, offset range) and
    the partition moves past it. The subclass names the reason, and the dead-letter counters count by it.
    """


class UnsupportedCodecBatchError(PoisonBatchError):
    """The batch is compressed with a codec this consumer cannot decode."""


class CorruptBatchError(PoisonBatchError):
    """The batch's bytes are damaged: a CRC mismatch, a truncated or undecompressable payload, bad record framing."""


class OversizeBatchError(PoisonBatchError):
    """The batch is larger than the consumer's fetch limit, so the broker never hands it over whole."""


POISON_KINDS: dict[str, type[PoisonBatchError]] = {
    "unsupported-codec": UnsupportedCodecBatchError,
    "corrupt-batch": CorruptBatchError,
    "record-too-large": OversizeBatchError,
}


class ConfigError(MemStreamError):
    """A setting that cannot work (bad URL, unknown embedder, mismatched dimension)."""


class DependencyVersionError(ConfigError):
    """An installed library is not the release a part of memstream was written against (e.g. the poison-batch
    guard, which replaces aiokafka internals): the message names both versions. The process refuses to start."""


class AuthError(MemStreamError):
    """A server refused memstream's credentials (a wrong password, a missing permission). Not an outage: a
    process refuses to start on it instead of retrying."""


class StoreError(MemStreamError):
    """A store (LanceDB or Redis) failed to read or write. Retriable unless said otherwise."""

    retriable = True

    def __init__(self, message: str, *, retriable: bool = True) -> None:
        super().__init__(message)
        self.retriable = retriable


class RedisClusterError(StoreError):
    """Redis Cluster said something a retry on the same client cannot fix by itself, and the message names it: a
    MOVED or ASK redirect met by a single-node client (the URL names a cluster node), a CROSSSLOT refusal, a
    cluster that is down (CLUSTERDOWN) or not configured (no slots, ``cluster_state:fail``). Retriable, as an
    outage is: a window waits as a compensation instead of being dead-lettered while the cluster is fixed."""


class BrokerError(MemStreamError):
    """The Kafka broker failed to accept or deliver records."""

    retriable = True


class ServiceError(MemStreamError):
    """A local service (broker or Redis launched by memstream) could not be started or reached."""


class EmbedderError(MemStreamError):
    """The embedding model failed."""

    retriable = True
