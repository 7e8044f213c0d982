"""Small shared pieces of the tabs, as plain functions: trigger tags in prompts, image captions, the loss chart's
data, the progress bar, and the queue line that says what a job waits for."""

from __future__ import annotations

import html
import re
import time
from pathlib import Path

from studio.errors import InputError

from .actions import _fmt_secs as fmt_secs

LORA_TAG = re.compile(r"<lora:([^:>\s]+)(?::([-+]?\d*\.?\d+))?>")


# ------------------------------------------------------------------------------------------------ LoRAs in prompts
def expand_lora_tags(prompt: str, cards: list[dict]) -> tuple[str, list[dict]]:
    """Replace each ``<lora:name>`` / ``<lora:name:weight>`` by the LoRA's trigger (A1111-style).

    Returns the prompt and the tagged LoRAs as ``[{"lora", "weight"}]`` (weight: the tag's, else the LoRA's
    recommended weight), so a tag both writes the trigger and picks the LoRA."""
    by_name = {c["name"]: c for c in cards if not c.get("error")}
    picked: list[dict] = []

    def sub(m: re.Match) -> str:
        name, weight = m.group(1), m.group(2)
        card = by_name.get(name)
        if card is None:
            raise InputError(f"The prompt names <lora:{name}>, but there is no LoRA {name!r} in the library.")
        if not any(p["lora"] == name for p in picked):
            picked.append({"lora": name, "weight": float(weight) if weight else float(card.get("weight") or 1.0)})
        return card.get("trigger") or name

    text = LORA_TAG.sub(sub, prompt or "")
    return " ".join(text.split()), picked


def insert_tag(prompt: str, name: str, trigger: str) -> str:
    """Add ``<lora:name>`` to the prompt unless it already names the LoRA (its tag or its trigger word)."""
    prompt = prompt or ""
    if f"<lora:{name}" in prompt or (trigger and re.search(rf"\b{re.escape(trigger)}\b", prompt)):
        return prompt
    return f"{prompt.rstrip()} <lora:{name}>".strip()


def shared_triggers(rows: list[dict], cards: list[dict]) -> list[str]:
    """One warning per trigger word that two or more picked subject LoRAs share."""
    trig = {c["name"]: c.get("trigger", "") for c in cards}
    seen: dict[str, list[str]] = {}
    for r in rows:
        if r.get("role", "subject") != "subject":
            continue
        t = trig.get(r["lora"], "")
        if t and r["lora"] not in seen.setdefault(t, []):
            seen[t].append(r["lora"])
    return [f"{' and '.join(names)} share the trigger **{t}**: the prompt cannot tell them apart, so composition mixes "
            "them up. Retrain one with its own trigger." for t, names in seen.items() if len(names) > 1]


def lora_label(card: dict) -> str:
    t = card.get("trigger")
    return f"{card['name']} · trigger {t}" if t else card["name"]


# ------------------------------------------------------------------------------------------------ images
def image_size(path: str | Path) -> tuple[int, int] | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError):
        return None


def sized(paths: list[str], label: str = "") -> list[tuple[str, str]]:
    """Gallery items whose caption gives the true pixel size (the page shows them upscaled, crisp)."""
    out = []
    for p in paths:
        size = image_size(p)
        cap = f"{size[0]}×{size[1]} px" if size else ""
        out.append((p, f"{cap} · {label}" if label and cap else label or cap))
    return out


def sample_items(paths: list[str]) -> list[tuple[str, str]]:
    """Training samples, newest first, captioned with their size and step (files are named step_000123.png)."""
    out = []
    for p in reversed(paths):
        m = re.search(r"step_(\d+)", Path(p).name)
        out += sized([p], f"step {int(m.group(1))}" if m else "")
    return out


# ------------------------------------------------------------------------------------------------ training progress
def smooth(values: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard-style smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * float(v)
        out.append(avg / (1 - beta ** i))
    return out


def loss_frame(losses: list[float]):
    """Long-format frame for a two-line LinePlot: the raw per-step loss and its smoothed trend."""
    import pandas as pd

    steps = list(range(1, len(losses) + 1))
    beta = 0.9 if len(losses) < 200 else 0.97
    return pd.DataFrame({"step": steps * 2, "loss": [float(x) for x in losses] + smooth(losses, beta),
                         "series": ["per step"] * len(losses) + ["smoothed"] * len(losses)})


def progress_html(step: int, total: int, label: str = "") -> str:
    """A plain progress bar (not a slider): filled share, steps and a short label."""
    frac = 0.0 if not total else max(0.0, min(1.0, step / total))
    return (f"<div class='studio-progress' role='progressbar' aria-valuemin='0' aria-valuemax='{total}' "
            f"aria-valuenow='{step}'><div class='studio-progress-fill' style='width:{frac * 100:.1f}%'></div>"
            f"<span>{html.escape(label or f'{step}/{total} steps')}</span></div>")


def job_title(job: dict) -> str:
    cfg = job.get("config", {})
    if job["kind"] == "train":
        return f"training **{cfg.get('name', '?')}** ({cfg.get('method', 'dreambooth')})"
    prompt = (cfg.get("prompt") or "")[:40]
    what = "composition" if job["kind"] == "compose" else "generation"
    return f"{what} “{html.escape(prompt)}”"


def remaining_secs(job: dict, speeds: dict[str, float] | None = None) -> float | None:
    """Seconds a job still needs: its own ETA when running, else its steps at a measured speed (None: unknown)."""
    if job["status"] == "running":
        return job["eta_s"] or None
    steps = int(job["config"].get("steps") or 0)
    rate = (speeds or {}).get(job["kind"])
    return steps / rate if steps and rate else None


def queue_state(jobs: list[dict], job_id: str) -> dict:
    """Position of a queued job and what it waits for: the jobs ahead of it (FIFO), the running one first."""
    active = sorted((j for j in jobs if j["status"] in ("queued", "running")), key=lambda j: j["created"])
    speeds: dict[str, float] = {}
    for j in sorted(jobs, key=lambda j: j["created"], reverse=True):
        if j["status"] == "succeeded" and j["it_s"] and j["kind"] not in speeds:
            speeds[j["kind"]] = j["it_s"]
    ahead = []
    for j in active:
        if j["id"] == job_id:
            break
        ahead.append(j)
    waits = [remaining_secs(j, speeds) for j in ahead]
    eta = sum(w for w in waits if w) if ahead and all(waits) else (0.0 if not ahead else None)
    return {"position": len(ahead) + 1, "ahead": ahead, "wait_s": eta}


def queue_line(jobs: list[dict], job: dict) -> str:
    """'Waiting: 2nd in the queue, behind training **x** (step 40/300, ETA 2 min) …' for a queued job."""
    st = queue_state(jobs, job["id"])
    if not st["ahead"]:
        return "Waiting for the GPU worker to start it…"
    running = next((j for j in st["ahead"] if j["status"] == "running"), None)
    parts = []
    if running is not None:
        step = f"step {running['step']}/{running['total']}" if running["total"] else running["phase"]
        eta = f", ETA {fmt_secs(running['eta_s'])}" if running["eta_s"] else ""
        parts.append(f"behind {job_title(running)} ({step}{eta})")
    queued = len(st["ahead"]) - (running is not None)
    if queued:
        parts.append(f"{queued} more job{'s' if queued > 1 else ''} ahead")
    wait = f" Starts in about {fmt_secs(st['wait_s'])}." if st["wait_s"] else ""
    n = st["position"]
    ordinal = {1: "1st", 2: "2nd", 3: "3rd"}.get(n, f"{n}th")
    return f"Waiting: {ordinal} in the queue, {', '.join(parts)}.{wait}"


def readable_time(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(float(t))) if t else ""
