"""Train a small CNN on scikit-learn's 8x8 digits with gradwatch attached, recording offline.

Everything is local and offline: the data ships with scikit-learn, and by default the run is
recorded to ``runs/digits.gwrec`` (one JSON line per batch), which ``gradwatch upload`` can send to
a server later. The file holds this run only (the agent moves an earlier recording there to
``PATH.prev``) unless ``--append`` is given. Point ``--out`` at a server instead (``--out http://127.0.0.1:8000``) to
stream live; ``gradwatch demo`` does that with a server of its own.

    .venv/bin/python examples/train_digits.py --out runs/digits.gwrec
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from gradwatch.agent import ClipNorm, watch
from gradwatch.cli.digits import accuracy, load, make_model


def target(out: str) -> str:
    """``--out`` as a gradwatch target: a bare path means an offline file."""
    if out == "memory" or out.startswith(("file:", "http://", "https://")):
        return out
    return f"file:{out}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="file:runs/digits.gwrec",
                    help="where records go: a file path, file:PATH, or a server URL (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--max-norm", type=float, default=1.0, help="ClipNorm threshold")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--project", default="examples")
    ap.add_argument("--run", default="digits-cnn")
    ap.add_argument("--append", action="store_true",
                    help="add this run to an existing recording file instead of replacing it")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    x_tr, y_tr, x_te, y_te = load(args.seed)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    server = target(args.out)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "project", "run", "append")}
    t0 = time.perf_counter()
    print(f"digits: {len(y_tr)} train / {len(y_te)} test images, "
          f"{sum(p.numel() for p in model.parameters())} parameters; recording to {server}")
    with watch(model, opt, server=server, project=args.project, run=args.run, config=config,
               tags=["example", "digits"], transforms=[ClipNorm(args.max_norm)],
               transport={"append": args.append}) as w:
        g = torch.Generator().manual_seed(args.seed)
        for epoch in range(args.epochs):
            perm = torch.randperm(len(y_tr), generator=g)
            total, correct, seen = 0.0, 0, 0
            for i in range(0, len(y_tr), args.batch_size):
                idx = perm[i: i + args.batch_size]
                xb, yb = x_tr[idx], y_tr[idx]
                logits = model(xb)
                loss = nn.functional.cross_entropy(logits, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                batch_acc = (logits.argmax(1) == yb).float().mean()
                w.log(loss=loss, accuracy=batch_acc, lr=opt.param_groups[0]["lr"])
                total += loss.item() * len(yb)
                correct += int((logits.argmax(1) == yb).sum())
                seen += len(yb)
            test_acc = accuracy(model, x_te, y_te)
            w.log(test_accuracy=test_acc, epoch=epoch)
            print(f"epoch {epoch + 1}/{args.epochs}: loss {total / seen:.4f}  train acc {correct / seen:.3f}  "
                  f"test acc {test_acc:.3f}  ({w.step} steps, {time.perf_counter() - t0:.1f}s)")
        run_id = w.run_id
    print(f"final test accuracy {test_acc:.3f}; run {run_id} ({w.step} steps) recorded to {server}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
