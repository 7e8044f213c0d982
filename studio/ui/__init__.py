"""The Gradio studio: Train, Library, Generate (and compose), Jobs. No business logic here: see ``actions.py``.

``build_demo(services)`` returns the Blocks app; ``launch(demo, ...)`` binds 127.0.0.1 with analytics off and an
offline theme (no remote fonts). Named API endpoints: /train, /job_status, /generate, /compose, /list_loras.
"""

from __future__ import annotations

import json

import gradio as gr

from . import actions
from .actions import Services

CSS = """
#studio-title {margin-bottom: 0}
.studio-hint {opacity: 0.8; font-size: 0.95em}
#train-status, #gen-status {font-size: 1.05em}
/* small images (toy-xl draws 64 px) are enlarged crisp, never cropped */
.pixelated img, .pixelated canvas {image-rendering: pixelated; object-fit: contain !important}
.pixelated .grid-container {grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)) !important}
#gen-gallery .grid-container {grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)) !important}
.pixelated .thumbnail-item {aspect-ratio: 1 / 1; height: auto !important}
.pixelated .thumbnail-item img {width: 100%; height: 100%}
.studio-progress {position: relative; height: 22px; border-radius: 6px; background: var(--neutral-200); overflow: hidden}
.studio-progress-fill {position: absolute; inset: 0 auto 0 0; background: var(--color-accent); transition: width .4s}
.studio-progress span {position: relative; padding-left: 8px; font-size: 0.9em; line-height: 22px}
/* library cards: full names (captions wrap on hover) */
.library-grid .caption-label {white-space: nowrap; overflow: hidden; text-overflow: ellipsis}
.library-grid button:hover .caption-label {white-space: normal; overflow: visible}
@media (max-width: 640px) {
  .gen-lora-row {gap: 4px !important}
  .gen-lora-row > * {min-width: 45% !important}
  .gen-lora-row input[type=range], .gen-lora-row .min_value, .gen-lora-row .max_value {display: none}
  .gen-lora-row [data-testid=block-info], .gen-lora-row .reset-button {display: none}
  .gen-lora-row .block {padding: 4px 6px !important}
  #studio-title .studio-hint {display: none}
  #gen-gallery, #gen-gallery .grid-wrap {height: 240px !important}
  #gen-examples .gallery-item div {white-space: nowrap !important; overflow: hidden; text-overflow: ellipsis; max-width: 300px}
}
"""


def theme():
    # system fonts only: the studio works offline and loads nothing from the internet
    return gr.themes.Soft(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def build_demo(services: Services) -> gr.Blocks:
    from . import generate_tab, jobs_tab, library_tab, train_tab

    with gr.Blocks(title="Customization Studio", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(
            f"# Customization Studio\n<span class='studio-hint'>Base model: **{services.model}** "
            f"({(services.arch or 'unknown').upper()}). 1 · **Train** a LoRA from a few pictures → 2 · find it in the "
            "**Library** → 3 · **Generate** with it, alone or composed with other LoRAs.</span>",
            elem_id="studio-title",
        )
        last_job = gr.BrowserState(None, storage_key="studio-last-train-job")
        with gr.Tabs() as tabs:
            with gr.Tab("Train", id="train") as train_t:
                train_ui = train_tab.build(services, last_job)
            with gr.Tab("Library", id="library") as lib_tab:
                lib_ui = library_tab.build(services)
            with gr.Tab("Generate", id="generate") as gen_tab:
                gen_ui = generate_tab.build(services)
            with gr.Tab("Jobs", id="jobs") as jobs_t:
                jobs_ui = jobs_tab.build(services)
        lib_tab.select(lib_ui["refresh"], inputs=lib_ui["inputs"], outputs=lib_ui["outputs"], api_visibility="private")
        gen_tab.select(gen_ui["refresh"], outputs=gen_ui["refresh_outputs"], api_visibility="private")
        jobs_t.select(lambda: (jobs_ui["refresh"](), gr.Timer(active=True)), outputs=[*jobs_ui["outputs"], jobs_ui["timer"]],
                      api_visibility="private")
        for other in (train_t, lib_tab, gen_tab):  # the Jobs list refreshes itself only while it is shown
            other.select(lambda: gr.Timer(active=False), outputs=jobs_ui["timer"], api_visibility="private")
        demo.load(train_ui["reattach"], inputs=[last_job], outputs=train_ui["reattach_outputs"], api_visibility="private")
        _api(services)
    demo.queue(max_size=32, default_concurrency_limit=4)
    return demo


def _api(services: Services) -> None:
    """Typed endpoints for gradio_client: the same actions the buttons use."""

    def train(images: list[str], name: str, method: str = "dreambooth", settings: str = "{}") -> str:
        """Queue a training job. ``settings`` is JSON of config fields (trigger, steps, rank, …). Returns the job id."""
        try:
            values = json.loads(settings or "{}")
            paths = [x.get("path") if isinstance(x, dict) else x for x in images or []]
            return actions.submit_training(services, paths, method, {**values, "name": name})
        except (actions.InputError, json.JSONDecodeError) as exc:
            raise gr.Error(str(exc)) from exc

    def job_status(job_id: str) -> dict:
        """The job record: status, phase, step/total, it/s, ETA, losses, samples, log tail, outputs, error."""
        try:
            return services.store.get(job_id)
        except actions.InputError as exc:
            raise gr.Error(str(exc)) from exc

    def generate(prompt: str, loras: str = "[]", seed: int = -1, steps: int = 25, guidance: float = 7.0,
                 width: int = 0, height: int = 0, negative_prompt: str = "", decor_remove: str = "",
                 decor_strength: float = 1.0, wait: bool = True, blora: str = "") -> dict:
        """Generate; ``loras`` is JSON ``[{"lora": name, "weight": w}]``; ``blora`` optional JSON
        ``{"content": {"lora", "weight"}, "style": {...}, "block_prompts": bool}``. Returns the job when done."""
        try:
            cfg = dict(prompt=prompt, loras=json.loads(loras or "[]"), seed=int(seed), steps=int(steps), guidance=float(guidance),
                       width=int(width), height=int(height), negative_prompt=negative_prompt, decor_remove=decor_remove,
                       decor_strength=float(decor_strength))
            if blora:
                cfg["blora"] = json.loads(blora)
            job_id = actions.submit_generate(services, cfg)
            return actions.wait(services, job_id) if wait else services.store.get(job_id)
        except (actions.StudioError, json.JSONDecodeError) as exc:
            raise gr.Error(str(exc)) from exc

    def compose(spec: str, wait: bool = True) -> dict:
        """Compose several LoRAs from a JSON CompositionSpec. Returns the job (outputs, seed) when done."""
        try:
            job_id = actions.submit_compose(services, json.loads(spec))
            return actions.wait(services, job_id) if wait else services.store.get(job_id)
        except (actions.InputError, json.JSONDecodeError) as exc:
            raise gr.Error(str(exc)) from exc

    def list_loras() -> list:
        """Every LoRA in the library with its card data and compatibility with the loaded base model."""
        return actions.lora_cards(services)

    def stop_job(job_id: str, what: str = "stop") -> str:
        """Set a job's stop / save_now / sample_now flag."""
        if what not in ("stop", "save_now", "sample_now"):
            raise gr.Error("what must be stop, save_now or sample_now")
        return services.store.request(job_id, what)

    for fn, limit in ((train, None), (job_status, None), (generate, None), (compose, None), (list_loras, None), (stop_job, None)):
        gr.api(fn, api_name=fn.__name__, concurrency_limit=limit)


def launch(demo: gr.Blocks, port: int = 7860, auth: tuple[str, str] | None = None, prevent_thread_lock: bool = False,
           workspace=None):
    allowed = [str(workspace)] if workspace else None
    return demo.launch(server_name="127.0.0.1", server_port=port, share=False, auth=auth, theme=theme(), css=CSS,
                       prevent_thread_lock=prevent_thread_lock, allowed_paths=allowed, footer_links=["api"],
                       show_error=True, quiet=True)
