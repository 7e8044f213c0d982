"""DECOR: remove unwanted semantics from prompt embeddings at generation time.

Paper: G. Jang, J.-H. Kim, Y.-H. Park, J. Kim, G. Lee, Y. Jeong, "DECOR: Decomposition and Projection of Text
Embeddings for Text-to-Image Customization", arXiv 2412.09169 (Dec 2024). No official code was found.

What it does
------------
A LoRA fine-tuned on a few reference images overfits: the prompt's text embedding keeps pulling in what the references
showed (a background, the content of a style image, ...). DECOR is training-free and acts on the text-encoder output
X (l x d, the cross-attention conditioning). Given an *undesired* text u ("a woman", "grass") with embedding matrix
X~ = U~ S~ V~^T (thin SVD), it projects the prompt embedding away from the span of the top right singular vectors:

    X' = X - alpha * X V~ V~^T          (alpha in [0, 1]; alpha = 1 removes that subspace completely)

so X' V~ = (1 - alpha) X V~ and alpha = 0 leaves X unchanged. It never touches model weights, so it composes with any
LoRA stack (DreamBooth-LoRA, B-LoRA content/style, merged orthogonal LoRAs) and with every engine that takes prompt
embeddings. It is applied to the *conditional* prompt embeddings only; the negative/unconditional ones are left alone.

What was verified and what was chosen
-------------------------------------
Only the abstract and third-party summaries of the paper could be read (the full text was not reachable from this
workplace); the studio's research note ``shared/reference/methods-training.md`` section 3 says the same. Verified:
the projection formula above, X~ being the embedding matrix of the undesired text with V~ its right singular vectors,
X = [X_w; X_PAD] (word-token rows plus the padding rows up to l = 77, i.e. the encoder *output*), inference-only use,
and that alpha controls the projection degree. Everything below is a documented choice, exposed as a parameter:

* Defaults (session 18, measured with ``bench/decor_defaults.py``; bench/README.md, "DECOR's default is now the
  paper's basis"): the paper's own basis with one component: rows ``"all-but-bos"``, reference ``"none"``, k = 1,
  alpha = 1, nothing kept. Its top direction is the padding axis of the removed text's rows, the "dominant axes linked
  to PAD tokens" that a summary of the paper says DECOR suppresses. On LoRAs trained as the paper's DreamBooth ones
  are (one short prompt, "a kavo emblem", uniform references) removing the leaked phrase lowered the leaked
  background by 14.1 [5.5, 22.6] points (64 paired images) and 13.3 [7.0, 19.5] (128, a second draw, two subjects),
  where the previous default changed nothing. The subject fidelity cost of removing an unrelated phrase, pooled over
  736 paired images of 13 LoRAs of three kinds, is 2.9 / 3.9 points (out of / in the toy encoders' vocabulary; goal
  at most 5; the previous default 1.5 / 0.1), up to 10.9 points on one pair of LoRAs. Removing an unrelated phrase
  lowers the leak too, by about half as much: the projection damps the channel the LoRA overfit on more than it
  targets the phrase. Leaks of LoRAs trained on full captions move little (the flat style of captioned
  references: -2.8 points from 4.7%; an uncaptioned companion object: +1.0 from 94%). This answers the worry that the
  padding axis removes what every prompt shares: with k = 1 the cost is measured and small; ``"auto"`` (90% of the
  energy) was the setting that cost 44 points (session 15).
* Rows (``DecorSpec.rows``): the same row set selects the rows of X~ that build the basis and the rows of X that are
  projected. ``"all-but-bos"`` (words, EOS and padding) is the paper's X = [X_w; X_PAD]; ``"words"`` and
  ``"words+eos"`` are narrower (``"words"`` was the default of sessions 10-17: it costs the subject least but never
  lowered a leak). The BOS row (index 0) never drives the basis and is never altered, whatever the choice: in CLIP it
  is identical for every prompt (causal attention) and has a very large norm, so it would dominate the SVD and
  projecting it would damage every prompt. This deviates from a literal X~ that included BOS, if the paper did (its
  X = [X_w; X_PAD] suggests it did not).
* Reference (``DecorSpec.reference``): ``"none"`` is the literal formula (X~ itself). ``"null"`` (our extension, the
  default of sessions 9-17) builds the basis from X~ - X~_null, the removed text's rows minus the empty prompt's rows
  at the same positions, i.e. from what the text *adds*, so the directions every prompt shares are spared.
* Number of components (``DecorSpec.components``, default 1): an integer k, or ``"auto"`` = the smallest k whose
  top-k singular values hold at least ``AUTO_ENERGY`` = 90 % of the squared singular-value energy of the selected rows
  (``"auto:0.99"`` picks another threshold). k larger than the numerical rank of those rows is an error. The paper has
  an "impact of components" analysis whose numbers were not available; ``"auto"`` with the literal basis cost 44
  points of subject on the toy (session 15).
* Strength (``DecorSpec.strength``, default 1.0): the abstract describes projecting "onto a vector space orthogonal to
  undesired token vectors", which is alpha = 1; lower values keep part of the undesired component (alpha 0.5 halved
  the leak's reduction on the toy, to within noise). The paper's alpha grid and default were not available.
* Keep (``DecorSpec.keep``, default empty = nothing; ``GenerateConfig.decor_keep`` ``"triggers"`` = the trigger phrases
  of the LoRAs in use; our extension, not from the paper): per prompt, the basis is made orthogonal to the prompt's
  rows of the kept words (:func:`protect`), so those rows pass unchanged and only directions they do not use are
  removed. It was generate's default in sessions 9-17; with the paper's basis it halves the leak's reduction (-6.2
  points with the trigger kept, -14.1 without, same LoRA and seeds). Compositions still protect their concepts'
  tokens, whose rows steer the regional engines. The toy model reacts strongly to any change of its conditioning, so
  real models may differ.
* SDXL (``per_encoder``, default True): SDXL's prompt embedding is the concatenation of CLIP-L (768) and OpenCLIP bigG
  (1280) penultimate hidden states. With ``per_encoder`` each encoder's column block gets its own basis from its own
  columns of X~ (the two encoders live in unrelated spaces); otherwise one basis over the full 2048 width. Unverified
  which the paper used.
* SDXL pooled embedding (``pooled``, default False): untouched unless asked. When asked, it is projected away from the
  (unit) pooled embedding of the undesired text, a rank-1 basis, since the pooled vector lives in the text-projection
  space, not in the hidden-state space. This is our extension, not from the paper.
* The SVD runs in float32 on the embeddings' device whatever their dtype; results are cast back. Rows that are not
  projected are copied bit for bit.

Public API (what ``pipelines/``, the CLI and the UI use)
--------------------------------------------------------
``DecorSpec``, ``token_kinds``, ``tokenize_for_decor``, ``rows_mask``, ``decor_basis``, ``protect``, ``project``,
``apply_decor``,
``encode_for_decor`` / ``apply_decor_with_pipeline`` (diffusers SD/SDXL convenience), ``analyze`` -> ``DecorAnalysis``.
"""


import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from studio.errors import InputError

logger = logging.getLogger(__name__)

# Row kinds returned by token_kinds()
KIND_BOS, KIND_WORD, KIND_EOS, KIND_PAD = 0, 1, 2, 3
KIND_NAMES = {KIND_BOS: "BOS", KIND_WORD: "word", KIND_EOS: "EOS", KIND_PAD: "PAD"}

ROWS_CHOICES = ("words", "words+eos", "all-but-bos")
_ROWS_KINDS = {
    "words": (KIND_WORD,),
    "words+eos": (KIND_WORD, KIND_EOS),
    "all-but-bos": (KIND_WORD, KIND_EOS, KIND_PAD),
}
DEFAULT_ROWS = "all-but-bos"
REFERENCE_CHOICES = ("null", "none")
DEFAULT_REFERENCE = "none"
DEFAULT_COMPONENTS = 1
AUTO_ENERGY = 0.9
DEFAULT_STRENGTH = 1.0
CLIP_MAX_LENGTH = 77


# --------------------------------------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------------------------------------
def _parse_components(value: Any) -> int | str:
    """Normalise ``components``: a positive int, ``"auto"`` or ``"auto:<energy>"``. Raises InputError."""
    if isinstance(value, bool):
        raise InputError(f"DECOR components must be a whole number of at least 1 or 'auto', not {value!r}.")
    if isinstance(value, int):
        k = value
    elif isinstance(value, float) and value.is_integer():
        k = int(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        if text.startswith("auto:"):
            try:
                energy = float(text[5:])
            except ValueError:
                energy = float("nan")
            if not (0.0 < energy <= 1.0):
                raise InputError(
                    f"DECOR components {value!r}: the energy after 'auto:' must be a number in (0, 1], e.g. 'auto:0.95'."
                )
            return f"auto:{energy:g}"
        try:
            k = int(text)
        except ValueError:
            raise InputError(
                f"DECOR components must be a whole number of at least 1 or 'auto', not {value!r}."
            ) from None
    else:
        raise InputError(f"DECOR components must be a whole number of at least 1 or 'auto', not {value!r}.")
    if k < 1:
        raise InputError(f"DECOR components must be at least 1 (got {k}); use 'auto' to pick it from the text.")
    return k


@dataclass(kw_only=True)
class DecorSpec:
    """What to remove from the prompt embeddings and how strongly. Saved with every output that used it."""

    remove: str = field(
        metadata={
            "help": "Text describing what to keep out of the image (e.g. 'grass' or 'a woman'). Its embedding's main "
            "directions are projected out of the prompt embedding."
        }
    )
    strength: float = field(
        default=DEFAULT_STRENGTH,
        metadata={
            "help": "How much of the unwanted directions to remove, from 0 (nothing: same image as without DECOR) to "
            "1 (all of it)."
        },
    )
    components: int | str = field(
        default=DEFAULT_COMPONENTS,
        metadata={
            "help": "How many directions of the removed text to project out: a whole number (default 1), or 'auto' "
            "(enough to cover 90% of its energy; 'auto:0.99' sets another share)."
        },
    )
    rows: str = field(
        default=DEFAULT_ROWS,
        metadata={
            "help": "Which token rows build the directions and get projected: 'words', 'words+eos' or "
            "'all-but-bos' (words, end and padding tokens). The start token is never changed.",
            "choices": ROWS_CHOICES,
        },
    )
    per_encoder: bool = field(
        default=True,
        metadata={
            "help": "SDXL only: give each text encoder's part of the embedding its own directions (on) or use one set "
            "over the full width (off)."
        },
    )
    pooled: bool = field(
        default=False,
        metadata={"help": "SDXL only: also project the pooled text embedding away from the removed text's one."},
    )
    reference: str = field(
        default=DEFAULT_REFERENCE,
        metadata={
            "help": "'null': build the directions from what the removed text adds to the empty prompt's embedding "
            "(row by row), so the directions every prompt shares are not removed; 'none': from its embedding as is.",
            "choices": REFERENCE_CHOICES,
        },
    )
    keep: str = field(
        default="",
        metadata={
            "help": "Words of the prompt to protect, e.g. a LoRA's trigger: the removed directions are made orthogonal "
            "to those words' rows of the prompt embedding, so they pass unchanged. Empty (the default): nothing "
            "protected."
        },
    )

    def __post_init__(self) -> None:
        if not isinstance(self.remove, str) or not self.remove.strip():
            raise InputError("DECOR needs some text to remove (e.g. 'grass'); the text to remove is empty.")
        self.remove = self.remove.strip()
        strength = self.strength
        if isinstance(strength, bool) or not isinstance(strength, (int, float, str)):
            raise InputError(f"DECOR strength must be a number between 0 and 1, not {strength!r}.")
        try:
            strength = float(strength)
        except ValueError:
            raise InputError(f"DECOR strength must be a number between 0 and 1, not {self.strength!r}.") from None
        if not math.isfinite(strength) or not (0.0 <= strength <= 1.0):
            raise InputError(f"DECOR strength must be between 0 and 1 (got {self.strength!r}).")
        self.strength = strength
        self.components = _parse_components(self.components)
        if self.rows not in ROWS_CHOICES:
            raise InputError(f"DECOR rows must be one of {', '.join(ROWS_CHOICES)} (got {self.rows!r}).")
        self.per_encoder = bool(self.per_encoder)
        self.pooled = bool(self.pooled)
        if self.reference not in REFERENCE_CHOICES:
            raise InputError(f"DECOR reference must be one of {', '.join(REFERENCE_CHOICES)} (got {self.reference!r}).")
        self.keep = (self.keep or "").strip()


# --------------------------------------------------------------------------------------------------------------------
# Token rows
# --------------------------------------------------------------------------------------------------------------------
def token_kinds(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Row kind of every token position, from CLIP input ids ``[..., L]``.

    Index 0 is BOS; positions up to the first ``eos_token_id`` after it are words; the first EOS is EOS; everything after
    it is padding (whatever the pad id is: EOS for SD1.5's tokenizer, "!" for SDXL's second one). A sequence without
    EOS (not produced by CLIP tokenizers) is all words after BOS. Returns a long tensor of ``KIND_*`` codes.
    """
    ids = torch.as_tensor(input_ids)
    is_eos = ids == eos_token_id
    is_eos[..., 0] = False
    seen = torch.cumsum(is_eos.long(), dim=-1)
    kinds = torch.full_like(ids, KIND_WORD, dtype=torch.long)
    kinds[seen >= 1] = KIND_PAD
    kinds[is_eos & (seen == 1)] = KIND_EOS
    kinds[..., 0] = KIND_BOS
    return kinds


def _max_length(tokenizer: Any, max_length: int | None) -> int:
    if max_length is not None:
        return int(max_length)
    n = getattr(tokenizer, "model_max_length", None)
    # tokenizers built from bare vocab/merges files report a huge sentinel; CLIP's context is 77
    return int(n) if isinstance(n, int) and 0 < n <= 4096 else CLIP_MAX_LENGTH


def tokenize_for_decor(
    tokenizer: Any, texts: str | Sequence[str], *, max_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[list[str]]]:
    """Tokenize like diffusers' ``encode_prompt`` (pad to max length, truncate) and return
    ``(input_ids [B, L], kinds [B, L], tokens)`` where ``tokens[b][i]`` is a readable string for row i
    (``[BOS]``, ``[EOS]``, ``[PAD]`` or the word piece without its ``</w>`` suffix)."""
    if isinstance(texts, str):
        texts = [texts]
    length = _max_length(tokenizer, max_length)
    enc = tokenizer(list(texts), padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    ids = enc.input_ids
    kinds = token_kinds(ids, tokenizer.eos_token_id)
    tokens: list[list[str]] = []
    for row_ids, row_kinds in zip(ids.tolist(), kinds.tolist()):
        pieces = tokenizer.convert_ids_to_tokens(row_ids)
        out = []
        for piece, kind in zip(pieces, row_kinds):
            if kind == KIND_WORD:
                out.append(str(piece).replace("</w>", ""))
            else:
                out.append(f"[{KIND_NAMES[kind]}]")
        tokens.append(out)
    return ids, kinds, tokens


def rows_mask(token_mask: torch.Tensor, rows: str = DEFAULT_ROWS) -> torch.Tensor:
    """Boolean mask ``[..., L]`` of the rows DECOR uses.

    ``token_mask`` is either a kinds tensor from :func:`token_kinds` (integer; ``rows`` picks the kinds) or a boolean
    mask of rows chosen by the caller (``rows`` is then ignored). Either way row 0 (BOS) is never selected.
    """
    if rows not in ROWS_CHOICES:
        raise InputError(f"DECOR rows must be one of {', '.join(ROWS_CHOICES)} (got {rows!r}).")
    token_mask = torch.as_tensor(token_mask)
    if token_mask.dtype == torch.bool:
        mask = token_mask.clone()
    else:
        mask = torch.zeros(token_mask.shape, dtype=torch.bool, device=token_mask.device)
        for kind in _ROWS_KINDS[rows]:
            mask |= token_mask == kind
    mask[..., 0] = False
    return mask


# --------------------------------------------------------------------------------------------------------------------
# Core math
# --------------------------------------------------------------------------------------------------------------------
def _numerical_rank(s: torch.Tensor, shape: tuple[int, int]) -> int:
    if s.numel() == 0 or float(s[0]) <= 0.0:
        return 0
    tol = float(s[0]) * max(shape) * torch.finfo(torch.float32).eps
    return int((s > tol).sum())


def _auto_k(s: torch.Tensor, rank: int, energy: float) -> int:
    e = s[:rank].double() ** 2
    cum = torch.cumsum(e, 0) / e.sum()
    k = int((cum < energy - 1e-12).sum()) + 1
    return max(1, min(k, rank))


def _resolve_k(k: int | str, s: torch.Tensor, rank: int, energy: float) -> int:
    if isinstance(k, str):
        parsed = _parse_components(k)
        if isinstance(parsed, str):
            if parsed.startswith("auto:"):
                energy = float(parsed[5:])
            return _auto_k(s, rank, energy)
        k = parsed
    else:
        k = _parse_components(k)
    if k > rank:
        raise InputError(
            f"DECOR components = {k} is more than the {rank} independent direction(s) in the embedding of the text to "
            f"remove; use at most {rank}, or 'auto'."
        )
    return int(k)


def _squeeze_single(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.dim() == 3:
        if t.shape[0] != 1:
            raise ValueError(f"{what}: expected a single sequence, got batch of {t.shape[0]}")
        t = t[0]
    return t


def decor_basis(
    remove_embeds: torch.Tensor,
    k: int | str,
    rows_mask: torch.Tensor,
    *,
    energy: float = AUTO_ENERGY,
) -> torch.Tensor:
    """Top-k right singular vectors of the selected rows of the undesired text's embedding.

    ``remove_embeds``: ``[L, D]`` (or ``[1, L, D]``); ``rows_mask``: boolean ``[L]`` (row 0, BOS, is always dropped);
    ``k``: a positive int, ``"auto"`` (energy threshold ``energy``) or ``"auto:<energy>"``.
    Returns ``V`` of shape ``[D, k]``, float32, orthonormal columns, on the embeddings' device.
    Raises InputError when no row is selected or k exceeds the numerical rank of the selected rows.
    """
    X = _squeeze_single(torch.as_tensor(remove_embeds), "remove_embeds")
    mask = torch.as_tensor(rows_mask, dtype=torch.bool)
    if mask.dim() == 2 and mask.shape[0] == 1:
        mask = mask[0]
    mask = mask.to(X.device).clone()
    if mask.shape != X.shape[:1]:
        raise ValueError(f"rows_mask has shape {tuple(mask.shape)}, expected ({X.shape[0]},)")
    mask[0] = False
    rows = X[mask].float()
    if rows.shape[0] == 0:
        raise InputError("DECOR: the text to remove has no token rows of the chosen kind; try rows='all-but-bos'.")
    _, s, vh = torch.linalg.svd(rows, full_matrices=False)
    rank = _numerical_rank(s, tuple(rows.shape))
    if rank == 0:
        raise InputError("DECOR: the embedding of the text to remove is all zeros; nothing to project out.")
    kk = _resolve_k(k, s, rank, energy)
    return vh[:kk].T.contiguous()


def protect(V: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``V`` (``[D, k]``, orthonormal) made orthogonal to the span of ``rows`` (``[n, D]``, the prompt rows to keep),
    re-orthonormalised; a column with (almost) nothing left outside that span is dropped, so the result is ``[D, k']``
    with ``k' <= k`` (``k' = 0``: nothing to remove). Projecting with it leaves ``rows`` exactly as they are."""
    Vf = V.float()
    if rows.shape[0] == 0:
        return Vf
    A = rows.to(device=V.device, dtype=torch.float32)
    _, s, vh = torch.linalg.svd(A, full_matrices=False)
    Q = vh[: _numerical_rank(s, tuple(A.shape))].T  # [D, r]
    R = Vf - Q @ (Q.T @ Vf)
    keep = R.norm(dim=0) > 1e-4
    if not bool(keep.any()):
        return Vf[:, :0]
    Qr, _ = torch.linalg.qr(R[:, keep])
    return Qr


def project(
    X: torch.Tensor, V: torch.Tensor, strength: float, rows_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``X' = X - strength * X V V^T`` on the selected rows; all other rows (and BOS, row 0) are bit-identical.

    ``X``: ``[..., L, D]``; ``V``: ``[D, k]`` with orthonormal columns; ``rows_mask``: boolean broadcastable to
    ``[..., L]`` (``None`` = every row but BOS). Computed in float32, returned in ``X.dtype``.
    """
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not (0.0 <= float(strength) <= 1.0):
        raise InputError(f"DECOR strength must be between 0 and 1 (got {strength!r}).")
    if V.dim() != 2 or V.shape[0] != X.shape[-1]:
        raise ValueError(f"basis has shape {tuple(V.shape)}, expected ({X.shape[-1]}, k)")
    if rows_mask is None:
        mask = torch.ones(X.shape[-2], dtype=torch.bool, device=X.device)
    else:
        mask = torch.as_tensor(rows_mask, dtype=torch.bool).to(X.device).clone()
    mask[..., 0] = False
    if float(strength) == 0.0:
        return X.clone()
    Vf = V.to(device=X.device, dtype=torch.float32)
    Xf = X.float()
    projected = (Xf - float(strength) * (Xf @ Vf) @ Vf.T).to(X.dtype)
    return torch.where(mask.unsqueeze(-1), projected, X)


# --------------------------------------------------------------------------------------------------------------------
# Applying a spec to SD1.5 / SDXL embeddings
# --------------------------------------------------------------------------------------------------------------------
def _blocks(width: int, encoder_widths: Sequence[int] | None, per_encoder: bool) -> list[tuple[int, int]]:
    if encoder_widths is None or not per_encoder:
        if encoder_widths is not None and sum(encoder_widths) != width:
            raise ValueError(f"encoder_widths {list(encoder_widths)} do not add up to the embedding width {width}")
        return [(0, width)]
    if sum(encoder_widths) != width:
        raise ValueError(f"encoder_widths {list(encoder_widths)} do not add up to the embedding width {width}")
    out, start = [], 0
    for w in encoder_widths:
        out.append((start, start + int(w)))
        start += int(w)
    return out


def _expand_batch(mask: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """``[L]`` -> broadcast; ``[b, L]`` with batch % b == 0 -> repeat_interleave (diffusers repeats each prompt's
    embeddings contiguously for num_images_per_prompt)."""
    if mask.dim() == 1:
        return mask.unsqueeze(0).expand(batch, -1)
    if mask.dim() != 2:
        raise ValueError(f"{what} must be [L] or [B, L], got shape {tuple(mask.shape)}")
    if mask.shape[0] == batch:
        return mask
    if mask.shape[0] >= 1 and batch % mask.shape[0] == 0:
        return mask.repeat_interleave(batch // mask.shape[0], dim=0)
    raise ValueError(f"{what} has batch {mask.shape[0]}, which does not divide the embeddings' batch {batch}")


def _per_block(mask: Any, n_blocks: int, n_encoders: int) -> list[Any]:
    """A mask may be given once, or once per encoder (SDXL with a different prompt_2)."""
    if isinstance(mask, (list, tuple)):
        if len(mask) != n_encoders:
            raise ValueError(f"got {len(mask)} token masks for {n_encoders} text encoders")
        if n_blocks == n_encoders:
            return list(mask)
        first = torch.as_tensor(mask[0])
        if any(not torch.equal(first, torch.as_tensor(m)) for m in mask[1:]):
            raise ValueError("full-width DECOR (per_encoder=False) needs the same token rows for every encoder")
        return [first] * n_blocks
    return [mask] * n_blocks


def apply_decor(
    prompt_embeds: torch.Tensor,
    remove_embeds: torch.Tensor,
    spec: DecorSpec,
    *,
    prompt_token_mask: torch.Tensor | Sequence[torch.Tensor],
    remove_token_mask: torch.Tensor | Sequence[torch.Tensor],
    encoder_widths: Sequence[int] | None = None,
    pooled: torch.Tensor | None = None,
    remove_pooled: torch.Tensor | None = None,
    energy: float = AUTO_ENERGY,
    null_embeds: torch.Tensor | None = None,
    keep_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply ``spec`` to conditional prompt embeddings. Returns ``(embeds, pooled)``; inputs are not modified.

    * ``prompt_embeds``: ``[B, L, D]`` (or ``[L, D]``): conditional embeddings from ``pipe.encode_prompt``.
    * ``remove_embeds``: ``[1, L, D]`` or ``[L, D]``: the same encoders' output for ``spec.remove``.
    * ``prompt_token_mask`` / ``remove_token_mask``: kinds from :func:`token_kinds` (or boolean row masks), ``[L]`` or
      ``[b, L]``; a prompt mask with b dividing B is repeated per image (``num_images_per_prompt``). For SDXL a list
      with one mask per encoder is accepted (when prompt_2 differs from prompt).
    * ``encoder_widths``: ``None`` for SD1.5; ``[768, 1280]`` (the encoders' hidden sizes) for SDXL. With
      ``spec.per_encoder`` each column block gets its own basis; otherwise one basis over the full width.
    * ``pooled`` / ``remove_pooled``: SDXL pooled embeddings ``[B, P]`` / ``[1, P]``; changed only if ``spec.pooled``.
    * ``null_embeds``: the same encoders' output for the empty text, shaped like ``remove_embeds``; when given, the
      basis is built from ``remove_embeds - null_embeds`` (``spec.reference == "null"``; ``apply_decor_with_pipeline``
      passes it).
    * ``keep_mask``: boolean ``[L]`` or ``[b, L]`` rows of the prompt to protect (``spec.keep``; built by
      ``apply_decor_with_pipeline``): per prompt and block the basis is made orthogonal to those rows (:func:`protect`),
      so those rows pass unchanged (up to rounding) and the other rows lose only directions the kept rows do not use.

    With ``spec.strength == 0`` the embeddings come back unchanged (exact copies).
    """
    X = torch.as_tensor(prompt_embeds)
    squeeze = X.dim() == 2
    if squeeze:
        X = X.unsqueeze(0)
    if X.dim() != 3:
        raise ValueError(f"prompt_embeds must be [B, L, D], got shape {tuple(X.shape)}")
    R = _squeeze_single(torch.as_tensor(remove_embeds), "remove_embeds")
    if R.shape[-1] != X.shape[-1] or R.shape[0] != X.shape[1]:
        raise ValueError(f"remove_embeds shape {tuple(R.shape)} does not match prompt_embeds {tuple(X.shape)}")
    if null_embeds is not None:
        N = _squeeze_single(torch.as_tensor(null_embeds), "null_embeds")
        if N.shape != R.shape:
            raise ValueError(f"null_embeds shape {tuple(N.shape)} does not match remove_embeds {tuple(R.shape)}")
        R = R.float() - N.to(R.device).float()
    if spec.pooled and (pooled is None or remove_pooled is None):
        raise InputError("DECOR 'pooled' applies to SDXL only: this model has no pooled text embedding.")

    n_enc = len(encoder_widths) if encoder_widths is not None else 1
    blocks = _blocks(X.shape[-1], encoder_widths, spec.per_encoder)
    p_masks = _per_block(prompt_token_mask, len(blocks), n_enc)
    r_masks = _per_block(remove_token_mask, len(blocks), n_enc)

    out = X.clone()
    chosen = []
    for (c0, c1), pm, rm in zip(blocks, p_masks, r_masks):
        rm = torch.as_tensor(rm)
        if rm.dim() == 2:
            if rm.shape[0] != 1:
                raise ValueError("remove_token_mask must describe a single sequence")
            rm = rm[0]
        V = decor_basis(R[:, c0:c1], spec.components, rows_mask(rm, spec.rows), energy=energy)
        chosen.append(V.shape[1])
        pmask = _expand_batch(rows_mask(torch.as_tensor(pm), spec.rows), X.shape[0], "prompt_token_mask")
        if keep_mask is None:
            out[..., c0:c1] = project(X[..., c0:c1], V, spec.strength, pmask)
            continue
        kmask = _expand_batch(torch.as_tensor(keep_mask, dtype=torch.bool).to(X.device), X.shape[0], "keep_mask")
        for b in range(X.shape[0]):  # each prompt keeps its own rows: one basis per prompt
            Vb = protect(V, X[b, kmask[b], c0:c1].float())
            out[b, :, c0:c1] = project(X[b, :, c0:c1], Vb, spec.strength, pmask[b])
    logger.info("DECOR: removed %s component(s) of %r at strength %g", chosen, spec.remove, spec.strength)

    new_pooled = pooled
    if spec.pooled and pooled is not None and remove_pooled is not None:
        rp = torch.as_tensor(remove_pooled).reshape(-1, pooled.shape[-1])[0].float().to(pooled.device)
        norm = rp.norm()
        if float(norm) == 0.0:
            raise InputError("DECOR: the pooled embedding of the text to remove is all zeros; nothing to project out.")
        v = (rp / norm).unsqueeze(1)  # [P, 1]: rank-1 basis
        # not project(): that never touches row 0, and a pooled vector is a single row
        if spec.strength == 0:
            new_pooled = pooled.clone()
        else:
            pf = pooled.float()
            new_pooled = (pf - float(spec.strength) * (pf @ v) @ v.T).to(pooled.dtype)
    return (out[0] if squeeze else out), new_pooled


# --------------------------------------------------------------------------------------------------------------------
# diffusers convenience (SD1.5 and SDXL pipelines)
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class EncodedText:
    """One text encoded by a pipeline's text encoder(s), with what DECOR needs about its rows."""

    embeds: torch.Tensor  # [1, L, D]
    pooled: torch.Tensor | None  # [1, P] (SDXL) or None
    kinds: torch.Tensor  # [1, L]
    tokens: list[str]  # L readable tokens
    encoder_widths: list[int] | None  # None for single-encoder models


def _encoder_widths(pipe: Any) -> list[int] | None:
    encs = [e for e in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if e is not None]
    if getattr(pipe, "text_encoder_2", None) is None:
        return None
    return [int(e.config.hidden_size) for e in encs]


def _kind_tokenizer(pipe: Any) -> Any:
    return getattr(pipe, "tokenizer", None) or getattr(pipe, "tokenizer_2")


@torch.no_grad()
def encode_for_decor(
    pipe: Any, text: str, *, device: Any = None, clip_skip: int | None = None, lora_scale: float | None = None
) -> EncodedText:
    """Encode ``text`` exactly as ``pipe.encode_prompt`` does for a prompt (same layers, same LoRA state; pass the
    same ``clip_skip`` and ``lora_scale`` as for the prompt), without classifier-free guidance, and compute its row
    kinds. Works with diffusers SD1.5 and SDXL pipelines."""
    device = device if device is not None else getattr(pipe, "_execution_device", None) or pipe.device
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    if sdxl:
        res = pipe.encode_prompt(
            text,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            lora_scale=lora_scale,
            clip_skip=clip_skip,
        )
        embeds, pooled = res[0], res[2]
    else:
        res = pipe.encode_prompt(text, device, 1, False, lora_scale=lora_scale, clip_skip=clip_skip)
        embeds, pooled = res[0], None
    tok = _kind_tokenizer(pipe)
    _, kinds, tokens = tokenize_for_decor(tok, [text], max_length=embeds.shape[1])
    return EncodedText(embeds, pooled, kinds.to(embeds.device), tokens[0], _encoder_widths(pipe))


def apply_decor_with_pipeline(
    pipe: Any,
    spec: DecorSpec,
    prompts: str | Sequence[str],
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor | None = None,
    *,
    clip_skip: int | None = None,
    lora_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One call for ``pipelines/generate.py``: after ``pipe.encode_prompt(prompts, ...)`` pass the *conditional*
    embeddings here; returns ``(prompt_embeds, pooled_prompt_embeds)`` with DECOR applied. ``prompts`` are the texts
    that were encoded (one per prompt; embeddings may hold num_images_per_prompt copies of each); pass the
    ``clip_skip`` and ``lora_scale`` used for them so the removed text is encoded the same way."""
    if isinstance(prompts, str):
        prompts = [prompts]
    removed = encode_for_decor(
        pipe, spec.remove, device=prompt_embeds.device, clip_skip=clip_skip, lora_scale=lora_scale
    )
    null = None
    if spec.reference == "null":
        null = encode_for_decor(pipe, "", device=prompt_embeds.device, clip_skip=clip_skip, lora_scale=lora_scale).embeds
    tok = _kind_tokenizer(pipe)
    ids, kinds, _ = tokenize_for_decor(tok, list(prompts), max_length=prompt_embeds.shape[1])
    keep_mask = None
    if spec.keep:
        keep_ids, keep_kinds, _ = tokenize_for_decor(tok, spec.keep, max_length=prompt_embeds.shape[1])
        words = keep_ids[keep_kinds == KIND_WORD]
        keep_mask = (torch.isin(ids, words) & (kinds == KIND_WORD)).to(prompt_embeds.device)
        if not bool(keep_mask.any()):
            logger.info("DECOR: no word of %r is in the prompt; nothing protected", spec.keep)
    return apply_decor(
        prompt_embeds,
        removed.embeds,
        spec,
        prompt_token_mask=kinds.to(prompt_embeds.device),
        remove_token_mask=removed.kinds,
        encoder_widths=removed.encoder_widths,
        pooled=pooled_prompt_embeds,
        remove_pooled=removed.pooled,
        null_embeds=null,
        keep_mask=keep_mask,
    )


# --------------------------------------------------------------------------------------------------------------------
# Component analysis (``studio decor analyze``)
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class RowAnalysis:
    index: int
    kind: str  # "word" | "EOS" | "PAD"
    token: str
    norm: float
    fractions: list[float]  # share of the row's squared norm along each of the top-k components
    top: float  # sum of fractions: share in the top-k subspace
    removed: float | None = None  # share in the removal basis (what alpha = 1 would remove), when one was given


@dataclass
class BlockAnalysis:
    name: str
    columns: tuple[int, int]
    singular_values: list[float]
    k: int
    rows: list[RowAnalysis]

    @property
    def energy(self) -> list[float]:
        sq = [s * s for s in self.singular_values]
        total = sum(sq) or 1.0
        return [x / total for x in sq]


@dataclass
class DecorAnalysis:
    """Singular values of a prompt's embedding and how much of each token row lies in the top components."""

    prompt: str | None
    rows_choice: str
    blocks: list[BlockAnalysis]

    def _summary_rows(self, block: BlockAnalysis) -> list[RowAnalysis]:
        """Word and EOS rows as they are; the padding rows averaged into one row."""
        out = [r for r in block.rows if r.kind != "PAD"]
        pads = [r for r in block.rows if r.kind == "PAD"]
        if pads:
            n = len(pads)
            fr = [sum(r.fractions[j] for r in pads) / n for j in range(block.k)]
            removed = None if pads[0].removed is None else sum(r.removed for r in pads) / n
            out.append(
                RowAnalysis(-1, "PAD", f"[PAD]x{n} mean", sum(r.norm for r in pads) / n, fr, sum(fr), removed)
            )
        return out

    def to_table(self, max_singular: int = 16) -> str:
        lines = []
        title = "DECOR component analysis"
        if self.prompt is not None:
            title += f' of "{self.prompt}"'
        lines.append(title)
        for block in self.blocks:
            lines.append("")
            lines.append(
                f"[{block.name}] columns {block.columns[0]}:{block.columns[1]}, rows: {self.rows_choice} "
                f"({len(block.rows)} rows), top-k = {block.k}"
            )
            lines.append(f"{'#':>4} {'sigma':>10} {'energy':>7} {'cumul.':>7}")
            cum = 0.0
            for i, (s, e) in enumerate(zip(block.singular_values, block.energy)):
                if i >= max_singular:
                    lines.append(f"{'...':>4} ({len(block.singular_values) - max_singular} more)")
                    break
                cum += e
                lines.append(f"{i + 1:>4} {s:>10.4f} {e:>7.3f} {cum:>7.3f}")
            has_removed = any(r.removed is not None for r in block.rows)
            head = f"{'row':>4} {'kind':<5} {'token':<16} {'norm':>8} " + " ".join(
                f"{'c' + str(j + 1):>6}" for j in range(block.k)
            )
            head += f" {'top-k':>6}" + (f" {'removed':>7}" if has_removed else "")
            lines.append("")
            lines.append("Share of each token row's energy in the top components:")
            lines.append(head)
            for r in self._summary_rows(block):
                idx = "" if r.index < 0 else str(r.index)
                tok = r.token if len(r.token) <= 16 else r.token[:15] + "~"
                line = f"{idx:>4} {r.kind:<5} {tok:<16} {r.norm:>8.3f} " + " ".join(f"{f:>6.3f}" for f in r.fractions)
                line += f" {r.top:>6.3f}"
                if has_removed:
                    line += f" {r.removed:>7.3f}" if r.removed is not None else f" {'':>7}"
                lines.append(line)
        return "\n".join(lines)

    def save_plot(self, path: str | os.PathLike) -> str:
        """Write a PNG (Pillow only): per block, a bar chart of singular values and a heatmap of per-token shares.
        Written atomically; returns the path."""
        from PIL import Image, ImageDraw, ImageFont

        font = ImageFont.load_default()
        cell_w, cell_h, label_w, pad = 34, 16, 150, 12
        bar_w, bar_h = 12, 160
        panels = []
        for block in self.blocks:
            rows = self._summary_rows(block)
            n_sv = min(len(block.singular_values), 32)
            has_removed = any(r.removed is not None for r in rows)
            cols = block.k + 1 + int(has_removed)  # components, top-k total, [share removed by the basis]
            heat_w = label_w + cols * cell_w
            heat_h = 20 + len(rows) * cell_h
            bars_w = 40 + n_sv * (bar_w + 2)
            width = pad * 3 + bars_w + heat_w
            height = pad * 2 + 22 + max(bar_h + 40, heat_h + 20)
            img = Image.new("RGB", (width, height), "white")
            d = ImageDraw.Draw(img)
            d.text((pad, pad), f"{block.name}: singular values (rows: {self.rows_choice})", fill="black", font=font)
            # bar chart
            x0, y0 = pad + 30, pad + 22 + bar_h
            smax = max(block.singular_values[:n_sv] or [1.0]) or 1.0
            d.line([(x0 - 2, y0), (x0 + n_sv * (bar_w + 2), y0)], fill="black")
            d.text((pad, y0 - bar_h - 6), f"{smax:.3g}", fill="black", font=font)
            for i, s in enumerate(block.singular_values[:n_sv]):
                h = int(round(bar_h * s / smax))
                color = (33, 113, 181) if i < block.k else (158, 202, 225)
                d.rectangle([x0 + i * (bar_w + 2), y0 - h, x0 + i * (bar_w + 2) + bar_w - 1, y0], fill=color)
                if i < 9 or (i + 1) % 5 == 0:
                    d.text((x0 + i * (bar_w + 2), y0 + 3), str(i + 1), fill="black", font=font)
            d.text((x0, y0 + 18), f"dark = top {block.k}", fill="black", font=font)
            # heatmap
            hx, hy = pad * 2 + bars_w, pad + 22
            d.text((hx, hy - 18), "share of each row's energy per component" + (" (rm: removed at strength 1)"
                   if has_removed else ""), fill="black", font=font)
            for j in range(cols):
                label = f"c{j + 1}" if j < block.k else ("top" if j == block.k else "rm")
                d.text((hx + label_w + j * cell_w + 4, hy), label, fill="black", font=font)
            for i, r in enumerate(rows):
                y = hy + 20 + i * cell_h
                tok = r.token if len(r.token) <= 20 else r.token[:19] + "~"
                d.text((hx, y + 2), f"{r.index if r.index >= 0 else '':>3} {tok}", fill="black", font=font)
                values = r.fractions + [r.top] + ([r.removed or 0.0] if has_removed else [])
                for j, v in enumerate(values):
                    cx = hx + label_w + j * cell_w
                    d.rectangle([cx, y, cx + cell_w - 2, y + cell_h - 2], fill=_heat_color(v))
            panels.append(img)
        total_w = max(p.width for p in panels)
        total_h = sum(p.height for p in panels) + 24
        canvas = Image.new("RGB", (total_w, total_h), "white")
        ImageDraw.Draw(canvas).text((8, 6), "DECOR analysis" + (f': "{self.prompt}"' if self.prompt else ""),
                                     fill="black", font=font)
        y = 24
        for p in panels:
            canvas.paste(p, (0, y))
            y += p.height
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".png.tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                canvas.save(fh, format="PNG")
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path


_HEAT = [(255, 255, 255), (198, 219, 239), (107, 174, 214), (33, 113, 181), (8, 48, 107)]


def _heat_color(v: float) -> tuple[int, int, int]:
    v = min(max(float(v), 0.0), 1.0) * (len(_HEAT) - 1)
    i = min(int(v), len(_HEAT) - 2)
    t = v - i
    a, b = _HEAT[i], _HEAT[i + 1]
    return tuple(int(round(a[c] + (b[c] - a[c]) * t)) for c in range(3))  # type: ignore[return-value]


def analyze(
    embeds: torch.Tensor,
    token_mask: torch.Tensor,
    tokens: Sequence[str] | None = None,
    k: int = 8,
    *,
    rows: str = "all-but-bos",  # the whole embedding, padding included (the paper's analysis), whatever DEFAULT_ROWS
    encoder_widths: Sequence[int] | None = None,
    remove_bases: Sequence[torch.Tensor] | None = None,
    prompt: str | None = None,
) -> DecorAnalysis:
    """Component analysis of one prompt's embedding ``[L, D]`` (or ``[1, L, D]``).

    ``token_mask``: kinds ``[L]`` from :func:`token_kinds`; ``tokens``: L readable tokens (from
    :func:`tokenize_for_decor`); ``k``: how many top components to report (capped at the rank). With
    ``encoder_widths`` (SDXL) each encoder block is analysed separately. ``remove_bases`` (one ``[D_block, k]`` basis
    per block, e.g. from :func:`decor_basis` on the text to remove) adds, per row, the share a projection at strength 1
    would remove.
    """
    X = _squeeze_single(torch.as_tensor(embeds), "embeds").float()
    kinds = torch.as_tensor(token_mask)
    if kinds.dim() == 2:
        kinds = kinds[0]
    if kinds.dtype == torch.bool:
        raise ValueError("analyze needs token kinds (from token_kinds), not a boolean mask")
    kinds = kinds.to(X.device)
    if tokens is None:
        tokens = [f"#{i}" for i in range(X.shape[0])]
    if len(tokens) != X.shape[0]:
        raise ValueError(f"got {len(tokens)} tokens for {X.shape[0]} rows")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"The number of components to analyse must be a whole number of at least 1 (got {k!r}).")
    mask = rows_mask(kinds, rows)
    idx = torch.nonzero(mask).flatten().tolist()
    if not idx:
        raise InputError("The prompt has no token rows of the chosen kind to analyse.")
    blocks_cols = _blocks(X.shape[-1], encoder_widths, True)
    if remove_bases is not None and len(remove_bases) != len(blocks_cols):
        raise ValueError(f"got {len(remove_bases)} removal bases for {len(blocks_cols)} blocks")
    names = (
        ["embedding"]
        if len(blocks_cols) == 1
        else [f"text_encoder{'' if i == 0 else '_' + str(i + 1)}" for i in range(len(blocks_cols))]
    )
    out = []
    for b, ((c0, c1), name) in enumerate(zip(blocks_cols, names)):
        Xb = X[:, c0:c1]
        sel = Xb[idx]
        _, s, vh = torch.linalg.svd(sel, full_matrices=False)
        rank = max(_numerical_rank(s, tuple(sel.shape)), 1)
        kk = min(k, rank)
        Vk = vh[:kk].T
        coef = (sel @ Vk) ** 2
        norms_sq = (sel**2).sum(-1).clamp_min(1e-30)
        frac = coef / norms_sq.unsqueeze(-1)
        removed = None
        if remove_bases is not None:
            Vr = remove_bases[b].to(device=sel.device, dtype=torch.float32)
            removed = (((sel @ Vr) ** 2).sum(-1) / norms_sq).tolist()
        row_list = []
        for j, i in enumerate(idx):
            fr = frac[j].tolist()
            row_list.append(
                RowAnalysis(
                    index=i,
                    kind=KIND_NAMES[int(kinds[i])],
                    token=str(tokens[i]),
                    norm=float(norms_sq[j].sqrt()),
                    fractions=fr,
                    top=float(sum(fr)),
                    removed=None if removed is None else float(removed[j]),
                )
            )
        sv = s[: max(rank, 1)].tolist()
        out.append(BlockAnalysis(name=name, columns=(c0, c1), singular_values=sv, k=kk, rows=row_list))
    return DecorAnalysis(prompt=prompt, rows_choice=rows, blocks=out)
