// Stateless elementwise ops on tensors of equal shape and dtype (device-dispatched; CPU today).
// All return fresh tensors. *Backward functions take the forward input(s) and the output
// gradient and return the input gradient.
#pragma once

#include <vector>

#include "ops/tensor.h"

namespace gyre::ops {

Tensor Add(const Tensor& a, const Tensor& b);
void AddInPlace(Tensor* acc, const Tensor& b);            // acc += b
void AxpyInPlace(Tensor* acc, double alpha, const Tensor& b);  // acc += alpha * b
Tensor Mul(const Tensor& a, const Tensor& b);
Tensor Scale(const Tensor& a, double s);

enum class Activation { kSilu, kGelu, kSigmoid };
Tensor Activate(Activation act, const Tensor& x);
// dx = dy * act'(x)
Tensor ActivateBackward(Activation act, const Tensor& x, const Tensor& dy);

// Soft cap (Gemma 2; xLSTM Large's gates and logits, MODELS.md §1.5): y = cap · tanh(x / cap),
// which is x near 0 and saturates at ±cap. SoftCapBackward takes the forward INPUT x (not y):
// dx = dy · sech²(x / cap), formed as 4 / (e^{x/cap} + e^{−x/cap})² so it stays accurate where
// the cap saturates (1 − (y/cap)² would cancel there). CPU only.
Tensor SoftCap(const Tensor& x, double cap);
Tensor SoftCapBackward(const Tensor& x, const Tensor& dy, double cap);
// The scalar forms both use (also the CPU cross entropy's capped logits).
double SoftCapValue(double x, double cap);
double SoftCapSlope(double x, double cap);  // d SoftCapValue / dx = sech²(x / cap)

// Columns [begin, end) of x viewed as [rows, cols] (a copy, shape [..., end - begin]).
Tensor SliceColumns(const Tensor& x, int64_t begin, int64_t end);
// Concatenates along the last dimension (equal rows, equal dtype).
Tensor ConcatColumns(const std::vector<Tensor>& parts);

// Sum of squares of all elements (accumulated in double).
double SumSquares(const Tensor& t);
// Max |a - b| / and relative Frobenius error ||a-b|| / max(||a||, ||b||, tiny).
double MaxAbsDiff(const Tensor& a, const Tensor& b);
double RelativeError(const Tensor& a, const Tensor& b);

}  // namespace gyre::ops
