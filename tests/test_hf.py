"""triton_xent.integrations.hf: a patched transformers causal LM gives the loss and parameter
gradients of the unpatched model (float32, tight tolerance) without computing the logits, for
every supported family; the paths that need logits, unpatching, and the optional import.

Models are tiny and randomly initialised from config objects (no download): 2 layers,
hidden 32, vocab 301 (odd: no block divides it), sequences of 11 tokens (odd too)."""

import contextlib
import copy
import inspect
import io
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="4.50")

from triton_xent.integrations.hf import (  # noqa: E402
    SUPPORTED_MODELS, is_patched, patch_causal_lm, unpatch_causal_lm)

V, B, T = 301, 2, 11
# Float32 both ways. The loss to 1e-5 relative; each gradient tensor to 1e-5 of its largest
# element (measured: at most 1e-6 here), as the sums over rows and classes run in another
# order (the head's GEMMs are chunked) and small elements carry the larger elements' rounding.
TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_RTOL = 1e-5
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
HEAD_DIM = dict(head_dim=8)  # the Gemma configs default to 256

# family -> (config class, model class, config options beyond SMALL). Gemma-2/3's cap is 2,
# well inside the range of their logits (see _model and test_final_logit_softcap_is_applied).
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", HEAD_DIM),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", HEAD_DIM),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(HEAD_DIM, final_logit_softcapping=2.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(HEAD_DIM, final_logit_softcapping=2.0)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM",  # its special tokens default to 32000 > V
             dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)),
}


def _model(family="llama", seed=0, **overrides):
    """A tiny randomly initialised model in train mode (no dropout in these configs), its head
    scaled so that logits are of size 3 and more (Gemma scales its embeddings, tied to the
    head, by sqrt(hidden)): peaked softmaxes, not near-uniform ones."""
    config_name, model_name, extra = FAMILIES[family]
    if not hasattr(transformers, model_name):
        pytest.skip(f"transformers {transformers.__version__} has no {model_name}")
    config = getattr(transformers, config_name)(**{**SMALL, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(25.0)  # 0.02-scale init: logits ~0.1 otherwise
    return model.train()


def _batch(seed=0):
    """input_ids (B, T) and labels with some -100: a prompt prefix and a padded tail."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # prompt tokens
    labels[1, -3:] = -100  # padding
    labels[1, 0] = 0  # class 0 and V - 1 as targets
    labels[0, 5] = V - 1
    return ids, labels


def _loss_and_grads(model, *args, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(*args, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@contextlib.contextmanager
def _head_calls(model):
    """A list that grows by one each time lm_head runs (the logits are computed). A global
    hook: one on lm_head itself would make the patch fall back (see test_hooked_head)."""
    calls = []
    hook = lambda module, *_: calls.append(1) if module is model.lm_head else None  # noqa: E731
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def _assert_same(out, grads, ref_out, ref_grads):
    torch.testing.assert_close(out.loss, ref_out.loss, **TOL)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        scale = ref_grads[name].abs().max().item()
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=GRAD_RTOL,
                                   atol=GRAD_RTOL * scale, msg=name)


# --- the loss and gradients are the model's own ---------------------------------------------

@pytest.mark.parametrize("num_items", [None, "tensor", "int"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_loss_and_grads_match_unpatched(family, num_items):
    # num_items_in_batch: the Trainer's count of target tokens over all accumulated
    # micro-batches; 23 here, more than this batch's 14, as in gradient accumulation.
    model = _model(family)
    ids, labels = _batch()
    kwargs = {}
    if num_items is not None:
        kwargs["num_items_in_batch"] = torch.tensor(23) if num_items == "tensor" else 23
    ref_out, ref_grads = _loss_and_grads(model, ids, labels=labels, **kwargs)
    assert ref_out.logits is not None

    patch_causal_lm(model)
    with _head_calls(model) as calls:
        out, grads = _loss_and_grads(model, ids, labels=labels, **kwargs)
    assert out.logits is None and not calls  # lm_head never ran: no logits
    assert out.loss.dtype == torch.float32
    _assert_same(out, grads, ref_out, ref_grads)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_padding_checkpointing_and_tied_head_match_unpatched(family, tied):
    """A left-padded batch (attention_mask, padding labelled -100), gradient checkpointing
    on, and the head tied to the input embeddings or not: the tied embedding's gradient is
    the sum of its two uses, as in the unpatched model."""
    model = _model(family, tie_word_embeddings=tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    enable = getattr(model, "activation_checkpointing_enable", None)  # its newer name
    (enable or model.gradient_checkpointing_enable)()
    ids, labels = _batch()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding of the second row
    labels[1, :3] = -100
    ref_out, ref_grads = _loss_and_grads(model, ids, labels=labels, attention_mask=mask)
    patch_causal_lm(model)
    with _head_calls(model) as calls:
        out, grads = _loss_and_grads(model, ids, labels=labels, attention_mask=mask)
    assert out.logits is None and not calls
    _assert_same(out, grads, ref_out, ref_grads)


def test_num_items_in_batch_divides_the_sum():
    # Independent of transformers: sum over the 14 counted targets / 23 == mean * 14 / 23.
    model = patch_causal_lm(_model())
    ids, labels = _batch()
    n = int((labels[:, 1:] != -100).sum())
    mean = model(ids, labels=labels).loss
    summed = model(ids, labels=labels, num_items_in_batch=torch.tensor(23)).loss
    torch.testing.assert_close(summed, mean * n / 23, **TOL)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_final_logit_softcap_is_applied(family):
    # The cap must bend these logits (else the parity test above could not see it) ...
    model = _model(family)
    ids, labels = _batch()
    with torch.no_grad():
        logits = model.model(ids).last_hidden_state @ model.lm_head.weight.T
    assert logits.abs().max() > 2 * model.config.final_logit_softcapping
    # ... and the patch reads it from the config at every call.
    patch_causal_lm(model)
    capped = model(ids, labels=labels).loss
    model.config.final_logit_softcapping = None
    uncapped = model(ids, labels=labels).loss
    unpatch_causal_lm(model)
    torch.testing.assert_close(uncapped, model(ids, labels=labels).loss, **TOL)
    assert (capped - uncapped).abs() > 1e-2


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_backend_option(backend):
    # "torch": the plain-PyTorch chunked path; "auto": the kernels under TRITON_INTERPRET=1.
    model = _model()
    ids, labels = _batch()
    ref_out, ref_grads = _loss_and_grads(model, ids, labels=labels)
    patch_causal_lm(model, backend=backend, chunk_size=5)  # 22 rows -> chunks of 5
    out, grads = _loss_and_grads(model, ids, labels=labels)
    _assert_same(out, grads, ref_out, ref_grads)


def test_shift_labels_keyword():
    # Targets given already shifted (as with context parallelism) are used as they are.
    model = _model("qwen2")
    ids, labels = _batch()
    shift = torch.roll(labels, -1, dims=1)
    shift[:, -1] = -100
    shift[0, 2] = 7  # differs from the shifted labels: the keyword must win
    ref_out, ref_grads = _loss_and_grads(model, ids, labels=labels, shift_labels=shift)
    patch_causal_lm(model)
    out, grads = _loss_and_grads(model, ids, labels=labels, shift_labels=shift)
    _assert_same(out, grads, ref_out, ref_grads)


def test_inputs_passed_by_position_and_keyword():
    # labels is forward's 6th parameter; attention_mask with padding goes to the base model.
    model = _model()
    ids, labels = _batch()
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    ref_out, ref_grads = _loss_and_grads(model, ids, mask, None, None, None, labels)
    patch_causal_lm(model)
    out, grads = _loss_and_grads(model, ids, mask, None, None, None, labels)
    _assert_same(out, grads, ref_out, ref_grads)
    out, grads = _loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    _assert_same(out, grads, ref_out, ref_grads)


def test_every_target_ignored():
    # As transformers: "mean" over no rows is NaN; the sum over none divided by n is 0.
    model = _model()
    ids, _ = _batch()
    labels = torch.full_like(ids, -100)
    ref = model(ids, labels=labels)
    ref_n = model(ids, labels=labels, num_items_in_batch=torch.tensor(5))
    patch_causal_lm(model)
    assert math.isnan(ref.loss.item()) and math.isnan(model(ids, labels=labels).loss.item())
    got = model(ids, labels=labels, num_items_in_batch=torch.tensor(5)).loss
    assert got.item() == ref_n.loss.item() == 0.0


def test_autocast_bfloat16(monkeypatch):
    # Under autocast linear_cross_entropy runs the head in bfloat16, as lm_head does, and
    # returns a float32 loss, as transformers' (the float32-upcast logits): the loss agrees
    # to float32 rounding of the same bf16 logits, the gradients to bf16 rounding (2e-2).
    from triton_xent.integrations import hf

    seen = []

    def spy(x, w, *args, **kwargs):
        loss = hf_linear_cross_entropy(x, w, *args, **kwargs)
        seen.append((x.dtype, torch.is_autocast_enabled("cpu"), loss.dtype))
        return loss

    hf_linear_cross_entropy = hf.linear_cross_entropy
    monkeypatch.setattr(hf, "linear_cross_entropy", spy)
    model = _model()
    ids, labels = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_out, ref_grads = _loss_and_grads(model, ids, labels=labels)
        patch_causal_lm(model)
        out, grads = _loss_and_grads(model, ids, labels=labels)
    assert seen == [(torch.float32, True, torch.float32)]
    assert out.loss.dtype == ref_out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=1e-5, atol=1e-5)
    for name in ref_grads:  # bf16 logits and gradients both ways, rounded differently
        scale = ref_grads[name].abs().max().item()
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=2e-2 * scale,
                                   msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_model_with_num_items_in_batch(dtype):
    """A model cast to float16 / bfloat16, 8192 target tokens at a loss near 10: their sum
    (over 65504) does not fit in float16, transformers' float32 loss does, and so must ours.
    The value agrees to the rounding of a half-precision mean (2^-8 relative in bfloat16)
    and of half-precision logits."""
    rows, n_pos = 64, 129
    model = _model(max_position_embeddings=n_pos).to(dtype)
    ids = torch.randint(0, V, (rows, n_pos), generator=torch.Generator().manual_seed(7))
    num_items = torch.tensor(rows * (n_pos - 1))
    ref = model(ids, labels=ids, num_items_in_batch=num_items).loss
    assert ref.dtype == torch.float32 and 6.0 < ref.item() < 20.0
    patch_causal_lm(model, backend="torch")  # 8192 rows: the interpreter would take ~25 s
    got = model(ids, labels=ids, num_items_in_batch=num_items).loss
    assert got.dtype == torch.float32 and math.isfinite(got.item())
    torch.testing.assert_close(got, ref, rtol=2 ** -8, atol=0.0)


def test_the_cache_is_passed_on_under_this_transformers_name():
    model = _model()
    ids, labels = _batch()
    ref = model(ids, labels=labels, use_cache=True)
    patch_causal_lm(model)
    out = model(ids, labels=labels, use_cache=True)
    names = set(ref.keys()) - {"loss", "logits"}
    assert names and set(out.keys()) - {"loss"} == names
    for name in names:  # the same kind of object: a Cache, or tuples of tensors
        assert type(out[name]) is type(ref[name]), name


def test_return_dict_false_gives_a_tuple_with_the_loss_first():
    model = _model()
    ids, labels = _batch()
    ref = model(ids, labels=labels, return_dict=False)
    patch_causal_lm(model)
    out = model(ids, labels=labels, return_dict=False, use_cache=False)
    assert isinstance(out, tuple) and len(out) == 1  # (loss,): no logits, no cache
    torch.testing.assert_close(out[0], ref[0], **TOL)


# --- where logits are needed, the original forward runs -------------------------------------

def test_without_labels_the_forward_is_unchanged():
    model = _model("gemma2")
    ids, _ = _batch()
    ref = model(ids).logits
    patch_causal_lm(model)
    with _head_calls(model) as calls:
        out = model(ids)
    assert calls and out.loss is None
    assert torch.equal(out.logits, ref)
    model.eval()
    ref_gen = model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    unpatch_causal_lm(model)
    assert torch.equal(ref_gen, model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False))


def test_skip_logits_and_eval_mode():
    model = _model()
    ids, labels = _batch()
    ref = model(ids, labels=labels)
    patch_causal_lm(model)
    with _head_calls(model) as calls:
        # train mode, skip_logits=False: logits as usual
        out = model(ids, labels=labels, skip_logits=False)
        assert len(calls) == 1 and torch.equal(out.logits, ref.logits)
        torch.testing.assert_close(out.loss, ref.loss, **TOL)
        # eval mode: logits as usual (evaluation metrics need them), unless skip_logits=True
        model.eval()
        out = model(ids, labels=labels)
        assert len(calls) == 2 and out.logits is not None
        out = model(ids, labels=labels, skip_logits=True)
        assert len(calls) == 2 and out.logits is None
        torch.testing.assert_close(out.loss, ref.loss, **TOL)
    # logits_to_keep (generation) is the original forward's business
    model.train()
    assert model(ids, logits_to_keep=1).logits.shape == (B, 1, V)
    with pytest.raises(ValueError, match="labels are None"):
        model(ids, skip_logits=True)


def test_custom_loss_function_falls_back_with_a_warning():
    model = _model()
    ids, labels = _batch()
    model.loss_function = lambda logits, labels, vocab_size, **kw: logits.float().square().mean()
    ref = model(ids, labels=labels).loss
    patch_causal_lm(model)
    with pytest.warns(UserWarning, match="loss_function"):
        out = model(ids, labels=labels)
    assert out.logits is not None and torch.equal(out.loss, ref)
    with pytest.raises(ValueError, match="loss_function"):
        model(ids, labels=labels, skip_logits=True)


def test_hooked_head_falls_back_with_a_warning():
    # A hook on lm_head (FSDP's unshard, accelerate's offload, a probe) expects lm_head to
    # run: the patch cannot honour it, so the original forward runs.
    model = _model()
    ids, labels = _batch()
    ref = model(ids, labels=labels)
    seen = []
    model.lm_head.register_forward_pre_hook(lambda *_: seen.append(1))
    patch_causal_lm(model)
    with pytest.warns(UserWarning, match="lm_head has forward hooks"):
        out = model(ids, labels=labels)
    assert seen == [1] and torch.equal(out.loss, ref.loss)


# --- patching and unpatching -----------------------------------------------------------------

def test_unpatch_restores_the_original_forward():
    model = _model()
    ids, labels = _batch()
    ref = model(ids, labels=labels)
    cls_forward = type(model).forward
    assert patch_causal_lm(model) is model and is_patched(model)
    assert model(ids, labels=labels).logits is None
    assert unpatch_causal_lm(model) is model and not is_patched(model)
    assert "forward" not in model.__dict__ and model.forward.__func__ is cls_forward
    out = model(ids, labels=labels)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)
    unpatch_causal_lm(model)  # a no-op on an unpatched model


def test_patch_twice_and_an_earlier_instance_forward():
    # A forward set on the instance before patching (accelerate does this) is what the
    # fallback calls and what unpatch restores, also after patching twice.
    model = _model()
    ids, labels = _batch()
    seen = []
    inner = model.forward

    def earlier(*args, **kwargs):
        seen.append(1)
        return inner(*args, **kwargs)

    model.forward = earlier
    patch_causal_lm(model, chunk_size=3)
    patch_causal_lm(model, chunk_size=4)
    assert model._triton_xent_patch.options["chunk_size"] == 4
    assert model(ids, labels=labels).logits is None and not seen
    assert model(ids).logits is not None and seen == [1]
    unpatch_causal_lm(model)
    assert model.forward is earlier


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_copy_is_patched_on_itself(how):
    model = patch_causal_lm(_model())
    ids, labels = _batch()
    if how == "deepcopy":
        twin = copy.deepcopy(model)
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)
    assert is_patched(twin) and twin.forward.__self__ is twin
    with torch.no_grad():
        twin.lm_head.weight.mul_(2.0)  # twin's loss must come from twin's head
    out = twin(ids, labels=labels)
    assert out.logits is None and out.loss != model(ids, labels=labels).loss
    unpatch_causal_lm(twin)
    assert is_patched(model) and model(ids, labels=labels).logits is None


def test_forward_keeps_its_signature_for_the_trainer():
    # The Trainer passes num_items_in_batch only to a forward that takes **kwargs.
    model = _model()
    before = inspect.signature(model.forward)
    patch_causal_lm(model)
    assert inspect.signature(model.forward) == before
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in before.parameters.values())


def test_unsupported_models_are_refused():
    class Overrides(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    config = transformers.LlamaConfig(**SMALL)
    with pytest.raises(TypeError, match="overrides its forward"):
        patch_causal_lm(Overrides(config))
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        patch_causal_lm(torch.nn.Linear(2, 2))
    assert "LlamaForCausalLM" in SUPPORTED_MODELS


def test_a_plain_subclass_is_accepted():
    class Mine(transformers.LlamaForCausalLM):
        pass

    torch.manual_seed(0)
    model = Mine(transformers.LlamaConfig(**SMALL)).train()
    ids, labels = _batch()
    ref = model(ids, labels=labels).loss
    torch.testing.assert_close(patch_causal_lm(model)(ids, labels=labels).loss, ref, **TOL)


def test_trainer_with_gradient_accumulation(tmp_path):
    # The Trainer passes num_items_in_batch (the target tokens of both micro-batches) to a
    # forward that takes **kwargs; micro-batches with different counts make a loss averaged
    # per micro-batch differ. SGD without gradient clipping: the parameters follow the
    # gradients linearly, so a wrong scale shows as well as a wrong weighting.
    pytest.importorskip("accelerate")  # the Trainer needs it; not a dependency of ours
    from torch.utils.data import Dataset

    class Windows(Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(1)
            self.ids = torch.randint(0, V, (8, T), generator=g)
            self.labels = self.ids.clone()
            for i in range(8):
                self.labels[i, : i + 1] = -100  # 9, 8, ..., 2 targets: uneven micro-batches

        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.labels[i]}

    def train(patched):
        model = _model()
        if patched:
            patch_causal_lm(model)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), per_device_train_batch_size=2,
            gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-2, optim="sgd",
            lr_scheduler_type="constant", report_to=[], save_strategy="no", use_cpu=True,
            max_grad_norm=0.0, dataloader_num_workers=0, disable_tqdm=True, seed=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Windows())
        assert trainer.model_accepts_loss_kwargs
        with _head_calls(model) as calls:
            trainer.train()
        return model, calls

    ref, ref_calls = train(patched=False)
    got, calls = train(patched=True)
    assert ref_calls and not calls
    for (name, p), q in zip(got.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


# --- transformers stays optional -------------------------------------------------------------

def _python(code):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=120)


def test_importing_triton_xent_does_not_import_transformers():
    r = _python("""
        import sys, triton_xent, triton_xent.integrations
        assert "transformers" not in sys.modules, "transformers was imported"
    """)
    assert r.returncode == 0, r.stderr


def test_import_without_transformers_says_how_to_install():
    r = _python("""
        import sys
        sys.modules["transformers"] = None  # as if it were not installed
        try:
            import triton_xent.integrations.hf
        except ImportError as e:
            print(e)
        else:
            raise SystemExit("imported without transformers")
    """)
    assert r.returncode == 0, r.stderr
    assert "pip install" in r.stdout and "triton_xent[hf]" in r.stdout and ">= 4.50" in r.stdout


# --- torch.compile ---------------------------------------------------------------------------

def _train(model, step_fn, lengths, lr=1e-2):
    """SGD steps on batches of the given sequence lengths; the losses."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for i, length in enumerate(lengths):
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(0, V, (B, length), generator=g)
        labels = ids.clone()
        labels[0, :2] = -100
        opt.zero_grad(set_to_none=True)
        loss = step_fn(ids, labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses


def _assert_trained_alike(model, losses, ref, ref_losses):
    # Each parameter to 1e-5 of its largest element, as the gradients in _assert_same.
    for a, b in zip(losses, ref_losses, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=GRAD_RTOL, atol=GRAD_RTOL * q.abs().max().item(),
                                   msg=name)


# One layer (compiling is slow on CPU: tracing scales with depth); lengths 7, 11, 9.
COMPILE_LAYERS, LENGTHS = dict(num_hidden_layers=1), (7, 11, 9)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_compiled_patched_model_trains_as_the_unpatched_one(family):
    """torch.compile(patch_causal_lm(model), fullgraph=True, dynamic=True), three SGD steps on
    changing sequence lengths: one graph, no break, and the losses and parameters of the
    unpatched model trained alike. Dynamo's "eager" backend runs the captured graph as it
    is (what fullgraph and the graph count are about); the next test adds AOT autograd."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    ref = _model(family, **COMPILE_LAYERS)
    model = patch_causal_lm(copy.deepcopy(ref), backend="torch")
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="eager")
    losses = _train(model, lambda ids, labels: compiled(ids, labels=labels), LENGTHS)
    ref_losses = _train(ref, lambda ids, labels: ref(ids, labels=labels), LENGTHS)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"]
    _assert_trained_alike(model, losses, ref, ref_losses)


def test_compiled_patched_llama_matches_the_compiled_unpatched_one():
    # The patched model through AOT autograd (its backward compiled too), the unpatched one
    # through Dynamo's graph capture (the cheaper compile: CI time), both with fullgraph.
    torch._dynamo.reset()
    ref = _model("llama", **COMPILE_LAYERS)
    model = patch_causal_lm(copy.deepcopy(ref), backend="torch")
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    compiled_ref = torch.compile(ref, fullgraph=True, dynamic=True, backend="eager")
    losses = _train(model, lambda ids, labels: compiled(ids, labels=labels), LENGTHS[:2])
    ref_losses = _train(ref, lambda ids, labels: compiled_ref(ids, labels=labels), LENGTHS[:2])
    _assert_trained_alike(model, losses, ref, ref_losses)
