"""`combot systemd`: a systemd unit that runs `combot serve` for one study folder as a service.

Stopping or restarting loses no message: systemd sends SIGTERM to the supervisor alone
(`KillMode=mixed`), which lets every worker finish its in-flight replies within `graceful_timeout`
and exits 0; only if that takes longer than `TimeoutStopSec` are the leftovers killed. (With
systemd's default, every worker would get SIGTERM too, and a Hypercorn worker run by a supervisor
dies of it on the spot.) The page retries a request that failed meanwhile, and the retry is answered
from the database.
"""

from __future__ import annotations

import math
import re
import sys
import zipfile
from pathlib import Path

# The supervisor waits graceful_timeout + 5 s for its workers, then terminates them and waits 5 s more.
STOP_MARGIN_SECONDS = 15


def command() -> list[str]:
    """How this Combot was started: `python3 /path/combot.pyz`, or `python -m combot` from an install."""
    program = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if program is not None and program.is_file() and zipfile.is_zipfile(program):
        return [sys.executable, str(program)]
    return [sys.executable, "-m", "combot"]


def _quote(arg: str) -> str:
    """One ExecStart= word: systemd expands % specifiers (so %% for a literal %) and splits on spaces."""
    arg = arg.replace("%", "%%")
    if re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _path(path: Path) -> str:
    return str(path).replace("%", "%%")


def unit(*, workdir: Path, argv: list[str], user: str, env_file: Path, graceful_timeout: float,
         title: str, pyz: bool, database: Path) -> str:
    """The unit file's text."""
    writable = " ".join(dict.fromkeys(_quote(str(p)) for p in (workdir, database.parent)))
    stop = math.ceil(graceful_timeout) + STOP_MARGIN_SECONDS
    # A .pyz unpacks its native libraries on first start: into the study folder, which the service may write.
    shiv = f"Environment=SHIV_ROOT={_path(workdir / '.shiv')}\n" if pyz else ""
    return f"""# Combot: {title.replace(chr(10), ' ')}
# Written by `combot systemd` in {workdir}. Install with:
#   sudo cp combot.service /etc/systemd/system/combot.service
#   sudo systemctl daemon-reload && sudo systemctl enable --now combot
[Unit]
Description=Combot study server ({_path(workdir)})
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User={user}
WorkingDirectory={_path(workdir)}
# OPENAI_API_KEY=... and COMBOT_ADMIN_TOKEN=... (chmod 600; never in this file).
EnvironmentFile={_path(env_file)}
{shiv}ExecStart={" ".join(_quote(arg) for arg in argv)}
Restart=on-failure
RestartSec=2
# SIGTERM to the supervisor only: in-flight replies finish (graceful_timeout {graceful_timeout:g} s), then it exits 0.
KillSignal=SIGTERM
KillMode=mixed
TimeoutStopSec={stop}
NoNewPrivileges=yes
PrivateTmp=yes
ProtectSystem=strict
ProtectHome=read-only
ReadWritePaths={writable}

[Install]
WantedBy=multi-user.target
"""
