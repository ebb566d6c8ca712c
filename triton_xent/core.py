"""What both backends share: the (N, V, D) row view of any accepted input, the reduction
denominators, the target check, and the assembly of the loss from per-row results.

The row functions of the two backends (kernels.xent.xent_rows and reference.xent_rows_torch)
have one contract; `Problem.use_triton` picks one. Arguments reach here already validated by
functional.py.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

from . import reference


@dataclass(frozen=True)
class Problem:
    """The options of one cross_entropy call, after validation."""

    prob_target: bool
    reduction: str  # "mean" | "sum" | "none"
    ignore_index: int
    label_smoothing: float
    lse_square_scale: float
    softcap: float | None
    check_targets: bool
    use_triton: bool
    temperature: float = 1.0  # z = softcap(x) / temperature
    entropy: bool = False  # return the per-row entropy (return_entropy)
    argmax: bool = False  # compute the per-row argmax (return_argmax)
    inplace_backward: bool = False  # the order above is the custom ops' argument order

    def row_kwargs(self) -> dict:
        return dict(prob_target=self.prob_target, ignore_index=self.ignore_index,
                    label_smoothing=self.label_smoothing,
                    lse_square_scale=self.lse_square_scale, softcap=self.softcap,
                    temperature=self.temperature, entropy=self.entropy, argmax=self.argmax)


# The real-number options: name -> (the test its value passes, what it must be). Tests are
# comparisons only, never math.*: where torch.compile makes a float symbolic (dynamic=True,
# or a float that changes between calls) each comparison becomes a guard, not a graph break,
# and NaN fails them all. A new option is one more line here (and one in FLOAT_OPTIONS if
# the custom ops take it).
_INF = float("inf")
NUMBER_RULES = {
    "label_smoothing": (lambda v: 0.0 <= v <= 1.0, "between 0.0 and 1.0"),
    "lse_square_scale": (lambda v: 0.0 <= v < _INF, "finite and >= 0"),
    "softcap": (lambda v: 0.0 < v < _INF, "None or a finite number > 0"),
    "temperature": (lambda v: 0.0 < v < _INF, "a finite number > 0"),
    "entropy_weight": (lambda v: -_INF < v < _INF, "finite"),
}
# The float options of the custom ops, in their order; each may also come as a 0-dim tensor
# (see resolve_options).
FLOAT_OPTIONS = ("label_smoothing", "lse_square_scale", "softcap", "temperature")


def check_number(name: str, value):
    """ValueError unless `value` (a number, or a SymFloat while tracing) passes its rule."""
    valid, requirement = NUMBER_RULES[name]
    if not valid(value):
        raise ValueError(f"{name} must be {requirement}, got {value}")
    return value


def resolve_options(values: tuple, tensors: list) -> tuple:
    """The FLOAT_OPTIONS values, with those given as 0-dim tensors (`tensors`, None where a
    number was given) read and checked. Called inside the custom ops: under torch.compile a
    tensor option's value is known only when the op runs (one host sync each)."""
    resolved = []
    for name, value, tensor in zip(FLOAT_OPTIONS, values, tensors):
        resolved.append(value if tensor is None else check_number(name, tensor.item()))
    return tuple(resolved)


def row_shape(input: torch.Tensor, target: torch.Tensor, prob_target: bool) -> torch.Size:
    """The shape of the unreduced loss: target's for class indices, input's without the class
    dimension for probabilities."""
    if not prob_target:
        return target.shape
    return input.shape[:1] + input.shape[2:] if input.dim() > 1 else torch.Size([])


def rows_view(x: torch.Tensor) -> torch.Tensor:
    """(C,) -> (1, C, 1); (N, C) -> (N, C, 1); (N, C, d1, ..., dk) -> (N, C, d1*...*dk).

    A view whenever the strides allow it (always for the first two), so rows are read in place.
    """
    if x.dim() == 1:
        return x.view(1, -1, 1)
    if x.dim() == 2:
        return x.unsqueeze(-1)
    return x.flatten(2)


def device_guard(device: torch.device):
    """The context every kernel launch runs in: its tensors' CUDA device made current.
    Triton launches on the current device, which need not be the tensors' (a Hugging Face
    model with device_map="auto" keeps lm_head on the last GPU while cuda:0 is current)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def on_tensors_device(launcher):
    """`launcher` run under device_guard of its first argument's device (a tensor)."""
    @functools.wraps(launcher)
    def launch(x: torch.Tensor, *args, **kwargs):
        with device_guard(x.device):
            return launcher(x, *args, **kwargs)

    return launch


def row_fns(use_triton: bool):
    """(row function, in-place scale function) of a backend; the kernels' under a device
    guard."""
    if use_triton:
        from .kernels import xent  # imported here: triton is optional on CPU-only installs

        return on_tensors_device(xent.xent_rows), on_tensors_device(xent.scale_rows_)
    return reference.xent_rows_torch, reference.scale_rows_torch_


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics and the loss are computed in: float64 for float64 input,
    float32 for the others."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def has_internal_overlap(x: torch.Tensor) -> bool:
    """Whether two elements of x may share memory (an expanded, stride-0 view, say), so that
    a gradient written into x would overwrite itself. Sorted by stride, each dimension must
    step past everything the smaller ones reach; layouts that interleave dimensions without
    overlapping also count as overlapping (they only lose the in-place write)."""
    reach = 0
    for stride, size in sorted((st, sz) for st, sz in zip(x.stride(), x.shape) if sz > 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


def empty_class_rows(problem: Problem, target: torch.Tensor, n_rows: int,
                     device: torch.device, entropy: bool) -> tuple:
    """(ce, lse, H, argmax) of rows with no classes, as F.cross_entropy gives them: ce 0 for
    an ignored row (or a probability target's empty sum), NaN for an unchecked out-of-range
    target, lse = log(0) = -inf; the entropy of nothing is 0 and there is no argmax (-1)."""
    ce = torch.zeros(n_rows, dtype=torch.float32, device=device)
    if not problem.prob_target:
        ce = torch.where(target == problem.ignore_index, ce, float("nan"))
    lse = torch.full((n_rows,), float("-inf"), dtype=torch.float32, device=device)
    H = torch.zeros(n_rows, dtype=torch.float32, device=device) if entropy else None
    idx = (torch.full((n_rows,), -1, dtype=torch.int64, device=device) if problem.argmax
           else None)
    return ce, lse, H, idx


def check_targets(target: torch.Tensor, n_classes: int, ignore_index: int) -> None:
    """IndexError naming the first target outside [0, C) that is not ignore_index (a host sync
    on GPUs, which is why `check_targets=False` exists)."""
    bad = (target != ignore_index) & ((target < 0) | (target >= n_classes))
    if bool(bad.any()):
        raise target_out_of_bounds(int(target[bad][0]), n_classes, ignore_index)


def target_out_of_bounds(value: int, n_classes: int, ignore_index: int) -> IndexError:
    classes = f"classes are 0..{n_classes - 1}" if n_classes else "there are no classes"
    return IndexError(f"Target {value} is out of bounds ({classes}, "
                      f"ignore_index={ignore_index}).")


def denominators(problem: Problem, target: torch.Tensor, weight: torch.Tensor | None,
                  n_rows: int, n_classes: int, dtype: torch.dtype):
    """(rows that count, sum of their class weights, their number), all on the device.

    "mean" divides the cross-entropy by the weight sum (PyTorch's weighted mean) and the z-loss
    by the count; both are n_rows for probability targets, whose mean is over all rows.
    """
    if problem.prob_target:
        # F.cross_entropy divides by input.numel() / C: 0/0 when there are no classes.
        rows = float(n_rows) if n_classes > 0 else float("nan")
        rows = torch.full((), rows, dtype=dtype, device=target.device)  # no H2D copy
        return None, rows, rows
    active = target != problem.ignore_index
    count = active.sum().to(dtype)
    if weight is None:
        return active, count, count
    w_y = weight.to(dtype)[target.clamp(0, max(n_classes - 1, 0)).long()]
    return active, torch.where(active, w_y, 0.0).sum(), count


def row_coefficients(problem: Problem, row_weight: torch.Tensor | None,
                     entropy_weight: torch.Tensor | None, active: torch.Tensor | None,
                     count: torch.Tensor | None, n_rows: int, dtype: torch.dtype):
    """(r, e, e_grad), each (n_rows,) in `dtype` or None: r the row weight, 0 on rows that do
    not count; e the entropy weight; e_grad = e scaled as "mean" scales the entropy term
    (1 / count), the factor of dH in the gradient."""
    r = e = e_grad = None
    if row_weight is not None:
        r = row_weight.reshape(-1).to(dtype)
        if active is not None:
            r = torch.where(active, r, 0.0)
    if entropy_weight is not None:
        e = entropy_weight.reshape(-1).to(dtype).expand(n_rows)
        e_grad = e / count if problem.reduction == "mean" else e
    return r, e, e_grad


def forward(problem: Problem, input: torch.Tensor, target: torch.Tensor,
            weight: torch.Tensor | None, row_weight: torch.Tensor | None = None,
            entropy_weight: torch.Tensor | None = None, *, compute_grad: bool):
    """(loss, lse, H, argmax, grad): loss as F.cross_entropy computes it (plus the z-loss, the
    row weights and the entropy term), in acc_dtype(input.dtype) (the caller casts it to F's
    result dtype); lse and H per row in float32 and argmax in int64 with the unreduced loss's
    shape (H, argmax None unless the problem asks for them); grad shaped like input (None
    unless compute_grad). Autocast is off inside: every dtype here is chosen, none is
    autocast's.

    row_weight: (rows,) float, multiplies each row's CE and z-loss; entropy_weight: () or
    (rows,) float, adds entropy_weight * H to each row that counts."""
    with torch.autocast(input.device.type, enabled=False):
        return _forward(problem, input, target, weight, row_weight, entropy_weight,
                        compute_grad)


def _forward(problem: Problem, input: torch.Tensor, target: torch.Tensor,
             weight: torch.Tensor | None, row_weight: torch.Tensor | None,
             entropy_weight: torch.Tensor | None, compute_grad: bool):
    logits = rows_view(input)
    N, V, D = logits.shape
    n_rows = N * D
    acc = acc_dtype(input.dtype)
    loss_shape = row_shape(input, target, problem.prob_target)
    if problem.prob_target:
        tgt = rows_view(target)
    else:
        tgt = target.reshape(-1)  # int64 or int32 (functional._class_indices)
        if problem.check_targets or not problem.use_triton:
            check_targets(tgt, V, problem.ignore_index)
    if weight is not None and problem.use_triton:
        weight = weight.to(torch.float32).contiguous()

    active = weight_sum = count = None  # needed by "mean", the z-loss and the row extras
    if (problem.reduction == "mean" or problem.lse_square_scale != 0.0
            or row_weight is not None or entropy_weight is not None):
        active, weight_sum, count = denominators(problem, tgt, weight, n_rows, V, acc)
    scale = None
    if problem.reduction == "mean" and compute_grad:
        scale = torch.stack([1.0 / weight_sum, 1.0 / count])
        scale = scale.to(torch.float32 if problem.use_triton else acc)
    kernel_dtype = torch.float32 if problem.use_triton else acc
    r, e, e_grad = row_coefficients(problem, row_weight, entropy_weight, active, count,
                                    n_rows, acc)

    grad = None
    if compute_grad:
        if (problem.inplace_backward and logits.data_ptr() == input.data_ptr()
                and not has_internal_overlap(input)):
            grad = logits.detach()  # an alias outside autograd: it holds no view of input
        else:
            grad = torch.empty((N, V, D), dtype=input.dtype, device=input.device)
    kwargs = problem.row_kwargs()
    kwargs["entropy"] = problem.entropy or e is not None  # the entropy term needs H
    if V == 0:  # no classes: rows count only if ignored (checked above), and add nothing
        ce, lse, H, idx = empty_class_rows(problem, tgt, n_rows, input.device,
                                           kwargs["entropy"])
    else:
        rows_fn, _ = row_fns(problem.use_triton)
        ce, lse, H, idx = rows_fn(
            logits, tgt, weight, scale, grad,
            r.to(kernel_dtype).contiguous() if r is not None and compute_grad else None,
            e_grad.to(kernel_dtype).contiguous() if e_grad is not None and compute_grad
            else None,
            **kwargs)
    if grad is not None and grad.data_ptr() == input.data_ptr():
        # The gradient now lives in input's storage: tell autograd, so that any other use of
        # the spent logits in backward fails loudly instead of reading a gradient.
        torch.autograd.graph.increment_version(input)

    loss = reduce_rows(problem, ce.to(acc), lse.to(acc), H.to(acc) if H is not None else None,
                       r, e, active, weight_sum, count, loss_shape)
    grad_out = grad.reshape(input.shape) if grad is not None else None
    return (loss, lse.to(torch.float32).view(loss_shape),
            H.to(torch.float32).view(loss_shape) if problem.entropy else None,
            idx.view(loss_shape) if idx is not None else None, grad_out)


def reduce_rows(problem: Problem, ce: torch.Tensor, lse: torch.Tensor,
                H: torch.Tensor | None, r: torch.Tensor | None, e: torch.Tensor | None,
                active: torch.Tensor | None, weight_sum: torch.Tensor | None,
                count: torch.Tensor | None, row_shape: torch.Size) -> torch.Tensor:
    """The loss from per-row (M,) cross-entropy, lse and entropy H: the z-loss on the rows
    that count (`active`, None for all), each row's CE and z-loss times its row weight `r`
    (None: 1), plus e * H on the rows that count (e None: no entropy term); then "none"
    (shaped `row_shape`), "sum", or "mean" dividing the cross-entropy by the weight sum and
    the z-loss and entropy terms by the count."""
    z_loss = ent = None
    if problem.lse_square_scale != 0.0:
        z_loss = problem.lse_square_scale * lse * lse
        if active is not None:
            z_loss = torch.where(active, z_loss, 0.0)
    if r is not None:
        ce = ce * r
        z_loss = z_loss * r if z_loss is not None else None
    if e is not None:
        ent = e * H
        if active is not None:
            ent = torch.where(active, ent, 0.0)
    extra = [t for t in (z_loss, ent) if t is not None]  # the terms divided by the count
    if problem.reduction == "none":
        return sum(extra, ce).view(row_shape)
    if problem.reduction == "sum":
        return sum((t.sum() for t in extra), ce.sum())
    loss = ce.sum() / weight_sum
    if problem.label_smoothing > 0.0 and not problem.prob_target:
        # F.cross_entropy divides its two terms by the weight sum separately: when no target
        # carries weight, 0/0 (NaN) plus smoothing/0, where one sum here would give inf.
        loss = torch.where(weight_sum == 0, float("nan"), loss)
    return sum((t.sum() / count for t in extra), loss)


def graph_is_kept() -> bool:
    """True while the running backward was asked to keep the graph (retain_graph=True)."""
    keep = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep is None else bool(keep())


def saved_grad_is_spent(saved: torch.Tensor) -> bool:
    """Whether a backward may scale a gradient saved in forward in place: in eager mode
    without retain_graph it is used once; with retain_graph a second backward must find it as
    forward left it; while torch.compile traces (the saved tensor is then a fake or
    functional tensor subclass) the traced graph must not mutate it; and under torch.func
    (a wrapped or batched tensor) the kernel cannot read it."""
    traced = (type(saved) is not torch.Tensor or torch.compiler.is_compiling()
              or torch._C._functorch.is_functorch_wrapped_tensor(saved))
    return not traced and not graph_is_kept()


def scale_saved_grad(problem: Problem, grad: torch.Tensor, grad_loss: torch.Tensor):
    """A backward: grad * grad_loss, in place when the saved gradient is spent (the kernel
    then leaves rows whose factor is 1 untouched)."""
    return scale_grad(problem, grad, grad_loss, in_place=saved_grad_is_spent(grad))


def scale_grad(problem: Problem, grad: torch.Tensor, grad_loss: torch.Tensor,
               *, in_place: bool) -> torch.Tensor:
    """grad * grad_loss, broadcast per row ("none") or as a scalar; in place when allowed."""
    rows = rows_view(grad)
    if not in_place:
        N, V, D = rows.shape
        go = grad_loss.reshape(-1)
        factor = go.view(N, 1, D) if problem.reduction == "none" else go.reshape(())
        return (rows * factor).to(grad.dtype).reshape(grad.shape)
    _, scale_fn = row_fns(problem.use_triton)
    scale_fn(rows, grad_loss)
    return grad
