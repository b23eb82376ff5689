import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tiny_models():
    """The tiny local target/draft pair (built once, then cached outside the repo)."""
    from lib.models import ensure_tiny_models
    return ensure_tiny_models()


@pytest.fixture(autouse=True)
def unconfigured_speclab_logger():
    """A test that runs a script's main() gets its setup_logging(); the next test starts without it again, so
    caplog (on the root logger) sees the "speclab" records."""
    import logging
    logger = logging.getLogger("speclab")
    saved = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_models):
    from lib.models import load_tokenizer
    return load_tokenizer(tiny_models.target)


@pytest.fixture(scope="session")
def shipped_prompts():
    return [line.strip() for line in (ROOT / "prompts" / "benchmark_prompts.txt").read_text().splitlines()
            if line.strip()]


@pytest.fixture
def chromium_render(tmp_path):
    """render(html_file) -> (the page's DOM as headless Chromium built it, the inlined PNGs it shows as PIL
    images, a screenshot as an RGB array). Chromium comes from scripts/ensure_chromium.sh (tests/run.sh runs it)."""
    import base64
    import re
    import shutil
    import subprocess
    from io import BytesIO

    import numpy as np
    from PIL import Image

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "chromium missing: run scripts/ensure_chromium.sh (tests/run.sh does)"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp_path}/p"]

    def render(html: Path, height: int = 5200):
        shot = tmp_path / "shot.png"
        subprocess.run([browser, *flags, f"--screenshot={shot}", f"--window-size=1280,{height}", html.as_uri()],
                       capture_output=True, timeout=120, check=True)
        dom = subprocess.run([browser, *flags, "--dump-dom", html.as_uri()], capture_output=True, text=True,
                             timeout=120, check=True).stdout
        images = [Image.open(BytesIO(base64.b64decode(b)))
                  for b in re.findall(r'<img[^>]*src="data:image/png;base64,([^"]+)"', dom)]
        return dom, images, np.asarray(Image.open(shot).convert("RGB"), dtype=int)
    return render


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU (run on a GPU machine with `pytest -m gpu`)")


def wait_for(predicate, timeout: float = 300, what: str = "condition", poll: float = 0.2):
    """Poll until predicate() is true (the tests that watch a child process's files), else fail naming what."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")
