import sys
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


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU (run on a GPU machine with `pytest -m gpu`)")
