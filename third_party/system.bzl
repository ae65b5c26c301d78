"""system_library: a Debian-installed library as a Bazel target (headers are in /usr/include).

Dynamic by default. Under --config=bundle (//third_party:static_system_libs) every library that
has a static archive links it from inside one --start-group/--end-group closure, so the GPU
bundle needs only glibc, the CUDA driver and NCCL on the GPU machine; libraries Debian ships
without an archive (marked shared_only) stay dynamic and tools/bundle.sh copies them.
"""

def system_library(name, libs = [], shared_only = False, extra_linkopts = [], deps = [], defines = [], **kwargs):
    dynamic = ["-l" + l for l in libs] + extra_linkopts
    if shared_only:
        static = dynamic
    else:
        # The static archives are listed once, in //third_party:static_closure.
        static = []
    native.cc_library(
        name = name,
        linkopts = select({
            "//third_party:static_system_libs_on": static,
            "//conditions:default": dynamic,
        }),
        deps = deps + select({
            "//third_party:static_system_libs_on": ([] if shared_only else ["//third_party:static_closure"]),
            "//conditions:default": [],
        }),
        defines = defines,
        visibility = ["//visibility:public"],
        **kwargs
    )
