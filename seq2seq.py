"""
seq2seq.py - the original encoder-decoder Transformer, written out in one file you can read top to bottom.

"Attention Is All You Need" translates: an encoder reads the whole source in both directions,
a decoder writes the answer one token at a time and looks back at the source through
cross-attention. This file trains that model on one of four tasks and shows it working:

    dates      "Tuesday, March 5, 2019", "5 Mar 19", "the 5th of March 2019" ... -> "2019-03-05"
    reverse    "a7Kq2" -> "2qK7a"
    add        "123+045" -> "861" (168 written backwards, units digit first, as you add on paper)
    translate  English -> Spanish, 118,964 Tatoeba sentence pairs (downloaded once, 2.6 MB)

    pip install -r requirements.txt
    python seq2seq.py                        # dates: ~3 minutes on a laptop CPU
    python seq2seq.py --task=reverse         # or add: ~2 minutes
    python seq2seq.py --task=translate       # ~16 minutes (14 of training)
    python seq2seq.py --text="the 4th of July 1976"           # answer with the saved model
    python seq2seq.py --task=translate --text="I like cats."
    python seq2seq.py --help                 # every constant with its comment

What you should see: a header (parameters, device, data), a progress line every few
seconds (step, loss, ms/step, tokens/s, ETA), the train/val loss and the held-out score
every `eval_interval` steps, then the final score on 2,000 held-out examples that never
occur in training (exact match for the synthetic tasks, BLEU for translate, greedy and
beam search), a few examples, the first mistakes, and the cross-attention of one example
drawn in the terminal: which source characters each output character looked at.

Differences from gpt.py, on purpose: two stacks of blocks instead of one (the encoder's
attention is not causal and hides only padding; the decoder adds cross-attention); fixed
sinusoidal positions instead of learned ones, counted back from the end in the source;
batches of whole examples padded to their longest, where gpt.py cuts windows from one long
text.

Shapes in the comments: B = batch, S = source length, T = target length, C = channels
(n_embd), nh = number of heads, hs = head size (C // nh), V = vocabulary size, L = length of
the keys (S for cross-attention; T, or the cached length plus T, for self-attention),
K = beam size.
"""

import contextlib
import datetime
import hashlib
import math
import os
import random
import re
import sys
import time
import zipfile
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from types import SimpleNamespace

import requests
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Hyperparameters (override any of them on the command line: --name=value)
# data
task = "dates"  # dates, reverse, add or translate; the last three change a few constants (TASK_DEFAULTS)
n_train = 200000  # training examples generated for a synthetic task (translate uses every pair)
n_heldout = 2000  # held-out examples, never seen in training, for the final score
pairs_file = ""  # translate: a file of English<TAB>Spanish lines to use instead of the download
data_dir = "data"  # translate: where spa-eng.zip is downloaded to and read from
min_count = 3  # translate: words seen fewer times in training become <unk>
# model
n_layer = 2  # blocks in the encoder, and as many again in the decoder
n_head = 4  # attention heads per block; each head sees n_embd // n_head channels
n_embd = 64  # width of the residual stream; the synthetic tasks need little
block_size = 48  # longest source or target in tokens (with <bos> and <eos>); longer pairs are left out
dropout = 0.0  # the synthetic tasks have endless fresh examples, so nothing to regularise
use_sdpa = True  # fused F.scaled_dot_product_attention; False runs the hand-written attention
# optimisation
batch_size = 64  # examples per micro-step
by_length = False  # batches of similar lengths: less padding, but less varied (translate turns it on)
grad_accum = 1  # micro-steps per optimizer step; batch_size * grad_accum examples per step
learning_rate = 3e-3  # peak learning rate; tiny models tolerate a high one
min_lr = 3e-4  # the cosine decay ends here (1/10 of the peak, as in Chinchilla)
warmup_iters = 200  # linear warmup steps: Adam's statistics are poor for the first steps
weight_decay = 0.1  # applied to 2-D weights only (matmuls, embeddings), not to LayerNorm gains
beta2 = 0.99  # Adam's second-moment decay; 0.99 suits small batches better than 0.999
grad_clip = 1.0  # clip the global gradient norm to this (0 = off)
label_smoothing = 0.1  # the target gets 90% of the probability, the rest is spread out (as in the paper)
train_seconds = 140.0  # wall-clock training budget; the schedule decays over it (0 = use max_iters)
max_iters = 5000  # optimizer steps, used when train_seconds = 0
# evaluation and logging
eval_interval = 500  # estimate train/val loss and the held-out score (and maybe save) every this many steps
eval_iters = 10  # batches per loss estimate
eval_examples = 200  # held-out examples decoded for the score shown during training
log_interval = 100  # print a progress line every this many steps
# decoding
beam_size = 4  # beams for --text and for translate's second BLEU score (1 = greedy only)
text = ""  # answer this source with the saved checkpoint, without training
use_cache = True  # KV cache: each output token costs one position; False recomputes them all (same answers)
# system
checkpoint = "out/seq2seq-{task}.pt"  # where the best model is saved, resumed and answered from
resume = False  # continue training from `checkpoint`
device = "auto"  # auto = cuda, then mps, then cpu; or name one
dtype = "auto"  # auto = bfloat16 on CUDA (float16 if unsupported), float32 elsewhere
compile = False  # torch.compile the model: faster steps after a slow first one
seed = 1337  # seed for the data, initialisation and batches
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


# The constants above suit dates. The other tasks change a few of them; the command line still wins.
TASK_DEFAULTS = {
    "dates": {},
    # reverse first has to find where to look (its loss sits still for several hundred steps), so it gets
    # smaller batches and twice the steps in the same time
    "reverse": {"train_seconds": 90.0, "batch_size": 32},
    "add": {"train_seconds": 95.0},
    # real sentences need a wider, deeper model; in 14 minutes it sees the data ~3 times, too few to overfit
    "translate": {"n_layer": 3, "n_embd": 128, "block_size": 24, "learning_rate": 2e-3, "min_lr": 2e-4,
                  "train_seconds": 840.0, "by_length": True},
}


def settings(argv):
    """The constants, then the task's own defaults, then the command line."""
    cfg = parse_args(argv)
    if cfg.task not in TASK_DEFAULTS:
        raise UserError(f"unknown task {cfg.task!r}; choose one of {', '.join(TASK_DEFAULTS)}")
    given = {arg.removeprefix("--").partition("=")[0] for arg in argv}
    for name, value in TASK_DEFAULTS[cfg.task].items():
        if name not in given:
            setattr(cfg, name, value)
    cfg.checkpoint = cfg.checkpoint.format(task=cfg.task)
    return cfg

# -----------------------------------------------------------------------------
# Data and tokenizer


def is_heldout(key):
    """A fixed one in ten of all possible examples, chosen by a hash of its key, is never trained on."""
    return zlib.crc32(key.encode("utf-8")) % 10 == 0


ALPHANUMERIC = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def reverse_example(rng):
    s = "".join(rng.choices(ALPHANUMERIC, k=rng.randint(1, 20)))
    return s, s[::-1], s  # source, target, key


def add_example(rng):
    """123+045 -> 861, as in minGPT's adder: the operands are written with three digits, so digits of one
    place sit at the same positions, and the sum 168 comes backwards: people add from the units digit up,
    carrying as they go, and so can the decoder, which sees the digits it has already written."""
    a, b = (rng.randint(0, 10 ** rng.randint(1, 3) - 1) for _ in range(2))  # 1, 2 or 3 digits, equally often
    return f"{a:03d}+{b:03d}", str(a + b)[::-1], f"{a}+{b}"


MONTHS = ["January", "February", "March", "April", "May", "June", "July",
          "August", "September", "October", "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def ordinal(n):
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


# The ways people write 2019-03-05 (a Tuesday). Slashes put the month first (US), dots the day
# first (Europe); a two-digit year is unambiguous because every date lies in 1950-2049.
DATE_FORMATS = [
    lambda d: f"{WEEKDAYS[d.weekday()]}, {MONTHS[d.month - 1]} {d.day}, {d.year}",  # Tuesday, March 5, 2019
    lambda d: f"{d.day} {MONTHS[d.month - 1][:3]} {d.year % 100:02d}",  # 5 Mar 19
    lambda d: f"{d.month:02d}/{d.day:02d}/{d.year}",  # 03/05/2019
    lambda d: f"{d.month}/{d.day}/{d.year % 100:02d}",  # 3/5/19
    lambda d: f"the {ordinal(d.day)} of {MONTHS[d.month - 1]} {d.year}",  # the 5th of March 2019
    lambda d: f"{MONTHS[d.month - 1].lower()} {ordinal(d.day)}, {d.year}",  # march 5th, 2019
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",  # 5 March 2019
    lambda d: f"{MONTHS[d.month - 1][:3]} {d.day}, {d.year}",  # Mar 5, 2019
    lambda d: f"{WEEKDAYS[d.weekday()][:3]} {d.day} {MONTHS[d.month - 1][:3]} {d.year}",  # Tue 5 Mar 2019
    lambda d: f"{d.day:02d}.{d.month:02d}.{d.year}",  # 05.03.2019
    lambda d: f"{WEEKDAYS[d.weekday()].upper()} {d.day} {MONTHS[d.month - 1].upper()} {d.year}",  # TUESDAY 5 MARCH 2019
    lambda d: f"{d.day}-{MONTHS[d.month - 1][:3].lower()}-{d.year}",  # 5-mar-2019
]
FIRST_DATE, N_DAYS = datetime.date(1950, 1, 1), 36525  # 1950-01-01 .. 2049-12-31


def dates_example(rng):
    d = FIRST_DATE + datetime.timedelta(days=rng.randrange(N_DAYS))
    return rng.choice(DATE_FORMATS)(d), d.isoformat(), d.isoformat()  # the key is the date, whatever its format


GENERATORS = {"dates": dates_example, "reverse": reverse_example, "add": add_example}


def make_synthetic(task, n_train, n_heldout, seed):
    """(train, heldout) lists of (source, target) strings. Held-out keys are all different, and no
    training example has a held-out key (for dates: no format of a held-out date is trained on)."""
    make, rng = GENERATORS[task], random.Random(seed)
    heldout, keys = [], set()
    while len(heldout) < n_heldout:
        src, tgt, key = make(rng)
        if is_heldout(key) and key not in keys:
            keys.add(key)
            heldout.append((src, tgt))
    train = []
    while len(train) < n_train:
        src, tgt, key = make(rng)
        if not is_heldout(key):
            train.append((src, tgt))
    return train, heldout


SPA_ENG_URLS = ["https://storage.googleapis.com/download.tensorflow.org/data/spa-eng.zip",
                "http://storage.googleapis.com/download.tensorflow.org/data/spa-eng.zip"]
SPA_ENG_SHA256 = "0c4fd7825d3d872488d38c157f784e035edab4f2ff0df25a2a208790ecb5b58f"


def download(urls, path, checksum):
    """Fetch the first of `urls` that works into `path`, checking its sha256. The bytes go to
    path + '.part' first and are renamed only when complete and correct, so a failure leaves nothing."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    part = path + ".part"
    problems = []
    for url in urls:
        try:
            sha = hashlib.sha256()
            with requests.get(url, stream=True, timeout=30) as response:
                response.raise_for_status()
                with open(part, "wb") as f:
                    for chunk in response.iter_content(1 << 16):
                        f.write(chunk)
                        sha.update(chunk)
            if sha.hexdigest() != checksum:
                raise ValueError("the file's sha256 is not the expected one")
            os.replace(part, path)
            return path
        except (requests.RequestException, OSError, ValueError) as e:
            problems.append(f"{url}: {type(e).__name__}")
            if os.path.exists(part):
                os.remove(part)
    raise UserError(f"could not download {os.path.basename(path)} ({'; '.join(problems)}); "
                    f"fetch it from {urls[0]} yourself and put it at {path}")


def find_path(path):
    """Relative paths are tried in the current folder, then beside this script (as gpt.py does)."""
    if not os.path.isabs(path) and not os.path.exists(path):
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), path)
    return path


def parse_pairs(text, name):
    """Lines of English<TAB>Spanish (any further fields, like Tatoeba's attribution, are ignored)."""
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or not fields[0].strip() or not fields[1].strip():
            raise UserError(f"line {number} of {name} is not English<TAB>Spanish: {line[:50]!r}")
        pairs.append((fields[0].strip(), fields[1].strip()))
    if not pairs:
        raise UserError(f"{name} holds no sentence pairs; give a file of English<TAB>Spanish lines")
    return pairs


def read_translation_pairs(cfg):
    """(English, Spanish) pairs from --pairs_file, or from spa-eng.zip (downloaded on first use)."""
    if cfg.pairs_file:
        path = find_path(cfg.pairs_file)
        try:
            with open(path, encoding="utf-8") as f:
                return parse_pairs(f.read(), path)
        except FileNotFoundError:
            raise UserError(f"pairs file {path!r} not found; give a file of English<TAB>Spanish lines") from None
        except UnicodeDecodeError:
            raise UserError(f"pairs file {path!r} is not UTF-8 text") from None
    path = os.path.join(find_path(cfg.data_dir), "spa-eng.zip")
    if not os.path.exists(path):
        print(f"downloading {SPA_ENG_URLS[0]} to {path}")
        download(SPA_ENG_URLS, path, SPA_ENG_SHA256)
    try:
        with zipfile.ZipFile(path) as z:
            text = z.read("spa-eng/spa.txt").decode("utf-8")
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError):
        raise UserError(f"{path} is not the spa-eng.zip of English-Spanish pairs; delete it to download it again") from None
    return parse_pairs(text, path)


def split_translation_pairs(pairs, n_heldout, seed):
    """(train, heldout, references). Held out: English sentences of at most 10 words whose hash says so;
    every pair with such an English sentence is kept out of training, and all their Spanish
    translations in the data become the references for BLEU."""
    translations = defaultdict(list)
    for en, es in pairs:
        translations[en].append(es)
    candidates = sorted(en for en in translations if is_heldout(en) and len(en.split()) <= 10)
    random.Random(seed).shuffle(candidates)
    chosen = candidates[:n_heldout]
    train = [(en, es) for en, es in pairs if not is_heldout(en)]
    heldout = [(en, translations[en][0]) for en in chosen]
    return train, heldout, [translations[en] for en in chosen]


SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
PAD, BOS, EOS, UNK = range(4)


class Tokenizer:
    """Text to integers and back.

    The synthetic tasks use characters: their sources are short and every character matters.
    translate uses lower-cased words and punctuation marks, with <unk> for rare words: a sentence
    is ~8 words but ~40 characters, and attention costs grow with the square of the length while
    the decoder takes one step per token, so words are several times faster to train and decode.
    Words seen at least 3 times cover 99% of the English and 98% of the Spanish running text.
    """

    def __init__(self, tokens, words):
        self.tokens = tokens  # SPECIALS first, so PAD, BOS, EOS and UNK are 0, 1, 2 and 3
        self.words = words
        self.stoi = {t: i for i, t in enumerate(tokens)}

    def split(self, text):
        return re.findall(r"\w+|[^\w\s]", text.lower()) if self.words else list(text)

    def encode(self, text):
        pieces = self.split(text)
        if self.words:
            return [self.stoi.get(p, UNK) for p in pieces]
        try:
            return [self.stoi[p] for p in pieces]
        except KeyError:
            unknown = sorted(set(pieces) - set(self.stoi))
            raise UserError(f"the model has never seen the character(s) {''.join(unknown)!r}; "
                            f"use only these: {''.join(self.tokens[len(SPECIALS):])!r}") from None

    def decode(self, ids):
        pieces = [self.tokens[i] for i in ids]
        if not self.words:
            return "".join(pieces)
        text = " ".join(pieces)
        text = re.sub(r" ([.,!?;:%)»])", r"\1", text)  # no space before closing punctuation
        return re.sub(r"([¿¡(«]) ", r"\1", text)  # nor after opening punctuation

    @staticmethod
    def build(texts, words, min_count=1):
        split = Tokenizer([], words).split
        counts = Counter(piece for t in texts for piece in split(t))
        return Tokenizer(SPECIALS + sorted(p for p, c in counts.items() if c >= min_count), words)


def load_task(cfg, src_tokens=None, tgt_tokens=None):
    """The task's tokenizers and data: {"train": [(src ids, tgt ids)], "val": [...], "heldout": [(src, tgt) strings],
    "references": [[tgt strings]]}. Targets are wrapped in <bos> ... <eos>."""
    if cfg.task == "translate":
        train, heldout, references = split_translation_pairs(read_translation_pairs(cfg), cfg.n_heldout, cfg.seed)
        words, count = True, cfg.min_count
    else:
        train, heldout = make_synthetic(cfg.task, cfg.n_train, cfg.n_heldout, cfg.seed)
        references = [[tgt] for _, tgt in heldout]
        words, count = False, 1
    if not train or not heldout:
        raise UserError(f"{cfg.task} has {len(train)} training and {len(heldout)} held-out pairs; give more data")
    # a resumed run keeps the checkpoint's vocabularies, so the same ids mean the same tokens
    src_tok = Tokenizer(src_tokens, words) if src_tokens else Tokenizer.build([s for s, _ in train], words, count)
    tgt_tok = Tokenizer(tgt_tokens, words) if tgt_tokens else Tokenizer.build([t for _, t in train], words, count)

    # Sources end with <eos> too: a landmark at the end to count from (reverse needs one)
    def encode(pairs):  # sorted by length, for get_batch's by_length batches
        encoded = [(src_tok.encode(s) + [EOS], [BOS] + tgt_tok.encode(t) + [EOS]) for s, t in pairs]
        encoded = [(s, t) for s, t in encoded if len(s) <= cfg.block_size and len(t) <= cfg.block_size]
        random.Random(cfg.seed).shuffle(encoded)  # spa.txt lists similar sentences together; batches should mix them
        return sorted(encoded, key=lambda pair: (len(pair[0]), len(pair[1])))

    data = {"train": encode(train), "val": encode(heldout), "heldout": heldout, "references": references}
    if cfg.task != "translate" and len(data["train"]) < len(train):
        longest = max(max(len(src_tok.encode(s)), len(t)) + 2 for s, t in train)
        raise UserError(f"{cfg.task} has examples of {longest} tokens; set --block_size={longest} or more")
    return src_tok, tgt_tok, data


def collate(pairs, pad=PAD):
    """A list of (src ids, tgt ids) -> src (B, S), tgt (B, T), each padded to its own longest sequence."""
    S, T = max(len(s) for s, _ in pairs), max(len(t) for _, t in pairs)
    src = torch.tensor([s + [pad] * (S - len(s)) for s, _ in pairs])  # (B, S)
    tgt = torch.tensor([t + [pad] * (T - len(t)) for _, t in pairs])  # (B, T)
    return src, tgt


def get_batch(pairs, batch_size, generator, by_length=False):
    """batch_size examples, padded to the longest of them. `pairs` is sorted by length. by_length takes a
    window of it, examples of about the same length, which wastes little work on padding: translate's
    sentences run from 2 to 24 words, and random batches made its steps twice as slow. But such batches
    are alike (all short sums, all long strings), and their gradients pull in turns: on `add` they gave
    54% exact match after 100 s of training where random batches give 95% after 40 s."""
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
    pad_id: int = 0  # the token that fills batches up to their longest sequence


class Attention(nn.Module):
    """Queries from x look at keys and values from `memory` through n_head heads at once:
    self-attention when memory is x itself, cross-attention when it is the encoder's output.

    Mask convention (the same as gpt.py and F.scaled_dot_product_attention): a boolean mask
    broadcast to (B, nh, T, L) where True means "this query may attend to this key".
    gpt.py makes its causal mask inside; here the caller passes the mask, because the encoder
    hides padding, the decoder's self-attention hides the future and its cross-attention hides
    the source's padding.
    """

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = config.n_head
        self.use_sdpa = config.use_sdpa
        self.dropout = config.dropout
        # gpt.py makes q, k and v in one matmul; here queries may come from another sequence than keys
        self.q = nn.Linear(config.n_embd, config.n_embd, bias=False)  # what each position is looking for
        self.kv = nn.Linear(config.n_embd, 2 * config.n_embd, bias=False)  # what each position offers: keys and values
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)  # mixes the heads back into the residual stream
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.att = None  # the last attention weights of the hand-written path, for the picture

    def forward(self, x, memory, mask, cache=None, cross=False):
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        q = self.q(x).view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None and cross and cache:  # decoding: the encoder's keys and values never change
            k, v = cache["k"], cache["v"]  # (B, nh, L, hs)
        else:
            L = memory.size(1)
            k, v = self.kv(memory).split(C, dim=2)  # 2 x (B, L, C)
            k = k.view(B, L, nh, hs).transpose(1, 2)  # (B, nh, L, hs)
            v = v.view(B, L, nh, hs).transpose(1, 2)  # (B, nh, L, hs)
            if cache is not None:
                if cache and not cross:  # decoding: prepend the keys and values of the earlier positions
                    k = torch.cat([cache["k"], k], dim=2)  # (B, nh, L, hs)
                    v = torch.cat([cache["v"], v], dim=2)  # (B, nh, L, hs)
                cache["k"], cache["v"] = k, v
        if self.use_sdpa:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, T, L): how much each query likes each key
            att = att.masked_fill(~mask, float("-inf"))  # padding (and, in the decoder, the future) is hidden
            att = F.softmax(att, dim=-1)  # (B, nh, T, L), each row sums to 1
            self.att = att.detach()
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


class EncoderBlock(nn.Module):
    """Pre-norm block: every source position looks at every other (both ways), then thinks alone."""

    def __init__(self, config):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd, bias=False)
        self.attn = Attention(config)
        self.ln2 = nn.LayerNorm(config.n_embd, bias=False)
        self.mlp = MLP(config)

    def forward(self, x, src_mask):
        h = self.ln1(x)
        x = x + self.attn(h, h, src_mask)  # (B, S, C): self-attention, padding hidden
        x = x + self.mlp(self.ln2(x))  # (B, S, C)
        return x


class DecoderBlock(nn.Module):
    """Pre-norm block: look at the earlier output (causal), then at the source (cross), then think alone."""

    def __init__(self, config):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd, bias=False)
        self.self_attn = Attention(config)
        self.ln2 = nn.LayerNorm(config.n_embd, bias=False)
        self.cross_attn = Attention(config)
        self.ln3 = nn.LayerNorm(config.n_embd, bias=False)
        self.mlp = MLP(config)

    def forward(self, x, memory, causal_mask, src_mask, cache=None):
        h = self.ln1(x)
        x = x + self.self_attn(h, h, causal_mask, cache and cache["self"])  # (B, T, C): the output so far
        x = x + self.cross_attn(self.ln2(x), memory, src_mask, cache and cache["cross"], cross=True)  # (B, T, C)
        x = x + self.mlp(self.ln3(x))  # (B, T, C)
        return x


def sinusoids(length, channels):
    """The paper's position encoding, (length, channels): channel pair i of position p holds
    sin and cos of p / 10000^(2i / channels), waves from 2*pi to 10000*2*pi positions long.
    Nothing is learned (gpt.py learns one vector per position instead): the model can tell
    positions apart, and how far apart two are, from these fixed patterns."""
    position = torch.arange(length, dtype=torch.float32)[:, None]  # (T, 1)
    frequency = torch.exp(-math.log(10000.0) * torch.arange(0, channels, 2, dtype=torch.float32) / channels)  # (C/2,)
    pe = torch.zeros(length, channels)  # (T, C)
    pe[:, 0::2] = torch.sin(position * frequency)
    pe[:, 1::2] = torch.cos(position * frequency)
    return pe


class Seq2Seq(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.src_emb = nn.Embedding(config.src_vocab_size, config.n_embd)
        self.tgt_emb = nn.Embedding(config.tgt_vocab_size, config.n_embd)
        self.register_buffer("pos", sinusoids(config.block_size, config.n_embd), persistent=False)  # (T, C)
        self.drop = nn.Dropout(config.dropout)
        self.encoder = nn.ModuleList([EncoderBlock(config) for _ in range(config.n_layer)])
        self.ln_enc = nn.LayerNorm(config.n_embd, bias=False)
        self.decoder = nn.ModuleList([DecoderBlock(config) for _ in range(config.n_layer)])
        self.ln_dec = nn.LayerNorm(config.n_embd, bias=False)
        self.head = nn.Linear(config.n_embd, config.tgt_vocab_size, bias=False)
        self.head.weight = self.tgt_emb.weight  # weight tying: reading and writing a token share one vector
        # GPT-2 init as in gpt.py (no biases either), except the embeddings: N(0, 1/n_embd), multiplied by
        # sqrt(n_embd) on the way in (as in the paper), so tokens and the position waves start at the same size
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=config.n_embd ** -0.5 if "emb" in name else std)

    def embed(self, embedding, idx, pos):
        """Token ids (B, T) at positions pos, (T,) or (B, T) -> (B, T, C)."""
        assert pos.max() < self.config.block_size, f"sequence of {int(pos.max()) + 1} exceeds block_size"
        return self.drop(embedding(idx) * math.sqrt(self.config.n_embd) + self.pos[pos])  # (B, T, C)

    def encode(self, src):
        """src (B, S) -> memory (B, S, C), the encoder's reading of the source, and its padding mask (B, 1, 1, S)."""
        S = src.size(1)
        src_mask = (src != self.config.pad_id)[:, None, None, :]  # (B, 1, 1, S), True = a real token
        # The encoder sees the whole source at once, so where its positions count from is a free choice.
        # We count back from the source's last token (its <eos> is 0): then the first output token always
        # sits at the same distance from the source's end, where reverse starts, add's units digit and
        # most dates' year are. Counted from the front, the model would first have to work out each
        # source's length (reverse then needs ~500 more steps to leave its first loss plateau).
        lengths = src_mask[:, 0, 0].sum(dim=1, keepdim=True)  # (B, 1), real tokens per source
        pos = (lengths - 1 - torch.arange(S, device=src.device)).clamp(min=0)  # (B, S); padding is masked anyway
        x = self.embed(self.src_emb, src, pos)  # (B, S, C)
        for block in self.encoder:
            x = block(x, src_mask)  # (B, S, C)
        return self.ln_enc(x), src_mask

    def decode(self, tgt, memory, src_mask, caches=None):
        """tgt (B, T) -> logits (B, T, V) for the token after each position.
        With caches (one {"self": {}, "cross": {}} per block), tgt holds only the new positions."""
        T = tgt.size(1)
        start = caches[0]["self"]["k"].size(2) if caches and caches[0]["self"] else 0  # positions already cached
        # query t (at key position start + t) may see keys 0 .. start + t. Padding at the end of a target
        # needs no mask of its own: real positions never see it, and the loss ignores padded ones.
        causal_mask = torch.ones(T, start + T, dtype=torch.bool, device=tgt.device).tril(diagonal=start)  # (T, L)
        x = self.embed(self.tgt_emb, tgt, torch.arange(start, start + T, device=tgt.device))  # (B, T, C)
        for i, block in enumerate(self.decoder):
            x = block(x, memory, causal_mask, src_mask, caches[i] if caches is not None else None)  # (B, T, C)
        return self.head(self.ln_dec(x))  # (B, T, V)

    def forward(self, src, tgt, label_smoothing=0.0):
        """Teacher forcing: the decoder reads tgt[:, :-1] and predicts tgt[:, 1:], all positions at once.
        src (B, S), tgt (B, T) -> logits (B, T - 1, V) and the mean cross-entropy over real target tokens."""
        memory, src_mask = self.encode(src)  # (B, S, C)
        logits = self.decode(tgt[:, :-1], memory, src_mask)  # (B, T - 1, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), tgt[:, 1:].reshape(-1),
                               ignore_index=self.config.pad_id, label_smoothing=label_smoothing)
        return logits, loss

# -----------------------------------------------------------------------------
# Training


def choose_device(name):
    """CUDA, then Apple's MPS, then the CPU."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
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
def estimate_loss(model, data, cfg, autocast):
    """Mean loss over eval_iters batches of the training and held-out pairs. The batches are the
    same at every call, so two estimates differ only because the model changed."""
    model.eval()
    out = {}
    for name in ("train", "val"):
        generator = torch.Generator().manual_seed(cfg.seed)
        losses = []
        for _ in range(cfg.eval_iters):
            src, tgt = get_batch(data[name], cfg.batch_size, generator, cfg.by_length)
            with autocast:
                losses.append(model(src.to(cfg.device), tgt.to(cfg.device), cfg.label_smoothing)[1].item())
        out[name] = sum(losses) / len(losses)
    model.train()
    return out


def save_checkpoint(path, state):
    """Write to a temporary name, then rename: a crash mid-write never destroys the previous checkpoint."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


MODEL_KEYS = ("task", "n_layer", "n_head", "n_embd", "block_size")


def load_checkpoint(path, cfg):
    """Load a checkpoint written by this script, refusing one from another script or of another shape."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path!r}; train first with python seq2seq.py --task={cfg.task}") from None
    except Exception as e:
        raise UserError(f"{path!r} is not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("script") != "seq2seq.py":
        owner = ckpt.get("script", "something else") if isinstance(ckpt, dict) else "something else"
        raise UserError(f"{path!r} was written by {owner}, not seq2seq.py; point --checkpoint at a seq2seq.py checkpoint")
    differ = [f"{k}={ckpt['config'][k]} (you have {getattr(cfg, k)})"
              for k in MODEL_KEYS if ckpt["config"][k] != getattr(cfg, k)]
    if differ:
        raise UserError(f"{path!r} holds a model with {', '.join(differ)}; set the same values or use a new --checkpoint")
    return ckpt


def model_config(cfg, src_tok, tgt_tok):
    return Seq2SeqConfig(len(src_tok.tokens), len(tgt_tok.tokens), cfg.block_size, cfg.n_layer, cfg.n_head,
                         cfg.n_embd, cfg.dropout, cfg.use_sdpa, PAD)


def build_model(config, state_dict=None):
    model = Seq2Seq(config)
    if state_dict is not None:
        try:
            model.load_state_dict(state_dict)
        except RuntimeError:
            raise UserError("the checkpoint's weights do not fit this model; was it written by another version?") from None
    return model


def format_time(seconds):
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def train(cfg):
    """Train on cfg.task, keep the best checkpoint, and return the model, tokenizers, data and history."""
    cfg.device = choose_device(cfg.device)
    torch.manual_seed(cfg.seed)
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on Ampere+ GPUs: much faster, same loss
    autocast, use_scaler = autocast_for(cfg.device, cfg.dtype)

    ckpt = load_checkpoint(cfg.checkpoint, cfg) if cfg.resume else None
    src_tok, tgt_tok, data = load_task(cfg, *((ckpt["src_tokens"], ckpt["tgt_tokens"]) if ckpt else ()))
    config = model_config(cfg, src_tok, tgt_tok)
    raw_model = build_model(config, ckpt["model"] if ckpt else None).to(cfg.device)
    optimizer = make_optimizer(raw_model, cfg, cfg.device)
    scaler = torch.amp.GradScaler(enabled=use_scaler)
    generator = torch.Generator().manual_seed(cfg.seed)
    step, best_val, trained_seconds, history = 0, float("inf"), 0.0, []
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        step, best_val, trained_seconds, history = ckpt["step"], ckpt["best_val_loss"], ckpt["seconds"], ckpt["history"]
        generator.set_state(ckpt["rng"]["batches"])
        torch.set_rng_state(ckpt["rng"]["torch"])
    model = torch.compile(raw_model) if cfg.compile else raw_model

    n_params = sum(p.numel() for p in raw_model.parameters())
    print(f"seq2seq.py | task {cfg.task} | {n_params / 1e6:.2f}M parameters | device {cfg.device} | dtype {cfg.dtype} | "
          f"vocab {config.src_vocab_size} -> {config.tgt_vocab_size} | "
          f"{len(data['train']):,} train / {len(data['val']):,} held-out pairs")
    budget = f"{cfg.train_seconds:.0f}s" if cfg.train_seconds else f"{cfg.max_iters} steps"
    print(f"training for {budget}, {cfg.batch_size * cfg.grad_accum} examples per step"
          + (f", resuming at step {step}" if ckpt else ""))

    def progress():
        if cfg.train_seconds:
            return trained_seconds / cfg.train_seconds
        return step / cfg.max_iters

    def checkpoint_state():
        return {"script": "seq2seq.py", "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "step": step, "best_val_loss": best_val, "seconds": trained_seconds, "history": history,
                "config": vars(cfg), "src_tokens": src_tok.tokens, "tgt_tokens": tgt_tok.tokens,
                "rng": {"torch": torch.get_rng_state(), "batches": generator.get_state()}}

    t_log, step_at_log, tokens = time.time(), step, 0
    try:
        while True:
            finished = progress() >= 1.0
            if (step % cfg.eval_interval == 0 and step > 0) or finished:
                t_eval = time.time()
                losses = estimate_loss(raw_model, data, cfg, autocast)
                score = heldout_score(raw_model, src_tok, tgt_tok, data, cfg, cfg.eval_examples)
                state = checkpoint_state()
                history.append((step, losses["train"], losses["val"]))
                note = ""
                if losses["val"] < best_val:
                    best_val = state["best_val_loss"] = losses["val"]
                    state["history"] = history
                    save_checkpoint(cfg.checkpoint, state)
                    note = f" (best, saved to {cfg.checkpoint})"
                print(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
                      f"{score_name(cfg.task)} {score:.2f} on {cfg.eval_examples} held-out{note}")
                t_log += time.time() - t_eval  # evaluation time is not training speed
            if finished:
                break
            t0 = time.time()
            lr = lr_at(step, progress(), cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for _ in range(cfg.grad_accum):
                src, tgt = get_batch(data["train"], cfg.batch_size, generator, cfg.by_length)
                tokens += int((src != PAD).sum() + (tgt != PAD).sum())
                src, tgt = src.to(cfg.device), tgt.to(cfg.device)
                with autocast:
                    _, loss = model(src, tgt, cfg.label_smoothing)
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
                print(f"step {step:5d} | loss {loss.item():.4f} | lr {lr:.2e} | {ms:.1f} ms/step | "
                      f"{tokens / elapsed:,.0f} tok/s | ETA {format_time(eta)}")
                t_log, step_at_log, tokens = time.time(), step, 0
    except KeyboardInterrupt:
        print(f"\ninterrupted at step {step}; the best checkpoint (val loss {best_val:.4f}) is kept at {cfg.checkpoint}")
        raise
    return raw_model, src_tok, tgt_tok, data, autocast

# -----------------------------------------------------------------------------
# Evaluation and decoding


def new_caches(model):
    return [{"self": {}, "cross": {}} for _ in model.decoder]


def until_eos(ids):
    return ids[:ids.index(EOS)] if EOS in ids else ids


@torch.no_grad()
def greedy_decode(model, src, max_len, use_cache=True):
    """src (B, S) -> B lists of output ids: at every step the single most likely next token, until <eos>.
    With the cache each step feeds the decoder only the newest token; without it, the whole output so far."""
    memory, src_mask = model.encode(src)  # (B, S, C)
    out = torch.full((src.size(0), 1), BOS, dtype=torch.long, device=src.device)  # (B, 1)
    done = torch.zeros(src.size(0), dtype=torch.bool, device=src.device)  # (B,)
    caches = new_caches(model) if use_cache else None
    for _ in range(max_len - 1):
        logits = model.decode(out[:, -1:] if use_cache else out, memory, src_mask, caches)  # (B, T, V)
        next_id = logits[:, -1].argmax(dim=-1).masked_fill(done, PAD)  # (B,)
        out = torch.cat([out, next_id[:, None]], dim=1)  # (B, T + 1)
        done |= next_id == EOS
        if done.all():
            break
    return [until_eos(row) for row in out[:, 1:].tolist()]


@torch.no_grad()
def beam_search(model, src, beam_size, max_len):
    """src (1, S) -> output ids. K partial outputs are kept; each step extends all of them by every
    token and keeps the K most likely. An output ends at <eos>, scored by its log-probability
    divided by its length (else short outputs always win). With K = 1 this is greedy decoding."""
    K = beam_size
    memory, src_mask = model.encode(src)  # (1, S, C)
    memory, src_mask = memory.expand(K, -1, -1), src_mask.expand(K, -1, -1, -1)  # (K, S, C), (K, 1, 1, S)
    seqs = torch.full((K, 1), BOS, dtype=torch.long, device=src.device)  # (K, 1)
    scores = torch.full((K,), float("-inf"), device=src.device)  # (K,) summed log-probabilities
    scores[0] = 0.0  # the K beams start identical: keep just one of them
    caches, finished = new_caches(model), []  # finished: (normalised score, ids)
    for t in range(1, max_len):
        logits = model.decode(seqs[:, -1:], memory, src_mask, caches)[:, -1].float()  # (K, V)
        candidates = (scores[:, None] + F.log_softmax(logits, dim=-1)).view(-1)  # (K * V,)
        best, flat = candidates.topk(2 * K)  # (2K,): at most K of them end here, so K can go on
        beams, tokens, kept = [], [], []
        for score, i in zip(best.tolist(), flat.tolist()):
            beam, token = divmod(i, logits.size(-1))
            if token == EOS:
                if score > float("-inf"):
                    finished.append((score / t, seqs[beam, 1:].tolist()))
            else:
                beams.append(beam)
                tokens.append(token)
                kept.append(score)
            if len(beams) == K:
                break
        if len(finished) >= K:
            break
        index = torch.tensor(beams, device=src.device)  # (K,): which old beam each new one extends
        seqs = torch.cat([seqs[index], torch.tensor(tokens, device=src.device)[:, None]], dim=1)  # (K, t + 1)
        scores = torch.tensor(kept, device=src.device)  # (K,)
        for cache in caches:  # the self-attention caches follow their beams; the cross ones are all alike
            cache["self"]["k"], cache["self"]["v"] = cache["self"]["k"][index], cache["self"]["v"][index]
    if not finished:
        finished.append((scores[0].item() / max_len, seqs[0, 1:].tolist()))
    return max(finished, key=lambda f: f[0])[1]


def decode_all(model, sources, cfg, beam_size=1, batch_size=256):
    """Output ids for a list of source id lists: greedy in batches, or beam search (always cached) one by one."""
    model.eval()
    outputs = []
    if beam_size == 1:
        for i in range(0, len(sources), batch_size):
            src, _ = collate([(s, [BOS]) for s in sources[i:i + batch_size]])
            outputs += greedy_decode(model, src.to(cfg.device), cfg.block_size, cfg.use_cache)
    else:
        for s in sources:
            outputs.append(beam_search(model, torch.tensor([s], device=cfg.device), beam_size, cfg.block_size))
    model.train()
    return outputs


def ngrams(tokens, n):
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(hypotheses, references, max_n=4):
    """BLEU (Papineni et al., 2002) in percent. hypotheses: token lists; references: for each
    hypothesis, a list of token lists. The geometric mean of the clipped 1..4-gram precisions over
    the whole corpus, times a brevity penalty when the output is shorter than the references."""
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references):
        hyp_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]  # the closest reference length
        for n in range(1, max_n + 1):
            most = Counter()
            for r in refs:
                most |= ngrams(r, n)  # an n-gram counts at most as often as in any one reference
            matches[n - 1] += sum(min(c, most[g]) for g, c in ngrams(hyp, n).items())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    if min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
    brevity = min(1.0, math.exp(1 - ref_len / hyp_len))
    return 100 * brevity * math.exp(log_precision)


def score_name(task):
    return "BLEU" if task == "translate" else "exact match %"


def score(task, outputs, references, tgt_tok):
    """Exact match in percent for the synthetic tasks; corpus BLEU on words for translate."""
    if task == "translate":
        return corpus_bleu([tgt_tok.split(o) for o in outputs], [[tgt_tok.split(r) for r in refs] for refs in references])
    return 100 * sum(o == refs[0] for o, refs in zip(outputs, references)) / len(outputs)


def heldout_score(model, src_tok, tgt_tok, data, cfg, n):
    """The score of the first n held-out examples, decoded greedily."""
    sources = [(src_tok.encode(s) + [EOS])[:cfg.block_size] for s, _ in data["heldout"][:n]]
    outputs = [tgt_tok.decode(ids) for ids in decode_all(model, sources, cfg)]
    return score(cfg.task, outputs, data["references"][:n], tgt_tok)


def attention_picture(model, src_ids, out_ids, src_tok, tgt_tok):
    """The last decoder block's cross-attention for one example, averaged over heads, as characters:
    one row per output token (the token that row wrote), one column per source token, darker = more."""
    hand_written = [block.cross_attn for block in model.decoder]
    for attn in hand_written:  # the fused path does not give the weights back
        attn.use_sdpa = False
    try:
        model.eval()
        device = model.pos.device
        with torch.no_grad():
            memory, src_mask = model.encode(torch.tensor([src_ids], device=device))
            model.decode(torch.tensor([[BOS] + out_ids], device=device), memory, src_mask)
    finally:
        for attn in hand_written:
            attn.use_sdpa = model.config.use_sdpa
        model.train()
    weights = hand_written[-1].att[0].mean(dim=0).cpu()  # (T, S), each row sums to 1
    shades = " .:-=+*#%@"
    columns = [src_tok.tokens[i] for i in src_ids]
    widths = [len(c) + (1 if src_tok.words else 0) for c in columns]
    outputs = [tgt_tok.tokens[i] for i in out_ids] + ["<eos>"]
    label = max(len(o) for o in outputs) + 1
    lines = [" " * label + "|" + "".join(c.ljust(w) for c, w in zip(columns, widths))]
    for row, token in zip(weights, outputs):
        cells = [shades[min(int(w * len(shades) / row.max()), len(shades) - 1)] for w in row.tolist()]
        lines.append(token.rjust(label - 1) + " |" + "".join(c * w for c, w in zip(cells, widths)))
    return "\n".join(lines)


def answer(cfg):
    """Load the checkpoint and answer cfg.text, with beam search and the cross-attention picture."""
    cfg.device = choose_device(cfg.device)
    ckpt = load_checkpoint(cfg.checkpoint, cfg)
    words = cfg.task == "translate"
    src_tok, tgt_tok = Tokenizer(ckpt["src_tokens"], words), Tokenizer(ckpt["tgt_tokens"], words)
    src_ids = src_tok.encode(cfg.text) + [EOS]
    if len(src_ids) == 1:
        raise UserError("--text is empty; give a source to answer, e.g. --text='5 Mar 19'")
    if len(src_ids) > cfg.block_size:
        raise UserError(f"--text is {len(src_ids)} tokens long; this model reads at most {cfg.block_size}")
    model = build_model(model_config(cfg, src_tok, tgt_tok), ckpt["model"]).to(cfg.device)
    model.eval()
    out_ids = decode_all(model, [src_ids], cfg, cfg.beam_size)[0]
    print(f"answering with {cfg.checkpoint} (step {ckpt['step']}, val loss {ckpt['best_val_loss']:.4f}), beam {cfg.beam_size}")
    if UNK in src_ids:
        print(f"(words the model does not know became <unk>: {src_tok.decode(src_ids)})")
    print(tgt_tok.decode(out_ids))
    print(attention_picture(model, src_ids, out_ids, src_tok, tgt_tok))


def report(model, src_tok, tgt_tok, data, cfg):
    """The final score on every held-out example (greedy, then beam search), examples and the first mistakes."""
    sources = [(src_tok.encode(s) + [EOS])[:cfg.block_size] for s, _ in data["heldout"]]
    n = len(sources)

    def matches(out, refs):  # the same tokens (translate's references keep their capital letters)
        return tgt_tok.split(out) in [tgt_tok.split(r) for r in refs]

    greedy_ids = decode_all(model, sources, cfg)
    greedy = [tgt_tok.decode(ids) for ids in greedy_ids]
    print(f"held-out {score_name(cfg.task)} on {n} examples, greedy: {score(cfg.task, greedy, data['references'], tgt_tok):.2f}")
    if cfg.beam_size > 1 and cfg.task == "translate":  # the synthetic tasks are scored greedily
        t0 = time.time()
        beam = [tgt_tok.decode(ids) for ids in decode_all(model, sources, cfg, cfg.beam_size)]
        print(f"held-out {score_name(cfg.task)} on {n} examples, beam {cfg.beam_size}: "
              f"{score(cfg.task, beam, data['references'], tgt_tok):.2f} ({time.time() - t0:.0f}s)")
    print("-" * 60)
    print("examples (source -> greedy output; a reference below when it matches none):")
    for (src, _), out, refs in list(zip(data["heldout"], greedy, data["references"]))[:10]:
        print(f"  {src} -> {out}" + ("" if matches(out, refs) else f"\n  {' ' * len(src)}    {refs[0]}"))
    mistakes = [(src, out, refs) for (src, _), out, refs in zip(data["heldout"], greedy, data["references"])
                if not matches(out, refs)]
    print(f"first mistakes ({len(mistakes)} of {n} outputs match no reference):")
    for src, out, refs in mistakes[:5]:
        print(f"  {src} -> {out} (expected {refs[0]})")
    print("-" * 60)
    i = max(range(min(n, 10)), key=lambda j: len(sources[j]))  # the longest of the ten examples
    src, out_ids = sources[i], greedy_ids[i]
    print(f"cross-attention of the last decoder block for {data['heldout'][i][0]!r} (each row scaled to its maximum):")
    print(attention_picture(model, src, out_ids, src_tok, tgt_tok))


def main(argv):
    cfg = settings(argv)
    if cfg.text:
        answer(cfg)
        return
    t_start = time.time()
    model, src_tok, tgt_tok, data, autocast = train(cfg)
    ckpt = load_checkpoint(cfg.checkpoint, cfg)  # finish with the best model, the one that was saved
    model.load_state_dict(ckpt["model"])
    print(f"best checkpoint: step {ckpt['step']}, val loss {ckpt['best_val_loss']:.4f}")
    with autocast:
        report(model, src_tok, tgt_tok, data, cfg)
    print(f"run took {format_time(time.time() - t_start)}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)
