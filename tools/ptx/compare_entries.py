#!/usr/bin/env python3
"""Compares the kernels of two PTX files entry by entry, ignoring what a refactor may rename:
virtual register numbers and labels (each renamed in order of first use, so the data flow between
instructions must still match), the `.reg` declarations (they only bound the numbers: a refactor
can leave gaps), the anonymous-namespace hash, local-variable numbering, and the
enclosing-function part of a function-local static's mangled name.

  compare_entries.py BEFORE.ptx AFTER.ptx [--show N]

Prints how many entries are identical, which differ, which are gone or new; with --show N, the
first N lines of each differing entry's diff. Exit status 0 when every entry of BEFORE is in AFTER
unchanged (new entries allowed), 1 otherwise. Used by tools/ptx/diff_rev.sh: a device-code
refactor whose PTX is identical needs no device run (kernels/cuda/README.md).
"""
import argparse
import difflib
import re
import sys


class FirstUseNames:
    """re.sub callback: the n-th distinct name met gets the n-th canonical name of its kind."""

    def __init__(self):
        self.names = {}

    def __call__(self, m):
        kind = m.group(1) if m.re.groups else "L"
        return self.names.setdefault(m.group(0), f"{kind}#{len(self.names)}")


def entries(path, loose=False):
    """{entry: normalised body}. loose: register numbers and labels dropped altogether instead of
    renamed (blind to which register an operand is, so only a hint when the strict form differs)."""
    text = open(path).read()
    out = {}
    for m in re.finditer(r"\.entry\s+(\S+)\((.*?)\n\}\n", text, re.S):
        name, body = m.group(1), m.group(0)
        body = "\n".join(line for line in body.split("\n") if not line.lstrip().startswith(".reg"))
        body = re.sub(r"%(r|rd|f|fd|p|rs|h|hh|b)\d+", r"%\1" if loose else FirstUseNames(), body)
        body = re.sub(r"\$L__\w+", "L" if loose else FirstUseNames(), body)
        # The anonymous namespace's name (a hash of the file and its build) in mangled names:
        # "<length>_GLOBAL__N__<hash>_<n>_<file>_<hash>".
        body = re.sub(r"\d+_GLOBAL__N__[0-9a-f]+_\d+_\w+?_[0-9a-f]{8}", "ANON", body)
        body = re.sub(r"__cuda_local_var_\d+_\d+_", "LV", body)
        # A namespace-scope internal global (e.g. an anonymous-namespace __device__ counter) is
        # prefixed "_INTERNAL_<hash of the file's path>_": the revision's copy and the working tree
        # are compiled from different paths.
        body = re.sub(r"_INTERNAL_[0-9a-f]{8}_", "_INTERNAL_HASH_", body)
        # A function-local static (e.g. a __shared__ array) is named after its enclosing function:
        # "_ZZ<function>E<length><name>". Moving the code into a device function renames the scope,
        # not the variable: keep only the variable's own name.
        body = re.sub(r"_ZZ\w+?E(\d+)([A-Za-z_]\w*)", lambda m: "LOCAL_" + m.group(2)[: int(m.group(1))], body)
        key = re.sub(r"\d+_GLOBAL__N__[0-9a-f]+_\d+_\w+?_[0-9a-f]{8}", "ANON", name)
        body = body.replace(name, "NAME")
        out[key] = body
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--show", type=int, default=0)
    a = ap.parse_args()
    before, after = entries(a.before), entries(a.after)
    same = [k for k in before if k in after and before[k] == after[k]]
    diff = [k for k in before if k in after and before[k] != after[k]]
    gone = [k for k in before if k not in after]
    new = [k for k in after if k not in before]
    print(f"{len(before)} entries before, {len(after)} after: {len(same)} identical, {len(diff)} differ, "
          f"{len(gone)} gone, {len(new)} new")
    loose_before, loose_after = (entries(a.before, True), entries(a.after, True)) if diff else ({}, {})
    for k in diff:
        # The same instructions with registers bound in another order (e.g. zero-initialised
        # registers of a phi declared in another order) differ strictly but not loosely: say so,
        # since only a device run can settle it then.
        hint = " (loosely equal: the same instructions, registers bound in another order)" if (
            loose_before.get(k) == loose_after.get(k)) else ""
        print("DIFF", k + hint)
        if a.show:
            lines = list(difflib.unified_diff(before[k].splitlines(), after[k].splitlines(), lineterm="", n=1))
            print("\n".join(lines[: a.show]))
    for k in gone:
        print("GONE", k)
    for k in new:
        print("NEW ", k)
    return 0 if not diff and not gone else 1


if __name__ == "__main__":
    sys.exit(main())
