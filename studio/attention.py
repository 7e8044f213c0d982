"""Attention machinery shared by the composition engines (LoRA-Composer, CLoRA).

* ``StudioAttnProcessor``: one processor for ``attn1``/``attn2`` of the UNet that can
  - capture head-averaged attention probabilities at one spatial resolution (cross-attention maps for CLoRA and the
    LoRA-Composer losses, self-attention maps for its region loss), keeping the autograd graph when asked;
  - LoRA-Composer concept isolation in self-attention: a query pixel inside concept k's region gets −10⁶ on every
    key inside another concept's region (Yang et al. 2024, "LoRA-Composer", Concept Isolation). Computed as one
    unmasked SDPA per group of pixels with the same region membership over the keys the bias leaves open (the same
    result, ``isolated_attention``); layers that capture maps add the dense bias;
  - replace the cross-attention output inside each concept's region by that concept's own attention: keys, values and
    output projection through the concept's LoRA adapter on the concept's prompt, the query from the base model
    (LoRA-Composer, region-aware LoRA injection); overlapping regions are averaged. All concepts run in one
    attention call, stacked on the batch axis.
  Layers without these jobs keep PyTorch SDPA; capturing layers run eager attention. Index tensors are made once per
  run and resolution (``RegionMasks.layout``), so a denoising step never waits for the GPU.
* ``saved_processors(unet)``: save ``unet.attn_processors`` and restore them on exit, also on exceptions.
* ``adapter_routing(unet)``: per-sample PEFT adapters in one batch; ``"__base__"`` means no adapter. PEFT LoRA
  ``Linear`` layers get a slice-based forward with the same result as PEFT's ``adapter_names=`` path (which gathers
  and scatters each sub-batch with index lists in every layer); other layer types get ``adapter_names=`` injected by
  forward pre-hooks, PEFT's own mechanism.
* ``SpatialRouting`` (``router.spatial``): concept adapters that act only inside their regions: at a layer whose input
  is a sequence of pixels, each concept's LoRA delta is added at the pixels of its region (LoRA-Composer's
  ``region_all_layers``, for LoRAs that hold their subject outside cross-attention).
* ``fused_adapters(unet, names)``: add adapters' ΔW into the base weights (for LoRAs that apply everywhere, so each
  sample still needs only one routed adapter); the exact original weights are restored on exit.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

BASE = "__base__"


# ------------------------------------------------------------------------------------------------------ state helpers
@contextmanager
def saved_processors(unet):
    """Restore the UNet's attention processors on exit (normal return or exception)."""
    saved = dict(unet.attn_processors)
    try:
        yield saved
    finally:
        unet.set_attn_processor(saved)


def _tuner_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


class Router:
    """Which adapter each sample of the next UNet call uses (``None``: PEFT's normal active adapters), and optionally
    which adapters act inside which regions of the image (``spatial``)."""

    def __init__(self):
        self.names: list[str] | None = None
        self.spatial: SpatialRouting | None = None
        self.peft_path = 0  # LoRA layers routed by PEFT's own adapter_names path (gathers with host index lists)
        self._runs: tuple[tuple, list] = ((), [])

    def runs(self) -> list[tuple[str, int, int]]:
        """``names`` as contiguous runs (adapter, start, end): the engines lay batches out pass by pass."""
        key = tuple(self.names)
        if self._runs[0] != key:
            self._runs = (key, _runs_of(key))
        return self._runs[1]


@dataclass
class SpatialRouting:
    """Concept adapters that act inside their regions only: at a layer whose input is a sequence of pixels, concept n's
    LoRA delta is added at the pixels of its region (averaged where regions overlap), on top of whatever the
    per-sample routing computed. ``layers``: ids of the LoRA layers this applies to (the engine leaves out the layers
    it routes itself, e.g. the composer's cross-attention keys, values and output)."""

    masks: "RegionMasks"
    adapters: list[str]
    layers: set[int]
    _weights: dict = field(default_factory=dict, repr=False)

    def weights(self, n_tokens: int, device, dtype) -> torch.Tensor | None:
        """(n, n_tokens) per-pixel weights of each concept (1/|regions at the pixel|), None if no layer has this size
        (made once per resolution, device and dtype)."""
        key = (n_tokens, str(device), dtype)
        if key not in self._weights:
            try:
                m = self.masks.at(n_tokens, device, dtype)
            except ValueError:
                m = None
            self._weights[key] = None if m is None else m / m.sum(0, keepdim=True).clamp(min=1)
        return self._weights[key]


def _spatial_deltas(m, x, result, spatial: SpatialRouting):
    """``result`` plus each concept adapter's delta inside its region (``SpatialRouting``). PEFT ``Linear`` layers
    only: a LoRA's convolution deltas (LoCon, ResNet convs) are not routed."""
    if x.ndim != 3 or id(m) not in spatial.layers:
        return result
    w = spatial.weights(x.shape[1], result.device, result.dtype)
    if w is None:
        return result
    for n, a in enumerate(spatial.adapters):
        if a in m.lora_A:
            result = result + _lora_delta(m, a, x).to(result.dtype) * w[n][None, :, None]
    return result


def _lora_delta(m, adapter: str, x):
    """Adapter ``adapter``'s LoRA term of PEFT ``Linear`` ``m`` on ``x``: scaling · B(A(dropout(x)))."""
    lora_a = m.lora_A[adapter]
    return m.lora_B[adapter](lora_a(m.lora_dropout[adapter](x.to(lora_a.weight.dtype)))) * m.scaling[adapter]


def region_routed_layers(unet) -> set[int]:
    """Ids of the UNet's LoRA ``Linear`` layers that ``SpatialRouting`` serves for LoRA-Composer: all but the
    cross-attention keys, values and output, which its region-aware injection routes itself."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    own = (".attn2.to_k", ".attn2.to_v", ".attn2.to_out.0")
    return {id(m) for n, m in _tuner_layers(unet) if type(m) is LoraLinear and not n.endswith(own)}


def _runs_of(names) -> list[tuple[str, int, int]]:
    out: list[tuple[str, int, int]] = []
    for i, n in enumerate(names):
        if out and out[-1][0] == n:
            out[-1] = (n, out[-1][1], i + 1)
        else:
            out.append((n, i, i + 1))
    return out


def _routed_linear_forward(m, router: Router, x, *args, **kwargs):
    """PEFT LoRA ``Linear`` forward with per-sample adapters taken from ``router``, on contiguous batch slices.

    Same result as PEFT's own ``adapter_names=`` path (``_mixed_batch_forward``), which gathers and scatters every
    sub-batch with Python index lists in every layer; slices make routing nearly free, and an all-base batch runs
    the base layer alone. Anything unusual (DoRA and other variants, disabled adapters, an explicit
    ``adapter_names``) goes through PEFT's forward unchanged."""
    if router.names is None or "adapter_names" in kwargs:
        return type(m).forward(m, x, *args, **kwargs)
    out = _forward_runs(m, x, router.names, router.runs(), *args, **kwargs)
    return out if router.spatial is None else _spatial_deltas(m, x, out, router.spatial)


def _forward_runs(m, x, names, runs, *args, **kwargs):
    if m.disable_adapters or m.merged or any(a in m.lora_variant for a, _, _ in runs):
        return type(m).forward(m, x, *args, adapter_names=names, **kwargs)
    result = m.base_layer(x, *args, **kwargs)
    pieces = []
    for a, start, end in runs:
        piece = result[start:end] if len(runs) > 1 else result
        if a != BASE and a in m.lora_A:
            piece = piece + _lora_delta(m, a, x[start:end]).to(result.dtype)
        pieces.append(piece)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


@contextmanager
def adapter_routing(unet):
    """Route one adapter per batch sample (``router.names``) through every PEFT LoRA layer of ``unet``."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    router = Router()
    handles = []
    patched = []

    def hook(module, args, kwargs):
        if router.names is not None and "adapter_names" not in kwargs:
            kwargs = {**kwargs, "adapter_names": router.names}
        return args, kwargs

    try:
        for _, m in _tuner_layers(unet):
            if type(m) is LoraLinear and "forward" not in m.__dict__:
                m.forward = partial(_routed_linear_forward, m, router)
                patched.append(m)
            else:  # other layer types (conv LoRA, quantised layers): PEFT's own adapter_names path
                handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
        router.peft_path = len(handles) + sum(1 for m in patched if getattr(m, "lora_variant", None))
        yield router
    finally:
        for m in patched:
            del m.forward
        for h in handles:
            h.remove()


@contextmanager
def fused_adapters(unet, names: list[str], bypass: bool = False):
    """Add the (weighted) ΔW of ``names`` into the base weights; restore the exact originals afterwards (the backup
    is kept in CPU memory, not on the GPU). With ``bypass`` the LoRA layers skip their adapters while fused, so the
    model computes (W₀ + Σ ΔW)x in one matmul: a weighted merge without per-step LoRA cost."""
    backup: list[tuple[torch.nn.Module, torch.Tensor]] = []
    bypassed = []
    try:
        with torch.no_grad():
            for _, m in _tuner_layers(unet):
                todo = [n for n in names if n in getattr(m, "lora_A", {})]
                if not todo:
                    continue
                base = m.get_base_layer()
                backup.append((base, base.weight.detach().to("cpu", copy=True)))
                for n in todo:
                    base.weight.data += m.get_delta_weight(n).to(base.weight.dtype)
                if bypass and not m.disable_adapters:
                    bypassed.append((m, [(q, q.requires_grad) for q in m.parameters()]))
                    m.enable_adapters(False)
        yield
    finally:
        with torch.no_grad():
            for base, w in backup:
                base.weight.data.copy_(w.to(base.weight.device))
        for m, grads in bypassed:
            m.enable_adapters(True)
            for q, flag in grads:  # enable_adapters() also marks the adapters trainable: put that back as it was
                q.requires_grad_(flag)


def routed(module, x, names: list[str] | None):
    """Call a (possibly PEFT-wrapped) linear layer with per-sample adapters."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer

    if names is not None and type(module) is LoraLinear:
        return _forward_runs(module, x, names, _runs_of(names))
    if names is not None and isinstance(module, BaseTunerLayer):
        return module(x, adapter_names=names)
    return module(x)


# ------------------------------------------------------------------------------------------------------ region masks
def layer_hw(latent_hw: tuple[int, int], n_tokens: int) -> tuple[int, int]:
    """Spatial size of a UNet attention layer with ``n_tokens`` queries (the UNet halves sizes rounding up)."""
    h, w = latent_hw
    while h * w > n_tokens:
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != n_tokens:
        raise ValueError(f"cannot map {n_tokens} tokens to a grid of the {latent_hw} latent")
    return h, w


class RegionMasks:
    """Concept region masks (n, H, W) at latent resolution, resampled (area, ≥ 0.5) to each attention layer."""

    def __init__(self, masks: torch.Tensor):
        self.masks = masks.float()
        self.latent_hw = tuple(masks.shape[-2:])
        self._cache: dict[tuple, torch.Tensor] = {}

    def at(self, n_tokens: int, device=None, dtype=None) -> torch.Tensor:
        """(n, n_tokens) float 0/1 masks flattened at the resolution with ``n_tokens`` pixels (on ``device``/``dtype``
        when given: cached, so a denoising step makes no copies)."""
        key = ("m", n_tokens)
        if key not in self._cache:
            h, w = layer_hw(self.latent_hw, n_tokens)
            soft = F.interpolate(self.masks[None], size=(h, w), mode="area")[0] if (h, w) != self.latent_hw else self.masks
            hard = (soft >= 0.5).float()
            for i in range(len(hard)):  # a region never vanishes at coarse layers: keep its strongest cell
                if hard[i].sum() == 0 and soft[i].sum() > 0:
                    hard[i].view(-1)[soft[i].argmax()] = 1.0
            self._cache[key] = hard.reshape(len(hard), -1)
        if device is None and dtype is None:
            return self._cache[key]
        key_on = ("m", n_tokens, str(device), dtype)
        if key_on not in self._cache:
            self._cache[key_on] = self._cache[key].to(device, dtype)
        return self._cache[key_on]

    def layout(self, n_tokens: int, device) -> "RegionLayout":
        """Index tensors for concept isolation at one resolution, made once per run (``nonzero`` waits for the GPU,
        so it must not run in every layer of every step)."""
        key = ("l", n_tokens, str(device))
        if key not in self._cache:
            self._cache[key] = RegionLayout.of(self.at(n_tokens).cpu(), device)
        return self._cache[key]

    def isolation_bias(self, n_tokens: int, dtype, device) -> torch.Tensor:
        """(N, N) additive bias: −10⁶ from a query in region k to a key in another region j ≠ k, else 0."""
        key = ("b", n_tokens, dtype, str(device))
        if key not in self._cache:
            m = self.at(n_tokens, device)
            cross = m.t() @ (m.sum(0, keepdim=True) - m)  # [p, q] = Σ_k m_k[p] Σ_{j≠k} m_j[q]
            neg = -6.0e4 if dtype == torch.float16 else -1.0e6
            self._cache[key] = (cross.clamp(max=1) * neg).to(dtype)
        return self._cache[key]


@dataclass
class RegionLayout:
    """Concept isolation at one attention resolution, as index tensors on the compute device.

    ``groups``: a partition of the queries into (query pixels, allowed key pixels or None for all): pixels with the
    same region membership S may attend to the keys q with Σ_{k∈S} Σ_{j≠k} m_j[q] = 0, exactly the keys the −10⁶
    bias leaves open. ``inverse`` puts the concatenated group outputs back in pixel order."""

    groups: list[tuple[torch.Tensor, torch.Tensor | None]]
    inverse: torch.Tensor

    @staticmethod
    def of(m: torch.Tensor, device) -> "RegionLayout":
        n, npix = m.shape
        mb = m.bool()
        cnt = m.sum(0)
        if n == 0:
            return RegionLayout([(torch.arange(npix, device=device), None)], torch.arange(npix, device=device))
        sets, which = torch.unique(mb.t(), dim=0, return_inverse=True)  # region membership of each pixel
        groups, order = [], []
        for g, s in enumerate(sets):
            pix = (which == g).nonzero().flatten()
            keys = None
            if bool(s.any()):
                allowed = (int(s.sum()) * cnt - m[s].sum(0)) == 0
                if bool(allowed.any()) and not bool(allowed.all()):
                    keys = allowed.nonzero().flatten().to(device)
                # no key left open: the bias shifts every score alike, i.e. plain attention over all keys
            groups.append((pix.to(device), keys))
            order.append(pix)
        order = torch.cat(order)
        inverse = torch.empty(npix, dtype=torch.long)
        inverse[order] = torch.arange(npix)
        return RegionLayout(groups, inverse.to(device))


def isolated_attention(attn, query, key, value, lay: RegionLayout) -> torch.Tensor:
    """Self-attention under concept isolation without a dense bias: one unmasked attention per group of queries over
    its open keys. Equal to ``attend`` with ``isolation_bias`` (up to rounding) but keeps SDPA on its fastest kernels
    (a dense additive mask rules out flash attention on the GPU) and skips the closed keys' work."""
    if len(lay.groups) == 1 and lay.groups[0][1] is None:
        return attend(attn, query, key, value)[0]
    outs = []
    for q_idx, k_idx in lay.groups:
        k = key if k_idx is None else key.index_select(1, k_idx)
        v = value if k_idx is None else value.index_select(1, k_idx)
        outs.append(attend(attn, query.index_select(1, q_idx), k, v)[0])
    return torch.cat(outs, 1).index_select(1, lay.inverse)


# ------------------------------------------------------------------------------------------------------ the processor
@dataclass
class RegionKV:
    """One concept's region attention: its adapter and its prompt embeddings (one row per batch sample)."""

    adapter: str
    context: torch.Tensor


class MapsCaptured(Exception):
    """Raised inside the UNet once the maps an engine asked for are stored (``AttnControl.stop_after``)."""


@dataclass
class AttnControl:
    """What the studio processors do on the next UNet call (engines mutate it between calls)."""

    masks: RegionMasks | None = None
    isolate: bool = False  # self-attention concept isolation
    regions: list[RegionKV] = field(default_factory=list)  # region-aware cross-attention
    capture_tokens: int | None = None  # capture maps at layers with this many pixels
    capture_cross: bool = False
    capture_self: bool = False
    capture_regions: bool = False  # composer: concept-token maps of each region's attention over the whole image
    store: dict = field(default_factory=dict)
    # region keys/values per (layer, adapter, prompt rows): they depend only on the concept's prompt, not on the
    # latent, so one computation serves every step of a run (a fresh AttnControl per run)
    kv_cache: dict = field(default_factory=dict)
    # stop the UNet call (MapsCaptured) once this many cross-attention maps (CLoRA) or region maps (composer) are
    # stored: for a loss that reads only the maps, the layers after the last capture layer are not needed (None: run
    # the whole UNet)
    stop_after: int | None = None

    def reset(self) -> None:
        self.store = {"cross": [], "self": [], "regions": []}


class StudioAttnProcessor:
    def __init__(self, name: str, ctl: AttnControl):
        self.name = name
        self.ctl = ctl

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        ctl = self.ctl
        is_cross = encoder_hidden_states is not None
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, ch, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, ch, h * w).transpose(1, 2)
        batch, n_tok, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        context = encoder_hidden_states if is_cross else hidden_states
        if is_cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)

        bias = None
        if attention_mask is not None:
            bias = attn.prepare_attention_mask(attention_mask, key.shape[1], batch)
            bias = bias.view(batch, attn.heads, -1, key.shape[1])
        capture = ctl.capture_tokens == n_tok and ((is_cross and ctl.capture_cross) or (not is_cross and ctl.capture_self))
        isolate = not is_cross and ctl.isolate and ctl.masks is not None
        if isolate and not capture and bias is None:
            out, probs = isolated_attention(attn, query, key, value, ctl.masks.layout(n_tok, query.device)), None
        else:
            if isolate:  # the maps are wanted: eager attention with the dense bias
                iso = ctl.masks.isolation_bias(n_tok, query.dtype, query.device)
                bias = iso if bias is None else bias + iso
            out, probs = attend(attn, query, key, value, bias, need_probs=capture)
        if capture:
            ctl.store.setdefault("cross" if is_cross else "self", []).append(probs.mean(1))
            if is_cross and ctl.stop_after is not None and len(ctl.store["cross"]) >= ctl.stop_after:
                raise MapsCaptured
        out = attn.to_out[1](attn.to_out[0](out))
        if is_cross and ctl.regions and ctl.masks is not None:
            out = self._regions(attn, query, out, n_tok)

        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, ch, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _regions(self, attn, query, out_g, n_tok):
        """Region-aware LoRA injection: inside region n the output is concept n's cross-attention (averaged in overlaps)."""
        ctl = self.ctl
        m = ctl.masks.at(n_tok, out_g.device, out_g.dtype)  # (n, N)
        count = m.sum(0)
        batch = out_g.shape[0]
        n = len(ctl.regions)
        want_maps = ctl.capture_regions and ctl.capture_tokens == n_tok
        # every concept in one attention call: the concepts are stacked on the batch axis (concept i: rows i·B…),
        # each attends over the whole image and the masks pick its pixels afterwards. Cross-attention over 77 keys
        # is cheap; what costs on a GPU is the number of operators, which this keeps independent of the region sizes
        names = [r.adapter for r in ctl.regions for _ in range(batch)]
        key = (self.name,) + tuple((r.adapter, r.context.data_ptr(), tuple(r.context.shape)) for r in ctl.regions)
        if key not in ctl.kv_cache:
            with torch.no_grad():  # constants with respect to the latent; the contexts are kept referenced so that
                # their addresses cannot be reused by other tensors while the entry lives
                ctx = torch.cat([r.context for r in ctl.regions])
                ctl.kv_cache[key] = ([r.context for r in ctl.regions], routed(attn.to_k, ctx, names), routed(attn.to_v, ctx, names))
        _, k, v = ctl.kv_cache[key]
        q = query.repeat(n, 1, 1)
        o, probs = attend(attn, q, k, v, None, need_probs=want_maps)
        maps = list(probs.mean(1).split(batch)) if want_maps else []
        o = attn.to_out[1](routed(attn.to_out[0], o, names))
        acc = (o.view(n, batch, n_tok, -1) * m[:, None, :, None]).sum(0)
        if want_maps:
            ctl.store.setdefault("regions", []).append(maps)
            if ctl.stop_after is not None and len(ctl.store["regions"]) >= ctl.stop_after:
                raise MapsCaptured
        inside = (count > 0)[None, :, None]
        return torch.where(inside, acc / count.clamp(min=1)[None, :, None], out_g)


def attend(attn, query, key, value, bias=None, need_probs=False):
    """Multi-head attention; returns (output (B, N, C), probabilities (B, heads, N, M) or None)."""
    batch = query.shape[0]
    heads = attn.heads
    q = query.view(batch, -1, heads, query.shape[-1] // heads).transpose(1, 2)
    k = key.view(batch, -1, heads, key.shape[-1] // heads).transpose(1, 2)
    v = value.view(batch, -1, heads, value.shape[-1] // heads).transpose(1, 2)
    if need_probs:
        dtype = q.dtype
        if attn.upcast_attention:
            q, k = q.float(), k.float()
        scores = torch.matmul(q, k.transpose(-1, -2)) * attn.scale
        if bias is not None:
            scores = scores + bias.to(scores.dtype)
        probs = scores.float().softmax(-1) if attn.upcast_softmax else scores.softmax(-1)
        probs = probs.to(dtype)
        out = torch.matmul(probs, v)
    else:
        probs = None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype), scale=attn.scale)
    out = out.transpose(1, 2).reshape(batch, -1, heads * out.shape[-1])
    return out, probs


def install(unet, ctl: AttnControl, which: str = "all", tokens: set[int] | None = None):
    """Put ``StudioAttnProcessor`` on ``attn1``/``attn2`` layers (``which`` = all | cross | self); others keep theirs."""
    procs = {}
    for name, proc in unet.attn_processors.items():
        cross = name.endswith("attn2.processor")
        use = which == "all" or (which == "cross") == cross
        procs[name] = StudioAttnProcessor(name, ctl) if use else proc
    unet.set_attn_processor(procs)


def attention_resolutions(unet, latent_hw: tuple[int, int]) -> list[int]:
    """Token counts of the cross-attention layers for a latent size, from a dry reading of the UNet config."""
    sizes = set()
    h, w = latent_hw
    down = unet.config.down_block_types
    for i, kind in enumerate(down):
        if "CrossAttn" in kind:
            sizes.add(h * w)
        if i < len(down) - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
    if "CrossAttn" in (unet.config.mid_block_type or "UNetMidBlock2DCrossAttn"):
        sizes.add(h * w)
    return sorted(sizes)


def map_resolution(unet, latent_hw: tuple[int, int], image_hw: tuple[int, int], mid_ok: bool = False) -> int:
    """Token count of the attention layers used for maps: ⌈H/32⌉×⌈W/32⌉ (the papers' 16×16 at 512²) if such layers
    exist, else the available cross-attention resolution closest to it (tiny models)."""
    target = math.ceil(image_hw[0] / 32) * math.ceil(image_hw[1] / 32)
    sizes = attention_resolutions(unet, latent_hw)
    return min(sizes, key=lambda s: (abs(math.log(s / target)), -s))
