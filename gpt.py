"""
gpt.py - a character-level GPT, written out in one file you can read top to bottom.

It learns to write Shakespeare one character at a time: the decoder-only Transformer of
GPT-2 (token + position embeddings, pre-norm blocks of causal self-attention and an MLP,
a final LayerNorm and an output head tied to the token embedding), trained with AdamW,
warmup and cosine decay, and sampled with a KV cache.

    pip install -r requirements.txt
    python gpt.py                           # train ~4.5 minutes on a laptop CPU, then write
    python gpt.py --n_layer=6 --n_embd=192  # any constant below can be overridden like this
    python gpt.py --sample_only --prompt="Romeo:" --num_chars=1000
    python gpt.py --resume                  # continue from the best checkpoint
    torchrun --nproc_per_node=2 gpt.py      # data-parallel over 2 processes (GPUs or CPU)
    python gpt.py --help                    # every constant with its comment

What you should see: a header (parameters, device, data), a progress line every few
seconds (step, loss, ms/step, tokens/s, ETA), the train/val loss every `eval_interval`
steps, a loss curve drawn in the terminal, the validation loss over the whole validation
split (about 1.78 nats per character after 4.5 minutes on a 2-core CPU), and a Shakespeare-
like sample streamed character by character.

Shapes in the comments: B = batch, T = time (sequence length), C = channels (n_embd),
nh = number of heads, hs = head size (C // nh), V = vocabulary size, L = length of the
keys (T, or the cached length plus T while sampling).
"""

import contextlib
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Hyperparameters (override any of them on the command line: --name=value)
# data
input_file = "input.txt"  # any UTF-8 text; looked up in the current folder, then beside this script
val_fraction = 0.1  # the last 10% of the text is held out to measure generalisation
# model
n_layer = 4  # number of Transformer blocks
n_head = 4  # attention heads per block; each head sees n_embd // n_head channels
n_embd = 128  # width of the residual stream
block_size = 128  # context length: how many previous characters the model can see
dropout = 0.0  # small models trained for minutes underfit, so dropout only slows them down
use_sdpa = True  # fused F.scaled_dot_product_attention; False runs the hand-written attention
# optimisation
batch_size = 8  # sequences per micro-step (per process under torchrun)
grad_accum = 1  # micro-steps per optimizer step; batch_size * grad_accum sequences per step
learning_rate = 3e-3  # peak learning rate; tiny models tolerate a high one
min_lr = 3e-4  # the cosine decay ends here (1/10 of the peak, as in Chinchilla)
warmup_iters = 100  # linear warmup steps: Adam's statistics are poor for the first steps
weight_decay = 0.1  # applied to 2-D weights only (matmuls, embeddings), not to LayerNorm gains
beta2 = 0.99  # Adam's second-moment decay; 0.99 suits small batches better than 0.999
grad_clip = 1.0  # clip the global gradient norm to this (0 = off)
train_seconds = 255.0  # wall-clock training budget; the schedule decays over it (0 = use max_iters)
max_iters = 5000  # optimizer steps, used when train_seconds = 0
# evaluation and logging
eval_interval = 500  # estimate train/val loss (and maybe save) every this many steps
eval_iters = 20  # batches per loss estimate
log_interval = 100  # print a progress line every this many steps
# sampling
prompt = "\n"  # text the sample starts from
num_chars = 500  # characters to generate
temperature = 0.8  # < 1 sharpens the distribution, > 1 flattens it, 0 = greedy
top_k = 0  # sample only from the k most likely characters (0 = off)
top_p = 1.0  # sample from the smallest set whose probability reaches p (1.0 = off)
sample_seed = 42  # seed for sampling, so the same checkpoint writes the same text
use_cache = True  # KV cache: each new character costs one position; False recomputes the context (same text)
# system
checkpoint = "out/gpt.pt"  # where the best model is saved, resumed and sampled from
resume = False  # continue training from `checkpoint`
sample_only = False  # load `checkpoint` and write a sample, without training
device = "auto"  # auto = cuda, then mps, then cpu; or name one
dtype = "auto"  # auto = bfloat16 on CUDA (float16 if unsupported), float32 elsewhere
compile = False  # torch.compile the model: faster steps after a slow first one
seed = 1337  # seed for initialisation and batches
# -----------------------------------------------------------------------------


class UserError(Exception):
    """Something the user can fix: printed as one line, without a traceback."""


def hyperparameters():
    """The constants above as {name: (value, comment)}, read from this file so --help shows the same words."""
    with open(__file__, encoding="utf-8") as f:
        source = f.read()
    section = source.split("# Hyperparameters", 1)[1].split("# ------", 1)[0]
    return {name: (globals()[name], comment)
            for name, comment in re.findall(r"^(\w+) = .*?  # (.*)$", section, re.MULTILINE)}


def parse_args(argv):
    """Turn ['--n_layer=6', '--resume'] into a config namespace, checking every name and type."""
    params = hyperparameters()
    if "--help" in argv or "-h" in argv:
        print(f"usage: python {os.path.basename(__file__)} [--name=value ...]\n")
        for name, (value, comment) in params.items():
            print(f"  --{name}={value!r:<14} {comment}")
        sys.exit(0)
    config = {name: value for name, (value, _) in params.items()}
    for arg in argv:
        name, has_value, text = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or name not in config:
            raise UserError(f"unknown option {arg!r}; valid options: --{', --'.join(config)} (see --help)")
        default = config[name]
        if isinstance(default, bool):
            if not has_value:
                text = "true"  # a bare --resume means --resume=true
            if text.lower() not in ("true", "false", "1", "0"):
                raise UserError(f"--{name} expects true or false, got {text!r}")
            config[name] = text.lower() in ("true", "1")
        else:
            try:
                config[name] = type(default)(text)
            except ValueError:
                kind = {int: "a whole number", float: "a number"}.get(type(default), "text")
                raise UserError(f"--{name} expects {kind}, got {text!r}") from None
    return SimpleNamespace(**config)  # cfg.n_layer reads like the constant it came from

# -----------------------------------------------------------------------------
# Data and tokenizer


def read_text(path):
    """The training text. Relative paths are tried in the current folder, then beside this script."""
    if not os.path.isabs(path) and not os.path.exists(path):
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise UserError(f"input file {path!r} not found; pass any UTF-8 text with --input_file=PATH") from None
    except UnicodeDecodeError:
        raise UserError(f"input file {path!r} is not UTF-8 text") from None
    if len(text) < 100:
        raise UserError(f"input file {path!r} holds {len(text)} characters; give it at least a few thousand")
    return text


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


def get_batch(data, block_size, batch_size, generator):
    """batch_size random windows of the text: x is the input, y the same window shifted by one."""
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)  # (B,)
    offsets = torch.arange(block_size)  # (T,)
    x = data[ix[:, None] + offsets]  # (B, T)
    y = data[ix[:, None] + offsets + 1]  # (B, T), the next character at every position
    return x, y

# -----------------------------------------------------------------------------
# Model


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    use_sdpa: bool = True


class CausalSelfAttention(nn.Module):
    """Every position looks at itself and the positions before it, through n_head heads at once."""

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = config.n_head
        self.use_sdpa = config.use_sdpa
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)  # queries, keys and values in one matmul
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)  # mixes the heads back into the residual stream
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache=None):
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:  # sampling: prepend the keys and values of the earlier positions
            if cache:
                k = torch.cat([cache["k"], k], dim=2)  # (B, nh, L, hs)
                v = torch.cat([cache["v"], v], dim=2)  # (B, nh, L, hs)
            cache["k"], cache["v"] = k, v
        L = k.size(2)
        # The causal mask, True = may attend: query t sits at key position L - T + t and sees keys 0 .. L - T + t.
        # A single new query (sampling with the cache) may see every key, so it needs no mask.
        mask = torch.ones(T, L, dtype=torch.bool, device=x.device).tril(diagonal=L - T) if T > 1 else None  # (T, L)
        if self.use_sdpa:  # without a cache, is_causal lets the fused kernel skip the masked half
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if T == L else mask, is_causal=T == L > 1,
                dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, T, L): how much each query likes each key
            if mask is not None:
                att = att.masked_fill(~mask, float("-inf"))  # the future is hidden
            att = F.softmax(att, dim=-1)  # (B, nh, T, L), each row sums to 1
            att = self.attn_dropout(att)
            y = att @ v  # (B, nh, T, hs): a weighted sum of the values
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C), heads side by side again
        return self.resid_dropout(self.proj(y))  # (B, T, C)


class MLP(nn.Module):
    """Each position thinks on its own: widen 4x, GELU, narrow back."""

    def __init__(self, config):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x))))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm Transformer block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd, bias=False)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.n_embd, bias=False)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln1(x), cache)  # (B, T, C): positions talk to each other
        x = x + self.mlp(self.ln2(x))  # (B, T, C): each position computes alone
        return x


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)  # what the character is
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)  # where it is: learned, one vector per position
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=False)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # weight tying: reading and writing a character share one vector
        # GPT-2 init: N(0, 0.02) for every matrix, and the layers that write into the residual stream
        # scaled by 1/sqrt(2 * n_layer), so the stream's variance does not grow with depth.
        # There are no biases: the LayerNorms re-centre anyway, and leaving them out saves time.
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx, targets=None, caches=None):
        """idx (B, T) of token ids -> logits (B, T, V), and the mean cross-entropy if targets are given.
        With caches (one dict per block), idx holds only the new positions; earlier ones come from the cache."""
        B, T = idx.shape
        start = caches[0]["k"].size(2) if caches and caches[0] else 0  # positions already in the cache
        assert start + T <= self.config.block_size, f"sequence of {start + T} exceeds block_size"
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, caches[i] if caches is not None else None)  # (B, T, C)
        x = self.ln_f(x)  # (B, T, C)
        if targets is None:
            return self.head(x), None  # (B, T, V)
        logits = self.head(x)  # (B, T, V)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))
        return logits, loss

    @torch.inference_mode()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, use_cache=True, generator=None):
        """Yield max_new_tokens new token ids after the prompt idx (1, T), one at a time.

        The context is at most block_size long. When it is full we keep its last half, so the
        cache is refilled once every block_size // 2 characters and every other character costs
        one position of model work. Without the cache the same window is recomputed at every step,
        so both ways see the same context and write the same text.
        """
        keep = self.config.block_size // 2
        idx = idx[:, -self.config.block_size:]
        caches, new = None, idx  # `new`: the positions the model has not processed yet
        for _ in range(max_new_tokens):
            if idx.size(1) > self.config.block_size:  # the window is full: slide it
                idx = idx[:, -keep:]
                caches, new = None, idx
            if not use_cache:
                new = idx
            elif caches is None:
                caches = [{} for _ in self.blocks]
            logits, _ = self(new, caches=caches if use_cache else None)
            logits = logits[:, -1, :].float()  # (1, V): only the last position predicts the next character
            next_id = sample_next(logits, temperature, top_k, top_p, generator)  # (1, 1)
            idx = torch.cat([idx, next_id], dim=1)  # (1, T + 1)
            new = next_id
            yield next_id.item()


def sample_next(logits, temperature, top_k, top_p, generator):
    """Pick the next token from logits (1, V): greedy at temperature 0, else sample from the trimmed softmax."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # (1, 1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (1, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)  # (1, V)
        before = F.softmax(sorted_logits, dim=-1).cumsum(dim=-1) - F.softmax(sorted_logits, dim=-1)
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))  # keep the most likely until p
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = F.softmax(logits, dim=-1)  # (1, V)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (1, 1)

# -----------------------------------------------------------------------------
# Training


def choose_device(name):
    """CUDA, then Apple's MPS, then the CPU; under torchrun each process takes its own GPU."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def autocast_for(device, dtype):
    """The mixed-precision context for the forward pass, and whether fp16 needs a GradScaler."""
    device_type = device.split(":")[0]
    if dtype == "auto":
        if device_type != "cuda":
            return contextlib.nullcontext(), False
        dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if dtype == "float32":
        return contextlib.nullcontext(), False
    if dtype not in ("bfloat16", "float16"):
        raise UserError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return torch.autocast(device_type=device_type, dtype=getattr(torch, dtype)), dtype == "float16"


def make_optimizer(model, cfg, device):
    """AdamW that decays the 2-D weights (matmuls, embeddings) but not the LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # update all tensors at once: one fused kernel on CUDA, batched ("foreach") ops elsewhere
    batched = {"fused": True} if device.startswith("cuda") else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, cfg.beta2), **batched)


def lr_at(step, progress, cfg):
    """Linear warmup for warmup_iters steps, then cosine decay to min_lr as progress goes 0 -> 1."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / cfg.warmup_iters
    return cfg.min_lr + 0.5 * (cfg.learning_rate - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


@torch.no_grad()
def estimate_loss(model, splits, cfg, autocast):
    """Mean loss over eval_iters batches per split. The batches are the same at every call,
    so two estimates differ only because the model changed."""
    model.eval()
    out = {}
    for name, data in splits.items():
        generator = torch.Generator().manual_seed(cfg.seed)
        losses = []
        for _ in range(cfg.eval_iters):
            x, y = get_batch(data, cfg.block_size, cfg.batch_size, generator)
            with autocast:
                losses.append(model(x.to(cfg.device), y.to(cfg.device))[1].item())
        out[name] = sum(losses) / len(losses)
    model.train()
    return out


@torch.no_grad()
def evaluate_all(model, data, block_size, device, autocast, batch_size=64):
    """Mean loss over the whole split, cut into windows of block_size (nats per character)."""
    model.eval()
    n = (len(data) - 1) // block_size * block_size
    x_all = data[:n].view(-1, block_size)  # (N, T)
    y_all = data[1:n + 1].view(-1, block_size)  # (N, T)
    total = 0.0
    for i in range(0, len(x_all), batch_size):
        x, y = x_all[i:i + batch_size].to(device), y_all[i:i + batch_size].to(device)
        with autocast:
            total += model(x, y)[1].item() * x.numel()
    model.train()
    return total / n


def save_checkpoint(path, state):
    """Write to a temporary name, then rename: a crash mid-write never destroys the previous checkpoint."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size")


def load_checkpoint(path, cfg):
    """Load a checkpoint written by this script, refusing one from another script or of another shape."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path!r}; train first with python gpt.py") from None
    except Exception as e:
        raise UserError(f"{path!r} is not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("script") != "gpt.py":
        owner = ckpt.get("script", "something else") if isinstance(ckpt, dict) else "something else"
        raise UserError(f"{path!r} was written by {owner}, not gpt.py; point --checkpoint at a gpt.py checkpoint")
    differ = [f"{k}={ckpt['config'][k]} (you have {getattr(cfg, k)})"
              for k in MODEL_KEYS if ckpt["config"][k] != getattr(cfg, k)]
    if differ:
        raise UserError(f"{path!r} holds a model with {', '.join(differ)}; set the same values or use a new --checkpoint")
    return ckpt


def build_model(config, state_dict=None):
    model = GPT(config)
    if state_dict is not None:
        try:
            model.load_state_dict(state_dict)
        except RuntimeError:
            raise UserError("the checkpoint's weights do not fit this model; was it written by another version?") from None
    return model


def format_time(seconds):
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def train(cfg):
    """Train on cfg.input_file, keep the best checkpoint, and return the model, tokenizer and history."""
    ddp = "RANK" in os.environ  # launched by torchrun
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    cfg.device = choose_device(cfg.device)
    if ddp:
        torch.distributed.init_process_group(backend="nccl" if cfg.device.startswith("cuda") else "gloo")
        if cfg.device.startswith("cuda"):
            torch.cuda.set_device(cfg.device)
    master = rank == 0  # only this process logs, evaluates and writes checkpoints
    log = print if master else (lambda *args, **kwargs: None)
    torch.manual_seed(cfg.seed)
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on Ampere+ GPUs: much faster, same loss
    autocast, use_scaler = autocast_for(cfg.device, cfg.dtype)

    text = read_text(cfg.input_file)
    ckpt = load_checkpoint(cfg.checkpoint, cfg) if cfg.resume else None
    tokenizer = Tokenizer(ckpt["chars"] if ckpt else sorted(set(text)))
    data = torch.tensor(tokenizer.encode(text), dtype=torch.long)  # (N,)
    n_val = int(len(data) * cfg.val_fraction)
    splits = {"train": data[:-n_val], "val": data[-n_val:]}
    if min(len(s) for s in splits.values()) <= cfg.block_size:
        raise UserError(f"input file is too short for block_size={cfg.block_size}; use more text or a smaller block")

    config = GPTConfig(len(tokenizer.chars), cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dropout, cfg.use_sdpa)
    raw_model = build_model(config, ckpt["model"] if ckpt else None).to(cfg.device)
    optimizer = make_optimizer(raw_model, cfg, cfg.device)
    scaler = torch.amp.GradScaler(enabled=use_scaler)
    generator = torch.Generator().manual_seed(cfg.seed + rank)  # each process draws its own batches
    step, best_val, trained_seconds, history = 0, float("inf"), 0.0, []
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        step, best_val, trained_seconds, history = ckpt["step"], ckpt["best_val_loss"], ckpt["seconds"], ckpt["history"]
        generator.set_state(ckpt["rng"]["batches"][rank % len(ckpt["rng"]["batches"])])
        torch.set_rng_state(ckpt["rng"]["torch"])
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[cfg.device] if cfg.device.startswith("cuda") else None)

    n_params = sum(p.numel() for p in raw_model.parameters())
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * world
    log(f"gpt.py | {n_params / 1e6:.2f}M parameters | device {cfg.device} x{world} | "
        f"dtype {cfg.dtype} | vocab {config.vocab_size} | {len(splits['train']):,} train / {len(splits['val']):,} val chars")
    budget = f"{cfg.train_seconds:.0f}s" if cfg.train_seconds else f"{cfg.max_iters} steps"
    log(f"training for {budget}, {tokens_per_step:,} tokens per step" + (f", resuming at step {step}" if ckpt else ""))

    def progress():
        if cfg.train_seconds:
            return trained_seconds / cfg.train_seconds
        return step / cfg.max_iters

    def checkpoint_state():
        return {"script": "gpt.py", "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "step": step, "best_val_loss": best_val, "seconds": trained_seconds, "history": history,
                "config": vars(cfg), "chars": tokenizer.chars,
                "rng": {"torch": torch.get_rng_state(), "batches": gather_generator_states(generator, ddp)}}

    t_log, step_at_log = time.time(), step
    try:
        while True:
            finished = progress() >= 1.0
            if ddp:  # every process must agree to stop at the same step, so rank 0's clock decides
                flag = torch.tensor([float(finished)], device=cfg.device)
                torch.distributed.broadcast(flag, 0)
                finished = bool(flag.item())
            if (step % cfg.eval_interval == 0 and step > 0) or finished:
                t_eval = time.time()
                losses = estimate_loss(raw_model, splits, cfg, autocast) if master else None
                state = checkpoint_state()  # every process joins (gather), only rank 0 writes
                if master:
                    history.append((step, losses["train"], losses["val"]))
                    note = ""
                    if losses["val"] < best_val:
                        best_val = state["best_val_loss"] = losses["val"]
                        state["history"] = history
                        save_checkpoint(cfg.checkpoint, state)
                        note = f" (best, saved to {cfg.checkpoint})"
                    log(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}{note}")
                t_log += time.time() - t_eval  # evaluation time is not training speed
            if finished:
                break
            t0 = time.time()
            lr = lr_at(step, progress(), cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro in range(cfg.grad_accum):
                x, y = get_batch(splits["train"], cfg.block_size, cfg.batch_size, generator)
                x, y = x.to(cfg.device), y.to(cfg.device)
                # under DDP, average gradients across processes only on the last micro-step
                sync = contextlib.nullcontext() if not ddp or micro == cfg.grad_accum - 1 else model.no_sync()
                with sync:
                    with autocast:
                        _, loss = model(x, y)
                    scaler.scale(loss / cfg.grad_accum).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            trained_seconds += time.time() - t0
            if step % cfg.log_interval == 0:
                elapsed = time.time() - t_log
                ms = 1000 * elapsed / (step - step_at_log)
                if cfg.train_seconds:
                    eta = cfg.train_seconds - trained_seconds
                else:
                    eta = (cfg.max_iters - step) * ms / 1000
                log(f"step {step:5d} | loss {loss.item():.4f} | lr {lr:.2e} | {ms:.1f} ms/step | "
                    f"{tokens_per_step * 1000 / ms:,.0f} tok/s | ETA {format_time(eta)}")
                t_log, step_at_log = time.time(), step
    except KeyboardInterrupt:
        log(f"\ninterrupted at step {step}; the best checkpoint (val loss {best_val:.4f}) is kept at {cfg.checkpoint}")
        raise
    finally:
        if ddp:
            torch.distributed.destroy_process_group()
    return raw_model, tokenizer, splits, history, autocast, master


def gather_generator_states(generator, ddp):
    """The batch generator state of every process, so a resumed DDP run draws the same batches."""
    state = generator.get_state()
    if not ddp:
        return [state]
    states = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, state)
    return states

# -----------------------------------------------------------------------------
# Evaluation and sampling


def plot_losses(history, width=60, height=12):
    """The train (·) and val (o) loss over the steps, drawn with characters."""
    if len(history) < 2:
        return ""
    steps = [h[0] for h in history]
    values = [v for h in history for v in h[1:]]
    lo, hi = min(values), max(values)
    grid = [[" "] * width for _ in range(height)]
    for step, train_loss, val_loss in history:
        col = round((step - steps[0]) / (steps[-1] - steps[0]) * (width - 1))
        for value, mark in ((train_loss, "·"), (val_loss, "o")):
            row = round((hi - value) / (hi - lo + 1e-9) * (height - 1))
            grid[row][col] = mark
    lines = [f"{hi - (hi - lo) * r / (height - 1):6.2f} |" + "".join(row) for r, row in enumerate(grid)]
    lines.append("       +" + "-" * width)
    lines.append(f"        step {steps[0]}{' ' * (width - 12 - len(str(steps[0])) - len(str(steps[-1])))}step {steps[-1]}")
    return "loss (· train, o val)\n" + "\n".join(lines)


def write_sample(model, tokenizer, cfg):
    """Stream cfg.num_chars characters after cfg.prompt to the terminal, and return them."""
    context = torch.tensor([tokenizer.encode(cfg.prompt)], dtype=torch.long, device=cfg.device)  # (1, T)
    if context.size(1) == 0:
        raise UserError("--prompt is empty; give at least one character, e.g. --prompt='\\n'")
    generator = torch.Generator(device=cfg.device).manual_seed(cfg.sample_seed)
    model.eval()
    threads = torch.get_num_threads()
    if cfg.device == "cpu":  # one new position is too little work to share between cores: the hand-off
        torch.set_num_threads(1)  # costs more than it saves (the KV cache samples ~1.35x faster on one core)
    print(cfg.prompt, end="", flush=True)
    chars, t0 = [], time.time()
    for token in model.generate(context, cfg.num_chars, cfg.temperature, cfg.top_k, cfg.top_p,
                                use_cache=cfg.use_cache, generator=generator):
        chars.append(tokenizer.decode([token]))
        print(chars[-1], end="", flush=True)
    seconds = time.time() - t0
    torch.set_num_threads(threads)
    print(f"\n({len(chars)} characters in {seconds:.1f}s, {len(chars) / max(seconds, 1e-9):,.0f} chars/s, "
          f"KV cache {'on' if cfg.use_cache else 'off'})")
    return "".join(chars)


def main(argv):
    cfg = parse_args(argv)
    if cfg.sample_only:
        cfg.device = choose_device(cfg.device)
        ckpt = load_checkpoint(cfg.checkpoint, cfg)
        tokenizer = Tokenizer(ckpt["chars"])
        saved = ckpt["config"]
        config = GPTConfig(len(ckpt["chars"]), saved["block_size"], saved["n_layer"], saved["n_head"], saved["n_embd"])
        model = build_model(config, ckpt["model"]).to(cfg.device)
        print(f"sampling from {cfg.checkpoint} (step {ckpt['step']}, val loss {ckpt['best_val_loss']:.4f})")
        write_sample(model, tokenizer, cfg)
        return
    t_start = time.time()
    model, tokenizer, splits, history, autocast, master = train(cfg)
    if not master:
        return
    ckpt = load_checkpoint(cfg.checkpoint, cfg)  # finish with the best model, the one that was saved
    model.load_state_dict(ckpt["model"])
    print(plot_losses(history))
    val_loss = evaluate_all(model, splits["val"], cfg.block_size, cfg.device, autocast)
    print(f"val loss over the whole validation split: {val_loss:.4f} nats/char "
          f"(best checkpoint, step {ckpt['step']}); run took {format_time(time.time() - t_start)}")
    if cfg.num_chars > 0:
        print("-" * 60)
        write_sample(model, tokenizer, cfg)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)
