"""infra.api_keys: keys kept as hashes only, bound to a tenant and a role; revocation; a malformed file."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from infra.api_keys import KeyStore, Role, hash_key, key_id_of, new_key, parse_role
from schemas.errors import ConfigError, SchemaError


def test_a_created_key_authenticates_as_its_tenant_and_role(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.json")
    entry, key = store.create("acme", Role.WRITE)
    principal = store.authenticate(key)
    assert principal is not None
    assert (principal.tenant, principal.role, principal.key_id) == ("acme", Role.WRITE, entry.key_id)
    # another store over the same file (another process) sees it too
    assert KeyStore(tmp_path / "keys.json").authenticate(key) == principal


def test_the_file_holds_the_hash_never_the_key(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    _, key = KeyStore(path).create("acme", Role.READ)
    text = path.read_text()
    secret = key.split("_", 2)[2]
    assert key not in text and secret not in text
    assert hash_key(key) in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    "mangle",
    [
        lambda k: k[:-1] + ("A" if k[-1] != "A" else "B"),  # one character of the secret wrong
        lambda k: k + "x",
        lambda k: k.replace("ms_", "xx_", 1),
        lambda k: "ms_00000000_" + k.split("_", 2)[2],  # the right secret under another id
        lambda k: "",
        lambda k: "ms_",
        lambda k: "ms_abc_def",
    ],
)
def test_wrong_keys_do_not_authenticate(tmp_path: Path, mangle: object) -> None:
    store = KeyStore(tmp_path / "keys.json")
    _, key = store.create("acme", Role.ADMIN)
    assert callable(mangle)
    assert store.authenticate(mangle(key)) is None


def test_revoked_keys_stop_working_in_a_store_that_already_read_the_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    server = KeyStore(path)
    entry, key = KeyStore(path).create("acme", Role.READ)
    assert server.authenticate(key) is not None
    revoked = KeyStore(path).revoke(entry.key_id)
    assert revoked.revoked_at is not None and not revoked.active
    assert server.authenticate(key) is None
    listed = server.entries()
    assert [k.key_id for k in listed] == [entry.key_id] and listed[0].revoked_at == revoked.revoked_at


def test_revoking_an_unknown_id_is_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="no key with id 'nope'"):
        KeyStore(tmp_path / "keys.json").revoke("nope")


def test_no_file_means_no_keys(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "absent.json")
    assert store.entries() == []
    assert store.authenticate(new_key()[1]) is None


def test_a_broken_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=r"keys\.json cannot be read"):
        KeyStore(path).authenticate(new_key()[1])


def test_keys_are_unique_and_well_formed() -> None:
    keys = {new_key() for _ in range(200)}
    assert len({k for _, k in keys}) == 200
    for key_id, key in keys:
        assert key_id_of(key) == key_id and len(key) > 40


def test_roles_nest_and_unknown_roles_are_refused() -> None:
    assert Role.ADMIN.allows(Role.WRITE) and Role.WRITE.allows(Role.READ) and Role.READ.allows(Role.READ)
    assert not Role.READ.allows(Role.WRITE) and not Role.WRITE.allows(Role.ADMIN)
    assert parse_role("admin") is Role.ADMIN
    with pytest.raises(SchemaError, match="unknown role 'root'"):
        parse_role("root")


def test_a_malformed_tenant_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SchemaError):
        KeyStore(tmp_path / "keys.json").create("no spaces", Role.READ)
    assert not (tmp_path / "keys.json").exists()
