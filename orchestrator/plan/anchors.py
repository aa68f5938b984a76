"""The measured figures the scale model starts from (docs/performance-anchors.md says where,
how and on what machine each was measured; bench/gpu_check.py re-measures them)."""

from __future__ import annotations

SOURCE = "docs/performance-anchors.md"

# Training img/s on one H200: plain PyTorch, bf16 autocast + channels_last ("eager" and
# "compiled": torch.compile), or fp32 with TF32 matmuls, eager, NCHW ("fp32"); synthetic data
# already on the GPU, batch 256. An H100 (p5) is somewhat slower.
IMG_PER_S_PER_GPU: dict[tuple[str, str], float] = {
    ("resnet50", "compiled"): 6670.0,
    ("resnet50", "eager"): 4699.0,
    ("resnet50", "fp32"): 2212.0,
    ("resnet152", "compiled"): 3084.0,
    ("resnet152", "eager"): 2233.0,
    ("resnet152", "fp32"): 1042.0,
}

# How each mode above was run, as the plan's output names it.
MODE_DESCRIPTIONS = {
    "compiled": "torch.compile, bf16 + channels_last",
    "eager": "eager, bf16 + channels_last",
    "fp32": "fp32 (TF32) eager NCHW",
}

# ImageNet-like JPEGs one CPU core decodes and resizes per second with Pillow.
DECODE_IMG_PER_S_PER_CORE = 292.0
