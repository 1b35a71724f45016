// The fuse_kv kernels for __nv_bfloat16 elements (see fuse_kv_cuda.cu).
#include "cuda_launcher.h"

namespace lococo::cuda {

LOCOCO_FUSE_KV_KERNELS(, __nv_bfloat16, CudaLauncher);

}  // namespace lococo::cuda
