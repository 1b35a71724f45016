// The fuse_kv kernels for __half elements (see fuse_kv_cuda.cu).
#include "cuda_launcher.h"

namespace lococo::cuda {

LOCOCO_FUSE_KV_KERNELS(, __half, CudaLauncher);

}  // namespace lococo::cuda
