"""
seq2seq.py - the original encoder-decoder Transformer, in one file you can read top to bottom.

"Attention Is All You Need" translates: an encoder reads the whole source in both directions,
a decoder writes the answer one token at a time and looks back at the source through
cross-attention. This file trains that model on one of four tasks and shows it working:

    dates      "Tuesday, March 5, 2019", "5 Mar 19", "the 5th of March 2019" ... -> "2019-03-05"
    reverse    "a7Kq2" -> "2qK7a"
    add        "123+045" -> "861" (168 written backwards, units digit first, as you add on paper)
    translate  English -> Spanish, 118,964 Tatoeba sentence pairs (downloaded once, 2.6 MB)

    pip install -r requirements.txt
    python seq2seq.py                        # dates: ~3 minutes on a laptop CPU
    python seq2seq.py --task=reverse         # or add: ~2 minutes; translate: ~16 minutes
    python seq2seq.py --infer --text="the 4th of July 1976"   # answer with the saved model
    python seq2seq.py --resume               # continue from the best checkpoint
    python seq2seq.py --help                 # every option with the value a run would use
    main(task="add")                         # in a notebook, after pasting this file in a cell

Each task's own settings are its row of TASKS, right below the constants: edit them there.

You should see progress lines with an ETA, the losses and the held-out score at every
evaluation, a loss curve, the final score on 2,000 held-out examples never trained on (exact
match for the synthetic tasks, BLEU for translate), examples, the first mistakes, and one
example's cross-attention drawn in the terminal: which source tokens each output token read.

Differences from gpt.py, on purpose: two stacks of blocks (the encoder's attention is not
causal and hides only padding; the decoder adds cross-attention); the paper's fixed sinusoidal
positions instead of rotary ones, counted back from the end in the source; batches of whole
examples padded to their longest, where gpt.py cuts windows from one long text; LayerNorm, GELU
and AdamW, with gpt.py's Muon where it measurably helps (reverse: a row of TASKS); and the model
that is evaluated, saved and answers is a moving average of the weights (update_average).

Shapes in the comments: B = batch, S = source length, T = target length, C = channels
(n_embd), nh = heads, hs = head size (C // nh), V = vocabulary size, L = length of the keys
(S for cross-attention; T, or the cached length plus T, for self-attention), beams = beam size.
"""

import copy
import datetime
import hashlib
import linecache
import math
import os
import random
import re
import sys
import tempfile
import time
import zipfile
import zlib
from collections import Counter, defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from types import SimpleNamespace

import requests
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Hyperparameters (edit them here, or override one run: --name=value)
# data
task = "dates"  # dates, reverse, add or translate; each has its own row in TASKS below
n_train = 200000  # training examples generated for a synthetic task (translate uses every pair)
val_size = 2000  # held-out examples (a count: each is a whole example), never trained on
pairs_file = ""  # translate: a file of English<TAB>Spanish lines to use instead of the download
data_dir = "data"  # translate: where spa-eng.zip is downloaded to and read from
min_count = 3  # translate: words seen fewer times in training become <unk>
# model (n_layer, n_embd and block_size are in TASKS)
n_head = 4  # attention heads per block; each head sees n_embd // n_head channels
dropout = 0.0  # the synthetic tasks have endless fresh examples, so nothing to regularise
use_sdpa = True  # fused F.scaled_dot_product_attention; False runs the hand-written attention
# optimisation (batch_size, by_length, optimizer, learning_rate, min_lr, train_seconds: TASKS)
muon_lr = 0.01  # Muon's peak learning rate, where a task uses it (orthogonalised: another scale)
grad_accum = 1  # micro-steps per optimizer step; batch_size * grad_accum examples per step
warmup_iters = 200  # linear warmup steps: Adam's statistics are poor for the first steps
weight_decay = 0.1  # applied to 2-D weights only (matmuls, embeddings), not to LayerNorm gains
beta2 = 0.99  # Adam's second-moment decay; 0.99 suits small batches better than 0.999
grad_clip = 1.0  # clip the global gradient norm to this (0 = off)
label_smoothing = 0.1  # the target gets 90% of the probability, the rest spread (as the paper)
ema_decay = 0.99  # evaluate and keep an average of the weights over ~100 steps (0 = off)
max_iters = 5000  # optimizer steps, used when the task's train_seconds = 0
# evaluation and logging
eval_interval = 500  # estimate the losses and the held-out score (and maybe save) this often
eval_iters = 10  # batches per loss estimate
eval_examples = 200  # held-out examples decoded for the score shown during training
log_interval = 100  # print a progress line every this many steps
# decoding
infer = False  # answer --text with the saved checkpoint, without training
text = ""  # a source to answer (with --infer, or after training)
beam_size = 4  # beams for --text and for translate's second BLEU score (1 = greedy only)
use_cache = True  # KV cache: each output token costs one position; False recomputes them all
# system
checkpoint = "out/seq2seq-{task}.pt"  # where the best model is saved, resumed and answered from
resume = False  # continue training from `checkpoint`
device = "auto"  # auto = cuda, then mps, then cpu; or name one
dtype = "auto"  # auto = bfloat16 on CUDA (float16 if unsupported), float32 elsewhere
compile = False  # torch.compile the model: faster steps after a slow first one
seed = 1337  # seed for the data, initialisation and batches

# Each task's own settings: edit a row to change that task's runs (--name=value still wins).
TASKS = {
    "dates": {  # dates explains the columns; every row has them all
        "n_layer": 2,  # blocks in the encoder, and as many again in the decoder
        "n_embd": 64,  # width of the residual stream; the synthetic tasks need little
        "block_size": 48,  # longest source or target in tokens; longer pairs are left out
        "batch_size": 64,  # examples per micro-step
        "by_length": False,  # batches of similar lengths: less padding, but less varied
        "optimizer": "adamw",  # AdamW for all weights, or "muon": Muon for the blocks' matrices
        "learning_rate": 3e-3,  # peak learning rate; tiny models tolerate a high one
        "min_lr": 3e-4,  # the cosine decay ends here (1/10 of the peak, as in Chinchilla)
        "train_seconds": 140.0,  # wall-clock training budget (0 = use max_iters)
    },
    # reverse first has to find where to look: AdamW takes ~1,200 steps of nothing to find it,
    # Muon a few hundred (its every-direction updates); smaller batches give it more steps
    "reverse": {"n_layer": 2, "n_embd": 64, "block_size": 48, "batch_size": 32, "by_length": False,
                "optimizer": "muon", "learning_rate": 3e-3, "min_lr": 3e-4, "train_seconds": 90.0},
    "add": {"n_layer": 2, "n_embd": 64, "block_size": 48, "batch_size": 64, "by_length": False,
            "optimizer": "adamw", "learning_rate": 3e-3, "min_lr": 3e-4, "train_seconds": 95.0},
    # real sentences need a wider, deeper model, and run from 2 to 24 words: by_length
    "translate": {"n_layer": 3, "n_embd": 128, "block_size": 24, "batch_size": 64,
                  "by_length": True, "optimizer": "adamw", "learning_rate": 2e-3, "min_lr": 2e-4,
                  "train_seconds": 840.0},
}

# -----------------------------------------------------------------------------
# Data and tokenizer

def is_heldout(key):
    """A fixed one in ten of all possible examples, chosen by a hash of its key, is held out."""
    return zlib.crc32(key.encode("utf-8")) % 10 == 0

ALPHANUMERIC = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"

def reverse_example(rng):
    s = "".join(rng.choices(ALPHANUMERIC, k=rng.randint(1, 20)))
    return s, s[::-1], s  # source, target, key

def add_example(rng):
    """123+045 -> 861, as in minGPT's adder: three digits each, so digits of one place line up,
    and the sum 168 backwards: the decoder adds from the units digit up, carrying as it goes."""
    a, b = (rng.randint(0, 10 ** rng.randint(1, 3) - 1) for _ in range(2))  # 1-3 digits each
    return f"{a:03d}+{b:03d}", str(a + b)[::-1], f"{a}+{b}"

MONTHS = ["January", "February", "March", "April", "May", "June", "July",
          "August", "September", "October", "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

def ordinal(n):
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"

# The ways people write 2019-03-05 (a Tuesday). Slashes put the month first (US), dots the day
# first (Europe); a two-digit year is unambiguous because every date lies in 1950-2049.
DATE_FORMATS = [
    lambda d: f"{WEEKDAYS[d.weekday()]}, {MONTHS[d.month - 1]} {d.day}, {d.year}",  # Tuesday, ...
    lambda d: f"{d.day} {MONTHS[d.month - 1][:3]} {d.year % 100:02d}",  # 5 Mar 19
    lambda d: f"{d.month:02d}/{d.day:02d}/{d.year}",  # 03/05/2019
    lambda d: f"{d.month}/{d.day}/{d.year % 100:02d}",  # 3/5/19
    lambda d: f"the {ordinal(d.day)} of {MONTHS[d.month - 1]} {d.year}",  # the 5th of March 2019
    lambda d: f"{MONTHS[d.month - 1].lower()} {ordinal(d.day)}, {d.year}",  # march 5th, 2019
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",  # 5 March 2019
    lambda d: f"{MONTHS[d.month - 1][:3]} {d.day}, {d.year}",  # Mar 5, 2019
    lambda d: f"{WEEKDAYS[d.weekday()][:3]} {d.day} {MONTHS[d.month - 1][:3]} {d.year}",
    lambda d: f"{d.day:02d}.{d.month:02d}.{d.year}",  # 05.03.2019
    lambda d: f"{WEEKDAYS[d.weekday()].upper()} {d.day} {MONTHS[d.month - 1].upper()} {d.year}",
    lambda d: f"{d.day}-{MONTHS[d.month - 1][:3].lower()}-{d.year}",  # 5-mar-2019
]
FIRST_DATE, N_DAYS = datetime.date(1950, 1, 1), 36525  # 1950-01-01 .. 2049-12-31

def dates_example(rng):
    d = FIRST_DATE + datetime.timedelta(days=rng.randrange(N_DAYS))
    return rng.choice(DATE_FORMATS)(d), d.isoformat(), d.isoformat()  # key: the date, any format

GENERATORS = {"dates": dates_example, "reverse": reverse_example, "add": add_example}

def make_synthetic(task, n_train, val_size, seed):
    """(train, heldout) lists of (source, target). Held-out keys are all different and never
    trained on (for dates: no format of a held-out date is)."""
    make, rng = GENERATORS[task], random.Random(seed)
    heldout, train = {}, []  # heldout: key -> its first (source, target)
    while len(heldout) < val_size:
        src, tgt, key = make(rng)
        if is_heldout(key):
            heldout.setdefault(key, (src, tgt))
    while len(train) < n_train:
        src, tgt, key = make(rng)
        if not is_heldout(key):
            train.append((src, tgt))
    return train, list(heldout.values())

def parse_pairs(lines, name):
    """Lines of English<TAB>Spanish (any further fields, like Tatoeba's attribution, ignored)."""
    pairs = []
    for number, line in enumerate(lines.splitlines(), 1):
        fields = [field.strip() for field in line.split("\t")]
        if len(fields) >= 2 and fields[0] and fields[1]:
            pairs.append((fields[0], fields[1]))
        elif line.strip():
            raise UserError(f"line {number} of {name} is not English<TAB>Spanish: {line[:50]!r}")
    if not pairs:
        raise UserError(f"{name} holds no sentence pairs; give a file of English<TAB>Spanish lines")
    return pairs

def read_translation_pairs(cfg):
    """(English, Spanish) pairs from --pairs_file, or from spa-eng.zip (downloaded on first use)."""
    if cfg.pairs_file:
        try:
            with open(cfg.pairs_file, encoding="utf-8") as f:
                return parse_pairs(f.read(), cfg.pairs_file)
        except (FileNotFoundError, UnicodeDecodeError) as e:
            problem = "not found" if isinstance(e, FileNotFoundError) else "not UTF-8 text"
            raise UserError(f"pairs file {cfg.pairs_file!r} {problem}; "
                            f"give a UTF-8 file of English<TAB>Spanish lines") from None
    path = os.path.join(cfg.data_dir, "spa-eng.zip")
    if not os.path.exists(path):
        download(SPA_ENG_URLS, path, SPA_ENG_SHA256)
    try:
        with zipfile.ZipFile(path) as z:
            return parse_pairs(z.read("spa-eng/spa.txt").decode("utf-8"), path)
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError):
        raise UserError(f"{path} is not the spa-eng.zip of English-Spanish pairs; "
                        f"delete it to download it again") from None

def split_translation_pairs(pairs, val_size, seed):
    """(train, heldout, references). Held out: English sentences of at most 10 words whose hash
    says so, with every pair they are in; all their translations are the references for BLEU."""
    translations = defaultdict(list)
    for en, es in pairs:
        translations[en].append(es)
    chosen = sorted(en for en in translations if is_heldout(en) and len(en.split()) <= 10)
    random.Random(seed).shuffle(chosen)
    chosen = chosen[:val_size]
    train = [(en, es) for en, es in pairs if not is_heldout(en)]
    return train, [(en, translations[en][0]) for en in chosen], [translations[en] for en in chosen]

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
PAD, BOS, EOS, UNK = range(4)

class Tokenizer:
    """Text to integers and back. The synthetic tasks use characters: every one matters.
    translate uses lower-cased words and punctuation marks, with <unk> for rare words: a
    sentence is ~8 words but ~40 characters, and the decoder takes one step per token."""

    def __init__(self, tokens, words):
        self.tokens = tokens  # SPECIALS first, so PAD, BOS, EOS and UNK are 0, 1, 2 and 3
        self.words = words
        self.stoi = {t: i for i, t in enumerate(tokens)}

    def split(self, line):
        return re.findall(r"\w+|[^\w\s]", line.lower()) if self.words else list(line)

    def encode(self, line):
        pieces = self.split(line)
        unknown = sorted(set(pieces) - set(self.stoi))
        if unknown and not self.words:
            raise UserError(f"the model has never seen the character(s) {''.join(unknown)!r}; "
                            f"use only these: {''.join(self.tokens[len(SPECIALS):])!r}")
        return [self.stoi.get(p, UNK) for p in pieces]

    def decode(self, ids):
        if not self.words:
            return "".join(self.tokens[i] for i in ids)
        joined = " ".join(self.tokens[i] for i in ids)
        joined = re.sub(r" ([.,!?;:%)»])", r"\1", joined)  # no space before closing punctuation
        return re.sub(r"([¿¡(«]) ", r"\1", joined)  # nor after opening punctuation

    @staticmethod
    def build(texts, words, min_count=1):
        counts = Counter(piece for t in texts for piece in Tokenizer([], words).split(t))
        return Tokenizer(SPECIALS + sorted(p for p, c in counts.items() if c >= min_count), words)

def load_task(cfg, saved=None):
    """The task's data: tokenizers, train and val as (src ids, tgt ids), heldout as (src, tgt)
    strings and their references (every right answer). `saved`: a checkpoint's vocabularies,
    kept so that the same ids mean the same tokens."""
    words = cfg.task == "translate"
    if words:
        pairs = read_translation_pairs(cfg)
        train, heldout, references = split_translation_pairs(pairs, cfg.val_size, cfg.seed)
    else:
        train, heldout = make_synthetic(cfg.task, cfg.n_train, cfg.val_size, cfg.seed)
        references = [[tgt] for _, tgt in heldout]
    if not train or not heldout:
        raise UserError(f"{cfg.task} has {len(train)} training and {len(heldout)} held-out pairs")
    if saved:
        src_tok, tgt_tok = Tokenizer(saved["src"], words), Tokenizer(saved["tgt"], words)
    else:
        count = cfg.min_count if words else 1
        src_tok = Tokenizer.build([s for s, _ in train], words, count)
        tgt_tok = Tokenizer.build([t for _, t in train], words, count)
    data = SimpleNamespace(src_tok=src_tok, tgt_tok=tgt_tok, heldout=heldout, references=references,
                           train=encode_pairs(train, src_tok, tgt_tok, cfg),
                           val=encode_pairs(heldout, src_tok, tgt_tok, cfg))
    if not data.val or (not words and len(data.train) < len(train)):
        longest = max(max(len(s), len(t)) + 2 for s, t in train)
        raise UserError(f"{cfg.task} has examples of up to {longest} tokens; "
                        f"set --block_size={longest} or more")
    return data

def encode_pairs(pairs, src_tok, tgt_tok, cfg):
    """(src, tgt) strings -> (src ids, tgt ids) that fit block_size, sorted by length. Targets
    are <bos> ... <eos>; sources end with <eos> too, a landmark to count positions from."""
    encoded = [(src_tok.encode(s) + [EOS], [BOS] + tgt_tok.encode(t) + [EOS]) for s, t in pairs]
    encoded = [(s, t) for s, t in encoded if len(s) <= cfg.block_size and len(t) <= cfg.block_size]
    random.Random(cfg.seed).shuffle(encoded)  # spa.txt lists similar sentences together: mix
    return sorted(encoded, key=lambda pair: (len(pair[0]), len(pair[1])))

def collate(pairs):
    """A list of (src ids, tgt ids) -> src (B, S), tgt (B, T), each padded to its longest."""
    S, T = max(len(s) for s, _ in pairs), max(len(t) for _, t in pairs)
    src = torch.tensor([s + [PAD] * (S - len(s)) for s, _ in pairs])  # (B, S)
    tgt = torch.tensor([t + [PAD] * (T - len(t)) for _, t in pairs])  # (B, T)
    return src, tgt

def get_batch(pairs, batch_size, generator, by_length=False):
    """batch_size random examples; or, by_length, a window of the length-sorted pairs: little
    padding, but alike examples whose gradients pull in turns (the synthetic tasks learn slower)."""
    if by_length:
        start = torch.randint(max(len(pairs) - batch_size, 0) + 1, (1,), generator=generator).item()
        return collate(pairs[start:start + batch_size])
    ix = torch.randint(len(pairs), (batch_size,), generator=generator).tolist()
    return collate([pairs[i] for i in ix])

# -----------------------------------------------------------------------------
# Model

@dataclass
class Seq2SeqConfig:
    src_vocab_size: int
    tgt_vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    use_sdpa: bool = True
    label_smoothing: float = 0.0  # part of the loss, so model(src, tgt) gives the training loss

class Attention(nn.Module):
    """Queries from x look at keys and values from `memory` through n_head heads at once:
    self-attention when memory is x, cross-attention when it is the encoder's output. The mask
    is boolean, broadcast to (B, nh, T, L), True = "may attend" (as in gpt.py and SDPA); the
    caller passes it because each use hides something else (padding, the future, or both)."""

    def __init__(self, config):
        super().__init__()
        self.n_head, self.use_sdpa, self.dropout = config.n_head, config.use_sdpa, config.dropout
        C = config.n_embd
        # gpt.py makes q, k and v in one matmul; here queries may come from another sequence
        self.q = nn.Linear(C, C, bias=False)  # what each position is looking for
        self.kv = nn.Linear(C, 2 * C, bias=False)  # what each position offers: keys and values
        self.proj = nn.Linear(C, C, bias=False)  # mixes the heads back into the residual stream
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.att = None  # the last attention weights of the hand-written path, for the picture

    def forward(self, x, memory, mask, cache=None, cross=False):
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        q = self.q(x).view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        if cache and cross:  # decoding: the encoder's keys and values never change
            k, v = cache["k"], cache["v"]  # (B, nh, L, hs)
        else:
            L = memory.size(1)
            k, v = self.kv(memory).split(C, dim=2)  # 2 x (B, L, C)
            k = k.view(B, L, nh, hs).transpose(1, 2)  # (B, nh, L, hs)
            v = v.view(B, L, nh, hs).transpose(1, 2)  # (B, nh, L, hs)
            if cache is not None:  # decoding: prepend the keys and values of the earlier positions
                if cache:
                    k = torch.cat([cache["k"], k], dim=2)  # (B, nh, L, hs)
                    v = torch.cat([cache["v"], v], dim=2)  # (B, nh, L, hs)
                cache["k"], cache["v"] = k, v
        if self.use_sdpa:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, T, L): query-key affinity
            att = att.masked_fill(~mask, float("-inf"))  # padding (and the future) is hidden
            att = F.softmax(att, dim=-1)  # (B, nh, T, L), each row sums to 1
            self.att = att.detach()
            y = self.attn_dropout(att) @ v  # (B, nh, T, hs): a weighted sum of the values
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

class EncoderBlock(nn.Module):
    """Pre-norm: every source position looks at every other (both ways), then thinks alone."""

    def __init__(self, config):
        super().__init__()
        self.ln1, self.ln2 = (nn.LayerNorm(config.n_embd, bias=False) for _ in range(2))
        self.attn, self.mlp = Attention(config), MLP(config)

    def forward(self, x, src_mask):
        h = self.ln1(x)
        x = x + self.attn(h, h, src_mask)  # (B, S, C): self-attention, padding hidden
        return x + self.mlp(self.ln2(x))  # (B, S, C)

class DecoderBlock(nn.Module):
    """Pre-norm: look at the earlier output (causal), then at the source (cross), think alone."""

    def __init__(self, config):
        super().__init__()
        self.ln1, self.ln2, self.ln3 = (nn.LayerNorm(config.n_embd, bias=False) for _ in range(3))
        self.self_attn, self.cross_attn = Attention(config), Attention(config)
        self.mlp = MLP(config)

    def forward(self, x, memory, causal_mask, src_mask, cache=None):
        h = self.ln1(x)
        x = x + self.self_attn(h, h, causal_mask, cache and cache["self"])  # (B, T, C)
        cross = cache and cache["cross"]
        x = x + self.cross_attn(self.ln2(x), memory, src_mask, cross, cross=True)  # (B, T, C)
        return x + self.mlp(self.ln3(x))  # (B, T, C)

def sinusoids(length, channels):
    """The paper's positions, (length, channels): channel pair i of position p holds sin and cos
    of p / 10000^(2i / channels). Nothing is learned (gpt.py learns a vector per position)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]  # (T, 1)
    frequency = torch.exp(-math.log(10000.0) * torch.arange(0, channels, 2) / channels)  # (C/2,)
    pe = torch.zeros(length, channels)  # (T, C)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(position * frequency), torch.cos(position * frequency)
    return pe

class Seq2Seq(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        C = config.n_embd
        self.src_emb = nn.Embedding(config.src_vocab_size, C)
        self.tgt_emb = nn.Embedding(config.tgt_vocab_size, C)
        self.register_buffer("pos", sinusoids(config.block_size, C), persistent=False)  # (T, C)
        self.drop = nn.Dropout(config.dropout)
        self.encoder = nn.ModuleList([EncoderBlock(config) for _ in range(config.n_layer)])
        self.decoder = nn.ModuleList([DecoderBlock(config) for _ in range(config.n_layer)])
        self.ln_enc, self.ln_dec = nn.LayerNorm(C, bias=False), nn.LayerNorm(C, bias=False)
        self.head = nn.Linear(C, config.tgt_vocab_size, bias=False)
        self.head.weight = self.tgt_emb.weight  # weight tying: reading and writing share a vector
        # GPT-2 init as in gpt.py, except the embeddings: N(0, 1/n_embd), times sqrt(n_embd) on
        # the way in (as in the paper), so tokens and position waves start at the same size
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=C ** -0.5 if "emb" in name else std)

    def embed(self, embedding, idx, pos):
        """Token ids (B, T) at positions pos, (T,) or (B, T) -> (B, T, C)."""
        return self.drop(embedding(idx) * math.sqrt(self.config.n_embd) + self.pos[pos])

    def encode(self, src):
        """src (B, S) -> memory (B, S, C), the encoder's reading, and its padding mask."""
        src_mask = (src != PAD)[:, None, None, :]  # (B, 1, 1, S), True = a real token
        # The encoder sees the whole source at once, so where positions count from is a free
        # choice. We count back from the source's last token (its <eos> is 0): then the first
        # output token always sits at the same distance from the source's end, where reverse
        # starts, add's units digit and most dates' year are. From the front, the model would
        # first have to work out each source's length, and learns far more slowly.
        lengths = src_mask[:, 0, 0].sum(dim=1, keepdim=True)  # (B, 1), real tokens per source
        pos = (lengths - 1 - torch.arange(src.size(1), device=src.device)).clamp(min=0)  # (B, S)
        x = self.embed(self.src_emb, src, pos)  # (B, S, C)
        for block in self.encoder:
            x = block(x, src_mask)  # (B, S, C)
        return self.ln_enc(x), src_mask

    def decode(self, tgt, memory, src_mask, caches=None):
        """tgt (B, T) -> logits (B, T, V) for the next token at each position. With caches (one
        {"self": {}, "cross": {}} per block), tgt holds only the new positions."""
        T = tgt.size(1)
        start = caches[0]["self"]["k"].size(2) if caches and caches[0]["self"] else 0
        # query t (key position start + t) sees keys 0 .. start + t. Padding at a target's end
        # needs no mask of its own: real positions never see it, and the loss ignores it.
        causal_mask = torch.ones(T, start + T, dtype=torch.bool, device=tgt.device).tril(start)
        x = self.embed(self.tgt_emb, tgt, torch.arange(start, start + T, device=tgt.device))
        for i, block in enumerate(self.decoder):
            x = block(x, memory, causal_mask, src_mask, caches and caches[i])  # (B, T, C)
        return self.head(self.ln_dec(x))  # (B, T, V)

    def forward(self, src, tgt):
        """Teacher forcing: read tgt[:, :-1], predict tgt[:, 1:] at once. src (B, S), tgt (B, T)
        -> logits (B, T - 1, V) and the mean cross-entropy over the real target tokens."""
        memory, src_mask = self.encode(src)  # (B, S, C)
        logits = self.decode(tgt[:, :-1], memory, src_mask)  # (B, T - 1, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), tgt[:, 1:].reshape(-1),
                               ignore_index=PAD, label_smoothing=self.config.label_smoothing)
        return logits, loss

def build_model(cfg, vocab, state_dict=None):
    """The model the settings describe for vocab = {"src": tokens, "tgt": tokens}, with a
    checkpoint's weights if given."""
    model = Seq2Seq(Seq2SeqConfig(len(vocab["src"]), len(vocab["tgt"]), cfg.block_size,
                                  cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dropout, cfg.use_sdpa,
                                  cfg.label_smoothing))
    if state_dict is not None:
        try:
            model.load_state_dict(state_dict)
        except RuntimeError:
            raise UserError("the checkpoint's weights do not fit this model; "
                            "was it written by another version of seq2seq.py?") from None
    return model.to(cfg.device)


# -----------------------------------------------------------------------------
# Training

def lr_at(step, progress, cfg):
    """The learning-rate multiplier: linear warmup for warmup_iters steps, then cosine from 1
    down to min_lr / learning_rate as progress goes 0 -> 1. (gpt.py also offers
    warmup-stable-decay; here it was measured and lost: see README.)"""
    floor = cfg.min_lr / cfg.learning_rate
    if step < cfg.warmup_iters:
        return (step + 1) / cfg.warmup_iters
    return floor + 0.5 * (1 - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))

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
    inside the blocks go to Muon instead (no decay: it did worse in gpt.py)."""
    hidden = [p for name, p in model.named_parameters() if name.startswith(("encoder.", "decoder."))
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

def set_lr(optimizers, factor):
    for group in (group for opt in optimizers for group in opt.param_groups):
        group["lr"] = group["peak_lr"] * factor

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
def update_average(average, model, step, cfg):
    """average <- decay * average + (1 - decay) * model, weight by weight: a moving average over
    the last ~1 / (1 - decay) steps. At a high learning rate the weights jitter around where they
    are heading; their average sits nearer the middle and answers right long before the learning
    rate has decayed. The decay starts low, so the average soon forgets the random start."""
    decay = min(cfg.ema_decay, (1 + step) / (10 + step))
    for a, p in zip(average.parameters(), model.parameters()):
        a.lerp_(p, 1 - decay)

@torch.no_grad()
def estimate_loss(model, pairs, cfg, autocast):
    """Mean loss over eval_iters batches of `pairs`, the same batches at every call: two
    estimates differ only because the model changed."""
    model.eval()
    generator, total = torch.Generator().manual_seed(cfg.seed), 0.0
    for _ in range(cfg.eval_iters):
        src, tgt = get_batch(pairs, cfg.batch_size, generator, cfg.by_length)
        with autocast:
            total += model(src.to(cfg.device), tgt.to(cfg.device))[1].item()
    model.train()
    return total / cfg.eval_iters

def train(model, data, cfg, ckpt=None):
    """Train until the clock (or max_iters) runs out, saving the best average of the weights
    (update_average); -> (that average, history)."""
    autocast, use_scaler = autocast_for(cfg.device, cfg.dtype)
    optimizers = make_optimizers(model, cfg)
    scaler = torch.amp.GradScaler(enabled=use_scaler)
    generator = torch.Generator().manual_seed(cfg.seed)
    run = SimpleNamespace(step=0, seconds=0.0, best_val_loss=float("inf"), history=[], reached=None)
    average = copy.deepcopy(model)  # evaluated, saved and returned: the model that answers
    if ckpt:
        restore_training(ckpt, model, average, optimizers, generator, run)
    fast = torch.compile(model) if cfg.compile else model
    budget = f"{cfg.train_seconds:.0f}s" if cfg.train_seconds else f"{cfg.max_iters} steps"
    print(f"training for {budget}, {cfg.batch_size * cfg.grad_accum} examples per step"
          + (f", resuming at step {run.step}" if ckpt else ""))

    def state():
        return checkpoint_state(model, average, optimizers, run, cfg, data, generator)

    t_log, step_at_log, first_step, tokens = time.time(), run.step, run.step, 0
    try:
        while True:
            finished = progress(run, cfg) >= 1.0
            # (a resumed run's first step was evaluated before it was saved)
            if (run.step % cfg.eval_interval == 0 and run.step > first_step) or finished:
                t_eval = time.time()
                evaluate_and_save(average, data, cfg, autocast, run, state)
                t_log += time.time() - t_eval  # evaluation time is not training speed
            if finished:
                break
            t0 = time.time()
            set_lr(optimizers, lr_at(run.step, progress(run, cfg), cfg))
            batches = [get_batch(data.train, cfg.batch_size, generator, cfg.by_length)
                       for _ in range(cfg.grad_accum)]
            tokens += sum(int((src != PAD).sum() + (tgt != PAD).sum()) for src, tgt in batches)
            batches = [(src.to(cfg.device), tgt.to(cfg.device)) for src, tgt in batches]
            loss = train_step(fast, optimizers, scaler, autocast, batches, cfg)
            update_average(average, model, run.step, cfg)
            run.step += 1
            run.seconds += time.time() - t0
            if run.step % cfg.log_interval == 0:
                elapsed = time.time() - t_log
                per_step = elapsed / (run.step - step_at_log)
                eta = (1 - progress(run, cfg)) * (cfg.train_seconds or cfg.max_iters * per_step)
                print(progress_line(run.step, loss, optimizers[0].param_groups[0]["lr"], per_step,
                                    tokens / elapsed, "tok", eta))
                t_log, step_at_log, tokens = time.time(), run.step, 0
    except KeyboardInterrupt:
        print(f"\ninterrupted at step {run.step}; the best checkpoint (val loss "
              f"{run.best_val_loss:.4f}) is kept at {cfg.checkpoint}")
        raise
    return average, run.history

TARGET_SCORE = 99.5  # exact match %: a synthetic task's run says when it first gets there

def evaluate_and_save(model, data, cfg, autocast, run, state):
    """Estimate both losses and the held-out score, save the model if the val loss improved, and
    say when the score first reaches TARGET_SCORE."""
    losses = [estimate_loss(model, pairs, cfg, autocast) for pairs in (data.train, data.val)]
    score = heldout_score(model, data, cfg, cfg.eval_examples)[2]
    run.history.append((run.step, *losses))
    note = ""
    if losses[1] < run.best_val_loss:
        run.best_val_loss = losses[1]
        save_checkpoint(cfg.checkpoint, state())
        note = " (best, saved)"
    print(f"step {run.step}: train loss {losses[0]:.4f}, val loss {losses[1]:.4f}, "
          f"{score_name(cfg.task)} {score:.2f} on {min(cfg.eval_examples, len(data.heldout))} "
          f"held-out{note}")
    if cfg.task != "translate" and run.reached is None and score >= TARGET_SCORE:
        run.reached = (run.step, run.seconds)
        print(f"reached {TARGET_SCORE}% at step {run.step}, {run.seconds:.0f} s")

def progress(run, cfg):
    """How far training is, 0 -> 1: by the clock, or by steps when train_seconds = 0."""
    return run.seconds / cfg.train_seconds if cfg.train_seconds else run.step / cfg.max_iters

# -----------------------------------------------------------------------------
# Evaluation and decoding

def new_caches(model):
    return [{"self": {}, "cross": {}} for _ in model.decoder]

@torch.no_grad()
def greedy_decode(model, src, max_len, use_cache=True):
    """src (B, S) -> B lists of output ids, the most likely token at every step, until <eos>.
    The cache feeds the decoder only the newest token; without it, the whole output so far."""
    memory, src_mask = model.encode(src)  # (B, S, C)
    out = torch.full((src.size(0), 1), BOS, dtype=torch.long, device=src.device)  # (B, 1)
    done = torch.zeros(src.size(0), dtype=torch.bool, device=src.device)  # (B,)
    caches = new_caches(model) if use_cache else None
    for _ in range(max_len - 1):
        logits = model.decode(out[:, -1:] if use_cache else out, memory, src_mask, caches)
        next_id = logits[:, -1].argmax(dim=-1).masked_fill(done, PAD)  # (B,)
        out = torch.cat([out, next_id[:, None]], dim=1)  # (B, T + 1)
        done |= next_id == EOS
        if done.all():
            break
    return [row[:row.index(EOS)] if EOS in row else row for row in out[:, 1:].tolist()]

@torch.no_grad()
def beam_search(model, src, beam_size, max_len):
    """src (1, S) -> output ids. Keep beam_size partial outputs; extend each by every token and
    keep the most likely. An output ends at <eos>, scored by its log-probability over its length
    (else short outputs always win). With one beam this is greedy decoding."""
    beams = beam_size
    memory, src_mask = model.encode(src)  # (1, S, C)
    memory, src_mask = memory.expand(beams, -1, -1), src_mask.expand(beams, -1, -1, -1)
    seqs = torch.full((beams, 1), BOS, dtype=torch.long, device=src.device)  # (beams, 1)
    scores = torch.full((beams,), float("-inf"), device=src.device)  # summed log-probabilities
    scores[0] = 0.0  # the beams start identical: keep just one of them
    caches, finished = new_caches(model), []  # finished: (normalised score, ids)
    for t in range(1, max_len):
        logits = model.decode(seqs[:, -1:], memory, src_mask, caches)[:, -1].float()  # (beams, V)
        candidates = (scores[:, None] + F.log_softmax(logits, dim=-1)).view(-1)  # (beams * V,)
        best, flat = candidates.topk(2 * beams)  # at most `beams` of them end here
        kept = []  # (old beam, token, score) of the beams that go on
        for score, i in zip(best.tolist(), flat.tolist()):
            beam, token = divmod(i, logits.size(-1))
            if token != EOS:
                kept.append((beam, token, score))
            elif score > float("-inf"):
                finished.append((score / t, seqs[beam, 1:].tolist()))
            if len(kept) == beams:
                break
        if len(finished) >= beams:
            break
        index, tokens, kept_scores = (torch.tensor(c, device=src.device) for c in zip(*kept))
        seqs = torch.cat([seqs[index], tokens[:, None]], dim=1)  # (beams, t + 1)
        scores = kept_scores.float()  # (beams,)
        for cache in caches:  # self-attention caches follow their beams; cross ones are alike
            cache["self"] = {name: kv[index] for name, kv in cache["self"].items()}
    if not finished:
        finished.append((scores[0].item() / max_len, seqs[0, 1:].tolist()))
    return max(finished, key=lambda f: f[0])[1]

def decode_all(model, sources, cfg, beam_size=1, batch_size=256):
    """Output ids for a list of source id lists: greedy in batches, or beam search one by one."""
    model.eval()
    outputs = []
    for i in range(0, len(sources), batch_size if beam_size == 1 else 1):
        if beam_size == 1:
            src, _ = collate([(s, [BOS]) for s in sources[i:i + batch_size]])
            outputs += greedy_decode(model, src.to(cfg.device), cfg.block_size, cfg.use_cache)
        else:
            src = torch.tensor(sources[i:i + 1], device=cfg.device)  # (1, S)
            outputs.append(beam_search(model, src, beam_size, cfg.block_size))
    model.train()
    return outputs

def ngrams(tokens, n):
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))

def corpus_bleu(hypotheses, references, max_n=4):
    """BLEU (Papineni et al., 2002) in percent, for token lists and, for each, a list of
    reference token lists: the geometric mean of the clipped 1..4-gram precisions over the
    corpus, times a brevity penalty when the output is shorter than the references."""
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references):
        hyp_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]  # the closest length
        for n in range(1, max_n + 1):
            most = Counter()
            for r in refs:
                most |= ngrams(r, n)  # an n-gram counts at most as often as in one reference
            matches[n - 1] += sum(min(c, most[g]) for g, c in ngrams(hyp, n).items())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    if min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
    return 100 * min(1.0, math.exp(1 - ref_len / hyp_len)) * math.exp(log_precision)

def score_name(task):
    return "BLEU" if task == "translate" else "exact match %"

def heldout_score(model, data, cfg, n=None, beam_size=1):
    """Decode the first n held-out sources (all by default); -> (outputs, right, score): right
    says which outputs have the tokens of a reference (translate's keep their capitals), score
    is exact match in percent for the synthetic tasks, corpus BLEU on words for translate."""
    heldout, tok = data.heldout[:n], data.tgt_tok
    sources = [(data.src_tok.encode(s) + [EOS])[:cfg.block_size] for s, _ in heldout]
    outputs = [tok.decode(ids) for ids in decode_all(model, sources, cfg, beam_size)]
    hypotheses = [tok.split(o) for o in outputs]
    references = [[tok.split(r) for r in refs] for refs in data.references[:n]]
    right = [hyp in refs for hyp, refs in zip(hypotheses, references)]
    if cfg.task == "translate":
        return outputs, right, corpus_bleu(hypotheses, references)
    return outputs, right, 100 * sum(right) / len(right)

def attention_picture(model, src_ids, out_ids, src_tok, tgt_tok):
    """The last decoder block's cross-attention, averaged over heads, as characters: a row per
    output token (the one it wrote), a column per source token, darker = more."""
    attn = model.decoder[-1].cross_attn
    attn.use_sdpa = False  # the fused path does not give the weights back
    model.eval()
    with torch.no_grad():
        memory, src_mask = model.encode(torch.tensor([src_ids], device=model.pos.device))
        model.decode(torch.tensor([[BOS] + out_ids], device=model.pos.device), memory, src_mask)
    attn.use_sdpa = model.config.use_sdpa
    model.train()
    weights = attn.att[0].float().mean(dim=0).cpu()  # (T, S), rows sum to 1
    shades = " .:-=+*#%@"
    columns = [src_tok.tokens[i] for i in src_ids]
    widths = [len(c) + (1 if src_tok.words else 0) for c in columns]
    outputs = [tgt_tok.tokens[i] for i in out_ids] + ["<eos>"]
    label = max(len(o) for o in outputs) + 1
    lines = [" " * label + "|" + "".join(c.ljust(w) for c, w in zip(columns, widths))]
    for row, token in zip(weights, outputs):
        cells = [shades[min(int(w * len(shades) / row.max()), len(shades) - 1)]
                 for w in row.tolist()]
        lines.append(token.rjust(label - 1) + " |" + "".join(c * w for c, w in zip(cells, widths)))
    return "\n".join(lines)

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

def report(model, data, cfg):
    """The score on every held-out example (greedy; beam search too for translate), examples,
    the first mistakes and one example's cross-attention; -> the greedy score."""
    outputs, right, score = heldout_score(model, data, cfg)
    n, name = len(data.heldout), score_name(cfg.task)
    print(f"held-out {name} on {n} examples, greedy: {score:.2f}")
    if cfg.beam_size > 1 and cfg.task == "translate":  # the synthetic tasks are scored greedily
        t0 = time.time()
        beam_score = heldout_score(model, data, cfg, beam_size=cfg.beam_size)[2]
        print(f"held-out {name} on {n} examples, beam {cfg.beam_size}: {beam_score:.2f} "
              f"({time.time() - t0:.0f}s)")
    rows = [(src, out, refs[0], ok) for (src, _), out, refs, ok
            in zip(data.heldout, outputs, data.references, right)]
    print("-" * 60 + "\nexamples (source -> greedy output; below it a reference if it is wrong):")
    for src, out, ref, ok in rows[:10]:
        print(f"  {src} -> {out}" + ("" if ok else f"\n  {' ' * len(src)}    {ref}"))
    mistakes = [row for row in rows if not row[3]]
    print(f"first mistakes ({len(mistakes)} of {n} outputs match no reference):")
    for src, out, ref, _ in mistakes[:5]:
        print(f"  {src} -> {out} (expected {ref})")
    longest = max(rows[:10], key=lambda row: len(row[0]))[0]
    print("-" * 60 + f"\ncross-attention of the last decoder block for {longest!r}:")
    answer(model, (data.src_tok.encode(longest) + [EOS])[:cfg.block_size], data, cfg, 1)
    return score

def answer(model, src_ids, data, cfg, beam_size):
    """Decode one source, print the answer and where it looked (each row scaled to its maximum)."""
    if UNK in src_ids:
        print(f"(words the model does not know became <unk>: {data.src_tok.decode(src_ids)})")
    out_ids = decode_all(model, [src_ids], cfg, beam_size)[0]
    print(data.tgt_tok.decode(out_ids))
    print(attention_picture(model, src_ids, out_ids, data.src_tok, data.tgt_tok))
    return data.tgt_tok.decode(out_ids)

def text_ids(src_tok, cfg):
    """--text as source ids, or one line saying why this model cannot read it."""
    src_ids = src_tok.encode(cfg.text) + [EOS]
    if len(src_ids) > cfg.block_size:
        raise UserError(f"--text is {len(src_ids)} tokens long; this model reads at most "
                        f"{cfg.block_size}")
    return src_ids

# -----------------------------------------------------------------------------
# main

MODEL_KEYS = ("task", "n_layer", "n_head", "n_embd", "block_size")

def main(argv=(), **overrides):
    """Train, report and answer --text (or, with --infer, only answer it from the checkpoint).
    From a notebook: main(task="add", train_seconds=30) or main(["--task=add"]).
    Returns model, src_tok, tgt_tok, history, score, answer and cfg in one namespace."""
    argv = list(argv) + [f"--{name}={value}" for name, value in overrides.items()]
    defaults = settings(argv)
    if "--help" in argv or "-h" in argv:
        print(help_text(defaults))
        return None
    cfg, given = parse_args(argv, defaults)
    check_config(cfg)
    ckpt = load_checkpoint(cfg.checkpoint) if cfg.infer or cfg.resume else None
    if ckpt:
        cfg, given = follow_checkpoint_task(argv, cfg, given, ckpt)
        restore_config(cfg, given, ckpt)
    cfg.device = choose_device(cfg.device)
    autocast, _ = autocast_for(cfg.device, cfg.dtype)  # this also refuses a bad --dtype, now
    torch.manual_seed(cfg.seed)
    if cfg.infer:
        words = cfg.task == "translate"
        data = SimpleNamespace(src_tok=Tokenizer(ckpt["data"]["src"], words),
                               tgt_tok=Tokenizer(ckpt["data"]["tgt"], words))
        model = build_model(cfg, ckpt["data"], ckpt["model"])
        print(f"answering with {cfg.checkpoint} (task {cfg.task}, step {ckpt['step']}, "
              f"val loss {ckpt['best_val_loss']:.4f}), beam {cfg.beam_size}")
        output = answer(model, text_ids(data.src_tok, cfg), data, cfg, cfg.beam_size)
        return SimpleNamespace(model=model, src_tok=data.src_tok, tgt_tok=data.tgt_tok,
                               history=ckpt["history"], answer=output, cfg=cfg)
    t_start = time.time()
    check_writable(cfg.checkpoint)
    data = load_task(cfg, ckpt and ckpt["data"])
    src_ids = text_ids(data.src_tok, cfg) if cfg.text else None
    if not cfg.resume:  # a new run never replaces an earlier run's checkpoint
        keep_previous(cfg.checkpoint)
    vocab = {"src": data.src_tok.tokens, "tgt": data.tgt_tok.tokens}
    model = build_model(cfg, vocab, ckpt and ckpt["model"])
    print(f"seq2seq.py | task {cfg.task} | {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"parameters | device {cfg.device} | dtype {cfg.dtype} | vocab {len(vocab['src'])} -> "
          f"{len(vocab['tgt'])} | {len(data.train):,} train / {len(data.val):,} held-out pairs")
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on Ampere+ GPUs: faster, same loss
    model, history = train(model, data, cfg, ckpt)
    best = load_checkpoint(cfg.checkpoint)  # finish with the best model, the one that was saved
    model.load_state_dict(best["model"])
    print(f"best checkpoint: step {best['step']}, val loss {best['best_val_loss']:.4f}\n"
          + plot_losses(history))
    with autocast:
        score = report(model, data, cfg)
        output = answer(model, src_ids, data, cfg, cfg.beam_size) if cfg.text else None
    print(f"run took {format_time(time.time() - t_start)}")
    return SimpleNamespace(model=model, src_tok=data.src_tok, tgt_tok=data.tgt_tok,
                           history=history, score=score, answer=output, cfg=cfg)

# -----------------------------------------------------------------------------
# Plumbing: command line, device and precision, checkpoints, downloads.
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

def settings(argv):
    """This run's defaults: the constants, then the row of TASKS of the task named on the
    command line (or by the `task` constant). A key is a constant or a column, never both."""
    defaults = hyperparameters()
    named = [arg.removeprefix("--task=") for arg in argv if arg.startswith("--task=")]
    chosen = named[-1] if named else defaults["task"]
    if chosen not in TASKS:
        raise UserError(f"unknown task {chosen!r}; choose one of {', '.join(TASKS)}")
    defaults.update(TASKS[chosen], task=chosen)
    defaults["checkpoint"] = defaults["checkpoint"].replace("{task}", chosen)
    return defaults

def follow_checkpoint_task(argv, cfg, given, ckpt):
    """--infer and --resume without --task go on with the checkpoint's task and its TASKS row."""
    saved = ckpt["config"].get("task")
    if "task" in given or saved == cfg.task:
        return cfg, given
    argv = argv + [f"--task={saved}", f"--checkpoint={cfg.checkpoint}"]
    return parse_args(argv, settings(argv))

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
        # seq2seq.py's own settings
        (cfg.beam_size < 1, "--beam_size must be at least 1 (1 = greedy decoding)"),
        (not 0 <= cfg.min_lr <= cfg.learning_rate, "--min_lr must lie in [0, --learning_rate]"),
        (cfg.block_size < 3, "--block_size must be at least 3: <bos>, one token and <eos>"),
        (min(cfg.n_train, cfg.val_size, cfg.eval_examples, cfg.min_count) < 1,
         "--n_train, --val_size, --eval_examples and --min_count must be at least 1"),
        (not (0 <= cfg.dropout < 1 and 0 <= cfg.label_smoothing < 1 and 0 <= cfg.ema_decay < 1),
         "--dropout, --label_smoothing and --ema_decay must lie in [0, 1)"),
        (cfg.infer and not cfg.text.strip(), "--infer needs a source: e.g. --text='5 Mar 19'"),
        (cfg.optimizer not in ("muon", "adamw"), "--optimizer must be one of muon, adamw"),
    ]
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

def checkpoint_state(model, average, optimizers, run, cfg, data, generator):
    """Everything a later run needs: the averaged weights (the model that answers) and the
    trained ones, optimizer state, progress, settings, vocabularies and the random state (so a
    resumed run draws the same batches)."""
    return {"script": "seq2seq.py", "config": vars(cfg), "model": average.state_dict(),
            "train_weights": model.state_dict(),
            "optimizers": [opt.state_dict() for opt in optimizers], "step": run.step,
            "seconds": run.seconds, "best_val_loss": run.best_val_loss, "history": run.history,
            "rng": {"torch": torch.get_rng_state(), "batches": generator.get_state()},
            "data": {"src": data.src_tok.tokens, "tgt": data.tgt_tok.tokens}}

def restore_training(ckpt, model, average, optimizers, generator, run):
    """Continue exactly where the checkpoint stopped: both sets of weights, optimizer state,
    progress, random state."""
    if len(ckpt["optimizers"]) != len(optimizers):  # AdamW alone, or AdamW and Muon
        used = ckpt["config"].get("optimizer", "adamw")  # checkpoints from before Muon: AdamW
        raise UserError(f"the checkpoint was trained with --optimizer={used}; "
                        f"add --optimizer={used} to resume it")
    model.load_state_dict(ckpt.get("train_weights", ckpt["model"]))  # older files: no average
    average.load_state_dict(ckpt["model"])
    for opt, saved in zip(optimizers, ckpt["optimizers"]):
        opt.load_state_dict(saved)
    run.step, run.seconds = ckpt["step"], ckpt["seconds"]
    run.best_val_loss, run.history = ckpt["best_val_loss"], ckpt["history"]
    generator.set_state(ckpt["rng"]["batches"])
    torch.set_rng_state(ckpt["rng"]["torch"])

def save_checkpoint(path, state):
    """Write to a temporary name, then rename: a crash mid-write never destroys the checkpoint."""
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)

def load_checkpoint(path):
    """A checkpoint written by this script, or one clear line saying why not."""
    script = "seq2seq.py"
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
    return ckpt

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

SPA_ENG_URLS = ["https://storage.googleapis.com/download.tensorflow.org/data/spa-eng.zip",
                "http://storage.googleapis.com/download.tensorflow.org/data/spa-eng.zip"]
SPA_ENG_SHA256 = "0c4fd7825d3d872488d38c157f784e035edab4f2ff0df25a2a208790ecb5b58f"

def download(urls, path, checksum):
    """Fetch the first of `urls` that works into `path`, checking its sha256 first: a failed or
    corrupted download leaves nothing behind, and a crash mid-write only path.part."""
    print(f"downloading {urls[0]} to {path}")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    problems = []
    for url in urls:
        try:
            response = requests.get(url, timeout=30)  # 2.6 MB: held in memory until checked
            response.raise_for_status()
            if hashlib.sha256(response.content).hexdigest() != checksum:
                raise ValueError("the file's sha256 is not the expected one")
            with open(path + ".part", "wb") as f:
                f.write(response.content)
            os.replace(path + ".part", path)
            return path
        except (requests.RequestException, OSError, ValueError) as e:
            problems.append(f"{url}: {type(e).__name__}")
    raise UserError(f"could not download {os.path.basename(path)} ({'; '.join(problems)}); "
                    f"fetch it from {urls[0]} yourself and put it at {path}")

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
