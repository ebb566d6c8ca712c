"""Hugging Face causal LMs trained with triton_xent.linear_cross_entropy: the training loss
comes from the last hidden states and the head's weight, and the (batch, seq, vocab) logits
are never stored.

    from triton_xent.integrations.hf import patch_causal_lm, unpatch_causal_lm
    model = patch_causal_lm(LlamaForCausalLM(config))   # or one of SUPPORTED_MODELS
    out = model(input_ids, labels=labels)               # out.loss as before, out.logits None
    unpatch_causal_lm(model)                            # the original forward again

How it hooks in, and why this way. A model's forward computes `logits = lm_head(hidden)`
before it calls `self.loss_function(logits, labels, ...)`, so a replacement loss function
(transformers' own hook) comes too late: the logits already exist. The patch replaces the
model's forward, on this instance only, by one that calls the base model (`model.model`) for
the hidden states and computes the loss itself: what the original forward does, minus the
logits. Per instance rather than on the class: other models of the class are left alone,
copy.deepcopy and torch.save / torch.load of the whole model give a copy patched on itself,
and deleting one attribute undoes it. Only the classes of SUPPORTED_MODELS are accepted (and
subclasses that keep their forward): their forwards were read and are tested against; a
model whose head does anything else (a logit scale, a LoRA or quantised head, a custom
loss_function) would get a different loss, silently.

The loss is transformers' ForCausalLMLoss (transformers/loss/loss_utils.py):

    labels padded by one ignore_index (-100) at the end and shifted left: the target of
        position t is labels[t + 1], the last position predicts nothing
        (a `shift_labels` keyword, when given, is used as the targets as it is);
    cross-entropy of the float32-upcast logits (softcapped first for Gemma-2 and Gemma-3:
        cap * tanh(logits / cap), cap = config.final_logit_softcapping), ignore_index rows
        skipped;
    reduction "mean" over the rows that count, or, when `num_items_in_batch` is given (the
        Trainer passes the number of target tokens of the whole accumulated batch for
        gradient accumulation), reduction "sum" divided by num_items_in_batch.

Here the same quantities are linear_cross_entropy(hidden, lm_head.weight, shift_labels,
softcap=cap, reduction=..., ignore_index=...), float32-accumulated, and the loss is returned
in float32 as transformers' is (under torch.autocast, exactly so: linear_cross_entropy then
returns a float32 loss). For bfloat16 / float16 models, though, linear_cross_entropy
returns the loss in the model's dtype, so its value is rounded to it (half a unit in the last
place: up to 2^-8 relative in bfloat16, 2^-11 in float16), and with num_items_in_batch the
factor 1 / num_items_in_batch reaches the gradients rounded the same way (a common scale).
float32 models are exact to float32 rounding. With num_items_in_batch the sum is taken as
the mean times the number of counted rows: a float16 sum overflows past 65504 (8k tokens
at a loss of 8), a mean does not.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import warnings

import torch
from torch import nn

_MIN_TRANSFORMERS = (4, 50)  # logits_to_keep, shift_labels; verified 4.50.3, 4.57.6, 5.23.0
_INSTALL = 'pip install "triton_xent[hf]"   (or: pip install "transformers>=4.50")'

try:
    import transformers
    from transformers.loss.loss_utils import ForCausalLMLoss
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError as exc:  # transformers is an optional extra
    raise ImportError(f"triton_xent.integrations.hf needs Hugging Face transformers >= 4.50; "
                      f"install it with: {_INSTALL}") from exc
if tuple(int(p) for p in transformers.__version__.split(".")[:2]) < _MIN_TRANSFORMERS:
    raise ImportError(f"triton_xent.integrations.hf needs transformers >= 4.50 (whose forward "
                      f"and ForCausalLMLoss it reproduces), found {transformers.__version__}; "
                      f"upgrade with: {_INSTALL}")

from ..dtensor import is_dtensor  # noqa: E402  (after the check above)
from ..linear import linear_cross_entropy  # noqa: E402

__all__ = ["patch_causal_lm", "unpatch_causal_lm", "is_patched", "SUPPORTED_MODELS"]

# Causal-LM classes whose forward is `hidden = model(...)[0]; logits = lm_head(hidden)`,
# optionally softcapped, then `loss_function(logits, labels, vocab_size, **kwargs)`, each
# tested in tests/test_hf.py: class name -> (transformers.models.<module>, the config
# attribute holding the final logit softcap, or None).
_FAMILIES: dict[str, tuple[str, str | None]] = {
    "LlamaForCausalLM": ("llama", None),
    "MistralForCausalLM": ("mistral", None),
    "Qwen2ForCausalLM": ("qwen2", None),
    "Qwen3ForCausalLM": ("qwen3", None),
    "GemmaForCausalLM": ("gemma", None),
    "Gemma2ForCausalLM": ("gemma2", "final_logit_softcapping"),
    "Gemma3ForCausalLM": ("gemma3", "final_logit_softcapping"),
    "Phi3ForCausalLM": ("phi3", None),
}
SUPPORTED_MODELS = tuple(_FAMILIES)

# Keywords of the original forward that the patched loss consumes: they are not passed on
# to the base model.
_LOSS_KWARGS = ("num_items_in_batch", "shift_labels", "ignore_index")
_STATE = "_triton_xent_patch"  # the model attribute holding the patch's _Patch
# Output fields taken from the base model's output (read here, once: torch.compile does not
# trace dataclasses.fields).
_PASSED_ON = tuple(f.name for f in dataclasses.fields(CausalLMOutputWithPast)
                   if f.name not in ("loss", "logits"))


@dataclasses.dataclass
class _Patch:
    """What patch_causal_lm fixed for one model."""

    family: type  # the transformers class whose forward the patch replaces
    positional: tuple  # names of the forward's parameters that may be passed by position
    softcap_attr: str | None  # config attribute of the final logit softcap
    previous: object  # the instance-level forward found at patch time (restored), or None
    options: dict  # keyword arguments for linear_cross_entropy


def _family(model: nn.Module) -> tuple[type, str | None]:
    """The supported class `model` is an instance of, with its softcap attribute; TypeError
    if none, or if a subclass overrides its forward."""
    for cls in type(model).__mro__:
        entry = _FAMILIES.get(cls.__name__)
        if entry is None:
            continue
        module, softcap_attr = entry
        if cls.__module__ != f"transformers.models.{module}.modeling_{module}":
            continue
        if type(model).forward is not cls.forward:
            raise TypeError(
                f"{type(model).__name__} subclasses {cls.__name__} but overrides its forward; "
                f"patch_causal_lm reproduces {cls.__name__}.forward only")
        return cls, softcap_attr
    hint = ""
    if hasattr(model, "get_base_model"):  # a peft.PeftModel
        hint = ("; for a PEFT model, patch the transformers model before get_peft_model(), "
                "or patch model.get_base_model()")
    raise TypeError(f"patch_causal_lm supports {', '.join(SUPPORTED_MODELS)}, got "
                    f"{type(model).__name__}{hint}")


def patch_causal_lm(
    model: nn.Module,
    *,
    backend: str = "auto",
    chunk_size: int | None = None,
    memory_budget_bytes: int | None = None,
    accum_dtype: torch.dtype = torch.float32,
    check_targets: bool = True,
) -> nn.Module:
    """Makes `model` (a transformers causal LM of SUPPORTED_MODELS) compute its training loss
    with triton_xent.linear_cross_entropy from the last hidden states, without the logits.
    Returns the same model, patched in place; unpatch_causal_lm(model) undoes it. Patching a
    patched model replaces its options.

    After the patch, model(...) takes the same arguments, plus one keyword:
      skip_logits: None (default): True when `labels` are given and model.training, else
          False. True: compute the loss without logits (labels required). False: run the
          original forward, logits computed as usual (e.g. evaluation that needs them).

    When the patch computes the loss, the output is a CausalLMOutputWithPast whose `loss` is
    the model's own loss (see the module docstring: labels shifted, ignore_index -100
    skipped, the `num_items_in_batch` and `shift_labels` keywords as transformers reads
    them, the final logit softcap of Gemma-2/3) and whose **`logits` is None**; the cache
    (`past_key_values`, or `cache` in transformers 5.x), hidden_states and attentions are
    the base model's. With return_dict=False it is the tuple of the non-None fields,
    (loss, cache, ...): no logits at index 1. Gradients reach the base model and
    lm_head.weight (tied or not) as they would.

    The original forward runs instead, unchanged, when labels are None, in eval mode (unless
    skip_logits=True), and when logits_to_keep is not 0. It also runs, with a warning, when
    the fused loss would not be the model's: model.loss_function is not transformers'
    ForCausalLMLoss, or lm_head is not a plain nn.Linear without forward hooks (a LoRA or
    quantised head). With skip_logits=True these cases raise ValueError.

    Under torch.autocast the head runs in the autocast dtype, as lm_head would, and the loss
    is float32 (not rounded to the autocast dtype), as transformers' is.

    Options, passed to linear_cross_entropy: backend ("auto": Triton kernels on CUDA, plain
    PyTorch on CPU), chunk_size, memory_budget_bytes, accum_dtype, check_targets (True: one
    host sync per step, ignored rows dropped before the GEMMs; False: no sync, CUDA graphs).

    Patch before wrapping the model (PEFT, DDP/FSDP, DeepSpeed, torch.compile): the patch is
    an attribute of this module object, and a wrapper only calls its forward.
    """
    family, softcap_attr = _family(model)
    state = model.__dict__.get(_STATE)
    previous = state.previous if state is not None else model.__dict__.get("forward")
    options = dict(backend=backend, chunk_size=chunk_size,
                   memory_budget_bytes=memory_budget_bytes, accum_dtype=accum_dtype,
                   check_targets=check_targets)
    model.__dict__[_STATE] = _Patch(family=family, positional=_positional(family),
                                    softcap_attr=softcap_attr, previous=previous,
                                    options=options)
    model.forward = _PatchedForward(model)
    return model


def unpatch_causal_lm(model: nn.Module) -> nn.Module:
    """Undoes patch_causal_lm: model.forward is again the one it had before the patch (the
    class's, or an instance-level forward set before patching). A no-op on a model that is
    not patched. Returns the model."""
    state = model.__dict__.pop(_STATE, None)
    if state is None:
        return model
    if state.previous is None:
        model.__dict__.pop("forward", None)
    else:
        model.forward = state.previous
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether patch_causal_lm is in effect on `model`."""
    return _STATE in model.__dict__


class _PatchedForward:
    """model.forward while patched. An object rather than a closure or bound method, so that
    copy.deepcopy and pickle (torch.save of the whole model) give a copy patched on itself;
    all per-model state is in model._triton_xent_patch. It shows the original forward's
    signature: the Trainer looks for **kwargs there to decide whether to pass
    num_items_in_batch, and generate() for logits_to_keep."""

    __name__ = "forward"

    def __init__(self, model: nn.Module):
        self.__self__ = model

    def __call__(self, *args, **kwargs):
        return _forward(self.__self__, args, kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        sig = _signature(self.__self__.__dict__[_STATE].family)
        return sig.replace(parameters=list(sig.parameters.values())[1:])  # without self


@functools.lru_cache(maxsize=None)
def _signature(family: type) -> inspect.Signature:
    """The original forward's signature."""
    return inspect.signature(family.forward)


def _positional(family: type) -> tuple:
    """The names of forward's parameters that can be passed by position, without self; read
    at patch time, so that the patched forward binds its arguments with plain Python that
    torch.compile traces (inspect's Signature.bind does not trace: a graph break)."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in _signature(family).parameters.values() if p.kind in kinds)[1:]


def _bind(state: _Patch, args: tuple, kwargs: dict) -> dict:
    """forward's arguments by name (only those passed; **kwargs flattened in), with the
    errors Python gives for too many or repeated arguments."""
    if len(args) > len(state.positional):
        raise TypeError(f"forward() takes {len(state.positional)} positional arguments but "
                        f"{len(args)} were given")
    bound = dict(zip(state.positional, args))
    for name, value in kwargs.items():
        if name in bound:
            raise TypeError(f"forward() got multiple values for argument '{name}'")
        bound[name] = value
    return bound


def _original(model: nn.Module, state: _Patch):
    return state.previous if state.previous is not None else types.MethodType(
        state.family.forward, model)


def _forward(model: nn.Module, args: tuple, kwargs: dict):
    state: _Patch = model.__dict__[_STATE]
    skip_logits = kwargs.pop("skip_logits", None)
    bound = _bind(state, args, kwargs)
    labels = bound.get("labels")

    reason = None  # why the original forward must run instead
    quiet = True  # a reason that is expected (no warning) rather than surprising
    if labels is None:
        reason = "labels are None"
    elif skip_logits is None and not model.training:
        reason = "the model is in eval mode"
    elif skip_logits is False:
        reason = "skip_logits=False"
    elif not _keeps_all(bound.get("logits_to_keep")):
        reason = "logits_to_keep is not 0"
    else:
        quiet = False
        reason = _head_problem(model)
    if reason is not None:
        if skip_logits:
            raise ValueError(f"skip_logits=True, but {reason}")
        if not quiet:
            warnings.warn(f"triton_xent patch: {reason}; running the original forward, which "
                          f"computes the logits", stacklevel=3)
        return _original(model, state)(*args, **kwargs)
    return _fused_forward(model, state, bound)


def _keeps_all(logits_to_keep) -> bool:
    """Whether logits_to_keep asks for every position (0, the default), as training does."""
    return logits_to_keep is None or (isinstance(logits_to_keep, int) and logits_to_keep == 0)


def _head_problem(model: nn.Module) -> str | None:
    """Why lm_head.weight @ hidden would not be the model's logits (or loss), if it would
    not."""
    if model.loss_function is not ForCausalLMLoss:
        return (f"model.loss_function is {getattr(model.loss_function, '__name__', '?')}, "
                f"not transformers' ForCausalLMLoss")
    head = model.lm_head
    if _fully_sharded_on_its_own(head):
        return ("lm_head is wrapped by fully_shard (FSDP2) on its own, so its weight is "
                "sharded outside its forward; fully_shard the model with lm_head in the "
                "root's parameter group instead")
    if type(head) is not nn.Linear:
        return f"lm_head is a {type(head).__name__}, not a plain torch.nn.Linear"
    if (head._forward_hooks or head._forward_pre_hooks) and not _tensor_parallel_hooks(head):
        return "lm_head has forward hooks"
    return None


def _fully_sharded_on_its_own(head: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(head, FSDPModule)


def _tensor_parallel_hooks(head: nn.Module) -> bool:
    """Whether lm_head's forward hooks are only those of parallelize_module (ColwiseParallel
    and the like): they convert the layouts of its input and output, and the fused loss,
    which takes the DTensor weight itself (triton_xent/dtensor.py), needs neither."""
    if not head.__dict__.get("_distribute_module_applied", False):
        return False
    hooks = list(head._forward_hooks.values()) + list(head._forward_pre_hooks.values())
    return all(getattr(h, "__module__", "") == "torch.distributed.tensor._api" for h in hooks)


def _fused_forward(model: nn.Module, state: _Patch, inputs: dict):
    """The original forward without the logits: base model, then the loss from the hidden
    states. `inputs` are the forward's arguments by name, **kwargs flattened in."""
    labels = inputs.pop("labels")  # (B, T)
    loss_kwargs = {name: inputs.pop(name) for name in _LOSS_KWARGS if name in inputs}
    return_dict = inputs.pop("return_dict", None)
    inputs.pop("logits_to_keep", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)

    out = model.model(**inputs, return_dict=True)
    hidden = out.last_hidden_state  # (B, T, D)
    head = model.lm_head
    softcap = getattr(model.config, state.softcap_attr) if state.softcap_attr else None
    loss = _causal_lm_loss(hidden, head.weight, head.bias, labels, softcap=softcap,
                           options=state.options, **loss_kwargs)
    # The base model's cache, hidden_states and attentions, under this transformers' names
    # (the cache is `past_key_values` before 5.x, `cache` since); a field the base model's
    # output lacks stays None.
    passed_on = {name: getattr(out, name, None) for name in _PASSED_ON}
    output = CausalLMOutputWithPast(loss=loss, logits=None, **passed_on)
    return output if return_dict else output.to_tuple()


def _causal_lm_loss(
    hidden: torch.Tensor,  # (B, T, D) last hidden states
    head_weight: torch.Tensor,  # (V, D)
    head_bias: torch.Tensor | None,  # (V,)
    labels: torch.Tensor,  # (B, T) token ids, ignore_index where nothing is predicted
    *,
    softcap: float | None,
    options: dict,
    num_items_in_batch: torch.Tensor | int | None = None,
    shift_labels: torch.Tensor | None = None,  # (B, T): targets as they are, not shifted
    ignore_index: int = -100,
) -> torch.Tensor:  # () float32
    """transformers' ForCausalLMLoss(lm_head(hidden) [softcapped], labels, ...) computed with
    linear_cross_entropy: the same shift, ignore_index and num_items_in_batch handling."""
    if shift_labels is None:
        # Shift so that tokens < n predict n: position t's target is labels[t + 1]
        labels = nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    target = shift_labels.reshape(-1).to(hidden.device)  # (B*T,)
    x = hidden.reshape(-1, hidden.shape[-1])  # (B*T, D)
    # Under autocast the head multiplies in the autocast dtype, as lm_head would, and the
    # loss is float32 (linear_cross_entropy follows autocast as F.linear_cross_entropy does).
    loss = linear_cross_entropy(x, head_weight, target, linear_bias=head_bias,
                                reduction="mean", ignore_index=ignore_index,
                                softcap=softcap, **options)
    if is_dtensor(loss):  # from a DTensor head (ColwiseParallel): Replicate, returned as a
        loss = loss.to_local()  # plain tensor as transformers' own tensor parallelism does
    loss = loss.float()  # transformers upcasts the logits: its loss is float32
    if num_items_in_batch is not None:
        # transformers' sum / num_items_in_batch, the sum as mean * count in float32 (a
        # float16 "sum" would overflow); no counted row: a sum of 0 (the mean is NaN).
        counted = (target != ignore_index).sum()
        loss = torch.where(counted > 0, loss * counted, 0.0)
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss
