"""DreamBooth-LoRA recipe (Ruiz et al. 2023, "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for Subject-Driven
Generation"; Hu et al. 2021, "LoRA"), as in diffusers' ``train_dreambooth_lora(_sdxl).py``.

The recipe decides targets (UNet attention ``to_q,to_k,to_v,to_out.0`` by default; optional text-encoder
``q/k/v/out_proj``), initialisation (PEFT's "gaussian" init of ``lora_A``, zero ``lora_B``) and outputs (diffusers
file, kohya export, JSON sidecar). Everything else is the shared loop in ``trainers/loop.py``.

Notable choices: alpha defaults to the rank (scale 1) like the diffusers scripts; min-SNR gamma 5 and an SDXL noise
offset of 0.0357 are on by default (both absent from the SD1.5 diffusers script); latents and text embeddings are
cached once when the text encoders are frozen. Optional pivotal tuning (``pivotal``, off by default as in diffusers'
DreamBooth scripts): the trigger's token embedding trains beside the LoRA and is saved with it (``studio/embeddings.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

from studio import embeddings, lora_io
from studio.config import TrainConfig, to_dict
from studio.library import Workspace

TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def lora_config(cfg: TrainConfig, targets: list[str], rank: int | None = None):
    from peft import LoraConfig

    r = rank or cfg.rank
    return LoraConfig(r=r, lora_alpha=cfg.lora_alpha * r / cfg.rank, init_lora_weights="gaussian",
                      target_modules=targets, lora_dropout=cfg.lora_dropout)


def text_encoders(pipe) -> dict:
    return {c: getattr(pipe, c) for c in ("text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None}


class DreamBoothRecipe:
    name = "dreambooth"
    config_cls = TrainConfig

    def check(self, pipe, cfg: TrainConfig) -> None:
        names = {n.rsplit(".", 1)[-1] for n, _ in pipe.unet.named_modules()} | {n for n, _ in pipe.unet.named_modules()}
        missing = [t for t in cfg.targets if t not in names and not any(n.endswith("." + t) for n in names)]
        if missing:
            from studio.errors import InputError

            raise InputError(f"target_modules {missing} do not exist in this UNet.")
        unnamed = lora_io.unnamed_targets(pipe, cfg.targets)
        if unnamed:
            from studio.errors import InputError

            raise InputError(f"target_modules {cfg.targets} pick {len(unnamed)} layers (e.g. {unnamed[0]}) that have no "
                             "kohya/A1111/ComfyUI name, so the LoRA could not be exported for other tools: leave them out.")

    def unet_targets(self, pipe, cfg: TrainConfig) -> list[str]:
        return cfg.targets

    def add_adapters(self, pipe, cfg: TrainConfig) -> list[str]:
        pipe.unet.add_adapter(lora_config(cfg, self.unet_targets(pipe, cfg)))
        if cfg.train_text_encoder:
            for te in text_encoders(pipe).values():
                te.add_adapter(lora_config(cfg, TE_TARGETS))
        return ["default"]

    def components(self, pipe, cfg: TrainConfig) -> dict[str, dict]:
        comps = {"unet": lora_io.adapter_state(pipe.unet)}
        if cfg.train_text_encoder:
            comps.update({c: lora_io.adapter_state(te) for c, te in text_encoders(pipe).items()})
        return comps

    def metadata(self, pipe, cfg: TrainConfig, info: dict, comps: dict, name: str, extra: dict | None = None) -> dict:
        extra = {
            "recommended_weight": str(cfg.recommended_weight),
            "steps": str(info["steps"]),
            "dataset_size": str(info["dataset_size"]),
            "dataset_hash": info.get("dataset_hash", ""),
            "tag_frequency": info.get("tag_frequency", {}),
            "layers_per_block": json.dumps(pipe.unet.config.layers_per_block),
            "base_model": getattr(pipe, "studio_ref", cfg.model),
            "config": to_dict(cfg),
            "modelspec.trigger_phrase": cfg.trigger,
            "class_word": cfg.class_word,  # with the trigger, what composition engines build concept prompts from
            **({"embeddings": cfg.trigger} if cfg.pivotal else {}),  # the token whose vectors the file bundles
            "modelspec.resolution": f"{info['resolution']}x{info['resolution']}",
            **({"stopped_early": "true"} if info.get("stopped") else {}),
            **(extra or {}),
        }
        return lora_io.build_metadata(arch=info["arch"], method=cfg.method, name=name, rank=cfg.rank,
                                      alpha=cfg.lora_alpha, components=comps, extra=extra)

    def write(self, ws: Workspace, name: str, comps: dict, meta: dict, pipe, cfg: TrainConfig, info: dict) -> list[Path]:
        """The library file, its kohya export and its JSON sidecar; with pivotal tuning the trigger's embedding in the
        library file's header, in the export (A1111's ``bundle_emb``) and as ``exports/<name>_emb.safetensors``."""
        vectors = embeddings.trained_vectors(pipe)
        header = {embeddings.META_KEY: embeddings.to_header({cfg.trigger: vectors})} if vectors else {}
        path = lora_io.save_lora(ws.lora_path(name), comps, {**meta, **header})
        kohya = ws.exports / f"{name}.kohya.safetensors"
        lora_io.write_kohya_export(kohya, {**lora_io.to_kohya(comps, info["arch"], cfg.lora_alpha, cfg.rank, pipe.unet.config),
                                           **embeddings.bundle(cfg.trigger, vectors, info["arch"])}, meta)
        extra_files = []
        if vectors:
            emb = ws.exports / f"{name}_emb.safetensors"
            lora_io.atomic_save_safetensors(emb, embeddings.standalone(vectors, info["arch"]),
                                            {"studio.token": cfg.trigger, "studio.base_arch": info["arch"]})
            extra_files.append(emb)
        ws.write_sidecar(name, {"name": name, "method": cfg.method, "architecture": info["arch"], "trigger": cfg.trigger,
                                "recommended_weight": cfg.recommended_weight, "config": to_dict(cfg),
                                **{k: v for k, v in info.items() if k != "arch"}, "kohya_export": str(kohya),
                                "role": meta.get("studio.role", "subject"), "source": meta.get("studio.source", ""),
                                # what A1111 reads from <name>.json beside a LoRA file
                                **{k: v for k, v in lora_io.a1111_sidecar(meta).items()
                                   if k in ("activation text", "preferred weight", "sd version")},
                                **({"embedding_file": str(extra_files[0])} if extra_files else {})})
        return [path, kohya, *extra_files]

    def save(self, pipe, cfg: TrainConfig, ws: Workspace, info: dict, final: bool) -> list[Path]:
        comps = self.components(pipe, cfg)
        return self.write(ws, cfg.name, comps, self.metadata(pipe, cfg, info, comps, cfg.name), pipe, cfg, info)
