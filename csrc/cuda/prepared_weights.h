// Weights rearranged for the tensor-core kernels (permuted, padded, converted), kept between
// calls: a model calls the op with the same weight tensor in every step, so each layout is
// built once, not once per call (two kernel launches and an allocation less per call).
//
// An entry is reused only for the same tensor (held weakly: a freed tensor's entry expires and
// a new tensor at the same address does not match), the same version counter (an in-place
// update such as an optimizer step invalidates it), the same data pointer and the same layout.
// Inference tensors have no version counter and are prepared on every call.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <vector>

namespace lococo::cuda {

class PreparedWeights {
 public:
  static constexpr int64_t kByTap = -1;  // layout key of weights_by_tap (others: the padded C)

  template <typename Make>
  at::Tensor get(const at::Tensor& source, int64_t layout, Make make) {
    if (source.is_inference()) return make();
    const int64_t version = source._version();
    const void* data = source.data_ptr();
    std::lock_guard<std::mutex> lock(mutex_);
    for (const Entry& e : entries_) {
      if (e.layout == layout && e.version == version && e.data == data &&
          e.source.lock().get() == source.unsafeGetTensorImpl()) {
        return e.prepared;
      }
    }
    at::Tensor prepared = make();
    entries_.erase(std::remove_if(entries_.begin(), entries_.end(),
                                  [&](const Entry& e) {
                                    return e.source.expired() ||
                                           (e.layout == layout &&
                                            e.source.lock().get() == source.unsafeGetTensorImpl());
                                  }),
                   entries_.end());
    if (entries_.size() >= kMaxEntries) entries_.erase(entries_.begin());  // the oldest
    entries_.push_back({WeakImpl(source.getIntrusivePtr()), version, data, layout, prepared});
    return prepared;
  }

 private:
  using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  struct Entry {
    WeakImpl source;
    int64_t version;
    const void* data;
    int64_t layout;
    at::Tensor prepared;
  };
  // Two layouts per layer of a model with a few hundred layers fit; past that, the oldest go.
  static constexpr size_t kMaxEntries = 1024;
  std::mutex mutex_;
  std::vector<Entry> entries_;
};

// Never destroyed: its tensors must not be freed after the CUDA allocator at exit.
inline PreparedWeights& prepared_weights() {
  static auto* cache = new PreparedWeights();
  return *cache;
}

}  // namespace lococo::cuda
