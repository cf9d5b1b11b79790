"""gpt.py - a character-level GPT, written out in one file you can read top to bottom.

It learns to write Shakespeare one character at a time with a decoder-only Transformer:
causal self-attention with rotary positions, RMSNorm, QK-norm, token shift and capped logits,
trained with Muon and AdamW on a warmup-stable-decay schedule, and sampled with a KV
cache. Each modern choice is one constant below; flip them all back, with mlp_ratio = 4, and
you have GPT-2 (2019).

    pip install -r requirements.txt
    python gpt.py                           # train ~5 minutes on a laptop CPU, then write
    python gpt.py --n_layer=6 --n_embd=192  # any constant below can be overridden like this
    python gpt.py --infer --prompt="ROMEO:" --num_chars=1000   # sample from the checkpoint
    python gpt.py --resume                  # continue from the best checkpoint
    torchrun --nproc_per_node=2 gpt.py      # data-parallel over 2 processes (GPUs or CPU)
    python gpt.py --help                    # every constant with its value and comment
    main(n_layer=2)                         # in a notebook, after pasting this file in a cell

You should see progress lines with an ETA, the losses and a one-line sample at every
evaluation, a loss curve, the loss over the whole validation split, then a sample.

Shapes in the comments: B = batch, T = time (sequence length), C = channels (n_embd),
nh = number of heads, hs = head size (C // nh), V = vocabulary size, L = length of the
keys (T, or the cached length plus T while sampling).
"""

import linecache
import math
import os
import re
import sys
import tempfile
import time
from contextlib import nullcontext
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Hyperparameters (edit them here, or override one run: --name=value)
# data
input_file = "input.txt"  # any UTF-8 text; Tiny Shakespeare by default
val_fraction = 0.1  # the last 10% of the text is held out (a fraction: the text is one stream)
# model
n_layer = 4  # number of Transformer blocks
n_head = 4  # attention heads per block; each head sees n_embd // n_head channels
n_embd = 128  # width of the residual stream
mlp_ratio = 3  # the MLP widens to mlp_ratio * n_embd; GPT-2's 4 gets fewer steps into 5 minutes
block_size = 128  # context length: how many previous characters the model can see
dropout = 0.0  # small models trained for minutes underfit, so dropout only slows them down
use_sdpa = True  # fused F.scaled_dot_product_attention; False runs the hand-written attention
mlp = "gelu"  # GPT-2's GELU; "relu2" (ReLU squared, vit.py's choice) did worse here
# the modern recipe: these six, and optimizer and schedule below, at the value in brackets: GPT-2
rope = True  # rotary positions: relative, nothing to learn [False: a learned vector per position]
norm = "rms"  # RMSNorm: scale only, no mean to subtract ["layer": LayerNorm]
qk_norm = True  # normalise queries and keys per head: bounded scores, higher rates [False]
tie_weights = False  # untied, zero-initialised output layers [True: head shares the embedding]
token_shift = True  # half of each block's input comes from the position before [False: none]
softcap = 30.0  # squash the logits smoothly into (-softcap, softcap): none runs away [0: off]
# optimisation
optimizer = "muon"  # Muon for the hidden matrices, AdamW for the rest ["adamw": AdamW for all]
batch_size = 16  # sequences per micro-step (per process under torchrun)
grad_accum = 1  # micro-steps per optimizer step; batch_size * grad_accum sequences per step
learning_rate = 8e-3  # AdamW's peak learning rate; tiny models tolerate a high one
muon_lr = 0.03  # Muon's peak learning rate (its updates are orthogonalised: another scale)
min_lr = 6e-4  # the schedule ends at this (under 1/10 of the peak); Muon's at the same fraction
schedule = "wsd"  # warmup, stable at the peak, then a linear decay ["cosine": GPT-2's]
decay_fraction = 0.4  # wsd: the last 40% of training decays to min_lr
warmup_iters = 100  # linear warmup steps: Adam's statistics are poor for the first steps
weight_decay = 0.1  # AdamW's decay, on 2-D weights only (matmuls, embeddings), not norm gains
beta2 = 0.99  # Adam's second-moment decay; 0.99 suits small batches better than 0.999
grad_clip = 1.0  # clip the global gradient norm to this (0 = off)
train_seconds = 270.0  # wall-clock training budget; the schedule runs over it (0 = max_iters)
max_iters = 5000  # optimizer steps, used when train_seconds = 0
# evaluation and logging
eval_interval = 500  # estimate train/val loss, print a sample line, maybe save: every N steps
eval_iters = 20  # batches per loss estimate while training (the final one reads the whole split)
log_interval = 100  # print a progress line every this many steps
# sampling
prompt = "\n"  # text the sample starts from
num_chars = 500  # characters to generate
temperature = 0.8  # < 1 sharpens the distribution, > 1 flattens it, 0 = greedy
top_k = 0  # sample only from the k most likely characters (0 = off)
top_p = 1.0  # sample from the smallest set whose probability reaches p (1.0 = off)
sample_seed = 42  # seed for sampling, so the same checkpoint writes the same text
use_cache = True  # KV cache: each new character costs one position; False recomputes (same text)
# system
checkpoint = "out/gpt.pt"  # the best model is saved here; an earlier file is kept as gpt.1.pt
resume = False  # continue training from `checkpoint`
infer = False  # load `checkpoint` and write a sample from `prompt`, without training
device = "auto"  # auto = cuda, then mps, then cpu; or name one
dtype = "auto"  # auto = bfloat16 on CUDA (float16 if unsupported), float32 elsewhere
compile = False  # torch.compile the model: faster steps after a slow first one
seed = 1337  # seed for initialisation and batches
# -----------------------------------------------------------------------------
# Data and tokenizer

class Tokenizer:
    """Characters to integers and back: the vocabulary is every character the text contains."""

    def __init__(self, chars):
        self.chars = chars
        self.stoi = {ch: i for i, ch in enumerate(chars)}

    def encode(self, text):
        unknown = sorted(set(text) - set(self.stoi))
        if unknown:
            raise UserError(f"the model has never seen the character(s) {''.join(unknown)!r}; "
                            f"use only these: {''.join(self.chars)!r}")
        return [self.stoi[ch] for ch in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

def read_data(cfg, chars=None):
    """The text as (tokenizer, {"train": ids, "val": ids}); `chars`: a checkpoint's vocabulary."""
    try:
        with open(cfg.input_file, encoding="utf-8") as f:
            text = f.read()
    except (FileNotFoundError, IsADirectoryError):
        raise UserError(f"input file {cfg.input_file!r} not found; pass a UTF-8 text with "
                        f"--input_file=PATH (run from the folder that holds input.txt)") from None
    except UnicodeDecodeError:
        raise UserError(f"input file {cfg.input_file!r} is not UTF-8 text") from None
    tokenizer = Tokenizer(chars or sorted(set(text)))
    data = torch.tensor(tokenizer.encode(text), dtype=torch.long)  # (N,)
    n_train = int(len(data) * (1 - cfg.val_fraction))  # the first 90% trains, as nanoGPT splits it
    splits = {"train": data[:n_train], "val": data[n_train:]}
    if min(len(s) for s in splits.values()) <= cfg.block_size:
        raise UserError(f"{cfg.input_file!r} is too short for --block_size={cfg.block_size} and "
                        f"--val_fraction={cfg.val_fraction}; use more text or smaller values")
    return tokenizer, splits

def get_batch(data, block_size, batch_size, generator, rank=0, world=1):
    """batch_size random windows of the text: x is the input, y the same window shifted by one.
    Under torchrun each process keeps its share of one draw: one random state for all of them."""
    ix = torch.randint(len(data) - block_size, (world * batch_size,), generator=generator)
    ix = ix[rank::world]  # (B,)
    offsets = torch.arange(block_size)  # (T,)
    x = data[ix[:, None] + offsets]  # (B, T)
    y = data[ix[:, None] + offsets + 1]  # (B, T), the next character at every position
    return x, y

# -----------------------------------------------------------------------------
# Model

def make_norm(kind, size):
    """RMSNorm divides by the root mean square; LayerNorm also subtracts the mean first."""
    return nn.RMSNorm(size) if kind == "rms" else nn.LayerNorm(size, bias=False)

def rotary_angles(positions, head_size, base=10000.0):
    """Rotary positions: channel pair i of a query or key at position m is turned by the angle
    m * base^(-2i/hs). A query at m and a key at n then meet at angle m - n: their score depends
    only on the distance, and attention knows where each key is without a learned vector.
    Returns the cos and sin of those angles, (T, hs/2) each, shared by all blocks."""
    speeds = base ** (-torch.arange(0, head_size, 2, device=positions.device) / head_size)
    angles = positions[:, None].float() * speeds[None, :]  # (T, hs/2)
    return angles.cos(), angles.sin()

def rotate(x, cos, sin):
    """Turn each channel pair (x1[i], x2[i]) of x (B, nh, T, hs) by its angle."""
    x1, x2 = x.chunk(2, dim=-1)  # 2 x (B, nh, T, hs/2)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).type_as(x)  # (B, nh, T, hs)

class CausalSelfAttention(nn.Module):
    """Every position looks at itself and the positions before it, through n_head heads at once."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        hs = config.n_embd // config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)  # q, k, v in one matmul
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)  # heads back to the stream
        self.q_norm = make_norm(config.norm, hs) if config.qk_norm else nn.Identity()
        self.k_norm = make_norm(config.norm, hs) if config.qk_norm else nn.Identity()
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, turn, cache=None):
        B, T, C = x.shape
        nh, hs = self.config.n_head, C // self.config.n_head
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q = self.q_norm(q.view(B, T, nh, hs)).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_norm(k.view(B, T, nh, hs)).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        if turn is not None:  # rotary positions enter here, in q and k only (one call for both)
            q, k = rotate(torch.stack([q, k]), *turn)  # 2 x (B, nh, T, hs)
        if cache is not None:  # sampling: prepend the keys and values of the earlier positions
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)  # (B, nh, L, hs)
                v = torch.cat([cache["v"], v], dim=2)  # (B, nh, L, hs)
            cache["k"], cache["v"] = k, v
        L = k.size(2)
        # The causal mask, True = may attend: query t sits at key position L - T + t and sees keys
        # 0 .. L - T + t. A single new query (sampling with the cache) sees every key: no mask.
        mask = torch.ones(T, L, dtype=torch.bool, device=x.device).tril(L - T) if T > 1 else None
        if self.config.use_sdpa:  # without a cache, is_causal lets the fused kernel skip half
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if T == L else mask, is_causal=T == L > 1,
                dropout_p=self.config.dropout if self.training else 0.0)  # (B, nh, T, hs)
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, T, L): query-key affinities
            if mask is not None:
                att = att.masked_fill(~mask, float("-inf"))  # the future is hidden
            att = F.softmax(att, dim=-1)  # (B, nh, T, L), each row sums to 1
            y = self.dropout(att) @ v  # (B, nh, T, hs): a weighted sum of the values
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C), heads side by side again
        return self.dropout(self.proj(y))  # (B, T, C)

class MLP(nn.Module):
    """Each position thinks on its own: widen mlp_ratio times, a nonlinearity, narrow back."""

    def __init__(self, config):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.mlp_ratio * config.n_embd, bias=False)
        self.proj = nn.Linear(config.mlp_ratio * config.n_embd, config.n_embd, bias=False)
        self.act = (lambda h: F.relu(h).square()) if config.mlp == "relu2" else F.gelu
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.proj(self.act(self.fc(x))))  # (B, T, C)

def shift_tokens(x, cache=None, name=""):
    """Token shift: the first half of the channels of x (B, T, C) move one position later, so each
    position also reads the one before it (zeros before the first) at no cost in matmuls: a cheap
    view of the previous character that attention no longer has to find. While sampling with a
    cache, cache[name] keeps the last position's half for the next call."""
    half = x.size(-1) // 2
    before = cache.get(name) if cache is not None else None  # (B, 1, C/2) or None
    if before is None:
        before = torch.zeros_like(x[:, :1, :half])  # (B, 1, C/2): nothing precedes position 0
    if cache is not None:
        cache[name] = x[:, -1:, :half]
    moved = torch.cat([before, x[:, :-1, :half]], dim=1)  # (B, T, C/2), each from one step back
    return torch.cat([moved, x[..., half:]], dim=-1)  # (B, T, C)

class Block(nn.Module):
    """Pre-norm Transformer block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln1 = make_norm(config.norm, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln2 = make_norm(config.norm, config.n_embd)
        self.mlp = MLP(config)
        self.token_shift = config.token_shift

    def forward(self, x, turn, cache=None):
        h = shift_tokens(self.ln1(x), cache, "attn") if self.token_shift else self.ln1(x)
        x = x + self.attn(h, turn, cache)  # (B, T, C): positions talk to each other
        h = shift_tokens(self.ln2(x), cache, "mlp") if self.token_shift else self.ln2(x)
        x = x + self.mlp(h)  # (B, T, C): each position computes alone
        return x

class GPT(nn.Module):
    """config: the hyperparameters of a run (n_layer, n_embd, rope, ...) and the vocab_size."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)  # what the character is
        # where it is: with rotary positions attention handles that, else one learned vector each
        self.pos_emb = None if config.rope else nn.Embedding(config.block_size, config.n_embd)
        if config.rope:  # the rotary angles' cos and sin for every position, computed once
            hs, positions = config.n_embd // config.n_head, torch.arange(config.block_size)
            for name, table in zip(("cos", "sin"), rotary_angles(positions, hs)):
                self.register_buffer(name, table, persistent=False)  # (block_size, hs/2)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = make_norm(config.norm, config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:  # reading and writing a character share one vector
            self.head.weight = self.tok_emb.weight
        # GPT-2 init: N(0, 0.02) for every matrix, and the layers that write into the residual
        # stream scaled by 1/sqrt(2 * n_layer), so the stream's variance does not grow with depth.
        # Untied, those layers and the head start at zero instead: every block starts as the
        # identity and the first prediction is uniform (loss ln V), and training grows them.
        for name, p in self.named_parameters():
            if p.dim() == 2:
                writes = name.endswith("proj.weight") or name == "head.weight"
                std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=0.0 if writes and not config.tie_weights else std)

    def forward(self, idx, targets=None, caches=None):
        """idx (B, T) -> logits (B, T, V) and the mean cross-entropy, or without targets only the
        last position's logits (B, 1, V). With caches (one per block), idx holds new positions."""
        B, T = idx.shape
        start = caches[0]["k"].size(2) if caches and "k" in caches[0] else 0  # already cached
        x = self.tok_emb(idx)  # (B, T, C)
        turn = None  # rotary: the cos and sin each block turns its queries and keys by
        if self.config.rope:
            turn = self.cos[start:start + T], self.sin[start:start + T]  # 2 x (T, hs/2)
        else:
            x = x + self.pos_emb(torch.arange(start, start + T, device=idx.device))  # (B, T, C)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, turn, caches[i] if caches is not None else None)  # (B, T, C)
        if targets is None:
            x = x[:, -1:, :]  # (B, 1, C): without targets only the last position predicts the next
        logits = self.head(self.ln_f(x))  # (B, T, V)
        if self.config.softcap:  # a smooth clamp: near-identity for small logits
            logits = self.config.softcap * torch.tanh(logits / self.config.softcap)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))
        return logits, loss

    @torch.inference_mode()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, use_cache=True,
                 generator=None):
        """Yield max_new_tokens new token ids after the prompt idx (1, T), one at a time. A full
        context keeps its last half, so the cache is refilled once every block_size // 2 tokens;
        without the cache the same window is recomputed, so both ways write the same text."""
        idx = idx[:, -self.config.block_size:]  # (1, T)
        caches = None
        for _ in range(max_new_tokens):
            if idx.size(1) > self.config.block_size:  # the window is full: keep its last half
                idx = idx[:, -(self.config.block_size // 2):]
                caches = None
            if caches is None:  # the model reads the whole window (at every step without a cache)
                new, caches = idx, [{} for _ in self.blocks] if use_cache else None
            logits, _ = self(new, caches=caches)  # (1, 1, V)
            new = sample_next(logits[:, -1, :].float(), temperature, top_k, top_p, generator)
            idx = torch.cat([idx, new], dim=1)  # (1, T + 1); with a cache, only `new` is read next
            yield new.item()

def sample_next(logits, temperature, top_k, top_p, generator):
    """The next token from logits (1, V): greedy at temperature 0, else sampled after trimming."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # (1, 1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (1, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)  # (1, V)
        probs = F.softmax(sorted_logits, dim=-1)  # (1, V)
        before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = F.softmax(logits, dim=-1)  # (1, V)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (1, 1)

# -----------------------------------------------------------------------------
# Training

def lr_at(step, progress, cfg):
    """The learning-rate multiplier: linear warmup, then as progress goes 0 -> 1, wsd holds 1 and
    decays linearly over the last decay_fraction, cosine all the way; both end at the floor."""
    floor = cfg.min_lr / cfg.learning_rate
    if step < cfg.warmup_iters:
        return (step + 1) / cfg.warmup_iters
    progress = min(progress, 1.0)
    if cfg.schedule == "wsd":
        decay = max(0.0, (progress - (1 - cfg.decay_fraction)) / cfg.decay_fraction)  # 0 -> 1
        return 1 - (1 - floor) * decay
    return floor + 0.5 * (1 - floor) * (1 + math.cos(math.pi * progress))

class Muon(torch.optim.Optimizer):
    """Momentum, then each matrix's update orthogonalised: all its directions move alike, so the
    rarely-used ones learn as fast as the rest. torch.optim.Muon is the same, but it works in
    bfloat16, which CPUs without bfloat16 units (AVX2) run ~15x slower than float32."""

    def __init__(self, params, lr, momentum=0.95):
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in [p for p in group["params"] if p.grad is not None]:  # each (rows, cols)
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - group["momentum"])  # the running mean of the gradients
                update = orthogonalise(p.grad.lerp(buf, group["momentum"]))  # Nesterov: look ahead
                scale = max(1, p.size(0) / p.size(1)) ** 0.5  # a tall matrix takes a longer step
                p.add_(update, alpha=-group["lr"] * scale)

def orthogonalise(g, steps=5):
    """U V^T of g = U S V^T, roughly, by Newton-Schulz: matmuls only, no SVD. Each step maps every
    singular value s to a s + b s^3 + c s^5, which pulls all but the tiniest into ~0.7-1.2."""
    x = g.T if g.size(0) > g.size(1) else g  # (r, c) with r <= c: the Gram matrix is the small side
    x = x / (x.norm() + 1e-7)  # the Frobenius norm bounds the largest singular value: all <= 1
    for _ in range(steps):
        gram = x @ x.T  # (r, r)
        x = 3.4445 * x + (-4.7750 * gram + 2.0315 * gram @ gram) @ x
    return x.T if g.size(0) > g.size(1) else x

def make_optimizers(model, cfg):
    """AdamW decays the 2-D weights but not the norm gains. With optimizer=muon, the matrices
    inside the blocks go to Muon instead (no decay: it did worse here)."""
    hidden = [p for name, p in model.named_parameters() if name.startswith("blocks.")
              and p.dim() == 2] if cfg.optimizer == "muon" else []
    adam = [p for p in model.parameters() if all(p is not h for h in hidden)]
    groups = [{"params": [p for p in adam if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in adam if p.dim() < 2], "weight_decay": 0.0}]
    # update all tensors at once: one fused kernel on CUDA, batched ("foreach") ops elsewhere
    batched = {"fused": True} if cfg.device.startswith("cuda") else {"foreach": True}
    optimizers = [torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, cfg.beta2),
                                    **batched)]
    if hidden:
        optimizers.append(Muon(hidden, lr=cfg.muon_lr))
    for opt in optimizers:
        for group in opt.param_groups:
            group["peak_lr"] = group["lr"]  # lr_at scales this peak
    return optimizers

def train_step(model, optimizers, scaler, autocast, batches, cfg):
    """One optimizer step: forward and backward over the micro-batches, clip, update.
    model(*batch) returns (output, loss). Returns the loss of the last micro-batch."""
    for i, batch in enumerate(batches):
        # under DDP, average gradients across processes only on the last micro-step
        last = i == len(batches) - 1
        sync = model.no_sync() if hasattr(model, "no_sync") and not last else nullcontext()
        with sync, autocast:
            _, loss = model(*batch)
        scaler.scale(loss / len(batches)).backward()
    for opt in optimizers:
        scaler.unscale_(opt)  # the true gradients, for clipping
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    for opt in optimizers:
        scaler.step(opt)
        opt.zero_grad(set_to_none=True)
    scaler.update()
    loss = loss.item()
    if not math.isfinite(loss):
        raise UserError(f"the loss diverged ({loss}); lower --learning_rate (now "
                        f"{cfg.learning_rate}) or raise --warmup_iters (now {cfg.warmup_iters})")
    return loss

@torch.no_grad()
def estimate_loss(model, data, cfg, autocast, batches=None):
    """Mean loss over windows of the split cut end to end: all of them (nats per character), or
    `batches` batches of them spread evenly over it, the same ones at every call."""
    model.eval()
    n = (len(data) - 1) // cfg.block_size * cfg.block_size
    x_all = data[:n].view(-1, cfg.block_size)  # (N, T)
    y_all = data[1:n + 1].view(-1, cfg.block_size)  # (N, T)
    if batches is not None and batches * cfg.batch_size < len(x_all):
        pick = torch.linspace(0, len(x_all) - 1, batches * cfg.batch_size).long()
        x_all, y_all = x_all[pick], y_all[pick]
    total = 0.0
    for i in range(0, len(x_all), 64):
        x, y = x_all[i:i + 64].to(cfg.device), y_all[i:i + 64].to(cfg.device)
        with autocast:
            total += model(x, y)[1].item() * len(x)
    model.train()
    return total / len(x_all)

def progress(run, cfg):
    """How far training is, 0 -> 1: by the clock, or by steps when train_seconds = 0."""
    return run.seconds / cfg.train_seconds if cfg.train_seconds else run.step / cfg.max_iters

def train(model, tokenizer, splits, cfg, ckpt=None):
    """Train until the clock (or max_iters) runs out, saving the best model; -> (model, history)."""
    ddp, rank, world = ddp_setup(cfg)
    autocast, use_scaler = autocast_for(cfg.device, cfg.dtype)
    scaler = torch.amp.GradScaler(enabled=use_scaler)
    optimizers = make_optimizers(model, cfg)
    generator = torch.Generator().manual_seed(cfg.seed)  # draws the training batches
    run = SimpleNamespace(step=0, seconds=0.0, best_val_loss=float("inf"), history=[])
    if ckpt:
        restore_training(ckpt, optimizers, generator, run)
    fast = torch.compile(model) if cfg.compile else model  # `model` itself is the one saved
    if ddp:  # averages the gradients of all processes during backward
        ids = [cfg.device] if cfg.device.startswith("cuda") else None
        fast = torch.nn.parallel.DistributedDataParallel(fast, device_ids=ids)
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * world
    if rank == 0:
        budget = f"{cfg.train_seconds:.0f}s" if cfg.train_seconds else f"{cfg.max_iters} steps"
        print(f"gpt.py | {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | "
              f"device {cfg.device} x{world} | vocab {len(tokenizer.chars)} | "
              f"{len(splits['train']):,} train chars\ntraining for {budget}, "
              f"{tokens_per_step:,} tokens per step"
              + (f", resuming at step {run.step}" if ckpt else ""))
        if not ckpt:  # a new run never replaces an earlier run's checkpoint
            keep_previous(cfg.checkpoint)
    first_step, step_at_log, seconds_at_log = run.step, run.step, run.seconds
    while True:
        finished = torch.tensor(float(progress(run, cfg) >= 1.0), device=cfg.device)
        if ddp:  # every process must stop at the same step, so rank 0's clock decides
            torch.distributed.broadcast(finished, 0)
        if rank == 0 and (finished or run.step % cfg.eval_interval == 0 and run.step > first_step):
            evaluate_and_save(model, optimizers, tokenizer, splits, cfg, autocast, run, generator)
        if finished:
            break
        t0 = time.time()
        factor = lr_at(run.step, progress(run, cfg), cfg)
        for group in [group for opt in optimizers for group in opt.param_groups]:
            group["lr"] = group["peak_lr"] * factor  # each group's own peak, on one schedule
        batches = [[t.to(cfg.device) for t in get_batch(splits["train"], cfg.block_size,
                                                        cfg.batch_size, generator, rank, world)]
                   for _ in range(cfg.grad_accum)]
        loss = train_step(fast, optimizers, scaler, autocast, batches, cfg)
        run.step += 1
        run.seconds += time.time() - t0  # the clock counts training only, not evaluation
        if rank == 0 and run.step % cfg.log_interval == 0:
            per_step = (run.seconds - seconds_at_log) / (run.step - step_at_log)
            eta = (1 - progress(run, cfg)) * (cfg.train_seconds or cfg.max_iters * per_step)
            print(progress_line(run.step, loss, optimizers[0].param_groups[0]["lr"], per_step,
                                tokens_per_step / per_step, "tok", eta))
            step_at_log, seconds_at_log = run.step, run.seconds
    if ddp:  # wait for rank 0's last evaluation, then leave together
        torch.distributed.barrier()
        del fast  # free DDP's gradient-averaging machinery while its process group still exists
        torch.distributed.destroy_process_group()
    return model, run.history

def evaluate_and_save(model, optimizers, tokenizer, splits, cfg, autocast, run, generator):
    """Estimate both losses, save all a later run needs if validation improved, show a sample."""
    losses = {name: estimate_loss(model, data, cfg, autocast, cfg.eval_iters)
              for name, data in splits.items()}
    run.history.append((run.step, losses["train"], losses["val"]))
    note = ""
    if losses["val"] < run.best_val_loss:
        run.best_val_loss = losses["val"]
        save_checkpoint(cfg.checkpoint, {
            "script": "gpt.py", "config": vars(cfg), "model": model.state_dict(),
            "optimizers": [opt.state_dict() for opt in optimizers], "step": run.step,
            "seconds": run.seconds, "best_val_loss": run.best_val_loss, "history": run.history,
            "rng": {"torch": torch.get_rng_state(), "batches": generator.get_state()},
            "data": {"chars": tokenizer.chars}})
        note = " (best, saved)"
    line = sample_text(model, tokenizer, "\n", 80, cfg).replace("\n", " ")
    print(f"step {run.step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
          f"{note} | {line}")

# -----------------------------------------------------------------------------
# Evaluation and sampling

def sample_text(model, tokenizer, prompt, n, cfg, stream=False):
    """n characters after prompt, seeded: a checkpoint always writes the same text. stream prints
    them as they come, then the speed."""
    context = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=cfg.device)
    generator = torch.Generator(device=cfg.device).manual_seed(cfg.sample_seed)
    threads, was_training, chars, t0 = torch.get_num_threads(), model.training, [], time.time()
    if cfg.device == "cpu":  # one new position is too little work to share between cores: the
        torch.set_num_threads(1)  # hand-off costs more than it saves (the cache runs ~1.35x faster)
    model.eval()
    if stream:
        print(prompt, end="")
    for token in model.generate(context, n, cfg.temperature, cfg.top_k, cfg.top_p,
                                use_cache=cfg.use_cache, generator=generator):
        chars.append(tokenizer.decode([token]))
        if stream:
            print(chars[-1], end="", flush=True)
    model.train(was_training)
    torch.set_num_threads(threads)
    seconds = time.time() - t0
    if stream:
        print(f"\n({n} characters in {seconds:.1f}s, {n / max(seconds, 1e-9):,.0f} chars/s, "
              f"KV cache {'on' if cfg.use_cache else 'off'})")
    return "".join(chars)

def plot_losses(history, width=60, height=12):
    """The train (.) and val (o) loss over the steps, drawn with characters any console prints."""
    if len(history) < 2:
        return ""
    steps = [h[0] for h in history]
    values = [v for h in history for v in h[1:]]
    lo, hi = min(values), max(values)
    grid = [[" "] * width for _ in range(height)]
    for step, train_loss, val_loss in history:
        col = round((step - steps[0]) / (steps[-1] - steps[0]) * (width - 1))
        for value, mark in ((train_loss, "."), (val_loss, "o")):
            grid[round((hi - value) / (hi - lo + 1e-9) * (height - 1))][col] = mark
    lines = [f"{hi - (hi - lo) * r / (height - 1):6.2f} |" + "".join(row)
             for r, row in enumerate(grid)]
    left, right = f"step {steps[0]}", f"step {steps[-1]}"
    lines += ["       +" + "-" * width, "        " + left + right.rjust(width - len(left))]
    return "loss (. train, o val)\n" + "\n".join(lines)

# -----------------------------------------------------------------------------
# main

# the settings that fix the model: a checkpoint holds them
MODEL_KEYS = ("n_layer", "n_head", "n_embd", "mlp_ratio", "block_size", "rope", "norm", "mlp",
              "qk_norm", "tie_weights", "token_shift", "softcap")

def main(argv=(), **overrides):
    """Train, report and sample (or, with --infer, only sample from the checkpoint) -> namespace.
    From a notebook: main(n_layer=2, train_seconds=30) or main(["--n_layer=2"])."""
    argv = list(argv) + [f"--{name}={value}" for name, value in overrides.items()]
    wants_help = "--help" in argv or "-h" in argv
    cfg, given = parse_args([a for a in argv if a not in ("--help", "-h")], hyperparameters())
    if wants_help:  # the values this run would use, then stop
        print(help_text(vars(cfg)))
        return None
    check_config(cfg)
    cfg.device = choose_device(cfg.device)
    torch.manual_seed(cfg.seed)
    ckpt = load_checkpoint(cfg.checkpoint) if cfg.infer or cfg.resume else None
    if ckpt:
        restore_config(cfg, given, ckpt)
    if cfg.infer:
        tokenizer = Tokenizer(ckpt["data"]["chars"])
        model = build_model(cfg, len(tokenizer.chars), ckpt["model"])
        print(f"sampling from {cfg.checkpoint} (step {ckpt['step']}, "
              f"val loss {ckpt['best_val_loss']:.4f})")
        sample = sample_text(model, tokenizer, cfg.prompt, cfg.num_chars, cfg, stream=True)
        return SimpleNamespace(model=model, tokenizer=tokenizer, sample=sample, cfg=cfg)
    t_start = time.time()
    tokenizer, splits = read_data(cfg, ckpt and ckpt["data"]["chars"])
    check_writable(cfg.checkpoint)
    model = build_model(cfg, len(tokenizer.chars), ckpt and ckpt["model"])
    model, history = train(model, tokenizer, splits, cfg, ckpt)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, only the first process reports
        return None
    best = load_checkpoint(cfg.checkpoint)  # finish with the best model, the one that was saved
    model.load_state_dict(best["model"])
    print(plot_losses(history))
    val_loss = estimate_loss(model, splits["val"], cfg, autocast_for(cfg.device, cfg.dtype)[0])
    print(f"val loss over the whole validation split: {val_loss:.4f} nats/char (best checkpoint, "
          f"step {best['step']}); run took {format_time(time.time() - t_start)}")
    sample = ""
    if cfg.num_chars > 0:
        print("-" * 60)
        sample = sample_text(model, tokenizer, cfg.prompt, cfg.num_chars, cfg, stream=True)
    return SimpleNamespace(model=model, tokenizer=tokenizer, history=history, val_loss=val_loss,
                           sample=sample, cfg=cfg)

# -----------------------------------------------------------------------------
# Plumbing: command line, device and precision, checkpoints, torchrun.
# A first reading can skip everything below.

class UserError(Exception):
    """Something the user can fix: printed as one line, without a traceback."""

def in_notebook():
    """True inside Jupyter or Colab, whose kernel's own arguments are not meant for us."""
    return "ipykernel" in sys.modules or sys.argv[0].endswith("kernel_launcher.py")

def hyperparameters():
    """The constants at the top, as they are now: an edit made in a notebook cell counts."""
    return {name: value for name, value in globals().items()
            if name[:1].islower() and type(value) in (bool, int, float, str)}

def help_text(defaults):
    """Every option with the value this run would use and, if the source is at hand, its comment."""
    source = "".join(linecache.getlines(help_text.__code__.co_filename))  # empty in an exec'd cell
    found = re.findall(r"^\s*\"?(\w+)\"?\s*[=:] .*?  # (.*)$", source, re.MULTILINE)
    comments = dict(reversed(found))  # the first comment of a name: the constant's, at the top
    lines = [f"  --{name}={value!r:<{28 - len(name)}} {comments.get(name, '')}"
             for name, value in defaults.items()]
    return "options (the values this run would use):\n" + "\n".join(lines)

def parse_args(argv, defaults):
    """Turn ['--n_layer=6', '--resume'] into (config, names given), checking every name and type."""
    config, given = dict(defaults), set()
    for arg in argv:
        name, has_value, text = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or name not in config:
            raise UserError(f"unknown option {arg!r}; write --name=value with one of: "
                            f"--{', --'.join(config)} (see --help)")
        default = config[name]
        if isinstance(default, bool):
            text = text if has_value else "true"  # a bare --resume means --resume=true
            if text.lower() not in ("true", "false", "1", "0"):
                raise UserError(f"--{name} expects true or false, got {text!r}")
            config[name] = text.lower() in ("true", "1")
        elif not has_value:
            raise UserError(f"--{name} needs a value: write --{name}=VALUE, with '=' and no space")
        else:
            try:
                config[name] = type(default)(text)
            except ValueError:
                kind = {int: "a whole number", float: "a number"}.get(type(default), "text")
                raise UserError(f"--{name} expects {kind}, got {text!r}") from None
        given.add(name)
    return SimpleNamespace(**config), given  # cfg.n_layer reads like the constant it came from

def check_config(cfg):
    """Refuse, before any work, values that cannot run: one line naming the option and the fix."""
    choices = {"norm": ("rms", "layer"), "mlp": ("relu2", "gelu"), "optimizer": ("muon", "adamw"),
               "schedule": ("wsd", "cosine")}
    problems = [
        (cfg.n_embd % cfg.n_head != 0, f"--n_embd={cfg.n_embd} is not a multiple of "
         f"--n_head={cfg.n_head}; each head needs n_embd // n_head channels"),
        (min(cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.batch_size, cfg.grad_accum) < 1,
         "--n_layer, --n_head, --n_embd, --batch_size and --grad_accum must be at least 1"),
        (min(cfg.eval_interval, cfg.log_interval, cfg.eval_iters) < 1,
         "--eval_interval, --log_interval and --eval_iters must be at least 1"),
        (cfg.train_seconds <= 0 and cfg.max_iters <= 0,
         "nothing to train: set --train_seconds=SECONDS, or --train_seconds=0 --max_iters=STEPS"),
        (cfg.learning_rate <= 0 or cfg.warmup_iters < 0,
         "--learning_rate must be above 0 and --warmup_iters at least 0"),
        # gpt.py's own settings
        (cfg.block_size < 2 or (cfg.rope and (cfg.n_embd // cfg.n_head) % 2),
         "--block_size must be at least 2, and with --rope the head size must be even"),
        (not 0 < cfg.val_fraction < 1, "--val_fraction must lie between 0 and 1"),
        (cfg.temperature < 0, "--temperature must be 0 (greedy) or more"),
        (not 0 < cfg.top_p <= 1, "--top_p must lie in (0, 1]: 1 keeps every character"),
        (cfg.top_k < 0 or cfg.num_chars < 0, "--top_k and --num_chars must be 0 or more"),
        (cfg.infer and not cfg.prompt, "--prompt is empty; give at least one character"),
        (not 0 < cfg.decay_fraction <= 1, "--decay_fraction must lie in (0, 1]"),
        (cfg.softcap < 0, "--softcap must be 0 (off) or more"),
        (cfg.mlp_ratio < 1, "--mlp_ratio must be at least 1"),
    ] + [(getattr(cfg, name) not in allowed, f"--{name} must be one of {', '.join(allowed)}")
         for name, allowed in choices.items()]
    for bad, message in problems:
        if bad:
            raise UserError(message)

def choose_device(name):
    """CUDA, then Apple's MPS, then the CPU; a named device must exist on this machine."""
    if name == "auto":
        if torch.cuda.is_available():  # under torchrun each process takes its own GPU
            return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    kind = name.split(":")[0]
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": torch.backends.mps.is_available()}
    if kind not in available:
        raise UserError(f"--device={name} is not a device; use auto, cpu, cuda, cuda:N or mps")
    if not available[kind]:
        raise UserError(f"--device={name}, but this machine has no {kind.upper()}; use auto")
    return name

def autocast_for(device, dtype):
    """The mixed-precision context for the forward pass, and whether fp16 needs a GradScaler."""
    device_type = device.split(":")[0]
    if dtype == "auto":
        if device_type != "cuda":
            return nullcontext(), False
        dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if dtype == "float32":
        return nullcontext(), False
    if dtype not in ("bfloat16", "float16"):
        raise UserError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype)), dtype == "float16"

def ddp_setup(cfg):
    """Under torchrun: join the process group (nccl on GPUs, gloo on CPUs) -> (ddp, rank, world)."""
    if "RANK" not in os.environ:
        return False, 0, 1
    cuda = cfg.device.startswith("cuda")
    torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(cfg.device)
    return True, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])

def build_model(cfg, vocab_size, weights=None):
    """The model the settings describe, with a checkpoint's weights if given."""
    model = GPT(SimpleNamespace(**vars(cfg), vocab_size=vocab_size))
    if weights:
        try:
            model.load_state_dict(weights)
        except RuntimeError:
            raise UserError("the checkpoint's weights do not fit this model; "
                            "was it written by another version of gpt.py?") from None
    return model.to(cfg.device)

def check_writable(path):
    """Fail now, before training, not at the first save, if `path` cannot be written."""
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        raise UserError(f"--checkpoint={path} is a folder; name a file in it, "
                        f"e.g. {os.path.join(path, 'model.pt')}")
    folder = os.path.dirname(path) or "."
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise UserError(f"cannot write checkpoints in {folder!r} ({e.strerror}); "
                        f"choose another --checkpoint") from None

def keep_previous(path):
    """Before a new run saves, move an earlier checkpoint aside: out/gpt.pt -> out/gpt.1.pt."""
    if os.path.exists(path):
        stem, ext = os.path.splitext(path)
        n = next(n for n in range(1, 10**6) if not os.path.exists(f"{stem}.{n}{ext}"))
        os.replace(path, f"{stem}.{n}{ext}")
        print(f"kept the earlier checkpoint at {path} as {stem}.{n}{ext}")

def save_checkpoint(path, state):
    """Write to a temporary name, then rename: a crash mid-write never destroys the checkpoint."""
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)

def load_checkpoint(path):
    """A checkpoint written by this script, or one clear line saying why not."""
    script = "gpt.py"
    if os.path.isdir(path):
        raise UserError(f"--checkpoint={path} is a folder; point it at a .pt file {script} wrote")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path!r}; train first with python {script}") from None
    except Exception as e:
        raise UserError(f"{path!r} is not a readable checkpoint ({type(e).__name__})") from None
    owner = ckpt.get("script", "something else") if isinstance(ckpt, dict) else "something else"
    if owner != script:
        raise UserError(f"{path!r} was written by {owner}, not {script}; "
                        f"point --checkpoint at one of {script}'s")
    if "optimizers" not in ckpt or "data" not in ckpt:
        raise UserError(f"{path!r} was written by an older {script}; train it again")
    for name, before in (("token_shift", False), ("softcap", 0.0), ("mlp_ratio", 4)):  # added later
        ckpt["config"].setdefault(name, before)
    return ckpt

def restore_training(ckpt, optimizers, generator, run):
    """Continue exactly where the checkpoint stopped: optimizer state, progress, random state."""
    if len(ckpt["optimizers"]) != len(optimizers):  # AdamW alone, or AdamW and Muon
        used = ckpt["config"]["optimizer"]
        raise UserError(f"the checkpoint was trained with --optimizer={used}; "
                        f"add --optimizer={used} to resume it")
    for opt, saved in zip(optimizers, ckpt["optimizers"]):
        opt.load_state_dict(saved)
    run.step, run.seconds = ckpt["step"], ckpt["seconds"]
    run.best_val_loss, run.history = ckpt["best_val_loss"], ckpt["history"]
    generator.set_state(ckpt["rng"]["batches"])
    torch.set_rng_state(ckpt["rng"]["torch"])

def restore_config(cfg, given, ckpt):
    """Take the model's shape from the checkpoint; a size given on the command line must agree."""
    for name in MODEL_KEYS:
        saved = ckpt["config"][name]
        if name in given and getattr(cfg, name) != saved:
            raise UserError(f"--{name}={getattr(cfg, name)} contradicts the checkpoint, which "
                            f"holds {name}={saved}; leave --{name} out or use another --checkpoint")
        setattr(cfg, name, saved)

def format_time(seconds):
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"

def progress_line(step, loss, lr, seconds_per_step, per_second, unit, eta_seconds):
    """The line printed every log_interval steps."""
    return (f"step {step:5d} | loss {loss:.4f} | lr {lr:.2e} | {1000 * seconds_per_step:.1f} "
            f"ms/step | {per_second:,.0f} {unit}/s | ETA {format_time(eta_seconds)}")

if __name__ == "__main__":
    try:
        main([] if in_notebook() else sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        if not in_notebook():
            sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted; the best checkpoint so far is kept", file=sys.stderr)
        if not in_notebook():
            sys.exit(130)
    except BrokenPipeError:  # the reader stopped early (e.g. | head): quietly, no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        sys.exit(1)
