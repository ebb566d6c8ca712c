"""A few GRPO-style policy-gradient steps on the character-level model of examples/train_lm.py,
with the per-token log-probabilities and the entropy computed from the hidden states by
triton_xent.linear_cross_entropy: no (tokens, vocab) logits are ever stored.

Run it from the repository root:

    python examples/policy_gradient.py                 # CPU (plain-PyTorch fallback), ~10 s
    python examples/policy_gradient.py --device cuda   # the Triton kernels

Each step
  1. samples --group completions of --completion-len characters from one prompt at
     temperature --temperature (0.8);
  2. scores them with a toy reward: the fraction of vowels among the completion's letters;
     the advantage of a completion is its reward minus the group's mean, over the group's
     standard deviation (GRPO);
  3. computes the loss of the policy from the hidden states in ONE call,
         loss = sum_t row_weight_t * (-log pi(y_t)) + entropy_weight_t * H_t
         row_weight_t = advantage * mask_t / n,  entropy_weight_t = -c * mask_t / n
     (mask_t = 1 on completion tokens, n their number, c = --entropy-coef), at the sampling
     temperature, with reduction="sum": its gradients are computed in the same pass;
  4. computes the same loss the naive way (logits, log_softmax, -(p * log p).sum()) and
     prints the largest differences of the loss and of every parameter's gradient, and the
     bytes that the loss head keeps for backward each way (saved-tensor hooks);
  5. takes an AdamW step with triton_xent's gradients.

A short supervised warm-up (--sft-steps, triton_xent.cross_entropy) first makes the samples
look like text. Exits with status 1 if a loss or gradient differs by more than the
tolerances below.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from train_lm import TinyLM, get_batch, load_text  # noqa: E402  (the demo's model and data)

import triton_xent  # noqa: E402

LOSS_ATOL = 1e-5  # |loss - loss_naive| <= LOSS_ATOL + LOSS_ATOL * |loss_naive|
GRAD_RTOL = 1e-4  # max |g - g_naive| <= GRAD_RTOL * max |g_naive|, over all parameters
VOWELS = set("aeiouAEIOU")


def hidden_states(model: TinyLM, idx: torch.Tensor) -> torch.Tensor:
    """(B, T, D) inputs of the model's head: TinyLM.forward without its last line."""
    x = model.tok(idx) + model.pos(torch.arange(idx.shape[1], device=idx.device))
    for block in model.blocks:
        x = block(x)
    return model.ln(x)


@torch.no_grad()
def sample(model: TinyLM, prompt: torch.Tensor, group: int, length: int, temperature: float,
           seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """(group, P + length) ids: the prompt (P,) and `length` characters drawn at `temperature`."""
    idx = prompt.repeat(group, 1)
    for _ in range(length):
        logits = model(idx[:, -seq_len:])[:, -1].float()
        probs = torch.softmax(logits / temperature, dim=-1).cpu()
        idx = torch.cat([idx, torch.multinomial(probs, 1, generator=gen).to(idx.device)], 1)
    return idx


def vowel_reward(ids: torch.Tensor, chars: list[str]) -> torch.Tensor:
    """(G,) fraction of vowels among the letters of each completion."""
    scores = []
    for row in ids.tolist():
        letters = [chars[i] for i in row if chars[i].isalpha()]
        scores.append(sum(c in VOWELS for c in letters) / max(1, len(letters)))
    return torch.tensor(scores)


class SavedBytes:
    """Bytes of the distinct storages that autograd saves for backward inside the block."""

    def __init__(self):
        self.storages = {}

    def __enter__(self):
        def pack(t):
            self.storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        self.hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def fused_loss(head, h, targets, row_weight, entropy_weight, temperature, backend):
    """The GRPO loss in one linear_cross_entropy call; also the per-token entropy (no grad)."""
    out = triton_xent.linear_cross_entropy(
        h, head.weight, targets, linear_bias=head.bias, reduction="sum",
        temperature=temperature, row_weight=row_weight, entropy_weight=entropy_weight,
        return_entropy=True, backend=backend)
    return out.loss, out.entropy.detach()


def naive_loss(head, h, targets, advantage, mask, n, coef, temperature):
    """The same loss from the (B, T, V) logits, as one would write it in plain PyTorch."""
    logp = torch.log_softmax(head(h).float() / temperature, dim=-1)
    logp_y = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return ((-advantage[:, None] * logp_y - coef * entropy) * mask).sum() / n, entropy.detach()


def memory_at_vocab(vocab: int, h: torch.Tensor, targets, advantage, mask, n, args) -> str:
    """Bytes kept for backward by the two losses on the step's hidden states with a random
    head of `vocab` classes (the demo's own vocabulary is smaller than its hidden size, so
    there the logits are cheap); the step's targets are valid classes of it."""
    head = torch.nn.Linear(h.shape[-1], vocab).to(h.device)
    h = h.detach().requires_grad_(True)
    row_weight = advantage[:, None] * mask / n
    entropy_weight = -args.entropy_coef * mask / n
    found = []
    for name in ("naive", "fused"):
        if h.is_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if h.is_cuda else 0
        with SavedBytes() as saved:
            if name == "naive":
                loss, _ = naive_loss(head, h, targets, advantage, mask, n, args.entropy_coef,
                                     args.temperature)
            else:
                loss, _ = fused_loss(head, h, targets, row_weight, entropy_weight,
                                     args.temperature, args.backend)
        peak = (f", peak {(torch.cuda.max_memory_allocated() - base) / 2**20:.0f} MiB"
                if h.is_cuda else "")
        loss.backward()
        found.append(f"{name} {saved.total / 2**20:.1f} MiB saved{peak}")
        del loss
    return ", ".join(found)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto")
    p.add_argument("--steps", type=int, default=4, help="policy-gradient steps")
    p.add_argument("--sft-steps", type=int, default=60, help="supervised warm-up steps")
    p.add_argument("--group", type=int, default=16, help="completions per prompt (G)")
    p.add_argument("--completion-len", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--entropy-coef", type=float, default=0.01)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: default)")
    p.add_argument("--memory-vocab", type=int, default=32000,
                   help="vocabulary of the random head for the memory comparison")
    args = p.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t_start = time.perf_counter()

    data, chars = load_text()
    vocab = len(chars)
    model = TinyLM(vocab, args.seq_len).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    for _ in range(args.sft_steps):  # supervised warm-up: next-character prediction
        x, y = get_batch(data, 32, args.seq_len, gen)
        loss = triton_xent.cross_entropy(model(x.to(device)).view(-1, vocab),
                                         y.to(device).view(-1), backend=args.backend)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    print(f"vocab {vocab}, {sum(q.numel() for q in model.parameters()):,} parameters, "
          f"device {device}; after {args.sft_steps} supervised steps the loss is "
          f"{loss.item():.3f}")

    prompt = torch.tensor([chars.index(c) for c in "\nROMEO:\n"], device=device)
    P = prompt.numel()
    ok_all = True
    for step in range(1, args.steps + 1):
        model.eval()
        seqs = sample(model, prompt, args.group, args.completion_len, args.temperature,
                      args.seq_len, gen)  # (G, P + L)
        model.train()
        rewards = vowel_reward(seqs[:, P:], chars).to(device)
        advantage = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
        inputs, targets = seqs[:, :-1], seqs[:, 1:].clone()  # position t predicts t + 1
        mask = (torch.arange(targets.shape[1], device=device) >= P - 1).float()
        mask = mask.expand_as(targets)  # 1 on completion tokens
        targets[mask == 0] = -100  # the prompt's tokens: ignored, never computed
        n = mask.sum()
        row_weight = advantage[:, None] * mask / n
        entropy_weight = -args.entropy_coef * mask / n

        # triton_xent: one call from the hidden states
        h = hidden_states(model, inputs)
        with SavedBytes() as ours_saved:
            loss, entropy = fused_loss(model.head, h, targets, row_weight, entropy_weight,
                                       args.temperature, args.backend)
        model.zero_grad(set_to_none=True)
        loss.backward()
        grads = [q.grad.clone() for q in model.parameters()]

        # naive: the same loss from the logits, on the same hidden states' graph rebuilt
        model.zero_grad(set_to_none=True)
        h = hidden_states(model, inputs)
        with SavedBytes() as naive_saved:
            ref_loss, ref_entropy = naive_loss(model.head, h, targets, advantage, mask, n,
                                               args.entropy_coef, args.temperature)
        ref_loss.backward()
        ref_grads = [q.grad for q in model.parameters()]

        d_loss = (loss.detach() - ref_loss.detach()).abs().item()
        d_grad = max((g - r).abs().max().item() for g, r in zip(grads, ref_grads))
        g_scale = max(r.abs().max().item() for r in ref_grads)
        d_entropy = ((entropy - ref_entropy) * mask).abs().max().item()
        ok = (d_loss <= LOSS_ATOL * (1 + abs(ref_loss.item())) and d_grad <= GRAD_RTOL * g_scale
              and d_entropy <= 1e-4)
        ok_all &= ok
        mean_entropy = ((entropy * mask).sum() / n).item()
        print(f"step {step}: reward {rewards.mean().item():.3f} (vowels/letters), policy "
              f"entropy {mean_entropy:.3f} nats, loss {loss.item():+.5f} | vs naive: "
              f"|dloss| {d_loss:.1e}, max|dgrad| {d_grad:.1e} (max|grad| {g_scale:.1e}), "
              f"max|dH| {d_entropy:.1e} {'ok' if ok else 'MISMATCH'} | saved for backward "
              f"by the loss head: {ours_saved.total / 1024:.0f} KiB vs naive "
              f"{naive_saved.total / 1024:.0f} KiB")
        for q, g in zip(model.parameters(), grads):
            q.grad = g
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    B, T = targets.shape
    print(f"memory: the naive head keeps (B, T, V) = ({B}, {T}, {vocab}) float32 tensors for "
          f"backward ({B * T * vocab * 4 / 1024:.0f} KiB each); linear_cross_entropy keeps the "
          f"input and head gradients it computed in forward (here larger: V = {vocab} is "
          f"below the hidden size {h.shape[-1]}) and references to its inputs, from which "
          f"the returned entropy's gradient is recomputed")
    print(f"memory with a {args.memory_vocab}-class head on the same hidden states "
          f"(counted as above): "
          f"{memory_at_vocab(args.memory_vocab, h, targets, advantage, mask, n, args)}")
    seconds = time.perf_counter() - t_start
    status = "OK" if ok_all else "FAIL"
    print(f"{status}: {args.steps} GRPO steps on {device} in {seconds:.1f} s; loss, "
          f"gradients and entropy {'agree' if ok_all else 'DISAGREE'} with the naive "
          f"logits-based computation")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
