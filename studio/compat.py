"""Start-up check of the installed library versions.

The studio is tested with the exact versions in ``scripts/lock-cpu.txt`` (``make install`` installs them). Outside the
lock, a combination of torch / diffusers / transformers / peft / accelerate / gradio can fail deep inside a job after
minutes of work (transformers 5.24 refuses peft 0.21 the moment a LoRA touches a text encoder). ``check_versions``
turns that into one clear :class:`~studio.errors.StudioError` at start-up that names the installed versions and the
command that fixes it.

Two kinds of rules:

* ``KNOWN_BREAKS``: pairs known to fail, with the reason (an error).
* the project's own ranges (``pyproject.toml``, read from the installed package metadata): below a minimum is an
  error; above a maximum is untested, so only a warning.

``STUDIO_SKIP_VERSION_CHECK=1`` turns the check off (for people testing newer libraries on purpose).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from .errors import StudioError

log = logging.getLogger(__name__)

PROJECT = "customization-studio"
CHECKED = ("torch", "diffusers", "transformers", "peft", "accelerate", "gradio", "safetensors")
FIX = "make install  (or: pip install -c scripts/lock-cpu.txt -e .  from the studio's checkout)"


@dataclass(frozen=True)
class Break:
    """``package`` in ``versions`` fails together with ``other`` in ``other_versions``."""

    package: str
    versions: str
    other: str
    other_versions: str
    reason: str
    fix: str


KNOWN_BREAKS: tuple[Break, ...] = (
    Break("transformers", ">=5.24", "peft", "<0.22",
          "transformers 5.24 refuses peft older than 0.22 as soon as a LoRA touches a text encoder "
          "(ValueError in transformers/integrations/peft.py: check_peft_version)",
          "pip install 'transformers>=5,<5.24'  (or 'peft>=0.22' once it is released)"),
)

# The tested ranges, for a run from a checkout that was never pip-installed (no package metadata).
FALLBACK_RANGES = {
    "torch": ">=2.4", "diffusers": ">=0.42,<0.43", "transformers": ">=5,<5.24", "peft": ">=0.21",
    "accelerate": ">=1.10", "gradio": ">=6.17,<7", "safetensors": ">=0.4",
}


def installed_versions() -> dict[str, str | None]:
    """Installed version of each checked package (None when it is not installed)."""
    out: dict[str, str | None] = {}
    for name in CHECKED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


@lru_cache(maxsize=1)
def project_ranges() -> dict[str, str]:
    """The dependency ranges of ``pyproject.toml`` for the checked packages (from the installed metadata)."""
    try:
        reqs = metadata.requires(PROJECT) or []
    except metadata.PackageNotFoundError:
        return dict(FALLBACK_RANGES)
    ranges = {}
    for line in reqs:
        req = Requirement(line)
        if req.marker is not None and "extra" in str(req.marker):
            continue
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name in CHECKED:
            ranges[name] = str(req.specifier)
    return ranges or dict(FALLBACK_RANGES)


def _public(v: str) -> Version | None:
    try:
        return Version(Version(v).public)  # 2.13.0+cpu -> 2.13.0
    except InvalidVersion:
        return None


def _min_of(spec: SpecifierSet) -> str | None:
    return next((s.version for s in spec if s.operator in (">=", ">", "==", "~=")), None)


def problems(versions: dict[str, str | None] | None = None,
             ranges: dict[str, str] | None = None) -> tuple[list[str], list[str]]:
    """``(errors, warnings)`` for the given installed versions (default: the real ones)."""
    versions = installed_versions() if versions is None else versions
    ranges = project_ranges() if ranges is None else ranges
    errors, warnings = [], []
    for name, spec_text in ranges.items():
        v = versions.get(name)
        if v is None:
            errors.append(f"{name} is not installed (the studio needs {name}{spec_text}).")
            continue
        pv, spec = _public(v), SpecifierSet(spec_text)
        if pv is None or spec.contains(pv, prereleases=True):
            continue
        low = _min_of(spec)
        if low is not None and pv < Version(low):
            errors.append(f"{name} {v} is older than the studio supports ({name}{spec_text}).")
        else:
            warnings.append(f"{name} {v} is newer than the studio was tested with ({name}{spec_text}).")
    for b in KNOWN_BREAKS:
        v, o = versions.get(b.package), versions.get(b.other)
        if v and o and _public(v) in SpecifierSet(b.versions) and _public(o) in SpecifierSet(b.other_versions):
            errors.append(f"{b.package} {v} with {b.other} {o} does not work: {b.reason}. Fix: {b.fix}")
    return errors, warnings


def describe(versions: dict[str, str | None]) -> str:
    return ", ".join(f"{k} {v or 'missing'}" for k, v in versions.items())


_checked = False


def check_versions(versions: dict[str, str | None] | None = None, force: bool = False) -> None:
    """Raise a StudioError for a library combination that fails; log a warning for an untested one.

    Runs once per process (cheap: reads package metadata, imports nothing); ``force`` runs it again.
    """
    global _checked
    if (_checked and not force) or os.environ.get("STUDIO_SKIP_VERSION_CHECK") == "1":
        return
    real = versions is None
    versions = installed_versions() if real else versions
    errors, warnings = problems(versions)
    for w in warnings:
        log.warning("%s Tested versions: scripts/lock-cpu.txt.", w)
    if errors:
        raise StudioError(
            "The installed libraries do not work together:\n  - " + "\n  - ".join(errors)
            + f"\nInstalled: {describe(versions)}.\nInstall the tested versions with: {FIX}"
            + "\n(STUDIO_SKIP_VERSION_CHECK=1 skips this check.)")
    if real:
        _checked = True
