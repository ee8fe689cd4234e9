// Small checks several test files share.
#pragma once

#include <ATen/ATen.h>

namespace vdit_test {

// Same shape, dtype and every bit of every element.
inline bool bitwise_equal(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() && at::equal(a.contiguous(), b.contiguous());
}

}  // namespace vdit_test
