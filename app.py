"""Launch the Customization Studio: `python app.py [--model REF] [--workspace DIR] [--port N] [--auth user:pass]`.

Binds 127.0.0.1 only (no share link), analytics off, no remote fonts: it works fully offline.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def default_model() -> str:
    from studio.models import bundled_models

    return "toy-xl" if "toy-xl" in bundled_models() else "tiny-sdxl"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Customization Studio web UI")
    p.add_argument("--model", default=None, help="Base model: bundled name, hub id, diffusers folder or .safetensors file.")
    p.add_argument("--workspace", default=os.environ.get("STUDIO_WORKSPACE", "workspace"), help="Where datasets, LoRAs and outputs live.")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--auth", default=None, help="user:password to require a login.")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available).")
    args = p.parse_args(argv)

    from studio.compat import check_versions
    from studio.errors import StudioError

    try:
        check_versions()
    except StudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from studio.ui import build_demo, launch
    from studio.ui.actions import Services

    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    if args.auth and len(auth) != 2:
        p.error("--auth must be user:password")
    services = Services.create(args.workspace, args.model or default_model(), device=args.device)
    demo = build_demo(services)
    print(f"Customization Studio on http://127.0.0.1:{args.port}  (model: {services.model}, workspace: {services.ws.root})")
    launch(demo, port=args.port, auth=auth, workspace=services.ws.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
