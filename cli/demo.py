"""``gradwatch demo``: a server and a real training run streaming into it, in one command.

Starts ``gradwatch serve`` in this process (SQLite in a temporary directory unless ``--db``),
prints the dashboard URL at once, then trains a small CNN on scikit-learn's digits with
gradwatch's ``GradScaler`` (fp16 autocast on a GPU; bf16 autocast on a CPU), ``AutoscaledNorm``
and ``ClipNorm``, streaming every step, and keeps serving until Ctrl-C.

The injected overflow (off with ``--no-inject``): at the middle step the demo writes +inf into
one element of ``conv2.weight``'s (scaled) gradient, exactly what an fp16 overflow leaves there.
The scaler skips that step, halves the loss scale, and gradwatch records an ``overflow`` event
naming ``conv2.weight``, a skipped step and the scale drop, which the dashboard shows.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass

#: the layer whose gradient gets the injected +inf
INJECT_LAYER = "conv2.weight"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="start the server and a real training run streaming into it",
        description="Start the server, print the dashboard URL, train a small CNN on scikit-learn's digits "
                    "with GradScaler, AutoscaledNorm and ClipNorm streaming into it, and keep serving "
                    "until Ctrl-C. One overflow is injected at the middle step (as an fp16 overflow would "
                    "leave it) so you can see how gradwatch reports one; --no-inject turns it off.")
    p.add_argument("--steps", type=int, default=3000,
                   help="optimizer steps to train (default 3000: well under a minute on a laptop CPU)")
    p.add_argument("--host", default="127.0.0.1", help="bind address of the server (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="server port (default 8000)")
    p.add_argument("--db", default=None, metavar="URL",
                   help="database URL (default: SQLite in a temporary directory, deleted on exit)")
    p.add_argument("--no-serve", action="store_true",
                   help="start no server: stream into a running one at GRADWATCH_URL "
                        "(default http://127.0.0.1:PORT)")
    p.add_argument("--no-inject", action="store_true", help="do not inject the demonstration overflow")
    p.add_argument("--open", action="store_true", help="open the dashboard in a browser where there is one")
    p.add_argument("--exit", action="store_true",
                   help="stop serving when training ends instead of waiting for Ctrl-C (scripts, CI)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=run)


def _err(msg: str) -> None:
    sys.stderr.write(f"gradwatch demo: {msg}\n")


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _healthy(url: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/healthz", timeout=timeout) as r:
            return bool(r.status == 200)
    except OSError:
        return False


class _Serving:
    """The server on a background thread of this process (uvicorn installs no signal handlers
    off the main thread, so Ctrl-C reaches the main thread, which stops it)."""

    def __init__(self, db: str | None, host: str, port: int) -> None:
        from .serve import configure_logging, make_server, settings_for

        configure_logging("warning")
        self.tmp = None if db else tempfile.mkdtemp(prefix="gradwatch-demo-")
        self.settings = settings_for(db or f"sqlite:///{os.path.join(self.tmp or '', 'gradwatch.db')}")
        self.server = make_server(self.settings, host, port, "warning")
        self.thread = threading.Thread(target=self.server.run, name="gradwatch-server", daemon=True)

    def start(self, timeout: float = 120.0) -> bool:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        return bool(self.server.started)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


@dataclass
class Trained:
    run_id: str
    steps: int
    test_accuracy: float
    injected_at: int | None


def train(url: str, steps: int, *, inject: bool, seed: int) -> Trained:
    """Train the digits CNN for ``steps`` optimizer steps, streaming to ``url``; a progress bar on stderr."""
    import torch
    from torch import nn

    from gradwatch.agent import AutoscaledNorm, ClipNorm, GradScaler, watch

    from .digits import accuracy, load, make_model
    from .progress import Progress

    torch.manual_seed(seed)
    cuda = torch.cuda.is_available()
    device, amp_dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.bfloat16)
    x_tr, y_tr, x_te, y_te = (t.to(device) for t in load(seed))
    model = make_model().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    # growth_interval 200 (torch: 2000) so a short demo also shows the scale growing back
    scaler = GradScaler(device, growth_interval=200)
    inject_at = steps // 2 if inject else None
    batch = 32
    print(f"training a {sum(p.numel() for p in model.parameters())}-parameter CNN on {len(y_tr)} digits for "
          f"{steps} steps on {device} with {str(amp_dtype).removeprefix('torch.')} autocast "
          f"({'a GPU: fp16' if cuda else 'no GPU: bf16, fp16 on a GPU'}), GradScaler, AutoscaledNorm, ClipNorm(1.0)"
          + (f"; injecting an overflow into {INJECT_LAYER} at step {inject_at}" if inject_at is not None else ""),
          flush=True)
    config = {"steps": steps, "lr": 0.05, "batch_size": batch, "amp": str(amp_dtype), "device": device,
              "inject_overflow_at": inject_at}
    g = torch.Generator().manual_seed(seed)
    test_acc = math.nan
    with watch(model, opt, server=url, project="demo", run="digits-cnn", config=config, tags=["demo"],
               transforms=[AutoscaledNorm(), ClipNorm(1.0)]) as w, \
            Progress(steps, "training", unit="steps") as bar:
        print(f"gradwatch demo: run page {url}/runs/{w.run_id}", flush=True)
        step = 0
        while step < steps:
            perm = torch.randperm(len(y_tr), generator=g).to(device)
            for i in range(0, len(y_tr) - batch + 1, batch):
                if step >= steps:
                    break
                t0 = time.perf_counter()
                idx = perm[i: i + batch]
                with torch.autocast(device, dtype=amp_dtype):
                    logits = model(x_tr[idx])
                    loss = nn.functional.cross_entropy(logits, y_tr[idx])
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if step == inject_at:
                    grad = dict(model.named_parameters())[INJECT_LAYER].grad
                    assert grad is not None
                    grad.view(-1)[0] = math.inf  # what an fp16 overflow leaves in the scaled gradient
                scaler.step(opt)
                scaler.update()
                sched.step()
                w.log(loss=loss.detach(), accuracy=(logits.argmax(1) == y_tr[idx]).float().mean(),
                      lr=sched.get_last_lr()[0])
                step += 1
                dt = time.perf_counter() - t0
                bar.update(step, note=f"loss {loss.item():.3f}  {1000 * dt:.0f} ms/step  "
                                      f"scale {scaler.get_scale():g}")
            test_acc = accuracy(model, x_te, y_te)
            w.log(test_accuracy=test_acc)
        run_id = w.run_id
    return Trained(run_id=run_id, steps=steps, test_accuracy=test_acc, injected_at=inject_at)


def run(args: argparse.Namespace) -> int:
    from .serve import urls

    if args.steps < 1:
        _err("--steps must be at least 1")
        return 2
    serving: _Serving | None = None
    if args.no_serve:
        url = os.environ.get("GRADWATCH_URL") or f"http://127.0.0.1:{args.port}"
        if not _healthy(url):
            _err(f"no gradwatch server answers at {url} (start one with `gradwatch serve`, or drop --no-serve)")
            return 1
        dash = url.rstrip("/") + "/"
        print(f"gradwatch demo: streaming into the server at {url}; dashboard {dash}", flush=True)
    else:
        if not _port_free(args.host, args.port):
            _err(f"port {args.port} on {args.host} is in use (another gradwatch?); pass --port N, "
                 f"or --no-serve to stream into the server already running there")
            return 1
        dash, docs = urls(args.host, args.port)
        url = dash.rstrip("/")
        print(f"gradwatch demo: dashboard {dash}  (API docs {docs})", flush=True)
        serving = _Serving(args.db, args.host, args.port)
        where = f"a temporary SQLite database in {serving.tmp}, deleted on exit" if serving.tmp else args.db
        print(f"gradwatch demo: storing into {where}", flush=True)
        if not serving.start():
            _err("the server did not start (see the messages above)")
            serving.stop()
            return 1
    if args.open:
        _open_browser(dash)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # `kill`, docker stop: stop as Ctrl-C does, cleaning up
        # Ctrl-C even where SIGINT came in ignored (a job started in the background by a
        # non-interactive shell, as CI runners do): the demo serves until told to stop.
        signal.signal(signal.SIGINT, _interrupt)
    try:
        done = train(url, args.steps, inject=not args.no_inject, seed=args.seed)
        print(f"gradwatch demo: run {done.run_id} finished: {done.steps} steps, test accuracy "
              f"{done.test_accuracy:.3f}; REST: {url}/api/v1/runs/{done.run_id}", flush=True)
        if done.injected_at is not None:
            print(f"gradwatch demo: step {done.injected_at} was the injected overflow in {INJECT_LAYER}: "
                  f"see its overflow event at {url}/api/v1/runs/{done.run_id}/events", flush=True)
        if serving is not None and not args.exit:
            print(f"gradwatch demo: still serving {dash}; press Ctrl-C to stop", flush=True)
            while serving.thread.is_alive():
                serving.thread.join(0.5)
    except KeyboardInterrupt:
        print("\ngradwatch demo: stopped", flush=True)
    finally:
        if serving is not None:
            serving.stop()
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _open_browser(url: str) -> None:
    import webbrowser

    try:
        opened = webbrowser.open(url)
    except Exception:  # noqa: BLE001 - no browser is not an error for a demo
        opened = False
    if not opened:
        print(f"gradwatch demo: no browser found here; open {url} yourself", flush=True)

