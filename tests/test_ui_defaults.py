"""The Generate tab's defaults come from the config dataclasses: 50 steps / CFG 7.5 for the regional engines
(CompositionSpec), GenerateConfig's (or the model folder's) for a plain generation, B-LoRA style weight 1.21."""

from studio.composition import CompositionSpec
from studio.config import GenerateConfig


def _components(demo) -> dict:
    return {getattr(b, "elem_id", None): b for b in demo.blocks.values() if getattr(b, "elem_id", None)}


def test_generate_tab_defaults_follow_the_configs(tmp_path):
    from pipelines.blora import DEFAULT_STYLE_WEIGHT
    from studio.ui import build_demo
    from studio.ui.actions import Services, engine_defaults
    from studio.ui.generate_tab import engine_settings

    per = engine_defaults("tiny-sd")
    assert per["composer"] == per["clora"] == {"steps": CompositionSpec.__dataclass_fields__["steps"].default,
                                               "guidance": CompositionSpec.__dataclass_fields__["guidance"].default}
    assert per["composer"] == {"steps": 50, "guidance": 7.5}
    assert per["merge"] == {"steps": GenerateConfig.__dataclass_fields__["steps"].default,
                            "guidance": GenerateConfig.__dataclass_fields__["guidance"].default}
    assert engine_defaults("toy-xl")["composer"] == {"steps": 50, "guidance": 7.5}  # a model's hints do not cut the papers'

    # picking the composer moves untouched settings to the papers'; back to merge restores; edited values are kept
    assert engine_settings(per, "composer", per["merge"]["steps"], per["merge"]["guidance"]) == (50, 7.5)
    assert engine_settings(per, "merge", 50, 7.5) == (per["merge"]["steps"], per["merge"]["guidance"])
    assert engine_settings(per, "clora", 33, 6.0) is None

    services = Services.create(tmp_path / "ws", "tiny-sd")
    try:
        comps = _components(build_demo(services))
    finally:
        services.worker.close()
    assert comps["gen-steps"].value == per["merge"]["steps"] and comps["gen-guidance"].value == per["merge"]["guidance"]
    assert comps["gen-blora-style-weight"].value == DEFAULT_STYLE_WEIGHT == 1.21
    assert comps["gen-blora-content-weight"].value == 1.0
    from studio.composition import ComposerOptions

    assert comps["gen-all-layers"].value is ComposerOptions.__dataclass_fields__["region_all_layers"].default is False
