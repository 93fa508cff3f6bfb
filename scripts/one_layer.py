"""Runs one eval-mode q4conv layer a few times (fp16 channels_last), for ncu / sanitizers.
Usage: python scripts/one_layer.py N C K H R stride pad [calls]"""
import sys

import torch

import q4conv

n, c, k, h, r, stride, pad = (int(v) for v in sys.argv[1:8])
calls = int(sys.argv[8]) if len(sys.argv) > 8 else 3
layer = q4conv.Q4Conv2dCutlass(c, k, r, stride, pad, device="cuda")
q4conv.prepare_q4conv_layers(layer)
x = torch.randn(n, c, h, h, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
with torch.no_grad():
    layer.set_activation(x)
layer.eval()
with torch.inference_mode():
    for _ in range(calls):
        y = layer(x)
torch.cuda.synchronize()
print(tuple(y.shape), y.dtype)
