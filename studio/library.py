"""The workspace on disk: datasets/, loras/ (file + JSON sidecar + preview), exports/, outputs/, jobs/, checkpoints/.

User-given names are checked against a strict pattern, so no name can escape the workspace folder.
Sidecars follow A1111's naming (``name.json``, ``name.preview.png``) so other UIs pick them up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from . import lora_io
from .errors import InputError, LoraFormatError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Workspace:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root or os.environ.get("STUDIO_WORKSPACE", "workspace")).expanduser().resolve()
        for sub in ("datasets", "loras", "exports", "outputs", "jobs", "checkpoints", "cache"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    datasets = property(lambda self: self.root / "datasets")
    loras = property(lambda self: self.root / "loras")
    exports = property(lambda self: self.root / "exports")
    outputs = property(lambda self: self.root / "outputs")
    jobs = property(lambda self: self.root / "jobs")
    checkpoints = property(lambda self: self.root / "checkpoints")
    cache = property(lambda self: self.root / "cache")

    # ------------------------------------------------------------------------------------------------ names
    @staticmethod
    def check_name(name: str) -> str:
        if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name or name.endswith((".tmp", ".")):
            raise InputError(
                f"{name!r} is not a valid name: use 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit."
            )
        return name

    def _inside(self, p: Path) -> Path:
        p = p.resolve()
        if self.root not in p.parents and p != self.root:
            raise InputError("That path is outside the workspace.")
        return p

    # ------------------------------------------------------------------------------------------------ datasets
    def resolve_dataset(self, ref: str | os.PathLike) -> Path:
        """A dataset name in the workspace, or a folder path given on the command line."""
        ref = str(ref or "")
        if not ref:
            raise InputError("No images given: choose a folder (or upload images in the studio).")
        if NAME_RE.match(ref) and (self.datasets / ref).is_dir():
            return self.datasets / ref
        p = Path(ref).expanduser()
        if p.is_dir():
            return p
        raise InputError(f"Image folder not found: {ref}")

    def new_dataset(self, name: str) -> Path:
        self.check_name(name)
        path = self.datasets / name
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path

    # ------------------------------------------------------------------------------------------------ loras
    def lora_path(self, name: str) -> Path:
        return self.loras / f"{self.check_name(name)}.safetensors"

    def sidecar(self, name: str) -> Path:
        return self.loras / f"{self.check_name(name)}.json"

    def preview(self, name: str) -> Path:
        return self.loras / f"{self.check_name(name)}.preview.png"

    def set_preview(self, name: str, image_path: Path) -> None:
        tmp = self.loras / f".{name}.preview.png.tmp"
        shutil.copyfile(image_path, tmp)
        os.replace(tmp, self.preview(name))

    def write_sidecar(self, name: str, data: dict) -> None:
        lora_io.atomic_write_json(self.sidecar(name), data)

    def read_sidecar(self, name: str) -> dict:
        p = self.sidecar(name)
        if p.is_file():
            try:
                return json.loads(p.read_text())
            except json.JSONDecodeError:
                return {}
        return {}

    def list_loras(self) -> list[dict]:
        """Every LoRA in the library with its card data; unreadable files are listed with their error."""
        out = []
        for f in sorted(self.loras.glob("*.safetensors")):
            name = f.name[: -len(".safetensors")]
            if not NAME_RE.match(name):
                continue
            card = {"name": name, "file": str(f), "preview": str(self.preview(name)) if self.preview(name).is_file() else None}
            try:
                info = lora_io.inspect(f)
                meta = info["metadata"]
                card.update({
                    "architecture": info["architecture"], "method": info["method"], "trigger": meta.get("modelspec.trigger_phrase", ""),
                    "rank": info["ranks"][-1] if info["ranks"] else None, "weight": float(meta.get("studio.recommended_weight", 1.0)),
                    "role": meta.get("studio.role", "subject"), "steps": meta.get("studio.steps", ""), "sha256": info["sha256"],
                    "source": meta.get("studio.source", ""),
                })
            except LoraFormatError as exc:
                card["error"] = str(exc)
            card.update({k: v for k, v in self.read_sidecar(name).items() if k in ("description", "notes")})
            card["mtime"] = f.stat().st_mtime
            out.append(card)
        return out

    def resolve_lora(self, ref: str) -> Path:
        """A library name or a path to a .safetensors file."""
        if NAME_RE.match(ref) and self.lora_path(ref).is_file():
            return self.lora_path(ref)
        p = Path(ref).expanduser()
        if p.is_file():
            return p
        if NAME_RE.match(ref):
            raise LoraFormatError(f"No LoRA named {ref!r} in the library ({self.loras}).")
        raise LoraFormatError(f"LoRA file not found: {ref}")

    def rename_lora(self, old: str, new: str) -> None:
        self.check_name(old)
        self.check_name(new)
        if not self.lora_path(old).is_file():
            raise InputError(f"No LoRA named {old!r}.")
        if self.lora_path(new).exists():
            raise InputError(f"A LoRA named {new!r} already exists.")
        for suffix in (".safetensors", ".json", ".preview.png"):
            src = self.loras / f"{old}{suffix}"
            if src.exists():
                os.replace(src, self.loras / f"{new}{suffix}")

    def delete_lora(self, name: str) -> None:
        self.check_name(name)
        if not self.lora_path(name).is_file():
            raise InputError(f"No LoRA named {name!r}.")
        trash = self.root / "trash" / f"{name}-{int(time.time())}"
        trash.mkdir(parents=True, exist_ok=True)
        for suffix in (".safetensors", ".json", ".preview.png"):
            src = self.loras / f"{name}{suffix}"
            if src.exists():
                os.replace(src, trash / src.name)

    def import_lora(self, src: Path, name: str | None = None, arch: str | None = None) -> str:
        """Validate a LoRA file (format, architecture, LoRA keys) and copy it into the library."""
        src = Path(src)
        info = lora_io.inspect(src)
        if arch and info["architecture"] and info["architecture"] != arch:
            raise LoraFormatError(f"{src.name} is a {info['architecture']} LoRA; the loaded base model is {arch}.")
        name = self.check_name(name or _safe_name(src.stem))
        dst = self.lora_path(name)
        if dst.exists():
            raise InputError(f"A LoRA named {name!r} already exists: pick another name.")
        tmp = self.loras / f".{name}.import.tmp"
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        self.write_sidecar(name, {"imported_from": src.name, "format": info["format"], "architecture": info["architecture"]})
        return name


def _safe_name(stem: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.") or "lora"
    if not s[0].isalnum():
        s = "l" + s
    return s[:64]
