"""Issue "Real weights": model locations are checked by the driver before Ray or any actor starts (exit 2,
naming the key and value); a wrong inpaint model fails before any row renders; `kbatch models pull`."""
import os

from cli_helpers import kbatch as run_cli, write_job
from conftest import tiny_config


def _rows(n=2, **cols):
    return [{"id": f"r{i}", "prompt": f"thing {i}", **cols} for i in range(n)]


def test_missing_or_wrong_model_folders_exit_2_before_ray(tiny_models, tmp_path):
    cases = [
        ({"decoder": str(tmp_path / "nope")}, "models.decoder", "nope"),
        ({"prior": tiny_models["decoder"]}, "models.prior", "KandinskyPriorPipeline"),  # the wrong pipeline
    ]
    bin_only = tmp_path / "binonly"
    import shutil

    shutil.copytree(tiny_models["decoder"], bin_only)
    for f in (bin_only / "unet").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    cases.append(({"decoder": str(bin_only)}, "models.decoder", "safetensors"))
    corrupt = tmp_path / "corrupt"  # an overwritten copy: its header is checked, its tensors are not read
    shutil.copytree(tiny_models["decoder"], corrupt)
    (corrupt / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    cases.append(({"decoder": str(corrupt)}, "models.decoder", "unet/diffusion_pytorch_model.safetensors is not"))
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_models["prior"], truncated)
    w = truncated / "prior" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    cases.append(({"prior": str(truncated)}, "models.prior", "(truncated)"))
    for i, (models, key, shown) in enumerate(cases):
        out = tmp_path / f"out{i}"
        cfg = tiny_config({**tiny_models, **models}, out)
        path = write_job(tmp_path / f"j{i}", cfg, _rows())
        p = run_cli("run", path, timeout=120)
        assert p.returncode == 2, (key, p.stderr[-2000:])
        assert key in p.stderr and shown in p.stderr, p.stderr[-2000:]
        assert "Started a local Ray" not in p.stderr  # found before Ray started
        assert not (out / "_job.json").exists()


def test_a_bad_inpaint_model_fails_before_any_row_renders(tiny_models, tmp_path):
    """Inpaint rows with models.inpaint pointing at the text2img decoder (a UNet without the mask channels):
    refused up front, not one failed inpaint batch at a time."""
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp_path / "init.png")
    Image.new("L", (64, 64), 255).save(tmp_path / "mask.png")
    rows = _rows(2) + [{"id": "paint", "prompt": "x", "mode": "inpaint", "init_image": "init.png",
                        "mask": "mask.png"}]
    cfg = tiny_config({**tiny_models, "inpaint": tiny_models["decoder"]}, tmp_path / "out")
    p = run_cli("run", write_job(tmp_path, cfg, rows), timeout=120)
    assert p.returncode == 2 and "models.inpaint" in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "out" / "_commits").exists()


def test_models_pull_stages_a_folder(tiny_models, tmp_path):
    dest = tmp_path / "staged" / "decoder"
    p = run_cli("models", "pull", tiny_models["decoder"], dest, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    names = {os.path.relpath(os.path.join(d, f), dest) for d, _, fs in os.walk(dest) for f in fs}
    assert "model_index.json" in names and any(n.endswith(".safetensors") for n in names)
    assert not any(n.endswith((".bin", ".ckpt")) for n in names)
    again = run_cli("models", "pull", tiny_models["decoder"], dest, timeout=120)  # already there: skipped
    assert again.returncode == 0 and '"skipped"' in again.stdout
    bad = run_cli("models", "pull", tmp_path / "missing", tmp_path / "x", timeout=120)
    assert bad.returncode == 2 and "missing" in bad.stderr
