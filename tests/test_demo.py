"""`kbatch demo`: tiny models, a manifest of every mode, a complete render with a gallery."""
from kbatch.demo import run_demo
from kbatch.output.results import open_results


def test_demo_renders_every_mode(ray_session, tmp_path):
    result = run_demo(str(tmp_path / "out"), rows=6, progress="off")
    assert result.exit_code == 0 and result.complete
    res = open_results(result.output)
    assert set(res.df["mode"]) == {"text2img", "img2img", "inpaint", "interpolate"}
    assert (res.df["status"] == "ok").all() and len(res.df) == 7  # one row has num_images 2
    assert (tmp_path / "out" / "render" / "gallery.html").exists()
    assert (tmp_path / "out" / "render" / "contact_sheet.png").exists()
    assert (tmp_path / "out" / "demo.yaml").exists()
