"""B-LoRA files: split a joint B-LoRA into its content and style halves, tell which half a file is, import files
trained elsewhere.

Paper: Frenkel, Vinker, Shamir, Cohen-Or, "Implicit Style-Content Separation using B-LoRA" (ECCV 2024,
arXiv 2403.14572). A B-LoRA is one LoRA trained on two SDXL transformer blocks: ``unet.up_blocks.0.attentions.0``
(the paper's W⁴, "content") and ``unet.up_blocks.0.attentions.1`` (W⁵, "style"). The official code separates the two
by filtering state-dict keys on those block prefixes; this module does the same, but writes each half as a standalone
studio LoRA file (PEFT keys, diffusers adapter metadata, ``studio.role`` = content | style).

Accepted inputs (all ``.safetensors``):

* studio / diffusers-PEFT files (``unet.up_blocks.0.attentions.N.….lora_A.weight``), with or without the ``unet.``
  prefix;
* old diffusers files (``….lora.down.weight`` / ``….lora.up.weight``, and the attention-processor form
  ``….attn1.processor.to_q_lora.down.weight``) as written by the official B-LoRA script (diffusers 0.25, no PEFT);
* kohya / A1111 / ComfyUI files (``lora_unet_output_blocks_0_1_…`` = content, ``lora_unet_output_blocks_1_1_…`` =
  style, Stability's SGM names; also the ``lora_unet_up_blocks_0_attentions_N_…`` spelling some trainers use).

Scales are baked in: each module's ``alpha / rank`` (kohya ``.alpha`` tensors, diffusers ``network_alphas`` or the
PEFT adapter metadata) multiplies its up matrix, and the output files use ``lora_alpha = r`` (scale 1), so loading the
split file at linear weight *w* gives exactly *w* times the original block's ΔW. Modules of unequal rank are
zero-padded to the largest rank (the product is unchanged). Keys outside the two blocks (a LoRA that is not a
B-LoRA) are reported, not silently dropped, unless ``allow_other=True``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from . import lora_io
from .errors import LoraFormatError

CONTENT_BLOCK = "up_blocks.0.attentions.0"
STYLE_BLOCK = "up_blocks.0.attentions.1"
BLOCKS = {"content": CONTENT_BLOCK, "style": STYLE_BLOCK}
KOHYA_BLOCKS = {"content": "output_blocks.0.1", "style": "output_blocks.1.1"}  # SDXL (layers_per_block = 2)
ROLES = ("content", "style", "joint")
LINEARS = ("to_q", "to_k", "to_v", "to_out.0")

# kohya spells module paths with underscores; these names contain underscores of their own.
_KOHYA_JOIN = [("transformer.blocks", "transformer_blocks"), ("to.q", "to_q"), ("to.k", "to_k"), ("to.v", "to_v"),
               ("to.out", "to_out"), ("proj.in", "proj_in"), ("proj.out", "proj_out"), ("down.blocks", "down_blocks"),
               ("up.blocks", "up_blocks"), ("mid.block", "mid_block"), ("output.blocks", "output_blocks"),
               ("input.blocks", "input_blocks"), ("middle.block", "middle_block"), ("time.emb.proj", "time_emb_proj"),
               ("conv.shortcut", "conv_shortcut"), ("add.k.proj", "add_k_proj"), ("add.v.proj", "add_v_proj")]


# ------------------------------------------------------------------------------------------------------------ parsing
def _kohya_module(name: str) -> str:
    """``output_blocks_0_1_transformer_blocks_0_attn1_to_out_0`` -> ``up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0``."""
    s = name.replace("_", ".")
    for a, b in _KOHYA_JOIN:
        s = s.replace(a, b)
    m = re.match(r"output_blocks\.(\d+)\.1\.(.*)", s)
    if m:  # SGM names of SDXL's UNet (layers_per_block = 2: output_blocks i -> up_blocks i // 3, attentions i % 3)
        i = int(m[1])
        return f"up_blocks.{i // 3}.attentions.{i % 3}.{m[2]}"
    return s


_DIFFUSERS_KEY = [
    (re.compile(r"^(?P<m>.+)\.processor\.(?P<l>to_q|to_k|to_v|to_out)_lora\.(?P<k>down|up)\.weight$"), None),
    (re.compile(r"^(?P<m>.+?)\.(?:lora_A|lora\.down|lora_linear_layer\.down)\.weight$"), "down"),
    (re.compile(r"^(?P<m>.+?)\.(?:lora_B|lora\.up|lora_linear_layer\.up)\.weight$"), "up"),
    (re.compile(r"^(?P<m>.+?)\.alpha$"), "alpha"),
]


def _diffusers_key(key: str) -> tuple[str, str] | None:
    """(module path without ``unet.``, "down" | "up" | "alpha") of a diffusers-style key; None if unsupported.

    Handles PEFT (``.lora_A.weight``), old diffusers (``.lora.down.weight``) and the attention-processor form
    (``attn1.processor.to_q_lora.down.weight`` -> ``attn1.to_q``). Text-encoder modules keep their prefix.
    """
    for rx, kind in _DIFFUSERS_KEY:
        m = rx.match(key)
        if m:
            if kind is None:
                lin = "to_out.0" if m["l"] == "to_out" else m["l"]
                return f"{m['m']}.{lin}".removeprefix("unet."), m["k"]
            return m["m"].removeprefix("unet."), kind
    return None


def detect_format(keys: list[str]) -> str:
    """``kohya`` | ``diffusers`` | ``unknown``; also knows the attention-processor names lora_io does not."""
    fmt = lora_io.detect_format(keys)
    if fmt == "unknown" and any((p := _diffusers_key(k)) and p[1] != "alpha" for k in keys):
        return "diffusers"
    return fmt


def unet_modules(tensors: dict[str, torch.Tensor], meta: dict[str, str], name: str = "file") -> dict[str, dict]:
    """Per UNet module of any supported LoRA file: ``{"down": A, "up": B, "scale": alpha / rank}``.

    Text-encoder keys are returned under modules starting with ``text_encoder`` so callers can report them.
    """
    fmt = detect_format(list(tensors))
    mods: dict[str, dict] = {}
    default_scale = None
    if fmt == "diffusers":
        try:
            import json

            am = json.loads(meta.get(lora_io.ADAPTER_META_KEY, "") or "{}")
            if "unet.r" in am and "unet.lora_alpha" in am:
                default_scale = float(am["unet.lora_alpha"]) / float(am["unet.r"])
        except (ValueError, TypeError):
            default_scale = None
    for key, t in tensors.items():
        if fmt == "kohya":
            m = re.match(r"^(lora_unet|lora_te\d?)_(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)$", key)
            if not m:
                hint = (" Make it a plain LoRA first: `studio lora convert FILE OUT.safetensors --to kohya`."
                        if re.search(r"\.(hada|lokr)_", key) else "")
                raise LoraFormatError(f"{name}: unsupported kohya tensor {key!r} (only plain LoRA lora_down/lora_up/alpha)."
                                      + hint)
            module = _kohya_module(m[2]) if m[1] == "lora_unet" else f"text_encoder:{m[2]}"
            kind = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[m[3]]
        elif fmt == "diffusers":
            parsed = _diffusers_key(key)
            if parsed is None:
                raise LoraFormatError(f"{name}: unsupported tensor {key!r} (DoRA, LoHa and biases are not supported here).")
            module, kind = parsed
            if module.startswith("text_encoder"):
                module = f"text_encoder:{module}"
        else:
            raise LoraFormatError(f"{name} holds no LoRA weights (no lora_A/lora_B or lora_down/lora_up keys).")
        mods.setdefault(module, {})[kind] = t
    out = {}
    for module, parts in mods.items():
        if "down" not in parts or "up" not in parts:
            raise LoraFormatError(f"{name}: module {module} lacks its {'up' if 'down' in parts else 'down'} matrix.")
        rank = parts["down"].shape[0]
        if "alpha" in parts:
            scale = float(parts["alpha"]) / rank
        else:
            scale = default_scale if default_scale is not None else 1.0
        out[module] = {"down": parts["down"], "up": parts["up"], "scale": scale}
    return out


def _block_of(module: str) -> str | None:
    for role, block in BLOCKS.items():
        if module.startswith(block + "."):
            return role
    return None


def roles_in(modules) -> tuple[set[str], list[str]]:
    """The B-LoRA blocks present among ``modules`` and the modules outside both blocks."""
    found, other = set(), []
    for m in modules:
        role = _block_of(m)
        if role:
            found.add(role)
        else:
            other.append(m)
    return found, other


# ------------------------------------------------------------------------------------------------------------ roles
def lora_role(path: str | Path) -> str:
    """``content`` | ``style`` | ``joint`` | ``unknown`` for a LoRA file.

    Decided by the keys (which blocks carry weights), so files trained elsewhere are recognised too; the
    ``studio.role`` metadata is only used when it agrees (a file whose metadata says "content" but whose weights sit
    in the style block is a style file).
    """
    keys, meta = lora_io.read_header(Path(path))
    fmt = detect_format(keys)
    if fmt == "unknown":
        return "unknown"
    modules = set()
    for k in keys:
        if fmt == "kohya":
            m = re.match(r"^lora_unet_(.+?)\.(lora_down|lora_up|alpha)", k)
            modules.add(_kohya_module(m[1]) if m else "other")
        else:
            parsed = _diffusers_key(k)
            modules.add("other" if parsed is None or parsed[0].startswith("text_encoder") else parsed[0])
    found, other = roles_in(modules)
    if other or not found:
        return "unknown"
    role = "joint" if found == {"content", "style"} else found.pop()
    return role


def describe_role(role: str) -> str:
    return {"content": f"a content B-LoRA (weights in {CONTENT_BLOCK})", "style": f"a style B-LoRA (weights in {STYLE_BLOCK})",
            "joint": f"a joint B-LoRA (content and style, {CONTENT_BLOCK} and {STYLE_BLOCK})",
            "unknown": f"not a B-LoRA (it has weights outside {CONTENT_BLOCK} / {STYLE_BLOCK}, or none)"}[role]


def require_role(path: str | Path, expected: str, *, allow_joint: bool = False) -> str:
    """Raise ``LoraFormatError`` unless ``path`` is a B-LoRA of role ``expected`` (or joint, when allowed)."""
    role = lora_role(path)
    if role == expected or (allow_joint and role == "joint"):
        return role
    name = Path(path).name
    if role in ("content", "style"):
        hint = "swap the content and style choices" if expected in ("content", "style") else "pick the joint file"
        raise LoraFormatError(f"{name} is {describe_role(role)}, but a {expected} B-LoRA is expected here: {hint}.")
    if role == "joint":
        raise LoraFormatError(f"{name} is {describe_role(role)}: split it first (studio lora split {name}) "
                              f"and pick its -{expected} file.")
    raise LoraFormatError(f"{name} is {describe_role(role)}; a {expected} B-LoRA is expected here.")


# ------------------------------------------------------------------------------------------------------------ splitting
def block_state(modules: dict[str, dict], role: str) -> dict[str, torch.Tensor]:
    """PEFT state (``<module>.lora_A.weight`` …) of one block, scales baked into B, ranks padded to the maximum."""
    sel = {m: p for m, p in modules.items() if _block_of(m) == role}
    if not sel:
        return {}
    r = max(p["down"].shape[0] for p in sel.values())
    out = {}
    for m, p in sorted(sel.items()):
        down, up = p["down"].float(), p["up"].float() * p["scale"]
        if down.dim() != 2 or up.dim() != 2:
            raise LoraFormatError(f"module {m} has non-linear LoRA weights of shape {tuple(down.shape)}; B-LoRA adapts linear layers only.")
        k = down.shape[0]
        if k < r:
            down = torch.cat([down, down.new_zeros(r - k, down.shape[1])])
            up = torch.cat([up, up.new_zeros(up.shape[0], r - k)], dim=1)
        out[f"{m}.lora_A.weight"] = down.to(p["down"].dtype).contiguous()
        out[f"{m}.lora_B.weight"] = up.to(p["up"].dtype).contiguous()
    return out


def role_metadata(role: str, *, source: str, rank: int, token: str = "", source_hash: str = "",
                  recommended_weight: float = 1.0, base: dict[str, str] | None = None,
                  state: dict[str, torch.Tensor] | None = None, name: str = "") -> dict[str, str]:
    """Header of a B-LoRA file: the studio's keys plus ``studio.role``, ``studio.source``, token and recommended weight."""
    keep = {k: v for k, v in (base or {}).items() if k.startswith(("studio.", "modelspec.")) and k not in (
        "studio.rank", "studio.alpha", "modelspec.title", "modelspec.date", "modelspec.architecture")}
    meta = lora_io.build_metadata(
        arch="sdxl", method=(base or {}).get("studio.method", "blora"), name=name or source, rank=rank, alpha=float(rank),
        components={"unet": state or {}},
        extra={"role": role, "source": source, "source_image_hash": source_hash, "blora_block": BLOCKS.get(role, "both"),
               "recommended_weight": str(recommended_weight),
               "usage": {"content": "A {t} made of gold / A {t} in <style token> style",
                         "style": "A backpack in {t} style", "joint": "A {t}"}[role].replace("{t}", token or "<token>")},
    )
    out = {**keep, **meta}
    if token:
        out["modelspec.trigger_phrase"] = token
    return out


def split_blora(src: str | Path, out_content: str | Path | None, out_style: str | Path | None, *,
                allow_other: bool = False, source_name: str = "") -> dict[str, Path]:
    """Split a joint B-LoRA into a content file (``up_blocks.0.attentions.0``) and a style file (``.1``).

    Either output may be ``None`` to skip it. Returns ``{"content": path, "style": path}`` for what was written.
    Raises ``LoraFormatError`` for files without B-LoRA blocks, for a requested half the file lacks, and (unless
    ``allow_other``) for files with LoRA weights outside the two blocks.
    """
    src = Path(src)
    tensors, meta = lora_io.read_tensors(src)
    arch = lora_io.detect_arch(list(tensors), meta)
    if arch == "sd15":
        raise LoraFormatError(f"{src.name} is an SD1.5 LoRA; B-LoRA blocks exist only in SDXL.")
    mods = unet_modules(tensors, meta, src.name)
    found, other = roles_in(mods)
    if not found:
        raise LoraFormatError(f"{src.name} has no weights in {CONTENT_BLOCK} or {STYLE_BLOCK}: it is not a B-LoRA.")
    if other and not allow_other:
        raise LoraFormatError(
            f"{src.name} also has LoRA weights outside the B-LoRA blocks ({len(other)} modules, e.g. {other[0]}); "
            "splitting would drop them. Pass allow_other=True (CLI: --allow-other) to split anyway.")
    token = meta.get("modelspec.trigger_phrase", "")
    source = source_name or meta.get("studio.source") or meta.get("modelspec.title") or src.stem
    source_hash = meta.get("studio.source_image_hash") or meta.get("studio.dataset_hash", "")
    written: dict[str, Path] = {}
    for role, out in (("content", out_content), ("style", out_style)):
        if out is None:
            continue
        if role not in found:
            raise LoraFormatError(f"{src.name} has no {role} block ({BLOCKS[role]}): it is {describe_role(lora_role(src))}.")
        state = block_state(mods, role)
        rank = state[next(iter(state))].shape[0]
        weight = float(meta.get("studio.recommended_weight", 1.0) or 1.0)
        md = role_metadata(role, source=source, rank=rank, token=token, source_hash=source_hash,
                           recommended_weight=weight, base=meta, state=state, name=Path(out).stem)
        written[role] = lora_io.save_lora(Path(out), {"unet": state}, md)
    return written


def split_into_library(ws, src: str | Path, name: str = "", *, allow_other: bool = False,
                       kohya_export: bool = True) -> dict[str, str]:
    """Split ``src`` (a library name or a file) into library entries ``<name>-content`` and ``<name>-style``.

    Only the halves the file has are written. Returns ``{"content": entry_name, "style": entry_name}``.
    """
    from .errors import InputError
    from .library import _safe_name

    path = ws.resolve_lora(str(src))
    base = ws.check_name(name or _safe_name(path.stem))
    role = lora_role(path)
    if role == "unknown" and not allow_other:
        raise LoraFormatError(f"{path.name} is {describe_role(role)}.")
    wanted = {"content": None, "style": None}
    for r in ("content", "style"):
        if role in (r, "joint", "unknown"):
            n = f"{base}-{r}"
            if ws.lora_path(n).exists() and ws.lora_path(n).resolve() != path.resolve():
                raise InputError(f"A LoRA named {n!r} already exists: pick another name.")
            wanted[r] = ws.lora_path(n)
    if role == "unknown":
        found, _ = roles_in(unet_modules(*lora_io.read_tensors(path), path.name))
        wanted = {r: p if r in found else None for r, p in wanted.items()}
    written = split_blora(path, wanted["content"], wanted["style"], allow_other=allow_other, source_name=base)
    names = {}
    for r, p in written.items():
        n = p.name[: -len(".safetensors")]
        _, m = lora_io.read_header(p)
        sidecar = {"name": n, "method": m.get("studio.method", "blora"), "architecture": "sdxl", "role": r,
                   "source": base, "imported_from": path.name, "trigger": m.get("modelspec.trigger_phrase", ""),
                   "recommended_weight": float(m.get("studio.recommended_weight", 1.0))}
        if kohya_export:
            sidecar["kohya_export"] = str(export_kohya(ws, n, p))
        ws.write_sidecar(n, sidecar)
        names[r] = n
    return names


def export_kohya(ws, name: str, path: Path) -> Path:
    """kohya/A1111/ComfyUI copy of a (scale-1, PEFT-keyed) B-LoRA file in ``exports/`` (SGM block names)."""
    tensors, meta = lora_io.read_tensors(path)
    state = {k[len("unet."):]: v for k, v in tensors.items() if k.startswith("unet.")}
    rank = max(v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight"))
    dst = ws.exports / f"{name}.kohya.safetensors"
    lora_io.write_kohya_export(dst, lora_io.to_kohya({"unet": state}, "sdxl", float(rank), rank, 2), meta)
    return dst
