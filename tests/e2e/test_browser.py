"""Browser end to end: Playwright drives Debian's chromium against the studio on the default model (toy-xl).

The newcomer's journey of issue 18, asserting what the user should see at each step: upload four pictures, train a
short run and watch samples appear before it ends, reload mid-run and find the form restored, find the LoRA in the
library, generate with a LoRA just by picking it (the PNG metadata proves it was applied), compose two LoRAs with a
painted region (the mask is scaled to the 64-px output), see a shared trigger flagged, and get an error inline while
the previous image stays. Then the Generate tab on a phone. One screenshot per step goes to the test's output folder
(and $STUDIO_SCREENSHOTS when set).
"""

import os
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic"]
MODEL = "toy-xl"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from app import default_model
    from studio import toyworld as tw
    from studio.config import TrainConfig
    from studio.ui import build_demo, launch
    from studio.ui.actions import Services
    from trainers.dreambooth import DreamBoothRecipe
    from trainers.loop import train

    assert default_model() == MODEL
    root = tmp_path_factory.mktemp("e2e")
    services = Services.create(root / "ws", MODEL)
    # two LoRAs already in the library: tesh (to compose with) and a twin of the subject with the same trigger
    for name, subject, trigger in (("tesh-pre", "tesh", "tesh"), ("kavo-twin", "kavo", "kavo")):
        data = services.ws.new_dataset(name)
        for i, (img, _) in enumerate(tw.render_references(subject, n=4, seed=1)):
            img.save(data / f"{i}.png")
        train(TrainConfig(name=name, images=name, model=MODEL, steps=3, rank=2, lr=1e-3, sample_steps=2, trigger=trigger,
                          class_word="emblem", instance_prompt="a {trigger} {class_word}"), DreamBoothRecipe(), services.ws)
    uploads = root / "uploads"
    uploads.mkdir()
    for i, (img, _) in enumerate(tw.render_references("kavo", n=4, seed=0)):
        img.save(uploads / f"kavo_{i}.png")
    demo = build_demo(services)
    _, url, _ = launch(demo, port=None, prevent_thread_lock=True, workspace=services.ws.root)
    try:
        yield services, url, root
    finally:
        demo.close()
        services.worker.close()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is missing: apt-get install chromium (.ci/run does this).")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield b
        b.close()


def shot(page, root, name):
    path = root / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    extra = os.environ.get("STUDIO_SCREENSHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(extra) / path.name)


def pick(page, elem_id, label):
    box = page.locator(f"#{elem_id} input").first
    box.click()
    page.get_by_role("option", name=label).first.click()


def fill(page, elem_id, value):
    page.locator(f"#{elem_id} textarea, #{elem_id} input").first.fill(str(value))


def paint(page, elem_id, x0, x1):
    """Brush strokes over the canvas between the fractions x0..x1 of its width (first brush colour: Subject A)."""
    page.locator(f"#{elem_id} button[aria-label=Brush]").click()
    page.locator(f"#{elem_id}").scroll_into_view_if_needed()
    canvas = page.locator(f"#{elem_id} canvas").last
    box = canvas.bounding_box()
    # the drawing area is the canvas's centred square (64x64 output: square) inside the component
    side = min(box["width"], box["height"]) * 0.8
    left, top = box["x"] + (box["width"] - side) / 2, box["y"] + (box["height"] - side) / 2
    page.mouse.move(left + side * x0, top + side * 0.1)
    page.mouse.down()
    for k in range(10):
        page.mouse.move(left + side * (x0 if k % 2 else x1), top + side * (0.1 + 0.08 * k), steps=5)
    page.mouse.up()


def wait_for(pred, timeout=300.0, what="condition"):
    import time

    end = time.time() + timeout
    while time.time() < end:
        out = pred()
        if out:
            return out
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_newcomer_journey(app, browser):
    from playwright.sync_api import expect

    from pipelines.generate import read_png_params

    services, url, root = app
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    page.set_default_timeout(30000)
    page.goto(url)
    expect(page.get_by_text("Customization Studio").first).to_be_visible()
    # model-aware placeholders: toy-xl's caption language, not "a photo of a dog"
    expect(page.locator("#train-class_word textarea, #train-class_word input").first).to_have_value("emblem")
    shot(page, root, "01-train-tab")

    # ---- train: 4 pictures, Fast preset (toy-xl's learning rate), a short run with 3 samples
    page.locator("#train-files input[type=file]").set_input_files(sorted(str(p) for p in (root / "uploads").glob("*.png")))
    expect(page.locator("#train-rejected")).to_contain_text("4 image(s) ready", timeout=60000)
    fill(page, "train-name", "kavo-e2e")
    page.locator("#train-preset").get_by_text("Fast").click()
    expect(page.locator("#train-lr input").first).to_have_value("0.001")
    fill(page, "train-trigger", "kavo")
    fill(page, "train-steps", 80)
    fill(page, "train-samples-count", 3)
    page.locator("#train-rank input").first.click()  # blur: the number fields commit their value
    shot(page, root, "02-ready-to-train")
    page.locator("#train-start").click()
    expect(page.locator("#train-status")).to_contain_text("kavo-e2e", timeout=60000)  # the status names the LoRA
    expect(page.locator("#train-samples img").first).to_be_visible(timeout=120000)
    job = next(j for j in services.store.list() if j["kind"] == "train")
    assert job["status"] in ("queued", "running") and job["step"] < 80, "a sample shows before the run ends"
    assert job["config"]["sample_every"] == 27  # 3 samples over 80 steps
    expect(page.locator("#train-progress .studio-progress")).to_be_visible()
    shot(page, root, "03-training-with-samples")

    # ---- reload mid-run: the form of the running job comes back
    page.reload()
    expect(page.locator("#train-name textarea, #train-name input").first).to_have_value("kavo-e2e", timeout=30000)
    expect(page.locator("#train-steps input").first).to_have_value("80")
    expect(page.locator("#train-preset input[value=Fast]")).to_be_checked()
    expect(page.locator("#train-samples-count input").first).to_have_value("3")
    expect(page.locator("#train-trigger textarea, #train-trigger input").first).to_have_value("kavo")
    expect(page.locator("#train-status")).to_contain_text("Done", timeout=300000)
    assert len(services.store.get(job["id"])["samples"]) >= 4  # step 0, 27, 54 and the final preview
    shot(page, root, "04-trained-after-reload")

    # ---- library: a grid with triggers, search, metadata as a table
    page.get_by_role("tab", name="Library").click()
    expect(page.locator("#library-cards")).to_contain_text("kavo-e2e", timeout=30000)
    expect(page.locator("#library-cards")).to_contain_text("trigger tesh")
    fill(page, "library-search", "tesh")
    expect(page.locator("#library-cards")).not_to_contain_text("kavo-e2e")
    fill(page, "library-search", "")
    expect(page.locator("#library-cards")).to_contain_text("kavo-e2e")
    page.locator("#library-cards").get_by_text("kavo-e2e").first.click()
    expect(page.locator("#library-info")).to_contain_text("Trigger word")
    expect(page.locator("#library-split")).to_be_hidden()  # B-LoRA action only for B-LoRAs
    shot(page, root, "05-library")

    # ---- generate: picking a LoRA uses it, no extra tick box
    page.get_by_role("tab", name="Generate").click()
    fill(page, "gen-prompt", "a large <lora:kavo-e2e> emblem in the center, on a white plain background, flat style")
    pick(page, "gen-lora-0", "kavo-e2e · trigger kavo")
    page.locator("#gen-settings").get_by_text("Settings").first.click()
    fill(page, "gen-seed", 1234)
    fill(page, "gen-steps", 4)
    page.locator("#gen-go").click()
    expect(page.locator("#gen-status")).to_contain_text("Done", timeout=300000)
    expect(page.locator("#gen-gallery img").first).to_be_visible()
    expect(page.locator("#gen-gallery")).to_contain_text("64×64 px")
    page.locator("#gen-settings").get_by_text("Settings").first.click()
    shot(page, root, "06-generated")
    first = sorted(services.ws.outputs.glob("*.png"))
    params = read_png_params(first[-1])
    assert [x["name"] for x in params["loras"]] == ["kavo-e2e"]
    assert "kavo emblem" in params["prompt"] and "<lora:" not in params["prompt"]

    # ---- a twin with the same trigger is flagged
    page.locator("#gen-more-loras").get_by_text("More LoRAs").click()
    pick(page, "gen-lora-2", "kavo-twin · trigger kavo")
    expect(page.locator("#gen-trigger-warning")).to_contain_text("share the trigger")
    shot(page, root, "07-shared-trigger")
    page.locator("#gen-lora-2-weight input[type=number]").fill("0")  # weight 0 leaves it out
    page.locator("#gen-prompt textarea").click()
    expect(page.locator("#gen-trigger-warning")).not_to_contain_text("share the trigger")

    # ---- compose: kavo painted on the left (Subject A), tesh in the right half, composer engine
    fill(page, "gen-prompt", "a kavo emblem on the left and a tesh emblem on the right, on a white plain background, flat style")
    pick(page, "gen-lora-0-region", "Subject A (red paint)")
    pick(page, "gen-lora-1", "tesh-pre · trigger tesh")
    pick(page, "gen-lora-1-region", "right half")
    page.locator("#gen-engine").get_by_text("composer").click()
    expect(page.locator("#gen-regions")).to_be_visible()  # choosing a regional engine opens the canvas
    paint(page, "gen-regions", 0.05, 0.4)
    expect(page.locator("#gen-region-preview img")).to_be_visible()
    page.locator("#gen-go").click()
    composed = wait_for(lambda: list(services.ws.outputs.glob("*compose-composer*.png")), what="the composition")
    expect(page.locator("#gen-status")).to_contain_text("Done", timeout=60000)
    expect(page.locator("#gen-gallery")).to_contain_text("64×64 px")
    shot(page, root, "08-composed")
    comp = read_png_params(composed[0])["composition"]
    from PIL import Image

    mask_path = comp["concepts"][0]["region"]
    with Image.open(mask_path) as m:
        assert m.size == (64, 64), "the painted mask is scaled to the output size"
        import numpy as np

        arr = np.array(m) > 0
    assert arr[:, :20].any() and not arr[:, 40:].any(), "the left-side paint stays on the left"
    assert comp["concepts"][1]["region"] == [0.5, 0.0, 1.0, 1.0]

    # ---- an error stays next to the button and keeps the image
    pick(page, "gen-lora-1-region", "Subject B (blue paint)")
    page.locator("#gen-go").click()
    expect(page.locator("#gen-status")).to_contain_text("Nothing is painted in blue")
    expect(page.locator("#gen-gallery img").first).to_be_visible()
    shot(page, root, "09-inline-error")

    # ---- reuse: drop the composed PNG on the page; engine, rows, roles and regions come back
    page.locator("#gen-engine").get_by_text("merge").click()
    page.locator("#gen-reuse-box").get_by_text("Reuse settings from an image").click()
    page.locator("#gen-reuse-png input[type=file]").set_input_files(str(composed[0]))
    expect(page.locator("#gen-status")).to_contain_text("Settings restored")
    expect(page.locator("#gen-engine input[value=composer]")).to_be_checked()
    expect(page.locator("#gen-lora-1-region input").first).to_have_value("right half")
    expect(page.locator("#gen-lora-0-region input").first).to_have_value("Subject A (red paint)")
    shot(page, root, "10-reused")

    # ---- jobs: the list refreshes itself and says what a queued job waits for
    from studio.ui import actions

    page.get_by_role("tab", name="Jobs").click()
    expect(page.locator("#jobs-table")).to_contain_text("kavo-e2e")
    long_job = actions.submit_training(services, sorted(str(p) for p in (root / "uploads").glob("*.png")), "dreambooth",
                                       {"name": "long-run", "steps": 400, "rank": 2, "trigger": "lng"})
    gen_job = actions.submit_generate(services, {"prompt": "a red star on the left", "steps": 4})
    expect(page.locator("#jobs-table")).to_contain_text("behind training long-run", timeout=20000)  # no click needed
    shot(page, root, "11-jobs-queue")
    services.store.request(long_job, "stop")
    assert actions.wait(services, gen_job, timeout=300)["status"] == "succeeded"
    page.close()

    # ---- a phone: the Generate tab fits in two screens
    phone = browser.new_page(viewport={"width": 390, "height": 844})
    phone.goto(url)
    phone.get_by_role("tab", name="Generate").click()
    expect(phone.locator("#gen-go")).to_be_visible()
    height = phone.evaluate("document.documentElement.scrollHeight")
    go_y = phone.evaluate("document.querySelector('#gen-go').getBoundingClientRect().bottom + window.scrollY")
    shot(phone, root, "12-phone-generate")
    phone.close()
    print(f"phone: generate tab {height} px tall, Generate button bottom at {go_y:.0f} px")
    assert go_y < 844 * 1.5 and height <= 2 * 844, "on a phone the Generate tab fits in two screens"
