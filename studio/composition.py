"""Composition specs: which LoRAs go where, with which engine (merge, LoRA-Composer, CLoRA).

A ``CompositionSpec`` is the one declarative description of a multi-LoRA image shared by the CLI (YAML/JSON file
or flags), the UI (compose tab) and the saved PNG metadata. Static checks run in ``__post_init__`` (shape of
boxes, overlaps, empty prompts, engine needs); ``resolve(spec, pipe, ws)`` does the checks that need the model and
the disk (LoRA files exist and fit the base architecture, mask images have the image size, concept words are in
their prompts) and returns the region masks as tensors.

Weights are linear (a weight w scales the LoRA's ΔW by w), as everywhere in the studio.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import SEED_MAX, _f
from .errors import InputError, LoraFormatError
from .safety import check_lora_file, check_number, check_weight

ENGINES = ("merge", "composer", "clora")
SCHEDULERS = ("auto", "ddim", "dpmsolver++", "euler", "model")
Box = tuple[float, float, float, float]


@dataclass(kw_only=True)
class ConceptEntry:
    """One concept LoRA bound to its own prompt and (optionally) a region of the image."""

    lora: str = _f("", "LoRA library name or path to a .safetensors file.")
    weight: float = _f(1.0, "Linear weight of the LoRA (scales its delta W).")
    prompt: str = _f("", "The concept's own prompt (composer: the region prompt; clora: this LoRA's pass). Empty: built "
                         "from the LoRA's trigger and class word as the papers do (see concept_prompt).")
    token: str = _f("", "The concept's trigger word(s) in its prompt (attention maps are read at these tokens). "
                        "Empty: the LoRA's trigger.")
    class_word: str = _f("", "What the concept is, e.g. 'dog' (CLoRA: the word of the base prompt that names it). "
                             "Empty: the class word stored in the LoRA.")
    region: Any = _f(None, "Box [x0, y0, x1, y1] as fractions of width/height (0..1), a mask image path, or None.")
    negative_prompt: str = _f("", "Negative prompt for this region (composer; empty: the spec's negative prompt).", advanced=True)

    def __post_init__(self) -> None:
        if not str(self.lora).strip():
            raise InputError("A concept has no LoRA: pick one from the library or give a .safetensors path.")
        try:
            self.weight = float(self.weight)
        except (TypeError, ValueError):
            raise InputError(f"Weight of {self.lora} must be a number (got {self.weight!r}).") from None
        if not -4.0 <= self.weight <= 4.0:
            raise InputError(f"Weight of {self.lora} must be between -4 and 4 (got {self.weight}).")
        self.region = parse_region(self.region, self.lora)
        self.token, self.class_word = (self.token or "").strip(), (self.class_word or "").strip()

    @property
    def box(self) -> Box | None:
        return self.region if isinstance(self.region, tuple) else None

    @property
    def mask_path(self) -> str | None:
        return self.region if isinstance(self.region, str) else None


@dataclass(kw_only=True)
class GlobalLora:
    """A LoRA applied everywhere (e.g. a style), in every pass of every engine."""

    lora: str = _f("", "LoRA library name or path.")
    weight: float = _f(1.0, "Linear weight.")

    def __post_init__(self) -> None:
        if not str(self.lora).strip():
            raise InputError("A global LoRA entry has no LoRA.")
        self.weight = check_weight(self.weight, f"weight of global LoRA {self.lora}")


@dataclass(kw_only=True)
class ComposerOptions:
    """LoRA-Composer switches (each part can be turned off for ablations) and hyper-parameters (paper/code values)."""

    region_cross_attn: bool = _f(True, "Region-aware LoRA injection in cross-attention (off: the concept LoRAs are merged globally).")
    region_all_layers: bool = _f(False, "Also apply each concept LoRA's other UNet layers (self-attention, feed-forward, "
                                 "projections, cross-attention query) inside its region; the paper keeps only the "
                                 "cross-attention keys, values and output, which loses LoRAs that hold their subject elsewhere.")
    self_attn_isolation: bool = _f(True, "Concept isolation: self-attention between different concept boxes is masked out.")
    latent_reinit: bool = _f(True, "Latent re-initialisation: move the noise that already attends to each concept into its box.")
    loss_guidance: bool = _f(True, "Loss-guided latent updates (concept enhancement + fill + region perceptual losses).")
    guidance_until: float = _f(0.5, "Latent updates stop for good after this fraction of the steps (paper: 25 of 50).", advanced=True)
    min_guidance_steps: float = _f(0.1, "Fraction of steps before the loss-rise stopping rule may end updates (paper: 5 of 50).", advanced=True)
    step_size: float = _f(20.0, "Base step size φ (φ_i = step_size·√s_i, s_i linear from 1 to 0.5).", advanced=True)
    w_ce: float = _f(8.0, "Weight of the concept-enhancement loss per concept token (code: 8).", advanced=True)
    w_fill: float = _f(2.0, "Weight of the fill loss per axis (code: 2).", advanced=True)
    w_region: float = _f(10.0, "Weight of the region perceptual-restriction loss (code: 10).", advanced=True)
    top_k_ratio: float = _f(0.2, "Top-k share of the box area averaged by the losses (code: 0.2).", advanced=True)
    smooth_sigma: float = _f(0.5, "Gaussian smoothing (3x3) sigma of the concept maps.", advanced=True)
    maps_only_forward: bool = _f(True, "Loss steps stop the UNet after its last map layer (same gradient, less work; off: the whole UNet as the official code).", advanced=True)
    cuda_graph: bool = _f(True, "On a GPU, replay the main denoising pass as one CUDA graph after its first step (same "
                          "result, less host time; falls back to eager if capture fails). No effect on the CPU.", advanced=True)


@dataclass(kw_only=True)
class CloraOptions:
    """CLoRA hyper-parameters; the defaults are the official code's schedule (see pipelines/clora.py)."""

    contrastive: bool = _f(True, "Contrastive (InfoNCE) latent optimisation on the attention maps in the early steps.")
    contrastive_until: float = _f(0.5, "Fraction of steps with a latent update (official: the first half, 25 of 50).", advanced=True)
    step_size: float = _f(20.0, "Latent step size η (paper: 20).", advanced=True)
    temperature: float = _f(0.5, "InfoNCE temperature τ (paper: 0.5).", advanced=True)
    inner_at: list = _f([0.0, 0.2, 0.4], "Step fractions with extra inner iterations (paper: steps 0, 10, 20 of 50).", advanced=True)
    inner_iterations: int = _f(20, "Extra inner iterations at those steps (official: 20; each is a forward+backward of all passes).", advanced=True)
    threshold: float = _f(0.3, "Mask threshold α: a pixel belongs to a LoRA where its attention > α·max (paper: 0.3; notebook 0.4).")
    morphology: str = _f("none", "3x3 clean-up of the attention masks.", choices=["none", "open", "close", "dilate", "erode"], advanced=True)
    mask_from: float = _f(0.0, "Fuse with masks from this step fraction on (before: plain base pass; paper: 0).", advanced=True)


@dataclass(kw_only=True)
class CompositionSpec:
    """Several LoRAs in one image: a base prompt, concept LoRAs (each with its prompt and region), global LoRAs."""

    prompt: str = _f("", "Base prompt describing the whole image, e.g. 'a dog and a cat on a sofa'.")
    negative_prompt: str = _f("", "What to avoid.")
    concepts: list = _f([], "Concept LoRAs (ConceptEntry).", ui=False)
    global_loras: list = _f([], "LoRAs applied everywhere (e.g. a style).", ui=False)
    engine: str = _f("merge", "merge: weighted sum (fast); composer: LoRA-Composer (needs boxes); clora: CLoRA (masks from attention).",
                     choices=list(ENGINES))
    seed: int = _f(-1, f"Seed 0..{SEED_MAX}; -1 picks a random one.")
    steps: int = _f(50, "Denoising steps (LoRA-Composer and CLoRA: 50).")
    guidance: float = _f(7.5, "Classifier-free guidance scale (LoRA-Composer: 7.5).")
    scheduler: str = _f("auto", "Sampler of the run. auto: the papers' (composer: DPM-Solver++, clora: DDIM, merge: the model's); "
                                "the regional engines need one whose step uses the latent it is given (not PNDM).",
                        choices=list(SCHEDULERS), advanced=True)
    width: int = _f(0, "Width in pixels (0: model default).")
    height: int = _f(0, "Height in pixels (0: model default).")
    allow_overlap: bool = _f(False, "Allow overlapping concept boxes (overlaps are averaged).", advanced=True)
    decor_remove: str = _f("", "DECOR: text whose meaning is projected out of every pass's prompt embeddings (empty: off).")
    decor_strength: float = _f(1.0, "DECOR strength alpha in [0, 1].")
    decor_components: str = _f("1", "DECOR: number of components k, or 'auto' (90% of the removed text's energy).")
    model: str = _f("", "Base model (CLI only; the UI uses the loaded one).", ui=False)
    composer: ComposerOptions = field(default_factory=ComposerOptions, metadata={"help": "LoRA-Composer options."})
    clora: CloraOptions = field(default_factory=CloraOptions, metadata={"help": "CLoRA options."})

    def __post_init__(self) -> None:
        self.concepts = [c if isinstance(c, ConceptEntry) else _build(ConceptEntry, c, "concept") for c in self.concepts or []]
        self.global_loras = [g if isinstance(g, GlobalLora) else _build(GlobalLora, g, "global LoRA") for g in self.global_loras or []]
        if isinstance(self.composer, dict):
            self.composer = _build(ComposerOptions, self.composer, "composer options")
        if isinstance(self.clora, dict):
            self.clora = _build(CloraOptions, self.clora, "clora options")
        self.decor()  # validates the DECOR settings up front
        if not self.prompt.strip():
            raise InputError("The base prompt is empty: describe the whole image (e.g. 'a dog and a cat on a sofa').")
        if self.engine not in ENGINES:
            raise InputError(f"Unknown engine {self.engine!r}: choose one of {', '.join(ENGINES)}.")
        if not self.concepts:
            raise InputError("The composition has no concepts: add at least one concept LoRA.")
        if self.seed != -1 and not 0 <= int(self.seed) <= SEED_MAX:
            raise InputError(f"seed must be -1 (random) or between 0 and {SEED_MAX}.")
        if not 1 <= int(self.steps) <= 500:
            raise InputError(f"steps must be between 1 and 500 (got {self.steps}).")
        check_number(self.guidance, "guidance", 0, 50)
        for key in ("width", "height"):
            v = int(getattr(self, key))
            if v and (v < 16 or v > 4096 or v % 8):
                raise InputError(f"{key} must be a multiple of 8 between 16 and 4096 (got {v}).")
        if self.scheduler not in SCHEDULERS:
            raise InputError(f"Unknown scheduler {self.scheduler!r}: choose one of {', '.join(SCHEDULERS)}.")
        if self.engine in ("composer", "clora"):
            check_distinct_triggers(self.concepts)
        if self.engine == "composer":
            missing = [f"{i} ({c.lora})" for i, c in enumerate(self.concepts, 1) if c.region is None]
            if missing and self.composer.region_cross_attn:
                raise InputError(f"The composer engine needs a region (box or mask) for every concept; missing for concept {', '.join(missing)}.")
        if self.clora.morphology not in ("none", "open", "close", "dilate", "erode"):
            raise InputError(f"Unknown mask clean-up {self.clora.morphology!r}.")
        if not 0 < self.clora.threshold < 1:
            raise InputError("The CLoRA mask threshold must be between 0 and 1.")
        if not self.allow_overlap:
            boxes = [(i, c.box) for i, c in enumerate(self.concepts, 1) if c.box is not None]
            for a in range(len(boxes)):
                for b in range(a + 1, len(boxes)):
                    (i, p), (j, q) = boxes[a], boxes[b]
                    if min(p[2], q[2]) > max(p[0], q[0]) and min(p[3], q[3]) > max(p[1], q[1]):
                        raise InputError(f"The boxes of concept {i} and concept {j} overlap: move them apart, "
                                         "or allow overlaps (they are then averaged).")

    def decor(self):
        """The DecorSpec of this composition, or None when DECOR is off. It protects the concepts' trigger words
        (``DecorSpec.keep``), whose rows steer the regional engines (generation protects nothing by default)."""
        if not (self.decor_remove or "").strip():
            return None
        from .decor import DecorSpec

        keep = " ".join(c.token for c in self.concepts if getattr(c, "token", ""))
        return DecorSpec(remove=self.decor_remove, strength=self.decor_strength, components=self.decor_components,
                         keep=keep)

    @property
    def regional(self) -> bool:
        return any(c.region is not None for c in self.concepts)

    def to_dict(self) -> dict:
        d = asdict(self)
        for c in d["concepts"]:
            if isinstance(c["region"], tuple):
                c["region"] = list(c["region"])
        return d


def check_distinct_triggers(concepts) -> None:
    """Two concepts named by the same trigger cannot be told apart by the losses (CLoRA's groups, LoRA-Composer's maps)."""
    seen: dict[str, int] = {}
    for i, c in enumerate(concepts, 1):
        key = " ".join(c.token.lower().split())
        if not key:
            continue
        if key in seen:
            raise InputError(f"Concepts {seen[key]} and {i} share the trigger {c.token!r}: the engine cannot tell them apart. "
                             "Give each concept LoRA its own trigger (retrain one, or set the concept's token).")
        seen[key] = i


def lora_words(path: Path) -> tuple[str, str]:
    """(trigger, class word) stored in a LoRA file's metadata ('' when unknown; the first of a merged file's triggers)."""
    from . import lora_io

    try:
        _, meta = lora_io.read_header(Path(path))
    except Exception:  # noqa: BLE001 - unreadable files are reported by check_compatible
        return "", ""
    trigger = (meta.get("modelspec.trigger_phrase", "") or "").split(",")[0].strip()
    cls = meta.get("studio.class_word", "")
    if not cls and meta.get("studio.config"):
        try:
            cls = json.loads(meta["studio.config"]).get("class_word", "") or ""
        except (ValueError, AttributeError):
            cls = ""
    return trigger, cls.strip()


def _find_word(prompt: str, word: str) -> re.Match | None:
    return re.search(rf"(?<![\w<]){re.escape(word)}(?![\w>])", prompt, flags=re.IGNORECASE) if word else None


def concept_prompt(engine: str, base_prompt: str, trigger: str, class_word: str, label: str = "concept") -> str:
    """A concept's prompt as the papers build it from its trigger and class word.

    * CLoRA (official notebook): the whole base sentence with the trigger inserted before the concept's class word,
      "A cat and a dog" -> "A cat and a sks dog"; a base prompt that already holds the trigger is used as is.
    * LoRA-Composer: a region prompt naming the concept, "a photo of sks dog"."""
    if not trigger:
        raise InputError(f"{label} has no trigger: the LoRA stores none, so give the concept's token (its trigger word).")
    if engine != "clora":
        return " ".join(f"a photo of {trigger} {class_word}".split())
    if _find_word(base_prompt, trigger):
        return base_prompt
    m = _find_word(base_prompt, class_word)
    if m is None:
        what = f"its class word {class_word!r}" if class_word else "its class word (set the concept's class_word)"
        raise InputError(f"CLoRA puts the trigger {trigger!r} of {label} before {what} in the base prompt, and the base "
                         f"prompt {base_prompt!r} does not name it: describe every concept in the base prompt, "
                         "e.g. 'a dog and a cat'.")
    return f"{base_prompt[:m.start()]}{trigger} {base_prompt[m.start():]}"


def fill_concepts(spec: "CompositionSpec", concept_paths: list[Path]) -> None:
    """Give every concept its token (default: the LoRA's trigger, never a word of the prompt), class word and prompt
    (default: ``concept_prompt``). The one place where UI, CLI and API concepts get their words."""
    if spec.engine == "merge":
        return
    for i, (c, path) in enumerate(zip(spec.concepts, concept_paths), 1):
        trigger, cls = lora_words(path)
        label = f"concept {i} ({c.lora})"
        c.token = c.token or trigger
        c.class_word = c.class_word or cls
        if not c.token:
            raise InputError(f"{label} has no token and its LoRA stores no trigger: give the word that names it in its prompt.")
        if not c.prompt.strip():
            c.prompt = concept_prompt(spec.engine, spec.prompt, c.token, c.class_word, label)
    check_distinct_triggers(spec.concepts)


def clora_groups(tokenizer, prompts: list[str], concepts) -> list[list[list[int]]]:
    """CLoRA's token groups ``[concept][pass] -> positions`` as in the official code: in its own pass (pass c + 1) a
    concept is its trigger and class word; in every other pass (the base pass included) its class word (or its
    trigger, where it has no class word)."""
    groups = []
    for c, concept in enumerate(concepts):
        per_pass = []
        for j, p in enumerate(prompts):
            own = token_positions(tokenizer, p, concept.token)
            cls = token_positions(tokenizer, p, concept.class_word) if concept.class_word else []
            per_pass.append(sorted(set(own + cls)) if j == c + 1 else (cls if concept.class_word else own))
        groups.append(per_pass)
    for j in range(len(prompts)):
        owner: dict[int, int] = {}
        for c, per_pass in enumerate(groups):
            for pos in per_pass[j]:
                if pos in owner:
                    raise InputError(f"Concepts {owner[pos] + 1} and {c + 1} are named by the same word in prompt "
                                     f"{prompts[j]!r}: give them different class words or triggers.")
                owner[pos] = c
    return groups


def _build(cls, data, what: str):
    if not isinstance(data, dict):
        raise InputError(f"Each {what} must be a mapping of fields, got {type(data).__name__}.")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InputError(f"Unknown field(s) in {what}: {', '.join(unknown)} (known: {', '.join(sorted(names))}).")
    return cls(**data)


def parse_region(region, label: str = "concept"):
    """``None`` | box (4 fractions, as list/tuple or 'x0,y0,x1,y1' or {'box': [...]}) | mask image path ({'mask': path})."""
    if region is None or region == "" or region == []:
        return None
    if isinstance(region, dict):
        if "box" in region:
            region = region["box"]
        elif "mask" in region:
            region = str(region["mask"])
        else:
            raise InputError(f"Region of {label}: give 'box' or 'mask'.")
    if isinstance(region, str) and re.fullmatch(r"\s*[-+\d.eE]+(\s*,\s*[-+\d.eE]+){3}\s*", region):
        region = region.split(",")
    if isinstance(region, str):
        return region
    try:
        box = tuple(float(v) for v in region)
    except (TypeError, ValueError):
        raise InputError(f"Region of {label} must be a box [x0, y0, x1, y1] or a mask image path (got {region!r}).") from None
    if len(box) != 4:
        raise InputError(f"Box of {label} needs 4 numbers x0, y0, x1, y1 (got {len(box)}).")
    x0, y0, x1, y1 = box
    if not all(np.isfinite(box)) or min(box) < 0 or max(box) > 1:
        raise InputError(f"Box of {label} {list(box)} is outside the image: coordinates are fractions between 0 and 1.")
    if x1 <= x0 or y1 <= y0:
        raise InputError(f"Box of {label} {list(box)} is empty: x1 must be > x0 and y1 > y0.")
    return box


def load_spec(path: str | Path, **overrides) -> CompositionSpec:
    """Read a spec from a ``.yaml``/``.yml`` or ``.json`` file (fields as in ``CompositionSpec``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Spec file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - yaml and json raise different types
        raise InputError(f"{path.name} is not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'}: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path.name} must hold a mapping with prompt, concepts, engine, …")
    data.update({k: v for k, v in overrides.items() if v is not None})
    # relative mask paths are relative to the spec file
    for c in data.get("concepts") or []:
        if isinstance(c, dict):
            reg = c.get("region")
            m = reg.get("mask") if isinstance(reg, dict) else reg if isinstance(reg, str) and Path(reg).suffix else None
            if m and not Path(m).is_absolute() and (path.parent / m).is_file():
                c["region"] = str(path.parent / m)
    return _build(CompositionSpec, data, "spec")


def parse_concept_arg(arg: str) -> ConceptEntry:
    """CLI shorthand ``LORA[:WEIGHT[:PROMPT]][:x0,y0,x1,y1]``; without a prompt the engine builds it from the LoRA's
    trigger and class word (``concept_prompt``)."""
    parts = arg.split(":")
    region = None
    if len(parts) >= 2 and parts[-1].count(",") == 3:
        region = parts[-1]
        parts = parts[:-1]
    lora, weight, prompt = parts[0], (parts[1] if len(parts) > 1 else "1"), ":".join(parts[2:])
    if not lora.strip():
        raise InputError(f"--concept {arg!r}: use LORA[:WEIGHT[:PROMPT]][:x0,y0,x1,y1].")
    try:
        w = float(weight or 1)
    except ValueError:
        raise InputError(f"--concept {arg!r}: the weight {weight!r} is not a number.") from None
    return ConceptEntry(lora=lora, weight=w, prompt=prompt, region=region)


# ------------------------------------------------------------------------------------------------ resolution
@dataclass
class ResolvedSpec:
    spec: CompositionSpec
    width: int
    height: int
    concept_paths: list[Path]
    global_paths: list[Path]
    masks: torch.Tensor | None  # (n_concepts, height, width) float in {0,1} for concepts with a region, else NaN-free zeros
    has_region: list[bool]


def resolve(spec: CompositionSpec, pipe, ws=None) -> ResolvedSpec:
    """Checks that need the pipeline and the disk; returns LoRA paths and region masks at image resolution."""
    import copy

    from . import lora_io
    from .models import default_resolution

    spec = copy.deepcopy(spec)  # concepts get their words filled in; the caller's spec stays as given
    res = default_resolution(pipe)
    width, height = int(spec.width or res), int(spec.height or res)
    if width % pipe.vae_scale_factor or height % pipe.vae_scale_factor:
        raise InputError(f"width and height must be multiples of {pipe.vae_scale_factor} for this model.")

    def find(ref: str) -> Path:
        if ws is not None:
            return ws.resolve_lora(ref)
        p = Path(ref).expanduser()
        if not p.is_file():
            raise LoraFormatError(f"LoRA file not found: {ref}")
        return p

    concept_paths = [find(c.lora) for c in spec.concepts]
    global_paths = [find(g.lora) for g in spec.global_loras]
    for p in concept_paths + global_paths:
        lora_io.check_compatible(pipe, p)
        check_lora_file(p)
    if len(set(concept_paths)) != len(concept_paths) and spec.engine != "merge":
        raise InputError("The same LoRA file is used by two concepts; each concept needs its own LoRA.")
    fill_concepts(spec, concept_paths)
    masks = torch.zeros(len(spec.concepts), height, width)
    has = []
    for i, c in enumerate(spec.concepts):
        if c.box is not None:
            x0, y0, x1, y1 = c.box
            ys = (torch.arange(height) + 0.5) / height
            xs = (torch.arange(width) + 0.5) / width
            masks[i] = ((ys >= y0) & (ys < y1)).float()[:, None] * ((xs >= x0) & (xs < x1)).float()[None, :]
            has.append(True)
        elif c.mask_path is not None:
            if ws is not None:
                ws.check_path(c.mask_path, f"mask image of concept {i + 1}")  # confined: never probe outside
            masks[i] = load_mask(c.mask_path, width, height, f"concept {i + 1}")
            has.append(True)
        else:
            has.append(False)
        if has[-1] and masks[i].sum() == 0:
            raise InputError(f"The region of concept {i + 1} ({c.lora}) covers no pixel.")
    if spec.engine in ("composer", "clora"):
        for i, c in enumerate(spec.concepts, 1):
            if not token_positions(pipe.tokenizer, c.prompt, c.token):
                raise InputError(f"The concept word {c.token!r} of concept {i} is not in its prompt {c.prompt!r}.")
    return ResolvedSpec(spec, width, height, concept_paths, global_paths, masks if any(has) else None, has)


def load_mask(path: str, width: int, height: int, label: str) -> torch.Tensor:
    from PIL import Image

    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"Mask image of {label} not found: {path}")
    try:
        with Image.open(p) as im:
            im.load()
            size = im.size
            if im.mode in ("RGBA", "LA") and im.getextrema()[-1][0] < 255:
                arr = im.getchannel("A")
            else:
                arr = im.convert("L")
            data = torch.from_numpy(np.array(arr, dtype=np.float32)).view(size[1], size[0]) / 255.0
    except Exception as exc:  # noqa: BLE001 - PIL raises many types
        raise InputError(f"Mask image of {label} ({p.name}) is not a readable image: {exc}") from exc
    if size != (width, height):
        raise InputError(f"Mask image of {label} is {size[0]}x{size[1]} but the image is {width}x{height}: "
                         "draw the mask at the output size.")
    return (data >= 0.5).float()


def token_positions(tokenizer, prompt: str, words: str) -> list[int]:
    """Positions (in the 77-token sequence, SOT = 0) of the tokens of ``words`` inside ``prompt``; [] if absent."""
    if not words.strip():
        return []
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    sub = tokenizer(words.strip(), add_special_tokens=False).input_ids
    if not sub:
        return []
    out: list[int] = []
    for s in range(1, len(ids) - len(sub) + 1):
        if ids[s:s + len(sub)] == sub:
            out.extend(range(s, s + len(sub)))
    return out
