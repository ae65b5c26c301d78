"""e2e_test: one end-to-end test binary that drives the real `gyre` / `gyrectl` binaries."""

# What every end-to-end test runs: the binaries as users run them, and the golden corpus.
E2E_DATA = [
    "//cli:gyre",
    "//cli:gyrectl",
    "//tools/golden:corpus.jsonl.zst",
]

def e2e_test(name, data = [], deps = []):
    """A size "large" cc_test of `<name>.cc` with the e2e helpers, the binaries and `data`."""
    native.cc_test(
        name = name,
        size = "large",
        srcs = [name + ".cc"],
        data = E2E_DATA + data,
        tags = ["e2e"],
        deps = [
            ":e2e_util",
            "//third_party:gtest_main",
        ] + deps,
    )
