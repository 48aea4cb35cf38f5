"""What every worker imports, imported once by the forkserver the workers are forked from.

The supervisor stays small (it never imports these); the forkserver process imports them, and
each worker forked from it starts with their pages shared copy-on-write instead of importing its
own copy (~29 MB per worker: Starlette, Hypercorn, numpy, tokenizers, httpx and Combot itself).
httpx imports its connection pool (httpcore) and anyio's asyncio backend only at a client's first
request: imported here, so a worker's first LLM call in a launch burst does not spend ~10 ms of
CPU importing them (py-spy of a 300-message burst: 6 % of the workers' samples were imports).

Forking is safe only from a process with one thread and nothing open that a child could inherit
half-used. These imports start no thread (numpy's OpenBLAS is held to one by the supervisor's
environment) and open nothing. onnxruntime is left out on purpose: importing it starts a thread
(onnxruntime 1.32), so each worker imports it after the fork, and the classifier session, the
database connections and the event loop are likewise made in each worker.
"""

from __future__ import annotations

import gc
import sys

# httpx imports its command-line tool at `import httpx` whenever click is installed (Combot's CLI
# needs it), and with it rich and pygments when they are: ~4 MB of every worker's memory for a tool
# no worker runs. Marked absent, httpx skips it (its own fallback for a missing click).
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

import anyio._backends._asyncio  # noqa: E402,F401
import httpcore  # noqa: E402,F401
import httpcore._backends.anyio  # noqa: E402,F401
import httpx  # noqa: E402,F401
import hypercorn.asyncio.run  # noqa: E402,F401
import numpy  # noqa: E402,F401
import tokenizers  # noqa: E402,F401

import combot.classifier  # noqa: E402,F401
import combot.web  # noqa: E402,F401

# httpcore asks `import sniffio` at every connection-pool lock it sets up; without sniffio installed
# (anyio no longer needs it) each such import failed after searching every folder on sys.path (and
# the .pyz), ~3 % of the workers' CPU in a launch burst. None in sys.modules fails it at once; httpcore
# then assumes asyncio, which is what Combot runs on.
try:
    import sniffio  # noqa: F401
except ImportError:
    sys.modules["sniffio"] = None  # type: ignore[assignment]

# Objects that exist now live as long as the process: keep the garbage collector from writing to
# their pages (which would copy them into every worker).
gc.freeze()
