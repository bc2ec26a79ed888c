"""The one settings object, built once from ``MEMSTREAM_*`` environment variables at the composition root.

Library code receives a :class:`Settings`; it never reads ``os.environ`` itself.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from infra.priority import MAX_NICE
from processors.model import Topics
from processors.sharding import check_shards
from schemas.errors import ConfigError

ENV_PREFIX = "MEMSTREAM_"
REDACTED = "***"
KAFKA_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
KAFKA_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")

# The standard AWS variables an s3:// LanceDB URI takes from the environment, as LanceDB storage options (object_store
# keys). MEMSTREAM_LANCEDB_STORAGE_OPTIONS names the same keys and wins over these.
AWS_STORAGE_ENV = {
    "AWS_ENDPOINT_URL": "aws_endpoint",
    "AWS_ENDPOINT_URL_S3": "aws_endpoint",
    "AWS_ACCESS_KEY_ID": "aws_access_key_id",
    "AWS_SECRET_ACCESS_KEY": "aws_secret_access_key",
    "AWS_SESSION_TOKEN": "aws_session_token",
    "AWS_DEFAULT_REGION": "aws_region",
    "AWS_REGION": "aws_region",
    "AWS_ALLOW_HTTP": "allow_http",
}
S3_SCHEMES = ("s3", "s3+ddb")  # s3+ddb: S3 with a DynamoDB commit store (see README, Beyond one machine)
# storage options whose values are credentials: redacted wherever settings are shown
SECRET_STORAGE_WORDS = ("secret", "token", "password", "credential", "sas", "account_key", "service_account_key")


@dataclass(frozen=True)
class Settings:
    """Every knob of memstream. Each field ``x`` is read from ``MEMSTREAM_X``."""

    home: Path = Path(".memstream")
    kafka_bootstrap: str = ""  # empty: the embedded broker under `home` (memstream up)
    redis_url: str = ""  # empty: the embedded Redis under `home`
    lancedb_uri: str = ""  # empty: <home>/lancedb; any LanceDB URI (s3://bucket/path on an S3 API) works
    # LanceDB storage options of an object-store URI, a JSON object of strings (e.g. {"aws_endpoint":
    # "http://minio:9000", "allow_http": "true"}); for s3:// the standard AWS_* variables fill in what it leaves out
    # (AWS_STORAGE_ENV). Never printed: values of secret keys are redacted in public()
    lancedb_storage_options: str = field(default="", repr=False)
    lancedb_table: str = "memories"
    # the sharded index: N LanceDB tables per generation, each written by its own index sink (own consumer group,
    # own standby), fed by the embedded topic's partitions p with p % N == shard (infra/sharded_store.py)
    index_shards: int = 1
    index_shard: int = -1  # the shard a sink process owns (`memstream worker --role sink --shard i`); -1: none set
    topic_prefix: str = "memstream."
    partitions: int = 4
    replication_factor: int = 1
    group_id: str = "memstream-worker"
    engine: str = "batch"  # batch: aiokafka getmany inside the faust worker; faust: a faust agent with take()
    # worker processes `memstream worker` runs, sharing the partitions as one consumer group: one Python process
    # tops out near one core, so two use both cores of a 2-core machine (the benchmark measures both)
    workers: int = 1
    window_size: int = 0  # 0: by embedder, 2000 records for hash, 256 for minilm (a window is ~5 s of MiniLM)
    window_ms: int = 5  # at 2,000 events/s on 1M memories: publish-to-searchable p50 43 -> 21 ms with 20 -> 5
    embedder: str = "minilm"  # minilm | hash
    embed_batch: int = 32
    # torch threads for MiniLM; 0: one per core this process may use (ingest runs in a process of its own, so
    # the cores the sink and broker leave idle go to the model: 249 texts/s with 2 threads vs 138 with 1, quiet)
    embed_threads: int = 0
    hash_dim: int = 384
    redis_prefix: str = "memstream:"
    redis_ttl_s: int = 0  # 0: memories never expire in Redis; >0: refreshed on every write
    embed_cache: str = "auto"  # shared Redis embedding cache: on | off | auto (on unless the embedder is cheaper)
    embed_cache_ttl_s: int = 7 * 24 * 3600
    embed_cache_local: int = -1  # vectors kept in the worker: -1 auto (50k, none for the cheap hash embedder)
    enable_idempotence: bool = False  # Tansu rejects idempotent producers; turn on for real Kafka
    acks: str = "all"
    linger_ms: int = 0  # the publisher sends whole batches it built itself: lingering only adds latency
    fetch_max_wait_ms: int = 10  # Tansu answers a waiting fetch only at this deadline: keep it short
    max_batch_bytes: int = 1 << 20
    # what `memstream worker` runs: all (the ingest path and the index sink as separate child processes under one
    # supervisor, so that the sink's merges and compactions never delay an ingest window), ingest (events -> Redis,
    # the embedded topic and the change feed), sink (the embedded topic -> LanceDB; one writes at a time, others
    # stand by), inline (ingest and sink in one process, one event loop: for tests and measurements)
    worker_role: str = "all"
    # most records per index-sink batch (it takes what the backlog holds, up to this). A merge's working set grows
    # with it (measured into 1M rows: +70 MB at 5k, +150 MB at 10k, +230-300 MB at 20k), its time about as much
    sink_batch: int = 10_000
    sink_wait_ms: int = 100  # how long the sink waits for its first records before it does maintenance instead
    sink_linger_ms: int = 1_000  # how long, after its first records, the sink gathers more into one batch
    sink_optimize_rows: int = 200_000  # rows the sink writes between compactions (also every optimize_every commits)
    # under load (infra.lance_store.MaintenancePolicy.load_compact_fragments), those compactions wait until the
    # table holds this many small fragments (0: they do not wait); the scalar indexes are rebuilt meanwhile and
    # the idle sink compacts everything once the load stops
    sink_load_compact_fragments: int = 256
    # maintenance by need (infra.lance_store.MaintenancePolicy): the scalar indexes are rebuilt between batches once
    # this many rows are unindexed (0: only by compactions), and the sink brings the whole table up to date
    # (indexes, compaction) once it has had nothing to write for sink_idle_ms
    sink_index_rows: int = 50_000
    sink_idle_ms: int = 1_000
    # the vector (ANN) index (infra.lance_store.AnnPolicy): built by the sink's compaction once the table holds
    # ann_min_rows rows (0: never), used by searches of scopes that large (a whole tenant), with ann_nprobes IVF
    # partitions probed and ann_refine_factor * k candidates re-ranked exactly; smaller scopes are scanned exactly
    ann_min_rows: int = 100_000
    ann_nprobes: int = 80  # 20 gave recall@10 0.83 for short word queries at 100k rows (PERFORMANCE, issue 24)
    ann_refine_factor: int = 10
    # the index sink's CPU priority (Linux nice, 0-19; 0: left as started): its catch-up and maintenance run on the
    # cores the reads and the ingest path leave idle (infra/priority.py; issue 24: right after a load its first
    # maintenance set the reads' p99). Freshness does not wait on it: the fresh tail in Redis serves new memories.
    # Off by default: measured on a quiet machine (PERFORMANCE.md, seventh session), nice 10 did not lower the reads'
    # p99 after a 100k load, and a 1M load ran the same at 10 and 0; on a busy host it can make reads win
    sink_nice: int = 0
    sink_keep_versions_s: int = 120  # LanceDB versions older than this are removed by the sink's compaction
    sink_sweep_after_s: int = 30  # fresh-tail entries the log did not bring within this are indexed from Redis
    # LanceDB's index and metadata caches (MB each, per process): readers keep index pages for search, the sink
    # only needs the key index its merges probe (measured at 1M rows: the sink's caches reached 212 MB of 512)
    lancedb_cache_mb: int = 256
    sink_cache_mb: int = 32
    # glibc's mmap threshold in the worker processes that write LanceDB (the index sink, an inline worker), not in
    # ingest processes or serve (infra/memory.py: keeps LanceDB's Arrow buffers from fragmenting the heap; measured
    # 1.3 GB -> 0.5 GB over 1M rows); 0 leaves glibc's dynamic default. See :attr:`process_mmap_threshold`.
    malloc_mmap_threshold: int = 131_072
    optimize_every: int = 200  # LanceDB commits between optimize() calls (many small commits slow search)
    index_every: int = 10  # LanceDB commits between rebuilds of the scalar indexes (each merge scans unindexed rows)
    # consistency: a store write that still fails after `store_retries` quick tries becomes a compensation,
    # retried with backoff (first..max delay, jittered) `compensation_attempts` times in all, then dead-lettered
    store_retries: int = 3
    compensation_attempts: int = 30
    compensation_first_delay_ms: int = 500
    compensation_max_delay_ms: int = 10_000
    reconcile_interval_s: int = 300  # the reconciler's timer (0: off); also runs when Redis lost its data
    reconcile_grace_s: int = 60  # rows ahead of the log younger than this are left alone (maybe in flight)
    fault_file: str = ""  # fault injection for tests and `memstream chaos` (JSON file; empty: off)
    read_cache_local: int = 10_000  # L1 entries per read kind (search, get, context) in each reading process
    read_cache_local_ttl_s: int = 60  # L1 entry lifetime (entries are also validated by generation on each read)
    read_cache_ttl_s: int = 3_600  # L2 (Redis) lifetime of cached search results and context blocks
    # per reading process: users' vectors held for scoped vector searches (processors/hot_vectors.py), in MiB
    # (0: off, every search goes to LanceDB), and the most memories a user may have to be held (bigger: LanceDB)
    read_hot_vectors_mb: int = 256
    read_hot_vectors_rows: int = 20_000
    context_budget: int = 1_000  # default token budget of a context block (tokens estimated as characters / 4)
    serve_host: str = "127.0.0.1"  # memstream serve
    # `memstream serve` processes sharing its port, each with its own connections and caches (0: one per core):
    # one Python process tops out near one core, most of it per request, not per row
    serve_workers: int = 0
    api_keys_file: str = ""  # empty: <home>/api-keys.json (hashes only; `memstream keys`)
    # Kafka security for a real cluster (passed to every aiokafka client and to faust's broker credentials):
    # PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL; SASL mechanism PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str = ""
    kafka_sasl_username: str = ""
    kafka_sasl_password: str = field(default="", repr=False)  # never logged or printed
    kafka_ssl_cafile: str = ""  # CA bundle that signed the brokers' certificates (default: the system's)
    kafka_ssl_certfile: str = ""  # client certificate for mutual TLS
    kafka_ssl_keyfile: str = ""
    kafka_ssl_check_hostname: bool = True
    serve_port: int = 8750
    log_level: str = "INFO"
    pointer_check_ms: int = 1000  # how often the worker and readers re-read the active-generation pointer
    _source: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    @property
    def window_records(self) -> int:
        """Records per window: big windows amortise commits, but a window must not hold minutes of model time."""
        if self.window_size:
            return self.window_size
        return 2_000 if self.embedder == "hash" else 256

    @property
    def shared_embed_cache(self) -> bool:
        """Measured: fetching a 384-d vector from Redis costs more than hashing the text again (~40 µs)."""
        return self.embed_cache == "on" or (self.embed_cache == "auto" and self.embedder != "hash")

    @property
    def local_embed_cache(self) -> int:
        """Vectors the worker keeps. Measured at 1M events: 50k hash vectors held ~90 MB of the worker to save
        ~14 µs per repeated text (the bench's texts never repeat); for MiniLM a hit saves ~10 ms."""
        if self.embed_cache_local >= 0:
            return self.embed_cache_local
        return 0 if self.embedder == "hash" else 50_000

    @property
    def keys_path(self) -> Path:
        return Path(self.api_keys_file) if self.api_keys_file else self.home / "api-keys.json"

    @property
    def lancedb_path(self) -> str:
        return self.lancedb_uri or str(self.home / "lancedb")

    @property
    def lancedb_on_object_store(self) -> bool:
        """Whether LanceDB lives on an object store (s3://, gs://, az://...) rather than a local directory."""
        return is_object_store_uri(self.lancedb_path)

    @property
    def lancedb_storage(self) -> dict[str, str]:
        """The storage options every LanceDB connection of this deployment passes (empty on local disk)."""
        if not self.lancedb_storage_options or not self.lancedb_on_object_store:
            return {}
        return parse_storage_options(self.lancedb_storage_options)

    def worker_processes(self) -> list[Settings]:
        """The settings of each process `memstream worker` runs: each runs one role in one process (never ``all``,
        ``workers`` 1), the ingest processes share the partitions as one consumer group.

        ``all``: ``workers`` ingest processes and one index sink. Otherwise ``workers`` processes of the role, where
        LanceDB maintenance (index rebuilds, compaction) and the reconcile timer run in the first only: two
        processes rebuilding one table's indexes at once would do the work twice, and one timer is enough.
        Reconcile requests, compensations and dead letters are shared out by partition like the events.
        """
        first = self.with_(workers=1)
        if self.worker_role == "sink":  # one table, one writer: more sinks would only stand by
            return [first]
        if self.worker_role == "all":  # the sink's merges and compactions never share a loop with an ingest window
            ingest = self.with_(worker_role="ingest").worker_processes()
            return [*ingest, *first.with_(worker_role="sink").sink_processes()]
        rest = first.with_(optimize_every=0, index_every=0, reconcile_interval_s=0, worker_role="ingest")
        return [first] + [rest] * (self.workers - 1)

    def sink_processes(self) -> list[Settings]:
        """One index sink per shard (its own table, consumer group and standby); one sink when unsharded."""
        if self.index_shards == 1:
            return [self.with_(index_shard=-1)]
        return [self.with_(index_shard=i) for i in range(self.index_shards)]

    @property
    def sink_shard(self) -> int:
        """The shard this process' index sink owns (0 when unsharded)."""
        return max(self.index_shard, 0)

    @property
    def supervised(self) -> bool:
        """Whether `memstream worker` supervises child processes (:meth:`worker_processes`) or runs in-process."""
        return self.worker_role == "all" or self.workers > 1

    @property
    def process_mmap_threshold(self) -> int:
        """The mmap threshold a `memstream worker` process of this role fixes: ``malloc_mmap_threshold`` where it
        writes LanceDB (sink, inline), 0 (glibc's dynamic default) in an ingest-only process. Fixed at 128 KiB,
        every block above it is a fresh mmap whose pages fault in on first touch and are unmapped on free: the
        MiniLM model encoded 69 texts/s with it and 161 without (2 threads, 1,898 texts,
        tools/perf/minilm_alone.py with ``tune_malloc`` applied first), and a 1 MB join of record-sized pieces
        took 2.1 ms against 0.38 (each produce request and each Redis pipeline of vectors is such a block)."""
        return self.malloc_mmap_threshold if self.runs_sink else 0

    @property
    def runs_ingest(self) -> bool:
        return self.worker_role in ("all", "inline", "ingest")

    @property
    def runs_sink(self) -> bool:
        return self.worker_role in ("all", "inline", "sink")

    @property
    def sink_group_id(self) -> str:
        """The index sink's consumer group (on the embedded topic): its committed offsets say what LanceDB holds."""
        if self.index_shards == 1:
            return f"{self.group_id}.index"
        # the count is in the name: a sink of another layout never joins (nor commits for) this one's group
        return f"{self.group_id}.index.s{self.sink_shard}of{self.index_shards}"

    def with_(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Build from a mapping such as ``os.environ``; unknown ``MEMSTREAM_*`` names are an error."""
        hints = get_type_hints(cls)
        known = {f.name for f in fields(cls) if not f.name.startswith("_")}
        values: dict[str, Any] = {}
        for name, raw in env.items():
            if not name.startswith(ENV_PREFIX):
                continue
            key = name[len(ENV_PREFIX) :].lower()
            if key not in known:
                raise ConfigError(f"unknown setting {name} (known: {', '.join(sorted(k.upper() for k in known))})")
            values[key] = _parse(name, raw, hints[key])
        if str(values.get("lancedb_uri", "")).partition("://")[0] in S3_SCHEMES:
            options = aws_storage_options(env)
            options.update(parse_storage_options(values.get("lancedb_storage_options", "")))
            values["lancedb_storage_options"] = json.dumps(options, sort_keys=True) if options else ""
        settings = cls(**values, _source=dict(env))
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.worker_role not in {"all", "ingest", "sink", "inline"}:
            raise ConfigError(f"MEMSTREAM_WORKER_ROLE must be all, ingest, sink or inline, not {self.worker_role!r}")
        if self.lancedb_cache_mb < 1 or self.sink_cache_mb < 1:
            raise ConfigError("MEMSTREAM_LANCEDB_CACHE_MB and MEMSTREAM_SINK_CACHE_MB must be at least 1")
        if self.sink_index_rows < 0 or self.sink_idle_ms < 0 or self.sink_load_compact_fragments < 0:
            raise ConfigError(
                "MEMSTREAM_SINK_INDEX_ROWS, MEMSTREAM_SINK_IDLE_MS and MEMSTREAM_SINK_LOAD_COMPACT_FRAGMENTS must be 0 "
                "or more"
            )
        if not 0 <= self.sink_nice <= MAX_NICE:
            raise ConfigError(f"MEMSTREAM_SINK_NICE must be 0 (left alone) to {MAX_NICE}, not {self.sink_nice}")
        if self.ann_min_rows < 0 or self.ann_nprobes < 1 or self.ann_refine_factor < 1:
            raise ConfigError(
                "MEMSTREAM_ANN_MIN_ROWS must be 0 (no vector index) or more, MEMSTREAM_ANN_NPROBES and "
                "MEMSTREAM_ANN_REFINE_FACTOR at least 1"
            )
        if self.sink_batch < 1 or self.sink_wait_ms < 1 or self.sink_linger_ms < 0:
            raise ConfigError(
                "MEMSTREAM_SINK_BATCH and MEMSTREAM_SINK_WAIT_MS must be at least 1, MEMSTREAM_SINK_LINGER_MS 0 or more"
            )
        if self.engine not in {"batch", "faust"}:
            raise ConfigError(f"MEMSTREAM_ENGINE must be 'batch' or 'faust', not {self.engine!r}")
        if self.embedder not in {"minilm", "hash"}:
            raise ConfigError(f"MEMSTREAM_EMBEDDER must be 'minilm' or 'hash', not {self.embedder!r}")
        if self.embed_cache_local < -1:
            raise ConfigError("MEMSTREAM_EMBED_CACHE_LOCAL must be -1 (automatic), 0 (none) or more")
        if self.window_size < 0:
            raise ConfigError("MEMSTREAM_WINDOW_SIZE must be 0 (automatic) or more")
        if self.read_hot_vectors_mb < 0 or self.read_hot_vectors_rows < 0:
            raise ConfigError("MEMSTREAM_READ_HOT_VECTORS_MB and MEMSTREAM_READ_HOT_VECTORS_ROWS must be 0 or more")
        if self.serve_workers < 0:
            raise ConfigError("MEMSTREAM_SERVE_WORKERS must be 0 (one per core) or more")
        if self.embed_threads < 0:
            raise ConfigError("MEMSTREAM_EMBED_THREADS must be 0 (one per core) or more")
        names = ("partitions", "window_ms", "embed_batch", "hash_dim", "store_retries", "workers")
        for name in names:
            if getattr(self, name) < 1:
                raise ConfigError(f"MEMSTREAM_{name.upper()} must be at least 1")
        if self.embed_cache not in {"auto", "on", "off"}:
            raise ConfigError(f"MEMSTREAM_EMBED_CACHE must be auto, on or off, not {self.embed_cache!r}")
        if self.compensation_attempts < 1 or self.compensation_first_delay_ms < 0:
            raise ConfigError("MEMSTREAM_COMPENSATION_ATTEMPTS must be at least 1 and its delays not negative")
        if not 16 <= self.context_budget <= 100_000:
            raise ConfigError("MEMSTREAM_CONTEXT_BUDGET must be between 16 and 100000 tokens")
        if self.acks not in {"all", "1", "0"}:
            raise ConfigError("MEMSTREAM_ACKS must be all, 1 or 0")
        self._validate_shards()
        self._validate_addresses()
        self._validate_kafka_security()
        self._validate_lancedb_location()

    def _validate_shards(self) -> None:
        check_shards(self.index_shards, self.partitions)
        if not -1 <= self.index_shard < self.index_shards:
            raise ConfigError(
                f"MEMSTREAM_INDEX_SHARD (--shard) must be a shard of MEMSTREAM_INDEX_SHARDS={self.index_shards}: "
                f"0 to {self.index_shards - 1}, not {self.index_shard}"
            )
        if self.index_shards > 1 and self.index_shard < 0 and self.worker_role in ("sink", "inline"):
            raise ConfigError(
                f"with MEMSTREAM_INDEX_SHARDS={self.index_shards} each index sink owns one shard: run "
                "`memstream worker` (role all: one sink per shard) or `memstream worker --role sink --shard i` "
                "for each shard i"
            )

    def _validate_lancedb_location(self) -> None:
        options = parse_storage_options(self.lancedb_storage_options)
        if options and not self.lancedb_on_object_store:
            raise ConfigError(
                "MEMSTREAM_LANCEDB_STORAGE_OPTIONS are for an object-store MEMSTREAM_LANCEDB_URI (s3://bucket/path), "
                f"not the local directory {self.lancedb_path!r}"
            )
        if self.lancedb_uri.startswith("s3://") and not self.lancedb_uri[len("s3://") :].split("/")[0]:
            raise ConfigError(f"MEMSTREAM_LANCEDB_URI={self.lancedb_uri!r} names no bucket (s3://bucket/path)")

    def _validate_addresses(self) -> None:
        """A malformed broker or Redis address is one clear line at start, not a driver's traceback later."""
        for server in filter(None, (part.strip() for part in self.kafka_bootstrap.split(","))):
            host, sep, port = server.rpartition(":")
            if not sep or not host or "/" in server or not port.isdigit() or not 0 < int(port) < 65_536:
                raise ConfigError(
                    f"MEMSTREAM_KAFKA_BOOTSTRAP={self.kafka_bootstrap!r}: {server!r} is not host:port "
                    "(a comma-separated list such as broker1:9092,broker2:9092, no scheme)"
                )
        if self.redis_url:
            scheme, sep, rest = self.redis_url.partition("://")
            if not sep or scheme not in ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster") or not rest:
                raise ConfigError(
                    f"MEMSTREAM_REDIS_URL={redact_url(self.redis_url)!r} is not a Redis URL "
                    "(redis://[user:password@]host:port/db, rediss:// for TLS, unix:///path, "
                    "or redis+cluster://host:port[,host:port...] for a Redis Cluster, several seed nodes)"
                )

    def _validate_kafka_security(self) -> None:
        if self.kafka_security_protocol not in KAFKA_SECURITY_PROTOCOLS:
            raise ConfigError(
                f"MEMSTREAM_KAFKA_SECURITY_PROTOCOL must be one of {', '.join(KAFKA_SECURITY_PROTOCOLS)}, "
                f"not {self.kafka_security_protocol!r}"
            )
        sasl = self.kafka_security_protocol.startswith("SASL_")
        if sasl and self.kafka_sasl_mechanism not in KAFKA_SASL_MECHANISMS:
            raise ConfigError(
                f"MEMSTREAM_KAFKA_SASL_MECHANISM must be one of {', '.join(KAFKA_SASL_MECHANISMS)} with "
                f"{self.kafka_security_protocol}, not {self.kafka_sasl_mechanism!r}"
            )
        if sasl and not (self.kafka_sasl_username and self.kafka_sasl_password):
            raise ConfigError(
                "MEMSTREAM_KAFKA_SASL_USERNAME and MEMSTREAM_KAFKA_SASL_PASSWORD are both needed for SASL"
            )
        if not sasl and (self.kafka_sasl_mechanism or self.kafka_sasl_username or self.kafka_sasl_password):
            raise ConfigError(
                "MEMSTREAM_KAFKA_SASL_* are set but MEMSTREAM_KAFKA_SECURITY_PROTOCOL is "
                f"{self.kafka_security_protocol}: use SASL_SSL (or SASL_PLAINTEXT on a trusted network)"
            )
        for name in ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile"):
            value = getattr(self, name)
            if value and not Path(value).is_file():
                raise ConfigError(f"MEMSTREAM_{name.upper()}={value!r}: no such file")
        if bool(self.kafka_ssl_certfile) != bool(self.kafka_ssl_keyfile):
            raise ConfigError("MEMSTREAM_KAFKA_SSL_CERTFILE and MEMSTREAM_KAFKA_SSL_KEYFILE go together")

    def __repr__(self) -> str:
        """Secrets redacted: a settings object in a log line or a traceback shows no password."""
        body = ", ".join(f"{k}={v!r}" for k, v in self.public().items())
        return f"Settings({body})"

    def to_env(self) -> dict[str, str]:
        """The inverse of :meth:`from_env`: every setting as a ``MEMSTREAM_*`` variable, for child processes."""
        out = {}
        for f in fields(self):
            if f.name.startswith("_"):
                continue
            value = getattr(self, f.name)
            text = ("true" if value else "false") if isinstance(value, bool) else str(value)
            out[f"{ENV_PREFIX}{f.name.upper()}"] = text
        return out

    def public(self) -> dict[str, Any]:
        """The settings as plain JSON-able values (for ``--json`` and logs), secrets redacted."""
        out = {f.name: _plain(getattr(self, f.name)) for f in fields(self) if not f.name.startswith("_")}
        if out["kafka_sasl_password"]:
            out["kafka_sasl_password"] = REDACTED
        for name in ("redis_url", "kafka_bootstrap"):
            out[name] = redact_url(out[name])
        if out["lancedb_storage_options"]:
            try:
                options = redact_storage_options(parse_storage_options(self.lancedb_storage_options))
                out["lancedb_storage_options"] = json.dumps(options, sort_keys=True)
            except ConfigError:  # not JSON: shown as nothing rather than as text that may hold a secret
                out["lancedb_storage_options"] = REDACTED
        return out


def is_object_store_uri(uri: str) -> bool:
    """``scheme://...`` other than ``file://``: LanceDB reaches it through an object store, not the file system."""
    scheme, sep, _ = uri.partition("://")
    return bool(sep) and scheme.isascii() and scheme.replace("+", "").isalnum() and scheme != "file"


def aws_storage_options(env: Mapping[str, str]) -> dict[str, str]:
    """LanceDB storage options from the standard AWS variables in ``env`` (AWS_REGION wins over the default)."""
    out: dict[str, str] = {}
    for name, key in AWS_STORAGE_ENV.items():  # ordered: the more specific variable comes later and wins
        value = env.get(name, "")
        if value:
            out[key] = value
    return out


def parse_storage_options(raw: str) -> dict[str, str]:
    """MEMSTREAM_LANCEDB_STORAGE_OPTIONS: a JSON object; numbers and booleans become strings as LanceDB wants."""
    if not raw.strip():
        return {}
    try:
        parsed = json.loads(raw)
    except ValueError:
        raise ConfigError("MEMSTREAM_LANCEDB_STORAGE_OPTIONS is not JSON (a JSON object of strings)") from None
    if not isinstance(parsed, dict):
        raise ConfigError("MEMSTREAM_LANCEDB_STORAGE_OPTIONS must be a JSON object of strings")
    out: dict[str, str] = {}
    for key, value in parsed.items():
        if isinstance(value, bool):
            out[key] = "true" if value else "false"
        elif isinstance(value, str | int | float):
            out[key] = str(value)
        else:
            raise ConfigError(f"MEMSTREAM_LANCEDB_STORAGE_OPTIONS[{key!r}] must be a string, number or boolean")
    return out


def redact_storage_options(options: Mapping[str, str]) -> dict[str, str]:
    """Storage options with credential values replaced (the key id stays: it names the account, it is no secret)."""
    return {k: REDACTED if any(w in k.lower() for w in SECRET_STORAGE_WORDS) else v for k, v in options.items()}


def redact_url(url: str) -> str:
    """``redis://user:secret@host`` -> ``redis://user:***@host``: URLs may carry a password."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user, colon, _ = credentials.partition(":")
    return f"{scheme}://{user}{':' + REDACTED if colon else ''}@{host}"


def _parse(name: str, raw: str, kind: Any) -> Any:
    try:
        if kind is bool or kind == "bool":
            lowered = raw.strip().lower()
            if lowered in {"1", "true", "yes", "on"}:
                return True
            if lowered in {"0", "false", "no", "off", ""}:
                return False
            raise ValueError(raw)
        if kind is int or kind == "int":
            return int(raw)
        if kind is Path or kind == "Path":
            return Path(raw)
        return raw
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a valid {getattr(kind, '__name__', kind)}") from None


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value
