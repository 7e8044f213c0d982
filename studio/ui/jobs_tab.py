"""Jobs tab: every job with its status; select one to see its log, error and outputs, or stop it."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from . import actions
from .actions import Services

COLUMNS = ["id", "kind", "name / prompt", "status", "step", "it/s", "error"]


def build(services: Services) -> dict:
    with gr.Row():
        refresh_btn = gr.Button("Refresh", scale=0, elem_id="jobs-refresh")
        job_box = gr.Textbox(label="Job id", elem_id="jobs-id", scale=3)
        stop = gr.Button("Stop this job", scale=0, elem_id="jobs-stop")
        resume = gr.Button("Resume this training", scale=0, elem_id="jobs-resume")
    health = gr.Markdown(services.worker.health(), elem_id="jobs-health")
    table = gr.Dataframe(headers=COLUMNS, interactive=False, elem_id="jobs-table", wrap=True)
    detail = gr.Markdown(elem_id="jobs-detail")
    log = gr.Textbox(label="Log tail", lines=10, elem_id="jobs-log")

    def refresh():
        rows = []
        for j in services.store.list(100):
            label = j["config"].get("name") or j["config"].get("prompt", "")[:40]
            rows.append([j["id"], j["kind"], label, j["status"], f"{j['step']}/{j['total']}" if j["total"] else "",
                         f"{j['it_s']:.2f}" if j["it_s"] else "", j["error"][:120]])
        return rows, services.worker.health()

    def on_select(evt: gr.SelectData):
        jobs = services.store.list(100)
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        if row is None or row >= len(jobs):
            return gr.skip(), gr.skip(), gr.skip()
        j = jobs[row]
        outs = ", ".join(Path(p).name for p in j["outputs"])
        return j["id"], f"**{j['kind']}** · {actions.job_summary(j)}" + (f"\n\nOutputs: {outs}" if outs else ""), "\n".join(j["log"])

    table.select(on_select, outputs=[job_box, detail, log], api_visibility="private")
    refresh_btn.click(refresh, outputs=[table, health], api_visibility="private", concurrency_limit=None)

    def on_stop(jid):
        try:
            msg = services.store.request(jid.strip(), "stop")
        except actions.InputError as exc:
            raise gr.Error(str(exc)) from exc
        return msg, *refresh()

    stop.click(on_stop, inputs=job_box, outputs=[detail, table, health], api_visibility="private", concurrency_limit=None)

    def on_resume(jid):
        try:
            new = actions.resume_training(services, (jid or "").strip())
        except actions.InputError as exc:
            raise gr.Error(str(exc)) from exc
        return f"Resumed as job {new}.", *refresh()

    resume.click(on_resume, inputs=job_box, outputs=[detail, table, health], api_visibility="private", concurrency_limit=None)
    return {"refresh": refresh, "outputs": [table, health]}
