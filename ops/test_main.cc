// gtest main for ops/ tests: first re-executes with the best OpenBLAS core (blas_env.h), so test
// timings reflect the real kernels.
#include "gtest/gtest.h"
#include "ops/blas_env.h"

int main(int argc, char** argv) {
  gyre::ops::ReexecWithBestBlasCore(argv);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
