"""``hollownet app``: a local web app (Gradio) on top of the Python API; ``pip install hollownet[app]``.

This module is what the CLI imports (for --help), so it imports neither Gradio nor torch: ``jobs``
(the background job registry), ``handlers`` (what the buttons do) and ``ui`` (the Gradio page) load
when the app starts.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
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


def check_port(host: str, port: int) -> None:
    """Refuse, in one line, a port another program (a second ``hollownet app``) already listens on.

    Gradio's own check, done first: before the workdir is locked and Gradio (seconds) is imported."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Gradio and uvicorn: a just-closed port is free
        try:
            s.bind((host.strip("[]"), port))
        except OSError as e:
            raise port_in_use(port) if e.errno == errno.EADDRINUSE else HollownetError(
                f"cannot listen on {host}:{port} ({e.strerror}): pick another --host or --port") from None


def port_in_use(port: int) -> HollownetError:
    return HollownetError(f"port {port} is in use (another hollownet app?): pick a free one with --port N, "
                          f"e.g. --port {port + 1}")


def started_line(url: str, workdir, share_url: str | None, share: bool) -> str:
    """The one line ``hollownet app`` prints once it serves (Gradio's own, which names launch(share=True), is off)."""
    if share_url:
        where = f"{url.rstrip('/')}  and publicly at {share_url} (temporary; anyone with the link can use it)"
    elif share:
        where = f"{url.rstrip('/')}  (no public link: see the message above)"
    else:
        where = f"{url.rstrip('/')}  (this address only; --share for a temporary public link)"
    return f"hollownet app: {where}; runs kept in {workdir}; Ctrl-C to quit"


def cmd_app(args) -> int:
    auth = app_auth(args)
    check_port(args.host, args.port)
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
    try:
        demo = launch(args.workdir, host=args.host, port=args.port, share=args.share, device=args.device, auth=auth,
                      block=False)
    except OSError as e:  # taken between check_port and Gradio's bind
        if str(e).startswith("Cannot find empty port"):
            raise port_in_use(args.port) from None
        raise
    print(started_line(demo.local_url, args.workdir, demo.share_url, args.share), flush=True)
    demo.block_thread()
    return 0
