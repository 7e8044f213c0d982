import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "assets" / "examples"


@pytest.fixture
def ws(tmp_path):
    from studio.library import Workspace

    return Workspace(tmp_path / "ws")


@pytest.fixture(scope="session")
def tiny_sd():
    from studio.models import load_pipeline

    return load_pipeline("tiny-sd")


@pytest.fixture(scope="session")
def tiny_sdxl():
    from studio.models import load_pipeline

    return load_pipeline("tiny-sdxl")


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "images"
    shutil.copytree(EXAMPLES, d)
    return d


@contextmanager
def served(services):
    """The studio of ``services`` launched on a free local port: yields ``(client, url)``, then shuts everything down."""
    from gradio_client import Client

    from studio.ui import build_demo, launch

    demo = build_demo(services)
    _, url, _ = launch(demo, port=None, prevent_thread_lock=True, workspace=services.ws.root)
    client = Client(url, verbose=False)
    try:
        yield client, url
    finally:
        client.close()
        demo.close()
        services.worker.close()
