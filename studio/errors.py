"""User-facing errors. Every message is written for the person at the keyboard: what went wrong and what to do."""


class StudioError(Exception):
    """An error the user can act on. ``str(err)`` is the message shown in the CLI and the UI."""


class InputError(StudioError):
    """Bad user input: an image, a prompt, a size, a config value."""


class ModelError(StudioError):
    """A base model that cannot be found or loaded, or is of an unsupported architecture."""


class LoraFormatError(StudioError):
    """A file that is not a LoRA we can load, or a LoRA for another base architecture."""


class TrainingError(StudioError):
    """A training run that cannot go on (NaN loss, out of memory, …). Saved checkpoints are kept."""


class CancelledError(StudioError):
    """A job that was stopped by the user."""
