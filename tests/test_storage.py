"""orchestrator.storage on a local folder and on the real S3 of the test stack: one behaviour
per test, the same expectations on both backends."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from orchestrator.storage import NotFound, Storage, open_storage, read_url


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.services)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return open_storage(str(tmp_path / "root"))
    return open_storage(f"{request.getfixturevalue('s3_prefix')}/root")


def test_put_then_get_round_trips(store: Storage) -> None:
    store.put("a/b/c.bin", b"\x00payload")
    assert store.get("a/b/c.bin") == b"\x00payload"
    assert store.exists("a/b/c.bin") and not store.exists("a/b")


def test_a_missing_object_is_not_found(store: Storage) -> None:
    with pytest.raises(NotFound, match="nothing.bin"):
        store.get("nothing.bin")
    assert store.head("nothing.bin") is None
    with pytest.raises(NotFound):
        read_url(store.url("nothing.bin"))


def test_put_replaces_an_object_whole(store: Storage) -> None:
    store.put("x", b"first version, longer")
    store.put("x", b"second")
    assert store.get("x") == b"second"
    assert read_url(store.url("x")) == b"second"


def test_head_fingerprint_changes_with_the_content(store: Storage) -> None:
    store.put("x", b"one")
    first = store.head("x")
    store.put("x", b"two")
    second = store.head("x")
    assert first is not None and second is not None
    assert first[0] == second[0] == 3 and first[1] != second[1]


def test_put_file_moves_a_local_file_in(store: Storage, tmp_path: Path) -> None:
    local = tmp_path / "upload.tar"
    local.write_bytes(b"t" * 10_000)
    store.put_file(local, "shards/upload.tar")
    assert store.get("shards/upload.tar") == b"t" * 10_000
    assert not local.exists()


def test_listing_separates_files_from_folders(store: Storage) -> None:
    for rel in ("top.json", "step-1/a", "step-1/sub/b", "step-2/c"):
        store.put(rel, rel.encode())
    assert store.list_files() == ["top.json"]
    assert store.list_dirs() == ["step-1", "step-2"]
    assert store.sizes("step-1") == {"a": len(b"step-1/a"), "sub/b": len(b"step-1/sub/b")}
    assert store.list_dirs("step-1") == ["sub"] and store.list_files("step-1") == ["a"]


def test_delete_prefix_removes_only_that_prefix(store: Storage) -> None:
    for rel in ("keep/a", "drop/a", "drop/b/c", "dropped-not/a"):
        store.put(rel, b"x")
    store.delete_prefix("drop")
    assert sorted(store.sizes()) == ["dropped-not/a", "keep/a"]
    store.delete("keep/a")
    assert sorted(store.sizes()) == ["dropped-not/a"]


def test_s3_listing_follows_pages(s3_prefix: str) -> None:
    """More objects than one list request returns (1,000): every one is listed and deleted."""
    store = open_storage(f"{s3_prefix}/many")
    names = [f"obj-{i:04d}" for i in range(1005)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: store.put(n, b"."), names))
    assert sorted(store.sizes()) == names
    assert store.list_files() == names
    store.delete_prefix("")
    assert store.sizes() == {}
