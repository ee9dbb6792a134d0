"""``hollownet app``: a local web app (Gradio) on top of the Python API; ``pip install hollownet[app]``.

This module is what the CLI imports (for --help), so it imports neither Gradio nor torch: ``jobs``
(the background job registry), ``handlers`` (what the buttons do) and ``ui`` (the Gradio page) load
when the app starts.
"""

from __future__ import annotations

import ipaddress
import os
import warnings

from hollownet.errors import HollownetError

DEFAULT_WORKDIR = "hollownet-app"
PASSWORD_ENV, USER = "HOLLOWNET_APP_PASSWORD", "hollownet"  # --password: Gradio's log-in page


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
    a.add_argument("--password", action="store_true",
                   help=f"ask for a password, the one in ${PASSWORD_ENV} (user name {USER!r}): for --host other than 127.0.0.1")


def is_loopback(host: str) -> bool:
    """``host`` is this machine only (127.x.x.x, ::1, localhost)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def app_auth(args) -> tuple[str, str] | None:
    """Gradio's ``auth`` for ``--password`` (the password read from the environment, never a flag: ``ps`` shows flags);
    a warning line when the app listens beyond this machine without one."""
    if args.password:
        password = os.environ.get(PASSWORD_ENV, "")
        if not password:
            raise HollownetError(f"--password reads the password from ${PASSWORD_ENV}, which is empty: "
                                 f"e.g. {PASSWORD_ENV}=... hollownet app --password")
        return USER, password
    if not is_loopback(args.host):
        warnings.warn(f"--host {args.host} makes the app reachable by anyone on your network, who can then see your "
                      f"photos and runs and use this machine: add --password (with ${PASSWORD_ENV} set), or use --host 127.0.0.1")
    return None


def cmd_app(args) -> int:
    auth = app_auth(args)
    from hollownet.lock import output_lock  # lazy

    with output_lock(args.workdir, "--workdir"):  # one app per workdir: a second would take over the first's live runs
        return _serve(args, auth)


def _serve(args, auth) -> int:
    try:
        # lazily: --help and every other command must not need gradio (an optional extra) or torch
        from hollownet.app.ui import launch
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in ("gradio", "pandas"):
            raise HollownetError("the app needs Gradio: pip install 'hollownet[app]'") from None
        raise
    print(f"hollownet app: http://{args.host}:{args.port}  (runs kept in {args.workdir}; Ctrl-C to quit)")
    launch(args.workdir, host=args.host, port=args.port, share=args.share, device=args.device, auth=auth)
    return 0
