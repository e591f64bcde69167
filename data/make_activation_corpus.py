"""Build data/activation_corpus.json once (notebook 07): English prose paragraphs, offline, deterministic.

    .venv/bin/python data/make_activation_corpus.py   # rewrites data/activation_corpus.json

Sources: (1) docstrings of Python standard-library modules, classes and functions (inspect.getdoc), split into
paragraphs and filtered to prose (no code, no tables, mostly letters); (2) the model-written texts of
data/future_lens_corpus.json. Each entry is one document (a paragraph), the unit of the train/held-out split.
"""
import hashlib
import inspect
import json
import importlib
import re
import sys
import warnings
from pathlib import Path

MODULES = ["abc", "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures",
           "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email",
           "enum", "fractions", "ftplib", "functools", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac",
           "html.parser", "http.client", "http.server", "imaplib", "importlib", "inspect", "io", "ipaddress",
           "itertools", "json", "locale", "logging", "lzma", "mailbox", "mimetypes", "multiprocessing", "numbers",
           "operator", "os", "pathlib", "pickle", "pkgutil", "platform", "poplib", "pprint", "queue", "random",
           "re", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "signal", "smtplib", "socket",
           "socketserver", "sqlite3", "ssl", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile",
           "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "types", "typing", "unittest",
           "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom",
           "xml.etree.ElementTree", "zipfile", "zoneinfo"]
MIN_WORDS, MAX_WORDS = 20, 160


def is_prose(p: str) -> bool:
    words = p.split()
    if not (MIN_WORDS <= len(words) <= MAX_WORDS):
        return False
    if re.search(r">>>|::|\|\s|={3,}|-{3,}|\{|\}|\t|  {2,}", p):
        return False
    letters = sum(c.isalpha() or c.isspace() for c in p)
    return letters / len(p) > 0.9 and p[0].isupper() and p.rstrip()[-1] in ".!?" and "_" not in p


def docstrings(name: str) -> list[str]:
    mod = importlib.import_module(name)
    objs = [mod] + [v for k, v in sorted(vars(mod).items()) if not k.startswith("_")
                    and getattr(v, "__module__", None) == mod.__name__ and (inspect.isclass(v) or inspect.isfunction(v))]
    out = []
    for obj in objs:
        members = [obj] + ([m for k, m in sorted(vars(obj).items()) if not k.startswith("_") and inspect.isfunction(m)]
                           if inspect.isclass(obj) else [])
        for m in members:
            doc = inspect.getdoc(m) or ""
            out += [" ".join(p.split()) for p in re.split(r"\n\s*\n", doc)]
    return out


def main() -> None:
    warnings.simplefilter("ignore")
    here = Path(__file__).parent
    seen, docs = set(), []
    for name in MODULES:
        for p in docstrings(name):
            if is_prose(p) and p not in seen:
                seen.add(p)
                docs.append({"source": f"stdlib:{name}", "text": p})
    for t in json.loads((here / "future_lens_corpus.json").read_text())["texts"]:
        t = " ".join(t.split())
        if len(t.split()) >= MIN_WORDS and t not in seen:
            seen.add(t)
            docs.append({"source": "future_lens_corpus", "text": t})
    body = {"description": __doc__.strip(), "python": sys.version.split()[0], "documents": docs}
    body["sha256"] = hashlib.sha256(json.dumps(docs).encode()).hexdigest()
    (here / "activation_corpus.json").write_text(json.dumps(body, indent=0, ensure_ascii=False) + "\n")
    print(len(docs), "documents,", sum(len(d["text"].split()) for d in docs), "words")


if __name__ == "__main__":
    main()
