"""LoRA files: diffusers/PEFT format, kohya/A1111/ComfyUI format, metadata, architecture checks.

A studio LoRA file is a ``.safetensors`` file with

* keys ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (and ``text_encoder.``/``text_encoder_2.``) as written by
  diffusers' ``save_lora_weights`` and read by ``pipe.load_lora_weights``;
* ``lora_adapter_metadata``: the PEFT ``LoraConfig`` per component (rank, alpha, exact target modules) so diffusers
  rebuilds the adapter with the right scale;
* ``modelspec.*`` keys (Stability's ModelSpec, as kohya writes them) and ``studio.*`` keys (method, architecture,
  trigger, rank, alpha, steps, resolution, dataset size, recommended weight, …).

The kohya export uses ``lora_unet_*``/``lora_te*_*`` names with ``lora_down``/``lora_up``/``alpha``, the names kohya
sd-scripts writes: diffusers module paths for SD1.5, Stability's SGM paths for SDXL (``input_blocks_4_1_…``, ResNet
leaves ``in_layers_2``/``emb_layers_1``/``skip_connection``), CLIP modules always below ``text_model`` (the
transformers 4 layout, which kohya, A1111, ComfyUI and older diffusers expect, whatever layout the installed
transformers uses). The diffusers file spells CLIP-L keys the same way (``text_encoder.text_model.…``).

Imports (``load_lora``/``peft_state``) accept kohya SD1.5/SDXL files (diffusers or SGM block names), A1111/Forge
files, diffusers' training-script files in the current (``lora_A``), ``lora.down`` and old attention-processor
(``processor.to_k_lora.down``, ``lora_linear_layer``) spellings, either CLIP-L layout, LoCon (conv) and DoRA
(``dora_scale``), and LyCORIS LoHa and LoKr files (linear and conv, ``lokr_w1``/``lokr_w1_a·b``, ``lokr_w2``/
``lokr_w2_a·b``). Each module's ``alpha / rank`` is folded into ``lora_up`` before PEFT sees it, so per-module alphas
apply exactly (diffusers 0.42's kohya conversion gives modules whose alpha differs from the file's most common one
twice their strength; the studio does not use that conversion). A LoHa or LoKr module becomes the PEFT LoRA with
exactly its ΔW: a Hadamard product of two rank-r products is one product of rank r² (row-wise Kronecker factors),
and a Kronecker product of two factored matrices is the product of their Kronecker factors (where that rank exceeds
the layer's, an SVD of ΔW at full rank); scales as LyCORIS/ComfyUI apply them (``alpha / dim``, 1 without a
decomposed factor or alpha). So every studio path (routing, fusing, composition) works on them unchanged. OFT,
GLoRA, full-weight diffs and the Tucker forms (``lora_mid``, ``hada_t1``, ``lokr_t2``) are refused with the
format's name.
Only safetensors are read: pickles can run code.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import LoraFormatError

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
ADAPTER_META_KEY = "lora_adapter_metadata"
BUNDLE_PREFIX = "bundle_emb."  # A1111's bundled embeddings in a LoRA file (studio/embeddings.py)
ARCH_TITLES = {"sd15": "stable-diffusion-v1/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}
KOHYA_TE_PREFIX = {"sd15": {"text_encoder": "lora_te"}, "sdxl": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}}


# ----------------------------------------------------------------------------------------------------------- writing
def _umask_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give: 0666 less the process umask (``mkstemp`` makes 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file through a temp file and a rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: dict) -> None:
    atomic_write_bytes(Path(path), json.dumps(data, indent=2, sort_keys=True, default=str).encode())


def adapter_state(model, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The LoRA weights of one PEFT adapter in ``model``, keyed ``<module>.lora_A.weight``."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items()}


def modules_of(state: dict[str, torch.Tensor]) -> list[str]:
    """Module paths that carry LoRA weights (``a.b.to_q`` for ``a.b.to_q.lora_A.weight``)."""
    return sorted({k.rsplit(".lora_", 1)[0] for k in state if ".lora_" in k})


def build_metadata(*, arch: str, method: str, name: str, rank: int, alpha: float, components: dict[str, dict],
                   extra: dict | None = None) -> dict[str, str]:
    """Safetensors header: diffusers' adapter metadata, ModelSpec keys and the studio's own keys (all strings)."""
    adapter_meta = {}
    for comp, state in components.items():
        if state:
            state = _canonical_state(comp, state)
            ranks = {k[: -len(".lora_A.weight")]: v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight")}
            r = max(ranks.values())
            scale = alpha / rank if rank else 1.0  # every module: alpha / rank, whatever its own rank
            # CLIP targets without ``text_model.``: PEFT matches them by suffix in either transformers layout
            targets = [m.removeprefix("text_model.") for m in modules_of(state)]
            adapter_meta.update({f"{comp}.r": r, f"{comp}.lora_alpha": scale * r,
                                 f"{comp}.target_modules": targets, f"{comp}.init_lora_weights": True})
            odd = {m: n for m, n in ranks.items() if n != r}
            if odd:
                odd = {m.removeprefix("text_model."): n for m, n in odd.items()}
                adapter_meta.update({f"{comp}.rank_pattern": odd, f"{comp}.alpha_pattern": {m: scale * n for m, n in odd.items()}})
    meta = {
        "format": "pt",
        ADAPTER_META_KEY: json.dumps(adapter_meta, sort_keys=True),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ARCH_TITLES.get(arch, arch),
        "modelspec.implementation": "diffusers",
        "modelspec.title": name,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "studio.version": "1",
        "studio.method": method,
        "studio.base_arch": arch,
        "studio.rank": str(rank),
        "studio.alpha": str(alpha),
    }
    for k, v in (extra or {}).items():
        meta[k if "." in k else f"studio.{k}"] = v if isinstance(v, str) else json.dumps(v)
    return meta


def _canonical_state(comp: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP keys below ``text_model.`` (the spelling diffusers writes with the transformers 4 layout)."""
    return state if comp == "unet" else {te_canonical(k): v for k, v in state.items()}


def save_lora(path: Path, components: dict[str, dict[str, torch.Tensor]], metadata: dict[str, str]) -> Path:
    """Save per-component adapter states (``{"unet": {...}, "text_encoder": {...}}``) in diffusers format."""
    tensors = {f"{comp}.{k}": v for comp, state in components.items() for k, v in _canonical_state(comp, state).items()}
    if not tensors:
        raise LoraFormatError("Nothing to save: the LoRA has no weights.")
    atomic_save_safetensors(Path(path), tensors, metadata)
    return Path(path)


# ----------------------------------------------------------------------------------------------------------- reading
def read_header(path: Path) -> tuple[list[str], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise LoraFormatError(f"No such LoRA file: {path}")
    if path.suffix.lower() != ".safetensors":
        raise LoraFormatError(f"{path.name}: only .safetensors LoRA files are loaded (pickle files can run code).")
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys()), dict(f.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - safetensors raises several error types on corrupt files
        raise LoraFormatError(f"{path.name} is not a valid safetensors file ({exc}).") from exc


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    keys, meta = read_header(path)
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in keys}, meta


def detect_format(keys: list[str]) -> str:
    if any(k.startswith("lora_unet_") or k.startswith("lora_te") for k in keys):
        return "kohya"
    if any(".lora_A." in k or ".lora_B." in k or ".lora.down." in k or ".lora_linear_layer." in k or "_lora.down." in k
           for k in keys):
        return "diffusers"
    return "unknown"


def detect_arch(keys: list[str], meta: dict[str, str], shapes: dict[str, tuple] | None = None) -> str | None:
    """Base architecture of a LoRA: from our metadata, ModelSpec, kohya's keys, or a second text encoder."""
    if meta.get("studio.base_arch"):
        return meta["studio.base_arch"]
    spec = meta.get("modelspec.architecture", "")
    if spec.startswith("stable-diffusion-xl"):
        return "sdxl"
    if spec.startswith("stable-diffusion-v1"):
        return "sd15"
    if any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in keys) or any("input_blocks_" in k for k in keys):
        return "sdxl"
    if meta.get("ss_base_model_version", "").startswith("sdxl"):
        return "sdxl"
    if meta.get("ss_base_model_version", "").startswith("sd_v1"):
        return "sd15"
    return None


def file_hash(path: Path, n: int = 10) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def inspect(path: Path) -> dict:
    """A summary of a LoRA file for ``studio lora inspect`` and the library cards."""
    keys, meta = read_header(path)
    fmt = detect_format(keys)
    if fmt == "unknown":
        what = unsupported_format(keys)
        if what:
            raise LoraFormatError(f"{Path(path).name} is a {what} file; the studio loads LoRA, LoCon (conv LoRA) and "
                                  "DoRA files.")
        raise LoraFormatError(f"{Path(path).name} holds no LoRA weights (no lora_A/lora_B or lora_down/lora_up keys).")
    with safe_open(str(path), framework="pt") as f:
        ranks = sorted({f.get_slice(k).get_shape()[0] for k in keys
                        if k.endswith(("lora_A.weight", "lora_down.weight", ".down.weight", ".hada_w1_b", ".lokr_w1_b",
                                       ".lokr_w2_b"))})
    kind = lycoris_kind(keys)
    if kind:
        fmt = f"{fmt} ({kind})"
    if fmt == "diffusers":
        comps = sorted({k.split(".")[0] if k.split(".")[0] in COMPONENTS else "unet" for k in keys})
    else:
        comps = sorted({k.split("_")[1] for k in keys})
    return {
        "file": str(path),
        "format": fmt,
        "architecture": detect_arch(keys, meta),
        "method": meta.get("studio.method", meta.get("ss_network_module", "unknown")),
        "trigger": meta.get("modelspec.trigger_phrase", ""),
        "ranks": ranks,
        "tensors": len(keys),
        "components": comps,
        "sha256": file_hash(Path(path)),
        "metadata": {k: v for k, v in meta.items() if k != ADAPTER_META_KEY},
    }


# ------------------------------------------------------------------------------------------------------------ names
TE_COMPONENTS = ("text_encoder", "text_encoder_2")
_UNSUPPORTED = (  # key endings of LyCORIS/other formats that have no exact PEFT LoRA form here
    ((".hada_t1", ".hada_t2"), "LoHa with Tucker decomposition (hada_t1/hada_t2)"),
    ((".lokr_t2",), "LoKr with Tucker decomposition (lokr_t2)"),
    ((".oft_blocks", ".oft_diag", ".oft_r.weight"), "OFT/BOFT"),
    ((".a1.weight", ".b1.weight"), "GLoRA"),
    ((".diff", ".diff_b"), "full weight difference (LyCORIS 'full')"),
    ((".w_norm", ".b_norm"), "norm-layer difference"),
    ((".lora_mid.weight",), "LoCon with Tucker decomposition (lora_mid)"),
    ((".on_input",), "IA3"),
)
_PARTS = (  # key ending -> part, longest spellings first
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"), (".lora_magnitude_vector.weight", "dora"),
    (".lora_magnitude_vector", "dora"), (".dora_scale", "dora"), (".alpha", "alpha"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),  # diffusers 0.42's convert_state_dict_to_kohya output
    *((f".{k}", k) for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w1_a", "lokr_w1_b",
                             "lokr_w2", "lokr_w2_a", "lokr_w2_b")),  # LyCORIS LoHa / LoKr
)
_LYCORIS = ("hada_w1_a", "lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a")
_OLD_PROC = re.compile(r"^(.*?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_OLD_TE = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def te_canonical(module: str) -> str:
    """A CLIP module path in the transformers 4 layout (``text_model.encoder…``), which kohya, A1111, ComfyUI and older
    diffusers use; transformers >= 5.6 drops ``text_model`` from ``CLIPTextModel`` (not from ``…WithProjection``)."""
    return module if module.startswith(("text_model.", "text_projection")) else f"text_model.{module}"


def model_module(model, module: str) -> str:
    """A file's module path as ``model`` spells it (``text_model.`` dropped for a flattened ``CLIPTextModel``)."""
    if module.startswith("text_model.") and not hasattr(model, "text_model"):
        return module[len("text_model."):]
    return module


def kohya_prefix(arch: str, comp: str) -> str:
    return "lora_unet" if comp == "unet" else KOHYA_TE_PREFIX.get(arch, KOHYA_TE_PREFIX["sdxl"])[comp]


def _sgm_table(unet_config) -> dict[str, str]:
    from .checkpoint import unet_module_map

    return unet_module_map(dict(unet_config))


def kohya_module_name(comp: str, module: str, arch: str, sgm: dict[str, str] | None) -> str | None:
    """The kohya/A1111/ComfyUI name of one module (``lora_unet_input_blocks_4_1_…``), or None when it has none."""
    from .checkpoint import _rename

    if comp == "unet":
        name = _rename(module, sgm) if arch == "sdxl" and sgm is not None else module
    else:
        name = te_canonical(module)
    return None if name is None else f"{kohya_prefix(arch, comp)}_{name.replace('.', '_')}"


def lora_models(pipe) -> dict:
    return {c: getattr(pipe, c) for c in COMPONENTS if getattr(pipe, c, None) is not None}


def name_index(models: dict, arch: str) -> dict[str, tuple[str, str, tuple]]:
    """Every name a LoRA file may give a weight layer of ``models`` -> (component, module path, weight shape).

    UNet layers answer to their diffusers path and their SGM path; CLIP layers to the ``text_model`` path, so files
    from either transformers layout and either naming scheme find the same layer."""
    from .checkpoint import _rename

    sgm = _sgm_table(models["unet"].config) if "unet" in models else None
    index: dict[str, tuple[str, str, tuple]] = {}
    for comp, model in models.items():
        prefixes = {kohya_prefix(arch, comp)} | ({"lora_te", "lora_te1"} if comp == "text_encoder" else set())
        for key, value in model.state_dict().items():
            if ".lora_" in key or not key.endswith(".weight") or value.ndim not in (2, 4):
                continue
            module = key[: -len(".weight")].replace(".base_layer", "")
            names = {module, _rename(module, sgm)} if comp == "unet" else {te_canonical(module), module}
            for name in names - {None}:
                for prefix in prefixes:
                    index[f"{prefix}_{name.replace('.', '_')}"] = (comp, module, tuple(value.shape))
    return index


def _split_key(key: str, arch: str) -> tuple[str, str] | None:
    """``(flat kohya-style module name, part)`` of one file key; None for keys that are no LoRA part."""
    m = _OLD_PROC.match(key)
    if m:
        head, proj, part = m[1], m[2], m[3]
        comp = "text_encoder_2" if head.startswith("text_encoder_2.") else "text_encoder" if head.startswith(
            "text_encoder.") else "unet"
        leaf = _OLD_TE[proj] if comp != "unet" else ("to_out.0" if proj == "to_out" else proj)
        body = f"{head}.{leaf}"
    else:
        for end, part in _PARTS:
            if key.endswith(end):
                body = key[: -len(end)]
                break
        else:
            return None
        if body.startswith("lora_"):
            return body, part
        comp = "unet"
    for c in COMPONENTS:
        if body.startswith(c + "."):
            comp, body = c, body[len(c) + 1:]
            break
    if comp != "unet":
        body = te_canonical(body)
    return f"{kohya_prefix(arch, comp)}_{body.replace('.', '_')}", part


def lycoris_kind(keys) -> str | None:
    """"LoHa" / "LoKr" for a LyCORIS file the studio loads (as exact LoRAs), else None."""
    if any(k.endswith(".hada_w1_a") for k in keys):
        return "LoHa"
    if any(k.endswith((".lokr_w1", ".lokr_w1_a")) for k in keys):
        return "LoKr"
    return None


def unsupported_format(keys) -> str | None:
    for ends, what in _UNSUPPORTED:
        if any(k.endswith(ends) for k in keys):
            return what
    return None


def _peft_alphas(meta: dict[str, str]) -> dict[str, tuple[float, dict]]:
    """Per component ``(lora_alpha, alpha_pattern)`` from diffusers' adapter metadata (absent: alpha = rank)."""
    try:
        am = json.loads(meta.get(ADAPTER_META_KEY, "") or "{}")
    except json.JSONDecodeError:
        return {}
    if any(k in am for k in ("r", "lora_alpha")):  # one config for a one-component file
        am = {f"unet.{k}": v for k, v in am.items()}
    return {c: (float(am[f"{c}.lora_alpha"]), am.get(f"{c}.alpha_pattern") or {})
            for c in COMPONENTS if f"{c}.lora_alpha" in am}


def _fit(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A linear LoRA factor as a 1x1 conv factor or back (kohya writes SD1.5 ``proj_in`` as conv, diffusers as linear)."""
    if t.ndim == ndim:
        return t
    if ndim == 4 and t.ndim == 2:
        return t[:, :, None, None]
    if ndim == 2 and t.ndim == 4 and t.shape[2:] == (1, 1):
        return t[:, :, 0, 0]
    return t


def _identity_split(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, V)`` with ``U @ V == w`` and the smaller inner size (one of them an identity)."""
    if w.shape[0] <= w.shape[1]:
        return torch.eye(w.shape[0], dtype=w.dtype), w
    return w, torch.eye(w.shape[1], dtype=w.dtype)


def lycoris_as_lora(g: dict[str, torch.Tensor], shape: tuple) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A LoHa or LoKr module as exact LoRA factors ``(down r'×in…, up out×r'…, alpha)`` with ``up @ down · alpha / r'``
    equal to the ΔW LyCORIS and ComfyUI apply (module docstring)."""
    out_f, in_flat = shape[0], math.prod(shape[1:])
    alpha = float(g["alpha"]) if "alpha" in g else None
    f = {k: v.float() for k, v in g.items() if k != "alpha"}
    if "hada_w1_a" in f:  # ΔW = (w1a w1b) ⊙ (w2a w2b) · alpha / r
        a1, b1, a2, b2 = f["hada_w1_a"], f["hada_w1_b"].flatten(1), f["hada_w2_a"], f["hada_w2_b"].flatten(1)
        up = (a1[:, :, None] * a2[:, None, :]).reshape(out_f, -1)
        down = (b1[:, None, :] * b2[None, :, :]).reshape(-1, in_flat)
        scale = alpha / b1.shape[0] if alpha is not None else 1.0
    else:  # ΔW = kron(w1, w2) · alpha / dim, w1 and w2 each whole or factored
        dim = None
        if "lokr_w1" in f:
            u1, v1 = _identity_split(f["lokr_w1"])
        else:
            u1, v1, dim = f["lokr_w1_a"], f["lokr_w1_b"], f["lokr_w1_b"].shape[0]
        if "lokr_w2" in f:
            w2 = f["lokr_w2"]
            u2, v2 = _identity_split(w2.reshape(w2.shape[0], -1))
        else:
            u2, v2, dim = f["lokr_w2_a"], f["lokr_w2_b"].flatten(1), f["lokr_w2_b"].shape[0]
        up, down = torch.kron(u1, u2), torch.kron(v1, v2)
        scale = alpha / dim if alpha is not None and dim is not None else 1.0
    if up.shape != (out_f, up.shape[1]) or down.shape[1] != in_flat:
        raise ValueError(f"factors give {up.shape[0]}x{down.shape[1]}, the layer is {out_f}x{in_flat}")
    if up.shape[1] > min(out_f, in_flat):  # more rank than the layer has: the same ΔW at the layer's full rank
        u, sv, vh = torch.linalg.svd(up @ down, full_matrices=False)
        up, down = u * sv, vh
    rank = up.shape[1]
    down = down.reshape(rank, *shape[1:])
    up = up.reshape(out_f, rank, *([1, 1] if len(shape) == 4 else []))
    return down.contiguous(), up.contiguous(), scale * rank


def normalize(tensors: dict[str, torch.Tensor], meta: dict[str, str], index: dict, arch: str, name: str):
    """Map a LoRA file of any supported spelling onto the layers in ``index``.

    Returns ``({component: {module: (down, up·alpha/rank, magnitude or None)}}, problems)``; ``problems`` lists keys
    with no layer or the wrong size."""
    what = unsupported_format(tensors)
    if what:
        raise LoraFormatError(f"{name} is a {what} file. The studio loads LoRA, LoCon (conv LoRA), DoRA, LoHa and "
                              "LoKr files; convert it to a plain LoRA (e.g. with kohya's extract/resize tools) or use "
                              "another UI.")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    owner: dict[str, str] = {}
    problems: list[str] = []
    for key, value in tensors.items():
        if key.startswith(BUNDLE_PREFIX):  # A1111's bundled token embeddings: studio/embeddings.py loads them
            continue
        split = _split_key(key, arch)
        if split is None:
            problems.append(key)
            continue
        groups.setdefault(split[0], {})[split[1]] = value
        owner.setdefault(split[0], key)
    peft_alphas = _peft_alphas(meta)
    out: dict[str, dict[str, tuple]] = {}
    for flat, g in groups.items():
        hit = index.get(flat)
        if hit is not None and any(k in g for k in _LYCORIS):
            if "dora" in g:
                raise LoraFormatError(f"{name} is a LoHa/LoKr file with weight decomposition (DoRA, {owner[flat]}); "
                                      "only plain LoHa/LoKr and LoRA/DoRA files can be loaded.")
            try:
                g["down"], g["up"], g["alpha"] = lycoris_as_lora(g, hit[2])
            except (KeyError, ValueError, RuntimeError):
                problems.append(owner[flat])
                continue
        if hit is None or "down" not in g or "up" not in g:
            problems.append(owner[flat])
            continue
        comp, module, shape = hit
        down, up = _fit(g["down"], len(shape)), _fit(g["up"], len(shape))
        rank = down.shape[0]
        if up.shape[:2] != (shape[0], rank) or down.shape[1:] != shape[1:]:
            problems.append(owner[flat])
            continue
        if "alpha" in g:
            alpha = float(g["alpha"])
        elif comp in peft_alphas:
            default, pattern = peft_alphas[comp]
            alpha = next((float(v) for k, v in pattern.items() if module == k or module.endswith("." + k)), default)
        else:
            alpha = rank  # kohya: no alpha means alpha = rank; diffusers without metadata: scale 1
        mag = g.get("dora")
        if mag is not None:
            if mag.numel() != shape[0]:
                raise LoraFormatError(f"{name} is a DoRA file with the magnitude per input column ({owner[flat]}); only "
                                      "the per-output magnitude that PEFT uses can be loaded.")
            mag = mag.reshape(shape[0]) if len(shape) == 2 else mag.reshape(1, shape[0], 1, 1)  # PEFT's layouts
        scaled = (up.float() * (alpha / rank)).to(up.dtype if up.is_floating_point() else torch.float32)
        out.setdefault(comp, {})[module] = (down, scaled, mag)
    return out, problems


def peft_state_from(tensors: dict[str, torch.Tensor], meta: dict[str, str], models: dict, arch: str,
                    name: str) -> dict[str, torch.Tensor]:
    """A LoRA file's tensors as one diffusers/PEFT state dict for ``models`` (keys ``unet.<module>.lora_A.weight``…),
    alpha folded in (scale 1), or ``LoraFormatError`` naming what does not fit."""
    layers, problems = normalize(tensors, meta, name_index(models, arch), arch, name)
    if problems or not layers:
        raise LoraFormatError(
            f"{name} does not fit the loaded {ARCH_NAMES.get(arch, arch)} model: {len(problems)} of {len(tensors)} "
            f"tensors have no matching layer or the wrong size (e.g. {(problems or list(tensors) or ['-'])[0]}). It was "
            "probably trained for another base model (or another model size).")
    state = {}
    for comp, mods in layers.items():
        for module, (down, up, mag) in mods.items():
            state[f"{comp}.{module}.lora_A.weight"] = down
            state[f"{comp}.{module}.lora_B.weight"] = up
            if mag is not None:
                state[f"{comp}.{module}.lora_magnitude_vector"] = mag
    return state


ARCH_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL"}


# ------------------------------------------------------------------------------------------------------- compatibility
def check_compatible(pipe, path: Path) -> dict:
    """Raise ``LoraFormatError`` unless the LoRA at ``path`` fits ``pipe``; return its ``inspect`` summary.

    Names are mapped with the pipeline's own UNet config (SGM and diffusers names, either CLIP layout) before any
    layer is judged missing."""
    from .models import architecture

    info = inspect(path)
    arch = architecture(pipe)
    if info["architecture"] and info["architecture"] != arch:
        raise LoraFormatError(
            f"{Path(path).name} was trained for {ARCH_NAMES.get(info['architecture'], info['architecture'])} but the "
            f"loaded model is {ARCH_NAMES[arch]}: pick a LoRA made for this base (or switch the base model)."
        )
    tensors, meta = read_tensors(path)
    peft_state_from(tensors, meta, lora_models(pipe), arch, Path(path).name)
    return info


def peft_state(pipe, path: Path) -> dict[str, torch.Tensor]:
    """The LoRA at ``path`` as a diffusers/PEFT state dict that fits ``pipe`` exactly (per-module alpha folded in)."""
    from .models import architecture

    tensors, meta = read_tensors(path)
    return peft_state_from(tensors, meta, lora_models(pipe), architecture(pipe), Path(path).name)


def load_lora(pipe, path: Path, adapter_name: str) -> None:
    """Attach the LoRA at ``path`` to ``pipe`` as PEFT adapter ``adapter_name`` through diffusers' loader."""
    state = peft_state(pipe, path)
    try:
        pipe.load_lora_weights(state, adapter_name=adapter_name)
    except Exception as exc:  # noqa: BLE001 - diffusers raises many types for malformed files
        raise LoraFormatError(f"Could not load {Path(path).name} as a LoRA: {exc}") from exc


# ------------------------------------------------------------------------------------------------------------ kohya
_RESNET_LEAF = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
                "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def sgm_block_name(module: str, layers_per_block) -> str:
    """Map a diffusers UNet module path to Stability's SGM naming (SDXL kohya files) from ``layers_per_block`` alone
    (one int, or one per down block; up blocks mirror it with one layer more). ``unet_module_map`` in
    ``studio/checkpoint.py`` maps every layer from the full config; this covers attentions and ResNets."""
    def offset(i: int, counts) -> int:  # first SGM index of block i
        return sum(c + 1 for c in counts[:i])

    def leaf(kind: str, rest: str) -> str:
        if kind == "attentions":
            return rest
        head, _, tail = rest.partition(".")
        if head not in _RESNET_LEAF:
            raise LoraFormatError(f"No kohya/SGM name for UNet module {module!r}.")
        return ".".join(filter(None, (_RESNET_LEAF[head], tail)))

    m = re.match(r"down_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.*)", module)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        counts = [layers_per_block] * (i + 1) if isinstance(layers_per_block, int) else list(layers_per_block)
        return f"input_blocks.{1 + offset(i, counts) + j}.{1 if kind == 'attentions' else 0}.{leaf(kind, rest)}"
    m = re.match(r"up_blocks\.(\d+)\.(attentions|resnets)\.(\d+)\.(.*)", module)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        counts = [layers_per_block] * (i + 1) if isinstance(layers_per_block, int) else list(reversed(layers_per_block))
        return f"output_blocks.{offset(i, counts) + j}.{1 if kind == 'attentions' else 0}.{leaf(kind, rest)}"
    m = re.match(r"mid_block\.(attentions|resnets)\.(\d+)\.(.*)", module)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        return f"middle_block.{1 if kind == 'attentions' else 2 * j}.{leaf(kind, rest)}"
    raise LoraFormatError(f"No kohya/SGM name for UNet module {module!r}.")


def unnamed_targets(pipe, targets) -> list[str]:
    """UNet modules that ``targets`` (PEFT ``target_modules``) would pick and that have no kohya/A1111/ComfyUI name:
    checked before training, so no run finishes with a LoRA that cannot be exported."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft import LoraConfig

    from .models import architecture

    arch = architecture(pipe)
    sgm = _sgm_table(pipe.unet.config)
    cfg = LoraConfig(target_modules=list(targets))
    missing = []
    for name, module in pipe.unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and ".lora_" not in name and "base_layer" not in name \
                and check_target_module_exists(cfg, name) and kohya_module_name("unet", name, arch, sgm) is None:
            missing.append(name)
    return missing


def to_kohya(components: dict[str, dict[str, torch.Tensor]], arch: str, alpha: float, rank: int,
             layers_per_block) -> dict[str, torch.Tensor]:
    """Convert per-component PEFT states to a kohya/A1111/ComfyUI state dict (``lora_down``/``lora_up``/``alpha``).

    ``layers_per_block``: the UNet config (a mapping: every layer gets its SGM name) or just its
    ``layers_per_block`` (attentions and ResNets only)."""
    from collections.abc import Mapping

    sgm = _sgm_table(layers_per_block) if isinstance(layers_per_block, Mapping) else None
    out: dict[str, torch.Tensor] = {}
    for comp, state in components.items():
        for module in modules_of(state):
            plain = module.replace(".base_layer", "")
            if comp == "unet" and arch == "sdxl" and sgm is None:
                prefix = "lora_unet_" + sgm_block_name(plain, layers_per_block).replace(".", "_")
            else:
                prefix = kohya_module_name(comp, plain, arch, sgm)
                if prefix is None:
                    raise LoraFormatError(f"No kohya/SGM name for UNet module {plain!r}: A1111, ComfyUI and kohya "
                                          "could not load it.")
            down, up = state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"]
            out[f"{prefix}.lora_down.weight"] = down
            out[f"{prefix}.lora_up.weight"] = up
            out[f"{prefix}.alpha"] = torch.tensor(float(alpha * down.shape[0] / rank))
    return out


def modelspec_hash(tensors: dict[str, torch.Tensor]) -> str:
    """``modelspec.hash_sha256`` as kohya sd-scripts computes it: SHA-256 over every tensor's bytes in order."""
    from safetensors.torch import save

    h = hashlib.sha256()
    for t in tensors.values():
        data = save({"tensor": t.detach().to("cpu").contiguous()})
        h.update(data[8 + int.from_bytes(data[:8], "little"):])
    return f"0x{h.hexdigest()}"


def addnet_hashes(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> tuple[str, str]:
    """``sshs_model_hash`` / ``sshs_legacy_hash`` (sd-webui-additional-networks): SHA-256 of the data section of the
    file as written with only its ``ss_*`` metadata, and of 64 KiB at 1 MiB into it (first 8 hex digits)."""
    from safetensors.torch import save

    data = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                {k: v for k, v in meta.items() if k.startswith("ss_")})
    body = data[8 + int.from_bytes(data[:8], "little"):]
    return hashlib.sha256(body).hexdigest(), hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def tag_frequency(captions: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency``: per dataset folder, how often each comma-separated, lower-cased tag occurs."""
    out: dict[str, dict[str, int]] = {}
    for folder, texts in captions.items():
        freq = out.setdefault(folder, {})
        for text in texts:
            for tag in (t.strip().lower() for t in text.split(",")):
                if tag:
                    freq[tag] = freq.get(tag, 0) + 1
    return out


def kohya_metadata(meta: dict[str, str], tensors: dict[str, torch.Tensor] | None = None) -> dict[str, str]:
    """kohya ``ss_*`` keys next to the ModelSpec keys, so A1111/ComfyUI cards show what the LoRA is. With ``tensors``
    the ModelSpec and additional-networks hashes are added as kohya writes them."""
    out = {k: v for k, v in meta.items() if k != ADAPTER_META_KEY}
    arch = meta.get("studio.base_arch", "")
    res = re.fullmatch(r"(\d+)x(\d+)", meta.get("modelspec.resolution", ""))
    out.update({
        "ss_network_module": "networks.lora",
        "ss_network_dim": meta.get("studio.rank", ""),
        "ss_network_alpha": meta.get("studio.alpha", ""),
        "ss_base_model_version": "sdxl_base_v1-0" if arch == "sdxl" else "sd_v1",
        "ss_output_name": meta.get("modelspec.title", ""),
        "ss_resolution": f"({res[1]}, {res[2]})" if res else "",
        "ss_max_train_steps": meta.get("studio.steps", ""),
        "ss_sd_model_name": meta.get("studio.base_model", ""),
        "ss_training_comment": meta.get("modelspec.trigger_phrase", ""),
        # what kohya writes for the same architecture (sai_model_spec.determine_implementation)
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if arch == "sdxl" else "diffusers",
    })
    if meta.get("studio.tag_frequency"):
        out["ss_tag_frequency"] = meta["studio.tag_frequency"]
    if tensors is not None:
        out["modelspec.hash_sha256"] = modelspec_hash(tensors)
        out["sshs_model_hash"], out["sshs_legacy_hash"] = addnet_hashes(tensors, out)
    return out


def a1111_sidecar(meta: dict[str, str]) -> dict:
    """The ``<name>.json`` that A1111's Lora tab reads beside a LoRA file (activation text, weight, base)."""
    arch = meta.get("studio.base_arch", "")
    return {
        "description": meta.get("modelspec.description", "") or
        f"{meta.get('studio.method', 'LoRA')} LoRA made with Customization Studio ({meta.get('studio.steps', '?')} steps)",
        "sd version": {"sdxl": "SDXL", "sd15": "SD1"}.get(arch, "Unknown"),
        "activation text": meta.get("modelspec.trigger_phrase", ""),
        "preferred weight": float(meta.get("studio.recommended_weight", "1") or 1),
        "notes": meta.get("studio.base_model", ""),
    }


def write_kohya_export(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    """Write a kohya-format file (atomically, umask permissions) and its A1111 sidecar ``<name>.json`` beside it."""
    path = Path(path)
    atomic_save_safetensors(path, tensors, kohya_metadata(meta, tensors))
    atomic_write_json(path.with_name(path.name[: -len(".safetensors")] + ".json"), a1111_sidecar(meta))
    return path


# ------------------------------------------------------------------------------------------------------- conversion
def _config_candidates(meta: dict[str, str], arch: str) -> list[Path]:
    """Model folders whose configs may name a file's layers: its own base model, the standard one, the bundled ones."""
    from .models import ASSETS

    out = []
    base = meta.get("studio.base_model", "")
    if base and (ASSETS / base / "unet" / "config.json").is_file():
        out.append(ASSETS / base)
    elif base and (Path(base).expanduser() / "unet" / "config.json").is_file():
        out.append(Path(base).expanduser())
    out.append(ASSETS / "configs" / arch)
    out += [ASSETS / n for n in (("tiny-sdxl", "toy-xl") if arch == "sdxl" else ("tiny-sd",))]
    return out


def meta_models(folder: Path, arch: str) -> dict:
    """The UNet and text encoders of a model folder built on the meta device (names and shapes, no weights)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        models = {"unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
                  "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))}
        if arch == "sdxl":
            models["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
    return models


def _fitting_models(tensors, meta, arch: str, name: str):
    last = None
    for folder in _config_candidates(meta, arch):
        models = meta_models(folder, arch)
        try:
            return models, peft_state_from(tensors, meta, models, arch, name), folder
        except LoraFormatError as exc:
            if "is a " in str(exc):  # an unsupported format: no other config helps
                raise
            last = exc
    raise last


def convert(src: Path, dst: Path, to: str, layers_per_block: int | None = None) -> Path:
    """Convert a LoRA between diffusers and kohya format (``studio lora convert``); a LoHa/LoKr file becomes a plain
    LoRA with the same ΔW in either format.

    ``--to diffusers`` reads every spelling ``load_lora`` reads; layers are named with the configs of the file's base
    model (its ``studio.base_model``), the standard SD1.5/SDXL configs or the bundled models, whichever fits all keys.
    """
    tensors, meta = read_tensors(src)
    fmt = detect_format(list(tensors))
    name = Path(src).name
    if to not in ("diffusers", "kohya"):
        raise LoraFormatError(f"Unknown target format {to!r}: use 'diffusers' or 'kohya'.")
    if fmt == "unknown":
        raise LoraFormatError(f"{name} holds no LoRA weights (no lora_A/lora_B or lora_down/lora_up keys).")
    if to == fmt and to == "kohya" and not lycoris_kind(tensors):  # LoHa/LoKr -> a plain kohya LoRA is a conversion
        raise LoraFormatError(f"{name} is already in {to} format.")
    arch = detect_arch(list(tensors), meta) or "sd15"
    models, state, folder = _fitting_models(tensors, meta, arch, name)
    from . import embeddings

    vectors = embeddings.carried(tensors, meta, name)  # pivotal tuning's token embeddings travel with the LoRA
    components: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        comp, _, rest = key.partition(".")
        components.setdefault(comp, {})[rest] = value
    ranks = [v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight")]
    rank = int(meta.get("studio.rank", 0) or 0) or max(ranks)
    # alpha is folded into lora_B: the written file has scale 1 for every module (alpha = each module's rank)
    if to == "kohya":
        out = to_kohya(components, arch, float(rank), rank, models["unet"].config)
        for token, vecs in vectors.items():
            out.update(embeddings.bundle(token, vecs, arch))
        keep = {k: v for k, v in meta.items() if k != ADAPTER_META_KEY}
        keep.update({"studio.base_arch": arch, "studio.alpha": str(rank), "studio.rank": str(rank)})
        keep.setdefault("modelspec.title", Path(dst).stem)
        return write_kohya_export(Path(dst), out, keep)
    new_meta = build_metadata(arch=arch, method=meta.get("studio.method", "imported"), name=Path(dst).stem,
                              rank=rank, alpha=float(rank), components=components)
    kept = {k: v for k, v in meta.items() if k.startswith(("studio.", "modelspec.")) and k not in new_meta}
    kept.setdefault("studio.base_model", folder.name if folder.parent.name == "assets" else "")
    if vectors:
        kept[embeddings.META_KEY] = embeddings.to_header(vectors)
    return save_lora(Path(dst), components, {**kept, **new_meta, "studio.alpha": str(rank)})
