"""vtok.sweep.store: one durable line per cell; a torn last line is cut off and redone, corruption elsewhere refused."""

from __future__ import annotations

import json

import pytest

from vtok.sweep import ResultsStore


def test_append_and_read_back(tmp_path):
    store = ResultsStore(tmp_path / "sub" / "r.jsonl")
    assert store.rows() == [] and store.finished() == set()
    store.append({"id": "a", "metrics": {"x": 1.5}})
    store.append({"id": "b", "metrics": {"x": float("nan")}})
    text = (tmp_path / "sub" / "r.jsonl").read_text()
    assert text.count("\n") == 2 and text.endswith("\n")
    assert [r["id"] for r in store.rows()] == ["a", "b"] and store.finished() == {"a", "b"}


@pytest.mark.parametrize("torn", [b'{"id": "c", "metr', b'{"id": "c"}', b"\x00\x00", b"garbage\n"])
def test_torn_last_line_is_cut_and_redone(tmp_path, torn):
    path = tmp_path / "r.jsonl"
    store = ResultsStore(path)
    store.append({"id": "a"})
    store.append({"id": "b"})
    good = path.read_bytes()
    path.write_bytes(good + torn)  # a kill mid-write (or a line cut before its newline)
    assert store.finished() == {"a", "b"}
    assert store.repair() == len(torn) and path.read_bytes() == good
    store.append({"id": "c"})
    assert [json.loads(ln)["id"] for ln in path.read_text().splitlines()] == ["a", "b", "c"]


def test_corruption_before_the_last_line_is_refused(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"line 2 is corrupt and is not the last line"):
        ResultsStore(path).rows()
