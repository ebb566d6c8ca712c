"""DTensor arguments: logits and heads sharded by PyTorch's own tensor parallelism
(torch.distributed.tensor, `parallelize_module`, `ColwiseParallel`, torchtitan).

A call whose arguments include a DTensor is mapped here onto the plain-tensor paths: each
DTensor gives its local tensor, and the mesh dimension that shards the classes gives the
process group of the vocab-parallel path (distributed.py), which is then called as if the
user had passed `process_group=` themselves. Nothing new is computed here.

    cross_entropy: input (N, C, ...) with Shard(1) (Shard(-1) for (N, C); Shard(0) for (C,))
        on one mesh dimension and Replicate on any other. The classes of mesh coordinate k
        are DTensor's k-th chunk (torch.chunk sizes: ceil(C / R) each, the last ones smaller
        or empty when R does not divide C); the process group of that mesh dimension must
        number its ranks as the mesh does, so that the vocab-parallel path, which orders the
        slices by group rank, puts them where DTensor does.
    linear_cross_entropy: linear_weight (V, D) with Shard(0) on one mesh dimension
        (ColwiseParallel's lm_head.weight), linear_bias with the same placements.
    distillation_loss: input (..., V) with Shard(-1) on one mesh dimension, teacher with
        input's mesh and placements (student and teacher are sharded alike).
    linear_distillation_loss: weight (V, D) with Shard(0) as linear_cross_entropy's head;
        teacher_weight, bias and teacher_bias with its mesh and placements.

target, weight and the linear op's input may be plain tensors (taken as replicated over the
mesh, as ColwiseParallel takes a plain input; the vocab-parallel path checks that the
targets agree on every rank of the group) or DTensors that are Replicate on every mesh
dimension. A fully replicated input or head takes the ordinary path on its local tensor.

Results: the loss (and lse) is a DTensor Replicate on every mesh dimension, as
`loss_parallel()` + F.cross_entropy returns it on a 1-D mesh (on a 2-D mesh torch's returns
the same placements for "sum" and "none" and refuses "mean"; here "mean" is right because
the other dimension replicates). Gradients reach the DTensors as DTensors with their own
placements: _to_local's backward wraps each local gradient, and the loss's from_local
unwraps grad_output.

FSDP2: a head that fully_shard shards, met outside its module's forward, is a Shard(0)
DTensor too, but over data-parallel ranks that hold different batches. Nothing in the tensor
tells it from a tensor-parallel head, so it is taken as one; then the vocab-parallel path's
check that every rank holds the same targets, or ours that the plain hidden states agree
(_check_same_on_ranks, after the call), raises on every rank with what to do
(_DATA_PARALLEL_HINT), and no number comes out of it.

Errors. Placements are DTensor metadata, the same on every rank: a placement that cannot be
mapped raises on every rank before any collective. Checks of what a rank holds (its shard's
size, its other arguments) run inside distributed.refusing_together, so a rank that fails
them joins the call's first collective as a refusal and every rank raises.

torch.compile: calls with DTensor arguments run eagerly (torch.compiler.disable: a graph
break; fullgraph=True refuses it), since the vocab-parallel path is eager-only.
"""

from __future__ import annotations

import functools
import inspect

import torch

from . import distributed

try:
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
except ImportError:  # a torch built without torch.distributed: no DTensor can reach us
    DTensor = None


def is_dtensor(value) -> bool:
    return DTensor is not None and isinstance(value, DTensor)


def routes_dtensors(mapper):
    """Decorator of a public function: a call with a DTensor argument is mapped by
    `mapper(arguments)` (this module's cross_entropy_arguments or linear_arguments) to
    local tensors and a process group, the function runs on them, the mapper's check after
    the call runs, and the tensor results come back as Replicate DTensors. Calls without a
    DTensor go straight through."""

    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def entry(*args, **kwargs):
            if not (any(is_dtensor(a) for a in args)
                    or any(is_dtensor(v) for v in kwargs.values())):
                return fn(*args, **kwargs)
            return _call_with_dtensors(fn, signature, mapper, args, kwargs)

        return entry

    return decorate


@torch.compiler.disable(reason="triton_xent's DTensor calls are eager-only: the "
                                "vocab-parallel path runs collectives outside the graph")
def _call_with_dtensors(fn, signature, mapper, args, kwargs):
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    arguments = bound.arguments
    if arguments["process_group"] is not None:
        raise ValueError("a DTensor argument brings its own process group (the mesh "
                         "dimension that shards the classes); pass no process_group")
    mesh, sharded_head, check_after = mapper(arguments)
    try:
        out = fn(*bound.args, **bound.kwargs)
    except ValueError as error:
        if sharded_head and "differ between ranks" in str(error):
            raise ValueError(f"{error}. {_DATA_PARALLEL_HINT}") from error
        raise
    if check_after is not None:
        # Every rank returned (the path's own checks raise alike): a collective is safe here.
        check_after()
    replicated = [Replicate()] * mesh.ndim

    def wrap(t):  # a result left out of a named tuple (None) stays None
        return None if t is None else DTensor.from_local(t, mesh, replicated, run_check=False)

    if not isinstance(out, tuple):
        return wrap(out)
    wrapped = [wrap(t) for t in out]
    return type(out)(*wrapped) if hasattr(out, "_fields") else tuple(wrapped)


_DATA_PARALLEL_HINT = (
    "A DTensor head sharded by rows (Shard(0)) is taken as tensor-parallel, as "
    "ColwiseParallel leaves lm_head.weight: every rank of its mesh dimension holds the same "
    "hidden states and targets. An FSDP2 (fully_shard) head met outside its module's forward "
    "is sharded over data-parallel ranks that hold different batches instead: compute the "
    "loss where FSDP2 has gathered the weight (inside the forward of the module that "
    "fully_shard wrapped, e.g. with lm_head in that module's parameter group), or gather it "
    "for the call yourself with `w.redistribute(placements=[Replicate()] * n)"
    ".to_local(grad_placements=[Partial('avg')] * n)` (w = linear_weight, n = "
    "w.device_mesh.ndim), whose gradient is then reduce-scattered back and averaged as FSDP2 "
    "does")


# Hidden states taken as replicated must agree across the group up to rounding: ranks that
# computed them alike differ by float rounding at most (~1e-7 of the scale below), while
# different batches (data parallelism) differ by ~1 / sqrt(N * D) of it.
_SAME_RTOL = 1e-6


def _check_same_on_ranks(
    hidden: torch.Tensor,  # (..., D) the plain input of the linear op, this rank's
    group,
) -> None:
    """ValueError on every rank of `group` if the ranks' hidden states differ beyond rounding:
    one all_gather of a fingerprint (two weighted sums of the row sums, and the scale
    sum_rows |row|_2 sqrt(D))."""
    h = hidden.detach().reshape(-1, hidden.shape[-1])
    rows = h.sum(dim=1, dtype=torch.float32)
    norms = torch.linalg.vector_norm(h, dim=1, dtype=torch.float32)
    position = torch.arange(rows.numel(), device=h.device, dtype=torch.float32)
    mine = torch.stack([(rows * torch.cos(0.7 * position)).sum(),
                        (rows * torch.sin(1.3 * position)).sum(),
                        norms.sum() * h.shape[1] ** 0.5])
    prints = [torch.empty_like(mine) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(prints, mine, group=group)
    prints = torch.stack(prints).tolist()
    first = prints[0]
    tolerance = _SAME_RTOL * max(abs(p[2]) for p in prints)
    if any(abs(p[0] - first[0]) > tolerance or abs(p[1] - first[1]) > tolerance
           for p in prints):
        raise ValueError(f"linear_weight is a DTensor sharded by rows, and the plain input "
                         f"(hidden states) differs between the ranks of its mesh dimension. "
                         f"{_DATA_PARALLEL_HINT}")


# --- placements -------------------------------------------------------------------------


def _class_mesh_dim(t: DTensor, dim: int, name: str, what: str) -> int | None:
    """The mesh dimension whose placement is Shard(dim) (None: every one is Replicate).
    ValueError, from metadata only (alike on every rank), for anything else."""
    found = None
    for mesh_dim, p in enumerate(t.placements):
        if type(p) is Replicate:
            continue
        if type(p) is Shard:
            sharded = p.dim % t.dim()
            if sharded != dim:
                raise ValueError(
                    f"{name} is sharded on its dimension {sharded} ({p} on mesh dimension "
                    f"{mesh_dim}, placements {tuple(t.placements)}); only its {what} "
                    f"(dimension {dim}) may be sharded, with Replicate on the other mesh "
                    f"dimensions: redistribute it, e.g. to Replicate on mesh dimension "
                    f"{mesh_dim}")
            if found is not None:
                raise ValueError(
                    f"{name} shards its {what} over two mesh dimensions ({found} and "
                    f"{mesh_dim}, placements {tuple(t.placements)}); the vocab-parallel path "
                    f"runs over one: shard them over one mesh dimension")
            found = mesh_dim
            continue
        if isinstance(p, Partial):
            raise ValueError(f"{name} has a Partial placement on mesh dimension {mesh_dim} "
                             f"({p}: values still to be reduced); redistribute it to "
                             f"Replicate or Shard({dim}) first")
        raise ValueError(f"{name} has placement {p} on mesh dimension {mesh_dim}, which "
                         f"triton_xent cannot map; supported: Shard({dim}) on one mesh "
                         f"dimension and Replicate on the others")
    return found


def _group_of(t: DTensor, mesh_dim: int | None):
    return None if mesh_dim is None else t.device_mesh.get_group(mesh_dim)


def _check_local_shard(t: DTensor, mesh_dim: int, dim: int, group, name: str) -> None:
    """This rank's shard is DTensor's chunk of its mesh coordinate, and that coordinate is its
    rank in the group (the order in which the vocab-parallel path places the slices)."""
    mesh = t.device_mesh
    coordinate = mesh.get_coordinate()[mesh_dim]
    group_rank = torch.distributed.get_rank(group)
    if coordinate != group_rank:
        raise ValueError(f"mesh dimension {mesh_dim}'s process group numbers this rank "
                         f"{group_rank}, but its mesh coordinate there is {coordinate}; "
                         f"triton_xent cannot map that mesh dimension (its slices are in "
                         f"group-rank order)")
    size, parts = t.shape[dim], mesh.size(mesh_dim)
    chunk = -(-size // parts)  # torch.chunk, as Shard splits
    lo, hi = min(size, coordinate * chunk), min(size, (coordinate + 1) * chunk)
    local = t._local_tensor.shape[dim]
    if local != hi - lo:
        raise ValueError(f"{name}'s local shard has {local} entries on dimension {dim}, but "
                         f"Shard({dim}) of {size} over {parts} ranks gives mesh coordinate "
                         f"{coordinate} entries {lo}..{hi - 1}")


def _local(value, mesh, name: str):
    """A plain tensor (or None, or a non-tensor, which the checks after us judge) as it is;
    a DTensor Replicate on every dimension of `mesh` as its local tensor."""
    if not is_dtensor(value):
        return value
    if value.device_mesh != mesh:
        raise ValueError(f"{name} is a DTensor on another device mesh ({value.device_mesh}) "
                         f"than the call's ({mesh})")
    if not all(type(p) is Replicate for p in value.placements):
        raise ValueError(f"{name} must be replicated: a plain tensor or a DTensor with "
                         f"Replicate on every mesh dimension, got placements "
                         f"{tuple(value.placements)}; redistribute it first")
    return value.to_local()


class _ToLocal(torch.autograd.Function):
    """DTensor.to_local, whose backward gives the gradient the DTensor's own global shape and
    stride. Before torch 2.13, to_local's backward derives the stride from the local shard,
    wrong for uneven shards (V = 37 on 2 ranks: 19 + 18), and autograd then replaces the
    gradient by a Replicate copy, the whole tensor on every rank."""

    @staticmethod
    def forward(ctx, t):
        ctx.spec = t.device_mesh, tuple(t.placements), t.shape, t.stride()
        local = t.to_local()
        return local.view_as(local)  # a new view: the DTensor's own tensor keeps no grad_fn

    @staticmethod
    def backward(ctx, grad):
        mesh, placements, shape, stride = ctx.spec
        return DTensor.from_local(grad, mesh, placements, run_check=False, shape=shape,
                                  stride=stride)


def _to_local(t: DTensor) -> torch.Tensor:
    """t's local tensor, through which gradients reach t with t's placements."""
    return _ToLocal.apply(t)


# --- the two public functions ------------------------------------------------------------


def cross_entropy_arguments(arguments: dict):
    """cross_entropy's arguments -> local tensors and process group, in place. Returns
    (mesh, False: no sharded head, None: nothing to check after the call)."""
    x = arguments["input"]
    if not is_dtensor(x):
        raise TypeError("target or weight is a DTensor but input is a plain tensor; pass the "
                        "logits as a DTensor (e.g. from a ColwiseParallel head with "
                        "use_local_output=False), or only plain tensors")
    class_dim = 1 if x.dim() > 1 else 0
    mesh_dim = _class_mesh_dim(x, class_dim, "input", "class dimension")
    group = _group_of(x, mesh_dim)
    local = _to_local(x)
    with distributed.refusing_together(group, local):
        if group is not None:
            _check_local_shard(x, mesh_dim, class_dim, group, "input")
        target = _local(arguments["target"], x.device_mesh, "target")
        if group is not None and isinstance(target, torch.Tensor) and target.is_floating_point():
            raise ValueError("a DTensor input sharded on its classes takes class-index "
                             "targets (vocab parallelism); class probabilities are not "
                             "supported")
        if group is not None and arguments["inplace_backward"]:
            raise ValueError("inplace_backward is not supported with a DTensor input sharded "
                             "on its classes (the vocab-parallel path)")
        arguments["target"] = target
        arguments["weight"] = _local(arguments["weight"], x.device_mesh, "weight")
    arguments["input"], arguments["process_group"] = local, group
    return x.device_mesh, False, None


def linear_arguments(arguments: dict):
    """linear_cross_entropy's arguments -> local tensors and process group, in place.
    Returns (mesh, whether the head is sharded, the check to run after the call: that plain
    hidden states agree across the group)."""
    head = arguments["linear_weight"]
    if not is_dtensor(head):
        raise TypeError("a DTensor argument needs a DTensor linear_weight: the head decides "
                        "the sharding (Shard(0), as ColwiseParallel leaves lm_head.weight); "
                        "pass it as one, or only plain tensors")
    if head.dim() != 2:
        raise ValueError(f"linear_weight must have shape (V, D) as nn.Linear stores it, got "
                         f"{tuple(head.shape)}")
    mesh = head.device_mesh
    mesh_dim = _class_mesh_dim(head, 0, "linear_weight", "rows (the classes)")
    group = _group_of(head, mesh_dim)
    local = _to_local(head)
    with distributed.refusing_together(group, local):
        if group is not None:
            _check_local_shard(head, mesh_dim, 0, group, "linear_weight")
        bias = arguments["linear_bias"]
        if bias is not None:
            if not is_dtensor(bias) or bias.device_mesh != mesh or \
                    tuple(bias.placements) != tuple(head.placements):
                raise ValueError(f"with a DTensor linear_weight, linear_bias must be a DTensor "
                                 f"with its mesh and placements {tuple(head.placements)} "
                                 f"(as ColwiseParallel leaves lm_head.bias)")
            arguments["linear_bias"] = _to_local(bias)
        plain_hidden = not is_dtensor(arguments["input"])  # replicated by assumption: checked
        for name in ("input", "target", "weight"):
            arguments[name] = _local(arguments[name], mesh, name)
    arguments["linear_weight"], arguments["process_group"] = local, group
    hidden = arguments["input"]
    if group is None or not plain_hidden or not isinstance(hidden, torch.Tensor):
        return mesh, group is not None, None
    return mesh, True, lambda: _check_same_on_ranks(hidden, group)


# --- the two distillation functions ------------------------------------------------------


def _same_sharding(t, like: DTensor, name: str, like_name: str) -> torch.Tensor:
    """t's local tensor, after checking that it is a DTensor on like's mesh with like's
    placements (the same class slice on every rank: student and teacher are sharded alike)."""
    if not is_dtensor(t) or t.device_mesh != like.device_mesh or \
            tuple(t.placements) != tuple(like.placements):
        raise ValueError(f"with a DTensor {like_name}, {name} must be a DTensor with its mesh "
                         f"and placements {tuple(like.placements)}: student and teacher are "
                         f"sharded by classes alike")
    return _to_local(t)


def distillation_arguments(arguments: dict):
    """distillation_loss's arguments -> local tensors and process group, in place: input and
    teacher (..., V) sharded alike on their last dimension (Shard(-1) on one mesh dimension,
    Replicate on the others), target replicated. Returns (mesh, False, None)."""
    x = arguments["input"]
    if not is_dtensor(x):
        raise TypeError("teacher or target is a DTensor but input is a plain tensor; pass the "
                        "student's logits as a DTensor too, or only plain tensors")
    class_dim = x.dim() - 1
    mesh_dim = _class_mesh_dim(x, class_dim, "input", "class dimension (the last)")
    group = _group_of(x, mesh_dim)
    local = _to_local(x)
    with distributed.refusing_together(group, local):
        if group is not None:
            _check_local_shard(x, mesh_dim, class_dim, group, "input")
        arguments["teacher"] = _same_sharding(arguments["teacher"], x, "teacher", "input")
        arguments["target"] = _local(arguments["target"], x.device_mesh, "target")
    arguments["input"], arguments["process_group"] = local, group
    return x.device_mesh, False, None


def linear_distillation_arguments(arguments: dict):
    """linear_distillation_loss's arguments -> local tensors and process group, in place:
    weight (V, D) Shard(0) on one mesh dimension (ColwiseParallel's lm_head.weight), and
    teacher_weight, bias and teacher_bias with its mesh and placements; the hidden states
    and target replicated (plain hidden states are checked to agree after the call, as in
    linear_arguments). Returns (mesh, whether the heads are sharded, that check)."""
    head = arguments["weight"]
    if not is_dtensor(head):
        raise TypeError("a DTensor argument needs a DTensor weight: the student's head decides "
                        "the sharding (Shard(0), as ColwiseParallel leaves lm_head.weight); "
                        "pass it as one, or only plain tensors")
    if head.dim() != 2:
        raise ValueError(f"weight must have shape (V, D) as nn.Linear stores it, got "
                         f"{tuple(head.shape)}")
    mesh = head.device_mesh
    mesh_dim = _class_mesh_dim(head, 0, "weight", "rows (the classes)")
    group = _group_of(head, mesh_dim)
    local = _to_local(head)
    with distributed.refusing_together(group, local):
        if group is not None:
            _check_local_shard(head, mesh_dim, 0, group, "weight")
        arguments["teacher_weight"] = _same_sharding(arguments["teacher_weight"], head,
                                                     "teacher_weight", "weight")
        for name in ("bias", "teacher_bias"):
            if arguments[name] is not None:
                arguments[name] = _same_sharding(arguments[name], head, name, "weight")
        plain_hidden = not is_dtensor(arguments["input"])
        for name in ("input", "teacher_input", "target"):
            arguments[name] = _local(arguments[name], mesh, name)
    arguments["weight"], arguments["process_group"] = local, group
    hidden = arguments["input"]
    if group is None or not plain_hidden or not isinstance(hidden, torch.Tensor):
        return mesh, group is not None, None
    return mesh, True, lambda: _check_same_on_ranks(hidden, group)
