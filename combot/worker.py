"""What one worker process holds for its whole life, created in the app's lifespan."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from starlette.requests import Request

from combot import store
from combot.assets import Assets
from combot.classifier import Batcher, Classifier, default_model_dir, get_classifier
from combot.llm import ChatModel
from combot.errors import TooManyRequests
from combot.proxy import client_address
from combot.ratelimit import RateLimiter
from combot.sharedmodel import cache_dir
from combot.study import Study
from combot.timing import RecentLatencies


@dataclass
class Resources:
    """What one worker process holds for its whole life: created in the lifespan, seen by every request."""

    study: Study
    store: store.Store
    classifier: Classifier
    inference: ThreadPoolExecutor
    limiter: RateLimiter
    assets: Assets
    llm: ChatModel | None = None  # None: no LLM configured, the offline paraphraser answers
    # New sessions and declines per address ([server] session_rate_limit); None: no limit.
    starts: RateLimiter | None = None
    # The study's recent LLM reply times, for "matched" reply timing (None: not needed): of
    # follow-ups, and of openings (whose replies also wait for the classifier).
    latencies: RecentLatencies | None = None
    opening_latencies: RecentLatencies | None = None
    # First messages waiting together are classified as one batch on the inference thread.
    batcher: Batcher = field(init=False)

    def __post_init__(self) -> None:
        self.batcher = Batcher(self.classifier, self.inference,
                               max_batch=max(1, self.study.settings["classifier.max_batch"]))


def resources(request: Request) -> Resources:
    return request.app.state.resources  # type: ignore[no-any-return]


def limit_starts(request: Request) -> None:
    """Refuse a new session or decline when the participant's address has started too many this minute.
    The address is the participant's, not the proxy's, when the proxy is in [server] forwarded_allow_ips."""
    limiter = resources(request).starts
    if limiter is not None and not limiter.allow(client_address(request)):
        raise TooManyRequests("too many new sessions from this network; please wait a minute and reload the page")


def load_classifier(study: Study) -> Classifier:
    cfg = study.settings.section("classifier")
    model_dir = Path(cfg["model_dir"]) if cfg["model_dir"] else default_model_dir()
    head = Path(cfg["head"]) if cfg["head"] else None
    return get_classifier(model_dir, head=head, threads=cfg["threads"], max_length=cfg["max_length"],
                          threshold=cfg["threshold"], fallback_label=study.catch_all, label_map=cfg["labels"],
                          weights_cache=cache_dir(cfg["weights_cache"]))
