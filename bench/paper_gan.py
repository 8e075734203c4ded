"""Reproduce the setting of Gradient Autoscaled Normalization (arXiv 2509.03677) at laptop scale.

Trains a CIFAR-style ResNet (ResNet-20 by default: 3 stages x 3 basic blocks, option-A shortcuts)
with SGD (momentum 0.9, weight decay 5e-4, cosine lr) under four gradient treatments:
plain SGD, SGD + AutoscaledNorm (our reading of the paper's alpha_t, see the class docstring),
SGD + Centralize and SGD + ZScoreNorm, over several seeds, on two tasks:

* ``digits``: scikit-learn's handwritten digits (1,797 real 8x8 images, 10 classes), resized to
  ``--digits-size`` (16 by default), grey -> 3 channels, stratified 80/20 split;
* ``synth``: a CIFAR-shaped (3x32x32, 10 classes) synthetic task: per class a smooth random
  template, randomly shifted, mixed with a distractor template, plus noise.

Gradient statistics are recorded with gradwatch itself (``watch(..., server="memory")``): the
per-layer std of every conv/linear weight gradient and the pooled ("global") std of all of them,
measured before the transforms -- the paper's two observations (global std falls steadily, the
per-layer stds diverge). Prints a table of test accuracy (mean +- std over seeds), writes PNGs to
``bench/figures/`` and, with ``--results``, appends a section to ``bench/RESULTS.md``.

    .venv/bin/python bench/paper_gan.py                      # default, ~10 min on 2 CPU cores
    .venv/bin/python bench/paper_gan.py --tasks synth --depth 56 --width 16 --epochs 30 \\
        --synth-train 20000 --device cuda                   # the longer run, on a GPU
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from cifar_resnet import ResNetCifar  # bench/ is on sys.path when a script here runs

from gradwatch.agent import AutoscaledNorm, Centralize, ZScoreNorm, watch
from gradwatch.agent.spec import Moments, merge_all, moments_var, std_of

HERE = Path(__file__).resolve().parent
METHODS = {
    "SGD": lambda: [],
    "SGD+AutoscaledNorm": lambda: [AutoscaledNorm()],
    "SGD+Centralize": lambda: [Centralize()],
    "SGD+ZScoreNorm": lambda: [ZScoreNorm()],
}


# ------------------------------------------------------------------------------------ model


# ------------------------------------------------------------------------------------ data


def digits_task(size: int) -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    y = torch.tensor(d.target, dtype=torch.long)
    tr, te = train_test_split(np.arange(len(y)), test_size=0.2, stratify=d.target, random_state=0)
    mu, sd = x[tr].mean(), x[tr].std()
    x = (x - mu) / sd
    return x[tr], y[tr], x[te], y[te]


def synth_task(n_train: int, n_test: int, seed: int = 1234) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.randn(10, 3, 6, 6, generator=g), size=(32, 32), mode="bicubic",
                              align_corners=False)
    templates = templates / templates.flatten(1).std(1).view(10, 1, 1, 1)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 10, (n,), generator=g)
        other = (y + torch.randint(1, 10, (n,), generator=g)) % 10
        mix = torch.rand(n, 1, 1, 1, generator=g) * 0.6
        x = templates[y] * (1 - mix) + templates[other] * mix
        shifts = torch.randint(-6, 7, (n, 2), generator=g)
        x = torch.stack([torch.roll(xi, (int(s[0]), int(s[1])), (1, 2)) for xi, s in zip(x, shifts)])
        x = x * (0.5 + torch.rand(n, 1, 1, 1, generator=g)) + 1.0 * torch.randn(x.shape, generator=g)
        return x, y

    xtr, ytr = make(n_train)
    xte, yte = make(n_test)
    return xtr, ytr, xte, yte


# ------------------------------------------------------------------------------------ training


def eligible_ids(w) -> list[int]:  # type: ignore[no-untyped-def]
    return [la.index for la in w.sink.layers if len(la.shape) > 1 and math.prod(la.shape) >= 2]


def pooled_std(rec, ids: set[int]) -> float:  # type: ignore[no-untyped-def]
    """Population std of all eligible gradient entries, merged from per-layer moments (n, mean, M2)."""
    L = rec.layers
    return std_of(merge_all(Moments(L["numel"][j], L["mean"][j], L["m2"][j])
                            for j, lid in enumerate(rec.layer_ids) if lid in ids).var)


def train_one(task: tuple[torch.Tensor, ...], method: str, seed: int, args: argparse.Namespace) -> dict:
    xtr, ytr, xte, yte = (t.to(args.device) for t in task)
    torch.manual_seed(seed)
    model = ResNetCifar(args.depth, args.width).to(args.device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    steps_per_epoch = math.ceil(len(ytr) / args.batch)
    total = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    w = watch(model, opt, server="memory", every=args.record_every, transforms=METHODS[method]())
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        model.train()
        perm = torch.randperm(len(ytr), generator=gen).to(args.device)
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch : (i + 1) * args.batch]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(xte[i : i + 512]).argmax(1) == yte[i : i + 512]).sum()) for i in range(0, len(yte), 512))
    w.close()
    ids = eligible_ids(w)
    names = {la.index: la.name for la in w.sink.layers}
    steps = [r.step for r in w.sink.steps]
    per_layer = {names[i]: [] for i in ids}
    for r in w.sink.steps:
        pos = {lid: j for j, lid in enumerate(r.layer_ids)}
        for i in ids:
            per_layer[names[i]].append(std_of(moments_var(r.layers["numel"][pos[i]], r.layers["m2"][pos[i]])))
    glob = [pooled_std(r, set(ids)) for r in w.sink.steps]
    alphas = [r.transforms.get("autoscaled_norm", {}).get("alpha") for r in w.sink.steps]
    return {"acc": correct / len(yte), "steps": steps, "per_layer": per_layer, "global": glob,
            "alpha": alphas, "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------ output


def plot(task_name: str, results: dict, figdir: Path, tag: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    base = results["SGD"][0]
    win = max(len(base["steps"]) // 25, 1)

    def smooth(v):  # moving average over `win` recorded steps (per-batch stds are noisy)
        v = np.asarray(v, dtype=float)
        return np.convolve(v, np.ones(win) / win, mode="valid")

    st = base["steps"][win - 1 :]
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.2))
    cmap = plt.get_cmap("viridis")
    names = list(base["per_layer"])
    for k, n in enumerate(names):
        ax[0].plot(st, smooth(base["per_layer"][n]), color=cmap(k / max(len(names) - 1, 1)), lw=0.8,
                   label=n if k in (0, len(names) - 1) else None)
    ax[0].plot(st, smooth(base["global"]), color="red", lw=2.2, label="global (pooled) std")
    ax[0].set_yscale("log")
    ax[0].set_xlabel("optimizer step")
    ax[0].set_ylabel("gradient std (before transforms)")
    ax[0].set_title(f"{task_name}: per-layer vs global grad std (SGD, seed 0, MA {win})", fontsize=10)
    ax[0].legend(fontsize=7)
    # ratio of each layer's std to its first value: do layers move together?
    for k, n in enumerate(names):
        v = smooth(base["per_layer"][n])
        ax[1].plot(st, v / v[0], color=cmap(k / max(len(names) - 1, 1)), lw=0.8)
    g = smooth(base["global"])
    ax[1].plot(st, g / g[0], color="red", lw=2.2)
    ax[1].set_yscale("log")
    ax[1].set_xlabel("optimizer step")
    ax[1].set_ylabel("std / its initial value")
    ax[1].set_title("relative change (colour: depth, red: global)", fontsize=10)
    fig.tight_layout()
    p = figdir / f"paper_gan_{tag}_layers.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    out.append(p)

    fig, ax = plt.subplots(1, 2, figsize=(12, 4.2))
    for method, runs in results.items():
        r = runs[0]
        ax[0].plot(r["steps"][win - 1 :], smooth(r["global"]), lw=1.2, label=method)
    ax[0].set_yscale("log")
    ax[0].set_xlabel("optimizer step")
    ax[0].set_ylabel("global gradient std (raw, before transform)")
    ax[0].set_title(f"{task_name}: global std per method (seed 0, MA {win})", fontsize=10)
    ax[0].legend(fontsize=8)
    for s, r in enumerate(results["SGD+AutoscaledNorm"]):
        ax[1].plot(r["steps"], r["alpha"], lw=1.0, label=f"seed {s}")
    ax[1].set_ylim(0, 1.05)
    ax[1].set_xlabel("optimizer step")
    ax[1].set_ylabel("alpha_t")
    ax[1].set_title("AutoscaledNorm alpha_t = min(1, sigma_t/sigma_0), our reading", fontsize=10)
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    p = figdir / f"paper_gan_{tag}_global.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    out.append(p)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="digits,synth")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--width", type=int, default=8, help="first-stage channels (the paper's ResNets: 16)")
    ap.add_argument("--epochs", type=int, default=None, help="default: 8 for digits, 5 for synth")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--digits-size", type=int, default=16)
    ap.add_argument("--synth-train", type=int, default=1500)
    ap.add_argument("--synth-test", type=int, default=1000)
    ap.add_argument("--record-every", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 by default: on the shared 2-core box 2 threads ran 5x slower)")
    ap.add_argument("--figdir", default=str(HERE / "figures"))
    ap.add_argument("--tag", default="", help="suffix for figure names (e.g. gpu)")
    ap.add_argument("--results", action="store_true", help="append a section to bench/RESULTS.md")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    figdir = Path(args.figdir)
    figdir.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    table: list[tuple[str, str, float, float, list[float], float]] = []
    figs: list[Path] = []
    t_all = time.perf_counter()
    for task in args.tasks.split(","):
        if task == "digits":
            data, epochs, title = digits_task(args.digits_size), args.epochs or 8, \
                f"digits {args.digits_size}x{args.digits_size}"
        elif task == "synth":
            data, epochs, title = synth_task(args.synth_train, args.synth_test), args.epochs or 5, \
                "synthetic 3x32x32"
        else:
            raise SystemExit(f"unknown task {task!r}")
        a = argparse.Namespace(**{**vars(args), "epochs": epochs})
        results: dict[str, list[dict]] = {}
        for method in methods:
            results[method] = [train_one(data, method, s, a) for s in range(args.seeds)]
            accs = [r["acc"] for r in results[method]]
            secs = sum(r["seconds"] for r in results[method])
            table.append((task, method, float(np.mean(accs)), float(np.std(accs)), accs, secs))
            print(f"{task:7s} {method:20s} acc {100 * np.mean(accs):6.2f} +- {100 * np.std(accs):5.2f}  "
                  f"({', '.join(f'{100 * x:.1f}' for x in accs)})  {secs:.0f}s", flush=True)
        if {"SGD", "SGD+AutoscaledNorm"} <= set(results):
            tag = task + (f"_{args.tag}" if args.tag else "")
            figs += plot(title, results, figdir, tag)
            g = results["SGD"][0]["global"]
            third = max(len(g) // 3, 1)
            print(f"{task}: SGD global std first/last third mean {np.mean(g[:third]):.3e} -> {np.mean(g[-third:]):.3e};"
                  f" AutoscaledNorm final alpha {results['SGD+AutoscaledNorm'][0]['alpha'][-1]:.3f}")
    wall = time.perf_counter() - t_all
    md = ["| task | method | test acc (mean ± std) | per seed | train s |", "|---|---|---|---|---|"]
    for task, method, m, s, accs, secs in table:
        md.append(f"| {task} | {method} | {100 * m:.2f} ± {100 * s:.2f} | "
                  f"{', '.join(f'{100 * x:.1f}' for x in accs)} | {secs:.0f} |")
    print("\n".join(md))
    print(f"total {wall:.0f}s; figures: {', '.join(str(p) for p in figs)}")
    if args.results:
        cmd = "bench/paper_gan.py " + " ".join(argv if argv is not None else sys.argv[1:])
        dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
        with open(HERE / "RESULTS.md", "a") as f:
            f.write(f"\n### Run {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC — `{cmd.strip()}`\n\n")
            f.write(f"Machine: {dev}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
                    f"ResNet-{args.depth} width {args.width}; wall {wall:.0f}s.\n\n")
            f.write("\n".join(md) + "\n\n")
            for p in figs:
                f.write(f"![{p.stem}](figures/{p.name})\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
