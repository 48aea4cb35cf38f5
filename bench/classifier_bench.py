"""Classifier speed and memory on this machine, one inference thread, against the targets of issue 3.

    python bench/classifier_bench.py [--model-dir model] [--runs 500] [--opt-levels]

Measures, with the shipped model and `Classifier` exactly as the server uses them:
- median tokenize + infer + head time of one 30-word message and of a batch of 8 messages;
- the split of the single-message time into tokenizing, the ONNX run and the head;
- the resident memory (VmRSS) of a fresh process that has loaded the session and classified;
- the size of the model files.
`--opt-levels` also times the raw session under each onnxruntime graph optimisation level.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from combot.classifier import Classifier, default_model_dir

MESSAGE_30 = (
    "I ordered a pair of running shoes online three weeks ago and the parcel still has not "
    "arrived even though the tracking says it was delivered to my address yesterday"
)
BATCH_8 = [
    MESSAGE_30,
    (
        "The kettle I bought last month started leaking from the bottom and now it trips the fuse "
        "every time I switch it on, so it is completely useless and probably dangerous too"
    ),
    (
        "When I asked the cashier to check the price again she rolled her eyes, called me cheap in "
        "front of the whole queue and then refused to serve me until I apologised to her"
    ),
    (
        "hi, is this the study about customer service? I am not sure what I am supposed to write "
        "here so please tell me what kind of story you want and how long it takes"
    ),
    (
        "My sofa was delivered five days late, the delivery men left it in the rain outside the "
        "building and the fabric is now stained and smells of damp all over the cushions"
    ),
    (
        "The jacket's zip broke the second time I wore it and the stitching on both pockets came "
        "loose after one wash even though I followed the care label exactly as written"
    ),
    (
        "I called the helpline about my broken phone and the agent laughed, said it was my own "
        "fault, put me on hold for forty minutes and then hung up on me without a word"
    ),
    (
        "I was charged twice for the same order and the bank says the shop has to refund me but "
        "the shop keeps telling me to contact the bank instead, which is going nowhere fast"
    ),
]
TARGETS = {"size_mb": 30.0, "one_ms": 3.0, "batch8_ms": 20.0, "rss_mb": 120.0}

RSS_CHILD = """
import sys
sys.path.insert(0, {root!r})
from pathlib import Path
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
import numpy, onnxruntime, tokenizers
base = rss()
from combot.classifier import Classifier
clf = Classifier.load(Path({model_dir!r}), threads=1)
loaded = rss()
for _ in range(20):
    clf.classify({batch!r})
print(base, loaded, rss())
"""


def median_ms(fn: Callable[[], object], runs: int) -> float:
    for _ in range(max(10, runs // 20)):
        fn()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def rss_of_fresh_process(model_dir: Path) -> tuple[float, float, float]:
    code = RSS_CHILD.format(root=str(Path(__file__).resolve().parent.parent), model_dir=str(model_dir),
                            batch=BATCH_8)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    base, loaded, used = (float(x) for x in out.split())
    return base, loaded, used


def opt_level_table(model_dir: Path, clf: Classifier, runs: int) -> list[tuple[str, float]]:
    import onnxruntime as ort

    feeds = clf.encoder.tokenize([MESSAGE_30])
    rows = []
    for name in ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, name)
        session = ort.InferenceSession(str(clf.encoder.path), options, providers=["CPUExecutionProvider"])
        rows.append((name, median_ms(lambda s=session: s.run(None, feeds), runs)))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=default_model_dir())
    parser.add_argument("--runs", type=int, default=500, help="timed runs of the single message")
    parser.add_argument("--opt-levels", action="store_true", help="also time each graph optimisation level")
    args = parser.parse_args()

    clf = Classifier.load(args.model_dir, threads=1)
    encoder = clf.encoder
    tokens = encoder.tokenize([MESSAGE_30])["input_ids"].shape[1]
    batch_tokens = encoder.tokenize(BATCH_8)["input_ids"].shape
    feeds = encoder.tokenize([MESSAGE_30])
    embedding = clf.embed([MESSAGE_30])

    one = median_ms(lambda: clf.classify([MESSAGE_30]), args.runs)
    batch8 = median_ms(lambda: clf.classify(BATCH_8), max(50, args.runs // 5))
    tokenize = median_ms(lambda: encoder.tokenize([MESSAGE_30]), args.runs)
    infer = median_ms(lambda: encoder._session.run(None, feeds), args.runs)
    head = median_ms(lambda: clf.head.probabilities(embedding), args.runs)
    base_rss, loaded_rss, used_rss = rss_of_fresh_process(args.model_dir)
    files = sorted(p for p in args.model_dir.iterdir() if p.is_file())
    size = sum(p.stat().st_size for p in files if p.name != "README.md") / 1e6

    def verdict(value: float, target: float) -> str:
        return "ok" if value < target else "MISSED"

    print(f"model: {args.model_dir} ({', '.join(p.name for p in files)})")
    print(f"1 thread; 30-word message = {tokens} tokens; batch of 8 padded to {batch_tokens[1]} tokens\n")
    print(f"{'measure':<44} {'value':>10}  {'target':>8}  verdict")
    rows = [
        ("model files (without README.md), MB", size, TARGETS["size_mb"]),
        ("one 30-word message, median ms", one, TARGETS["one_ms"]),
        ("batch of 8 messages, median ms", batch8, TARGETS["batch8_ms"]),
        ("RSS with the session loaded and used, MB", used_rss, TARGETS["rss_mb"]),
    ]
    for name, value, target in rows:
        print(f"{name:<44} {value:>10.2f}  {target:>8.1f}  {verdict(value, target)}")
    print("\nwhere the single-message time goes (medians, ms):")
    print(f"  tokenize {tokenize:.3f}   onnx run {infer:.3f}   head {head:.3f}")
    print(f"RSS of that process: {base_rss:.1f} MB after importing numpy/onnxruntime/tokenizers, "
          f"{loaded_rss:.1f} MB after loading, {used_rss:.1f} MB after classifying batches of 8")
    if args.opt_levels:
        print("\nraw session run of the 30-word message by graph optimisation level (ms):")
        for name, value in opt_level_table(args.model_dir, clf, args.runs):
            print(f"  {name:<22} {value:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
