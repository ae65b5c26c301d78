// cuBLASLt plans for row-major bf16 GEMMs (see gemm.h for the math, shapes and costs).
#include "kernels/cuda/gemm.h"

#include <cublasLt.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <iterator>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_check.h"

namespace gyre::cuda {
namespace {

CudaResult CublasError(cublasStatus_t st, const char* what, int line) {
  if (st == CUBLAS_STATUS_SUCCESS) return {};
  return {1000 + static_cast<int>(st), std::string(what) + ": " + cublasLtGetStatusString(st) +
                                           " at gemm.cu:" + std::to_string(line)};
}

#define CUBLAS_RETURN_IF_ERROR(expr)                                   \
  do {                                                                 \
    const cublasStatus_t gyre_cublas_st_ = (expr);                     \
    if (gyre_cublas_st_ != CUBLAS_STATUS_SUCCESS)                      \
      return CublasError(gyre_cublas_st_, #expr, __LINE__);            \
  } while (0)

int64_t Alignment(const void* p) {
  const uintptr_t v = reinterpret_cast<uintptr_t>(p);
  int64_t a = 1;
  while (a < 256 && (v % (2 * a)) == 0) a *= 2;
  return a;
}

// Alignment both C pointers share (the output and, when given, the separate beta input).
int64_t CAlignment(const GemmArgs& g) {
  const int64_t a = Alignment(g.c);
  return g.c_in != nullptr ? std::min(a, Alignment(g.c_in)) : a;
}

cudaDataType_t CudaType(DType t) { return t == DType::kBf16 ? CUDA_R_16BF : CUDA_R_32F; }

// "a<id> t<tile> s<stages> k<splitK> r<reduction> w<swizzle> c<custom> l<cluster> i<inner>" of
// an algorithm (GYRE_GEMM_LOG=1 prints them per new plan).
std::string AlgoConfig(const cublasLtMatmulAlgo_t& algo) {
  int32_t id = -1, splitk = 0;
  uint32_t tile = 0, stages = 0, red = 0, swz = 0, custom = 0;
  uint16_t cluster = 0, inner = 0;
  size_t w = 0;
  cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_ID, &id, sizeof(id), &w);
  cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_TILE_ID, &tile, sizeof(tile), &w);
  cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_STAGES_ID, &stages, sizeof(stages), &w);
  cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splitk, sizeof(splitk), &w);
  cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &red, sizeof(red), &w);
  cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING, &swz, sizeof(swz), &w);
  cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION, &custom, sizeof(custom), &w);
  cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, &cluster, sizeof(cluster), &w);
  cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_INNER_SHAPE_ID, &inner, sizeof(inner), &w);
  char buf[160];
  std::snprintf(buf, sizeof(buf), "a%d t%u s%u k%d r%u w%u c%u l%u i%u", id, tile, stages, splitk, red, swz, custom,
                static_cast<unsigned>(cluster), static_cast<unsigned>(inner));
  return buf;
}

// cuBLASLt's first heuristic choice is replaced by a fixed configuration from its own top-8
// candidate list where an in-step measurement found a faster one. The candidate list is a
// function of the shape, device and library only, so the choice is the same in every run
// (bitwise-reproducible training; timing-based autotuning is not); a preferred configuration
// missing from the list (another card or library) leaves the heuristic's choice.
struct PreferredConfig {
  uint32_t tile, custom;
  uint16_t cluster;
  int32_t splitk = 1;
};

// Short reductions (k <= kShortK, bf16 output): cuBLASLt's first choice for these is a
// 192x192 or 256x128 tile, while the in-step profile (bench/RESULTS.md, helper llama8; H200,
// cuBLAS 13) ran the llama-125m products with k = 768 8-17% faster on the candidates below
// (tile, custom option, cluster shape as cuBLASLt numbers them): 128x160 / option 1 / 2x1x1 and,
// for the LM head's logits (n = 50304), 176x128 / option 2 / 1x2x1, the first matching in order.
// Measured at 25M-825M output elements; smaller products (decoding's few rows, tests' odd
// shapes) keep the heuristic's choice.
constexpr int64_t kShortK = 1024, kShortKMinOutput = int64_t{4} << 20;
constexpr PreferredConfig kShortKPreferred[] = {
    {CUBLASLT_MATMUL_TILE_128x160, 1, CUBLASLT_CLUSTER_SHAPE_2x1x1},
    {CUBLASLT_MATMUL_TILE_176x128, 2, CUBLASLT_CLUSTER_SHAPE_1x2x1},
};

// Longer reductions at the Llama training shapes (helper llama9, bench/RESULTS.md session 8):
// every candidate of the heuristic's top 8 timed inside the training step
// (llama_step_bench --profile_variants GYRE_GEMM_PICK=*:<i>, 2 profiled steps each, normalised
// by the attention kernels' time as a clock proxy; H200, cuBLAS 13). Entries are the exact
// products (our m, n, k, transposes, output type, beta) of llama-125m at 16 x 2048 tokens and
// llama-1.3b at 8 x 2048 where a candidate beat the heuristic's first by >= 1.4% (3+ standard
// deviations of six default repeats) and the table beat the heuristic again in a second call
// (three alternating repeats each); other shapes keep the heuristic's choice. The gains are per
// op at a normalised clock: the H200 runs these steps at its power limit, and a faster GEMM
// lowers the clock of the rest of the step (bench/RESULTS.md: step medians moved much less).
struct ShapePreference {
  int64_t m, n, k;
  bool trans_a, trans_b, f32_out, beta;
  PreferredConfig config;
};
constexpr ShapePreference kShapePreferred[] = {
    // llama-125m (d 768, MLP 2048, 32768 tokens); normalised ms per step (12 calls), call 1 / call 2
    {2304, 768, 32768, true, false, true, false, {CUBLASLT_MATMUL_TILE_128x128, 3, CUBLASLT_CLUSTER_SHAPE_2x4x1}},  // qkv dW, split-K 2 -> 1: -0.108 / -0.118
    {768, 2048, 32768, true, false, true, false, {CUBLASLT_MATMUL_TILE_96x128, 0, CUBLASLT_CLUSTER_SHAPE_2x1x1}},  // down dW, split-K 3 -> 1: -0.046 / -0.061
    {768, 768, 32768, true, false, true, false, {CUBLASLT_MATMUL_TILE_192x192, 6, CUBLASLT_CLUSTER_SHAPE_1x2x1, 8}},  // o dW, split-K 5 -> 8: -0.039 / -0.045
    {32768, 768, 2048, false, true, false, true, {CUBLASLT_MATMUL_TILE_128x128, 1, CUBLASLT_CLUSTER_SHAPE_2x1x1}},  // down fwd (+= residual): -0.067 / -0.041
    {32768, 768, 2304, false, false, false, false, {CUBLASLT_MATMUL_TILE_128x128, 1, CUBLASLT_CLUSTER_SHAPE_2x1x1}},  // qkv dX: -0.029 / -0.096
    // llama-1.3b (d 2048, MLP 5504, 16384 tokens); the same, 24 calls
    {11008, 2048, 16384, true, false, true, false, {CUBLASLT_MATMUL_TILE_256x96, 5, CUBLASLT_CLUSTER_SHAPE_2x1x1}},  // gate_up dW: -1.27 / -1.27
    {16384, 11008, 2048, false, true, false, false, {CUBLASLT_MATMUL_TILE_168x128, 2, CUBLASLT_CLUSTER_SHAPE_1x2x1}},  // gate_up fwd: -1.87 / -2.09
    {16384, 6144, 2048, false, true, false, false, {CUBLASLT_MATMUL_TILE_176x128, 2, CUBLASLT_CLUSTER_SHAPE_1x2x1}},  // qkv fwd: -0.80 / -1.16
    {16384, 5504, 2048, false, false, false, false, {CUBLASLT_MATMUL_TILE_128x128, 3, CUBLASLT_CLUSTER_SHAPE_1x2x1}},  // down dX: -1.26 / -1.05
    {16384, 2048, 2048, false, false, false, false, {CUBLASLT_MATMUL_TILE_128x160, 3, CUBLASLT_CLUSTER_SHAPE_1x2x1}},  // o dX: -0.19 / -0.19
    {16384, 2048, 2048, false, true, false, false, {CUBLASLT_MATMUL_TILE_128x160, 3, CUBLASLT_CLUSTER_SHAPE_1x2x1}},  // o fwd: -0.19 / -0.23
    {6144, 2048, 16384, true, false, true, false, {CUBLASLT_MATMUL_TILE_128x128, 3, CUBLASLT_CLUSTER_SHAPE_1x2x1}},  // qkv dW: -0.26 / -0.10
};

// The recurrent presets' products (helper gemmplan20, bench/RESULTS.md session 20): the same
// method on one H100 80GB (recurrent_step_bench --profile_variants GYRE_GEMM_PICK=*:<i> plus the
// short-k shapes by name, i = 0..7, 2 profiled steps each, five default profiles between them),
// per-op ms normalised by the recurrent cells' time (Mlstm / Ssd forward + backward) as the clock
// proxy; kept where a candidate beat the default plan by >= 1.4% of the op in that sweep AND the
// table beat GYRE_GEMM_TABLE=llama-only again in a second call (two profiles each, alternating).
// Normalised ms per step (48 calls), call 1 / call 2. Dropped after call 2 (no gain again):
// mamba2-130m's in_proj forward (32768 x 1792 / 1536 x 768 NT, 256x128 instead of the short-k
// rule's 128x160), xlstm[1:0]-125m's up du (32768 x 768 x 3072 NN, 128x256). The mamba2-1.3b dt
// product (16384 x 64 x 2048 NT f32, 64x64 / option 3 / cluster 1x2x1: -0.25 in call 1) is untested
// (the entry went into call 2 with the wrong cluster shape and was not found). GYRE_GEMM_TABLE=
// llama-only (measurement only; read per plan build and part of the plan key, so one process can
// alternate) leaves these products to the heuristic's first choice, as before them.
constexpr ShapePreference kRecurrentShapePreferred[] = {
    // mamba2-1.3b B8 (d 2048, d_inner 4096, 16384 tokens; heuristic: 320x128 / 192x192 / 320x128)
    {16384, 4096, 2048, false, false, false, false, {CUBLASLT_MATMUL_TILE_128x160, 1, CUBLASLT_CLUSTER_SHAPE_2x1x1}},  // out_proj dX: -1.92 / -1.93
    {16384, 4352, 2048, false, true, false, false, {CUBLASLT_MATMUL_TILE_128x160, 1, CUBLASLT_CLUSTER_SHAPE_2x1x1}},  // in_proj fwd xBC: -1.74 / -1.19
    {16384, 4096, 2048, false, true, false, false, {CUBLASLT_MATMUL_TILE_128x160, 1, CUBLASLT_CLUSTER_SHAPE_2x1x1}},  // in_proj fwd z: -1.72 / -1.55
    // xlstm[1:0]-1.3b B4 (d 2048, up N = 2p = 8192, 8192 tokens; heuristic 320x128)
    {8192, 8192, 2048, false, true, false, false, {CUBLASLT_MATMUL_TILE_176x128, 2, CUBLASLT_CLUSTER_SHAPE_1x2x1}},  // up fwd: -0.63 / -0.86
};

bool RecurrentTableOn() {
  const char* env = std::getenv("GYRE_GEMM_TABLE");
  return env == nullptr || std::string(env) != "llama-only";
}

bool Matches(const cublasLtMatmulAlgo_t& algo, const PreferredConfig& want) {
  int32_t splitk = 0;
  uint32_t tile = 0, custom = 0;
  uint16_t cluster = 0;
  size_t w = 0;
  return cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_TILE_ID, &tile, sizeof(tile), &w) ==
             CUBLAS_STATUS_SUCCESS &&
         cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION, &custom, sizeof(custom),
                                              &w) == CUBLAS_STATUS_SUCCESS &&
         cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, &cluster,
                                              sizeof(cluster), &w) == CUBLAS_STATUS_SUCCESS &&
         cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splitk, sizeof(splitk),
                                              &w) == CUBLAS_STATUS_SUCCESS &&
         tile == want.tile && custom == want.custom && cluster == want.cluster &&
         (splitk == want.splitk || (splitk <= 1 && want.splitk <= 1));
}

// The preferred configurations of a product, in order (empty: the heuristic's first choice).
bool SameProduct(const ShapePreference& p, const GemmArgs& g) {
  return p.m == g.m && p.n == g.n && p.k == g.k && p.trans_a == g.trans_a && p.trans_b == g.trans_b &&
         p.f32_out == (g.c_dtype == DType::kF32) && p.beta == (g.beta != 0.f) && g.epilogue == GemmEpilogue::kNone;
}

std::vector<PreferredConfig> PreferredFor(const GemmArgs& g, bool recurrent_table) {
  for (const ShapePreference& p : kShapePreferred) {
    if (SameProduct(p, g)) return {p.config};
  }
  for (const ShapePreference& p : kRecurrentShapePreferred) {
    if (recurrent_table && SameProduct(p, g)) return {p.config};
  }
  if (g.k <= kShortK && g.m * g.n >= kShortKMinOutput && g.c_dtype == DType::kBf16) {
    return {std::begin(kShortKPreferred), std::end(kShortKPreferred)};
  }
  return {};
}

// GYRE_GEMM_PICK (measurement only, never a default): "<selector>:<index>[s<split-K>]", comma-
// separated, first match wins. Selector: "MxNxK" (our m, n, k), "dw" (weight-gradient products:
// transposed A, f32 output) or "*" (every product with k > kShortK). The plan takes the heuristic's
// candidate <index> (of kPickCandidates) instead of its first choice, optionally with its split-K
// count replaced (checked with cublasLtMatmulAlgoCheck). Used to time fixed configurations inside
// the training step (bench/llama_step_bench --profile_variants); a winner becomes a fixed rule.
constexpr int kPickCandidates = 16;
struct Pick {
  int index = -1, splitk = 0;
};

Pick PickFor(const GemmArgs& g) {
  const char* env = std::getenv("GYRE_GEMM_PICK");
  Pick pick;
  if (env == nullptr || env[0] == 0) return pick;
  const std::string spec(env);
  const std::string shape = std::to_string(g.m) + "x" + std::to_string(g.n) + "x" + std::to_string(g.k);
  size_t pos = 0;
  while (pos <= spec.size()) {
    size_t end = spec.find(',', pos);
    if (end == std::string::npos) end = spec.size();
    const std::string item = spec.substr(pos, end - pos);
    pos = end + 1;
    const size_t colon = item.find(':');
    if (colon == std::string::npos) continue;
    const std::string sel = item.substr(0, colon);
    const bool match = sel == shape || (sel == "dw" && g.trans_a && g.c_dtype == DType::kF32) ||
                       (sel == "*" && g.k > kShortK);
    if (!match) continue;
    const std::string val = item.substr(colon + 1);
    pick.index = std::atoi(val.c_str());
    const size_t s = val.find('s');
    if (s != std::string::npos) pick.splitk = std::atoi(val.c_str() + s + 1);
    return pick;
  }
  return pick;
}

}  // namespace

struct GemmContext::Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo;
  bool round_rejected = false;  // plan_round's choice failed AlgoCheck on the real shape
  ~Plan() {
    if (desc) cublasLtMatmulDescDestroy(desc);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (c) cublasLtMatrixLayoutDestroy(c);
  }
};

CudaResult GemmContext::Create(DeviceAllocator* allocator, std::unique_ptr<GemmContext>* out,
                               size_t workspace_bytes) {
  std::unique_ptr<GemmContext> ctx(new GemmContext());
  cublasLtHandle_t handle = nullptr;
  CUBLAS_RETURN_IF_ERROR(cublasLtCreate(&handle));
  ctx->handle_ = handle;
  ctx->allocator_ = allocator;
  CUDA_RETURN_IF_NOT_OK(allocator->Allocate(workspace_bytes, &ctx->workspace_));
  *out = std::move(ctx);
  return {};
}

GemmContext::~GemmContext() {
  plans_.clear();
  if (handle_) cublasLtDestroy(static_cast<cublasLtHandle_t>(handle_));
}

CudaResult GemmContext::GetPlan(const GemmArgs& g, cudaStream_t stream, Plan** plan) {
  // Column-major view: C_cm [n, m] = op(B)ᵀ-side [n, k] · op(A)ᵀ-side [k, m].
  const bool bias = g.epilogue != GemmEpilogue::kNone;
  const char* tune_env = std::getenv("GYRE_GEMM_AUTOTUNE");
  const bool autotune = tune_env != nullptr && tune_env[0] == '1';
  const char* log_env = std::getenv("GYRE_GEMM_LOG");
  const bool log = log_env != nullptr && log_env[0] == '1';
  const Pick pick = autotune ? Pick{} : PickFor(g);
  const bool recurrent_table = RecurrentTableOn();
  std::vector<int64_t> key = {g.trans_a, g.trans_b, g.m, g.n, g.k, g.lda, g.ldb, g.ldc,
                              static_cast<int64_t>(g.c_dtype), static_cast<int64_t>(g.epilogue),
                              g.beta != 0.f, Alignment(g.a), Alignment(g.b), CAlignment(g),
                              bias ? Alignment(g.bias) : 0, autotune, pick.index, pick.splitk, g.plan_round,
                              recurrent_table};
  auto it = plans_.find(key);
  if (it != plans_.end()) {
    *plan = it->second.get();
    return {};
  }
  // Built once per plan (a cache miss), like everything below.
  const std::vector<PreferredConfig> preferred =
      autotune || pick.index >= 0 ? std::vector<PreferredConfig>{} : PreferredFor(g, recurrent_table);
  auto p = std::make_unique<Plan>();
  const cudaDataType_t ct = CudaType(g.c_dtype);
  CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t op_a_cm = g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;  // cuBLAS "A" = our B
  const cublasOperation_t op_b_cm = g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;  // cuBLAS "B" = our A
  CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA,
                                                        &op_a_cm, sizeof(op_a_cm)));
  CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB,
                                                        &op_b_cm, sizeof(op_b_cm)));
  cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_DEFAULT;
  if (g.epilogue == GemmEpilogue::kBias) epi = CUBLASLT_EPILOGUE_BIAS;
  if (g.epilogue == GemmEpilogue::kGeluBias) epi = CUBLASLT_EPILOGUE_GELU_BIAS;
  CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE,
                                                        &epi, sizeof(epi)));
  if (bias) {
    CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(
        p->desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &ct, sizeof(ct)));
    CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(
        p->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof(g.bias)));
  }
  // cuBLAS A (= our B): [n, k] after op; stored [n, k] col-major when not transposed.
  const uint64_t a_rows = g.trans_b ? g.k : g.n, a_cols = g.trans_b ? g.n : g.k;
  const uint64_t b_rows = g.trans_a ? g.m : g.k, b_cols = g.trans_a ? g.k : g.m;
  CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&p->a, CUDA_R_16BF, a_rows, a_cols, g.ldb));
  CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&p->b, CUDA_R_16BF, b_rows, b_cols, g.lda));
  CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&p->c, ct, g.n, g.m, g.ldc));
  // plan_round: the layouts the heuristic is asked about (the real ones when the shape is already
  // rounded); owned by `rounded` (the Plan type's destructor frees layouts).
  Plan rounded;
  cublasLtMatrixLayout_t query_a = p->a, query_b = p->b, query_c = p->c;
  if (g.plan_round > 0 && (g.m % g.plan_round != 0 || g.n % g.plan_round != 0 || g.k % g.plan_round != 0)) {
    const auto up = [&](int64_t x) { return static_cast<uint64_t>((x + g.plan_round - 1) / g.plan_round * g.plan_round); };
    const uint64_t m_r = up(g.m), n_r = up(g.n), k_r = up(g.k);
    const uint64_t qa_rows = g.trans_b ? k_r : n_r, qa_cols = g.trans_b ? n_r : k_r;
    const uint64_t qb_rows = g.trans_a ? m_r : k_r, qb_cols = g.trans_a ? k_r : m_r;
    CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&rounded.a, CUDA_R_16BF, qa_rows, qa_cols,
                                                      std::max<uint64_t>(g.ldb, qa_rows)));
    CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&rounded.b, CUDA_R_16BF, qb_rows, qb_cols,
                                                      std::max<uint64_t>(g.lda, qb_rows)));
    CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&rounded.c, ct, n_r, m_r, std::max<uint64_t>(g.ldc, n_r)));
    query_a = rounded.a;
    query_b = rounded.b;
    query_c = rounded.c;
  }

  const uint64_t ws = workspace_.bytes();
  const uint32_t align_a = static_cast<uint32_t>(Alignment(g.b));
  const uint32_t align_b = static_cast<uint32_t>(Alignment(g.a));
  const uint32_t align_c = static_cast<uint32_t>(CAlignment(g));
  // The heuristic's preference: the workspace and the operands' alignments (created, then set;
  // the caller destroys it).
  const auto set_preference = [&](cublasLtMatmulPreference_t pref) {
    cublasStatus_t s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                                            sizeof(ws));
    if (s == CUBLAS_STATUS_SUCCESS)
      s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a,
                                               sizeof(align_a));
    if (s == CUBLAS_STATUS_SUCCESS)
      s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b,
                                               sizeof(align_b));
    if (s == CUBLAS_STATUS_SUCCESS)
      s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_c,
                                               sizeof(align_c));
    if (s == CUBLAS_STATUS_SUCCESS)
      s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_c,
                                               sizeof(align_c));
    return s;
  };
  cublasLtMatmulPreference_t pref = nullptr;
  CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceCreate(&pref));
  cublasStatus_t st = set_preference(pref);
  constexpr int kCandidates = 8;
  cublasLtMatmulHeuristicResult_t results[kPickCandidates] = {};
  int returned = 0;
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulAlgoGetHeuristic(static_cast<cublasLtHandle_t>(handle_), p->desc, query_a,
                                        query_b, query_c, query_c, pref,
                                        pick.index >= 0 ? kPickCandidates : autotune || !preferred.empty() ? kCandidates : 1,
                                        results,
                                        &returned);
  cublasLtMatmulPreferenceDestroy(pref);
  CUBLAS_RETURN_IF_ERROR(st);
  if (returned == 0) {
    return InvalidArgument("cuBLASLt has no algorithm for m=" + std::to_string(g.m) +
                           " n=" + std::to_string(g.n) + " k=" + std::to_string(g.k));
  }
  p->algo = results[0].algo;
  const char* choice = "heuristic";
  if (!preferred.empty()) {
    bool found = false;
    choice = "heuristic (preferred not among candidates)";
    for (const PreferredConfig& want : preferred) {
      for (int i = 0; i < returned && !found; ++i) {
        if (results[i].state == CUBLAS_STATUS_SUCCESS && results[i].workspaceSize <= ws &&
            Matches(results[i].algo, want)) {
          p->algo = results[i].algo;
          found = true;
          choice = "preferred";
        }
      }
      if (found) break;
    }
  }
  const char* round_note = "";
  if (query_a != p->a) {
    // The rounded shape's choice must run the real one (cuBLASLt checks tile, split-K and
    // workspace against the real layouts); else the real shape's first choice.
    cublasLtMatmulHeuristicResult_t check = {};
    round_note = " (planned as rounded)";
    if (cublasLtMatmulAlgoCheck(static_cast<cublasLtHandle_t>(handle_), p->desc, p->a, p->b, p->c, p->c, &p->algo,
                                &check) != CUBLAS_STATUS_SUCCESS ||
        check.workspaceSize > ws) {
      round_note = " (rounded plan rejected: real shape's first choice)";
      p->round_rejected = true;
      returned = 0;
      CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceCreate(&pref));
      st = set_preference(pref);
      if (st == CUBLAS_STATUS_SUCCESS)
        st = cublasLtMatmulAlgoGetHeuristic(static_cast<cublasLtHandle_t>(handle_), p->desc, p->a, p->b, p->c, p->c,
                                            pref, 1, results, &returned);
      cublasLtMatmulPreferenceDestroy(pref);
      CUBLAS_RETURN_IF_ERROR(st);
      if (returned == 0) return InvalidArgument("cuBLASLt has no algorithm for the real shape of a rounded plan");
      p->algo = results[0].algo;
    }
  }
  if (pick.index >= 0) {
    if (pick.index < returned && results[pick.index].state == CUBLAS_STATUS_SUCCESS &&
        results[pick.index].workspaceSize <= ws) {
      cublasLtMatmulAlgo_t algo = results[pick.index].algo;
      bool ok = true;
      if (pick.splitk > 0) {
        const int32_t splitk = pick.splitk;
        uint32_t red = 0;
        size_t w = 0;
        cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &red, sizeof(red), &w);
        if (splitk > 1 && red == CUBLASLT_REDUCTION_SCHEME_NONE) red = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
        if (splitk <= 1) red = CUBLASLT_REDUCTION_SCHEME_NONE;
        cublasLtMatmulHeuristicResult_t check = {};
        ok = cublasLtMatmulAlgoConfigSetAttribute(&algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splitk, sizeof(splitk)) ==
                 CUBLAS_STATUS_SUCCESS &&
             cublasLtMatmulAlgoConfigSetAttribute(&algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &red, sizeof(red)) ==
                 CUBLAS_STATUS_SUCCESS &&
             cublasLtMatmulAlgoCheck(static_cast<cublasLtHandle_t>(handle_), p->desc, p->a, p->b, p->c, p->c, &algo,
                                     &check) == CUBLAS_STATUS_SUCCESS &&
             check.workspaceSize <= ws;
      }
      if (ok) p->algo = algo;
      if (log) {
        std::fprintf(stderr, "gemm-pick m%ld n%ld k%ld #%d s%d: %s\n", (long)g.m, (long)g.n, (long)g.k, pick.index,
                     pick.splitk, ok ? "ok" : "rejected (heuristic's first kept)");
      }
    } else if (log) {
      std::fprintf(stderr, "gemm-pick m%ld n%ld k%ld #%d: only %d candidates (heuristic's first kept)\n", (long)g.m,
                   (long)g.n, (long)g.k, pick.index, returned);
    }
  }
  if (autotune && returned > 1) {
    // Time every candidate on the real operands into a scratch C of the same shape (every
    // candidate already satisfies the real C's alignment: the preference carries it) and keep
    // the fastest. Accumulating products read the zeroed scratch, never the real C.
    DeviceBuffer scratch;
    const size_t c_bytes = static_cast<size_t>(g.m) * g.ldc * (g.c_dtype == DType::kBf16 ? 2 : 4);
    CUDA_RETURN_IF_NOT_OK(allocator_->Allocate(c_bytes, &scratch));
    CUDA_RETURN_IF_ERROR(cudaMemsetAsync(scratch.get(), 0, c_bytes, stream));
    cudaEvent_t start = nullptr, stop = nullptr;
    CUDA_RETURN_IF_ERROR(cudaEventCreate(&start));
    CUDA_RETURN_IF_ERROR(cudaEventCreate(&stop));
    // Candidate 0 is the heuristic's choice; another replaces it only when >= 3% faster over
    // kTimedReps back-to-back launches (short timings are noisy; a near tie keeps the default).
    const int kTimedReps = log ? 20 : 5;
    float best_ms = 0, default_ms = 0;
    int best = -1;
    for (int i = 0; i < returned; ++i) {
      if (results[i].state != CUBLAS_STATUS_SUCCESS || results[i].workspaceSize > ws) continue;
      bool ok = true;
      for (int rep = 0; rep < 1 + kTimedReps && ok; ++rep) {
        if (rep == 1) ok = cudaEventRecord(start, stream) == cudaSuccess;
        ok = ok && cublasLtMatmul(static_cast<cublasLtHandle_t>(handle_), p->desc, &g.alpha, g.b, p->a, g.a,
                                  p->b, &g.beta, g.c_in ? g.c_in : scratch.get(), p->c, scratch.get(), p->c, &results[i].algo,
                                  workspace_.get(), workspace_.bytes(), stream) == CUBLAS_STATUS_SUCCESS;
      }
      float ms = 0;
      ok = ok && cudaEventRecord(stop, stream) == cudaSuccess && cudaEventSynchronize(stop) == cudaSuccess &&
           cudaEventElapsedTime(&ms, start, stop) == cudaSuccess;
      if (ok && i == 0) default_ms = ms;
      if (log) {
        std::fprintf(stderr, "gemm-cand m%ld n%ld k%ld ta%d tb%d c%s beta%d #%d %s waves %.2f ws %zu: %.4f ms\n",
                     (long)g.m, (long)g.n, (long)g.k, g.trans_a, g.trans_b, g.c_dtype == DType::kBf16 ? "bf16" : "f32",
                     g.beta != 0.f, i, AlgoConfig(results[i].algo).c_str(), results[i].wavesCount,
                     results[i].workspaceSize, ok ? ms / kTimedReps : -1.f);
      }
      if (ok && (best < 0 || ms < best_ms)) {
        best = i;
        best_ms = ms;
      }
    }
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    if (best >= 0 && (default_ms == 0 || best_ms < 0.97f * default_ms)) p->algo = results[best].algo;
  }
  if (log) {
    std::fprintf(stderr, "gemm-plan m%ld n%ld k%ld ta%d tb%d c%s beta%d autotune%d: %s (of %d) %s%s\n", (long)g.m,
                 (long)g.n, (long)g.k, g.trans_a, g.trans_b, g.c_dtype == DType::kBf16 ? "bf16" : "f32", g.beta != 0.f,
                 autotune, AlgoConfig(p->algo).c_str(), returned,
                 autotune ? "autotune" : pick.index >= 0 ? "pick" : choice, round_note);
  }
  *plan = p.get();
  plans_.emplace(std::move(key), std::move(p));
  return {};
}

CudaResult GemmContext::Gemm(const GemmArgs& g, cudaStream_t stream) {
  if (g.m <= 0 || g.n <= 0 || g.k <= 0) {
    return InvalidArgument("gemm: empty shape m=" + std::to_string(g.m) +
                           " n=" + std::to_string(g.n) + " k=" + std::to_string(g.k));
  }
  if (g.lda < (g.trans_a ? g.m : g.k) || g.ldb < (g.trans_b ? g.k : g.n) || g.ldc < g.n) {
    return InvalidArgument("gemm: leading dimension smaller than the row length");
  }
  if (g.epilogue != GemmEpilogue::kNone && g.bias == nullptr) {
    return InvalidArgument("gemm: bias epilogue without a bias");
  }
  Plan* plan = nullptr;
  CUDA_RETURN_IF_NOT_OK(GetPlan(g, stream, &plan));
  if (g.epilogue != GemmEpilogue::kNone) {
    // The pointer is part of the cached descriptor's state; refresh it every call.
    CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(
        plan->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof(g.bias)));
  }
  CUBLAS_RETURN_IF_ERROR(cublasLtMatmul(static_cast<cublasLtHandle_t>(handle_), plan->desc,
                                        &g.alpha, g.b, plan->a, g.a, plan->b, &g.beta,
                                        g.c_in != nullptr ? g.c_in : g.c, plan->c, g.c, plan->c,
                                        &plan->algo, workspace_.get(),
                                        workspace_.bytes(), stream));
  return {};
}

CudaResult GemmContext::RoundedPlanRejected(const GemmArgs& g, cudaStream_t stream, bool* rejected) {
  if (g.m <= 0 || g.n <= 0 || g.k <= 0) return InvalidArgument("gemm: empty shape");
  Plan* plan = nullptr;
  CUDA_RETURN_IF_NOT_OK(GetPlan(g, stream, &plan));
  *rejected = plan->round_rejected;
  return {};
}

CudaResult LinearForward(GemmContext* ctx, const void* x, const void* w, void* y, DType y_dtype,
                         int64_t rows, int64_t in, int64_t out, cudaStream_t stream,
                         GemmEpilogue epilogue, const void* bias, const void* residual) {
  GemmArgs g;
  g.trans_a = false;
  g.trans_b = true;
  g.m = rows;
  g.n = out;
  g.k = in;
  g.a = x;
  g.lda = in;
  g.b = w;
  g.ldb = in;
  g.c = y;
  g.ldc = out;
  g.c_dtype = y_dtype;
  g.epilogue = epilogue;
  g.bias = bias;
  if (residual != nullptr) {
    g.c_in = residual;
    g.beta = 1.f;
  }
  return ctx->Gemm(g, stream);
}

CudaResult LinearBackwardInput(GemmContext* ctx, const void* dy, const void* w, void* dx,
                               DType dx_dtype, int64_t rows, int64_t in, int64_t out,
                               cudaStream_t stream) {
  GemmArgs g;
  g.m = rows;
  g.n = in;
  g.k = out;
  g.a = dy;
  g.lda = out;
  g.b = w;
  g.ldb = in;
  g.c = dx;
  g.ldc = in;
  g.c_dtype = dx_dtype;
  return ctx->Gemm(g, stream);
}

CudaResult LinearBackwardWeight(GemmContext* ctx, const void* dy, const void* x, float* dw,
                                int64_t rows, int64_t in, int64_t out, cudaStream_t stream) {
  GemmArgs g;
  g.trans_a = true;  // dYᵀ: dY is [rows, out]
  g.m = out;
  g.n = in;
  g.k = rows;
  g.a = dy;
  g.lda = out;
  g.b = x;
  g.ldb = in;
  g.c = dw;
  g.ldc = in;
  g.c_dtype = DType::kF32;
  g.beta = 1.f;
  return ctx->Gemm(g, stream);
}

}  // namespace gyre::cuda
