"""Train tab: drop images, name the subject, pick a method and a preset, watch it learn."""

from __future__ import annotations

import gradio as gr

from . import actions
from .actions import Services

MAIN_FIELDS = ("trigger", "class_word", "steps", "rank", "lr")
LABELS = {"lr": "Learning rate", "snr_gamma": "min-SNR gamma", "lora_dropout": "LoRA dropout", "text_encoder_lr": "Text-encoder learning rate",
          "num_class_images": "Number of class images", "lr_scheduler": "Learning-rate schedule"}


def _widget(name: str, f, tp, value):
    label = LABELS.get(name, name.replace("_", " ").capitalize())
    info = f.metadata.get("help", "")
    choices = f.metadata.get("choices")
    key = f"train-{name}"
    if tp is bool:
        return gr.Checkbox(value=value, label=label, info=info, elem_id=key)
    if choices:
        return gr.Dropdown(choices=choices, value=value, label=label, info=info, elem_id=key)
    if tp is int:
        return gr.Number(value=value, precision=0, label=label, info=info, elem_id=key)
    if tp is float:
        return gr.Number(value=value, label=label, info=info, elem_id=key)
    return gr.Textbox(value=value, label=label, info=info, elem_id=key)


def build(services: Services, last_job: gr.BrowserState) -> dict:
    methods = list(actions.recipes())
    fields = actions.all_fields()
    defaults = actions.method_defaults("dreambooth", "Balanced")
    job_id = gr.State(None)

    with gr.Row():
        with gr.Column(scale=5):
            gr.Markdown("### 1 · Reference images\n<span class='studio-hint'>3–20 pictures of one subject (B-LoRA: one "
                        "picture of a style or object). PNG, JPG or WebP; bad files are rejected with the reason.</span>")
            files = gr.File(file_count="multiple", file_types=["image"], label="Drop images here", elem_id="train-files", height=140)
            thumbs = gr.Gallery(label="Accepted images", columns=6, height=160, allow_preview=False, elem_id="train-thumbs")
            rejected = gr.Markdown(elem_id="train-rejected")
        with gr.Column(scale=4):
            gr.Markdown("### 2 · What to learn")
            name = gr.Textbox(label="LoRA name", placeholder="my-dog", info="Letters, digits, - and _. This is how the LoRA appears in the library.",
                              elem_id="train-name")
            overwrite = gr.Checkbox(label="Overwrite a LoRA of this name (the old files go to the workspace's trash/)",
                                    value=False, elem_id="train-overwrite")
            method = gr.Radio(methods, value="dreambooth", label="Method", elem_id="train-method",
                              info="dreambooth: a subject from a few images · blora: style and content of one image (SDXL) · "
                                   "orthogonal: subjects that merge without interfering")
            preset = gr.Radio(["Fast", "Balanced", "Best"], value="Balanced", label="Quality preset", elem_id="train-preset",
                              info="Sets steps and rank; fine-tune them below.")
            main = {n: _widget(n, *fields[n][:2], defaults.get(n)) for n in MAIN_FIELDS if n in fields}
            estimate = gr.Markdown(elem_id="train-estimate")
    with gr.Accordion("Advanced settings", open=False, elem_id="train-advanced"):
        adv = {}
        with gr.Row(equal_height=False):
            cols = [gr.Column(min_width=220) for _ in range(3)]
        rest = [n for n in fields if n not in MAIN_FIELDS]
        for i, n in enumerate(rest):
            f, tp, owners = fields[n]
            with cols[i % 3]:
                adv[n] = _widget(n, f, tp, defaults.get(n, f.default))
                adv[n].visible = "dreambooth" in owners
    widgets = {**main, **adv}
    names = list(widgets)

    with gr.Row():
        start = gr.Button("Start training", variant="primary", elem_id="train-start", scale=3)
        stop = gr.Button("Stop & save", elem_id="train-stop", scale=1)
        save_now = gr.Button("Save now", elem_id="train-save-now", scale=1)
        sample_now = gr.Button("Sample now", elem_id="train-sample-now", scale=1)
        resume = gr.Button("Resume", elem_id="train-resume", scale=1)
    status = gr.Markdown("No training running. Add images, name your LoRA and press **Start training**.", elem_id="train-status")
    progress = gr.Slider(0, 1, value=0, label="Progress (steps)", interactive=False, elem_id="train-progress")
    with gr.Row():
        loss_plot = gr.LinePlot(x="step", y="loss", label="Loss", height=220, elem_id="train-loss")
        samples = gr.Gallery(label="Samples while training", columns=4, height=220, elem_id="train-samples")
    log = gr.Textbox(label="Log", lines=6, max_lines=12, elem_id="train-log", autoscroll=True)
    timer = gr.Timer(1.0, active=False)

    # ---------------------------------------------------------------------------------------------- handlers
    def on_files(paths):
        good, bad = actions.validate_uploads(paths)
        msg = ("**Rejected:** " + " · ".join(bad)) if bad else (f"{len(good)} image(s) ready." if good else "")
        return good, msg

    files.change(on_files, inputs=files, outputs=[thumbs, rejected], api_visibility="private")

    def on_method(m, p):
        vals = actions.method_defaults(m, p)
        updates = []
        for n in names:
            owners = fields[n][2]
            updates.append(gr.update(value=vals.get(n), visible=(m in owners) or n in MAIN_FIELDS))
        return updates + [actions.estimate(services, m, int(vals.get("steps") or 0))]

    method.change(on_method, inputs=[method, preset], outputs=[widgets[n] for n in names] + [estimate], api_visibility="private")

    def on_preset(m, p):
        vals = actions.PRESETS.get(m, actions.PRESETS["dreambooth"])[p]
        return gr.update(value=vals["steps"]), gr.update(value=vals["rank"]), actions.estimate(services, m, vals["steps"])

    preset.change(on_preset, inputs=[method, preset], outputs=[main["steps"], main["rank"], estimate], api_visibility="private")
    main["steps"].change(lambda m, s: actions.estimate(services, m, int(s or 0)), inputs=[method, main["steps"]], outputs=estimate,
                         api_visibility="private")

    def on_start(paths, m, nm, ow, *vals):
        values = {n: v for n, v in zip(names, vals) if m in fields[n][2]}
        for n, v in values.items():
            if fields[n][1] is int and v is not None:
                values[n] = int(v)
        values["name"] = nm
        values["overwrite"] = bool(ow)
        good, _ = actions.validate_uploads(paths)
        try:
            jid = actions.submit_training(services, good or paths, m, values)
        except actions.InputError as exc:
            raise gr.Error(str(exc)) from exc
        return jid, jid, gr.Timer(active=True), "Queued…"

    start.click(on_start, inputs=[files, method, name, overwrite] + [widgets[n] for n in names],
                outputs=[job_id, last_job, timer, status], api_visibility="private", concurrency_limit=None)

    def on_resume(jid):
        if not jid:
            raise gr.Error("No stopped training to resume.")
        try:
            new = actions.resume_training(services, jid)
        except actions.InputError as exc:
            raise gr.Error(str(exc)) from exc
        return new, new, gr.Timer(active=True), "Resuming…"

    resume.click(on_resume, inputs=job_id, outputs=[job_id, last_job, timer, status], api_visibility="private",
                 concurrency_limit=None)

    def flag(what):
        def fn(jid):
            if not jid:
                raise gr.Error("No training job is running.")
            gr.Info(services.store.request(jid, what))
        return fn

    for btn, what in ((stop, "stop"), (save_now, "save_now"), (sample_now, "sample_now")):
        btn.click(flag(what), inputs=job_id, api_visibility="private", concurrency_limit=None)

    def refresh(jid):
        if not jid:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.Timer(active=False)
        try:
            job = services.store.get(jid)
        except actions.InputError:
            return "No training running.", gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.Timer(active=False)
        import pandas as pd

        df = pd.DataFrame({"step": list(range(1, len(job["losses"]) + 1)), "loss": job["losses"]})
        total = max(job["total"], 1)
        done = job["status"] in actions.TERMINAL
        return (actions.job_summary(job), gr.update(value=job["step"], maximum=total), df, job["samples"],
                "\n".join(job["log"][-40:]), gr.Timer(active=not done))

    outs = [status, progress, loss_plot, samples, log, timer]
    timer.tick(refresh, inputs=job_id, outputs=outs, api_visibility="private", concurrency_limit=None, show_progress="hidden")

    def reattach(jid):
        if not jid:
            return [None] + [gr.skip()] * 6
        return [jid, *refresh(jid)]

    return {"reattach": reattach, "reattach_outputs": [job_id, *outs], "job_id": job_id}
