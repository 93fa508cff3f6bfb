"""``q4conv.convert``: turn a float model's ``nn.Conv2d`` layers into q4conv layers for QAT.

SPEC section 8. Convolutions that read the same tensor (a ResNet block's first
convolution and its downsample) get one activation quantizer: their ``bias_a``
and ``scale_a`` are the same ``Parameter`` objects, which is what a deploy step
tests (``a.scale_a is b.scale_a``) to let a producer write codes for both.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.fx
from torch import nn

from .layer import BACKENDS, SUPPORTED_BITS, Q4Conv2dCutlass, _int_arg, _padding_arg, keep_eps_out_of_ddp_broadcast

SkipPredicate = Callable[[str, nn.Module], bool]
Skip = Union[None, str, Iterable[str], SkipPredicate]


def convert(
    model: nn.Module,
    *,
    skip: Skip = None,
    share_quantizers: bool = True,
    a_bit: int = 4,
    w_bit: int = 4,
    backend: str = "auto",
    per_channel_weight_scale: bool = False,
    inplace: bool = False,
) -> nn.Module:
    """Replace every eligible ``nn.Conv2d`` of ``model`` by a ``Q4Conv2dCutlass``, ready for QAT.

    Each replacement carries the convolution's weight, bias (and their
    ``requires_grad``), stride, padding, dilation, device, dtype and train /
    eval mode; its ``scale_w`` is initialised from the weights
    (``prepare_params``) and its ``scale_a`` is uninitialised: the first batch
    (or ``q4conv.calibrate``) sets it. Other modules are untouched.

    Args:
        model: the float model (or a single ``nn.Conv2d``, which is returned converted).
        skip: convolutions to keep in float: an iterable of qualified module
            names (``"conv1"``, ``"layer1.0.downsample.0"``; naming a parent
            such as ``"layer1"`` keeps every convolution inside it), a single
            name, or a predicate ``(name, conv) -> bool`` called for each
            ``nn.Conv2d``. A name that is not a module of ``model`` raises
            ValueError.
        share_quantizers: give convolutions that read the same tensor one
            activation quantizer (shared ``bias_a``, ``scale_a`` and
            ``scale_a_initialized``). The groups come from
            ``torch.fx.symbolic_trace`` of the model; where tracing fails a
            warning says so and no quantizer is shared.
        a_bit, w_bit: code widths (4).
        backend: the layers' backend: ``"auto"``, ``"fallback"``,
            ``"sm80_int4"`` or ``"sm90_int8"``.
        per_channel_weight_scale: one weight scale per output channel.
        inplace: convert ``model`` itself; by default a deep copy is converted
            and ``model`` is left as it was.

    Convolutions q4conv cannot run (``groups != 1``, i.e. grouped and
    depthwise; ``padding_mode`` other than ``'zeros'``; ``padding='same'``
    needing asymmetric padding; subclasses with their own ``forward``) stay
    float and are named in one warning. Hooks registered on a replaced
    convolution are not carried over (a warning names those convolutions), and
    float64 convolutions are converted with a warning (q4conv layers take
    float32 / float16 / bfloat16 activations).

    Returns:
        The converted model (``model`` itself when ``inplace=True``).
    """
    _check_flag(share_quantizers, "share_quantizers")
    _check_flag(per_channel_weight_scale, "per_channel_weight_scale")
    _check_flag(inplace, "inplace")
    factory = _layer_options(a_bit, w_bit, backend, per_channel_weight_scale)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    should_skip = _skip_predicate(model, skip)
    if not inplace:
        try:
            model = copy.deepcopy(model)
        except RuntimeError as err:  # e.g. a non-leaf tensor attribute (torch.nn.utils.prune / weight_norm)
            raise RuntimeError(f"q4conv.convert copies the model first and copy.deepcopy failed ({err}); remove "
                               "what makes it fail (prune.remove, remove_weight_norm) or convert in place "
                               "with inplace=True") from err

    replacements: Dict[int, Q4Conv2dCutlass] = {}
    left_float: List[str] = []
    hooked: List[str] = []
    float64: List[str] = []
    for names, conv in _convolutions(model):
        name = names[0] or "<model>"
        if any(should_skip(alias, conv) for alias in names):
            continue
        reason = _ineligible_reason(conv)
        if reason is not None:
            left_float.append(f"{name} ({reason})")
            continue
        if conv._forward_hooks or conv._forward_pre_hooks:
            hooked.append(name)
        if conv.weight.dtype == torch.float64:
            float64.append(name)
        replacements[id(conv)] = _convert_one(conv, factory)
    if left_float:
        warnings.warn("q4conv.convert: these convolutions stay float nn.Conv2d (q4conv runs "
                      f"groups=1, padding_mode='zeros' only): {', '.join(left_float)}", stacklevel=2)
    if hooked:
        warnings.warn("q4conv.convert: the forward hooks of these convolutions are not carried over to their "
                      "q4conv layers (a torch.nn.utils.prune mask among them is no longer applied; the layer "
                      f"starts from the masked weights): {', '.join(hooked)}; remove them first "
                      "(prune.remove) or register them on the converted layers", stacklevel=2)
    if float64:
        warnings.warn("q4conv.convert: these convolutions have float64 weights; their q4conv layers keep "
                      "float64 parameters but take float32, float16 or bfloat16 activations only, so a "
                      f"float64 model cannot run them: {', '.join(float64)}; convert model.float() "
                      "(or .half() / .bfloat16()) instead", stacklevel=2)

    # Groups come from the model before replacement: the tracer keeps nn.Conv2d as leaves.
    groups = _groups_reading_same_tensor(model, replacements) if share_quantizers and replacements else []
    if id(model) in replacements:
        return replacements[id(model)]
    _replace_children(model, replacements)
    for group in groups:
        _share_activation_quantizer(group)
    keep_eps_out_of_ddp_broadcast(model)
    return model


def shared_quantizers(model: nn.Module) -> List[List[str]]:
    """Groups of q4conv layers of ``model`` that share one activation quantizer.

    Two layers share it iff ``a.scale_a is b.scale_a`` (``q4conv.convert``
    also shares ``bias_a`` and ``scale_a_initialized``). Returns one list of
    qualified module names per group of two or more layers, in module order.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    by_scale: Dict[int, List[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, Q4Conv2dCutlass):
            by_scale.setdefault(id(module.scale_a), []).append(name)
    return [names for names in by_scale.values() if len(names) > 1]


# ---------------------------------------------------------------- arguments
def _check_flag(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _layer_options(a_bit: Any, w_bit: Any, backend: Any, per_channel: bool) -> Dict[str, Any]:
    """The keyword arguments every new layer gets, checked once (before any work)."""
    bits = {}
    for name, value in (("a_bit", a_bit), ("w_bit", w_bit)):
        bits[name] = _int_arg(value, name)
        if bits[name] not in SUPPORTED_BITS:
            raise ValueError(f"{name} must be one of {SUPPORTED_BITS}, got {bits[name]}")
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return dict(bits, backend=backend, per_channel_weight_scale=per_channel)


def _skip_predicate(model: nn.Module, skip: Skip) -> SkipPredicate:
    """skip as a predicate; names are checked against the model first, so a
    typo raises instead of silently converting the layer."""
    if skip is None:
        return lambda name, module: False
    if callable(skip):
        return lambda name, module: bool(skip(name, module))  # type: ignore[misc, operator]
    names = [skip] if isinstance(skip, str) else _name_list(skip)
    known = {name for name, _ in model.named_modules(remove_duplicate=False)}
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(f"skip names modules that {type(model).__name__} does not have: {unknown} "
                         "(expected qualified names as model.named_modules() gives them)")
    wanted = set(names)

    def by_name(name: str, module: nn.Module) -> bool:
        # The module or any parent (a whole stage) named in skip.
        parts = name.split(".") if name else []
        return "" in wanted or any(".".join(parts[:i]) in wanted for i in range(1, len(parts) + 1))
    return by_name


def _name_list(skip: Any) -> List[str]:
    try:
        names = list(skip)
    except TypeError:
        raise TypeError("skip must be None, a module name, an iterable of module names or a "
                        f"predicate (name, module) -> bool, got {type(skip).__name__}") from None
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"skip must hold module names (str), got {bad!r}")
    return names


# ---------------------------------------------------------------- conversion
def _convolutions(model: nn.Module) -> List[Tuple[List[str], nn.Conv2d]]:
    """(names, conv) for each nn.Conv2d of model (the root included), in module
    order; a conv registered under several names comes once with all of them."""
    found: Dict[int, Tuple[List[str], nn.Conv2d]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.Conv2d):
            found.setdefault(id(module), ([], module))[0].append(name)
    return list(found.values())


def _ineligible_reason(conv: nn.Conv2d) -> Optional[str]:
    """Why conv cannot become a q4conv layer, or None."""
    if conv.groups != 1:
        kind = "depthwise" if conv.groups == conv.in_channels == conv.out_channels else "grouped"
        return f"{kind}, groups={conv.groups}"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}"
    cls = type(conv)
    if cls.forward is not nn.Conv2d.forward or cls._conv_forward is not nn.Conv2d._conv_forward:
        return f"{cls.__name__} has its own forward"
    if isinstance(conv.weight, nn.parameter.UninitializedParameter):
        return "uninitialised lazy module"
    if isinstance(conv.padding, str):
        try:
            _padding_arg(conv.padding, tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation))
        except ValueError:
            return f"padding={conv.padding!r} here needs asymmetric padding"
    return None


def _convert_one(conv: nn.Conv2d, options: Dict[str, Any]) -> Q4Conv2dCutlass:
    """A q4conv layer with conv's geometry, parameters, device, dtype and mode."""
    weight = conv.weight
    layer = Q4Conv2dCutlass(
        conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride), conv.padding,
        tuple(conv.dilation), options["a_bit"], options["w_bit"], device=weight.device, dtype=weight.dtype,
        bias=conv.bias is not None, per_channel_weight_scale=options["per_channel_weight_scale"],
        backend=options["backend"],
    )
    layer.load_float_weights(conv)  # weight, bias, prepare_params(), scale_a uninitialised
    layer.weight.requires_grad_(weight.requires_grad)
    if conv.bias is not None:
        layer.bias.requires_grad_(conv.bias.requires_grad)
    return layer.train(conv.training)


def _replace_children(model: nn.Module, replacements: Dict[int, Q4Conv2dCutlass]) -> None:
    """Swap every reference to a converted conv (a conv registered twice is one layer)."""
    for parent in model.modules():
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                setattr(parent, child_name, replacements[id(child)])


# ---------------------------------------------------------------- sharing
class _ConvLeafTracer(torch.fx.Tracer):
    """Keeps every convolution a leaf (subclasses of nn.Conv2d and q4conv
    layers too), so each call is one call_module node with its input."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (nn.Conv2d, Q4Conv2dCutlass)) or super().is_leaf_module(m, module_qualified_name)


def _groups_reading_same_tensor(model: nn.Module, replacements: Dict[int, Q4Conv2dCutlass]
                                ) -> List[List[Q4Conv2dCutlass]]:
    """New layers whose convolutions read the same fx node, as groups of two
    or more in module order; [] (with a warning) where tracing fails."""
    try:
        graph = _ConvLeafTracer().trace(model)
    except Exception as exc:  # any failure of user code under tracing: convert without sharing
        warnings.warn(f"q4conv.convert: torch.fx could not trace {type(model).__name__} "
                      f"({type(exc).__name__}: {exc}); converted without shared activation quantizers",
                      stacklevel=3)
        return []
    readers: Dict[torch.fx.Node, List[int]] = {}
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        module = model.get_submodule(node.target)
        source = node.args[0] if node.args else node.kwargs.get("input")
        if id(module) in replacements and isinstance(source, torch.fx.Node):
            readers.setdefault(source, []).append(id(module))
    order = {id(m): i for i, m in enumerate(model.modules())}
    components = sorted((sorted(c, key=order.__getitem__) for c in _union(readers.values())),
                        key=lambda c: order[c[0]])
    return [members for component in components
            for members in _compatible(component, replacements) if len(members) > 1]


def _union(sets: Iterable[Sequence[int]]) -> List[Set[int]]:
    """Connected components: a conv that reads two tensors has one quantizer,
    so it joins the readers of both."""
    components: List[Set[int]] = []
    for members in sets:
        merged = set(members)
        for component in [c for c in components if c & merged]:
            merged |= component
            components.remove(component)
        components.append(merged)
    return components


def _compatible(ids: Sequence[int], replacements: Dict[int, Q4Conv2dCutlass]) -> List[List[Q4Conv2dCutlass]]:
    """Split a group by what a shared bias_a / scale_a must agree on."""
    by_key: Dict[Tuple[Any, ...], List[Q4Conv2dCutlass]] = {}
    for conv_id in ids:
        layer = replacements[conv_id]
        key = (layer.in_channels, layer.bias_a.dtype, layer.bias_a.device, layer.a_bit)
        by_key.setdefault(key, []).append(layer)
    return list(by_key.values())


def _share_activation_quantizer(layers: Sequence[Q4Conv2dCutlass]) -> None:
    """The later layers take the first one's bias_a, scale_a and
    scale_a_initialized objects: one quantizer, learned from both consumers'
    gradients, initialised once by whichever runs first; the host-side
    "initialised" flag is shared too, so a reset through one layer
    (load_float_weights) re-initialises the group once.

    The Parameters stay shared through deepcopy, load_state_dict and .to()
    (PyTorch converts a Parameter in place); a move to another device gives
    each layer its own copy of the scale_a_initialized buffer (Module._apply
    replaces buffers per module), which changes nothing: the layer that runs
    second still finds scale_a non-zero."""
    first = layers[0]
    for layer in layers[1:]:
        layer.bias_a = first.bias_a
        layer.scale_a = first.scale_a
        layer.scale_a_initialized = first.scale_a_initialized
        layer._scale_a_flag = first._scale_a_flag
