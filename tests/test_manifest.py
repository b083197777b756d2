"""kbatch.plan.manifest: file / folder / glob / fsspec manifests, base folder, clear errors."""
from __future__ import annotations

import os
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kbatch.config import JobConfig
from kbatch.plan.manifest import ManifestError, read_manifest
from kbatch.plan.validate import validate_table


def _table(ids, **cols):
    data = {"id": ids, "prompt": [f"prompt {i}" for i in ids]}
    data.update(cols)
    return pa.table(data)


def _write(path, table):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path)


@pytest.fixture
def mem_root():
    root = f"memory://kbatch-test-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    path = root[len("memory://"):]
    if fs.exists(path):
        fs.rm(path, recursive=True)


def test_single_file(tmp_path):
    p = tmp_path / "m.parquet"
    _write(str(p), _table(["a", "b"]))
    table, base = read_manifest(str(p))
    assert table.column("id").to_pylist() == ["a", "b"]
    assert base == str(tmp_path)
    table, base = read_manifest("file://" + str(p))
    assert table.num_rows == 2 and base == str(tmp_path)


def test_folder_sorted_and_schemas_unified(tmp_path):
    d = tmp_path / "prompts"
    _write(str(d / "part-1.parquet"), _table(["c"], height=pa.array([768], pa.int64())))
    _write(str(d / "part-0.parquet"), _table(["a", "b"]))
    (d / "_SUCCESS").write_text("")
    (d / "notes.txt").write_text("not data")
    _write(str(d / ".hidden.parquet"), _table(["hidden"]))
    _write(str(d / "sub" / "nested.parquet"), _table(["nested"]))  # not recursive
    table, base = read_manifest(str(d))
    assert table.column("id").to_pylist() == ["a", "b", "c"]
    assert table.column("height").to_pylist() == [None, None, 768]
    assert base == str(d)
    _, base2 = read_manifest(str(d) + "/")
    assert base2 == str(d)


def test_glob(tmp_path):
    d = tmp_path / "prompts"
    _write(str(d / "b.parquet"), _table(["b"]))
    _write(str(d / "a.parquet"), _table(["a"]))
    _write(str(d / "other.parquet"), _table(["x"]))
    table, base = read_manifest(str(d / "[ab].parquet"))
    assert table.column("id").to_pylist() == ["a", "b"]
    assert base == str(d)
    table, base = read_manifest(str(d) + "/*.parquet")
    assert table.column("id").to_pylist() == ["a", "b", "x"] and base == str(d)
    # wildcard inside the file name: base is the folder part
    _, base = read_manifest(str(d / "a*.parquet"))
    assert base == str(d)


def test_relative_local_path(tmp_path, monkeypatch):
    _write(str(tmp_path / "data" / "m.parquet"), _table(["a"]))
    monkeypatch.chdir(tmp_path)
    table, base = read_manifest("data/m.parquet")
    assert table.num_rows == 1 and base == str(tmp_path / "data")
    assert os.path.isabs(base)
    _, base = read_manifest("data")
    assert base == str(tmp_path / "data")
    _, base = read_manifest("data/*.parquet")
    assert base == str(tmp_path / "data")


def test_memory_file_folder_glob(mem_root):
    with fsspec.open(f"{mem_root}/prompts/a.parquet", "wb") as fh:
        pq.write_table(_table(["a"]), fh)
    with fsspec.open(f"{mem_root}/prompts/b.parquet", "wb") as fh:
        pq.write_table(_table(["b"]), fh)
    name = mem_root[len("memory://"):]
    for uri in (f"{mem_root}/prompts", f"{mem_root}/prompts/*.parquet"):
        table, base = read_manifest(uri)
        assert table.column("id").to_pylist() == ["a", "b"]
        assert base.startswith("memory://") and base.rstrip("/").endswith(f"{name}/prompts")
    table, base = read_manifest(f"{mem_root}/prompts/a.parquet")
    assert table.num_rows == 1 and base.endswith(f"{name}/prompts")


def test_memory_relative_uris_resolve_against_base(mem_root):
    with fsspec.open(f"{mem_root}/prompts/m.parquet", "wb") as fh:
        pq.write_table(_table(["a"], mode=["img2img"], init_image=["img/x.png"]), fh)
    table, base = read_manifest(f"{mem_root}/prompts/m.parquet")
    rows, errors = validate_table(table, JobConfig(), base)
    assert errors == []
    name = mem_root[len("memory://"):]
    assert rows[0].init_image == f"memory://{name}/prompts/img/x.png"


def test_missing_required_columns_named(tmp_path):
    p = tmp_path / "m.parquet"
    _write(str(p), pa.table({"id": ["a"], "text": ["x"]}))
    with pytest.raises(ManifestError) as ei:
        read_manifest(str(p))
    msg = str(ei.value)
    assert "'prompt'" in msg and str(p) in msg and "'text'" in msg
    _write(str(p), pa.table({"caption": ["x"]}))
    msg = str(pytest.raises(ManifestError, read_manifest, str(p)).value)
    assert "'id'" in msg and "'prompt'" in msg


def test_interpolate_rows_still_need_prompt_column(tmp_path):
    p = tmp_path / "m.parquet"
    _write(str(p), pa.table({"id": ["a"], "mode": ["interpolate"]}))
    assert "'prompt'" in str(pytest.raises(ManifestError, read_manifest, str(p)).value)


def test_id_column_must_be_string(tmp_path):
    p = tmp_path / "m.parquet"
    _write(str(p), pa.table({"id": [1, 2], "prompt": ["a", "b"]}))
    msg = str(pytest.raises(ManifestError, read_manifest, str(p)).value)
    assert "'id'" in msg and "int64" in msg


def test_not_found_and_empty(tmp_path):
    for uri in (str(tmp_path / "nope.parquet"), str(tmp_path / "nope" / "*.parquet")):
        with pytest.raises(ManifestError) as ei:
            read_manifest(uri)
        assert uri in str(ei.value)
    (tmp_path / "empty").mkdir()
    assert "no '.parquet' files" in str(pytest.raises(ManifestError, read_manifest, str(tmp_path / "empty")).value)
    assert isinstance(ManifestError("x"), ValueError)


def test_not_parquet(tmp_path):
    p = tmp_path / "m.parquet"
    p.write_text("id,prompt\na,b\n")
    with pytest.raises(ManifestError) as ei:
        read_manifest(str(p))
    assert str(p) in str(ei.value) and "not a valid Parquet" in str(ei.value)
    (tmp_path / "x.csv").write_text("id,prompt\n")
    msg = str(pytest.raises(ManifestError, read_manifest, str(tmp_path / "*.csv")).value)
    assert "no '.parquet' files" in msg


def test_incompatible_schemas(tmp_path):
    _write(str(tmp_path / "a.parquet"), _table(["a"], height=pa.array([512], pa.int64())))
    _write(str(tmp_path / "b.parquet"), _table(["b"], height=pa.array([[1]], pa.list_(pa.int64()))))
    msg = str(pytest.raises(ManifestError, read_manifest, str(tmp_path)).value)
    assert "incompatible schemas" in msg and str(tmp_path) in msg


def test_unknown_protocol():
    with pytest.raises(ManifestError) as ei:
        read_manifest("nosuchproto://bucket/x.parquet")
    assert "nosuchproto://bucket/x.parquet" in str(ei.value)
