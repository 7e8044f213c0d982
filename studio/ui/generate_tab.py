"""Generate & compose tab: prompt (with ``<lora:name>`` trigger tags), LoRA rows (weight, role, region), engine,
regions canvas at the output's aspect ratio with a preview over the last image, B-LoRA, DECOR, seed.

A row with a LoRA picked is used; a weight of 0 or an empty row leaves it out. Errors stay next to the Generate
button and the previous results stay on the page.
"""

from __future__ import annotations

import time
from pathlib import Path

import gradio as gr

from studio.hints import model_hints, output_size

from . import actions, regions, widgets
from .actions import Services

N_ROWS = 4
N_VISIBLE_ROWS = 2
ENGINES = [("merge · fast, blends everywhere", "merge"), ("composer · regions, 2× time", "composer"),
           ("clora · regions from attention, 4× time", "clora")]
REGIONS = regions.REGIONS
BOXES = regions.BOXES


def engine_settings(per_engine: dict, engine: str, steps, guidance) -> tuple[int, float] | None:
    """Steps and guidance after picking ``engine`` by hand: its defaults (``actions.engine_defaults``), unless the
    user had changed them from every engine's defaults (then None: keep them)."""
    if any(int(steps) == d["steps"] and float(guidance) == d["guidance"] for d in per_engine.values()):
        return per_engine[engine]["steps"], per_engine[engine]["guidance"]
    return None


def build(services: Services) -> dict:
    from studio.composition import ComposerOptions

    hints = model_hints(services.model)
    ph = hints["placeholders"]
    per_engine = actions.engine_defaults(services.model)  # steps and guidance: the config dataclasses' (and the model's)
    content_w, style_w = actions.blora_weights()
    res_w, res_h = output_size(services.model, 0, 0)
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=320):
            prompt = gr.Textbox(label="Prompt", lines=2, placeholder=ph.get("prompt", ""), elem_id="gen-prompt",
                                info="<lora:name> writes that LoRA's trigger word. A LoRA picked below is used; "
                                     "weight 0 leaves it out.")
            if hints.get("examples"):
                gr.Examples(examples=[[e] for e in hints["examples"]], inputs=[prompt], elem_id="gen-examples",
                            label=f"Prompts {services.model} draws well",
                            examples_per_page=4)
            rows = [_lora_row(i) for i in range(N_VISIBLE_ROWS)]
            with gr.Accordion("More LoRAs", open=False, elem_id="gen-more-loras"):
                rows += [_lora_row(i) for i in range(N_VISIBLE_ROWS, N_ROWS)]
            trigger_warning = gr.Markdown(elem_id="gen-trigger-warning")
            engine = gr.Radio(ENGINES, value="merge", label="Engine", elem_id="gen-engine")
            with gr.Row():
                go = gr.Button("Generate", variant="primary", elem_id="gen-go", scale=3)
                stop = gr.Button("Stop", elem_id="gen-stop", scale=1, min_width=80)
            status = gr.Markdown(elem_id="gen-status")
            with gr.Accordion("Settings: seed, steps, size, negative", open=False, elem_id="gen-settings"):
                negative = gr.Textbox(label="Negative prompt", placeholder=ph.get("negative_prompt", ""), elem_id="gen-negative",
                                      info="What the image should not show.")
                with gr.Row():
                    seed = gr.Textbox(value="-1", label="Seed", info="-1 picks a random one; reuse a seed to repeat an image.",
                                      elem_id="gen-seed", min_width=120)
                    used_seed = gr.Textbox(label="Last used seed", interactive=False, elem_id="gen-used-seed", min_width=120)
                    steps = gr.Slider(1, 100, value=int(per_engine["merge"]["steps"]), step=1, label="Steps",
                                      info="More steps: finer detail, longer wait.", elem_id="gen-steps", min_width=140)
                    guidance = gr.Slider(0, 20, value=float(per_engine["merge"]["guidance"]), step=0.5, label="Guidance",
                                         info="How literally the prompt is followed.", elem_id="gen-guidance", min_width=140)
                with gr.Row():
                    width = gr.Number(value=0, precision=0, label=f"Width (0 = {res_w} px, the model's size)", elem_id="gen-width",
                                      min_width=120)
                    height = gr.Number(value=0, precision=0, label=f"Height (0 = {res_h} px)", elem_id="gen-height", min_width=120)
            with gr.Accordion("B-LoRA style transfer", open=False):
                gr.Markdown("<span class='studio-hint'>Train B-LoRAs (method blora) on one image each, then pick the "
                            "content of one and the style of another. Write [c] and [s] in the prompt for their tokens, "
                            "e.g. 'A [c] in [s] style'.</span>")
                with gr.Row():
                    bl_content = gr.Dropdown(choices=[], label="Content B-LoRA", elem_id="gen-blora-content")
                    bl_cw = gr.Slider(0, 2, value=content_w, step=0.05, label="content weight", elem_id="gen-blora-content-weight")
                with gr.Row():
                    bl_style = gr.Dropdown(choices=[], label="Style B-LoRA", elem_id="gen-blora-style")
                    bl_sw = gr.Slider(0, 2, value=style_w, step=0.05, label="style weight", elem_id="gen-blora-style-weight")
                bl_blocks = gr.Checkbox(label="Per-block prompts (content block sees only 'A [c]', paper supplement)",
                                        elem_id="gen-blora-blocks")
            with gr.Accordion("DECOR: remove a meaning", open=False):
                decor_remove = gr.Textbox(label="Remove (text)", placeholder=ph.get("decor_remove", ""),
                                          info="Projects this text's meaning out of the prompt embeddings (DECOR).",
                                          elem_id="gen-decor-remove")
                decor_strength = gr.Slider(0, 1, value=1.0, step=0.05, label="DECOR strength", elem_id="gen-decor-strength",
                                           info="1 removes it fully, 0 leaves the prompt as it is.")
        with gr.Column(scale=2, min_width=300):
            gallery = gr.Gallery(label="Results (true size in the caption)", columns=2, height=320, object_fit="contain",
                                 format="png", elem_id="gen-gallery", elem_classes=["pixelated"])
            with gr.Accordion("Regions (composer and clora)", open=False, elem_id="gen-regions-box") as regions_box:
                gr.HTML(regions.legend_html())
                editor = gr.ImageEditor(
                    label="Paint the subjects' regions", type="numpy", canvas_size=regions.canvas_size(res_w, res_h),
                    fixed_canvas=True, layers=gr.LayerOptions(layers=["Regions"], allow_additional_layers=False),
                    brush=gr.Brush(colors=[regions.COLORS[s] for s in regions.SUBJECTS], color_mode="fixed"),
                    transforms=(), sources=(), elem_id="gen-regions", height=300,
                )
                all_layers = gr.Checkbox(value=ComposerOptions().region_all_layers, elem_id="gen-all-layers",
                                         label="composer: each subject LoRA acts with all its layers inside its region",
                                         info="The paper uses only a LoRA's cross-attention (and text encoder) in its region. "
                                              "Tick it for LoRAs that hold their subject in other layers too (most community "
                                              "LoRAs, and the toy model's), or the subject may not appear at all.")
                region_preview = gr.Image(label="Regions over the last image", interactive=False, height=200, format="png",
                                          elem_id="gen-region-preview", elem_classes=["pixelated"], buttons=[])
            masks = gr.Gallery(label="Attention masks (clora)", columns=4, height=120, elem_id="gen-masks",
                               elem_classes=["pixelated"], object_fit="contain", visible=False)
            with gr.Accordion("Reuse settings from an image", open=False, elem_id="gen-reuse-box"):
                reuse = gr.Button("Reuse settings of the selected result", elem_id="gen-reuse", size="sm")
                reuse_png = gr.File(label="…or drop any studio PNG here (engine, regions and roles come back too)",
                                    file_types=[".png"], height=90, elem_id="gen-reuse-png")
    job_id = gr.State(None)
    selected_image = gr.State(None)
    last_image = gr.State(None)

    row_inputs = [c for r in rows for c in r]

    def refresh():
        cards = [c for c in actions.lora_cards(services) if c.get("compatible") is not False and not c.get("error")]
        choices = [(widgets.lora_label(c), c["name"]) for c in cards]
        content = [""] + [c["name"] for c in cards if c.get("role") in ("content", "joint")]
        style = [""] + [c["name"] for c in cards if c.get("role") in ("style", "joint")]
        return [gr.update(choices=choices) for _ in range(N_ROWS)] + [gr.update(choices=content), gr.update(choices=style)]

    def active_rows(row_vals) -> list[dict]:
        return picked_rows([tuple(row_vals[i * 4:(i + 1) * 4]) for i in range(N_ROWS)])

    def check_triggers(*row_vals):
        warns = widgets.shared_triggers(active_rows(row_vals), actions.lora_cards(services))
        return "\n\n".join(f"⚠ {w}" for w in warns)

    for dd, w, role, _ in rows:
        for comp in (dd, w, role):
            comp.change(check_triggers, inputs=row_inputs, outputs=trigger_warning, api_visibility="private",
                        show_progress="hidden")

    def on_pick(name, p):
        """Picking a LoRA: its recommended weight, and its trigger tag in the prompt unless the prompt names it."""
        if not name:
            return gr.skip(), gr.skip()
        card = next((c for c in actions.lora_cards(services) if c["name"] == name), {})
        return gr.update(value=float(card.get("weight") or 1.0)), widgets.insert_tag(p, name, card.get("trigger", ""))

    for dd, w, _, _ in rows:
        dd.input(on_pick, inputs=[dd, prompt], outputs=[w, prompt], api_visibility="private", show_progress="hidden")

    def on_go(p, neg, eng, dr, ds, sd, st, g, wd, ht, ed, al, bc, bcw, bs, bsw, bb, *row_vals):
        def fail(msg: str):
            return gr.skip(), f"**⚠ Could not start:** {msg}", gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()

        try:
            seed_v = int(str(sd).strip() or -1)
        except ValueError:
            yield fail("the seed must be a whole number (or -1 for random).")
            return
        common = dict(seed=seed_v, steps=int(st), guidance=float(g), width=int(wd or 0), height=int(ht or 0))
        blora = {"content": {"lora": bc, "weight": float(bcw)} if bc else None,
                 "style": {"lora": bs, "weight": float(bsw)} if bs else None, "block_prompts": bool(bb)} if bc or bs else None
        try:
            kind, cfg, notes, active = build_request(services, p, neg, eng, active_rows(row_vals), ed, dr, ds, common, blora,
                                                     all_layers=bool(al))
            jid = (actions.submit_generate if kind == "generate" else actions.submit_compose)(services, cfg)
        except actions.StudioError as exc:
            yield fail(str(exc))
            return
        note = "".join(f"\n\n⚠ {n}" for n in notes)
        yield jid, "Queued…" + note, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        while True:
            job = services.store.get(jid)
            if job["status"] in actions.TERMINAL:
                break
            yield gr.skip(), actions.job_summary(job, services.store.list(100)) + note, gr.skip(), gr.skip(), gr.skip(), \
                gr.skip(), gr.skip()
            time.sleep(0.3)
        if job["status"] != "succeeded":
            head = "Stopped" if job["status"] == "cancelled" else "⚠ Failed"
            yield jid, f"**{head}:** {job['error'] or actions.job_summary(job)} (the previous results are kept below)", \
                gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        res = job["result"]
        outs = res.get("outputs", [])
        last = outs[0] if outs else None
        prev = regions.preview(last, regions.region_masks([(a["lora"], a["region"]) for a in active],
                                                          regions.painted_masks(ed), *output_size(services.model, wd, ht)),
                               *output_size(services.model, wd, ht))
        yield (jid, f"Done in {job['finished'] - job['started']:.1f} s." + note,
               widgets.sized(outs, f"seed {res.get('seed', '')}"), str(res.get("seed", "")),
               gr.update(value=widgets.sized(res.get("masks", [])), visible=bool(res.get("masks"))), last, prev)

    go.click(on_go, inputs=[prompt, negative, engine, decor_remove, decor_strength, seed, steps, guidance, width, height, editor,
                            all_layers, bl_content, bl_cw, bl_style, bl_sw, bl_blocks, *row_inputs],
             outputs=[job_id, status, gallery, used_seed, masks, last_image, region_preview], api_visibility="private",
             concurrency_limit=None, show_progress="minimal", show_progress_on=status)  # earlier results stay visible
    engine.change(lambda e: gr.Accordion(open=True) if e != "merge" else gr.skip(), inputs=engine, outputs=regions_box,
                  api_visibility="private", show_progress="hidden")
    stop.click(lambda j: services.store.request(j, "stop") if j else None, inputs=job_id, api_visibility="private")

    def on_engine(e, st, g):
        new = engine_settings(per_engine, e, st, g)
        return (gr.skip(), gr.skip()) if new is None else new

    engine.input(on_engine, inputs=[engine, steps, guidance], outputs=[steps, guidance], api_visibility="private",
                 show_progress="hidden")

    def on_regions(ed, wd, ht, last, *row_vals):
        w_, h_ = output_size(services.model, wd, ht)
        picked = [(n or f"row {i + 1}", r) for i, (n, r) in enumerate(zip(row_vals[0::4], row_vals[3::4])) if r != regions.EVERYWHERE]
        return regions.preview(last, regions.region_masks(picked, regions.painted_masks(ed), w_, h_), w_, h_)

    preview_inputs = [editor, width, height, last_image, *row_inputs]
    editor.change(on_regions, inputs=preview_inputs, outputs=region_preview, api_visibility="private", show_progress="hidden",
                  trigger_mode="always_last")
    for _, _, _, region in rows:
        region.change(on_regions, inputs=preview_inputs, outputs=region_preview, api_visibility="private", show_progress="hidden")

    def on_size(wd, ht):
        return gr.update(canvas_size=regions.canvas_size(*output_size(services.model, wd, ht)))

    for box in (width, height):
        box.change(on_size, inputs=[width, height], outputs=editor, api_visibility="private", show_progress="hidden")

    def on_select(evt: gr.SelectData):
        v = evt.value
        if isinstance(v, dict):
            v = (v.get("image") or {}).get("path") or v.get("path")
        return v

    gallery.select(on_select, outputs=selected_image, api_visibility="private")

    def on_reuse(path):
        if not path:
            return [gr.skip()] * len(reuse_outputs[:-1]) + ["**⚠ Click an image in the results first** (or drop a PNG below)."]
        try:
            return reuse_values(services, Path(path)) + ["Settings restored from " + Path(path).name + "."]
        except actions.StudioError as exc:
            return [gr.skip()] * len(reuse_outputs[:-1]) + [f"**⚠ Could not reuse:** {exc}"]

    reuse_outputs = [prompt, negative, seed, steps, guidance, width, height, decor_remove, decor_strength, engine, editor,
                     *row_inputs, all_layers, status]
    reuse.click(on_reuse, inputs=selected_image, outputs=reuse_outputs, api_visibility="private")
    reuse_png.upload(on_reuse, inputs=reuse_png, outputs=reuse_outputs, api_visibility="private")
    return {"refresh": refresh, "refresh_outputs": [r[0] for r in rows] + [bl_content, bl_style]}


def picked_rows(rows: list[tuple]) -> list[dict]:
    """The rows that take part: a LoRA is picked and its weight is not 0 (no separate "use" tick box)."""
    out = []
    for name, w, role, region in rows:
        if name and float(w or 0) != 0:
            out.append({"lora": name, "weight": float(w), "role": role or "subject", "region": region or regions.EVERYWHERE})
    return out


def build_request(services: Services, prompt, negative, engine, active, editor_value, decor_remove, decor_strength,
                  common: dict, blora: dict | None = None, all_layers: bool = False) -> tuple[str, dict, list[str], list[dict]]:
    """("generate" | "compose", config, warnings, rows) for the Generate button.

    ``<lora:name>`` tags become the LoRA's trigger and pick the LoRA when no row has it; merge (and B-LoRA) runs as
    a plain generation, composer/clora as a composition with the rows' regions (``all_layers``: the composer's
    ``region_all_layers``)."""
    cards = actions.lora_cards(services)
    text, tagged = widgets.expand_lora_tags(prompt, cards)
    active = list(active)
    for t in tagged:
        if not any(a["lora"] == t["lora"] for a in active):
            active.append({**t, "role": "subject", "region": regions.EVERYWHERE})
    notes = widgets.shared_triggers(active, cards)
    if engine == "merge" or blora:
        cfg = dict(prompt=text, negative_prompt=negative, loras=[{"lora": a["lora"], "weight": a["weight"]} for a in active],
                   decor_remove=decor_remove, decor_strength=float(decor_strength), **common)
        if blora:
            cfg["blora"] = blora
        return "generate", cfg, notes, active
    spec = _spec(services, text, negative, engine, active, editor_value, decor_remove, decor_strength, common)
    if engine == "composer" and all_layers:
        spec["composer"] = {"region_all_layers": True}
    return "compose", spec, notes, active


def _lora_row(i: int) -> tuple:
    with gr.Row(equal_height=True, elem_classes=["gen-lora-row"]):
        dd = gr.Dropdown(choices=[], value=None, label=f"LoRA {i + 1}", scale=4, min_width=150, elem_id=f"gen-lora-{i}",
                         allow_custom_value=True)  # a reused PNG may name a LoRA that is gone: the check says so inline
        w = gr.Slider(-1, 2, value=1.0, step=0.05, label="weight", scale=3, min_width=110, elem_id=f"gen-lora-{i}-weight")
        role = gr.Dropdown(["subject", "style"], value="subject", label="role", scale=2, min_width=100, elem_id=f"gen-lora-{i}-role")
        region = gr.Dropdown(regions.region_choices(), value=regions.EVERYWHERE, label="region", scale=3, min_width=130,
                             elem_id=f"gen-lora-{i}-region")
    return dd, w, role, region


def reuse_values(services: Services, path: Path) -> list:
    """Form values from a studio PNG: prompt, settings, engine, the LoRA rows with roles and regions, painted masks."""
    from pipelines.generate import read_png_params

    try:
        params = read_png_params(path)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types
        raise actions.InputError(f"{path.name} is not a readable PNG: {exc}") from exc
    if not params:
        raise actions.InputError(f"{path.name} has no studio parameters (it was not made by the studio).")
    cfg = params.get("config") or params.get("composition") or {}
    comp = params.get("composition")
    width, height = int(cfg.get("width", 0) or 0), int(cfg.get("height", 0) or 0)
    out_w, out_h = int(params.get("width") or width or 0), int(params.get("height") or height or 0)
    rows, painted, editor = [], {}, gr.skip()
    if comp:
        for c in comp.get("concepts", []):
            region = c.get("region")
            if isinstance(region, str):  # a painted mask file: restore it as paint of the next subject colour
                subject = regions.SUBJECTS[len(painted) % len(regions.SUBJECTS)]
                painted[subject] = region
                name = subject
            else:
                name = regions.region_of(region, out_w, out_h) if region is not None else regions.EVERYWHERE
            rows.append((c["lora"], c.get("weight", 1.0), "subject", name))
        rows += [(g["lora"], g.get("weight", 1.0), "style", regions.EVERYWHERE) for g in comp.get("global_loras", [])]
        layer = regions.layer_from_masks(painted, out_w, out_h) if painted else None
        editor = {"background": None, "layers": [layer], "composite": None} if layer is not None else None
        engine = comp.get("engine", "merge")
    else:
        rows = [(x["name"], x["weight"], "subject", regions.EVERYWHERE) for x in params.get("loras", [])]
        engine = "merge"
    out = [params.get("prompt", ""), params.get("negative_prompt", ""), str(params.get("seed", -1)), params.get("steps", 25),
           params.get("guidance", 7.0), width, height, cfg.get("decor_remove", ""), cfg.get("decor_strength", 1.0), engine, editor]
    for i in range(N_ROWS):
        out += list(rows[i]) if i < len(rows) else [None, 1.0, "subject", regions.EVERYWHERE]
    return out + [bool(((comp or {}).get("composer") or {}).get("region_all_layers", False))]


def _spec(services: Services, prompt, negative, engine, active, editor_value, decor_remove, decor_strength, common) -> dict:
    """A CompositionSpec dict from the rows: subjects become concepts with regions, styles become global LoRAs.

    Painted regions are scaled to the output size (nearest) and saved as mask files; box presets are fractions."""
    concepts, global_loras = [], []
    painted = regions.painted_masks(editor_value)
    width, height = output_size(services.model, common.get("width"), common.get("height"))
    template = model_hints(services.model).get("concept_prompt")
    cards = {c["name"]: c for c in actions.lora_cards(services)}
    for a in active:
        if a["role"] == "style":
            global_loras.append({"lora": a["lora"], "weight": a["weight"]})
            continue
        # token, class word and (by default) prompt come from the LoRA's trigger and class word, built as the engine's
        # paper does (studio.composition.fill_concepts, shared with the CLI and the API). A model that carries its own
        # caption language for a region (toy-xl: "a {trigger} emblem") gives the composer's region prompt.
        entry = {"lora": a["lora"], "weight": a["weight"], "region": None}
        trigger = cards.get(a["lora"], {}).get("trigger")
        if engine == "composer" and template and trigger:
            entry["prompt"] = template.format(trigger=trigger)
        if a["region"] in regions.BOXES:
            entry["region"] = {"box": list(regions.BOXES[a["region"]])}
        elif a["region"] in regions.SUBJECTS:
            m = painted.get(a["region"])
            if m is None:
                word = regions.COLOR_WORDS[a["region"]]
                raise actions.InputError(f"Nothing is painted in {word} for {a['region']} ({a['lora']}): paint its region "
                                         "on the canvas with that colour, or pick a box such as 'left half'.")
            entry["region"] = {"mask": str(regions.save_mask(m, services.ws.cache / "masks", a["region"], width, height))}
        concepts.append(entry)
    decor = {"decor_remove": decor_remove, "decor_strength": float(decor_strength)} if (decor_remove or "").strip() else {}
    return {"prompt": prompt, "negative_prompt": negative, "engine": engine, "concepts": concepts, "global_loras": global_loras,
            **decor, **common}
