"""Launch the Customization Studio web UI (``studio serve`` and ``python app.py``; importable from an installed
package, so it works outside the checkout).

Binds 127.0.0.1 only (no share link), analytics off, no remote fonts: it works fully offline. The password for
``--auth`` can come from ``--auth-file`` or ``$STUDIO_AUTH`` so it is not visible in ``ps``. API and UI callers can
only name files they upload or library entries; ``--allow-folder DIR`` (repeatable) lets them name files in DIR too.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def default_model() -> str:
    from studio.models import bundled_models

    return "toy-xl" if "toy-xl" in bundled_models() else "tiny-sdxl"


def read_auth(args, parser: argparse.ArgumentParser) -> tuple[str, str] | None:
    """user:password from --auth, --auth-file (first line) or $STUDIO_AUTH, in that order."""
    raw = args.auth
    if not raw and args.auth_file:
        try:
            raw = Path(args.auth_file).expanduser().read_text().splitlines()[0].strip()
        except (OSError, IndexError) as exc:
            parser.error(f"--auth-file {args.auth_file}: {exc}")
    raw = raw or os.environ.get("STUDIO_AUTH") or None
    if raw is None:
        return None
    user, sep, password = raw.partition(":")
    if not sep or not user or not password:
        parser.error("auth must be user:password")
    return user, password


def add_serve_args(p: argparse.ArgumentParser, workspace: bool = True) -> None:
    p.add_argument("--model", default=None, help="Base model: bundled name, hub id, diffusers folder or .safetensors file.")
    if workspace:
        p.add_argument("--workspace", default=os.environ.get("STUDIO_WORKSPACE", "workspace"), help="Where datasets, LoRAs and outputs live.")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--auth", default=None, help="user:password to require a login (visible in ps: prefer --auth-file or $STUDIO_AUTH).")
    p.add_argument("--auth-file", dest="auth_file", default=None, help="File whose first line is user:password.")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available).")
    p.add_argument("--allow-folder", dest="allow_folder", action="append", default=[],
                   help="A server folder whose files API/UI callers may name (LoRAs, masks); repeat for several.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Customization Studio web UI")
    add_serve_args(p)
    args = p.parse_args(argv)
    return serve(args, p)


def serve(args, parser: argparse.ArgumentParser) -> int:
    from studio.compat import check_versions
    from studio.errors import StudioError

    try:
        check_versions()  # a library combination known to fail stops here, not inside a job
    except StudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from studio.ui import build_demo, launch
    from studio.ui.actions import Services

    auth = read_auth(args, parser)
    services = Services.create(args.workspace or "workspace", args.model or default_model(), device=args.device,
                               allowed=args.allow_folder)
    demo = build_demo(services)
    print(f"Customization Studio on http://127.0.0.1:{args.port}  (model: {services.model}, workspace: {services.ws.root})",
          flush=True)
    launch(demo, port=args.port, auth=auth, workspace=services.ws.root)
    return 0
