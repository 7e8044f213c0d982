"""Library tab: LoRA cards with preview, architecture, method, trigger, weight; rename, delete, download, import."""

from __future__ import annotations

import gradio as gr

from . import actions
from .actions import Services

COLUMNS = ["name", "method", "role", "architecture", "compatible", "trigger", "weight", "rank", "steps"]


FILTER_ALL = "all"


def filter_cards(cards: list[dict], query: str = "", method: str = FILTER_ALL, role: str = FILTER_ALL,
                 arch: str = FILTER_ALL) -> list[dict]:
    """Cards whose name, trigger or description contains ``query`` and that match the method/role/architecture."""
    q = (query or "").strip().lower()
    out = []
    for c in cards:
        text = " ".join(str(c.get(k, "")) for k in ("name", "trigger", "description", "method")).lower()
        if q and q not in text:
            continue
        if method not in (None, "", FILTER_ALL) and c.get("method") != method:
            continue
        if role not in (None, "", FILTER_ALL) and c.get("role") != role:
            continue
        if arch not in (None, "", FILTER_ALL) and (c.get("architecture") or "") != arch:
            continue
        out.append(c)
    return out


def metadata_table(card: dict) -> str:
    """The card as a two-column Markdown table with readable dates and short hashes."""
    from .widgets import readable_time

    rows = [("Name", card.get("name")), ("Method", card.get("method")), ("Role", card.get("role")),
            ("Base model", (card.get("architecture") or "?").upper()),
            ("Fits the loaded model", {True: "yes", False: "no", None: "unknown"}[card.get("compatible")]),
            ("Trigger word", card.get("trigger")), ("Recommended weight", card.get("weight")), ("Rank", card.get("rank")),
            ("Training steps", card.get("steps")), ("Saved", readable_time(card.get("mtime"))),
            ("SHA-256", (card.get("sha256") or "")[:12]), ("Source", card.get("source")),
            ("Description", card.get("description")), ("Problem", card.get("error"))]
    body = "\n".join(f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows if v not in (None, ""))
    return "| Field | Value |\n|---|---|\n" + body


def build(services: Services) -> dict:
    gr.Markdown("<span class='studio-hint'>Every LoRA you train or import. Click a card to select it. Files load in "
                "diffusers, and the kohya export (in the workspace's exports/ folder) loads in A1111/ComfyUI.</span>")
    with gr.Row():
        with gr.Column(scale=3):
            with gr.Row(elem_id="library-filters"):
                search = gr.Textbox(label="Search", placeholder="name, trigger or description", elem_id="library-search",
                                    scale=2, min_width=160)
                f_method = gr.Dropdown([FILTER_ALL, "dreambooth", "blora", "orthogonal", "merged", "imported"], value=FILTER_ALL,
                                       label="Method", allow_custom_value=True, elem_id="library-filter-method", min_width=110)
                f_role = gr.Dropdown([FILTER_ALL, "subject", "style", "content", "joint"], value=FILTER_ALL, label="Role",
                                     allow_custom_value=True, elem_id="library-filter-role", min_width=100)
                f_arch = gr.Dropdown([FILTER_ALL, "sd15", "sdxl"], value=FILTER_ALL, label="Base model",
                                     elem_id="library-filter-arch", min_width=100)
            cards = gr.Gallery(label="LoRAs", columns=4, height=400, allow_preview=False, object_fit="contain",
                               elem_id="library-cards", elem_classes=["pixelated", "library-grid"])
            shown = gr.State([])
            table = gr.Dataframe(headers=COLUMNS, interactive=False, label="Details", elem_id="library-table", wrap=True)
        with gr.Column(scale=2):
            selected = gr.Textbox(label="Selected LoRA", interactive=False, elem_id="library-selected")
            info = gr.Markdown(elem_id="library-info")
            download = gr.DownloadButton("Download .safetensors", elem_id="library-download", visible=False)
            new_name = gr.Textbox(label="New name", elem_id="library-new-name")
            rename = gr.Button("Rename", elem_id="library-rename")
            split = gr.Button("Split B-LoRA into content and style entries", elem_id="library-split", visible=False)
            confirm = gr.Checkbox(label="Yes, delete this LoRA (it is moved to the workspace's trash/ folder)", elem_id="library-confirm")
            delete = gr.Button("Delete", variant="stop", elem_id="library-delete")
            message = gr.Markdown(elem_id="library-message")
            with gr.Accordion("Merge LoRAs (orthogonal adaptation: merge without interference)", open=False):
                merge_pick = gr.Dropdown(choices=[], multiselect=True, label="LoRAs to merge", elem_id="library-merge-pick")
                merge_lam = gr.Slider(0.1, 1.5, value=0.6, step=0.05, label="λ per LoRA (paper: 0.6)", elem_id="library-merge-lam",
                                      info="How strongly each LoRA counts in the merged file.")
                merge_name = gr.Textbox(label="Name of the merged LoRA", elem_id="library-merge-name")
                with gr.Row():
                    merge_btn = gr.Button("Merge into one file", elem_id="library-merge")
                    crosstalk_btn = gr.Button("Show crosstalk", elem_id="library-crosstalk")
                crosstalk_out = gr.Code(label="Crosstalk (overlap of down-projections, output interference)", language=None,
                                        elem_id="library-crosstalk-out")
            gr.Markdown("### Import a LoRA file")
            upload = gr.File(file_types=[".safetensors"], label="LoRA .safetensors (diffusers or kohya format)", elem_id="library-import")

    filters = [search, f_method, f_role, f_arch]

    def refresh(query="", method=FILTER_ALL, role=FILTER_ALL, arch=FILTER_ALL):
        cs = filter_cards(actions.lora_cards(services), query, method, role, arch)
        gallery = [(c["preview"] or _placeholder(services), _caption(c)) for c in cs]
        rows = [[c.get(k, "") if k != "compatible" else {True: "yes", False: "NO", None: "?"}[c.get("compatible")] for k in COLUMNS]
                for c in cs]
        return gallery, rows, [c["name"] for c in cs]

    for f in filters:
        f.change(refresh, inputs=filters, outputs=[cards, table, shown], api_visibility="private", show_progress="hidden")

    def on_select(names, evt: gr.SelectData):
        if evt.index is None or evt.index >= len(names):
            return "", "", gr.update(visible=False), gr.update(visible=False)
        c = next((x for x in actions.lora_cards(services) if x["name"] == names[evt.index]), None)
        if c is None:
            return "", "", gr.update(visible=False), gr.update(visible=False)
        is_blora = c.get("method") == "blora" and c.get("role") in ("joint", None, "")
        return c["name"], metadata_table(c), gr.update(value=c["file"], visible=True), gr.update(visible=is_blora)

    cards.select(on_select, inputs=shown, outputs=[selected, info, download, split], api_visibility="private")

    listing = [cards, table, shown]

    def fail(msg: str, extra: int = 0):
        """Errors go to the message line next to the buttons; the list stays as it is."""
        return (gr.skip(), gr.skip(), gr.skip(), f"**⚠** {msg}", *([gr.skip()] * extra))

    def on_rename(old, new, *flt):
        try:
            services.ws.rename_lora(old, (new or "").strip())
        except actions.InputError as exc:
            return fail(str(exc), 1)
        return (*refresh(*flt), f"Renamed {old} → {new}.", new)

    rename.click(on_rename, inputs=[selected, new_name, *filters], outputs=[*listing, message, selected], api_visibility="private")

    def on_split(name, *flt):
        from studio.blora_io import split_into_library

        if not name:
            return fail("Select a B-LoRA first.")
        try:
            made = split_into_library(services.ws, name)
        except actions.StudioError as exc:
            return fail(str(exc))
        return (*refresh(*flt), "Split into " + ", ".join(f"**{v}** ({k})" for k, v in made.items()) + ".")

    split.click(on_split, inputs=[selected, *filters], outputs=[*listing, message], api_visibility="private")

    def on_delete(name, ok, *flt):
        if not name:
            return fail("Select a LoRA first.", 2)
        if not ok:
            return fail("Tick the confirmation box to delete.", 2)
        try:
            services.ws.delete_lora(name)
        except actions.InputError as exc:
            return fail(str(exc), 2)
        return (*refresh(*flt), f"Deleted {name} (moved to trash/).", "", False)

    delete.click(on_delete, inputs=[selected, confirm, *filters], outputs=[*listing, message, selected, confirm],
                 api_visibility="private")

    def on_import(path, *flt):
        if not path:
            return gr.skip(), gr.skip(), gr.skip(), ""
        from pathlib import Path

        try:
            name = services.ws.import_lora(Path(path), Path(path).stem.replace(" ", "-"), arch=services.arch)
        except actions.StudioError as exc:
            return fail(str(exc))
        return (*refresh(*flt), f"Imported **{name}**.")

    def on_merge(picked, lam, name, *flt):
        from studio.orthogonal import merge_loras

        if not picked or len(picked) < 2:
            return fail("Pick at least two LoRAs to merge.")
        try:
            if services.ws.lora_path((name or "").strip()).exists():
                raise actions.InputError(f"A LoRA named {name.strip()!r} already exists: pick another name for the merge "
                                         "(or delete the old one first; it goes to the trash).")
            res = merge_loras([services.ws.lora_path(n) for n in picked], services.ws.lora_path((name or "").strip()),
                              lam=float(lam), name=name, ws=services.ws)
        except actions.StudioError as exc:
            return fail(str(exc))
        kind = "exact orthogonal merge" if res.orthogonal else "plain merge (these LoRAs may interfere)"
        warn = "".join(f"\n\n⚠ {w}" for w in res.warnings)
        return (*refresh(*flt), f"Merged {', '.join(picked)} into **{name}** ({kind}, rank {res.rank}).{warn}")

    def on_crosstalk(picked):
        from studio.orthogonal import crosstalk

        if not picked or len(picked) < 2:
            return "Pick at least two LoRAs."
        try:
            return crosstalk([services.ws.lora_path(n) for n in picked]).to_table(layers=True, top=20)
        except actions.StudioError as exc:
            return f"Could not compute the crosstalk: {exc}"

    merge_btn.click(on_merge, inputs=[merge_pick, merge_lam, merge_name, *filters], outputs=[*listing, message],
                    api_visibility="private")
    crosstalk_btn.click(on_crosstalk, inputs=merge_pick, outputs=crosstalk_out, api_visibility="private")
    cards.change(lambda: gr.update(choices=[c["name"] for c in actions.lora_cards(services) if not c.get("error")]),
                 outputs=merge_pick, api_visibility="private")

    upload.upload(on_import, inputs=[upload, *filters], outputs=[*listing, message], api_visibility="private")
    return {"refresh": refresh, "inputs": filters, "outputs": listing}


def _caption(c: dict) -> str:
    if c.get("error"):
        return f"{c['name']} — unreadable"
    mark = {True: "", False: " ⚠ other base", None: ""}[c.get("compatible")]
    trig = f" · trigger {c['trigger']}" if c.get("trigger") else ""
    return f"{c['name']}{trig} · {c.get('method', '?')} · {(c.get('architecture') or '?').upper()}{mark}"


def _placeholder(services: Services) -> str:
    from PIL import Image

    p = services.ws.cache / "no-preview.png"
    if not p.is_file():
        Image.new("RGB", (64, 64), (200, 200, 200)).save(p)
    return str(p)
