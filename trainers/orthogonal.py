"""Orthogonal-adaptation recipe (Po, Yang, Aberman, Wetzstein, "Orthogonal Adaptation for Modular Customization of
Diffusion Models", CVPR 2024, arXiv 2312.02432).

Each adapted linear layer (input width m) gets a LoRA whose **down**-projection (PEFT ``lora_A``, the paper's B)
is frozen to r columns of a shared orthonormal m×m basis (``studio/orthogonal.py``); only the up-projection (PEFT
``lora_B``, the paper's A, zero at start) trains. Concepts trained this way in different slots can be summed
without crosstalk (``studio lora merge``).

Everything else is the DreamBooth recipe and the shared loop, so prior preservation, text-encoder LoRA (then
also orthogonal), min-SNR, checkpoints and exact resume all work. The frozen ``lora_A`` is part of every
checkpoint (the loop saves all ``lora_*`` parameters), so a resumed run restores it bit for bit; ``save``
checks that it still equals the recorded basis slot.

Defaults and deviations from the paper:

* rank 20 (paper); LoRA on every ``nn.Linear`` of the UNet's attention (transformer) blocks: attn1/attn2
  q/k/v/out, ``ff.net.0.proj``, ``ff.net.2`` and, where they are linear (SDXL), ``proj_in``/``proj_out`` (the paper:
  "all linear layers"; SD1.5's 1x1-conv ``proj_in``/``proj_out`` are left out, the frozen basis is defined for
  linear layers); text-encoder LoRA optional (Mix-of-Show also trains one, at 1e-5).
* the trigger's token embedding trains with the LoRA (``pivotal``, lr 1e-3: ED-LoRA as the paper uses it; one vector
  per text encoder instead of two layer-wise tokens, see ``studio/embeddings.py``); plain ε-MSE (no min-SNR, the
  paper adds no loss terms) and Mix-of-Show's noise offset 0.01; alpha = rank (scale 1, Mix-of-Show's multiplier 1.0).
* **learning rate 1e-4 for ``lora_B``, not the paper's 1e-5** — the authors' own demo config (``ujin-song/ortha``,
  ``0022_elsa_ortho.yml``) uses 1e-4 for the UNet LoRA, and on the toy model at the studio's default 500 steps the
  paper's 1e-5 learns almost nothing. Measured with ``bench/orthogonal_defaults.py`` (toy-xl, 4 held-out subjects x
  16 images, subject fidelity of each LoRA alone, Wilson 95%): this recipe 54.7% [43, 66]; the same at lr 1e-5 3.1%
  [1, 11]; without the embedding 37.5% [27, 50]; on attention only 26.6% [17, 38]; the studio's earlier recipe
  (attention only, lr 1e-4, no embedding, min-SNR 5) 15.6% [9, 26]. The toy base model draws its own shapes only
  ~60% of the time, so these are coarse; use lr 1e-5 with many more steps to follow the paper.
* slots: disjoint column slots allocated from the workspace (exact orthogonality) instead of the paper's random
  subsets (available as ``slot_mode="random"``); prior preservation stays available (off by default, the paper used
  none).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from studio import orthogonal as orth
from studio.config import TrainConfig, _f
from studio.errors import InputError, TrainingError

from .dreambooth import DreamBoothRecipe

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class OrthogonalConfig(TrainConfig):
    """Orthogonal adaptation: LoRA with a frozen orthonormal down-projection slot; concepts merge without crosstalk."""

    method: str = _f("orthogonal", "Training method.", choices=["orthogonal"], ui=False)
    rank: int = _f(20, "LoRA rank = number of basis columns this concept uses (paper: 20).")
    target_modules: str = _f(orth.ALL_LINEARS, "UNet linear layers of the attention blocks that get LoRA (paper: all linear "
                                          "layers; SD1.5's 1x1-conv proj_in/proj_out are left out).", advanced=True)
    lr: float = _f(1e-4, "Learning rate of the trained up-projection (the authors' demo config; the paper: 1e-5 with "
                         "longer training).")
    pivotal: bool = _f(True, "Train the trigger's token embedding with the LoRA (ED-LoRA, as the paper; saved with the "
                             "LoRA and as an A1111/ComfyUI embedding).", advanced=True)
    snr_gamma: float = _f(0.0, "min-SNR loss weighting gamma; 0 (the paper uses plain ε-MSE) disables.", advanced=True)
    noise_offset: float = _f(0.01, "Noise offset (Mix-of-Show's configs: 0.01).", advanced=True)
    basis_seed: int = _f(0, "Seed of the shared orthonormal bases; only LoRAs with the same seed merge cleanly.", advanced=True)
    slot: int = _f(-1, "Basis slot (columns slot*rank ... (slot+1)*rank-1); -1 picks the first free one.", advanced=True)
    slot_mode: str = _f("disjoint", "disjoint: exact orthogonality via free slots; random: the paper's random column subsets.",
                        choices=list(orth.SLOT_MODES), advanced=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.slot < -1:
            raise InputError(f"slot must be -1 (automatic) or a slot number (got {self.slot}).")
        if self.slot_mode == "random" and self.slot != -1:
            raise InputError("slot is only used with slot_mode disjoint; leave it at -1 for random columns.")
        if not 0 <= self.basis_seed < 2**32:
            raise InputError("basis_seed must be between 0 and 2^32-1.")


class OrthogonalRecipe(DreamBoothRecipe):
    name = "orthogonal"
    config_cls = OrthogonalConfig

    def __init__(self, ws=None):
        self.ws = ws
        self.plan: orth.SlotPlan | None = None

    def bind(self, ws) -> "OrthogonalRecipe":
        """Give the recipe the workspace whose orthogonal LoRAs decide the free slot."""
        self.ws = ws
        return self

    def check(self, pipe, cfg: OrthogonalConfig) -> None:
        super().check(pipe, cfg)
        if cfg.slot_mode == "disjoint" and cfg.slot < 0 and self.ws is None:
            raise InputError("Orthogonal training needs the workspace to pick a free slot: create the recipe as "
                             "OrthogonalRecipe(ws) (or .bind(ws)), or give an explicit slot.")

    def unet_targets(self, pipe, cfg: OrthogonalConfig) -> list[str]:
        """Exact paths of the nn.Linear layers named by ``target_modules`` (a frozen orthonormal down-projection is
        defined for linear layers: SD1.5's 1x1-conv ``proj_in``/``proj_out`` are skipped)."""
        import torch

        return sorted(n for n, m in pipe.unet.named_modules() if isinstance(m, torch.nn.Linear)
                      and any(n == t or n.endswith("." + t) for t in cfg.targets))

    def _layers(self, pipe, cfg):
        comps = ("unet", "text_encoder", "text_encoder_2") if cfg.train_text_encoder else ("unet",)
        return orth.lora_layers(pipe, comps)

    def add_adapters(self, pipe, cfg: OrthogonalConfig) -> list[str]:
        names = super().add_adapters(pipe, cfg)
        layers = self._layers(pipe, cfg)
        widths = sorted({mod.lora_A["default"].weight.shape[1] for mod in layers.values()})
        self.plan = orth.plan_slot(self.ws, base_model=getattr(pipe, "studio_ref", cfg.model), basis_seed=cfg.basis_seed,
                                   rank=cfg.rank, widths=widths, slot_mode=cfg.slot_mode, slot=cfg.slot, name=cfg.name,
                                   seed=cfg.seed)
        orth.apply_basis(layers, self.plan)
        log.info(self.plan.message())
        return names

    def metadata(self, pipe, cfg, info, comps, name, extra=None) -> dict:
        return super().metadata(pipe, cfg, info, comps, name, {**self.plan.metadata(), "studio.slot_message": self.plan.message(),
                                                                  **(extra or {})})

    def save(self, pipe, cfg, ws, info, final):
        if self.plan is None:
            raise TrainingError("The orthogonal recipe saved before its adapters were set up.")
        dev = orth.basis_deviation(self._layers(pipe, cfg), self.plan)
        if dev > 1e-4:
            raise TrainingError(f"The frozen down-projections differ from basis slot {self.plan.slot} (max {dev:.2e}): the "
                                "checkpoint was probably made with another slot. Start a new run (without resume).")
        return super().save(pipe, cfg, ws, info, final)
