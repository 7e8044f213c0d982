import argparse

import pytest

from studio.cli import build_parser
from studio.config import GenerateConfig, TrainConfig, config_from_args
from studio.errors import InputError


@pytest.mark.parametrize("kwargs, needle", [
    ({"rank": 0}, "rank"),
    ({"steps": -5}, "steps"),
    ({"steps": 0}, "steps"),
    ({"lr": 0}, "learning rate"),
    ({"resolution": 30}, "resolution"),
    ({"trigger": "  "}, "trigger"),
    ({"mixed_precision": "fp8"}, "mixed_precision"),
])
def test_bad_train_config(kwargs, needle):
    with pytest.raises(InputError, match=needle):
        TrainConfig(name="x", **kwargs)


@pytest.mark.parametrize("kwargs, needle", [
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt": "   "}, "prompt is empty"),
    ({"prompt": "a", "width": 13}, "width"),
    ({"prompt": "a", "height": 100000}, "height"),
    ({"prompt": "a", "seed": 2**32}, "seed"),
    ({"prompt": "a", "steps": -1}, "steps"),
])
def test_bad_generate_config(kwargs, needle):
    with pytest.raises(InputError, match=needle):
        GenerateConfig(**kwargs)


def test_cli_flags_come_from_config():
    args = build_parser(["train"]).parse_args(["train", "--name", "dog", "--images", "x", "--rank", "8", "--no-center-crop",
                                               "--prior-preservation", "--class-word", "dog",
                                               "--trigger", "zwx"])
    cfg = config_from_args(TrainConfig, args)
    assert (cfg.rank, cfg.center_crop, cfg.prior_preservation, cfg.prompt()) == (8, False, True, "a photo of zwx dog")
    help_text = build_parser(["train"])._subparsers._group_actions[0].choices["train"].format_help()
    assert "min-SNR" in help_text and "--snr-gamma" in help_text


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from ((f"{name} {n}", s) for n, s in _subparsers(sub))


@pytest.mark.parametrize("method", ["dreambooth", "blora", "orthogonal"])
def test_every_help_page_renders(method):
    """`studio <command> --help` of every command and sub-command formats (a bare '%' in a help text broke it)."""
    parser = build_parser(["train", "--method", method])
    pages = dict(_subparsers(parser))
    assert {"train", "generate", "compose", "lora convert", "decor analyze"} <= set(pages)
    for name, sub in pages.items():
        assert sub.format_help(), name
    assert "(90% of the removed text" in " ".join(pages["generate"].format_help().split())


def test_cli_reports_errors_without_traceback(capsys, tmp_path):
    from studio.cli import main

    code = main(["--workspace", str(tmp_path), "train", "--name", "x", "--images", str(tmp_path / "missing"), "--steps", "2"])
    assert code == 2
    assert "Image folder not found" in capsys.readouterr().err
