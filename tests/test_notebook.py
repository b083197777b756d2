"""Issue "Outputs and the people who use them": the example notebook runs as a user would run it.

``examples/notebook.ipynb`` is executed with nbclient on a ``python3`` kernel in a temporary working
directory (everything it writes goes under ``out/`` there). Its outputs must show the rendered rows, an
image and the inline gallery. The remote-cluster cell runs only where ``KBATCH_CLUSTER_ADDRESS`` is set, so
here it only prints how to enable it.
"""
import os
import shutil
import tempfile

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "notebook.ipynb")


def _outputs(cell, mime=None):
    out = []
    for o in cell.get("outputs", []):
        if o.get("output_type") == "stream":
            if mime in (None, "text/plain"):
                out.append(o.get("text", ""))
        elif o.get("output_type") in ("execute_result", "display_data"):
            data = o.get("data", {})
            if mime is None:
                out.extend(str(v) for v in data.values())
            elif mime in data:
                out.append(data[mime])
        elif o.get("output_type") == "error":
            raise AssertionError(f"{o.get('ename')}: {o.get('evalue')}")
    return out


def _cell(nb, needle):
    for c in nb.cells:
        if c.cell_type == "code" and needle in c.source:
            return c
    raise AssertionError(f"no code cell with {needle!r}")


@pytest.fixture(scope="module")
def executed(tiny_models, tmp_path_factory):
    from nbclient import NotebookClient

    work = tmp_path_factory.mktemp("notebook")
    # The notebook makes its own tiny models with write_tiny_models("out/models"), which keeps complete
    # folders: reuse the session's (byte-identical) to save ~10 s.
    for name, path in tiny_models.items():
        shutil.copytree(path, work / "out" / "models" / name)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    ray_tmp = tempfile.mkdtemp(prefix="kbn-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               TOKENIZERS_PARALLELISM="false")
    for k in ("RAY_ADDRESS", "KBATCH_CLUSTER_ADDRESS"):
        env.pop(k, None)
    client = NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(work)}})
    try:
        client.execute(env=env)  # the kernel's environment (jupyter_client's start_kernel(env=...))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return nb, work


def test_notebook_renders_rows(executed):
    nb, work = executed
    text = "\n".join(_outputs(_cell(nb, "kbatch.render(")))
    assert "kbatch: complete" in text and "rows 4 (ok 4, failed 0" in text
    assert "images 5" in text
    head = "\n".join(_outputs(_cell(nb, "res.df["), "text/html"))
    for rid in ("fox", "lighthouse", "ramen", "robot"):
        assert rid in head
    assert "sha256" in head and "<table" in head
    assert os.path.exists(work / "out" / "notebook" / "_SUCCESS"), "the notebook writes under its cwd"
    assert os.path.isdir(work / "out" / "models" / "prior")


def test_notebook_shows_image_and_gallery(executed):
    nb, _ = executed
    png = _outputs(_cell(nb, 'res.image("fox")'), "image/png")
    assert png and len(png[0]) > 100, "res.image() displays as a PNG"
    html = "\n".join(_outputs(_cell(nb, "res.gallery()"), "text/html"))
    assert html.count("<img ") == 5 and "data:image/jpeg;base64," in html
    assert "a red fox in the snow" in html and "kbatch-gallery" in html


def test_notebook_submit_cell_is_guarded(executed):
    nb, _ = executed
    text = "\n".join(_outputs(_cell(nb, "kbatch.submit(")))
    assert "KBATCH_CLUSTER_ADDRESS" in text
    # every code cell ran, none raised
    for c in nb.cells:
        if c.cell_type == "code":
            assert c.get("execution_count"), c.source[:60]
            _outputs(c)
