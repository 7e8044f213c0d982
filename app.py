"""Launch the Customization Studio: `python app.py [--model REF] [--workspace DIR] [--port N] [--auth-file F]`.

The launcher lives in ``studio/serve.py`` (so ``studio serve`` works from an installed package too).
"""

from __future__ import annotations

import sys

from studio.serve import default_model, main  # noqa: F401 - default_model kept for callers of app.default_model

if __name__ == "__main__":
    sys.exit(main())
