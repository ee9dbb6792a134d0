"""``hollownet app``: a local web app (Gradio) on top of the Python API; ``pip install hollownet[app]``.

This module is what the CLI imports (for --help), so it imports neither Gradio nor torch: ``jobs``
(the background job registry), ``handlers`` (what the buttons do) and ``ui`` (the Gradio page) load
when the app starts.
"""

from __future__ import annotations

from hollownet.errors import HollownetError

DEFAULT_WORKDIR = "hollownet-app"


def add_app_parser(sub) -> None:
    """The ``app`` subcommand of ``hollownet`` (its whole argparse part)."""
    a = sub.add_parser("app", help="a local web app: photos, memory plan, training, generation, downloads (pip install hollownet[app])",
                       description="Start the web app on this machine and open the printed address in a browser. "
                                   "It is reachable from this machine only unless --host says otherwise; no public link "
                                   "unless --share.")
    a.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only; "
                                                       "0.0.0.0: every network interface)")
    a.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    a.add_argument("--share", action="store_true", help="also make a temporary public gradio.live link (off by default)")
    a.add_argument("--workdir", default=DEFAULT_WORKDIR,
                   help=f"where runs are kept: photos, store, checkpoints, LoRA, images (default ./{DEFAULT_WORKDIR})")
    a.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best available)")


def cmd_app(args) -> int:
    try:
        # lazily: --help and every other command must not need gradio (an optional extra) or torch
        from hollownet.app.ui import launch
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in ("gradio", "pandas"):
            raise HollownetError("the app needs Gradio: pip install 'hollownet[app]'") from None
        raise
    print(f"hollownet app: http://{args.host}:{args.port}  (runs kept in {args.workdir}; Ctrl-C to quit)")
    launch(args.workdir, host=args.host, port=args.port, share=args.share, device=args.device)
    return 0
