#!/usr/bin/env python3
"""Build the English prose corpus that the small accuracy model is trained and evaluated on.

Source: the Linux kernel documentation as Debian ships it in the binary package `linux-doc-6.1`
(version 6.1.192-3, section doc, architecture all). Its Sphinx tree keeps every reStructuredText
page under usr/share/doc/linux-doc-6.1/html/_sources/; this script reads those pages straight out
of the .deb (an ar archive holding data.tar.xz), skips the translated pages, turns the reST markup
into plain paragraphs, drops what is not prose (code, tables, directives, lists of symbols) and
splits the pages between a training and a held-out set by a hash of their path, so that the split
is the same on every machine and no page is in both.

    python scripts/prepare_corpus.py --out /tmp/corpus            # runs `apt-get download` itself
    python scripts/prepare_corpus.py --deb linux-doc-6.1_6.1.192-3_all.deb --out /tmp/corpus

Writes OUT/train.txt, OUT/validation.txt (pages separated by a blank line) and OUT/manifest.json
(package, version, sha256 of the .deb, which page went where, sizes).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("fastround.corpus")

PACKAGE = "linux-doc-6.1"
VERSION = "6.1.192-3"
VERSION_SHA256 = "f18dfe28dcab7bdbf9185be16b9521f5841277a6a96c374a6683a648d5d5fa4f"  # the .deb the model saw
SOURCES_PREFIX = "./usr/share/doc/linux-doc-6.1/html/_sources/"
# Pages whose hash falls in the first VALIDATION_BUCKETS of 1000 buckets are held out (about 2 %
# of the pages, a few hundred KB of text: enough windows of 512 tokens for a stable perplexity).
VALIDATION_BUCKETS = 20
MIN_WORDS = 8  # shorter paragraphs are headings, captions or table cells, not prose
MIN_LETTER_SHARE = 0.82  # of non-space characters; code and register tables fall below it

# Directives whose indented body is prose worth keeping; every other directive's body is dropped
# (code-block, kernel-doc, toctree, tables, figures, raw html, ...).
_PROSE_DIRECTIVES = frozenset(
    {"note", "warning", "important", "tip", "hint", "attention", "caution", "danger", "admonition", "seealso"}
)
_DIRECTIVE = re.compile(r"^\s*\.\.\s+([A-Za-z][\w:-]*)::(.*)$")
_COMMENT_OR_TARGET = re.compile(r"^\s*\.\.(\s|$)")
_SECTION_RULE = re.compile(r"^([=\-~^*#+`':\"._])\1{3,}\s*$")
_TABLE_LINE = re.compile(r"^\s*(\+[-=+]{3,}|\|.*\||={3,}(\s+={3,})+\s*$|-{3,}(\s+-{3,})+\s*$)")
_FIELD = re.compile(r"^\s*:[\w -]+:(\s|$)")
_BULLET = re.compile(r"^(\s*)([-*+•]|#\.|\(?\d+[.)]|\(?[a-zA-Z][.)])\s+")

# Inline markup, undone in this order.
_ROLE_WITH_TARGET = re.compile(r":[\w:+.-]+:`([^`<]*?)\s*<[^`>]*>`")
_ROLE = re.compile(r":[\w:+.-]+:`~?!?([^`]*)`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]*>`__?")
_REF = re.compile(r"`([^`]+)`__?")
_LITERAL = re.compile(r"``([^`]+)``")
_STRONG = re.compile(r"\*\*([^*]+)\*\*")
_EMPH = re.compile(r"(?<![\w*])\*([^*\s][^*]*?)\*(?![\w*])")
_SUBST = re.compile(r"\|([\w -]+)\|")
_FOOTNOTE = re.compile(r"\s*\[(#|\*|\d+|#\w+)\]_")
_URL = re.compile(r"<?https?://\S+>?")
_SPACES = re.compile(r"\s+")


@dataclass
class Page:
    path: str  # relative to the _sources folder, e.g. "process/submitting-patches.rst.txt"
    text: str  # cleaned paragraphs joined by blank lines


def read_deb_member_tar(deb: Path) -> tarfile.TarFile:
    """Open the data.tar.* inside a .deb (an `ar` archive) without needing dpkg."""
    blob = deb.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise ValueError(f"{deb}: not a Debian package (no ar magic)")
    pos = 8
    while pos + 60 <= len(blob):
        header = blob[pos : pos + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        body = blob[pos + 60 : pos + 60 + size]
        if name.startswith("data.tar"):
            return tarfile.open(fileobj=io.BytesIO(body), mode="r:*")
        pos += 60 + size + (size & 1)  # members are padded to an even offset
    raise ValueError(f"{deb}: no data.tar member")


def download_deb(dest: Path, version: str) -> Path:
    if shutil.which("apt-get") is None:
        raise RuntimeError(f"apt-get not found: download {PACKAGE}_{version}_all.deb yourself and pass --deb")
    subprocess.run(["apt-get", "download", f"{PACKAGE}={version}"], cwd=dest, check=True)
    found = sorted(dest.glob(f"{PACKAGE}_*_all.deb"))
    if not found:
        raise RuntimeError(f"apt-get download {PACKAGE}={version} left no .deb in {dest}")
    return found[0]


def strip_inline(text: str) -> str:
    text = _ROLE_WITH_TARGET.sub(r"\1", text)
    text = _ROLE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _LITERAL.sub(r"\1", text)
    text = _REF.sub(r"\1", text)
    text = _STRONG.sub(r"\1", text)
    text = _EMPH.sub(r"\1", text)
    text = _SUBST.sub(r"\1", text)
    text = _FOOTNOTE.sub("", text)
    text = _URL.sub("", text)
    text = text.replace("\\", "")
    return _SPACES.sub(" ", text).strip()


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def rst_paragraphs(source: str) -> list[str]:
    """Raw paragraphs of a reST page with code, directives, tables and comments cut out."""
    lines = source.expandtabs(8).splitlines()
    paragraphs: list[str] = []
    current: list[str] = []
    skip_indent: int | None = None  # drop lines indented deeper than this (a literal or directive body)
    literal_next = False  # the paragraph just closed ended with "::"

    def close() -> None:
        nonlocal literal_next
        if current:
            paragraphs.append("\n".join(current))
            literal_next = current[-1].rstrip().endswith("::")
            current.clear()

    for line in lines:
        if skip_indent is not None:
            if not line.strip() or _indent(line) > skip_indent:
                continue
            skip_indent = None
        if not line.strip():
            close()
            continue
        if literal_next:
            literal_next = False
            base = _indent(paragraphs[-1].splitlines()[-1]) if paragraphs else 0
            if _indent(line) > base:
                skip_indent = base
                continue
        directive = _DIRECTIVE.match(line)
        if directive:
            close()
            if directive.group(1).lower() not in _PROSE_DIRECTIVES:
                skip_indent = _indent(line)
            elif directive.group(2).strip():
                current.append(directive.group(2))
            continue
        if _COMMENT_OR_TARGET.match(line):
            close()
            skip_indent = _indent(line)
            continue
        if _SECTION_RULE.match(line.strip()):
            # The heading text above a rule is not prose: drop the lines gathered so far.
            current.clear()
            continue
        current.append(line)
    close()
    return paragraphs


def clean_paragraph(raw: str) -> str | None:
    lines = raw.splitlines()
    if any(_TABLE_LINE.match(line) for line in lines):
        return None
    if all(_FIELD.match(line) for line in lines[:1]):
        return None
    first = _BULLET.sub("", lines[0], count=1)
    text = strip_inline(" ".join([first, *(line.strip() for line in lines[1:])]))
    text = text.rstrip(":") + ("." if text.endswith("::") else "")
    if len(text.split()) < MIN_WORDS:
        return None
    visible = [c for c in text if not c.isspace()]
    letters = sum(c.isalpha() for c in visible)
    if letters < MIN_LETTER_SHARE * len(visible):
        return None
    if not text.isascii():
        return None  # the English pages are ASCII; what is not is a name list or a diagram
    return text


def clean_page(source: str) -> str:
    kept = [p for p in (clean_paragraph(raw) for raw in rst_paragraphs(source)) if p is not None]
    return "\n\n".join(kept)


def is_validation(path: str) -> bool:
    bucket = int.from_bytes(hashlib.sha256(path.encode()).digest()[:4], "big") % 1000
    return bucket < VALIDATION_BUCKETS


def extract_pages(deb: Path) -> list[Page]:
    pages: list[Page] = []
    with read_deb_member_tar(deb) as tar:
        for member in tar:
            if not (member.isfile() and member.name.startswith(SOURCES_PREFIX)):
                continue
            rel = member.name[len(SOURCES_PREFIX) :]
            if rel.startswith("translations/") or not rel.endswith(".rst.txt"):
                continue
            handle = tar.extractfile(member)
            assert handle is not None  # a regular file always has a body
            text = clean_page(handle.read().decode("utf-8", errors="replace"))
            if text:
                pages.append(Page(rel, text))
    if not pages:
        raise ValueError(f"{deb}: no page under {SOURCES_PREFIX}; is it {PACKAGE}?")
    pages.sort(key=lambda p: p.path)
    return pages


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deb", type=Path, help=f"a downloaded {PACKAGE} .deb (default: apt-get download it)")
    parser.add_argument("--version", default=VERSION, help=f"package version to download (default {VERSION})")
    parser.add_argument("--out", type=Path, required=True, help="folder for train.txt, validation.txt, manifest.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    with tempfile.TemporaryDirectory() as tmp:
        deb = args.deb if args.deb is not None else download_deb(Path(tmp), args.version)
        if not deb.is_file():
            raise FileNotFoundError(f"--deb {deb}: no such file")
        sha256 = hashlib.sha256(deb.read_bytes()).hexdigest()
        if sha256 != VERSION_SHA256:
            logger.warning("%s is not the %s %s .deb the shipped model was trained on (sha256 %s)", deb, PACKAGE, VERSION, sha256)
        pages = extract_pages(deb)

    train = [p for p in pages if not is_validation(p.path)]
    valid = [p for p in pages if is_validation(p.path)]
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, split in (("train", train), ("validation", valid)):
        text = "\n\n".join(p.text for p in split) + "\n"
        (args.out / f"{name}.txt").write_text(text, encoding="utf-8")
        sizes[name] = {"pages": len(split), "bytes": len(text.encode()), "words": len(text.split())}
        logger.info("%s: %d pages, %.2f MB, %d words", name, len(split), len(text) / 1e6, sizes[name]["words"])
    manifest = {
        "package": PACKAGE,
        "version": args.version if args.deb is None else deb.name,
        "deb_sha256": sha256,
        "sources": SOURCES_PREFIX,
        "validation_buckets_per_1000": VALIDATION_BUCKETS,
        "sizes": sizes,
        "validation_pages": [p.path for p in valid],
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
