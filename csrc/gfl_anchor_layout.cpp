// The anchor layout (gfl_anchor_layout.h): the coalesced description of pred and the tensors
// of its shape that lets kernels read them in place, and the choice of walk. Kept apart
// from the operator registrations (gfl_registration.cpp, gfl_autograd.cpp), as
// gfl_checks.cpp, so that a test build of the CUDA kernels (tests/cuda/cuda_emulation/) can
// link them without registering the operators.
#include "gfl_anchor_layout.h"

#include <ATen/ATen.h>

namespace gfl {

std::vector<int64_t> anchor_shape(const at::Tensor& pred) {
  std::vector<int64_t> shape{pred.size(0)};
  for (int64_t d = 2; d < pred.dim(); ++d) {
    shape.push_back(pred.size(d));
  }
  return shape;
}

AnchorLayout make_anchor_layout(const std::vector<at::Tensor>& tensors, std::vector<AnchorStrides>& strides_out) {
  const at::Tensor& pred = tensors.front();
  AnchorLayout layout;
  layout.num_classes = pred.size(1);
  layout.num_anchors = 1;
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < pred.dim(); ++d) {
    dims.push_back(d);
  }
  for (int64_t d : dims) {
    layout.num_anchors *= pred.size(d);
  }

  // Groups of merged dimensions, innermost first: a size and each tensor's stride.
  struct Group {
    int64_t size;
    std::vector<int64_t> strides;
  };
  std::vector<Group> groups;
  for (auto it = dims.rbegin(); it != dims.rend(); ++it) {
    const int64_t size = pred.size(*it);
    if (size == 1) {
      continue;  // a size-1 dimension contributes nothing to any offset
    }
    std::vector<int64_t> strides;
    for (const at::Tensor& t : tensors) {
      strides.push_back(t.stride(*it));
    }
    bool merges = !groups.empty();
    for (size_t t = 0; merges && t < tensors.size(); ++t) {
      merges = strides[t] == groups.back().strides[t] * groups.back().size;
    }
    if (merges) {
      groups.back().size *= size;
    } else {
      groups.push_back({size, strides});
    }
  }
  if (groups.empty()) {
    groups.push_back({1, std::vector<int64_t>(tensors.size(), 0)});
  }
  TORCH_CHECK(static_cast<int>(groups.size()) <= kMaxAnchorDims + 1,
              "gfl_ops: pred has too many non-mergeable anchor dimensions (at most ", kMaxAnchorDims + 1, ")");

  layout.inner_size = groups.front().size;
  layout.num_outer_dims = static_cast<int>(groups.size()) - 1;
  strides_out.assign(tensors.size(), AnchorStrides{});
  for (size_t t = 0; t < tensors.size(); ++t) {
    strides_out[t].class_stride = tensors[t].stride(1);
    strides_out[t].inner_stride = groups.front().strides[t];
  }
  for (int d = 0; d < layout.num_outer_dims; ++d) {
    const Group& group = groups[groups.size() - 1 - d];  // outermost first
    layout.outer_sizes[d] = group.size;
    for (size_t t = 0; t < tensors.size(); ++t) {
      strides_out[t].outer_strides[d] = group.strides[t];
    }
  }
  return layout;
}

AnchorLayout class_layout(const ClassTensors& tensors, std::vector<AnchorStrides>& strides) {
  // Tensors that are not there take pred's place: their strides are computed and unused.
  const auto or_pred = [&](const at::Tensor& tensor) { return tensor.defined() ? tensor : tensors.pred; };
  return make_anchor_layout({tensors.pred, or_pred(tensors.grad), or_pred(tensors.dense_target),
                             or_pred(tensors.element_weight), or_pred(tensors.element_loss)},
                            strides);
}

ClassWalk choose_class_walk(const ClassTensors& tensors, const std::vector<AnchorStrides>& strides) {
  if (tensors.element_weight.defined() || tensors.element_loss.defined()) {
    return ClassWalk::kStridedRows;
  }
  // Whether `along` (a member pointer: the class or the inner stride) is 1 in every tensor.
  const auto unit_in_all = [&](int64_t AnchorStrides::*along) {
    return strides[0].*along == 1 && (!tensors.grad.defined() || strides[1].*along == 1) &&
           (!tensors.dense_target.defined() || strides[2].*along == 1);
  };
  if (unit_in_all(&AnchorStrides::class_stride)) {
    return ClassWalk::kRows;
  }
  if (unit_in_all(&AnchorStrides::inner_stride)) {
    return ClassWalk::kPlanes;
  }
  return ClassWalk::kStridedRows;
}

}  // namespace gfl
