// The fuse_kv kernels for float elements (see fuse_kv_cuda.cu).
#include "cuda_launcher.h"

namespace lococo::cuda {

LOCOCO_FUSE_KV_KERNELS(, float, CudaLauncher);

}  // namespace lococo::cuda
