"""Jobs tab: every job with its status, what a queued job waits for and an ETA; it refreshes itself every few seconds.
Select a job to see its log, error and outputs, or stop it."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from . import actions
from . import widgets as W
from .actions import Services

COLUMNS = ["id", "kind", "name / prompt", "status", "progress", "waits for / ETA", "started", "error"]
REFRESH_S = 3.0


def rows(jobs: list[dict]) -> list[list]:
    out = []
    for j in jobs:
        label = j["config"].get("name") or (j["config"].get("prompt") or "")[:40]
        if j["status"] == "queued":
            st = W.queue_state(jobs, j["id"])
            ahead = st["ahead"][0] if st["ahead"] else None
            if ahead:
                what = f"training {ahead['config'].get('name', '')}" if ahead["kind"] == "train" else ahead["kind"]
                waits = f"#{st['position']} · behind {what}"
            else:
                waits = "next"
            if st["wait_s"]:
                waits += f" · starts in ~{W.fmt_secs(st['wait_s'])}"
        elif j["status"] == "running":
            waits = f"ETA {W.fmt_secs(j['eta_s'])}" if j["eta_s"] else j["phase"]
        else:
            waits = ""
        out.append([j["id"], j["kind"], label, j["status"], f"{j['step']}/{j['total']}" if j["total"] else "", waits,
                    W.readable_time(j["started"]), j["error"][:120]])
    return out


def build(services: Services) -> dict:
    with gr.Row():
        job_box = gr.Textbox(label="Job id (click a row)", elem_id="jobs-id", scale=3)
        stop = gr.Button("Stop this job", scale=0, elem_id="jobs-stop", min_width=120)
        resume = gr.Button("Resume this training", scale=0, elem_id="jobs-resume", min_width=120)
    health = gr.Markdown(services.worker.health(), elem_id="jobs-health")
    gr.Markdown(f"<span class='studio-hint'>One job runs at a time on the GPU; the others wait in order. This list updates "
                f"every {REFRESH_S:.0f} s.</span>")
    table = gr.Dataframe(headers=COLUMNS, interactive=False, elem_id="jobs-table", wrap=True)
    detail = gr.Markdown(elem_id="jobs-detail")
    log = gr.Textbox(label="Log tail", lines=10, elem_id="jobs-log")
    timer = gr.Timer(REFRESH_S, active=False)

    def refresh():
        return rows(services.store.list(100)), services.worker.health()

    def on_select(evt: gr.SelectData):
        jobs = services.store.list(100)
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        if row is None or row >= len(jobs):
            return gr.skip(), gr.skip(), gr.skip()
        j = jobs[row]
        outs = ", ".join(Path(p).name for p in j["outputs"])
        return (j["id"], f"**{j['kind']}** · {actions.job_summary(j, jobs)}" + (f"\n\nOutputs: {outs}" if outs else ""),
                "\n".join(j["log"]))

    table.select(on_select, outputs=[job_box, detail, log], api_visibility="private")
    timer.tick(refresh, outputs=[table, health], api_visibility="private", concurrency_limit=None, show_progress="hidden")

    def on_stop(jid):
        try:
            msg = services.store.request((jid or "").strip(), "stop")
        except actions.InputError as exc:
            return f"**⚠** {exc}", gr.skip(), gr.skip()
        return msg, *refresh()

    stop.click(on_stop, inputs=job_box, outputs=[detail, table, health], api_visibility="private", concurrency_limit=None)

    def on_resume(jid):
        try:
            new = actions.resume_training(services, (jid or "").strip())
        except actions.InputError as exc:
            return f"**⚠** {exc}", gr.skip(), gr.skip()
        return f"Resumed as job {new}.", *refresh()

    resume.click(on_resume, inputs=job_box, outputs=[detail, table, health], api_visibility="private",
                 concurrency_limit=None)
    return {"refresh": refresh, "outputs": [table, health], "timer": timer}
