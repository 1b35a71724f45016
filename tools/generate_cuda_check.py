"""generate() through lococo_sdpa and LoCoCoCache on CUDA, checked against the same run on the CPU.

A small random-weight Llama (GQA, head_dim 16) with a compressor whose M, beta and kernel are small
enough that the cache compresses many times, batch 2 with one left-padded row (so the op gets
valid_len), greedy decoding. Per dtype:
  float64  the tokens must be identical and the logits agree to 1e-8;
  float32  the logits agree to 1e-3 over the common prefix (TF32 off); the tokens must be identical
           up to the first step where the CPU's best two logits are closer than that (a near-tie
           that either device may break its own way).
Prints one line per dtype and exits 1 if a check fails.

    python tools/generate_cuda_check.py [--new-tokens 48]
"""

from __future__ import annotations

import argparse
import sys

import torch

VOCAB = 128
CONFIG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)
TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-3}


def build(device, dtype):
    """The model (patched with LoCoCo) and its compressor; the same weights on every device."""
    import transformers

    import lococo

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**CONFIG),
                                                          attn_implementation="sdpa")
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    compressor = lococo.LoCoCoCompressor.for_model(model, num_slots=16, beta=3, kernel_size=5, init_std=0.3)
    with torch.no_grad():  # a non-zero bias and alpha away from 0.5, so that no term cancels
        for layer in compressor.layers:
            layer.bias.normal_(0.0, 0.2)
            layer.alpha.fill_(0.7)
    model = model.to(device, dtype).eval()
    compressor = compressor.to(device, dtype)
    lococo.apply_lococo(model, compressor)
    return model, compressor


def run(device, dtype, ids, mask, new_tokens):
    from lococo.hf import get_output_cache

    model, _ = build(device, dtype)
    with torch.no_grad():
        out = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                             do_sample=False, return_dict_in_generate=True, output_logits=True)
    cache = get_output_cache(out)
    return out.sequences.cpu(), torch.stack(out.logits, 1).cpu().double(), cache.num_compressions


def compare(dtype, new_tokens, device="cuda") -> tuple[bool, str]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 60), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :13] = 0  # left padding
    ids[1, :13] = 0
    cpu_seq, cpu_logits, compressions = run("cpu", dtype, ids, mask, new_tokens)
    cuda_seq, cuda_logits, cuda_compressions = run(device, dtype, ids, mask, new_tokens)
    tol = TOLERANCE[dtype]
    prompt = ids.shape[1]
    differ = (cpu_seq[:, prompt:] != cuda_seq[:, prompt:]).any(0).nonzero()
    first = int(differ[0]) if differ.numel() else new_tokens
    err = (cpu_logits[:, : first + 1] - cuda_logits[:, : first + 1]).abs().max().item()
    top2 = cpu_logits.topk(2, dim=-1).values
    margin = (top2[..., 0] - top2[..., 1]).min(0).values  # per step, over the batch
    near_tie = bool((margin[: first + 1] < tol).any()) if first < new_tokens else False
    if dtype == torch.float64:
        ok = first == new_tokens and err <= tol
    else:
        ok = err <= tol and (first == new_tokens or near_tie)
    ok = ok and compressions == cuda_compressions and compressions >= 10
    line = (f"{str(dtype)[6:]}: {'ok' if ok else 'FAILED'}; tokens identical for {first} of {new_tokens} steps; "
            f"max logit difference {err:.2e} (tolerance {tol:g}); {compressions} compressions on CPU, "
            f"{cuda_compressions} on {device}")
    return ok, line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--device", default="cuda", help="the device checked against the CPU (cpu: a self-test)")
    opts = parser.parse_args(argv)
    import lococo

    if opts.device == "cuda" and (not torch.cuda.is_available() or not lococo.has_kernel("cuda")):
        print(f"generate_cuda_check: needs a GPU and the CUDA kernels (kernels on {lococo.kernel_devices()})")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results = [compare(dtype, opts.new_tokens, opts.device) for dtype in (torch.float64, torch.float32)]
    for _, line in results:
        print(line)
    return 0 if all(ok for ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
