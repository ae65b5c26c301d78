"""Lists the system abseil libraries, so linking against "all of abseil" needs no hand list.

Debian's libabsl-dev ships ~64 small libraries whose inter-dependencies change between releases;
the dynamic link names them all (the linker drops unused ones with --as-needed) and the static
GPU bundle puts every archive inside one --start-group/--end-group.
"""

_LIBDIR = "/usr/lib/x86_64-linux-gnu"

def _system_libs_impl(rctx):
    result = rctx.execute(["sh", "-c", "ls %s/libabsl_*.so 2>/dev/null" % _LIBDIR])
    names = []
    for line in result.stdout.splitlines():
        base = line.strip().split("/")[-1]
        if base.startswith("lib") and base.endswith(".so"):
            names.append(base[3:-3])
    rctx.file("BUILD.bazel", "exports_files(['absl.bzl'])\n")
    rctx.file("absl.bzl", "ABSL_LIBS = %s\n" % repr(sorted(names)))

system_libs = repository_rule(
    implementation = _system_libs_impl,
    local = True,
)
