"""Relative paths mean the driver's directory, although Ray workers run in the directory Ray started in."""
import pandas as pd

import kbatch

from conftest import tiny_config


def test_relative_output_and_model_folders_resolve_in_the_driver(tiny_models, ray_session, tmp_path, monkeypatch):
    """The shared Ray of the test session started in another directory, as a running cluster or a notebook
    that changed directory after ray.init would: workers still load ./prior and write ./out of the driver."""
    import os

    work = tmp_path / "work"
    work.mkdir()
    for name, path in tiny_models.items():
        (work / name).symlink_to(path)
    monkeypatch.chdir(work)
    cwd = ray_session.remote(lambda: os.getcwd())
    assert ray_session.get(cwd.remote()) != str(work)  # the premise: workers run elsewhere
    cfg = tiny_config({"prior": "prior", "decoder": "decoder", "inpaint": "inpaint"}, "out")
    df = pd.DataFrame([{"id": f"r{i}", "prompt": f"prompt {i}", "seed": i} for i in range(3)])
    res = kbatch.render(df, "out", cfg)
    assert res.run.complete and res.run.rows_ok == 3, res.run
    assert (work / "out" / "_SUCCESS").exists() and len(list((work / "out" / "images").rglob("*.png"))) == 3
    assert set(res.df.model_decoder) == {"decoder"}  # the records keep the names the user wrote


def test_relative_output_inside_a_ray_job_working_dir_warns(tmp_path, monkeypatch, caplog):
    """`ray job submit --working-dir .` runs the driver in a temporary copy (…/_ray_pkg_<hash>): a relative
    output would be written there and deleted with it."""
    from kbatch.config import from_dict
    from kbatch.run.runner import Runner

    pkg = tmp_path / "working_dir_files" / "_ray_pkg_0123abcd"
    pkg.mkdir(parents=True)
    monkeypatch.chdir(pkg)
    Runner(from_dict({"output": {"path": "/abs/out"}}))
    assert "temporary copy" not in caplog.text
    runner = Runner(from_dict({"output": {"path": "renders/run1"}}))
    assert runner.output == str(pkg / "renders" / "run1")
    assert "relative and this job runs in Ray's temporary copy" in caplog.text
