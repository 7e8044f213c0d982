"""Per-concept trigger tokens: one rare CLIP token per LoRA, different from every trigger in the library.

DreamBooth (Ruiz et al. 2023) names the subject with a rare token the base model associates with almost nothing;
Mix-of-Show / orthogonal adaptation (Gu et al. 2023; Po et al. 2024) give every concept its own tokens so that
merged concepts can be called separately. A trigger that the tokenizer splits ("zwx" -> "z" + "wx") is two common
pieces instead of one rare token, and two LoRAs with the same trigger cannot be told apart after a merge.
"""

from __future__ import annotations

import hashlib

# Rare single-token words of the CLIP BPE vocabulary (ids > 47000, checked against assets/tokenizer): a trigger that
# the base model associates with almost nothing.
RARE_TOKENS = ["ohwx", "nlwx", "rcn", "hta", "ucn", "wbo", "tvc", "mwf", "gsp", "httr", "pln", "wiv",
               "bnp", "ccd", "mgt", "pbc", "ibc", "ccu", "wafc", "pgs"]


def rare_token(seed: str) -> str:
    """A rare CLIP token chosen deterministically from ``seed`` (the LoRA name)."""
    return RARE_TOKENS[_index(seed)]


def _index(seed: str) -> int:
    return int(hashlib.sha256(seed.encode()).hexdigest(), 16) % len(RARE_TOKENS)


def library_triggers(ws, exclude: str = "") -> set[str]:
    """Every trigger word stored by the LoRAs of the library (merged files list several), lower-case."""
    out: set[str] = set()
    for card in ws.list_loras():
        if card.get("name") == exclude:
            continue
        for t in (card.get("trigger") or "").split(","):
            if t.strip():
                out.add(t.strip().lower())
    return out


def unique_trigger(ws, name: str, tokenizer=None, new_token: bool = False) -> str:
    """The default trigger of a new LoRA ``name``: a rare single token no other LoRA of the library uses (the LoRA of
    the same name, which a new run replaces, does not count). Starts at ``rare_token(name)``; when the list is used
    up, further rare single tokens come from the end of ``tokenizer``'s vocabulary. ``new_token`` (pivotal tuning):
    also not a vocabulary entry without its end-of-word mark, so that it can be added to the tokenizer as a new token."""
    used = library_triggers(ws, exclude=name) if ws is not None else set()
    if new_token:
        from studio.models import load_tokenizer

        tokenizer = tokenizer or load_tokenizer()
        used |= {w for w in RARE_TOKENS if w in tokenizer.get_vocab()}
    start = _index(name or "lora")
    for k in range(len(RARE_TOKENS)):
        cand = RARE_TOKENS[(start + k) % len(RARE_TOKENS)]
        if cand not in used:
            return cand
    if tokenizer is not None:
        known = tokenizer.get_vocab()
        vocab = sorted(known.items(), key=lambda kv: -kv[1])
        for tok, _ in vocab:
            word = tok[:-4] if tok.endswith("</w>") else ""
            if (3 <= len(word) <= 5 and word.isascii() and word.isalpha() and word.islower() and word not in used
                    and not (new_token and word in known)):
                if len(tokenizer(word, add_special_tokens=False).input_ids) == 1:
                    return word
    from studio.errors import InputError

    raise InputError("Every default trigger is taken by a LoRA of the library: give this LoRA its own trigger.")
