"""The Gradio studio: Train, Library, Generate (and compose), Jobs. No business logic here: see ``actions.py``.

``build_demo(services)`` returns the Blocks app; ``launch(demo, ...)`` binds 127.0.0.1 with analytics off and an
offline theme (no remote fonts). Named API endpoints: /train, /job_status, /generate, /compose, /list_loras.
"""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
from gradio.data_classes import FileData

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
        jobs_t.select(lambda: (*jobs_ui["refresh"](), gr.Timer(active=True)), outputs=[*jobs_ui["outputs"], jobs_ui["timer"]],
                      api_visibility="private")
        for other in (train_t, lib_tab, gen_tab):  # the Jobs list refreshes itself only while it is shown
            other.select(lambda: gr.Timer(active=False), outputs=jobs_ui["timer"], api_visibility="private")
        demo.load(train_ui["reattach"], inputs=[last_job], outputs=train_ui["reattach_outputs"], api_visibility="private")
        _api(services)
    demo.queue(max_size=32, default_concurrency_limit=4)
    return demo


def _uploads(files, what: str) -> list[str]:
    """Server paths of the files the caller uploaded with this request; anything else (a server path given as text,
    a file outside Gradio's upload folder) is refused, so the API never reads a file the caller did not send."""
    from gradio.utils import get_upload_folder

    if files is None:
        return []
    if not isinstance(files, list):
        raise gr.Error(f"{what} must be a list of uploaded files (gradio_client.handle_file(path)), got {type(files).__name__}.")
    root = Path(get_upload_folder()).resolve()
    out = []
    for f in files:
        if isinstance(f, FileData):
            f = f.model_dump()
        ok = isinstance(f, dict) and (f.get("meta") or {}).get("_type") == "gradio.FileData" and isinstance(f.get("path"), str)
        if not ok:
            raise gr.Error(f"{what}: only files uploaded with the request are read (send them with "
                           f"gradio_client.handle_file); got {str(f)[:80]!r}.")
        p = Path(f["path"]).resolve()
        if root not in p.parents:
            raise gr.Error(f"{what}: {Path(f['path']).name} was not uploaded with this request.")
        out.append(str(p))
    return out


def _json(value, what: str, default):
    """An API argument given either as JSON text or as the object itself."""
    if value is None or value == "":
        return default
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise gr.Error(f"{what} is not valid JSON: {exc}.") from exc
    return value


def _files(job: dict) -> dict:
    """The job record with its images as files the client downloads (``files``; ``masks`` for clora)."""
    res = job.get("result") or {}
    job["files"] = [FileData(path=p).model_dump() for p in res.get("outputs", []) if Path(p).is_file()]
    job["mask_files"] = [FileData(path=p).model_dump() for p in res.get("masks", []) if Path(p).is_file()]
    return job


def _api(services: Services) -> None:
    """Typed endpoints for gradio_client: the same actions the buttons use. Files go in as uploads
    (``gradio_client.handle_file``) and come back as files; every argument is checked with a message naming it."""

    def train(images: list[FileData], name: str, method: str = "dreambooth", settings: dict | str | None = None,
              preset: str = "", overwrite: bool = False) -> dict:
        """Queue a training job on uploaded images.

        images: the reference pictures, uploaded with ``handle_file``. name: the LoRA's library name.
        method: dreambooth, blora or orthogonal. settings: config fields as an object or JSON text, e.g.
        ``{"trigger": "sks", "class_word": "dog", "steps": 300}`` (unknown keys are refused with the valid ones).
        preset: Fast, Balanced or Best (steps and rank; settings override it). overwrite: replace an existing LoRA of
        that name (its files go to the trash). Returns ``{"job_id", "accepted", "rejected": [why, ...]}``."""
        try:
            if not isinstance(name, str):
                raise actions.InputError(f"name must be text (got {name!r}).")
            if not isinstance(overwrite, bool):
                raise actions.InputError(f"overwrite must be true or false (got {overwrite!r}).")
            values = {**actions._check_dict(_json(settings, "settings", {}), "settings"), "name": name}
            if overwrite:
                values["overwrite"] = True
            paths = _uploads(images, "images")
            rejected: list[str] = []
            job_id = actions.submit_training(services, paths, method, values, preset=preset or None, rejected=rejected)
            return {"job_id": job_id, "accepted": len(paths) - len(rejected), "rejected": rejected}
        except actions.StudioError as exc:
            raise gr.Error(str(exc)) from exc

    def job_status(job_id: str) -> dict:
        """The job record: status, phase, step/total, it/s, ETA, losses, samples, log tail, outputs, error;
        ``files``: the finished images as downloadable files."""
        try:
            return _files(services.store.get(job_id))
        except actions.InputError as exc:
            raise gr.Error(str(exc)) from exc

    def generate(prompt: str, loras: list | str = "[]", seed: int = -1, steps: int = 25, guidance: float = 7.0,
                 width: int = 0, height: int = 0, negative_prompt: str = "", decor_remove: str = "",
                 decor_strength: float = 1.0, wait: bool = True, blora: dict | str = "") -> dict:
        """Generate an image. ``loras``: ``[{"lora": library_name, "weight": w}]`` (weights in [-10, 10]; library
        names only); ``blora`` optional ``{"content": {"lora", "weight"}, "style": {...}, "block_prompts": bool}``.
        Returns the job when done (``wait``), with the images in ``files``."""
        try:
            cfg = dict(prompt=prompt, loras=_json(loras, "loras", []), seed=seed, steps=steps, guidance=guidance, width=width,
                       height=height, negative_prompt=negative_prompt, decor_remove=decor_remove, decor_strength=decor_strength)
            b = _json(blora, "blora", None)
            if b:
                cfg["blora"] = b
            job_id = actions.submit_generate(services, cfg)
            return _files(actions.wait(services, job_id) if wait else services.store.get(job_id))
        except actions.StudioError as exc:
            raise gr.Error(str(exc)) from exc

    def compose(spec: dict | str, wait: bool = True, masks: list[FileData] | None = None) -> dict:
        """Compose several library LoRAs in one image from a CompositionSpec (object or JSON text).

        Fields: ``prompt`` (the whole image), ``engine`` (merge: weighted sum everywhere, fast · composer:
        LoRA-Composer, each concept in its region · clora: CLoRA, regions found from attention), ``concepts``: a list
        of ``{"lora": name, "weight": w, "prompt": "a photo of sks dog", "token": "dog", "region": R}`` where R is
        ``{"box": [x0, y0, x1, y1]}`` (fractions of the image) or ``{"mask": i}``, the i-th file of ``masks``
        (uploads, white = inside, at the output size); ``global_loras``: ``[{"lora", "weight"}]`` applied everywhere;
        ``seed``, ``steps``, ``guidance``, ``width``, ``height``, ``negative_prompt``, ``decor_remove``,
        ``decor_strength``, ``allow_overlap``, ``composer``/``clora`` options. Example::

            {"prompt": "a dog and a cat on a sofa", "engine": "composer", "seed": 1, "steps": 25,
             "concepts": [{"lora": "my-dog", "prompt": "a photo of sks dog", "region": {"box": [0, 0, 0.5, 1]}},
                          {"lora": "my-cat", "prompt": "a photo of zwx cat", "region": {"mask": 0}}]}

        Returns the job when done (``wait``), with the image in ``files`` (and clora's masks in ``mask_files``)."""
        try:
            parsed = actions._check_dict(_json(spec, "spec", None), "spec")
            job_id = actions.submit_compose(services, _with_uploaded_masks(services, parsed, _uploads(masks, "masks")))
            return _files(actions.wait(services, job_id) if wait else services.store.get(job_id))
        except actions.StudioError as exc:
            raise gr.Error(str(exc)) from exc

    def list_loras() -> list:
        """Every LoRA in the library with its card data and compatibility with the loaded base model."""
        return actions.lora_cards(services)

    def stop_job(job_id: str, what: str = "stop") -> str:
        """Set a job's stop / save_now / sample_now flag."""
        if what not in ("stop", "save_now", "sample_now"):
            raise gr.Error(f"what must be one of stop, save_now, sample_now (got {what!r}).")
        try:
            return services.store.request(job_id, what)
        except actions.InputError as exc:
            raise gr.Error(str(exc)) from exc

    for fn, limit in ((train, None), (job_status, None), (generate, None), (compose, None), (list_loras, None), (stop_job, None)):
        gr.api(fn, api_name=fn.__name__, concurrency_limit=limit)


def _with_uploaded_masks(services: Services, spec: dict, masks: list[str]) -> dict:
    """Concept regions ``{"mask": i}`` become copies of the i-th uploaded mask in the workspace; mask paths given as
    text are refused (a remote caller must not probe the server's files)."""
    import shutil
    import uuid

    concepts = spec.get("concepts")
    if not isinstance(concepts, list):
        return spec
    out = []
    for n, c in enumerate(concepts, 1):
        region = c.get("region") if isinstance(c, dict) else None
        if isinstance(region, str):
            from studio.composition import parse_region

            if isinstance(parse_region(region, f"concept {n}"), str):  # not a box written as text: a path
                region = {"mask": region}
        if isinstance(region, dict) and "mask" in region:
            i = region["mask"]
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(masks):
                raise actions.InputError(f"concept {n}: region mask must be the index of an uploaded mask file (0.."
                                         f"{len(masks) - 1}), sent in `masks`; got {i!r}.")
            dest = services.ws.cache / "masks" / f"{uuid.uuid4().hex}{Path(masks[i]).suffix or '.png'}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(masks[i], dest)
            c = {**c, "region": {"mask": str(dest)}}
        out.append(c)
    return {**spec, "concepts": out}


def launch(demo: gr.Blocks, port: int = 7860, auth: tuple[str, str] | None = None, prevent_thread_lock: bool = False,
           workspace=None):
    allowed = [str(workspace)] if workspace else None
    return demo.launch(server_name="127.0.0.1", server_port=port, share=False, auth=auth, theme=theme(), css=CSS,
                       prevent_thread_lock=prevent_thread_lock, allowed_paths=allowed, footer_links=["api"],
                       show_error=True, quiet=True)
