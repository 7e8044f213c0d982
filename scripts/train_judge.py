"""Train the toy-world judge (``studio/judge.py``) on fresh procedural renders and measure it.

Every batch is newly rendered (infinite data, no overfitting), held-out subjects and styles
included. Mild Gaussian noise, a blur of varying strength (up to about a 4x4-patch autoencoder's) and small
brightness changes make it read generated images and VAE round trips, not only perfect renders. At the end the
judge is measured on fresh renders from a different seed, and weights (fp16) + config + accuracy are written
to ``--out``.

With ``--pool N`` the batches are drawn from N scenes rendered once (in ``--workers`` processes) instead of
fresh renders per batch: what a GPU needs to be fed (the GPU run of the committed judge, see its judge.json).

Usage: python scripts/train_judge.py --minutes 12 --out assets/judge
       python scripts/train_judge.py --device cuda --pool 300000 --workers 14 --batch 256 --minutes 3
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from studio import toyworld as tw  # noqa: E402
from studio.judge import HEADS, Judge, JudgeNet, accuracy, label_indices, to_batch  # noqa: E402

SAMPLER = dict(held_out=True, two_object_prob=0.3, subject_prob=0.35, held_out_style_prob=0.25)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur ([1 2 1]/4 separable, mixed in at a random strength, half the time), brightness and noise."""
    n = x.shape[0]
    if torch.rand((), generator=g) < 0.5:
        k = torch.tensor([0.25, 0.5, 0.25], device=x.device)
        k2 = (k[:, None] * k[None, :]).expand(3, 1, 3, 3)
        xb = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k2, groups=3)
        a = torch.rand(n, 1, 1, 1, generator=g).to(x.device)
        x = x * (1 - a) + xb * a
    x = x * (1 + 0.06 * (torch.rand(n, 1, 1, 1, generator=g).to(x.device) - 0.5))
    return x + torch.randn(x.shape, generator=g).to(x.device) * (0.06 * torch.rand(n, 1, 1, 1, generator=g).to(x.device))


def make_batch(rng: random.Random, n: int, g: torch.Generator, augment_: bool = True):
    scenes = [tw.sample_scene(rng, **SAMPLER) for _ in range(n)]
    x = to_batch([tw.render(s) for s in scenes])
    if augment_:
        x = augment(x, g)
    y = {h: torch.tensor([label_indices(s)[h] for s in scenes]) for h in HEADS}
    return x, y


class Pool:
    """``n`` scenes rendered once (uint8, on ``device``) with their labels; batches are random draws, augmented."""

    def __init__(self, n: int, seed: int, workers: int, device: torch.device):
        scenes = tw.sample_scenes(n, seed=20_000 + seed, **SAMPLER)
        t0 = time.time()
        self.x = torch.from_numpy(tw.render_array(scenes, workers)).to(device)
        self.y = {h: torch.tensor([label_indices(s)[h] for s in scenes], device=device) for h in HEADS}
        self.device = device
        log(f"pool: {n} scenes rendered in {time.time() - t0:.0f} s ({workers} workers)")

    def batch(self, n: int, g: torch.Generator):
        idx = torch.randint(0, len(self.x), (n,), generator=g).to(self.device)
        x = self.x[idx].permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        return augment(x, g), {h: v[idx] for h, v in self.y.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "assets" / "judge"))
    ap.add_argument("--minutes", type=float, default=12.0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-n", type=int, default=3000)
    ap.add_argument("--init", default=None, help="continue from the judge in this folder")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pool", type=int, default=0, help="draw batches from this many scenes rendered once (0: fresh)")
    ap.add_argument("--workers", type=int, default=1, help="processes rendering the pool")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    g = torch.Generator().manual_seed(args.seed)

    net = JudgeNet()
    earlier = None
    if args.init:
        init = Judge.load(args.init)
        net.load_state_dict(init.net.state_dict())
        earlier = init.meta.get("training")
        log(f"continuing from {args.init}")
    net.to(device)
    pool = Pool(args.pool, args.seed, args.workers, device) if args.pool else None
    nparams = sum(p.numel() for p in net.parameters())
    log(f"judge: {nparams / 1e6:.3f} M params")
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    t0, step, deadline = time.time(), 0, time.time() + args.minutes * 60
    run_loss = None
    net.train()
    while time.time() < deadline:
        if pool is not None:
            x, y = pool.batch(args.batch, g)
        else:
            x, y = make_batch(rng, args.batch, g)
        out = net(x)
        loss = sum(F.cross_entropy(out[h], y[h], ignore_index=-100) for h in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        frac = min((time.time() - t0) / (args.minutes * 60), 1.0)
        for gp in opt.param_groups:
            gp["lr"] = args.lr * min(1.0, (step + 1) / 100) * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * frac)))
        opt.step()
        step += 1
        run_loss = loss.item() if run_loss is None else 0.98 * run_loss + 0.02 * loss.item()
        if step % 100 == 0:
            log(f"step {step} loss {run_loss:.4f} ({(time.time() - t0) / step:.3f} s/step)")
    train_min = (time.time() - t0) / 60
    net.eval().cpu()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({k: v.detach().half().contiguous() for k, v in net.state_dict().items()
               if not k.endswith("num_batches_tracked")}, str(out / "judge.safetensors"))
    meta = {
        "heads": {h: list(c) for h, c in HEADS.items()},
        "arch": {"widths": list(net.widths), "hidden": net.hidden},
        "training": {"steps": step, "batch": args.batch, "images": step * args.batch, "minutes": round(train_min, 2),
                     "threads": args.threads, "seed": args.seed, "lr": args.lr, "sampler": SAMPLER,
                     "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "pool": args.pool, "world_version": tw.WORLD_VERSION,
                     "params": nparams, "torch": torch.__version__, "continued_from": earlier},
    }
    (out / "judge.json").write_text(json.dumps(meta, indent=2) + "\n")
    # state_dict keys without num_batches_tracked: let load() accept them
    judge = Judge.load(out)
    eval_scenes = tw.sample_scenes(args.eval_n, seed=10_000 + args.seed, **SAMPLER)
    acc = accuracy(judge, eval_scenes)
    meta["accuracy_fresh_renders"] = {"n_scenes": args.eval_n, "seed": 10_000 + args.seed,
                                      **{h: round(a, 4) for h, a in acc.items()}}
    (out / "judge.json").write_text(json.dumps(meta, indent=2) + "\n")
    log(f"trained {step} steps ({step * args.batch} images) in {train_min:.1f} min")
    for h, a in acc.items():
        log(f"  {h:12s} {a * 100:6.2f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
