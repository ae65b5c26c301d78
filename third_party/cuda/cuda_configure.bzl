"""cuda_configure: exposes the local CUDA toolkit as @cuda, or an empty @cuda without one.

The toolkit is looked up at $CUDA_PATH, then /usr/local/cuda-13.0, then /usr/local/cuda. When
none exists, @cuda still defines every target name (empty libraries) and CUDA_AVAILABLE=False,
so the default CPU build never fails for lack of a toolkit; GPU targets are skipped unless
--config=cuda is given (see //third_party/cuda:BUILD.bazel).
"""

_CANDIDATES = ["/usr/local/cuda-13.0", "/usr/local/cuda"]

_BUILD_WITH_CUDA = """
package(default_visibility = ["//visibility:public"])

# Headers; CUDA 13 moved CCCL (cub, thrust, <nv/target>, cuda/std) to include/cccl, and host code
# that includes nccl.h or cuda_bf16.h needs it too.
cc_library(
    name = "headers",
    hdrs = glob(["cuda/include/**"]),
    includes = ["cuda/include", "cuda/include/cccl"],
)

cc_library(
    name = "cudart_static",
    srcs = ["cuda/lib64/libcudart_static.a"],
    linkopts = ["-ldl", "-lpthread", "-lrt"],
    deps = [":headers"],
)

# cuBLAS / cuBLASLt / NCCL are linked dynamically: they are hundreds of MB and the GPU machine
# has its own copies (see TOOLCHAIN.md section 3). The rpath entries find them there.
cc_library(
    name = "cublas",
    linkopts = [
        "-L{path}/lib64",
        "-lcublasLt",
        "-lcublas",
        "-Wl,-rpath,/usr/local/cuda/lib64",
        "-Wl,-rpath,{path}/lib64",
    ],
    deps = [":headers"],
)

cc_library(
    name = "nccl",
    linkopts = [
        "-L{path}/lib64",
        "-l:libnccl.so.2",
        "-Wl,-rpath,/usr/lib/x86_64-linux-gnu",
        "-Wl,-rpath,{path}/lib64",
    ],
    deps = [":headers"],
)

filegroup(
    name = "nvcc",
    srcs = ["cuda/bin/nvcc"],
)
"""

_BUILD_WITHOUT_CUDA = """
package(default_visibility = ["//visibility:public"])

# No CUDA toolkit on this machine: empty targets, so CPU-only builds analyse cleanly.
cc_library(name = "headers")
cc_library(name = "cudart_static")
cc_library(name = "cublas")
cc_library(name = "nccl")
filegroup(name = "nvcc")
"""

def _cuda_configure_impl(rctx):
    candidates = []
    env_path = rctx.os.environ.get("CUDA_PATH", "")
    if env_path:
        candidates.append(env_path)
    candidates += _CANDIDATES
    found = ""
    for c in candidates:
        if rctx.path(c + "/bin/nvcc").exists:
            found = c
            break
    if found:
        rctx.symlink(found, "cuda")
        rctx.file("BUILD.bazel", _BUILD_WITH_CUDA.replace("{path}", found))
        rctx.file("defs.bzl", "CUDA_AVAILABLE = True\nCUDA_PATH = %r\nNVCC = %r\n" % (found, found + "/bin/nvcc"))
    else:
        rctx.file("BUILD.bazel", _BUILD_WITHOUT_CUDA)
        rctx.file("defs.bzl", "CUDA_AVAILABLE = False\nCUDA_PATH = ''\nNVCC = ''\n")

cuda_configure = repository_rule(
    implementation = _cuda_configure_impl,
    environ = ["CUDA_PATH"],
    local = True,
)
