"""What every worker imports, imported once by the forkserver the workers are forked from.

The supervisor stays small (it never imports these); the forkserver process imports them, and
each worker forked from it starts with their pages shared copy-on-write instead of importing its
own copy (~29 MB per worker: Starlette, Hypercorn, numpy, tokenizers, httpx and Combot itself).
(A worker calls the LLM through combot/llmhttp.py, on asyncio alone; httpx is imported for its
certificate authorities only, so its connection pool and anyio are not needed at a first call.)

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

import httpx  # noqa: E402,F401
import hypercorn.asyncio.run  # noqa: E402,F401
import numpy  # noqa: E402,F401
import tokenizers  # noqa: E402,F401

import combot.classifier  # noqa: E402,F401
import combot.web  # noqa: E402,F401

# Objects that exist now live as long as the process: keep the garbage collector from writing to
# their pages (which would copy them into every worker).
gc.freeze()
