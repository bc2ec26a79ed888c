from pathlib import Path

import pytest

from infra.settings import Settings
from schemas.errors import ConfigError


def test_defaults_need_no_environment() -> None:
    settings = Settings.from_env({})
    assert settings.embedder == "minilm"
    assert settings.engine == "batch"
    assert settings.enable_idempotence is False  # Tansu rejects idempotent producers
    assert settings.lancedb_path == str(Path(".memstream") / "lancedb")
    assert settings.topics.events == "memstream.events"


def test_values_are_parsed_by_type_and_other_variables_ignored() -> None:
    settings = Settings.from_env(
        {
            "MEMSTREAM_PARTITIONS": "8",
            "MEMSTREAM_ENABLE_IDEMPOTENCE": "yes",
            "MEMSTREAM_HOME": "/tmp/x",
            "MEMSTREAM_TOPIC_PREFIX": "a.",
            "PATH": "/bin",
        }
    )
    assert settings.partitions == 8
    assert settings.enable_idempotence is True
    assert settings.home == Path("/tmp/x")
    assert settings.topics.dlq == "a.dlq"
    assert settings.lancedb_path == "/tmp/x/lancedb"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MEMSTREAM_PARTITONS": "8"}, "unknown setting MEMSTREAM_PARTITONS"),
        ({"MEMSTREAM_PARTITIONS": "eight"}, "not a valid int"),
        ({"MEMSTREAM_PARTITIONS": "0"}, "at least 1"),
        ({"MEMSTREAM_ENGINE": "spark"}, "MEMSTREAM_ENGINE"),
        ({"MEMSTREAM_EMBEDDER": "openai"}, "MEMSTREAM_EMBEDDER"),
        ({"MEMSTREAM_ENABLE_IDEMPOTENCE": "maybe"}, "not a valid bool"),
        ({"MEMSTREAM_EMBED_CACHE": "sometimes"}, "MEMSTREAM_EMBED_CACHE"),
        ({"MEMSTREAM_SINK_CACHE_MB": "0"}, "MEMSTREAM_SINK_CACHE_MB"),
        ({"MEMSTREAM_ANN_MIN_ROWS": "-1"}, "MEMSTREAM_ANN_MIN_ROWS"),
        ({"MEMSTREAM_ANN_NPROBES": "0"}, "MEMSTREAM_ANN_NPROBES"),
        ({"MEMSTREAM_ANN_REFINE_FACTOR": "0"}, "MEMSTREAM_ANN_REFINE_FACTOR"),
        ({"MEMSTREAM_EMBED_THREADS": "-1"}, "MEMSTREAM_EMBED_THREADS"),
    ],
)
def test_bad_settings_fail_with_the_variable_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_shared_embedding_cache_is_off_only_for_the_cheap_embedder() -> None:
    assert Settings(embedder="minilm").shared_embed_cache
    assert not Settings(embedder="hash").shared_embed_cache
    assert Settings(embedder="hash", embed_cache="on").shared_embed_cache
    assert not Settings(embedder="minilm", embed_cache="off").shared_embed_cache


def test_local_embedding_cache_is_sized_by_embedder_unless_set() -> None:
    assert Settings(embedder="minilm").local_embed_cache == 50_000
    assert Settings(embedder="hash").local_embed_cache == 0
    assert Settings(embedder="hash", embed_cache_local=1_000).local_embed_cache == 1_000
    assert Settings(embedder="minilm", embed_cache_local=0).local_embed_cache == 0
    with pytest.raises(ConfigError, match="EMBED_CACHE_LOCAL"):
        Settings(embed_cache_local=-2).validate()


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(AttributeError):
        settings.partitions = 2  # type: ignore[misc]
    assert settings.with_(partitions=2).partitions == 2 and settings.partitions == 4


def test_to_env_round_trips_every_setting() -> None:
    settings = Settings(home=Path("/tmp/h"), partitions=7, enable_idempotence=True, embedder="hash", window_size=0)
    env = settings.to_env()
    assert env["MEMSTREAM_ENABLE_IDEMPOTENCE"] == "true" and env["MEMSTREAM_PARTITIONS"] == "7"
    assert Settings.from_env(env) == settings


def test_worker_processes_share_out_the_singletons() -> None:
    settings = Settings.from_env(
        {"MEMSTREAM_WORKERS": "3", "MEMSTREAM_OPTIMIZE_EVERY": "50", "MEMSTREAM_WORKER_ROLE": "inline"}
    )
    first, *rest = settings.worker_processes()
    assert len(rest) == 2
    assert all(each.workers == 1 for each in [first, *rest])  # each child runs one process, not another group
    assert first.worker_role == "inline" and all(each.worker_role == "ingest" for each in rest)
    assert first.optimize_every == 50 and first.reconcile_interval_s == settings.reconcile_interval_s
    assert all(each.optimize_every == 0 and each.index_every == 0 and each.reconcile_interval_s == 0 for each in rest)
    assert all(each.group_id == settings.group_id for each in rest)  # one consumer group shares the partitions


def test_the_default_worker_runs_ingest_and_the_sink_as_processes_of_their_own() -> None:
    settings = Settings.from_env({"MEMSTREAM_WORKERS": "2", "MEMSTREAM_OPTIMIZE_EVERY": "50"})
    assert settings.worker_role == "all" and settings.supervised
    children = settings.worker_processes()
    assert [each.worker_role for each in children] == ["ingest", "ingest", "sink"]  # never "all": no recursion
    assert all(each.workers == 1 and not each.supervised for each in children)
    first, second, sink = children
    assert first.reconcile_interval_s == settings.reconcile_interval_s and second.reconcile_interval_s == 0
    assert sink.optimize_every == 50 and sink.index_every == settings.index_every  # the one LanceDB writer maintains
    one = Settings(workers=1).worker_processes()
    assert [each.worker_role for each in one] == ["ingest", "sink"]


def test_one_role_in_one_process_is_not_supervised() -> None:
    for role in ("ingest", "sink", "inline"):
        assert not Settings(worker_role=role).supervised
        assert [each.worker_role for each in Settings(worker_role=role).worker_processes()] == [role]
    assert Settings(worker_role="ingest", workers=2).supervised  # --processes 2: a supervisor of two
    with pytest.raises(ConfigError, match="WORKER_ROLE"):
        Settings.from_env({"MEMSTREAM_WORKER_ROLE": "both"})


def test_workers_must_be_at_least_one() -> None:
    with pytest.raises(ConfigError, match="WORKERS"):
        Settings.from_env({"MEMSTREAM_WORKERS": "0"})


def test_torch_threads_default_to_one_per_core_and_can_be_pinned() -> None:
    assert Settings.from_env({}).embed_threads == 0  # resolved to the usable cores when the model loads
    assert Settings.from_env({"MEMSTREAM_EMBED_THREADS": "1"}).embed_threads == 1


@pytest.mark.parametrize(("role", "fixed"), [("sink", True), ("inline", True), ("all", True), ("ingest", False)])
def test_only_processes_that_write_lancedb_fix_the_mmap_threshold(role: str, fixed: bool) -> None:
    # an ingest process embeds and produces in large blocks, each a fresh mmap under a fixed threshold
    settings = Settings.from_env({"MEMSTREAM_WORKER_ROLE": role, "MEMSTREAM_MALLOC_MMAP_THRESHOLD": "262144"})
    assert settings.process_mmap_threshold == (262_144 if fixed else 0)
