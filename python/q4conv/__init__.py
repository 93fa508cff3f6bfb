"""q4conv: 4-bit quantized (W4A4) Conv2d for PyTorch on CUTLASS, with an exact CPU path."""

from ._ops import ops
from .convert import convert, shared_quantizers
from .deploy import FusedQ4Conv2d, deploy
from .layer import (
    Q4Conv2d,
    Q4Conv2dCutlass,
    calibrate,
    keep_eps_out_of_ddp_broadcast,
    load_float_state_dict,
    prepare_bie_layers,
    prepare_q4conv_layers,
)
from .plan import ConvPlan, explain, plan_convolution, selected_backend, tuning

__all__ = [
    "ConvPlan",
    "FusedQ4Conv2d",
    "deploy",
    "explain",
    "plan_convolution",
    "tuning",
    "Q4Conv2d",
    "Q4Conv2dCutlass",
    "calibrate",
    "convert",
    "keep_eps_out_of_ddp_broadcast",
    "load_float_state_dict",
    "ops",
    "prepare_bie_layers",
    "prepare_q4conv_layers",
    "selected_backend",
    "shared_quantizers",
]
__version__ = "0.1.0"
