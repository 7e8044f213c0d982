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
import uuid
from pathlib import Path

from . import lora_io
from .errors import InputError, LoraFormatError
from .safety import Reservations, check_lora_file, disk_errors

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")  # \Z: "$" would accept a trailing newline


class Workspace:
    """``confined``: paths given as references (LoRAs, datasets, masks) must lie inside the workspace or one of the
    ``allowed`` folders (the server sets this; the CLI, run by the machine's own user, reads any path)."""

    def __init__(self, root: str | os.PathLike | None = None, *, confined: bool = False, allowed=()):
        self.root = Path(root or os.environ.get("STUDIO_WORKSPACE", "workspace")).expanduser().resolve()
        self.confined = confined
        self.allowed = [Path(a).expanduser().resolve() for a in allowed]
        self.reservations = Reservations()
        with disk_errors(f"the workspace {self.root}"):
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

    def check_path(self, p: str | os.PathLike, what: str = "file") -> Path:
        """``p`` resolved; when confined it must lie in the workspace or an allowed folder (never probed otherwise)."""
        p = Path(p).expanduser()
        if not self.confined:
            return p
        r = p.resolve()
        if any(r == f or f in r.parents for f in [self.root, *self.allowed]):
            return r
        raise InputError(f"The {what} {str(p)!r} is outside the workspace: upload it or use a library name "
                         "(the operator can allow more folders with --allow-folder).")

    def to_trash(self, paths: list[Path], label: str) -> Path | None:
        """Move existing ``paths`` into a fresh ``trash/<label>-<time>-<id>/`` folder; returns it (None: nothing moved)."""
        paths = [p for p in paths if p.exists()]
        if not paths:
            return None
        trash = self.root / "trash" / f"{label}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        with disk_errors("the trash folder"):
            trash.mkdir(parents=True)
            for src in paths:
                shutil.move(src, trash / src.name)  # a rename on the same disk
        return trash

    def lora_files(self, name: str) -> list[Path]:
        return [self.loras / f"{self.check_name(name)}{suffix}" for suffix in (".safetensors", ".json", ".preview.png")]

    def trash_lora(self, name: str) -> Path | None:
        """Move a library entry (file, sidecar, preview) to the trash before it is replaced."""
        return self.to_trash(self.lora_files(name), name)

    # ------------------------------------------------------------------------------------------------ datasets
    def resolve_dataset(self, ref: str | os.PathLike) -> Path:
        """A dataset name in the workspace, or a folder path given on the command line."""
        ref = str(ref or "")
        if not ref:
            raise InputError("No images given: choose a folder (or upload images in the studio).")
        if NAME_RE.match(ref) and (self.datasets / ref).is_dir():
            return self.datasets / ref
        p = self.check_path(ref, "image folder")
        if p.is_dir():
            return p
        raise InputError(f"Image folder not found: {ref}")

    def new_dataset(self, name: str) -> Path:
        """An empty ``datasets/<name>``; an earlier dataset of that name goes to the trash (never deleted)."""
        self.check_name(name)
        path = self.datasets / name
        self.to_trash([path], f"dataset-{name}")
        with disk_errors("the dataset"):
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
        """A library name or a path to a .safetensors file (inside the workspace or an allowed folder when confined)."""
        if not isinstance(ref, str) or not ref.strip():
            raise LoraFormatError(f"A LoRA must be given by its library name (got {ref!r}).")
        if NAME_RE.match(ref) and self.lora_path(ref).is_file():
            return self.lora_path(ref)
        if NAME_RE.match(ref) and self.confined:
            raise LoraFormatError(f"No LoRA named {ref!r} in the library.")
        p = self.check_path(ref, "LoRA file")
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
        self.trash_lora(name)

    def import_lora(self, src: Path, name: str | None = None, arch: str | None = None, overwrite: bool = False) -> str:
        """Validate a LoRA file (format, architecture, LoRA keys, finite values) and copy it into the library.
        ``overwrite``: an existing entry of that name goes to the trash first."""
        src = Path(src)
        info = lora_io.inspect(src)
        if arch and info["architecture"] and info["architecture"] != arch:
            raise LoraFormatError(f"{src.name} is a {info['architecture']} LoRA; the loaded base model is {arch}.")
        check_lora_file(src)
        name = self.check_name(name or _safe_name(src.stem))
        dst = self.lora_path(name)
        if dst.exists() and not overwrite:
            raise InputError(f"A LoRA named {name!r} already exists: pick another name (or overwrite it).")
        tmp = self.loras / f".{name}.import.tmp"
        try:
            with disk_errors(f"the LoRA {name!r}"):
                shutil.copyfile(src, tmp)
                if dst.exists():
                    self.trash_lora(name)
                os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
        self.write_sidecar(name, {"imported_from": src.name, "format": info["format"], "architecture": info["architecture"]})
        return name


def _safe_name(stem: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.") or "lora"
    if not s[0].isalnum():
        s = "l" + s
    return s[:64]
