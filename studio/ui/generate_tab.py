"""Generate & compose tab: prompt, LoRA rows (enable, weight, role, region), regions editor, engine, DECOR, seed."""

from __future__ import annotations

import time
from pathlib import Path

import gradio as gr
import numpy as np

from . import actions
from .actions import Services

N_ROWS = 4
REGIONS = ["everywhere", "Subject A", "Subject B", "left half", "right half"]
BOXES = {"left half": [0.0, 0.0, 0.5, 1.0], "right half": [0.5, 0.0, 1.0, 1.0]}
ENGINES = ["merge", "composer", "clora"]


def build(services: Services) -> dict:
    gr.Markdown("<span class='studio-hint'>Pick LoRAs and weights. **merge** mixes them everywhere (fast). "
                "**composer** and **clora** keep each subject in its own region: paint Subject A/B on the canvas or pick "
                "left/right half.</span>")
    with gr.Row():
        with gr.Column(scale=3):
            prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a photo of zwx on a beach", elem_id="gen-prompt")
            negative = gr.Textbox(label="Negative prompt", elem_id="gen-negative")
            rows = []
            for i in range(N_ROWS):
                with gr.Row(equal_height=True):
                    en = gr.Checkbox(label="use", value=False, scale=0, min_width=60, elem_id=f"gen-lora-{i}-on")
                    dd = gr.Dropdown(choices=[], label=f"LoRA {i + 1}", scale=3, elem_id=f"gen-lora-{i}")
                    w = gr.Slider(-1, 2, value=1.0, step=0.05, label="weight", scale=2, elem_id=f"gen-lora-{i}-weight")
                    role = gr.Dropdown(["subject", "style"], value="subject", label="role", scale=1, elem_id=f"gen-lora-{i}-role")
                    region = gr.Dropdown(REGIONS, value="everywhere", label="region", scale=1, elem_id=f"gen-lora-{i}-region")
                rows.append((en, dd, w, role, region))
            engine = gr.Radio(ENGINES, value="merge", label="Engine", elem_id="gen-engine")
            with gr.Accordion("B-LoRA style transfer: content of one image, style of another", open=False):
                gr.Markdown("<span class='studio-hint'>Train B-LoRAs (method blora) on one image each, then pick the "
                            "content of one and the style of another. Write [c] and [s] in the prompt for their tokens, "
                            "e.g. 'A [c] in [s] style'.</span>")
                with gr.Row():
                    bl_content = gr.Dropdown(choices=[], label="Content B-LoRA", elem_id="gen-blora-content")
                    bl_cw = gr.Slider(0, 2, value=1.0, step=0.05, label="content weight", elem_id="gen-blora-content-weight")
                with gr.Row():
                    bl_style = gr.Dropdown(choices=[], label="Style B-LoRA", elem_id="gen-blora-style")
                    bl_sw = gr.Slider(0, 2, value=1.0, step=0.05, label="style weight", elem_id="gen-blora-style-weight")
                bl_blocks = gr.Checkbox(label="Per-block prompts (content block sees only 'A [c]', paper supplement)",
                                        elem_id="gen-blora-blocks")
            with gr.Accordion("DECOR: remove a meaning from the prompt", open=False):
                decor_remove = gr.Textbox(label="Remove (text)", placeholder="e.g. the background of the reference images",
                                          info="Projects this text's meaning out of the prompt embeddings (DECOR).",
                                          elem_id="gen-decor-remove")
                decor_strength = gr.Slider(0, 1, value=1.0, step=0.05, label="DECOR strength", elem_id="gen-decor-strength")
            with gr.Row():
                seed = gr.Textbox(value="-1", label="Seed (-1 = random)", elem_id="gen-seed", scale=2)
                steps = gr.Slider(1, 100, value=25, step=1, label="Steps", elem_id="gen-steps", scale=2)
                guidance = gr.Slider(0, 20, value=7.0, step=0.5, label="Guidance", elem_id="gen-guidance", scale=2)
            with gr.Row():
                width = gr.Number(value=0, precision=0, label="Width (0 = model default)", elem_id="gen-width")
                height = gr.Number(value=0, precision=0, label="Height (0 = model default)", elem_id="gen-height")
        with gr.Column(scale=2):
            editor = gr.ImageEditor(
                label="Regions: paint Subject A and Subject B", type="numpy", canvas_size=(512, 512), fixed_canvas=True,
                layers=gr.LayerOptions(layers=["Subject A", "Subject B"], allow_additional_layers=False),
                brush=gr.Brush(colors=["#e63946", "#1d70b8"], color_mode="fixed"), transforms=(), elem_id="gen-regions",
                height=320,
            )
    with gr.Row():
        go = gr.Button("Generate", variant="primary", elem_id="gen-go", scale=3)
        stop = gr.Button("Stop", elem_id="gen-stop", scale=1)
        reuse = gr.Button("Reuse settings of selected image", elem_id="gen-reuse", scale=2)
    status = gr.Markdown(elem_id="gen-status")
    used_seed = gr.Textbox(label="Used seed", interactive=False, elem_id="gen-used-seed")
    gallery = gr.Gallery(label="Results (PNG with parameters)", columns=4, height=320, format="png", elem_id="gen-gallery")
    masks = gr.Gallery(label="Attention masks (clora)", columns=4, height=140, visible=True, elem_id="gen-masks")
    job_id = gr.State(None)
    selected_image = gr.State(None)
    history = gr.State([])

    def refresh():
        cards = [c for c in actions.lora_cards(services) if c.get("compatible") is not False and not c.get("error")]
        names = [c["name"] for c in cards]
        content = [""] + [c["name"] for c in cards if c.get("role") in ("content", "joint")]
        style = [""] + [c["name"] for c in cards if c.get("role") in ("style", "joint")]
        return [gr.update(choices=names) for _ in range(N_ROWS)] + [gr.update(choices=content), gr.update(choices=style)]

    row_inputs = [c for r in rows for c in r]

    def on_go(p, neg, eng, dr, ds, sd, st, g, wd, ht, ed, bc, bcw, bs, bsw, bb, *row_vals):
        try:
            seed_v = int(str(sd).strip() or -1)
        except ValueError as exc:
            raise gr.Error("The seed must be a whole number (or -1 for random).") from exc
        if "<lora:" in (p or ""):
            gr.Warning("The prompt contains <lora:…>: that syntax is not used here. Pick LoRAs in the rows instead.")
        active = []
        for i in range(N_ROWS):
            en, name, w, role, region = row_vals[i * 5:(i + 1) * 5]
            if en and name:
                active.append({"lora": name, "weight": float(w), "role": role, "region": region})
        common = dict(seed=seed_v, steps=int(st), guidance=float(g), width=int(wd or 0), height=int(ht or 0))
        try:
            if eng == "merge" or bc or bs:
                cfg = dict(prompt=p, negative_prompt=neg, loras=[{"lora": a["lora"], "weight": a["weight"]} for a in active],
                           decor_remove=dr, decor_strength=float(ds), **common)
                if bc or bs:
                    cfg["blora"] = {"content": {"lora": bc, "weight": float(bcw)} if bc else None,
                                    "style": {"lora": bs, "weight": float(bsw)} if bs else None, "block_prompts": bool(bb)}
                jid = actions.submit_generate(services, cfg)
            else:
                jid = actions.submit_compose(services, _spec(services, p, neg, eng, active, ed, dr, ds, common))
        except actions.StudioError as exc:
            raise gr.Error(str(exc)) from exc
        yield jid, "Queued…", gr.skip(), gr.skip(), gr.skip()
        while True:
            job = services.store.get(jid)
            if job["status"] in actions.TERMINAL:
                break
            yield gr.skip(), actions.job_summary(job), gr.skip(), gr.skip(), gr.skip()
            time.sleep(0.3)
        if job["status"] != "succeeded":
            raise gr.Error(actions.job_summary(job))
        res = job["result"]
        yield (jid, f"Done in {job['finished'] - job['started']:.1f} s.", res.get("outputs", []), str(res.get("seed", "")),
               res.get("masks", []))

    go.click(on_go, inputs=[prompt, negative, engine, decor_remove, decor_strength, seed, steps, guidance, width, height, editor,
                            bl_content, bl_cw, bl_style, bl_sw, bl_blocks, *row_inputs],
             outputs=[job_id, status, gallery, used_seed, masks], api_visibility="private", concurrency_limit=None)
    stop.click(lambda j: services.store.request(j, "stop") if j else None, inputs=job_id, api_visibility="private")

    def on_select(evt: gr.SelectData):
        v = evt.value
        if isinstance(v, dict):
            v = (v.get("image") or {}).get("path") or v.get("path")
        return v

    gallery.select(on_select, outputs=selected_image, api_visibility="private")

    def on_reuse(path):
        if not path:
            raise gr.Error("Click an image in the results first.")
        from pipelines.generate import read_png_params

        try:
            params = read_png_params(Path(path))
        except Exception as exc:  # noqa: BLE001
            raise gr.Error(f"This image has no studio parameters: {exc}") from exc
        if not params:
            raise gr.Error("This image has no studio parameters.")
        cfg = params.get("config", {})
        out = [params.get("prompt", ""), params.get("negative_prompt", ""), str(params.get("seed", -1)), params.get("steps", 25),
               params.get("guidance", 7.0), cfg.get("width", 0), cfg.get("height", 0), cfg.get("decor_remove", ""),
               cfg.get("decor_strength", 1.0)]
        loras = params.get("loras", [])
        for i in range(N_ROWS):
            if i < len(loras):
                out += [True, loras[i]["name"], loras[i]["weight"]]
            else:
                out += [False, None, 1.0]
        return out

    reuse_outputs = [prompt, negative, seed, steps, guidance, width, height, decor_remove, decor_strength]
    for en, dd, w, _, _ in rows:
        reuse_outputs += [en, dd, w]
    reuse.click(on_reuse, inputs=selected_image, outputs=reuse_outputs, api_visibility="private")
    return {"refresh": refresh, "refresh_outputs": [r[1] for r in rows] + [bl_content, bl_style]}


def _spec(services: Services, prompt, negative, engine, active, editor_value, decor_remove, decor_strength, common) -> dict:
    """A CompositionSpec dict from the rows: subjects become concepts with regions, styles become global LoRAs."""
    concepts, global_loras = [], []
    masks = _layer_masks(editor_value)
    for a in active:
        if a["role"] == "style":
            global_loras.append({"lora": a["lora"], "weight": a["weight"]})
            continue
        # prompt, token and class word come from the LoRA's trigger and class word, built by the engine as its paper
        # does (studio.composition.fill_concepts, shared with the CLI and the API)
        entry = {"lora": a["lora"], "weight": a["weight"], "region": None}
        if a["region"] in BOXES:
            entry["region"] = {"box": BOXES[a["region"]]}
        elif a["region"] in ("Subject A", "Subject B"):
            m = masks.get(a["region"])
            if m is None:
                raise actions.InputError(f"Paint the {a['region']} layer on the canvas (or choose left/right half).")
            path = services.ws.cache / "masks" / f"{int(time.time() * 1000)}-{a['region'].replace(' ', '_')}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            from PIL import Image

            Image.fromarray(m).save(path)
            entry["region"] = {"mask": str(path)}
        concepts.append(entry)
    decor = {"decor_remove": decor_remove, "decor_strength": float(decor_strength)} if (decor_remove or "").strip() else {}
    return {"prompt": prompt, "negative_prompt": negative, "engine": engine, "concepts": concepts, "global_loras": global_loras,
            **decor, **common}


def _layer_masks(value) -> dict[str, np.ndarray]:
    """Binary masks (uint8 0/255) from the ImageEditor's layers: a layer's alpha is its region."""
    out = {}
    if not isinstance(value, dict):
        return out
    for name, layer in zip(("Subject A", "Subject B"), value.get("layers") or []):
        if layer is None:
            continue
        arr = np.asarray(layer)
        alpha = arr[..., 3] if arr.ndim == 3 and arr.shape[-1] == 4 else (arr.max(axis=-1) if arr.ndim == 3 else arr)
        if (alpha > 0).any():
            out[name] = ((alpha > 0) * 255).astype(np.uint8)
    return out
