// The schemas of lococo's ops, as text: csrc/ops.cpp defines them in the lococo namespace and the
// CUDA emulator (tools/emulator) in its own, from this one copy.
#pragma once

#define LOCOCO_FUSE_KV_SCHEMA                                                                  \
  "fuse_kv(Tensor mem_k, Tensor mem_v, Tensor new_k, Tensor new_v, Tensor scores, "            \
  "Tensor weight, Tensor? bias, Tensor alpha, int num_heavy, int num_local=0, "                \
  "Tensor? valid_len=None) -> (Tensor, Tensor)"

#define LOCOCO_FUSE_KV_BACKWARD_SCHEMA                                                         \
  "fuse_kv_backward(Tensor grad_k, Tensor grad_v, Tensor mem_k, Tensor mem_v, Tensor new_k, "  \
  "Tensor new_v, Tensor scores, Tensor weight, Tensor? bias, Tensor alpha, int num_heavy, "    \
  "int num_local, Tensor? valid_len) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "     \
  "Tensor)"
