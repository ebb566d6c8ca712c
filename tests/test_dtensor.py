"""DTensor arguments (triton_xent/dtensor.py) on CPU with gloo and DeviceMesh: logits sharded
on the classes and ColwiseParallel heads, against the single-process result and against
loss_parallel() + F.cross_entropy on the same DTensor; and the errors, alike on every rank.

One spawned group per layout runs every case in sequence, for both backends (the kernels
through Triton's interpreter: TRITON_INTERPRET=1 comes with the environment), and saves its
results; the parent compares them. Process start-up and rendezvous cost more than the cases.
The problems are test_distributed.py's (CASES, LINEAR_CASES), and so is the workers' exit:
save the results, then os._exit (see its docstring).
"""

import importlib.util
import math
import os
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import triton_xent
from helpers import assert_close, spawn_ranks
from test_distributed import CASES, LINEAR_CASES, V, _grad_output, _linear_problem, _problem
from test_distributed import _backward as _distributed_backward

pytest.importorskip("torch.distributed.tensor")
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh  # noqa: E402
from torch.distributed.tensor import (DTensor, Partial, Replicate, Shard,  # noqa: E402
                                      distribute_tensor)
from torch.distributed.tensor.parallel import (ColwiseParallel, loss_parallel,  # noqa: E402
                                               parallelize_module)

BACKENDS = ["torch"] + (["triton"] if triton_xent.triton_available() else [])
# V = 37 classes: 19 + 18 on 2 ranks, 13 + 13 + 11 on 3 (torch.chunk sizes, as Shard splits).
# "mesh2x2": 4 ranks, the classes on one mesh dimension, Replicate on the other.
LAYOUTS = {"world2": (2,), "world3": (3,), "mesh2x2": (2, 2)}
# loss_parallel() takes F.cross_entropy's own options (no smoothing, z-loss or softcap);
# on a 2-D mesh it refuses "mean".
LOSS_PARALLEL_CASES = ("mean", "sum_weighted", "none_ignore")
# Before torch 2.13 (2.8 and 2.11 run, see tools/stacks.sh), loss_parallel() refuses any 2-D
# mesh.
TORCH_2_13 = torch.torch_version.TorchVersion(torch.__version__) >= "2.13"


def _placements(mesh, class_mesh_dim, class_dim):
    return [Shard(class_dim) if d == class_mesh_dim else Replicate() for d in range(mesh.ndim)]


def _replicated(t, mesh):
    return DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False)


def _parts(out):
    """(loss, entropy, argmax) of a result; None for what it does not hold (the RL extras
    come in a CrossEntropyOutput)."""
    if isinstance(out, triton_xent.CrossEntropyOutput):
        return out.loss, out.entropy, out.argmax
    return out, None, None


def _entropy_grad(entropy):
    """The entropy's upstream gradient, as test_distributed._backward gives it."""
    return torch.linspace(-1, 1, entropy.numel()).view(entropy.shape)


def _backward(out, mesh):
    """Backward with test_distributed's grad_output (and the entropy's upstream gradient,
    when it is returned), as replicated DTensors."""
    loss, entropy, _ = _parts(out)
    go = _grad_output(loss.to_local())
    total = loss if go is None else (loss * _replicated(go, mesh)).sum()
    if entropy is not None:
        total = total + (entropy * _replicated(_entropy_grad(entropy.to_local()), mesh)).sum()
    total.backward()


def _kind(t):
    if isinstance(t, DTensor):
        return f"DTensor{tuple(t.placements)}"
    return type(t).__name__


def _record(out, x):
    """What the parent compares: the loss's and the gradient's kind, and their values (and
    the entropy's and argmax's, where returned)."""
    loss, entropy, argmax = _parts(out)
    extras = {name: (_kind(v), v.to_local().detach()) for name, v in
              (("entropy", entropy), ("argmax", argmax)) if v is not None}
    return dict(kind=_kind(loss), loss=loss.to_local().detach(), grad_kind=_kind(x.grad),
                grad=x.grad.full_tensor() if isinstance(x.grad, DTensor) else x.grad,
                extras=extras)


def _error(fn):
    try:
        fn()
    except (ValueError, TypeError, IndexError, torch._dynamo.exc.Unsupported) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


# (backend, case, input): every case of test_distributed on (N, C) input sharded Shard(1);
# Shard(-1), and (N, C, 2) input, once each; the kernels (interpreted: slow) on two cases,
# on 2 ranks only. The mapping onto the vocab-parallel path is the same for both backends,
# and test_distributed.py runs each backend there on every case and layout.
_CROSS_ENTROPY_RUNS = ([("torch", case, "2d") for case in CASES] +
                       [("torch", "none_ignore", "shard_minus_one"),
                        ("torch", "everything", "3d"),
                        ("triton", "everything", "2d"), ("triton", "zloss_softcap_none", "3d")])
_LINEAR_RUNS = [("torch", case) for case in LINEAR_CASES] + [("triton", "linear_none_recompute")]


def _runs(runs, shape):
    kernels = shape == (2,) and "triton" in BACKENDS
    return [run for run in runs if run[0] == "torch" or kernels]


def _cross_entropy_problem(case, shape):
    x, t, kwargs = _problem(case)
    if shape == "3d":  # (N, V, 2): the classes in the middle, target (N, 2)
        x, t = torch.stack([x, x.flip(0)], dim=2), torch.stack([t, t.flip(0)], dim=1)
    return x, t, kwargs


def _cross_entropy_cases(mesh, class_mesh_dim, results):
    for backend, case, shape in _runs(_CROSS_ENTROPY_RUNS, tuple(mesh.shape)):
        x, t, kwargs = _cross_entropy_problem(case, shape)
        dim = -1 if shape == "shard_minus_one" else 1
        dx = distribute_tensor(x, mesh, _placements(mesh, class_mesh_dim, dim))
        dx.requires_grad_(True)
        loss = triton_xent.cross_entropy(dx, t, backend=backend, **kwargs)
        _backward(loss, mesh)
        results[(backend, case, shape)] = _record(loss, dx)
    for case in LOSS_PARALLEL_CASES:
        x, t, kwargs = _problem(case)
        if mesh.ndim > 1 and (kwargs.get("reduction", "mean") == "mean" or not TORCH_2_13):
            continue
        if "weight" in kwargs:  # torch 2.13's loss_parallel backward fails on an ignored
            t = torch.where(t == -100, 0, t)  # target with a weight (it gathers index -100)
        for who in ("ours", "loss_parallel"):
            dx = distribute_tensor(x, mesh, _placements(mesh, class_mesh_dim, 1))
            dx.requires_grad_(True)
            if who == "ours":
                loss = triton_xent.cross_entropy(dx, t, **kwargs)
                _backward(loss, mesh)
            else:
                with loss_parallel():
                    loss = F.cross_entropy(dx, t, **kwargs)
                    _backward(loss, mesh)
            results[(who, case)] = _record(loss, dx)


def _linear_cases(mesh, class_mesh_dim, results):
    """ColwiseParallel on an nn.Linear head (a 1-D mesh: the mesh itself, a 2-D one: its
    class dimension), and on a 2-D mesh also a head distributed over the whole mesh."""
    for backend, case in _runs(_LINEAR_RUNS, tuple(mesh.shape)):
        h_full, w, b, t, kwargs = _linear_problem(case)
        for how in ("colwise", "colwise_dtensor_input", "mesh_head"):
            if how == "mesh_head" and mesh.ndim == 1:
                continue
            head = torch.nn.Linear(w.shape[1], w.shape[0])
            with torch.no_grad():
                head.weight.copy_(w)
                head.bias.copy_(b)
            if how == "mesh_head":
                placements = _placements(mesh, class_mesh_dim, 0)
                head.weight = torch.nn.Parameter(distribute_tensor(w, mesh, placements))
                head.bias = torch.nn.Parameter(distribute_tensor(b, mesh, placements))
            else:
                sub = mesh if mesh.ndim == 1 else mesh[mesh.mesh_dim_names[class_mesh_dim]]
                parallelize_module(head, sub, ColwiseParallel())
            h = h_full.clone().requires_grad_(True)
            hidden = h
            if how == "colwise_dtensor_input":
                hidden = _replicated(h, mesh if mesh.ndim == 1 else sub)
            out = triton_xent.linear_cross_entropy(hidden, head.weight, t,
                                                   linear_bias=head.bias,
                                                   backend=backend, **kwargs)
            _backward(out, _parts(out)[0].device_mesh)
            results[(backend, case, how)] = dict(
                _record(out, h), weight_grad_kind=_kind(head.weight.grad),
                weight_grad=head.weight.grad.full_tensor(),
                bias_grad=head.bias.grad.full_tensor())


def _replicated_case(mesh, results):
    """A fully replicated DTensor takes the ordinary path, on every rank."""
    x, t, kwargs = _problem("everything")
    dx = distribute_tensor(x, mesh, [Replicate()] * mesh.ndim).requires_grad_(True)
    loss = triton_xent.cross_entropy(dx, t, **kwargs)
    _backward(loss, mesh)
    results["replicated"] = _record(loss, dx)
    # return_lse on sharded logits: (loss, lse), both replicated DTensors
    dx = distribute_tensor(x, mesh, _placements(mesh, 0, 1))
    loss, lse = triton_xent.cross_entropy(dx, t, return_lse=True, reduction="none", **kwargs)
    results["return_lse"] = dict(kinds=[_kind(loss), _kind(lse)], lse=lse.to_local())


def _compiled_case(mesh, results):
    """torch.compile around a DTensor call: the call runs eagerly (a graph break)."""
    torch._dynamo.reset()
    x, t, kwargs = _problem("everything")

    def step(dx):
        return triton_xent.cross_entropy(dx * 2.0, t, **kwargs)

    dx = distribute_tensor(x, mesh, _placements(mesh, 0, 1)).requires_grad_(True)
    compiled = torch.compile(step, backend="aot_eager")
    loss = compiled(dx)
    loss.backward()
    grad = dx.grad.full_tensor()
    dx.grad = None
    eager = step(dx)
    eager.backward()
    results["compiled"] = dict(kind=_kind(loss), loss=loss.to_local().detach(),
                               eager=eager.to_local().detach(), grad=grad,
                               eager_grad=dx.grad.full_tensor())
    results["compiled_fullgraph"] = _error(
        lambda: torch.compile(step, backend="aot_eager", fullgraph=True)(dx.detach()))


def _hf_case(mesh, results):
    """The HF patch on a model whose lm_head is ColwiseParallel: the fused loss and the
    gradients of the unparallelized model."""
    if importlib.util.find_spec("transformers") is None:
        return  # an optional extra: the parent then finds no "hf" results and skips them
    import transformers

    from triton_xent.integrations.hf import patch_causal_lm

    config = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, max_position_embeddings=16)
    torch.manual_seed(3)
    plain = patch_causal_lm(transformers.LlamaForCausalLM(config), backend="torch")
    tp = patch_causal_lm(transformers.LlamaForCausalLM(config), backend="torch")
    tp.load_state_dict(plain.state_dict())
    parallelize_module(tp.lm_head, mesh, ColwiseParallel())
    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(4))
    losses = []
    for model in (plain, tp):
        model.train()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the patch must not fall back to the logits
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        losses.append(out.loss)
    # lm_head wrapped by fully_shard on its own: sharded while the patched forward runs, so
    # the patch warns and runs the original forward, where FSDP2 gathers it (same batch on
    # every rank here: the loss is the plain model's)
    from torch.distributed.fsdp import fully_shard

    fsdp = patch_causal_lm(transformers.LlamaForCausalLM(config), backend="torch")
    fsdp.load_state_dict(plain.state_dict())
    fully_shard(fsdp.lm_head, mesh=mesh)
    fsdp.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fsdp_loss = fsdp(input_ids=ids, labels=ids).loss
    results["hf_fsdp"] = dict(loss=fsdp_loss.detach(), warnings=[str(w.message) for w in caught])
    results["hf"] = dict(
        kind=_kind(losses[1]), loss=losses[1].detach(), expected=losses[0].detach(),
        head_grad=tp.lm_head.weight.grad.full_tensor(), expected_head_grad=plain.lm_head.weight.grad,
        embed_grad=tp.model.embed_tokens.weight.grad,
        expected_embed_grad=plain.model.embed_tokens.weight.grad)


def _fsdp_case(mesh, results):
    """A head wrapped by fully_shard (FSDP2), each rank with its own batch: met outside its
    forward it is refused with what to do; gathered as the message says, its gradient is the
    one FSDP2 gives through the module's own forward."""
    from torch.distributed.fsdp import fully_shard

    rank = dist.get_rank()
    g = torch.Generator().manual_seed(20 + rank)  # data parallel: another batch per rank
    h, t = torch.randn(6, 5, generator=g), torch.randint(0, V, (6,), generator=g)
    grads = []
    for how in ("fsdp_forward", "gathered"):
        torch.manual_seed(5)
        head = torch.nn.Linear(5, V, bias=False)
        fully_shard(head, mesh=mesh)
        if how == "fsdp_forward":
            loss = F.cross_entropy(head(h), t)
        else:
            results[("error", "fsdp_head")] = _error(
                lambda: triton_xent.linear_cross_entropy(h, head.weight, t))
            w = head.weight.redistribute(placements=[Replicate()]).to_local(
                grad_placements=[Partial("avg")])
            loss = triton_xent.linear_cross_entropy(h, w, t)
        loss.backward()
        grads.append(head.weight.grad)
    results["fsdp"] = dict(kinds=[_kind(g) for g in grads],
                           grads=[g.full_tensor() for g in grads])


def _errors(mesh, class_mesh_dim, results):
    """Every refused call, each rank's message (the parent requires them alike)."""
    rank = dist.get_rank()
    x, t, _ = _problem("mean")
    sharded = distribute_tensor(x, mesh, _placements(mesh, class_mesh_dim, 1))
    local = sharded.to_local()
    errors = {
        "partial": lambda: triton_xent.cross_entropy(
            DTensor.from_local(local, mesh, [Partial()] * mesh.ndim, run_check=False), t),
        "batch_shard": lambda: triton_xent.cross_entropy(
            distribute_tensor(x, mesh, [Shard(0)] * mesh.ndim), t),
        "process_group": lambda: triton_xent.cross_entropy(
            sharded, t, process_group=dist.group.WORLD),
        "plain_input_dtensor_target": lambda: triton_xent.cross_entropy(
            x, _replicated(t, mesh)),
        "sharded_target": lambda: triton_xent.cross_entropy(
            sharded, distribute_tensor(t, mesh, [Shard(0)] * mesh.ndim)),
        "probability_target": lambda: triton_xent.cross_entropy(sharded, x.softmax(1)),
        "inplace_backward": lambda: triton_xent.cross_entropy(
            sharded.detach().requires_grad_(True), t, inplace_backward=True),
        # rank 0 alone passes a target of one row fewer: every rank raises, none waits
        "one_rank_refuses": lambda: triton_xent.cross_entropy(
            sharded, t[:-1] if rank == 0 else t),
        "target_out_of_range": lambda: triton_xent.cross_entropy(
            sharded, torch.where(torch.arange(t.numel()) == 3, V, t)),
        # a head sharded by rows met with other targets on each rank (an FSDP2 head)
        "data_parallel_head": lambda: triton_xent.linear_cross_entropy(
            torch.randn(4, 5), distribute_tensor(torch.randn(V, 5), mesh,
                                                 _placements(mesh, class_mesh_dim, 0)),
            torch.full((4,), rank)),
        # ... or with the same targets but other hidden states on each rank
        "data_parallel_hidden": lambda: triton_xent.linear_cross_entropy(
            torch.randn(4, 5, generator=torch.Generator().manual_seed(rank)),
            distribute_tensor(torch.randn(V, 5), mesh, _placements(mesh, class_mesh_dim, 0)),
            torch.zeros(4, dtype=torch.long)),
        "plain_bias": lambda: triton_xent.linear_cross_entropy(
            torch.randn(4, 5), distribute_tensor(torch.randn(V, 5), mesh,
                                                 _placements(mesh, class_mesh_dim, 0)),
            torch.zeros(4, dtype=torch.long), linear_bias=torch.zeros(V)),
        "plain_head_dtensor_input": lambda: triton_xent.linear_cross_entropy(
            _replicated(torch.randn(4, 5), mesh), torch.randn(V, 5),
            torch.zeros(4, dtype=torch.long)),
    }
    if mesh.ndim == 1:
        # the process group of a reversed mesh numbers its ranks in ascending order, not in
        # the mesh's (on 3 ranks, rank 1 is where both put it: it raises as the others refuse)
        # (from_local with the chunk of the rank's coordinate: distribute_tensor would scatter
        # over that group, which itself mixes up the chunks)
        reversed_mesh = DeviceMesh("cpu", torch.arange(mesh.size()).flip(0))
        chunk = x.chunk(mesh.size(), dim=1)[reversed_mesh.get_coordinate()[0]]
        errors["unmappable_mesh"] = lambda: triton_xent.cross_entropy(
            DTensor.from_local(chunk, reversed_mesh, [Shard(1)], run_check=False,
                               shape=x.shape, stride=x.stride()), t)
    else:
        errors["batch_and_class_shards"] = lambda: triton_xent.cross_entropy(
            distribute_tensor(x, mesh, [Shard(0), Shard(1)]), t)
        errors["classes_on_two_mesh_dims"] = lambda: triton_xent.cross_entropy(
            distribute_tensor(x, mesh, [Shard(1), Shard(1)]), t)
    for name, fn in errors.items():
        results[("error", name)] = _error(fn)


def _worker(rank, shape, rendezvous, out_dir):
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                                world_size=math.prod(shape))
        names = ("dp", "tp")[-len(shape):]
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
        results = {}
        # 2-D: the classes on the second mesh dimension ("tp"), Replicate on the first
        class_mesh_dim = mesh.ndim - 1
        _cross_entropy_cases(mesh, class_mesh_dim, results)
        _linear_cases(mesh, class_mesh_dim, results)
        _errors(mesh, class_mesh_dim, results)
        if shape == (2,):
            _replicated_case(mesh, results)
            _compiled_case(mesh, results)
            _hf_case(mesh, results)
            _fsdp_case(mesh, results)
        dist.barrier()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)
    os._exit(0)


def _run_group(shape, tmp_path):
    world = math.prod(shape)
    spawn_ranks(_worker, (shape, str(tmp_path / "rdzv"), str(tmp_path)), world, tmp_path,
                timeout=400)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def _expected_cross_entropy(case, shape):
    """(loss, input gradient, {entropy, argmax where returned}) of the single process."""
    x, t, kwargs = _cross_entropy_problem(case, shape)
    full = x.clone().requires_grad_(True)
    loss, entropy, argmax = _distributed_backward(
        triton_xent.cross_entropy(full, t, backend="torch", **kwargs))
    extras = {name: v for name, v in (("entropy", entropy), ("argmax", argmax))
              if v is not None}
    return loss, full.grad, extras


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="on a GPU machine the kernels want CUDA tensors; these run on CPU")
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_dtensor_matches_single_process_and_loss_parallel(layout, tmp_path):
    shape = LAYOUTS[layout]
    results = _run_group(shape, tmp_path)
    replicated = f"DTensor{(Replicate(),) * len(shape)}"
    for rank, res in enumerate(results):
        for backend, case, shape_name in _runs(_CROSS_ENTROPY_RUNS, shape):
            what = f"rank {rank} {backend} {case} {shape_name}"
            got = res[(backend, case, shape_name)]
            loss, grad, extras = _expected_cross_entropy(case, shape_name)
            assert got["kind"] == replicated, what
            assert set(got["extras"]) == set(extras), what
            for name, (kind, value) in got["extras"].items():
                assert kind == replicated, (what, name, kind)
                assert_close(value, extras[name], torch.float32, f"{what} {name}")
            # the input's placements; DTensor may keep Shard(-1) as given or normalise it
            class_dims = (-1, 1) if shape_name == "shard_minus_one" else (1,)
            assert got["grad_kind"] in [
                f"DTensor{(Replicate(),) * (len(shape) - 1) + (Shard(d),)}"
                for d in class_dims], (what, got["grad_kind"])
            assert_close(got["loss"], loss, torch.float32, f"{what} loss")
            assert_close(got["grad"], grad, torch.float32, f"{what} grad")
        for case in LOSS_PARALLEL_CASES:
            if ("loss_parallel", case) not in res:
                continue
            theirs, ours = res[("loss_parallel", case)], res[("ours", case)]
            what = f"rank {rank} {case} vs loss_parallel"
            assert ours["kind"] == theirs["kind"], what
            assert ours["grad_kind"] == theirs["grad_kind"], what
            assert_close(ours["loss"], theirs["loss"], torch.float32, f"{what} loss")
            assert_close(ours["grad"], theirs["grad"], torch.float32, f"{what} grad")
        for backend, case in _runs(_LINEAR_RUNS, shape):
            h, w, b, t, kwargs = _linear_problem(case)
            h, w, b = (p.clone().requires_grad_(True) for p in (h, w, b))
            loss, entropy, argmax = _distributed_backward(triton_xent.linear_cross_entropy(
                h, w, t, linear_bias=b, backend="torch", **kwargs))
            extras = {name: v for name, v in (("entropy", entropy), ("argmax", argmax))
                      if v is not None}
            for how in ("colwise", "colwise_dtensor_input", "mesh_head"):
                if (backend, case, how) not in res:
                    continue
                got = res[(backend, case, how)]
                what = f"rank {rank} {backend} {case} {how}"
                assert got["kind"].startswith("DTensor(Replicate()"), what
                assert "Shard(dim=0)" in got["weight_grad_kind"], what
                assert got["grad_kind"] == "Tensor", what  # h, plain (from_local's input)
                assert_close(got["loss"], loss, torch.float32, f"{what} loss")
                assert set(got["extras"]) == set(extras), what
                for name, (kind, value) in got["extras"].items():
                    assert kind.startswith("DTensor(Replicate()"), (what, name, kind)
                    assert_close(value, extras[name], torch.float32, f"{what} {name}")
                assert_close(got["grad"], h.grad, torch.float32, f"{what} d_input")
                assert_close(got["weight_grad"], w.grad, torch.float32, f"{what} d_weight")
                assert_close(got["bias_grad"], b.grad, torch.float32, f"{what} d_bias")
    _check_errors(results, shape)
    if shape == (2,):
        _check_single_layout_cases(results)


def _check_errors(results, shape):
    expected = {
        "partial": "ValueError: input has a Partial placement",
        "batch_shard": "ValueError: input is sharded on its dimension 0",
        "process_group": "ValueError: a DTensor argument brings its own process group",
        "plain_input_dtensor_target": "TypeError: target or weight is a DTensor but input",
        "sharded_target": "ValueError: target must be replicated",
        "probability_target": "ValueError: a DTensor input sharded on its classes takes "
                              "class-index",
        "inplace_backward": "ValueError: inplace_backward is not supported with a DTensor",
        "target_out_of_range": f"IndexError: Target {V} is out of bounds",
        "data_parallel_head": "ValueError: with a process_group every rank passes the same "
                              "(global) targets; they differ between ranks. A DTensor head",
        "data_parallel_hidden": "ValueError: linear_weight is a DTensor sharded by rows, and "
                                "the plain input (hidden states) differs between the ranks",
        "plain_bias": "ValueError: with a DTensor linear_weight, linear_bias must be a DTensor",
        "plain_head_dtensor_input": "TypeError: a DTensor argument needs a DTensor "
                                    "linear_weight",
        "batch_and_class_shards": "ValueError: input is sharded on its dimension 0",
        "classes_on_two_mesh_dims": "ValueError: input shards its class dimension over two",
    }
    for rank, res in enumerate(results):
        for name, start in expected.items():
            if ("error", name) in res:
                assert res[("error", name)].startswith(start), (rank, name, res[("error", name)])
    if shape != (2, 2):
        for rank, res in enumerate(results):
            message = res[("error", "unmappable_mesh")]
            if rank == len(results) - 1 - rank:  # the middle rank: its own shard is right
                assert message.startswith("ValueError: with a process_group every rank must "
                                          "accept its arguments; rank 0 refused them"), message
            else:
                assert message.startswith("ValueError: mesh dimension 0's process group "
                                          "numbers this rank"), message
    # one rank's own error; the others of its group name it (on the 2x2 mesh, ranks 0 and 1
    # share the classes; ranks 2 and 3, another group, have nothing to refuse)
    assert "batch_size" in results[0][("error", "one_rank_refuses")]
    group_size = shape[-1]
    for res in results[1:group_size]:
        assert res[("error", "one_rank_refuses")].startswith(
            "ValueError: with a process_group every rank must accept its arguments; rank 0 "
            "refused them"), res[("error", "one_rank_refuses")]
    for res in results[group_size:]:
        assert res[("error", "one_rank_refuses")] == "no error"
    if shape == (2,):
        for res in results:
            assert "An FSDP2 (fully_shard) head" in res[("error", "data_parallel_head")]
            assert res[("error", "fsdp_head")].startswith(expected["data_parallel_head"]), \
                res[("error", "fsdp_head")]


def _check_single_layout_cases(results):
    x, t, kwargs = _problem("everything")
    loss, grad, _ = _expected_cross_entropy("everything", "2d")
    for rank, res in enumerate(results):
        got = res["replicated"]
        assert got["kind"] == got["grad_kind"] == "DTensor(Replicate(),)", rank
        assert_close(got["loss"], loss, torch.float32, f"rank {rank} replicated loss")
        assert_close(got["grad"], grad, torch.float32, f"rank {rank} replicated grad")
        got = res["return_lse"]
        assert got["kinds"] == ["DTensor(Replicate(),)"] * 2, got["kinds"]
        _, lse = triton_xent.cross_entropy(x, t, return_lse=True, backend="torch", **kwargs)
        assert_close(got["lse"], lse, torch.float32, f"rank {rank} lse")
        got = res["compiled"]
        assert got["kind"] == "DTensor(Replicate(),)"
        assert_close(got["loss"], got["eager"], torch.float32, f"rank {rank} compiled loss")
        assert_close(got["grad"], got["eager_grad"], torch.float32, f"rank {rank} compiled grad")
        assert "DTensor calls are eager-only" in res["compiled_fullgraph"]
        got = res["fsdp"]
        assert got["kinds"] == ["DTensor(Shard(dim=0),)"] * 2, got["kinds"]
        assert_close(got["grads"][1], got["grads"][0], torch.float32,
                     f"rank {rank} gathered FSDP2 head grad")
        if "hf" not in res:
            continue  # transformers is not installed
        got = res["hf_fsdp"]
        assert any("lm_head is wrapped by fully_shard (FSDP2) on its own" in w
                   for w in got["warnings"]), got["warnings"]
        assert_close(got["loss"], res["hf"]["expected"], torch.float32, f"rank {rank} hf fsdp")
        got = res["hf"]
        assert got["kind"] == "Tensor", got["kind"]  # as transformers' own tensor parallelism
        assert_close(got["loss"], got["expected"], torch.float32, f"rank {rank} hf loss")
        assert_close(got["head_grad"], got["expected_head_grad"], torch.float32,
                     f"rank {rank} hf lm_head grad")
        assert_close(got["embed_grad"], got["expected_embed_grad"], torch.float32,
                     f"rank {rank} hf embedding grad")
