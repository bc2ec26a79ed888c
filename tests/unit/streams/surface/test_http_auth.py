"""streams.surface.http: who may call which route (401 / 403 with a reason), and the tenant a request gets."""

from __future__ import annotations

import logging
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from infra.api_keys import KeyStore, Principal, Role
from schemas.errors import ConfigError, SchemaError
from streams.surface.http import ROUTE_ROLES, Caller, Forbidden, authorize, check_no_auth


@pytest.fixture
def keys(tmp_path: Path) -> tuple[KeyStore, dict[Role, str]]:
    store = KeyStore(tmp_path / "keys.json")
    return store, {role: store.create("acme", role)[1] for role in Role}


def _body(response: web.Response) -> dict[str, object]:
    assert isinstance(response.body, bytes)
    body = orjson.loads(response.body)
    assert isinstance(body, dict)
    return body


def test_only_healthz_is_open(keys: tuple[KeyStore, dict[Role, str]]) -> None:
    store, _ = keys
    open_routes = [route for route in ROUTE_ROLES if isinstance(authorize(store, route, None), Caller)]
    assert open_routes == ["/healthz"]


@pytest.mark.parametrize("route", [*sorted(r for r in ROUTE_ROLES if r != "/healthz"), "unmatched"])
@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "an API key is required"),
        ("", "an API key is required"),
        ("Basic dXNlcjpwdw==", "must read 'Bearer <key>'"),
        ("Bearer ", "must read 'Bearer <key>'"),
        ("Bearer ms_12345678_notakey", "not valid"),
    ],
)
def test_no_valid_key_is_401_with_a_challenge_and_a_reason(
    keys: tuple[KeyStore, dict[Role, str]], route: str, header: str | None, reason: str
) -> None:
    store, _ = keys
    response = authorize(store, route, header)
    assert isinstance(response, web.Response) and response.status == 401
    assert response.headers["WWW-Authenticate"].startswith('Bearer realm="memstream"')
    assert reason in str(_body(response)["error"])


@pytest.mark.parametrize(
    ("role", "route", "allowed"),
    [
        (Role.READ, "/v1/search", True),
        (Role.READ, "/v1/memories/{memory_id}", True),
        (Role.READ, "/v1/context", True),
        (Role.READ, "/readyz", True),
        (Role.READ, "/openapi.json", True),
        (Role.READ, "/v1/events", False),
        (Role.READ, "/metrics", False),
        (Role.WRITE, "/v1/events", True),
        (Role.WRITE, "/v1/search", True),
        (Role.WRITE, "/metrics", False),
        (Role.ADMIN, "/metrics", True),
        (Role.ADMIN, "/v1/events", True),
    ],
)
def test_roles_decide_routes(keys: tuple[KeyStore, dict[Role, str]], role: Role, route: str, allowed: bool) -> None:
    store, issued = keys
    outcome = authorize(store, route, f"Bearer {issued[role]}")
    if allowed:
        assert isinstance(outcome, Caller) and outcome.principal is not None
        assert (outcome.principal.tenant, outcome.principal.role) == ("acme", role)
    else:
        assert isinstance(outcome, web.Response) and outcome.status == 403
        error = str(_body(outcome)["error"])
        assert f"role is {role.value}" in error and route in error


def test_the_scheme_is_case_insensitive(keys: tuple[KeyStore, dict[Role, str]]) -> None:
    store, issued = keys
    assert isinstance(authorize(store, "/v1/search", f"bearer {issued[Role.READ]}"), Caller)


def test_without_a_key_store_every_caller_is_trusted() -> None:
    caller = authorize(None, "/metrics", None)
    assert isinstance(caller, Caller) and caller.principal is None
    assert caller.tenant("t9", True) == "t9" and caller.tenant(None, False) == "default"


def test_the_tenant_is_the_keys_and_a_different_one_is_forbidden() -> None:
    caller = Caller(Principal("acme", Role.READ, "abcd1234"))
    assert caller.tenant(None, False) == "acme"
    assert caller.tenant("acme", True) == "acme"
    with pytest.raises(Forbidden, match="not this API key's tenant") as refused:
        caller.tenant("globex", True)
    assert refused.value.field == "tenant_id"


@pytest.mark.parametrize("bad", [None, "", "a b", "x" * 129, 5, ["acme"]])
def test_a_malformed_tenant_is_a_400_naming_the_field(bad: object) -> None:
    for caller in (Caller(Principal("acme", Role.READ, "abcd1234")), Caller(None)):
        with pytest.raises(SchemaError) as refused:
            caller.tenant(bad, True)
        assert refused.value.field == "tenant_id"


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_no_auth_is_allowed_on_loopback(host: str) -> None:
    check_no_auth(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "example.com", ""])
def test_no_auth_is_refused_elsewhere(host: str) -> None:
    with pytest.raises(ConfigError, match="only on loopback"):
        check_no_auth(host)


def test_a_clients_malformed_http_is_one_warning_line_without_a_traceback() -> None:
    from aiohttp.http_exceptions import BadHttpMessage

    from streams.surface.http import MalformedHttpFilter

    try:
        raise BadHttpMessage("Invalid header value char:\n\n  b'X-Probe: \\x00'")
    except BadHttpMessage as exc:
        record = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "Error from %s", ("1.2.3.4",), None)
        record.exc_info = (type(exc), exc, exc.__traceback__)
    assert MalformedHttpFilter().filter(record)
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert record.getMessage() == "Error from 1.2.3.4: malformed HTTP answered 400 (Invalid header value char:)"


@pytest.mark.parametrize(
    ("role", "method", "route", "allowed"),
    [
        (Role.READ, "GET", "/v1/memories", True),
        (Role.READ, "GET", "/v1/memories/{memory_id}", True),
        (Role.READ, "DELETE", "/v1/memories", False),
        (Role.READ, "PATCH", "/v1/memories/{memory_id}", False),
        (Role.READ, "DELETE", "/v1/memories/{memory_id}", False),
        (Role.READ, "POST", "/v1/memories/batch", False),
        (Role.WRITE, "DELETE", "/v1/memories", True),
        (Role.WRITE, "PATCH", "/v1/memories/{memory_id}", True),
        (Role.WRITE, "DELETE", "/v1/memories/{memory_id}", True),
        (Role.WRITE, "POST", "/v1/memories/batch", True),
    ],
)
def test_a_path_shared_by_reads_and_writes_needs_the_role_of_the_method(
    keys: tuple[KeyStore, dict[Role, str]], role: Role, method: str, route: str, allowed: bool
) -> None:
    store, issued = keys
    outcome = authorize(store, route, f"Bearer {issued[role]}", method)
    if allowed:
        assert isinstance(outcome, Caller)
    else:
        assert isinstance(outcome, web.Response) and outcome.status == 403
        assert f"{route} needs write" in str(_body(outcome)["error"])
