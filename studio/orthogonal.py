"""Orthogonal adaptation: shared orthonormal bases, slot allocation, merging and crosstalk measurement.

Paper: Po, Yang, Aberman, Wetzstein, "Orthogonal Adaptation for Modular Customization of Diffusion Models",
CVPR 2024 (arXiv 2312.02432). Each concept's residual is ΔW_i = A_i B_iᵀ where the input-side (down) projection
B_i is *frozen* to r columns of one orthonormal m×m matrix O_m shared by everybody, and only A_i trains. If
B_iᵀB_j = 0, concept j's residual is blind to concept i's inputs (ΔW_j B_i = 0), so residuals can be summed
("FedAvg" with λ, 0.6 in the paper) with no crosstalk.

Names: the paper's frozen B is the LoRA **down**-projection, i.e. PEFT's ``lora_A`` (shape r×m, rows = basis
columnsᵀ); the trained A is PEFT's ``lora_B`` (out×r, starts at zero).

What this module provides:

* ``shared_basis(m, seed)``: O_m from a CPU ``torch.Generator`` in float64 (scalar, CPU-independent sampling), QR,
  signs fixed so that diag(R) > 0; cached per (seed, m). ``basis_checksum`` hashes the first columns rounded to
  1e-5, so tiny LAPACK differences between machines cannot change it.
* Slot allocation: the studio knows every orthogonal concept in its workspace, so instead of the paper's
  independent random k-of-m column subsets (``slot_mode="random"``, still available) it assigns **disjoint**
  column slots [s·r, (s+1)·r) per base model and basis seed (``slot_mode="disjoint"``, the default): exact
  B_iᵀB_j = 0, capacity ⌊m_min/r⌋ concepts (m_min: the smallest adapted input width).
* ``merge_loras``: θ + Σ λ_i ΔW_i written as ONE LoRA file whose rank is the sum of the members' ranks (down
  rows stacked, up columns concatenated and scaled by λ_i and each member's alpha/r, alpha = rank so the file's
  scale is 1): the merge is exact. ``fuse_into_pipeline`` adds the same ΔW into a pipeline's base weights.
  Orthogonal members must share base model, basis seed, widths and basis checksum, otherwise the merge is refused
  with the reason; ordinary LoRAs can be merged too, with a warning that they may interfere.
* ``crosstalk``: per layer, the overlap of the down-projections max|Â_i Â_jᵀ| (rows normalised to unit length;
  for orthogonal files this is the paper's max|B_iᵀB_j|) and the measured output interference
  ‖ΔW_j X_i‖ / ‖ΔW_i X_i‖ on probe inputs X_i drawn from concept i's down-projection row space.

Deviations from the paper: disjoint slots instead of random subsets by default (exact orthogonality; the paper's
sampling is ``slot_mode="random"``); merging writes a concatenated-rank LoRA file (mathematically identical to
summing the residuals) rather than only fusing weights; the paper's ED-LoRA layer-wise token embeddings and
regionally controlled sampling are not part of this module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from . import embeddings, lora_io
from .errors import InputError, LoraFormatError

log = logging.getLogger(__name__)

DEFAULT_BASIS_SEED = 0
DEFAULT_LAMBDA = 0.6
SLOT_MODES = ("disjoint", "random")
ORTHO_METHODS = ("orthogonal", "orthogonal-merge")
# the paper adapts "all linear layers": every nn.Linear of the UNet's attention (transformer) blocks
ALL_LINEARS = "to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2,proj_in,proj_out"
_CHECK_COLS = 8


class MergeRefusedError(InputError):
    """Two LoRAs that cannot be merged (different base, basis seed, widths or architecture)."""


# ------------------------------------------------------------------------------------------------------------ bases
def _stream_seed(seed: int, m: int) -> int:
    return (int(seed) * 1_000_003 + int(m) * 7_919 + 0x5EED) % (2**63)


@lru_cache(maxsize=8)
def _basis(seed: int, m: int) -> tuple[torch.Tensor, str]:
    g = torch.Generator("cpu").manual_seed(_stream_seed(seed, m))
    x = torch.randn(m, m, generator=g, dtype=torch.float64)  # float64 sampling is scalar code: same on every CPU
    q, r = torch.linalg.qr(x)
    d = torch.sign(torch.diagonal(r))
    d[d == 0] = 1.0
    q = q * d  # unique QR: diag(R) > 0
    head = torch.round(q[:, : min(m, _CHECK_COLS)] * 1e5).to(torch.int64).contiguous()
    checksum = hashlib.sha256(head.numpy().tobytes() + f"{m}".encode()).hexdigest()[:12]
    return q.to(torch.float32).contiguous(), checksum


def shared_basis(m: int, seed: int = DEFAULT_BASIS_SEED) -> torch.Tensor:
    """The shared orthonormal m×m matrix O_m for ``seed`` (float32, columns orthonormal). Do not modify in place."""
    if m < 1:
        raise InputError(f"basis width must be positive (got {m}).")
    return _basis(int(seed), int(m))[0]


def basis_checksum(m: int, seed: int = DEFAULT_BASIS_SEED) -> str:
    """Short hex checksum of O_m (first columns rounded to 1e-5): equal on every machine for the same seed."""
    return _basis(int(seed), int(m))[1]


def slot_columns(slot: int, rank: int) -> list[int]:
    return list(range(slot * rank, (slot + 1) * rank))


def random_columns(m: int, rank: int, seed: int) -> list[int]:
    """The paper's sampling: an independent random subset of ``rank`` of the ``m`` columns."""
    g = torch.Generator("cpu").manual_seed(_stream_seed(seed, m) ^ 0x0A11CE)
    return sorted(torch.randperm(m, generator=g)[:rank].tolist())


def down_projection(m: int, columns: list[int], seed: int = DEFAULT_BASIS_SEED) -> torch.Tensor:
    """PEFT ``lora_A.weight`` (r×m) for these basis columns: rows are the columns of O_m, transposed."""
    return shared_basis(m, seed)[:, columns].T.contiguous()


# ------------------------------------------------------------------------------------------------------------ slots
@dataclass
class SlotPlan:
    """Which basis columns a concept uses. ``slot`` is -1 in random mode (then ``columns`` holds them per width)."""

    basis_seed: int
    rank: int
    slot_mode: str
    slot: int
    widths: list[int]
    capacity: int
    columns: dict[int, list[int]] = field(default_factory=dict)
    taken: list[dict] = field(default_factory=list)  # other concepts of this base and seed: name, slot, rank

    def cols(self, m: int) -> list[int]:
        if self.slot_mode == "random":
            return self.columns[m]
        return slot_columns(self.slot, self.rank)

    @property
    def free(self) -> int:
        return max(0, self.capacity - len(self.taken) - 1)

    def message(self) -> str:
        if self.slot_mode == "random":
            exp = self.rank * self.rank / min(self.widths)
            return (f"orthogonal basis seed {self.basis_seed}: random columns (paper's sampling); expected shared columns "
                    f"with another concept ≈ {exp:.2f} at width {min(self.widths)}")
        return (f"orthogonal slot {self.slot} of {self.capacity} (rank {self.rank}, smallest width {min(self.widths)}, "
                f"basis seed {self.basis_seed}); {len(self.taken)} other concept(s) of this base use slots, "
                f"{self.free} free after this one")

    def metadata(self) -> dict[str, str]:
        return {
            "studio.basis_seed": str(self.basis_seed),
            "studio.basis_checksum": json.dumps({str(m): basis_checksum(m, self.basis_seed) for m in self.widths}, sort_keys=True),
            "studio.basis_widths": json.dumps(self.widths),
            "studio.slot": str(self.slot),
            "studio.slot_mode": self.slot_mode,
            "studio.slot_capacity": str(self.capacity),
            **({"studio.columns": json.dumps({str(m): c for m, c in self.columns.items()}, sort_keys=True)}
               if self.slot_mode == "random" else {}),
        }


def _member_columns(info: dict, columns: dict | None) -> tuple[dict[int, set[int]] | None, set[int] | None, dict]:
    if info["slot_mode"] == "random":
        return {int(m): set(c) for m, c in (columns or {}).items()}, None, info
    return None, set(slot_columns(info["slot"], info["rank"])), info


def _concept_columns(meta: dict[str, str]) -> list[tuple[dict[int, set[int]] | None, set[int] | None, dict]]:
    """Columns a library file occupies: (per-width sets or None, width-independent set or None, member info)."""
    if meta.get("studio.method") == "orthogonal-merge":
        out = []
        stack = list(json.loads(meta.get("studio.members", "[]")))
        while stack:
            m = stack.pop(0)
            stack += m.get("members", [])  # members of merged members
            info = {"name": m.get("name", ""), "slot": int(m.get("slot", -1)), "rank": int(m.get("rank", 0)),
                    "slot_mode": m.get("slot_mode", "disjoint")}
            if info["slot_mode"] == "random" or info["slot"] >= 0:
                out.append(_member_columns(info, m.get("columns")))
        return out
    info = {"name": meta.get("modelspec.title", ""), "slot": int(meta.get("studio.slot", "-1")),
            "rank": int(meta.get("studio.rank", "0") or 0), "slot_mode": meta.get("studio.slot_mode", "disjoint")}
    if info["slot_mode"] != "random" and info["slot"] < 0:
        return []
    return [_member_columns(info, json.loads(meta.get("studio.columns", "{}") or "{}"))]


def orthogonal_concepts(ws, base_model: str, basis_seed: int, exclude: str = "") -> list[dict]:
    """Orthogonal LoRAs (and orthogonal merges) in the workspace for this base model and basis seed."""
    out = []
    for card in ws.list_loras():
        if card.get("error") or card.get("method") not in ORTHO_METHODS or card["name"] == exclude:
            continue
        _, meta = lora_io.read_header(Path(card["file"]))
        if meta.get("studio.base_model") != base_model or meta.get("studio.basis_seed") != str(basis_seed):
            continue
        for per_width, flat, info in _concept_columns(meta):
            out.append({**info, "file": card["file"], "library_name": card["name"], "per_width": per_width, "flat": flat})
    return out


def plan_slot(ws, *, base_model: str, basis_seed: int, rank: int, widths: list[int], slot_mode: str = "disjoint",
              slot: int = -1, name: str = "", seed: int = 0) -> SlotPlan:
    """Choose the concept's basis columns. Disjoint mode: the first slot no other concept of this base uses."""
    if slot_mode not in SLOT_MODES:
        raise InputError(f"slot_mode must be one of {', '.join(SLOT_MODES)} (got {slot_mode!r}).")
    widths = sorted({int(m) for m in widths})
    if not widths:
        raise InputError("No LoRA layers to make orthogonal.")
    m_min = widths[0]
    if rank > m_min:
        raise InputError(f"rank {rank} is larger than the smallest adapted layer width {m_min}: lower the rank.")
    capacity = m_min // rank
    taken = orthogonal_concepts(ws, base_model, basis_seed, exclude=name) if ws is not None else []
    if slot_mode == "random":
        key = int(hashlib.sha256(f"{name}|{seed}|{basis_seed}".encode()).hexdigest()[:12], 16)
        columns = {m: random_columns(m, rank, key) for m in widths}
        return SlotPlan(basis_seed, rank, "random", -1, widths, capacity, columns, _public(taken))

    def collides(s: int) -> list[str]:
        cols = set(slot_columns(s, rank))
        hit = []
        for t in taken:
            if t["flat"] is not None and cols & t["flat"]:
                hit.append(t["name"] or t["library_name"])
            elif t["per_width"] is not None and any(cols & t["per_width"].get(m, set()) for m in widths):
                hit.append(t["name"] or t["library_name"])
        return hit

    if slot >= 0:
        if slot >= capacity:
            raise InputError(f"slot {slot} does not exist: with rank {rank} and smallest width {m_min} there are "
                             f"{capacity} slots (0..{capacity - 1}).")
        hit = collides(slot)
        if hit:
            raise InputError(f"slot {slot} is already used by {', '.join(hit)} (same base and basis seed): concepts in "
                             "the same slot interfere when merged. Use slot -1 (automatic) or another slot.")
        return SlotPlan(basis_seed, rank, "disjoint", slot, widths, capacity, {}, _public(taken))
    for s in range(capacity):
        if not collides(s):
            return SlotPlan(basis_seed, rank, "disjoint", s, widths, capacity, {}, _public(taken))
    names = sorted({t["name"] or t["library_name"] for t in taken})
    raise InputError(f"All {capacity} orthogonal slots for {base_model} (rank {rank}, basis seed {basis_seed}) are used by: "
                     f"{', '.join(names)}. Delete one of them, lower the rank, use another basis seed (it will not merge "
                     "with these) or slot_mode random.")


def _public(taken: list[dict]) -> list[dict]:
    return [{k: t[k] for k in ("name", "library_name", "slot", "rank", "slot_mode")} for t in taken]


def target_widths(pipe, targets: list[str], text_encoder: bool = False) -> list[int]:
    """Input widths of the linear layers a recipe would adapt (UNet ``targets``; text-encoder attention if asked)."""
    widths = set()
    for comp in ("unet", "text_encoder", "text_encoder_2") if text_encoder else ("unet",):
        model = getattr(pipe, comp, None)
        names = targets if comp == "unet" else ["q_proj", "k_proj", "v_proj", "out_proj"]
        if model is None:
            continue
        for n, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and any(n == t or n.endswith("." + t) for t in names):
                widths.add(mod.in_features)
    return sorted(widths)


def slot_status(ws, pipe, *, rank: int = 20, basis_seed: int = DEFAULT_BASIS_SEED,
                targets: str = ALL_LINEARS, text_encoder: bool = False) -> SlotPlan:
    """For the UI before training: the slot the next orthogonal concept would get, the capacity and who is where."""
    widths = target_widths(pipe, [t.strip() for t in targets.split(",") if t.strip()], text_encoder)
    return plan_slot(ws, base_model=getattr(pipe, "studio_ref", ""), basis_seed=basis_seed, rank=rank, widths=widths)


def capacity(widths: list[int], rank: int) -> int:
    """How many disjoint rank-``rank`` concepts fit: ⌊m_min / r⌋."""
    return min(widths) // rank if widths and rank > 0 else 0


def lora_layers(pipe, components=("unet", "text_encoder", "text_encoder_2"), adapter: str = "default") -> dict[str, object]:
    """PEFT LoRA layers of ``adapter`` per ``component.module`` path."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for comp in components:
        model = getattr(pipe, comp, None)
        if model is None:
            continue
        for n, mod in model.named_modules():
            if isinstance(mod, LoraLayer) and adapter in getattr(mod, "lora_A", {}):
                out[f"{comp}.{n}"] = mod
    return out


@torch.no_grad()
def apply_basis(layers: dict[str, object], plan: SlotPlan, adapter: str = "default") -> None:
    """Set every layer's ``lora_A`` to the plan's basis rows (float32) and freeze it; ``lora_B`` stays trainable."""
    for mod in layers.values():
        w = mod.lora_A[adapter].weight
        m = w.shape[1]
        w.data = down_projection(m, plan.cols(m), plan.basis_seed).to(w.device)
        w.requires_grad_(False)


@torch.no_grad()
def basis_deviation(layers: dict[str, object], plan: SlotPlan, adapter: str = "default") -> float:
    """max |lora_A − expected basis rows| over layers (0 when the frozen down-projections are intact)."""
    dev = 0.0
    for mod in layers.values():
        w = mod.lora_A[adapter].weight
        ref = down_projection(w.shape[1], plan.cols(w.shape[1]), plan.basis_seed)
        dev = max(dev, (w.detach().float().cpu() - ref).abs().max().item())
    return dev


# ------------------------------------------------------------------------------------------------------------ files
@dataclass
class LoraFile:
    """A diffusers-format LoRA file: per ``component.module`` the down (r×m), up (n×r) and PEFT scale alpha/r."""

    path: Path
    name: str
    meta: dict[str, str]
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    arch: str | None

    @property
    def orthogonal(self) -> bool:
        return self.meta.get("studio.method") in ORTHO_METHODS

    @property
    def checksums(self) -> dict[str, str]:
        return json.loads(self.meta.get("studio.basis_checksum", "{}") or "{}")

    def delta(self, key: str) -> torch.Tensor:
        a, b, s = self.layers[key]
        return s * (b @ a)


def load_lora_file(path) -> LoraFile:
    path = Path(path)
    tensors, meta = lora_io.read_tensors(path)
    fmt = lora_io.detect_format(list(tensors))
    if fmt == "kohya":
        raise LoraFormatError(f"{path.name} is in kohya format: convert it first with "
                              f"`studio lora convert {path} OUT.safetensors --to diffusers`.")
    if not any(".lora_A." in k for k in tensors):
        raise LoraFormatError(f"{path.name} holds no PEFT LoRA weights (lora_A/lora_B).")
    try:
        adapter_meta = json.loads(meta.get(lora_io.ADAPTER_META_KEY, "{}") or "{}")
    except json.JSONDecodeError:
        adapter_meta = {}
    layers = {}
    for k, a in tensors.items():
        if not k.endswith(".lora_A.weight"):
            continue
        key = k[: -len(".lora_A.weight")]
        b = tensors.get(f"{key}.lora_B.weight")
        if b is None:
            raise LoraFormatError(f"{path.name}: {key} has a lora_A but no lora_B weight.")
        comp = key.split(".", 1)[0]
        r = adapter_meta.get(f"{comp}.r")
        alpha = adapter_meta.get(f"{comp}.lora_alpha")
        scale = float(alpha) / float(r) if r and alpha is not None else 1.0
        layers[key] = (a.float(), b.float(), scale)
    arch = lora_io.detect_arch(list(tensors), meta)
    return LoraFile(path, meta.get("modelspec.title") or path.stem, meta, layers, arch)


def _orth_widths(f: LoraFile) -> dict[str, int]:
    return {k: a.shape[1] for k, (a, _, _) in f.layers.items()}


def check_mergeable(files: list[LoraFile]) -> tuple[bool, list[str]]:
    """(all orthogonal?, warnings). Raises ``MergeRefusedError`` with the reason when the files cannot be merged."""
    if len(files) < 2:
        raise InputError("Pick at least two LoRAs to merge.")
    warnings: list[str] = []
    owner: dict[str, str] = {}
    for f in files:  # a merged file calls each concept by its trigger: two concepts with one trigger would be one
        for t in (f.meta.get("modelspec.trigger_phrase", "") or "").split(","):
            key = t.strip().lower()
            if key and key in owner:
                raise MergeRefusedError(f"{owner[key]} and {f.name} use the same trigger {t.strip()!r}: after the merge "
                                        "neither could be called on its own. Retrain one of them with its own trigger.")
            if key:
                owner[key] = f.name
    archs = {f.arch for f in files if f.arch}
    if len(archs) > 1:
        raise MergeRefusedError("These LoRAs are for different base architectures (" + ", ".join(
            f"{f.name}: {f.arch}" for f in files) + "): they cannot be merged.")
    shapes: dict[str, tuple[str, int, int]] = {}
    for f in files:
        for k, (a, b, _) in f.layers.items():
            m, n = a.shape[1], b.shape[0]
            if k in shapes and shapes[k][1:] != (m, n):
                other = shapes[k][0]
                raise MergeRefusedError(f"{f.name} and {other} have different widths at {k} ({m}→{n} vs "
                                        f"{shapes[k][1]}→{shapes[k][2]}): they were trained on different base models.")
            shapes.setdefault(k, (f.name, m, n))
    ortho = [f for f in files if f.orthogonal]
    if ortho:
        first = ortho[0]
        for f in ortho[1:]:
            for key, label in (("studio.base_model", "base model"), ("studio.basis_seed", "basis seed")):
                if f.meta.get(key) != first.meta.get(key):
                    raise MergeRefusedError(
                        f"{first.name} and {f.name} were trained with different {label}s ({first.meta.get(key)!r} vs "
                        f"{f.meta.get(key)!r}): their frozen down-projections come from different orthonormal bases, so "
                        f"they are not orthogonal to each other. Retrain one with the other's {label}.")
            for m, c in f.checksums.items():
                if m in first.checksums and first.checksums[m] != c:
                    raise MergeRefusedError(
                        f"{first.name} and {f.name} use different orthonormal bases at width {m} (checksum {first.checksums[m]} "
                        f"vs {c}): they were made by incompatible versions of the basis generator.")
        common = set(_orth_widths(first).values())
        for f in ortho[1:]:
            ws_ = set(_orth_widths(f).values())
            if not (ws_ & common):
                raise MergeRefusedError(f"{first.name} and {f.name} adapt layers of different widths "
                                        f"({sorted(common)} vs {sorted(ws_)}): they cannot be merged.")
    plain = [f.name for f in files if not f.orthogonal]
    if plain:
        warnings.append(f"{', '.join(plain)} {'is' if len(plain) == 1 else 'are'} not orthogonal: merged concepts may "
                        "interfere (check `studio lora crosstalk`).")
    for i, fi in enumerate(ortho):
        for fj in ortho[i + 1:]:
            ov = max((_overlap(fi.layers[k][0], fj.layers[k][0]) for k in fi.layers.keys() & fj.layers.keys()), default=0.0)
            if ov > 1e-3:
                warnings.append(f"{fi.name} and {fj.name} share basis columns (max overlap {ov:.3f}): they will interfere "
                                "where they overlap.")
    return len(ortho) == len(files), warnings


def _overlap(a_i: torch.Tensor, a_j: torch.Tensor) -> float:
    """max |cos| between down-projection rows (= max|B_iᵀB_j| for orthonormal rows)."""
    ni = a_i / a_i.norm(dim=1, keepdim=True).clamp_min(1e-12)
    nj = a_j / a_j.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (ni @ nj.T).abs().max().item()


def _weights(n: int, weights, lam: float) -> list[float]:
    if weights is None or len(weights) == 0:
        return [float(lam)] * n
    if len(weights) != n:
        raise InputError(f"Give one weight per LoRA ({n} LoRAs, {len(weights)} weights).")
    return [float(w) for w in weights]


@dataclass
class MergeResult:
    path: Path | None
    members: list[dict]
    weights: list[float]
    orthogonal: bool
    rank: int
    warnings: list[str]
    layers: int


def merged_state(files: list[LoraFile], weights: list[float]) -> dict[str, dict[str, torch.Tensor]]:
    """Per component PEFT state of the concatenated-rank LoRA Σ w_i ΔW_i (each component has ONE rank, zero-padded)."""
    comps: dict[str, dict[str, torch.Tensor]] = {}
    for comp in lora_io.COMPONENTS:
        keys = sorted({k for f in files for k in f.layers if k.split(".", 1)[0] == comp})
        if not keys:
            continue
        ranks = [max((f.layers[k][0].shape[0] for k in keys if k in f.layers), default=0) for f in files]
        state = {}
        for k in keys:
            ref = next(f for f in files if k in f.layers)
            m, n = ref.layers[k][0].shape[1], ref.layers[k][1].shape[0]
            downs, ups = [], []
            for f, w, r in zip(files, weights, ranks):
                if r == 0:
                    continue
                if k in f.layers:
                    a, b, s = f.layers[k]
                    pad = r - a.shape[0]
                    downs.append(torch.cat([a, a.new_zeros(pad, m)]) if pad else a)
                    ups.append(torch.cat([b * (w * s), b.new_zeros(n, pad)], dim=1) if pad else b * (w * s))
                else:
                    downs.append(torch.zeros(r, m))
                    ups.append(torch.zeros(n, r))
            state[f"{k.split('.', 1)[1]}.lora_A.weight"] = torch.cat(downs).contiguous()
            state[f"{k.split('.', 1)[1]}.lora_B.weight"] = torch.cat(ups, dim=1).contiguous()
        comps[comp] = state
    return comps


def merge_loras(sources: list, out, *, weights: list[float] | None = None, lam: float = DEFAULT_LAMBDA,
                name: str | None = None, ws=None) -> MergeResult:
    """Merge N LoRA files into one exact LoRA file θ + Σ λ_i ΔW_i (ranks concatenated; the file's weight is 1).

    ``weights``: one linear weight per source (default ``lam`` for all, 0.6 as in the paper). Writes ``out``
    atomically (and a sidecar when ``ws`` is given and ``out`` is in its library). Raises ``MergeRefusedError``.
    """
    files = [load_lora_file(p) for p in sources]
    ws_ = _weights(len(files), weights, lam)
    orthogonal, warnings = check_mergeable(files)
    comps = merged_state(files, ws_)
    rank = max(next(iter(s.values())).shape[0] for s in comps.values())
    out = Path(out)
    name = name or out.stem
    members = []
    for f, w in zip(files, ws_):
        member = {"name": f.name, "file": f.path.name, "sha256": lora_io.file_hash(f.path), "weight": w,
                  "method": f.meta.get("studio.method", "unknown"), "rank": int(f.meta.get("studio.rank", "0") or 0) or
                  max(a.shape[0] for a, _, _ in f.layers.values()), "trigger": f.meta.get("modelspec.trigger_phrase", "")}
        if f.orthogonal and f.meta.get("studio.method") == "orthogonal":
            member.update({"slot": int(f.meta.get("studio.slot", "-1")), "slot_mode": f.meta.get("studio.slot_mode", "disjoint")})
            if member["slot_mode"] == "random":
                member["columns"] = json.loads(f.meta.get("studio.columns", "{}"))
        elif f.meta.get("studio.method") == "orthogonal-merge":
            member["members"] = json.loads(f.meta.get("studio.members", "[]"))
        members.append(member)
    first = files[0]
    extra = {"members": members, "merge_weights": ws_, "recommended_weight": "1.0",
             "modelspec.trigger_phrase": ", ".join(m["trigger"] for m in members if m["trigger"])}
    if orthogonal:
        extra.update({"base_model": first.meta.get("studio.base_model", ""), "basis_seed": first.meta.get("studio.basis_seed", ""),
                      "basis_checksum": json.dumps({k: v for f in files for k, v in f.checksums.items()}, sort_keys=True),
                      "slot_mode": "merged"})
    elif first.meta.get("studio.base_model"):
        extra["base_model"] = first.meta["studio.base_model"]
    if first.meta.get("studio.layers_per_block"):
        extra["layers_per_block"] = first.meta["studio.layers_per_block"]
    vectors = {}  # each concept keeps its own token embedding (the paper merges weights, never tokens)
    for f in files:
        vectors.update(embeddings.file_bundle(f.path))
    if vectors:
        extra.update({"embeddings": ", ".join(sorted(vectors)), embeddings.META_KEY: embeddings.to_header(vectors)})
    meta = lora_io.build_metadata(arch=first.arch or "sd15", method="orthogonal-merge" if orthogonal else "merge", name=name,
                                  rank=rank, alpha=float(rank), components=comps, extra=extra)
    lora_io.save_lora(out, comps, meta)
    if ws is not None and out.parent.resolve() == ws.loras.resolve():
        ws.write_sidecar(out.stem, {"name": out.stem, "method": meta["studio.method"], "architecture": first.arch,
                                    "members": members, "weights": ws_, "warnings": warnings, "role": "subject"})
    return MergeResult(out, members, ws_, orthogonal, rank, warnings, sum(len(s) // 2 for s in comps.values()))


@torch.no_grad()
def fuse_into_pipeline(pipe, sources: list, *, weights: list[float] | None = None, lam: float = DEFAULT_LAMBDA) -> MergeResult:
    """Add Σ λ_i ΔW_i into the pipeline's base linear weights (UNet and text encoders) and the LoRAs' trigger token
    embeddings into its tokenizers and text encoders; returns what was fused."""
    files = [load_lora_file(p) for p in sources]
    ws_ = _weights(len(files), weights, lam)
    orthogonal, warnings = check_mergeable(files) if len(files) > 1 else (files[0].orthogonal, [])
    from .models import architecture

    arch = architecture(pipe)
    if files[0].arch and files[0].arch != arch:
        raise MergeRefusedError(f"{files[0].name} is a {files[0].arch} LoRA; the pipeline is {arch}.")
    n = 0
    keys = sorted({k for f in files for k in f.layers})
    for key in keys:
        comp, module = key.split(".", 1)
        model = getattr(pipe, comp, None)
        try:
            mod = model.get_submodule(lora_io.model_module(model, module))
        except (AttributeError, TypeError) as exc:
            raise MergeRefusedError(f"{key} does not exist in this pipeline: the LoRA was made for another base.") from exc
        lin = getattr(mod, "base_layer", mod)
        delta = sum(w * f.delta(key) for f, w in zip(files, ws_) if key in f.layers)
        if tuple(delta.shape) != tuple(lin.weight.shape):
            raise MergeRefusedError(f"{key}: LoRA shape {tuple(delta.shape)} does not fit the layer {tuple(lin.weight.shape)}.")
        lin.weight.add_(delta.to(lin.weight.device, lin.weight.dtype))
        n += 1
    embeddings.add_embeddings(pipe, [f.path for f in files], [])  # each concept's trigger token, for good
    members = [{"name": f.name, "weight": w} for f, w in zip(files, ws_)]
    return MergeResult(None, members, ws_, orthogonal, 0, warnings, n)


def save_fused(pipe, folder) -> Path:
    """``pipe.save_pretrained`` into ``folder`` through a temporary folder and a rename."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


# ------------------------------------------------------------------------------------------------------------ crosstalk
@dataclass
class CrosstalkResult:
    """``rows``: one per (layer, i, j): overlap max|Â_iÂ_jᵀ| and interference ‖ΔW_j X_i‖/‖ΔW_i X_i‖.
    ``pairs``: per (i, j) the max and mean over layers."""

    names: list[str]
    rows: list[dict]
    pairs: list[dict]

    def to_table(self, layers: bool = True, top: int | None = None) -> str:
        lines = []
        if layers and self.rows:
            rows = self.rows
            if top:
                rows = sorted(rows, key=lambda r: -_nz(r["interference"]))[:top]
            w = max(len(r["layer"]) for r in rows)
            wn = max([len(n) for n in self.names] + [9])
            lines.append(f"{'layer':<{w}}  {'concept i':<{wn}}  {'other j':<{wn}}  {'width':>5}  {'overlap':>9}  {'interference':>12}")
            for r in rows:
                lines.append(f"{r['layer']:<{w}}  {r['i']:<{wn}}  {r['j']:<{wn}}  {r['width']:>5}  {r['overlap']:>9.2e}  "
                             f"{r['interference']:>12.2e}")
            lines.append("")
        wn = max([len(n) for n in self.names] + [9])
        lines.append(f"{'concept i':<{wn}}  {'other j':<{wn}}  {'layers':>6}  {'max overlap':>11}  {'mean overlap':>12}  "
                     f"{'max interf.':>11}  {'mean interf.':>12}")
        for p in self.pairs:
            lines.append(f"{p['i']:<{wn}}  {p['j']:<{wn}}  {p['layers']:>6}  {p['max_overlap']:>11.2e}  {p['mean_overlap']:>12.2e}  "
                         f"{p['max_interference']:>11.2e}  {p['mean_interference']:>12.2e}")
        lines.append("overlap: max |cos| between down-projection rows (max|B_i^T B_j| for orthogonal LoRAs); interference: "
                     "||dW_j x|| / ||dW_i x|| for x in concept i's input subspace (0 = no crosstalk).")
        return "\n".join(lines)


def _nz(x: float) -> float:
    return -1.0 if math.isnan(x) else x


@torch.no_grad()
def crosstalk(sources: list, *, probes: int = 16, seed: int = 0) -> CrosstalkResult:
    """Per-layer crosstalk between every ordered pair of LoRA files (orthogonal or not)."""
    files = [load_lora_file(p) for p in sources]
    if len(files) < 2:
        raise InputError("Pick at least two LoRAs to compare.")
    names = _unique([f.name for f in files])
    rows: list[dict] = []
    g = torch.Generator("cpu").manual_seed(seed)
    for i, fi in enumerate(files):
        for j, fj in enumerate(files):
            if i == j:
                continue
            for key in sorted(fi.layers.keys() & fj.layers.keys()):
                a_i = fi.layers[key][0]
                a_j = fj.layers[key][0]
                if a_i.shape[1] != a_j.shape[1]:
                    raise MergeRefusedError(f"{fi.name} and {fj.name} have different widths at {key}.")
                z = torch.randn(a_i.shape[0], probes, generator=g)
                x = a_i.T @ z  # probes in concept i's down-projection row space
                own = (fi.delta(key) @ x).norm().item()
                other = (fj.delta(key) @ x).norm().item()
                rows.append({"layer": key, "i": names[i], "j": names[j], "width": a_i.shape[1],
                             "overlap": _overlap(a_i, a_j), "interference": other / own if own > 0 else float("nan")})
    pairs = []
    for i in range(len(files)):
        for j in range(len(files)):
            if i == j:
                continue
            sel = [r for r in rows if r["i"] == names[i] and r["j"] == names[j]]
            inter = [r["interference"] for r in sel if not math.isnan(r["interference"])]
            ov = [r["overlap"] for r in sel]
            pairs.append({"i": names[i], "j": names[j], "layers": len(sel),
                          "max_overlap": max(ov, default=float("nan")), "mean_overlap": sum(ov) / len(ov) if ov else float("nan"),
                          "max_interference": max(inter, default=float("nan")),
                          "mean_interference": sum(inter) / len(inter) if inter else float("nan")})
    return CrosstalkResult(names, rows, pairs)


def _unique(names: list[str]) -> list[str]:
    out, seen = [], {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return out
