"""Library tab: LoRA cards with preview, architecture, method, trigger, weight; rename, delete, download, import."""

from __future__ import annotations

import gradio as gr

from . import actions
from .actions import Services

COLUMNS = ["name", "method", "role", "architecture", "compatible", "trigger", "weight", "rank", "steps"]


def build(services: Services) -> dict:
    gr.Markdown("<span class='studio-hint'>Every LoRA you train or import. Click a card to select it. Files load in "
                "diffusers, and the kohya export (in the workspace's exports/ folder) loads in A1111/ComfyUI.</span>")
    with gr.Row():
        with gr.Column(scale=3):
            cards = gr.Gallery(label="LoRAs", columns=4, height=360, allow_preview=False, elem_id="library-cards")
            table = gr.Dataframe(headers=COLUMNS, interactive=False, label="Details", elem_id="library-table", wrap=True)
        with gr.Column(scale=2):
            selected = gr.Textbox(label="Selected LoRA", interactive=False, elem_id="library-selected")
            info = gr.JSON(label="Metadata", elem_id="library-info")
            download = gr.DownloadButton("Download .safetensors", elem_id="library-download", visible=False)
            new_name = gr.Textbox(label="New name", elem_id="library-new-name")
            rename = gr.Button("Rename", elem_id="library-rename")
            split = gr.Button("Split B-LoRA into content and style entries", elem_id="library-split")
            confirm = gr.Checkbox(label="Yes, delete this LoRA (it is moved to the workspace's trash/ folder)", elem_id="library-confirm")
            delete = gr.Button("Delete", variant="stop", elem_id="library-delete")
            with gr.Accordion("Merge LoRAs (orthogonal adaptation: merge without interference)", open=False):
                merge_pick = gr.Dropdown(choices=[], multiselect=True, label="LoRAs to merge", elem_id="library-merge-pick")
                merge_lam = gr.Slider(0.1, 1.5, value=0.6, step=0.05, label="λ per LoRA (paper: 0.6)", elem_id="library-merge-lam")
                merge_name = gr.Textbox(label="Name of the merged LoRA", elem_id="library-merge-name")
                with gr.Row():
                    merge_btn = gr.Button("Merge into one file", elem_id="library-merge")
                    crosstalk_btn = gr.Button("Show crosstalk", elem_id="library-crosstalk")
                crosstalk_out = gr.Code(label="Crosstalk (overlap of down-projections, output interference)", language=None,
                                        elem_id="library-crosstalk-out")
            gr.Markdown("### Import a LoRA file")
            upload = gr.File(file_types=[".safetensors"], label="LoRA .safetensors (diffusers or kohya format)", elem_id="library-import")
            message = gr.Markdown(elem_id="library-message")

    def refresh():
        cs = actions.lora_cards(services)
        gallery = [(c["preview"] or _placeholder(services), _caption(c)) for c in cs]
        rows = [[c.get(k, "") if k != "compatible" else {True: "yes", False: "NO", None: "?"}[c.get("compatible")] for k in COLUMNS]
                for c in cs]
        return gallery, rows

    def on_select(evt: gr.SelectData):
        cs = actions.lora_cards(services)
        if evt.index is None or evt.index >= len(cs):
            return "", {}, gr.update(visible=False)
        c = cs[evt.index]
        return c["name"], {k: v for k, v in c.items() if k not in ("preview",)}, gr.update(value=c["file"], visible=True)

    cards.select(on_select, outputs=[selected, info, download], api_visibility="private")

    def on_rename(old, new):
        try:
            services.ws.rename_lora(old, (new or "").strip())
        except actions.InputError as exc:
            raise gr.Error(str(exc)) from exc
        return (*refresh(), f"Renamed {old} → {new}.", new)

    rename.click(on_rename, inputs=[selected, new_name], outputs=[cards, table, message, selected], api_visibility="private")

    def on_split(name):
        from studio.blora_io import split_into_library

        if not name:
            raise gr.Error("Select a B-LoRA first.")
        try:
            made = split_into_library(services.ws, name)
        except actions.StudioError as exc:
            raise gr.Error(str(exc)) from exc
        return (*refresh(), "Split into " + ", ".join(f"**{v}** ({k})" for k, v in made.items()) + ".")

    split.click(on_split, inputs=selected, outputs=[cards, table, message], api_visibility="private")

    def on_delete(name, ok):
        if not name:
            raise gr.Error("Select a LoRA first.")
        if not ok:
            raise gr.Error("Tick the confirmation box to delete.")
        try:
            services.ws.delete_lora(name)
        except actions.InputError as exc:
            raise gr.Error(str(exc)) from exc
        return (*refresh(), f"Deleted {name} (moved to trash/).", "", False)

    delete.click(on_delete, inputs=[selected, confirm], outputs=[cards, table, message, selected, confirm], api_visibility="private")

    def on_import(path):
        if not path:
            return gr.skip(), gr.skip(), ""
        from pathlib import Path

        try:
            name = services.ws.import_lora(Path(path), Path(path).stem.replace(" ", "-"), arch=services.arch)
        except actions.StudioError as exc:
            raise gr.Error(str(exc)) from exc
        return (*refresh(), f"Imported **{name}**.")

    def on_merge(picked, lam, name):
        from studio.orthogonal import merge_loras

        if not picked or len(picked) < 2:
            raise gr.Error("Pick at least two LoRAs to merge.")
        try:
            if services.ws.lora_path((name or "").strip()).exists():
                raise actions.InputError(f"A LoRA named {name.strip()!r} already exists: pick another name for the merge "
                                         "(or delete the old one first; it goes to the trash).")
            res = merge_loras([services.ws.lora_path(n) for n in picked], services.ws.lora_path((name or "").strip()),
                              lam=float(lam), name=name, ws=services.ws)
        except actions.StudioError as exc:
            raise gr.Error(str(exc)) from exc
        for w in res.warnings:
            gr.Warning(w)
        kind = "exact orthogonal merge" if res.orthogonal else "plain merge (these LoRAs may interfere)"
        return (*refresh(), f"Merged {', '.join(picked)} into **{name}** ({kind}, rank {res.rank}).")

    def on_crosstalk(picked):
        from studio.orthogonal import crosstalk

        if not picked or len(picked) < 2:
            raise gr.Error("Pick at least two LoRAs.")
        try:
            return crosstalk([services.ws.lora_path(n) for n in picked]).to_table(layers=True, top=20)
        except actions.StudioError as exc:
            raise gr.Error(str(exc)) from exc

    merge_btn.click(on_merge, inputs=[merge_pick, merge_lam, merge_name], outputs=[cards, table, message], api_visibility="private")
    crosstalk_btn.click(on_crosstalk, inputs=merge_pick, outputs=crosstalk_out, api_visibility="private")
    cards.change(lambda: gr.update(choices=[c["name"] for c in actions.lora_cards(services) if not c.get("error")]),
                 outputs=merge_pick, api_visibility="private")

    upload.upload(on_import, inputs=upload, outputs=[cards, table, message], api_visibility="private")
    return {"refresh": refresh, "outputs": [cards, table]}


def _caption(c: dict) -> str:
    if c.get("error"):
        return f"{c['name']} — unreadable"
    mark = {True: "", False: " ⚠ other base", None: ""}[c.get("compatible")]
    return f"{c['name']} · {c.get('method', '?')} · {(c.get('architecture') or '?').upper()} · {c.get('trigger', '')}{mark}"


def _placeholder(services: Services) -> str:
    from PIL import Image

    p = services.ws.cache / "no-preview.png"
    if not p.is_file():
        Image.new("RGB", (64, 64), (200, 200, 200)).save(p)
    return str(p)
