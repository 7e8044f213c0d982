"""The ``studio`` command: train, generate, lora (inspect/convert), model export, decor analyze, serve.

Flags of ``train`` and ``generate`` are derived from the typed configs in ``studio/config.py`` (and each
recipe's own config class), so ``--help`` always matches what the UI shows and what is saved in the files.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from .compat import check_versions
from .config import GenerateConfig, add_config_args, config_from_args
from .errors import StudioError
from .hints import model_sampling


def _print_event(event: dict) -> None:
    kind = event.get("type")
    if kind == "step":
        total, step = event["total"], event["step"]
        if step == 1 or step == total or step % max(1, total // 20) == 0:
            print(f"step {step}/{total}  loss {event['loss']:.4f}  {event['it_s']:.2f} it/s  ETA {event['eta_s']:.0f}s", flush=True)
    elif kind == "phase":
        print(f"[{event['phase']}] {event.get('detail', '')}", flush=True)
    elif kind in ("sample", "checkpoint"):
        print(f"{kind} at step {event['step']}: {event['path']}", flush=True)
    elif kind in ("done", "cancelled", "saved"):
        print(f"{kind}: " + ", ".join(event.get("outputs", [])), flush=True)
    elif kind == "failed":
        print(f"failed: {event['error']}", file=sys.stderr, flush=True)


def _workspace(args):
    from .library import Workspace

    return Workspace(args.workspace)


def cmd_train(args) -> int:
    import signal

    from trainers.loop import Controls, run_safely, train
    from trainers.recipes import get_recipe

    recipe = get_recipe(args.method)
    cfg = config_from_args(recipe.config_cls, args)
    ws = _workspace(args)
    if hasattr(recipe, "bind"):  # recipes that need the workspace (orthogonal: free basis slots)
        recipe.bind(ws)
    controls = Controls()
    signal.signal(signal.SIGINT, lambda *_: controls.stop.set())  # Ctrl+C: stop and save what we have
    result = run_safely(lambda: train(cfg, recipe, ws, events=_print_event, controls=controls), None)
    print(json.dumps({"status": result.status, "step": result.step, "trigger": getattr(cfg, "trigger", ""),
                      "outputs": [str(p) for p in result.outputs]}))
    return 0 if result.status == "succeeded" else 130


def generate_config(args) -> GenerateConfig:
    """The run's GenerateConfig; --steps / --guidance left out take the model folder's (``studio.hints``), as in the
    UI."""
    return config_from_args(GenerateConfig, args, **model_sampling(args.model, args.steps, args.guidance))


def cmd_generate(args) -> int:
    from pipelines.generate import generate, parse_lora_arg

    from .models import load_pipeline

    cfg = generate_config(args)
    ws = _workspace(args)
    loras = [parse_lora_arg(x, ws) for x in cfg.loras]
    pipe = load_pipeline(cfg.model, device=args.device, config=cfg.model_config or None)
    if getattr(args, "content", None) or getattr(args, "style", None):  # B-LoRA content/style (pipelines/blora.py)
        result = _blora_generate(args, pipe, cfg, loras, ws)
    else:
        result = generate(pipe, cfg, loras, ws)
    for p in result.paths:
        print(p)
    print(f"seed: {result.seed}")
    return 0


def _blora_generate(args, pipe, cfg, loras, ws):
    from pipelines.blora import DEFAULT_STYLE_WEIGHT, style_transfer
    from pipelines.generate import parse_lora_arg

    content = parse_lora_arg(args.content, ws) if args.content else None
    style = parse_lora_arg(args.style, ws) if args.style else None
    if style is not None and not re.search(r":[-+\d.eE]+$", args.style):  # no ":WEIGHT" given
        style.weight = DEFAULT_STYLE_WEIGHT
    result = style_transfer(pipe, cfg, content, style, ws, block_prompts=args.block_prompts, content_prompt=args.content_prompt,
                            own_style_weight=args.own_style_weight, extra_loras=loras)
    if result.params.get("blora", {}).get("warning"):
        print(f"warning: {result.params['blora']['warning']}", file=sys.stderr)
    return result


def _cmd_blora_split(args) -> int:
    from .blora_io import split_blora, split_into_library

    if args.content or args.style:
        out = split_blora(Path(_workspace(args).resolve_lora(args.src)), Path(args.content) if args.content else None,
                          Path(args.style) if args.style else None, allow_other=args.allow_other)
        for role, path in out.items():
            print(f"{role}: {path}")
    else:
        names = split_into_library(_workspace(args), args.src, args.name, allow_other=args.allow_other)
        for role, name in names.items():
            print(f"{role}: {name}")
    return 0


def cmd_lora(args) -> int:
    from . import lora_io

    if args.lora_cmd == "inspect":
        info = lora_io.inspect(Path(args.file))
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            for k in ("file", "format", "architecture", "method", "trigger", "ranks", "tensors", "components", "sha256"):
                print(f"{k:>13}: {info[k]}")
            for k, v in sorted(info["metadata"].items()):
                if k != "studio.config":
                    v = _clip(str(v))
                    print(f"{k:>13}: {v}" if len(k) <= 13 else f"  {k} = {v}")
    elif args.lora_cmd == "convert":
        _refuse_overwrite(Path(args.dst), args.overwrite, _workspace(args))
        out = lora_io.convert(Path(args.src), Path(args.dst), args.to)
        print(out)
    elif args.lora_cmd == "split":
        return _cmd_blora_split(args)
    elif args.lora_cmd in ("merge", "crosstalk"):
        return _cmd_orthogonal(args)
    return 0


def _cmd_orthogonal(args) -> int:
    from . import orthogonal as orth

    ws = _workspace(args)
    paths = [ws.resolve_lora(x) for x in args.loras]
    if args.lora_cmd == "crosstalk":
        print(orth.crosstalk(paths).to_table(layers=not args.summary, top=args.top or None))
        return 0
    weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    if args.fuse:
        from .models import load_pipeline

        model = args.model or orth.load_lora_file(paths[0]).meta.get("studio.base_model") or "tiny-sdxl"
        pipe = load_pipeline(model, device=args.device)
        res = orth.fuse_into_pipeline(pipe, paths, weights=weights, lam=args.lam)
        out = orth.save_fused(pipe, ws.exports / ws.check_name(args.out))
    else:
        out_path = Path(args.out) if args.out.endswith(".safetensors") else ws.lora_path(args.out)
        _refuse_overwrite(out_path, args.overwrite, ws)
        res = orth.merge_loras(paths, out_path, weights=weights, lam=args.lam, ws=ws)
        out = res.path
    for w in res.warnings:
        print(f"warning: {w}", file=sys.stderr)
    kind = "orthogonal" if res.orthogonal else "ordinary"
    print(f"merged {len(paths)} {kind} LoRAs with weights {res.weights} ({res.layers} layers): {out}")
    return 0


def cmd_model(args) -> int:
    from .checkpoint import checkpoint_target, export_single_file
    from .models import convert_bin_folder, load_pipeline

    if args.model_cmd == "convert":
        print(convert_bin_folder(Path(args.model), Path(args.out)))
        return 0

    out = checkpoint_target(args.out)  # checked before a possibly long load
    _refuse_overwrite(out, args.overwrite, _workspace(args))
    pipe = load_pipeline(args.model, device="cpu", dtype="fp32", config=args.model_config or None)
    print(export_single_file(pipe, out, dtype=args.dtype))
    return 0


def _clip(text: str, limit: int = 300) -> str:
    """A metadata value cut for the terminal (``--json`` prints it whole)."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters; --json shows all)"


def _refuse_overwrite(path: Path, overwrite: bool, ws) -> None:
    """An existing output file is only replaced with --overwrite, and then moved to the workspace's trash first."""
    if not path.exists():
        return
    if not overwrite:
        raise StudioError(f"{path} already exists: choose another output, or pass --overwrite (the old file goes to "
                          "the workspace's trash/).")
    if path.parent.resolve() == ws.loras.resolve() and path.suffix == ".safetensors":
        ws.trash_lora(path.stem)
    else:
        ws.to_trash([path], path.stem)


def cmd_decor(args) -> int:
    from .decor import DEFAULT_ROWS, analyze, decor_basis, encode_for_decor, rows_mask
    from .models import load_pipeline

    pipe = load_pipeline(args.model, device=args.device)
    enc = encode_for_decor(pipe, args.prompt)
    bases = None
    if args.remove:
        rem = encode_for_decor(pipe, args.remove)
        diff = rem.embeds - encode_for_decor(pipe, "").embeds  # the default reference "null": what the text adds
        mask = rows_mask(rem.kinds[0], DEFAULT_ROWS)
        widths = rem.encoder_widths or [rem.embeds.shape[-1]]
        bases, start = [], 0
        for w in widths:
            block = diff[0, :, start:start + w]
            k = min(args.components, int(mask.sum()))
            bases.append(decor_basis(block, k, mask))
            start += w
    result = analyze(enc.embeds, enc.kinds[0], enc.tokens, args.components, encoder_widths=enc.encoder_widths,
                     remove_bases=bases, prompt=args.prompt)
    print(result.to_table())
    if args.plot:
        result.save_plot(Path(args.plot))
        print(f"plot: {args.plot}")
    return 0


def cmd_compose(args) -> int:
    """``studio compose SPEC.yaml|json`` or flags (--prompt, --concept LORA:WEIGHT:PROMPT[:x0,y0,x1,y1], --engine)."""
    from pipelines.compose import compose

    from .composition import CompositionSpec, load_spec, parse_concept_arg
    from .models import load_pipeline

    over = {k: getattr(args, k) for k in ("engine", "seed", "steps", "guidance", "width", "height", "negative_prompt", "scheduler")}
    if args.spec:
        spec = load_spec(args.spec, **over, **({"prompt": args.prompt} if args.prompt else {}))
    else:
        concepts = [parse_concept_arg(c) for c in args.concept or []]
        spec = CompositionSpec(prompt=args.prompt or "", concepts=concepts,
                               global_loras=[{"lora": g.rpartition(":")[0] or g, "weight": float(g.rpartition(":")[2])
                                              if g.rpartition(":")[0] else 1.0} for g in args.global_lora or []],
                               **{k: v for k, v in over.items() if v is not None})
    if args.region_all_layers:
        spec.composer.region_all_layers = True
    pipe = load_pipeline(args.model or spec.model or "tiny-sdxl", device=args.device)
    result = compose(pipe, spec, _workspace(args))
    for p in result.paths:
        print(p)
    print(f"seed: {result.seed}")
    print("stats: " + json.dumps({k: v for k, v in result.stats.items() if k not in ("losses", "grad_norms")}))
    return 0


def cmd_serve(args) -> int:
    from .serve import serve

    return serve(args, args.parser)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    from trainers.recipes import RECIPES

    p = argparse.ArgumentParser(prog="studio", description="Customization Studio: train and compose LoRAs.")
    p.add_argument("--workspace", default=None, help="Workspace folder (default: $STUDIO_WORKSPACE or ./workspace).")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="Train a LoRA from a folder of images.")
    t.add_argument("--method", default="dreambooth", choices=sorted(RECIPES), help="Training method.")
    method = _peek_method(sys.argv if argv is None else argv)
    add_config_args(t, RECIPES.get(method, RECIPES["dreambooth"]).config_cls, skip=("method",))
    t.set_defaults(fn=cmd_train)

    g = sub.add_parser("generate", help="Generate images, optionally with LoRAs.")
    add_config_args(g, GenerateConfig, skip=("steps", "guidance"))
    own = {k: GenerateConfig.__dataclass_fields__[k].default for k in ("steps", "guidance")}
    g.add_argument("--steps", type=int, default=None,
                   help=f"Denoising steps (default: the model folder's studio.json, else {own['steps']}).")
    g.add_argument("--guidance", type=float, default=None,
                   help=f"Classifier-free guidance scale (default: the model folder's studio.json, else "
                        f"{own['guidance']}).")
    g.add_argument("--lora", dest="loras", action="append", default=None, help="LoRA as NAME_OR_PATH[:WEIGHT]; repeat for several.")
    g.add_argument("--content", default=None, help="B-LoRA content (or joint) as NAME_OR_PATH[:WEIGHT]; [c] in the prompt becomes its token.")
    g.add_argument("--style", default=None, help="B-LoRA style (or joint) as NAME_OR_PATH[:WEIGHT] (default weight 1.21 = "
                   "the official demos' alpha 1.1); [s] in the prompt becomes its token.")
    g.add_argument("--block-prompts", action="store_true", help="B-LoRA: the content block's cross-attention sees --content-prompt only.")
    g.add_argument("--content-prompt", default="", help="Prompt of the content block with --block-prompts (default: 'A [c]').")
    g.add_argument("--own-style-weight", type=float, default=0.0,
                   help="B-LoRA: add the content image's own style at this linear weight to keep its colours (paper: 0.16-0.25).")
    g.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available).")
    g.set_defaults(fn=cmd_generate)

    lo = sub.add_parser("lora", help="Inspect or convert LoRA files.")
    lsub = lo.add_subparsers(dest="lora_cmd", required=True)
    li = lsub.add_parser("inspect", help="Show a LoRA file's format, architecture, ranks and metadata.")
    li.add_argument("file")
    li.add_argument("--json", action="store_true")
    lc = lsub.add_parser("convert", help="Convert between diffusers/PEFT and kohya/A1111/ComfyUI formats.")
    lc.add_argument("src")
    lc.add_argument("dst")
    lc.add_argument("--to", choices=["kohya", "diffusers"], required=True)
    lc.add_argument("--overwrite", action="store_true", help="Replace DST if it exists (the old file goes to the trash).")
    ls = lsub.add_parser("split", help="Split a joint B-LoRA (studio, diffusers or kohya names) into content and style LoRAs.")
    ls.add_argument("src", help="Library name or .safetensors path of the joint B-LoRA.")
    ls.add_argument("--content", default=None, help="Write the content half (up_blocks.0.attentions.0) to this file.")
    ls.add_argument("--style", default=None, help="Write the style half (up_blocks.0.attentions.1) to this file.")
    ls.add_argument("--name", default="", help="Without --content/--style: library entries NAME-content and NAME-style (default: the file's name).")
    ls.add_argument("--allow-other", action="store_true", help="Split even if the file has weights outside the two B-LoRA blocks (they are dropped).")
    lm = lsub.add_parser("merge", help="Merge LoRAs into one exact LoRA file (ranks concatenated) or fused base weights.")
    lm.add_argument("loras", nargs="+", help="Library names or .safetensors paths.")
    lm.add_argument("--out", required=True, help="Name of the merged LoRA in the library (or a .safetensors path).")
    lm.add_argument("--lam", type=float, default=0.6, help="Weight of every member (paper: 0.6).")
    lm.add_argument("--weights", default="", help="Comma-separated weights, one per LoRA (overrides --lam).")
    lm.add_argument("--fuse", action="store_true", help="Add the LoRAs into the base weights; save a diffusers model in exports/OUT.")
    lm.add_argument("--model", default=None, help="Base model for --fuse (default: the LoRAs' base model).")
    lm.add_argument("--device", default=None)
    lm.add_argument("--overwrite", action="store_true", help="Replace an existing OUT (the old files go to the trash).")
    lx = lsub.add_parser("crosstalk", help="Per-layer overlap and output interference between LoRAs.")
    lx.add_argument("loras", nargs="+", help="Library names or .safetensors paths.")
    lx.add_argument("--summary", action="store_true", help="Only the per-pair summary.")
    lx.add_argument("--top", type=int, default=0, help="Only the N layers with the most interference.")
    lo.set_defaults(fn=cmd_lora)

    mo = sub.add_parser("model", help="Base-model tools.")
    msub = mo.add_subparsers(dest="model_cmd", required=True)
    me = msub.add_parser("export", help="Write a base model as one original-format (LDM/SGM) .safetensors checkpoint "
                                        "for A1111, ComfyUI and kohya.")
    me.add_argument("model", help="Bundled name, hub id, local diffusers folder or single-file checkpoint.")
    me.add_argument("out", help="The .safetensors file to write.")
    me.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16", help="Weight precision (default: fp16, as checkpoints are shared).")
    me.add_argument("--model-config", dest="model_config", default="",
                    help="Config of a single-file MODEL of non-standard size (bundled name or diffusers folder).")
    me.add_argument("--overwrite", action="store_true", help="Replace OUT if it exists (the old file goes to the trash).")
    mc = msub.add_parser("convert", help="Rewrite a diffusers folder with .bin (pickle) weights as .safetensors. Reading "
                                         ".bin runs pickle code: only do this for a folder you trust.")
    mc.add_argument("model", help="The diffusers folder with .bin weights.")
    mc.add_argument("out", help="The new folder to write (safetensors weights).")
    mc.add_argument("--i-trust-this-folder", dest="trust", action="store_true", required=True,
                    help="Required: confirms that the .bin files come from a source you trust.")
    mo.set_defaults(fn=cmd_model)

    d = sub.add_parser("decor", help="DECOR tools.")
    dsub = d.add_subparsers(dest="decor_cmd", required=True)
    da = dsub.add_parser("analyze", help="Singular values of a prompt's embedding and per-token shares of the top components.")
    da.add_argument("prompt")
    da.add_argument("--remove", default="", help="Also show how much of each row a projection of this text would remove.")
    da.add_argument("--components", type=int, default=8)
    da.add_argument("--model", default="tiny-sdxl")
    da.add_argument("--device", default=None)
    da.add_argument("--plot", default="", help="Write a PNG plot here.")
    d.set_defaults(fn=cmd_decor)

    co = sub.add_parser("compose", help="Compose several LoRAs in one image (merge, LoRA-Composer, CLoRA).")
    co.add_argument("spec", nargs="?", default=None, help="YAML/JSON spec file (flags below override its fields).")
    co.add_argument("--prompt", default=None, help="Base prompt for the whole image.")
    co.add_argument("--negative-prompt", dest="negative_prompt", default=None)
    co.add_argument("--concept", action="append", default=None,
                    help="Concept LORA[:WEIGHT[:PROMPT]][:x0,y0,x1,y1] (box as fractions; no prompt: built from the LoRA's "
                         "trigger and class word); repeat for several.")
    co.add_argument("--global-lora", dest="global_lora", action="append", default=None, help="LoRA applied everywhere, NAME_OR_PATH[:WEIGHT].")
    co.add_argument("--engine", choices=["merge", "composer", "clora"], default=None)
    co.add_argument("--seed", type=int, default=None)
    co.add_argument("--steps", type=int, default=None)
    co.add_argument("--guidance", type=float, default=None)
    co.add_argument("--scheduler", choices=["auto", "ddim", "dpmsolver++", "euler", "model"], default=None,
                    help="Sampler of the run (auto: the papers' — composer DPM-Solver++, clora DDIM; merge the model's).")
    co.add_argument("--width", type=int, default=None)
    co.add_argument("--height", type=int, default=None)
    co.add_argument("--region-all-layers", dest="region_all_layers", action="store_true",
                    help="composer: each concept LoRA acts with all its UNet layers inside its box, not only its "
                         "cross-attention as in the paper (for LoRAs that hold their subject in other layers).")
    co.add_argument("--model", default=None, help="Base model (default: the spec's, else tiny-sdxl).")
    co.add_argument("--device", default=None)
    co.set_defaults(fn=cmd_compose)

    from .serve import add_serve_args

    s = sub.add_parser("serve", help="Launch the studio web UI (same as app.py).")
    add_serve_args(s, workspace=False)
    s.set_defaults(fn=cmd_serve, parser=s)
    return p


def _peek_method(argv: list[str]) -> str:
    for i, a in enumerate(argv):
        if a == "--method" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--method="):
            return a.split("=", 1)[1]
    return "dreambooth"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        check_versions()
        return args.fn(args) or 0
    except StudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
