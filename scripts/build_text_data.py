"""Rebuild the package's bundled English text from two Debian packages.

Why: tests and the default demo must run with no network, on real text, with
calibration and evaluation disjoint and of more than one kind. We ship a few MB
extracted from

* ``python3.11-doc`` (Python documentation, PSF licence): the ``<p>`` paragraphs
  of each HTML page; and
* ``jargon-text`` (the Jargon File 4.4.7, public domain): its plain-text paragraphs.

Documents (an HTML page, or a run of 25 Jargon File paragraphs) are assigned to
``calibration`` or ``evaluation`` by a stable hash of their name, so no
paragraph appears in both splits.

Usage (on a Debian machine with apt access)::

    cd /tmp && apt-get download python3.11-doc jargon-text
    dpkg-deb -x python3.11-doc_*.deb pydoc && dpkg-deb -x jargon-text_*.deb jargon
    python scripts/build_text_data.py /tmp/pydoc /tmp/jargon
"""

from __future__ import annotations

import gzip
import hashlib
import re
import sys
from pathlib import Path

import lxml.html

OUT = Path(__file__).resolve().parents[1] / "sparse_expansion_plugin" / "data" / "text"
PYDOC_SUBDIRS = ("library", "tutorial", "reference", "howto", "faq", "using", "glossary.html")
# Rough budget per split and source (characters), to keep package data a few MB.
BUDGET = {"calibration": 1_200_000, "evaluation": 400_000}
EVAL_SHARE = 0.25


def split_of(name: str) -> str:
    """Stable split assignment of a document by the hash of its name."""
    h = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "evaluation" if h < EVAL_SHARE else "calibration"


def clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def python_doc_documents(root: Path) -> list[tuple[str, list[str]]]:
    html_root = next(root.rglob("html/library")).parent
    docs = []
    for sub in PYDOC_SUBDIRS:
        paths = [html_root / sub] if sub.endswith(".html") else sorted((html_root / sub).rglob("*.html"))
        for path in paths:
            tree = lxml.html.parse(str(path))
            paras = [clean(p.text_content()) for p in tree.xpath("//div[@class='body']//p")]
            paras = [p for p in paras if len(p) >= 60]
            if paras:
                docs.append((str(path.relative_to(html_root)), paras))
    return docs


def jargon_documents(root: Path) -> list[tuple[str, list[str]]]:
    raw = gzip.decompress(next(root.rglob("jargon.txt.gz")).read_bytes()).decode("utf-8")
    paras = [clean(p) for p in re.split(r"\n\s*\n", raw)]
    # Drop tables (box drawing), rules and headings.
    paras = [p for p in paras if len(p) >= 60 and not re.search(r"[\u2500-\u257f]", p)]
    chunk = 25
    return [(f"jargon-{i // chunk:04d}", paras[i : i + chunk]) for i in range(0, len(paras), chunk)]


def write_split(source: str, docs: list[tuple[str, list[str]]]) -> None:
    for split, budget in BUDGET.items():
        chosen, size = [], 0
        for name, paras in docs:
            if split_of(f"{source}/{name}") != split:
                continue
            block = "\n".join(paras)
            if size + len(block) > budget:
                break
            chosen.append(block)
            size += len(block)
        out = OUT / f"{source}.{split}.txt.gz"
        out.write_bytes(gzip.compress(("\n".join(chosen) + "\n").encode("utf-8"), mtime=0))
        print(f"{out.name}: {len(chosen)} documents, {size} characters")


def main(pydoc_root: str, jargon_root: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    pydocs = python_doc_documents(Path(pydoc_root))
    # Interleave sections so both splits see library, tutorial, reference, ...
    pydocs.sort(key=lambda d: hashlib.sha256(d[0].encode()).hexdigest())
    write_split("python_docs", pydocs)
    write_split("jargon_file", jargon_documents(Path(jargon_root)))


if __name__ == "__main__":
    main(*sys.argv[1:3])
