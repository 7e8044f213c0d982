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
            confirm = gr.Checkbox(label="Yes, delete this LoRA (it is moved to the workspace's trash/ folder)", elem_id="library-confirm")
            delete = gr.Button("Delete", variant="stop", elem_id="library-delete")
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
