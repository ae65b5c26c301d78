"""cuda_library: compiles .cu files with nvcc (one action per source), archives the objects and
returns CcInfo, so cc_binary / cc_test / cc_library can depend on it like on any C++ library.

Targets built with it (and GPU binaries/tests marked with gpu_only()) exist only under
--config=cuda; the default build skips them, so machines without a CUDA toolkit build the rest.
"""

load("@bazel_tools//tools/cpp:toolchain_utils.bzl", "find_cpp_toolchain")
load("@cuda//:defs.bzl", "CUDA_AVAILABLE", "NVCC")

# Hopper only: wgmma / setmaxnreg need sm_90a (see TOOLCHAIN.md: plain -arch=sm_90a in CUDA 13
# also emits compute_90 PTX, which rejects wgmma).
DEFAULT_GPU_ARCHS = ["arch=compute_90a,code=sm_90a"]

def gpu_only():
    """target_compatible_with value for anything that needs the CUDA toolkit."""
    return select({
        "//third_party/cuda:enabled": [],
        "//conditions:default": ["//third_party/cuda:cuda_disabled"],
    })

def _cuda_library_impl(ctx):
    if not CUDA_AVAILABLE:
        fail("%s needs the CUDA toolkit (set CUDA_PATH or install /usr/local/cuda-13.0); " % ctx.label +
             "build without --config=cuda on machines that have none")
    cc_toolchain = find_cpp_toolchain(ctx)
    feature_configuration = cc_common.configure_features(
        ctx = ctx,
        cc_toolchain = cc_toolchain,
        requested_features = ctx.features,
        unsupported_features = ctx.disabled_features,
    )
    dep_infos = [d[CcInfo] for d in ctx.attr.deps]
    deps_cc = cc_common.merge_cc_infos(cc_infos = dep_infos)
    cctx = deps_cc.compilation_context

    base = ctx.actions.args()
    base.add("-std=c++20")
    base.add("-O3")
    base.add("--expt-relaxed-constexpr")
    base.add("-lineinfo")
    base.add_all(["-Xcompiler", "-fPIC"])
    for arch in ctx.attr.gpu_archs:
        base.add("-gencode=" + arch)
    base.add("-I.")
    base.add("-I" + ctx.bin_dir.path)
    base.add_all(cctx.includes, format_each = "-I%s")
    base.add_all(cctx.quote_includes, format_each = "-I%s")
    base.add_all(cctx.system_includes, format_each = "-isystem=%s")
    base.add_all(cctx.defines, format_each = "-D%s")
    base.add_all(ctx.attr.copts)

    inputs = depset(ctx.files.srcs + ctx.files.hdrs, transitive = [cctx.headers])
    objects = []
    for src in ctx.files.srcs:
        if not src.path.endswith(".cu"):
            continue
        obj = ctx.actions.declare_file("_objs/%s/%s.o" % (ctx.label.name, src.basename[:-3]))
        args = ctx.actions.args()
        args.add("-c")
        args.add(src)
        args.add("-o", obj)
        ctx.actions.run(
            executable = NVCC,
            arguments = [base, args],
            inputs = inputs,
            outputs = [obj],
            mnemonic = "Nvcc",
            progress_message = "nvcc %s" % src.short_path,
            use_default_shell_env = True,
        )
        objects.append(obj)

    archive = ctx.actions.declare_file("lib%s.a" % ctx.label.name)
    ar_args = ctx.actions.args()
    ar_args.add("rcsD")
    ar_args.add(archive)
    ar_args.add_all(objects)
    ctx.actions.run(
        executable = cc_toolchain.ar_executable,
        arguments = [ar_args],
        inputs = objects,
        outputs = [archive],
        mnemonic = "CudaArchive",
        use_default_shell_env = True,
    )

    library = cc_common.create_library_to_link(
        actions = ctx.actions,
        feature_configuration = feature_configuration,
        cc_toolchain = cc_toolchain,
        static_library = archive,
        alwayslink = ctx.attr.alwayslink,
    )
    linking_context = cc_common.create_linking_context(
        linker_inputs = depset([cc_common.create_linker_input(
            owner = ctx.label,
            libraries = depset([library]),
        )]),
    )
    compilation_context = cc_common.create_compilation_context(
        headers = depset(ctx.files.hdrs),
    )
    own = CcInfo(compilation_context = compilation_context, linking_context = linking_context)
    return [
        DefaultInfo(files = depset([archive])),
        cc_common.merge_cc_infos(direct_cc_infos = [own], cc_infos = dep_infos),
    ]

_cuda_library = rule(
    implementation = _cuda_library_impl,
    attrs = {
        "srcs": attr.label_list(allow_files = [".cu", ".cuh", ".h"]),
        "hdrs": attr.label_list(allow_files = [".h", ".cuh"]),
        "deps": attr.label_list(providers = [CcInfo]),
        "copts": attr.string_list(),
        "gpu_archs": attr.string_list(default = DEFAULT_GPU_ARCHS),
        "alwayslink": attr.bool(default = False),
        "_cc_toolchain": attr.label(default = Label("@bazel_tools//tools/cpp:current_cc_toolchain")),
    },
    toolchains = ["@bazel_tools//tools/cpp:toolchain_type"],
    fragments = ["cpp"],
)

def cuda_library(name, deps = [], **kwargs):
    """nvcc-compiled library; links the static CUDA runtime. Exists only under --config=cuda."""
    _cuda_library(
        name = name,
        deps = deps + ["@cuda//:cudart_static", "@cuda//:headers"],
        target_compatible_with = gpu_only(),
        **kwargs
    )
