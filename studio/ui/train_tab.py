"""Train tab: drop images, name the subject, pick a method and a preset, watch it learn.

Fields come in three groups: the basics (always shown), Advanced (what a user may want to change) and Expert
(optimiser internals). Samples are on by default: ``SAMPLES`` images over the run with the training prompt.
"""

from __future__ import annotations

import gradio as gr

from studio.hints import model_hints

from . import actions
from . import widgets as W
from .actions import Services

MAIN_FIELDS = ("trigger", "class_word", "steps", "rank", "lr")
ADVANCED = ("instance_prompt", "use_captions", "train_text_encoder", "pivotal", "resolution", "random_flip", "center_crop",
            "prior_preservation", "class_prompt", "num_class_images", "seed", "sample_prompt", "sample_steps",
            "checkpoint_every", "recommended_weight", "batch_size")
FORM_HIDDEN = ("sample_every",)  # set from the "sample images" count
SAMPLES = 5
LABELS = {"lr": "Learning rate", "snr_gamma": "Balance noise levels (min-SNR γ)", "lora_dropout": "LoRA dropout",
          "text_encoder_lr": "Text-encoder learning rate", "num_class_images": "Number of class images",
          "lr_scheduler": "Learning-rate schedule", "noise_offset": "Noise offset (-1: automatic)",
          "target_modules": "Layers that get a LoRA", "alpha": "LoRA alpha (0: same as rank)",
          "grad_accum": "Gradient accumulation", "max_grad_norm": "Gradient clipping", "class_word": "Class word",
          "instance_prompt": "Training prompt", "recommended_weight": "Recommended weight",
          "pivotal": "Train the trigger's embedding (pivotal tuning)", "embedding_lr": "Embedding learning rate"}
PLAIN = {  # one-line plain descriptions where the config's help text is jargon
    "trigger": "The made-up word that will mean your subject in prompts.",
    "class_word": "What the subject is, in one word (dog, backpack, emblem).",
    "steps": "How long to train. More steps learn more, and take longer.",
    "rank": "Size of the LoRA: bigger keeps more detail but makes a larger file.",
    "lr": "How big each learning step is. Too low learns nothing, too high breaks the image.",
    "snr_gamma": "Gives noisy and clean training steps a fairer share of the loss (0: off).",
    "noise_offset": "Helps draw very dark or bright images; -1 picks a good value for the model.",
    "target_modules": "Which attention layers learn; leave as is unless you know why.",
    "lora_dropout": "Randomly ignores part of the LoRA while training, against over-fitting.",
    "alpha": "Scales the LoRA's effect; 0 keeps it at 1.",
    "mixed_precision": "Number format on the GPU; auto picks the fastest safe one.",
    "optimizer": "The update rule; auto uses 8-bit AdamW on CUDA when available.",
    "weight_decay": "Pulls weights slightly towards zero every step.",
    "max_grad_norm": "Caps each update's size, against sudden jumps (0: off).",
    "grad_accum": "Adds up several steps before one update: a larger batch for the same memory.",
    "lr_scheduler": "How the learning rate changes over the run; constant is fine for short runs.",
    "warmup_steps": "Steps at the start with a smaller, growing learning rate.",
    "gradient_checkpointing": "Uses less GPU memory and trains somewhat slower.",
    "prior_loss_weight": "How much the class images count next to your own pictures.",
    "text_encoder_lr": "Learning rate of the text-encoder LoRA (only with 'Train text encoder').",
    "pivotal": "The trigger becomes a new word with its own learned meaning; saved with the LoRA and as an embedding "
               "A1111 and ComfyUI load.",
    "embedding_lr": "Learning rate of the trigger's embedding (only with pivotal tuning).",
    "sample_prompt": "Prompt of the sample images; empty uses the training prompt (with the trigger).",
}


def _widget(name: str, f, tp, value, placeholder: str | None = None):
    label = LABELS.get(name, name.replace("_", " ").capitalize())
    info = PLAIN.get(name) or f.metadata.get("help", "")
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
    return gr.Textbox(value=value, label=label, info=info, elem_id=key, placeholder=placeholder)


def sample_every(steps: int, samples: int) -> int:
    """``samples`` evenly spread sample images (after the one at step 0); the final preview is not repeated."""
    steps, samples = int(steps or 0), int(samples or 0)
    if samples <= 0 or steps <= 0:
        return 0
    every = max(1, -(-steps // samples))
    while every < steps and steps % every == 0:  # the last step's sample is the final preview anyway
        every += 1
    return every


def samples_of(steps: int, every: int) -> int:
    return 0 if not every else max(1, round(int(steps or 0) / int(every)))


def infer_preset(method: str, values: dict) -> str | None:
    """The preset a job was most likely started with: all its values match, else its rank alone (steps edited)."""
    presets = actions.PRESETS.get(method, actions.PRESETS["dreambooth"])
    for name, p in presets.items():
        if all(values.get(k) == v for k, v in p.items()):
            return name
    by_rank = [name for name, p in presets.items() if p.get("rank") == values.get("rank")]
    return by_rank[0] if len(by_rank) == 1 else None


def build(services: Services, last_job: gr.BrowserState) -> dict:
    methods = list(actions.recipes())
    fields = {n: v for n, v in actions.all_fields().items() if n not in FORM_HIDDEN}
    defaults = actions.method_defaults("dreambooth", "Balanced", model=services.model)
    ph = model_hints(services.model)["placeholders"]
    job_id = gr.State(None)

    with gr.Row():
        with gr.Column(scale=5):
            gr.Markdown("### 1 · Reference images\n<span class='studio-hint'>3–20 pictures of one subject (B-LoRA: one "
                        "picture of a style or object). PNG, JPG or WebP; bad files are rejected with the reason.</span>")
            files = gr.File(file_count="multiple", file_types=["image"], label="Drop images here", elem_id="train-files", height=140)
            thumbs = gr.Gallery(label="Accepted images", columns=6, height=160, allow_preview=False, elem_id="train-thumbs",
                                object_fit="contain", elem_classes=["pixelated"])
            rejected = gr.Markdown(elem_id="train-rejected")
        with gr.Column(scale=4):
            gr.Markdown("### 2 · What to learn")
            name = gr.Textbox(label="LoRA name", placeholder=ph.get("name"), elem_id="train-name",
                              info="Letters, digits, - and _. This is how the LoRA appears in the library.")
            overwrite = gr.Checkbox(label="Overwrite a LoRA of this name (the old files go to the workspace's trash/)",
                                    value=False, elem_id="train-overwrite")
            method = gr.Radio(methods, value="dreambooth", label="Method", elem_id="train-method",
                              info="dreambooth: a subject from a few images · blora: style and content of one image (SDXL) · "
                                   "orthogonal: subjects that merge without interfering")
            preset = gr.Radio(["Fast", "Balanced", "Best"], value="Balanced", label="Quality preset", elem_id="train-preset",
                              info="Sets steps, rank and learning rate for this model; fine-tune them below.")
            main = {n: _widget(n, *fields[n][:2], defaults.get(n), ph.get(n)) for n in MAIN_FIELDS if n in fields}
            n_samples = gr.Number(value=SAMPLES, precision=0, minimum=0, maximum=50, label="Sample images during training",
                                  info="Spread over the run, drawn with the training prompt, so you see it learn (0: none).",
                                  elem_id="train-samples-count")
            estimate = gr.Markdown(elem_id="train-estimate")
    adv = {}
    groups = (("Advanced settings", [n for n in fields if n in ADVANCED], "train-advanced"),
              ("Expert settings (optimiser internals)", [n for n in fields if n not in ADVANCED and n not in MAIN_FIELDS],
               "train-expert"))
    for title, group, key in groups:
        with gr.Accordion(title, open=False, elem_id=key):
            with gr.Row(equal_height=False):
                cols = [gr.Column(min_width=220) for _ in range(3)]
            for i, n in enumerate(group):
                f, tp, owners = fields[n]
                with cols[i % 3]:
                    adv[n] = _widget(n, f, tp, defaults.get(n, f.default), ph.get(n))
                    adv[n].visible = "dreambooth" in owners
    widgets = {**main, **adv}
    names = list(widgets)

    with gr.Row():
        start = gr.Button("Start training", variant="primary", elem_id="train-start", scale=3)
        stop = gr.Button("Stop & save", elem_id="train-stop", scale=1, min_width=90)
        save_now = gr.Button("Save now", elem_id="train-save-now", scale=1, min_width=90)
        sample_now = gr.Button("Sample now", elem_id="train-sample-now", scale=1, min_width=90)
        resume = gr.Button("Resume", elem_id="train-resume", scale=1, min_width=90)
    status = gr.Markdown("No training running. Add images, name your LoRA and press **Start training**.", elem_id="train-status")
    progress = gr.HTML(W.progress_html(0, 0, "not started"), elem_id="train-progress")
    with gr.Row():
        loss_plot = gr.LinePlot(x="step", y="loss", color="series", label="Loss (per step, and smoothed)", height=240,
                                elem_id="train-loss", color_map={"per step": "#c9d3e0", "smoothed": "#1d4ed8"})
        samples = gr.Gallery(label="Samples while training", columns=3, height=240, elem_id="train-samples",
                             object_fit="contain", elem_classes=["pixelated"])
    log = gr.Textbox(label="Log", lines=6, max_lines=12, elem_id="train-log", autoscroll=True)
    timer = gr.Timer(1.0, active=False)

    # ---------------------------------------------------------------------------------------------- handlers
    def on_files(paths):
        good, bad = actions.validate_uploads(paths)
        msg = ("**Rejected:** " + " · ".join(bad)) if bad else (f"{len(good)} image(s) ready." if good else "")
        return W.sized(good), msg

    files.change(on_files, inputs=files, outputs=[thumbs, rejected], api_visibility="private")

    def on_method(m, p):
        vals = actions.method_defaults(m, p, model=services.model)
        updates = []
        for n in names:
            owners = fields[n][2]
            updates.append(gr.update(value=vals.get(n), visible=(m in owners) or n in MAIN_FIELDS))
        return updates + [actions.estimate(services, m, int(vals.get("steps") or 0))]

    method.input(on_method, inputs=[method, preset], outputs=[widgets[n] for n in names] + [estimate], api_visibility="private")

    def on_preset(m, p):
        vals = actions.method_defaults(m, p, model=services.model)
        return (gr.update(value=vals["steps"]), gr.update(value=vals["rank"]), gr.update(value=vals["lr"]),
                actions.estimate(services, m, vals["steps"]))

    preset.input(on_preset, inputs=[method, preset], outputs=[main["steps"], main["rank"], main["lr"], estimate],
                 api_visibility="private")
    main["steps"].change(lambda m, s: actions.estimate(services, m, int(s or 0)), inputs=[method, main["steps"]], outputs=estimate,
                         api_visibility="private")

    def on_start(paths, m, nm, ow, ns, *vals):
        values = {n: v for n, v in zip(names, vals) if m in fields[n][2]}
        for n, v in values.items():
            if fields[n][1] is int and v is not None:
                values[n] = int(v)
        values["name"] = nm
        values["overwrite"] = bool(ow)
        values["sample_every"] = sample_every(values.get("steps") or 0, ns or 0)
        good, _ = actions.validate_uploads(paths)
        try:
            jid = actions.submit_training(services, good or paths, m, values)
        except actions.InputError as exc:  # shown next to the button; the last run's results stay on the page
            return gr.skip(), gr.skip(), gr.skip(), f"**⚠ Could not start:** {exc}"
        return jid, jid, gr.Timer(active=True), "Queued…"

    start.click(on_start, inputs=[files, method, name, overwrite, n_samples] + [widgets[n] for n in names],
                outputs=[job_id, last_job, timer, status], api_visibility="private", concurrency_limit=None,
                show_progress_on=status)

    def on_resume(jid):
        if not jid:
            return gr.skip(), gr.skip(), gr.skip(), "**⚠ Could not resume:** no stopped training to resume."
        try:
            new = actions.resume_training(services, jid)
        except actions.InputError as exc:  # inline, like the other errors of this tab
            return gr.skip(), gr.skip(), gr.skip(), f"**⚠ Could not resume:** {exc}"
        return new, new, gr.Timer(active=True), "Resuming…"

    resume.click(on_resume, inputs=job_id, outputs=[job_id, last_job, timer, status], api_visibility="private",
                 concurrency_limit=None)

    def flag(what):
        def fn(jid):
            if not jid:
                return "**⚠** No training job is running."
            return services.store.request(jid, what)
        return fn

    for btn, what in ((stop, "stop"), (save_now, "save_now"), (sample_now, "sample_now")):
        btn.click(flag(what), inputs=job_id, outputs=status, api_visibility="private", concurrency_limit=None)

    def refresh(jid):
        if not jid:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.Timer(active=False)
        try:
            job = services.store.get(jid)
        except actions.InputError:
            return "No training running.", gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.Timer(active=False)
        done = job["status"] in actions.TERMINAL
        label = f"{job['step']}/{job['total']} steps" if job["total"] else job["phase"]
        if job["eta_s"] and not done:
            label += f" · about {W.fmt_secs(job['eta_s'])} left"
        summary = actions.job_summary(job, services.store.list(100))
        if job["status"] == "failed":
            summary = f"**⚠ Training {job['config'].get('name', '')} failed:** {job['error']}"
        return (summary, W.progress_html(job["step"], job["total"], label), W.loss_frame(job["losses"]),
                W.sample_items(job["samples"]), "\n".join(job["log"][-40:]), gr.Timer(active=not done))

    outs = [status, progress, loss_plot, samples, log, timer]
    timer.tick(refresh, inputs=job_id, outputs=outs, api_visibility="private", concurrency_limit=None, show_progress="hidden")

    def reattach(jid):
        """After a reload: the job's live view and the form it was started with."""
        try:
            job = services.store.get(jid) if jid else None
        except actions.InputError:
            job = None
        if job is None or job["kind"] != "train":
            return [None] + [gr.skip()] * (len(outs) + len(form_outputs))
        cfg = job["config"]
        m = cfg.get("method", "dreambooth")
        full = {**actions.method_defaults(m, None, model=services.model), **cfg}
        form = [cfg.get("name", ""), m, infer_preset(m, full) or gr.skip(), samples_of(full.get("steps"), full.get("sample_every"))]
        form += [gr.update(value=full.get(n), visible=(m in fields[n][2]) or n in MAIN_FIELDS) for n in names]
        return [jid, *refresh(jid), *form]

    form_outputs = [name, method, preset, n_samples] + [widgets[n] for n in names]
    return {"reattach": reattach, "reattach_outputs": [job_id, *outs, *form_outputs], "job_id": job_id}
