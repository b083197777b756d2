"""Issue "Outputs and the people who use them": ``gallery.html`` in a real browser.

Headless Chromium (Debian's ``chromium``; the tests skip where it is not installed, but fail under CI=true,
whose ``.ci/run`` installs it, so that CI never passes them by skipping) opens the page written
by ``write_gallery`` for each output format: it loads, every thumbnail decodes (``naturalWidth > 0``), every
link resolves to a file the browser can load, user text stays text (no script runs), and a screenshot of the
page is not blank. The DOM checks run in a copy of the page in the same folder (same relative links) with
one script appended; the screenshot is of the page itself.
"""
import html
import json
import os
import re
import shutil
import subprocess
import urllib.parse
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from kbatch.output.gallery import write_gallery
from kbatch.schema.records import record_key
from kbatch.output.writer import OutputSpec, write_shard


def _chromium() -> str | None:
    for c in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


CHROMIUM = _chromium()
MISSING = "headless Chromium not installed (Debian: apt-get install chromium)"


@pytest.fixture(scope="module", autouse=True)
def chromium():
    """Skip without Chromium on a developer's machine; fail in CI, where a skip would hide that these never ran."""
    if CHROMIUM is None:
        if os.environ.get("CI", "").strip().lower() in ("true", "1"):
            pytest.fail(f"{MISSING}, and CI={os.environ['CI']} requires it: .ci/run installs it", pytrace=False)
        pytest.skip(MISSING)
    return CHROMIUM

EVIL = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">"
IDS = ["fox", "v1.2", "b-2"]  # v1.2: a dot in the id, keys replace it
CASES = [("files", "png"), ("webdataset", "webp"), ("parquet", "jpeg")]

CHECK_SCRIPT = """
<script id="kbatch-check">
window.addEventListener('load', async () => {
  const imgs = [...document.querySelectorAll('.kbatch-gallery img')].map(i => (
    {alt: i.alt, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight, src: i.src,
     rect: (r => [r.left + window.scrollX, r.top + window.scrollY, r.width, r.height])(i.getBoundingClientRect())}));
  const links = await Promise.all([...document.querySelectorAll('a[href]')].map(a => new Promise(done => {
    const im = new Image();
    im.onload = () => done({href: a.getAttribute('href'), url: a.href, ok: true, w: im.naturalWidth});
    im.onerror = () => done({href: a.getAttribute('href'), url: a.href, ok: false});
    im.src = a.href;
  })));
  const pre = document.createElement('pre');
  pre.id = 'kbatch-result';
  pre.textContent = JSON.stringify({title: document.title, scripts: document.scripts.length, imgs, links});
  document.body.appendChild(pre);
});
</script>
"""


def _shard(seed=0):
    rng = np.random.default_rng(seed)
    records, images = [], []
    for rid in IDS:
        for k in range(2 if rid == "v1.2" else 1):
            records.append({"id": rid, "image_index": k, "status": "ok", "prompt": f"{EVIL} {rid}", "seed": 5 + k,
                            "mode": "text2img", "height": 64, "width": 64, "num_inference_steps": 4,
                            "guidance_scale": 4.0, "key": record_key(rid, k)})
            images.append(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    records.append({"id": "bad", "image_index": -1, "status": "error", "error": f"height: must be a multiple of "
                                                                               f"64, got 100 {EVIL}",
                    "prompt": EVIL})
    images.append(None)
    return records, images


def _run_chromium(tmp, *args, timeout=90):
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    env = dict(os.environ, HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"),
               XDG_CACHE_HOME=str(home / ".cache"))
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-extensions", "--disable-default-apps", "--mute-audio", "--hide-scrollbars",
           f"--user-data-dir={tmp / 'profile'}", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert p.returncode == 0, f"chromium exited {p.returncode}:\n{p.stderr[-3000:]}"
    return p


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs, self.imgs = [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "a" and a.get("href"):
            self.hrefs.append(a["href"])
        if tag == "img":
            self.imgs.append(a.get("src"))


@pytest.fixture(scope="module", params=CASES, ids=lambda c: "-".join(c))
def gallery(request, tmp_path_factory):
    fmt, enc = request.param
    root = tmp_path_factory.mktemp(f"gallery-{fmt}")
    write_shard(OutputSpec(str(root), fmt, enc), "s0", *_shard())
    out = write_gallery(str(root), thumb=96)
    return root, out["html"]


WINDOW = ["--window-size=1000,700", "--force-device-scale-factor=1"]


@pytest.fixture(scope="module")
def browser(chromium, gallery, tmp_path_factory):
    """What the page looks like to Chromium: the check script's JSON from the dumped DOM."""
    root, page = gallery
    tmp = tmp_path_factory.mktemp("chromium")
    text = open(page, encoding="utf-8").read()
    assert "</body>" in text
    check = root / "_browser_check.html"  # same folder: the same relative links
    check.write_text(text.replace("</body>", CHECK_SCRIPT + "</body>"), encoding="utf-8")
    try:
        p = _run_chromium(tmp, *WINDOW, "--virtual-time-budget=10000", "--dump-dom", check.as_uri())
    finally:
        check.unlink()
    m = re.search(r'<pre id="kbatch-result">(.*?)</pre>', p.stdout, re.S)
    assert m, f"the check script did not run; dom:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-2000:]}"
    return json.loads(html.unescape(m.group(1)))


def test_page_loads_thumbnails_decode_and_links_resolve(gallery, browser):
    root, _ = gallery
    got = browser
    # loads, and user text stayed text: no injected script ran or was added
    assert got["title"].startswith("kbatch gallery:") and "pwned" not in got["title"]
    assert got["scripts"] == 1, "only the check script: the page has none, the prompts added none"
    # every thumbnail decoded
    assert len(got["imgs"]) == 4
    assert sorted(i["alt"] for i in got["imgs"]) == ["b-2", "fox", "v1.2", "v1.2"]
    for i in got["imgs"]:
        assert i["complete"] and 0 < i["w"] <= 96 and 0 < i["h"] <= 96, i
    # every link loads in the browser: the 4 full-size images and the contact sheet
    assert len(got["links"]) == 5
    for link in got["links"]:
        assert link["ok"], f"link {link['href']!r} ({link['url']}) did not load"
        assert link["url"].startswith(root.as_uri() + "/"), link
    full = [lk for lk in got["links"] if lk["href"] != "contact_sheet.png"]
    assert len(full) == 4 and all(lk["w"] == 64 for lk in full)


def test_links_are_files_in_the_output(gallery):
    root, page = gallery
    refs = _Refs()
    refs.feed(open(page, encoding="utf-8").read())
    assert len(refs.imgs) == 4 and all(s.startswith("data:image/jpeg;base64,") for s in refs.imgs)
    assert len(refs.hrefs) == 5
    for href in refs.hrefs:
        assert "://" not in href and not href.startswith("/"), f"{href!r}: links are relative"
        path = os.path.normpath(os.path.join(root, urllib.parse.unquote(href)))
        assert path.startswith(str(root) + os.sep) and os.path.isfile(path), href
        Image.open(path).verify()


def _data_uri_image(src):
    import base64
    import io

    head, _, data = src.partition(",")
    assert head == "data:image/jpeg;base64", head[:40]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"), dtype=np.int16)


def test_screenshot_shows_thumbnails(gallery, browser, tmp_path):
    """A screenshot of the page itself shows each thumbnail where the browser laid it out."""
    _, page = gallery
    shot = tmp_path / "shot.png"
    _run_chromium(tmp_path, *WINDOW, "--virtual-time-budget=5000", f"--screenshot={shot}",
                  "file://" + urllib.parse.quote(page))
    img = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    assert img.shape[:2] == (700, 1000)
    thumbs = [_data_uri_image(i["src"]) for i in browser["imgs"]]
    for k, (info, thumb) in enumerate(zip(browser["imgs"], thumbs)):
        x, y, w, h = (int(round(v)) for v in info["rect"])
        assert (w, h) == (thumb.shape[1], thumb.shape[0]), info["rect"]
        assert y + h <= img.shape[0] and x + w <= img.shape[1], "thumbnail below the fold"
        crop = img[y:y + h, x:x + w]
        d = np.abs(crop - thumb).mean()
        other = np.abs(crop - thumbs[(k + 1) % len(thumbs)]).mean()
        assert d < 8, f"thumbnail {info['alt']!r}: the screenshot differs by {d:.1f} on average"
        assert other > 4 * d + 10, "the comparison tells thumbnails apart"
