"""Per-concept token embeddings trained beside the LoRA (pivotal tuning), and their files.

Papers: the ED-LoRA of Mix-of-Show (Gu et al., NeurIPS 2023, ``TencentARC/Mix-of-Show``) and orthogonal adaptation
(Po et al., CVPR 2024) give every concept new token embeddings, trained at lr 1e-3 beside its LoRA; diffusers'
``train_dreambooth_lora_sdxl_advanced.py`` does the same as "pivotal tuning" (``--train_text_encoder_ti``).

With ``TrainConfig.pivotal`` the trigger becomes a new token of every tokenizer (SD1.5: CLIP-L; SDXL: CLIP-L and
CLIP-G), inserted with diffusers' ``load_textual_inversion``; one vector per encoder is trained (``TrainedToken``),
the rest of the embedding table stays frozen. The vectors are written

* into the kohya export in A1111's bundled form, the keys A1111's ``extensions-builtin/Lora/networks.py`` reads as
  ``bundle_emb.<name>.<vector>``: ``bundle_emb.<trigger>.clip_l`` and ``.clip_g`` (SDXL),
  ``bundle_emb.<trigger>.string_to_param.*`` (SD1.5, a textual-inversion ``string_to_param``);
* into the library file's safetensors header (``studio.token_embeddings``, float32 as base64): diffusers'
  ``load_lora_weights`` refuses a file with tensors that are no LoRA weights, so the diffusers-format file keeps only
  LoRA tensors and still carries its trigger wherever it is copied, renamed or merged;
* as a standalone embedding ``exports/<name>_emb.safetensors`` for the embeddings folder of A1111 and ComfyUI:
  ``clip_l`` [n, 768] and ``clip_g`` [n, 1280] for SDXL (the file diffusers' advanced script writes), ``emb_params``
  [n, 768] for SD1.5 (kohya's and A1111's textual-inversion safetensors).

The studio's own generate / compose / merge paths load the vectors with the LoRA (``loaded_embeddings``; from the
header or from A1111's bundle, e.g. an imported kohya export) and remove them afterwards, so the trigger works.

Deviations: one vector per concept and encoder (ED-LoRA trains two tokens, V_rand + V_class, each layer-wise as in P+;
diffusers two per abstraction): one vector keeps the trigger a single token everywhere (prompts, the composition
engines' token positions, A1111, ComfyUI), and the class word in the prompt plays V_class's part. The vector starts
from the trigger's own embedding (a rare token) instead of a random one, so a run starts where the same run without
pivotal tuning starts. It trains for the whole run (diffusers' default stops at half the steps) with no weight decay.
"""

from __future__ import annotations

import base64
import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import InputError, LoraFormatError
from .lora_io import BUNDLE_PREFIX
from .models import ARCH_SDXL, architecture

BUNDLE = BUNDLE_PREFIX
PARAM = "pivotal_vector"  # the trainable parameter's name (trainers/loop.py collects it with the LoRA weights)
SD15_KEY = "string_to_param.*"
META_KEY = "studio.token_embeddings"  # the library file's header entry with its trigger's vectors (to_header)


def encoders(pipe) -> list[tuple[str, object, nn.Module]]:
    """``(file key, tokenizer, text encoder)`` for each text encoder: clip_l (and clip_g on SDXL)."""
    out = [("clip_l", pipe.tokenizer, pipe.text_encoder)]
    if architecture(pipe) == ARCH_SDXL:
        out.append(("clip_g", pipe.tokenizer_2, pipe.text_encoder_2))
    return out


def check_token(token: str) -> None:
    """A trigger that can become a new token: one lowercase word of letters and digits (CLIP lowercases prompts)."""
    if not token or not token.isascii() or not token.isalnum() or token != token.lower():
        raise InputError(f"Pivotal tuning makes the trigger a new token, so it must be one lowercase word of letters and "
                         f"digits (got {token!r}).")


class TrainedToken(nn.Module):
    """The token-embedding table with one trainable row: ``pivotal_vector`` replaces the frozen row of ``token_id``."""

    def __init__(self, base: nn.Embedding, token_id: int) -> None:
        super().__init__()
        self.base, self.token_id = base, token_id
        self.pivotal_vector = nn.Parameter(base.weight[token_id:token_id + 1].detach().float().clone())

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)
        hit = (ids == self.token_id).unsqueeze(-1)
        return torch.where(hit, self.pivotal_vector.to(out.dtype), out)


def _check(pipe, token: str, vectors: dict[str, torch.Tensor], owner: str) -> None:
    """Refuse an embedding that does not fit the pipeline's encoders or whose token the tokenizers already know."""
    for key, tok, te in encoders(pipe):
        vec = vectors.get(key)
        width = te.get_input_embeddings().weight.shape[1]
        if vec is None or vec.ndim != 2 or vec.shape[1] != width:
            raise LoraFormatError(f"{owner}: the embedding of {token!r} has no {key} vector of width {width} for this model "
                                  f"(got {None if vec is None else tuple(vec.shape)}).")
        if token in tok.get_vocab() or f"{token}_1" in tok.get_vocab():
            raise InputError(f"{owner}: the token {token!r} is already known to the tokenizer (another LoRA in this run "
                             "brings an embedding for it, or it is a word of the vocabulary): use LoRAs with different triggers.")


def _insert(pipe, token: str, vectors: dict[str, torch.Tensor]) -> None:
    """Add ``token`` with its vector(s) to every tokenizer and text encoder through diffusers' textual-inversion loader."""
    for key, tok, te in encoders(pipe):
        pipe.load_textual_inversion(vectors[key].to(te.device), token=token, tokenizer=tok, text_encoder=te)


def _remove(pipe, tokens: list[str]) -> None:
    """Remove ``tokens`` (and the ``<token>_<i>`` rows diffusers adds for a multi-vector embedding) again."""
    for _, tok, te in encoders(pipe):
        added = getattr(tok, "added_tokens_encoder", {})
        present = [a for a in added for t in tokens if a == t or (a.startswith(t + "_") and a[len(t) + 1:].isdigit())]
        if present:
            pipe.unload_textual_inversion(present, tokenizer=tok, text_encoder=te)


# --------------------------------------------------------------------------------------------------------- training
def start_pivotal(pipe, token: str) -> list[TrainedToken]:
    """Make ``token`` a new token of every tokenizer, starting from its current embedding, with a trainable vector."""
    check_token(token)
    start = {}
    for key, tok, te in encoders(pipe):
        ids = tok(token, add_special_tokens=False).input_ids
        start[key] = te.get_input_embeddings().weight[ids].detach().float().mean(0, keepdim=True)
    _check(pipe, token, start, "pivotal tuning")
    try:
        _insert(pipe, token, start)
    except BaseException:
        _remove(pipe, [token])
        raise
    wrapped = []
    for _, tok, te in encoders(pipe):
        layer = TrainedToken(te.get_input_embeddings(), tok.convert_tokens_to_ids(token))
        te.set_input_embeddings(layer)
        wrapped.append(layer)
    return wrapped


def trained_vectors(pipe) -> dict[str, torch.Tensor]:
    """The vectors being trained, per file key (empty when the pipeline has no ``TrainedToken``)."""
    out = {}
    for key, _, te in encoders(pipe):
        layer = te.get_input_embeddings()
        if isinstance(layer, TrainedToken):
            out[key] = layer.pivotal_vector.detach().float().cpu().contiguous()
    return out


def stop_pivotal(pipe, token: str) -> None:
    """Undo ``start_pivotal``: the original embedding tables, without the token."""
    for _, _, te in encoders(pipe):
        layer = te.get_input_embeddings()
        if isinstance(layer, TrainedToken):
            te.set_input_embeddings(layer.base)
    _remove(pipe, [token])


# --------------------------------------------------------------------------------------------------------- files
def bundle(token: str, vectors: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """A1111's bundled-embedding keys for a kohya LoRA file (empty for no vectors)."""
    if not vectors:
        return {}
    if arch == ARCH_SDXL:
        return {f"{BUNDLE}{token}.{k}": v for k, v in vectors.items()}
    return {f"{BUNDLE}{token}.{SD15_KEY}": vectors["clip_l"]}


def standalone(vectors: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """The tensors of an embeddings-folder file: clip_l/clip_g (SDXL) or emb_params (SD1.5)."""
    return dict(vectors) if arch == ARCH_SDXL else {"emb_params": vectors["clip_l"]}


def to_header(embeddings: dict[str, dict[str, torch.Tensor]]) -> str:
    """``{token: {"clip_l": [n, d], …}}`` as the JSON of the library file's ``studio.token_embeddings`` header entry
    (float32 little-endian, base64): the diffusers-format file stays loadable by ``load_lora_weights``, which refuses
    tensors that are no LoRA weights, and still carries its trigger's vectors wherever it is copied."""
    return json.dumps({token: {key: {"shape": list(v.shape), "float32": base64.b64encode(
        v.detach().float().cpu().contiguous().numpy().astype("<f4").tobytes()).decode()} for key, v in vecs.items()}
        for token, vecs in embeddings.items()}, sort_keys=True)


def from_header(text: str, owner: str = "LoRA") -> dict[str, dict[str, torch.Tensor]]:
    try:
        data = json.loads(text)
        out = {}
        for token, vecs in data.items():
            out[token] = {}
            for key, v in vecs.items():
                arr = np.frombuffer(base64.b64decode(v["float32"], validate=True), dtype="<f4").reshape(v["shape"])
                out[token][key] = torch.from_numpy(arr.astype(np.float32))
        return out
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise LoraFormatError(f"{owner}: its token embeddings ({META_KEY}) are unreadable ({exc}).") from None


def read_bundle(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{token: {"clip_l": [n, d], "clip_g": …}}`` from A1111's ``bundle_emb.*`` keys of a LoRA file's tensors."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith(BUNDLE):
            continue
        token, _, vec = key[len(BUNDLE):].partition(".")
        if vec.startswith("string_to_param.") or vec in ("emb_params", "*"):
            vec = "clip_l"  # an SD1.5 textual inversion
        value = value.float()
        out.setdefault(token, {})[vec] = value.unsqueeze(0) if value.ndim == 1 else value
    return out


def carried(tensors: dict[str, torch.Tensor], meta: dict[str, str], owner: str = "LoRA"):
    """The token embeddings of a LoRA file's tensors and header: the studio's header entry and A1111's ``bundle_emb``."""
    out = from_header(meta[META_KEY], owner) if meta.get(META_KEY) else {}
    out.update(read_bundle(tensors))
    return out


def file_bundle(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The token embeddings a LoRA file carries (``carried``), reading only the bundle tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return carried({k: f.get_tensor(k) for k in f.keys() if k.startswith(BUNDLE)}, f.metadata() or {},
                       Path(path).name)


def add_embeddings(pipe, paths: list[Path], added: list[str]) -> list[str]:
    """Load the token embeddings of the LoRA files ``paths`` into the pipeline's tokenizers and text encoders (a fused
    model keeps them); each token goes into ``added`` before it is inserted. Two files with one token are refused."""
    for path in paths:
        for token, vectors in file_bundle(path).items():
            if token in added:
                raise InputError(f"Two of these LoRAs bring an embedding for the token {token!r}: use LoRAs with "
                                 "different triggers.")
            _check(pipe, token, vectors, Path(path).name)
            added.append(token)  # before the insert: a half-done insert is undone too
            _insert(pipe, token, vectors)
    return added


@contextmanager
def loaded_embeddings(pipe, paths: list[Path]):
    """The token embeddings of the LoRA files ``paths`` in the pipeline for the duration; yields the tokens."""
    tokens: list[str] = []
    try:
        yield add_embeddings(pipe, paths, tokens)
    finally:
        if tokens:
            _remove(pipe, tokens)
