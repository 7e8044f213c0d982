"""Browser end to end: Playwright drives Debian's chromium against the launched studio (tiny SD1.5 model).

Upload three images, train a short run, watch it finish, find the LoRA in the library, compose it with a style LoRA
and see the generated image. Screenshots go to the test's output folder (and $STUDIO_SCREENSHOTS when set).
"""

import os
import shutil
from pathlib import Path

import pytest

from ..conftest import EXAMPLES

pytestmark = pytest.mark.e2e
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from studio.config import TrainConfig
    from studio.ui import build_demo, launch
    from studio.ui.actions import Services
    from trainers.dreambooth import DreamBoothRecipe
    from trainers.loop import train

    root = tmp_path_factory.mktemp("e2e")
    services = Services.create(root / "ws", "tiny-sd")
    # a style LoRA already in the library, to compose with the subject trained in the browser
    train(TrainConfig(name="style-b", images=str(EXAMPLES), model="tiny-sd", steps=2, rank=2, sample_steps=2,
                      trigger="sty"), DreamBoothRecipe(), services.ws)
    demo = build_demo(services)
    _, url, _ = launch(demo, port=None, prevent_thread_lock=True, workspace=services.ws.root)
    try:
        yield services, url, root
    finally:
        demo.close()
        services.worker.close()


@pytest.fixture(scope="module")
def page(app):
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is missing: apt-get install chromium (.ci/run does this).")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(30000)
        yield pg
        browser.close()


def shot(page, root, name):
    path = root / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    extra = os.environ.get("STUDIO_SCREENSHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(extra) / path.name)


def pick(page, elem_id, value):
    box = page.locator(f"#{elem_id} input").first
    box.click()
    box.fill(value)
    page.get_by_role("option", name=value, exact=True).first.click()


def test_upload_train_library_compose(app, page):
    from playwright.sync_api import expect

    services, url, root = app
    page.goto(url)
    expect(page.get_by_text("Customization Studio").first).to_be_visible()
    shot(page, root, "01-train-tab")

    page.locator("#train-files input[type=file]").set_input_files([str(p) for p in sorted(EXAMPLES.glob("*.png"))[:3]])
    expect(page.locator("#train-rejected")).to_contain_text("3 image(s) ready", timeout=60000)
    page.locator("#train-name textarea, #train-name input").first.fill("subject-a")
    page.locator("#train-steps input").first.fill("4")
    page.locator("#train-rank input").first.fill("2")
    shot(page, root, "02-ready-to-train")
    page.locator("#train-start").click()
    expect(page.locator("#train-status")).to_contain_text("Done", timeout=300000)
    shot(page, root, "03-trained")

    page.get_by_role("tab", name="Library").click()
    expect(page.locator("#library-cards")).to_contain_text("subject-a", timeout=30000)
    expect(page.locator("#library-cards")).to_contain_text("style-b")
    shot(page, root, "04-library")

    page.get_by_role("tab", name="Generate & compose").click()
    page.locator("#gen-prompt textarea").fill("a photo of zwx in sty style")
    page.locator("#gen-lora-0-on input").check()
    pick(page, "gen-lora-0", "subject-a")
    page.locator("#gen-lora-1-on input").check()
    pick(page, "gen-lora-1", "style-b")
    pick(page, "gen-lora-1-role", "style")
    page.locator("#gen-seed textarea, #gen-seed input").first.fill("1234")
    page.locator("#gen-steps input[type=number]").first.fill("4")
    page.locator("#gen-go").click()
    expect(page.locator("#gen-status")).to_contain_text("Done", timeout=300000)
    expect(page.locator("#gen-gallery img").first).to_be_visible()
    expect(page.locator("#gen-used-seed textarea, #gen-used-seed input").first).to_have_value("1234")
    shot(page, root, "05-generated")
    outputs = list(services.ws.outputs.glob("*.png"))
    assert outputs, "the generated PNG is in the workspace"
    from pipelines.generate import read_png_params

    names = {x["name"] for x in read_png_params(outputs[0])["loras"]}
    assert names == {"subject-a", "style-b"}
