"""vit.py - a Vision Transformer, written out in one file you can read top to bottom.

It learns to read handwritten digits (MNIST) or photos of clothes (Fashion-MNIST): cut each
28x28 image into square patches, make every patch a token with one Linear layer (gpt.py looks
characters up in a table instead), add a learned position per patch and a CLS token, and run
gpt.py's pre-norm Transformer blocks without the causal mask: an image has no "future". The CLS
token's output gives the class. Trained with AdamW, warmup and cosine decay, label smoothing
and random shifts, and mirror images for clothes (a classifier sees the same 55,000 pictures
many times); tested once, at the end, each test image read five ways and the answers averaged.

    python vit.py                      # download MNIST (12 MB), train ~6 minutes, then test
    python vit.py --dataset=fashion    # the same model on Fashion-MNIST (see DATASETS)
    python vit.py --infer --index=7    # test image 7, the checkpoint's answer and its attention
    python vit.py --resume             # continue from the best checkpoint
    python vit.py --help               # every option with the value this run would use
    main(n_layer=2)                    # in a notebook, after pasting this file into a cell

You should see a header, a progress line every log_interval steps, the held-out loss and
accuracy every eval_interval steps, then the test accuracy, the confusion matrix, a few test
images drawn beside where the model looked, and the loss curve: about 6 minutes in all (10
for Fashion-MNIST), on a laptop CPU too (train_seconds is the budget; a GPU does more steps).

Shapes: B batch, H, W image height and width (28), P patch size, N patches (H/P * W/P),
T tokens (N, and one for CLS), C channels (n_embd), nh heads, hs head size (C // nh), K classes.
"""

import gzip
import hashlib
import linecache
import math
import os
import re
import struct
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import requests
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Hyperparameters (edit them here, or override one run: --name=value)
# data
dataset = "mnist"  # mnist (handwritten digits) or fashion (Zalando's photos of clothes)
data_dir = "data/{dataset}"  # folder for the four .gz files; downloaded into it when missing
val_size = 5000  # held-out training images (a count, where gpt.py holds out a text's fraction)
# model
patch_size = 7  # 28x28 images become 4x4 = 16 patches of 7x7; 4 gives 49 finer, dearer tokens
n_layer = 4  # number of Transformer blocks
n_head = 4  # attention heads per block; each head sees n_embd // n_head channels
n_embd = 64  # width of the residual stream
pool = "cls"  # cls = classify from an extra CLS token; mean = from the average of the patches
mlp = "relu2"  # ReLU squared, as in gpt.py: here it learns faster than GELU (README) ["gelu"]
dropout = 0.0  # shifted or mirrored images are augmentation enough for minutes of training
use_sdpa = True  # fused F.scaled_dot_product_attention; False runs the hand-written attention
# optimisation (train_seconds is in DATASETS)
batch_size = 128  # images per micro-step
grad_accum = 1  # micro-steps per optimizer step; batch_size * grad_accum images per step
learning_rate = 1e-3  # peak learning rate, reached after the warmup
min_lr = 1e-5  # the cosine decay ends here, so the last steps settle the weights
warmup_iters = 200  # linear warmup steps: Adam's statistics are poor for the first steps
weight_decay = 0.05  # applied to 2-D weights only (matmuls, embeddings), not to LayerNorm gains
beta2 = 0.99  # Adam's second-moment decay; 0.99 suits small batches better than 0.999
grad_clip = 1.0  # clip the global gradient norm to this (0 = off)
label_smoothing = 0.1  # aim for 0.9 on the right class, not 1.0: the model stays less sure
max_iters = 5000  # optimizer steps, used when train_seconds = 0
# evaluation and logging
eval_interval = 1000  # measure the held-out loss and accuracy (and maybe save) this often
log_interval = 100  # print a progress line every this many steps
num_show = 4  # test images drawn at the end: the first ones the model got right and wrong
# prediction
infer = False  # load `checkpoint` and show test image `index`, without training
index = 0  # which test image --infer shows
# system
checkpoint = "out/vit-{dataset}.pt"  # where the best model is saved, resumed and loaded from
resume = False  # continue training from `checkpoint`
device = "auto"  # auto = cuda, then mps, then cpu; or name one
dtype = "auto"  # auto = bfloat16 on CUDA (float16 if unsupported), float32 elsewhere
compile = False  # torch.compile the model: faster steps after a slow first one
seed = 1337  # seed for initialisation, batches and augmentation

# What differs between the datasets, one row each; edit a row here (a name that is a constant
# above is never a column too). Fashion-MNIST also trains on mirror images, and longer: its
# classes are harder to tell apart (a shirt from a T-shirt), and its small model overfits less
# with both augmentations. Trained on shifts, a model reads each test image five ways (classify).
DATASETS = {
    "mnist": {
        "train_seconds": 325.0,  # wall-clock budget; the schedule decays over it (0 = max_iters)
        "shift": 1,  # augmentation: move training images by up to this many pixels; test 5 ways
        "flip": False,  # augmentation: mirror half the images (a mirrored 7 is no digit)
    },
    "fashion": {
        "train_seconds": 550.0,  # wall-clock budget; the schedule decays over it (0 = max_iters)
        "shift": 1,  # augmentation: move training images by up to this many pixels; test 5 ways
        "flip": True,  # augmentation: mirror half the images (a mirrored coat is a coat)
    },
}

# -----------------------------------------------------------------------------
# Data and tokenizer (for images, the "tokenizer" cuts each one into patches)

CLASSES = {"mnist": [str(k) for k in range(10)],
           "fashion": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                       "Sneaker", "Bag", "Ankle boot"]}

def load_dataset(name, data_dir):
    """Train and test images (N, H, W) uint8 with labels (N,), and the class names."""
    mirrors, md5s = SOURCES[name]
    arrays = []
    for file, md5 in zip(FILES, md5s):
        path = os.path.join(data_dir, file)
        if not os.path.exists(path):  # files already in the folder are trusted, as torchvision does
            download([mirror + file for mirror in mirrors], path, md5)
        arrays.append(torch.from_numpy(read_idx(path)))
    train_x, train_y, test_x, test_y = arrays  # (60000, H, W), (60000,), (10000, H, W), (10000,)
    return {"train": (train_x, train_y.long()), "test": (test_x, test_y.long()),
            "classes": CLASSES[name]}

def random_shift(images, shift, generator):
    """Move each image (B, H, W) by up to `shift` pixels, filling with black: one gather."""
    B, H, W = images.shape
    padded = F.pad(images, (shift, shift, shift, shift))  # (B, H + 2s, W + 2s)
    dy, dx = torch.randint(0, 2 * shift + 1, (2, B, 1), generator=generator)  # (B, 1): a corner
    rows, cols = dy + torch.arange(H), dx + torch.arange(W)  # (B, H), (B, W)
    return padded[torch.arange(B)[:, None, None], rows[:, :, None], cols[:, None, :]]  # (B, H, W)

def get_batch(images, labels, batch_size, generator, shift=0, flip=False):
    """batch_size random images as floats in [0, 1] (B, H, W), shifted and mirrored, and their
    labels (B,)."""
    ix = torch.randint(len(images), (batch_size,), generator=generator)  # (B,)
    x = images[ix]  # (B, H, W), still uint8: four times less memory traffic than floats
    if shift:
        x = random_shift(x, shift, generator)
    if flip:  # mirror a random half of the images left to right
        mirror = torch.rand(batch_size, generator=generator) < 0.5  # (B,)
        x = torch.where(mirror[:, None, None], x.flip(2), x)
    return x.float() / 255, labels[ix]

def patchify(images, P):
    """Cut images (B, H, W) into non-overlapping P x P patches, row by row: (B, N, P*P)."""
    B, H, W = images.shape
    x = images.view(B, H // P, P, W // P, P)  # (B, H/P, P, W/P, P)
    x = x.permute(0, 1, 3, 2, 4)  # (B, H/P, W/P, P, P): the patch grid first, its pixels last
    return x.reshape(B, (H // P) * (W // P), P * P)  # (B, N, P*P)

# -----------------------------------------------------------------------------
# Model

@dataclass
class ViTConfig:
    image_size: int = 28
    patch_size: int = 7
    n_classes: int = 10
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 96
    pool: str = "cls"
    mlp: str = "relu2"
    dropout: float = 0.0
    use_sdpa: bool = True
    label_smoothing: float = 0.0

class SelfAttention(nn.Module):
    """Every token looks at every token, through n_head heads at once: gpt.py's
    CausalSelfAttention without the mask, since all patches of an image are there at once."""

    def __init__(self, config):
        super().__init__()
        self.n_head, self.use_sdpa, self.dropout = config.n_head, config.use_sdpa, config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)  # q, k, v in one matmul
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)  # mixes the heads back
        self.att = None  # the last attention weights of the hand-written path, for the picture

    def forward(self, x):
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        p = self.dropout if self.training else 0.0
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        if self.use_sdpa:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (B, nh, T, hs)
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, T, T): query-key affinity
            # no mask here: gpt.py hides the future at this point, but an image has no future
            att = F.softmax(att, dim=-1)  # (B, nh, T, T), each row sums to 1
            self.att = att.detach()
            y = F.dropout(att, p) @ v  # (B, nh, T, hs): a weighted sum of the values
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C), heads side by side again
        return F.dropout(self.proj(y), p)  # (B, T, C)

class MLP(nn.Module):
    """Each token thinks on its own: widen 4x, a nonlinearity, narrow back."""

    def __init__(self, config):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)
        self.act = (lambda h: F.relu(h).square()) if config.mlp == "relu2" else F.gelu
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.proj(self.act(self.fc(x))))  # (B, T, C)

class Block(nn.Module):
    """Pre-norm Transformer block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd, bias=False)
        self.attn = SelfAttention(config)
        self.ln2 = nn.LayerNorm(config.n_embd, bias=False)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))  # (B, T, C): tokens talk to each other
        return x + self.mlp(self.ln2(x))  # (B, T, C): each token computes alone

class ViT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        # The patch embedding: flatten each P x P patch and apply one Linear to it. A Conv2d with
        # kernel P and stride P is the same operation (each output pixel is one patch times the
        # same weights); a test shows it. Writing it as reshape + Linear shows what a token is.
        self.patch_emb = nn.Linear(config.patch_size ** 2, config.n_embd, bias=False)
        # CLS token versus mean pooling: the CLS token is one extra learned token that collects,
        # through attention, what the classifier needs; its attention row shows where the model
        # looks. Mean pooling averages the patch outputs instead: no extra token, often as good
        # on small data (Beyer et al. 2022, "Better plain ViT baselines"), but no single
        # attention row to draw, so its picture is the attention each patch receives on average.
        cls = config.pool == "cls"
        self.cls_token = nn.Parameter(torch.zeros(1, config.n_embd)) if cls else None
        n_tokens = (config.image_size // config.patch_size) ** 2 + cls
        self.pos_emb = nn.Embedding(n_tokens, config.n_embd)  # where each token is: learned
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=False)
        self.head = nn.Linear(config.n_embd, config.n_classes, bias=False)
        # GPT-2 init: N(0, 0.02) for every matrix, and the layers that write into the residual
        # stream scaled by 1/sqrt(2 * n_layer), so the stream's variance does not grow with depth.
        # There are no biases: the LayerNorms re-centre anyway, and leaving them out saves time.
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, images, targets=None):
        """images (B, H, W) in [0, 1] -> logits (B, K), and the mean loss if targets are given."""
        x = self.patch_emb(patchify(images, self.config.patch_size))  # (B, N, C)
        B, N, C = x.shape
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(B, 1, C), x], dim=1)  # (B, T, C), CLS first
        x = self.drop(x + self.pos_emb.weight)  # (B, T, C); every image uses all T positions
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        x = self.ln_f(x)  # (B, T, C)
        logits = self.head(x[:, 0] if self.cls_token is not None else x.mean(dim=1))  # (B, K)
        if targets is None:
            return logits, None
        # label smoothing in validation too, so that the train and val losses compare
        smoothing = self.config.label_smoothing
        return logits, F.cross_entropy(logits.float(), targets, label_smoothing=smoothing)

def build_model(cfg, n_classes, weights=None):
    """A ViT of the sizes in cfg on cfg.device, holding a checkpoint's weights when given."""
    model = ViT(ViTConfig(28, cfg.patch_size, n_classes, cfg.n_layer, cfg.n_head, cfg.n_embd,
                          cfg.pool, cfg.mlp, cfg.dropout, cfg.use_sdpa, cfg.label_smoothing))
    if weights is not None:
        model.load_state_dict(weights)
    return model.to(cfg.device)

# -----------------------------------------------------------------------------
# Training

def lr_at(step, progress, cfg):
    """The learning-rate multiplier: linear warmup for warmup_iters steps, then cosine from 1
    down to min_lr / learning_rate as progress goes 0 -> 1. (gpt.py also offers Muon and
    warmup-stable-decay; Muon was measured here and did not pay for its time: see README.)"""
    floor = cfg.min_lr / cfg.learning_rate
    if step < cfg.warmup_iters:
        return (step + 1) / cfg.warmup_iters
    return floor + 0.5 * (1 - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))

def make_optimizers(model, cfg):
    """[AdamW], decaying the 2-D weights (matmuls, embeddings) but not the LayerNorm gains.
    A list, as in gpt.py, where Muon joins it."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # update all tensors at once: one fused kernel on CUDA, batched ("foreach") ops elsewhere
    batched = {"fused": True} if cfg.device.startswith("cuda") else {"foreach": True}
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, cfg.beta2), **batched)
    for group in optimizer.param_groups:
        group["peak_lr"] = group["lr"]  # lr_at scales this peak
    return [optimizer]

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

def classify(model, images, views=1):
    """The logits (B, K) for images (B, H, W). With views=5 the model reads each image five ways,
    as it is and moved one pixel up, down, left and right, as it saw them in training, and the
    five answers are averaged: test-time augmentation, a few wrong answers fewer for 5x the work."""
    logits, _ = model(images)  # (B, K)
    if views == 1:
        return logits
    H, W = images.shape[1:]
    padded = F.pad(images, (1, 1, 1, 1))  # (B, H + 2, W + 2)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):  # the window's corner: down, up, right, left
        logits = logits + model(padded[:, dy:dy + H, dx:dx + W])[0]  # (B, K)
    return logits / 5

@torch.no_grad()
def estimate_loss(model, images, labels, cfg, autocast, views=1, batch_size=500):
    """The mean loss over images (N, H, W) uint8 with labels (N,), and each prediction (N,).
    Every image counts, where gpt.py samples eval_iters batches: a few thousand are cheap."""
    model.eval()
    total, predictions = 0.0, []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(cfg.device).float() / 255  # (B, H, W)
        y = labels[i:i + batch_size].to(cfg.device)  # (B,)
        with autocast:
            logits = classify(model, x, views)  # (B, K)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        total += loss.item() * len(x)
        predictions.append(logits.argmax(dim=-1).cpu())  # (B,)
    model.train()
    return total / len(images), torch.cat(predictions)

def evaluate_and_save(model, optimizers, splits, run, cfg, autocast, classes):
    """Measure both splits, add them to the history, and save when the val loss is the best."""
    (train_loss, _), (val_loss, guesses) = [estimate_loss(model, *split, cfg, autocast)
                                            for split in splits]
    run.history.append((run.step, train_loss, val_loss))
    note = ""
    if val_loss < run.best_val_loss:
        run.best_val_loss, note = val_loss, f" (best, saved to {cfg.checkpoint})"
        save_checkpoint(cfg.checkpoint, {
            "script": "vit.py", "config": vars(cfg), "model": model.state_dict(),
            "optimizers": [opt.state_dict() for opt in optimizers], "step": run.step,
            "seconds": run.seconds, "best_val_loss": val_loss, "history": run.history,
            "rng": {"torch": torch.get_rng_state(), "batches": run.generator.get_state()},
            "data": {"classes": classes}})
    accuracy = (guesses == splits[1][1]).float().mean().item()
    print(f"step {run.step}: train loss {train_loss:.4f} | val loss {val_loss:.4f} | "
          f"val accuracy {100 * accuracy:.2f}%{note}")

def progress(run, cfg):
    """How far training is, 0 -> 1: by the clock, or by steps when train_seconds = 0."""
    return run.seconds / cfg.train_seconds if cfg.train_seconds else run.step / cfg.max_iters

def train(cfg, data, ckpt=None):
    """Train, keeping the checkpoint with the lowest validation loss: (model, history)."""
    torch.manual_seed(cfg.seed)
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on Ampere+ GPUs: faster, as good
    autocast, use_scaler = autocast_for(cfg.device, cfg.dtype)
    images, labels = data["train"]
    train_x, train_y = images[:-cfg.val_size], labels[:-cfg.val_size]  # (N, H, W), (N,)
    # the train loss is measured like the val loss, on as many (unshifted) training images
    splits = [(train_x[:cfg.val_size], train_y[:cfg.val_size]),
              (images[-cfg.val_size:], labels[-cfg.val_size:])]
    model = build_model(cfg, len(data["classes"]), ckpt["model"] if ckpt else None)
    optimizers = make_optimizers(model, cfg)
    scaler = torch.amp.GradScaler(enabled=use_scaler)
    run = SimpleNamespace(step=0, seconds=0.0, best_val_loss=math.inf, history=[],
                          generator=torch.Generator().manual_seed(cfg.seed))  # batches, shifts
    if ckpt:  # continue exactly where the checkpoint stopped
        for opt, saved in zip(optimizers, ckpt["optimizers"]):
            opt.load_state_dict(saved)
        run.step, run.seconds = ckpt["step"], ckpt["seconds"]
        run.best_val_loss, run.history = ckpt["best_val_loss"], ckpt["history"]
        run.generator.set_state(ckpt["rng"]["batches"])
        torch.set_rng_state(ckpt["rng"]["torch"])
    fast = torch.compile(model) if cfg.compile else model  # `model` itself is the one saved
    images_per_step = cfg.batch_size * cfg.grad_accum
    print(f"vit.py | {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | "
          f"{cfg.device} | {cfg.dataset}: {len(train_x):,} train, {cfg.val_size:,} val images | "
          f"{(28 // cfg.patch_size) ** 2} patches | {images_per_step} images per step"
          + (f" | resuming at step {run.step}" if ckpt else ""))
    first_step, step_at_log, seconds_at_log = run.step, run.step, run.seconds
    while True:
        finished = progress(run, cfg) >= 1.0
        if finished or run.step % cfg.eval_interval == 0 and run.step > first_step:
            evaluate_and_save(model, optimizers, splits, run, cfg, autocast, data["classes"])
        if finished:
            return model, run.history
        t0 = time.time()
        factor = lr_at(run.step, progress(run, cfg), cfg)
        for group in [group for opt in optimizers for group in opt.param_groups]:
            group["lr"] = group["peak_lr"] * factor  # each group's own peak, on one schedule
        batches = [get_batch(train_x, train_y, cfg.batch_size, run.generator, cfg.shift, cfg.flip)
                   for _ in range(cfg.grad_accum)]
        batches = [(x.to(cfg.device), y.to(cfg.device)) for x, y in batches]
        loss = train_step(fast, optimizers, scaler, autocast, batches, cfg)
        run.step += 1
        run.seconds += time.time() - t0  # the clock counts training only, not evaluation
        if run.step % cfg.log_interval == 0:
            per_step = (run.seconds - seconds_at_log) / (run.step - step_at_log)
            eta = (1 - progress(run, cfg)) * (cfg.train_seconds or cfg.max_iters * per_step)
            print(progress_line(run.step, loss, optimizers[0].param_groups[0]["lr"], per_step,
                                images_per_step / per_step, "images", eta))
            step_at_log, seconds_at_log = run.step, run.seconds

# -----------------------------------------------------------------------------
# Evaluation and pictures

@torch.no_grad()
def attention_over_patches(model, images):
    """The logits (B, K) and where the model looked (B, N): the CLS token's attention row in the
    last block, averaged over heads (with mean pooling, the attention each patch receives)."""
    model.eval()  # no dropout: from here on the model is only looked at, not trained
    last = model.blocks[-1].attn
    last.use_sdpa = False  # the fused path does not give the weights back
    logits, _ = model(images)  # (B, K)
    last.use_sdpa = model.config.use_sdpa
    att = last.att.mean(dim=1)  # (B, T, T), averaged over heads
    return logits, att[:, 0, 1:] if model.config.pool == "cls" else att.mean(dim=1)  # (B, N)

def draw(grid):
    """A (rows, cols) tensor in [0, 1] as lines of five greys; two pixel rows share one line, as a
    character is about twice as tall as wide. ASCII where the console cannot print blocks."""
    shades = " \u2591\u2592\u2593\u2588"  # space, light, medium and dark shade, full block
    try:
        shades.encode(getattr(sys.stdout, "encoding", None) or "ascii")
    except (UnicodeEncodeError, LookupError):  # a Windows console in cp1252, for one
        shades = " .:#@"
    rows, cols = grid.shape
    grid = grid[: rows // 2 * 2].view(rows // 2, 2, cols).mean(dim=1)  # (rows/2, cols)
    levels = (grid.clamp(0, 1) * (len(shades) - 1)).round().long()
    return ["".join(shades[v] for v in row) for row in levels.tolist()]

def show_image(model, image, label, classes, title, views):
    """Print the model's answer for image (H, W) uint8, read as the test reads it (`views`), and
    the image beside where the model looked; return the answer."""
    x = image[None].float() / 255  # (1, H, W)
    _, seen = attention_over_patches(model, x)  # (1, N)
    probs = F.softmax(classify(model, x, views).float(), dim=-1)[0].cpu()  # (K,)
    guess = probs.argmax().item()
    P, side = model.config.patch_size, 28 // model.config.patch_size
    seen = (seen[0] / seen[0].max()).float().cpu().view(side, side)  # (H/P, W/P), top patch = 1
    left, right = draw(x[0].cpu()), draw(seen.repeat_interleave(P, 0).repeat_interleave(P, 1))
    verdict = "right" if guess == label else f"wrong, it is {classes[label]}"
    looker = "CLS token" if model.config.pool == "cls" else "patches"
    print(f"{title}\npredicted {classes[guess]} ({100 * probs[guess]:.1f}%), {verdict}")
    print(f"{'image':<{len(left[0]) + 4}}where the {looker} looked")
    print("\n".join(f"{a}    {b}" for a, b in zip(left, right)))
    return guess

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

def test_views(cfg):
    """How many ways the test reads each image: five for a model trained on shifted images."""
    return 5 if cfg.shift else 1

def final_report(model, history, cfg, data):
    """Test the best checkpoint, once: the accuracy, per class and as a confusion matrix, a few
    pictures, the loss curve. Returns the test accuracy."""
    ckpt = load_checkpoint(cfg.checkpoint)  # finish with the best model, the one that was saved
    model.load_state_dict(ckpt["model"])
    (test_x, test_y), classes, K = data["test"], data["classes"], len(data["classes"])
    autocast, _ = autocast_for(cfg.device, cfg.dtype)
    views = test_views(cfg)  # the only use of the test set:
    _, guesses = estimate_loss(model, test_x, test_y, cfg, autocast, views)
    confusion = torch.zeros(K, K, dtype=torch.long)  # (K, K): rows true class, columns guess
    confusion.index_put_((test_y, guesses), torch.ones_like(test_y), accumulate=True)
    correct = confusion.trace().item()
    print(f"\nbest checkpoint: step {ckpt['step']}, val loss {ckpt['best_val_loss']:.4f}")
    print(f"test accuracy: {100 * correct / len(test_y):.2f}% ({correct} of {len(test_y):,}"
          + (f"; each image read {views} ways, the answers averaged)" if views > 1 else ")"))
    print("\nconfusion matrix (rows: true class, columns: predicted class) and accuracy per class:")
    print("   " + "".join(f"{k:>6}" for k in range(K)))
    for k in range(K):
        row = "".join(f"{n:>6}" for n in confusion[k].tolist())
        print(f"{k:>3}{row}  {100 * confusion[k, k] / confusion[k].sum():6.2f}% {classes[k]}")
    # a few pictures: the first test images the model got right, and the first it got wrong
    right = (guesses == test_y).nonzero().flatten().tolist()
    wrong = (guesses != test_y).nonzero().flatten().tolist()
    for i in sorted(right[:cfg.num_show - cfg.num_show // 2] + wrong[:cfg.num_show // 2]):
        show_image(model, test_x[i].to(cfg.device), test_y[i].item(), classes,
                   f"\ntest image {i}", test_views(cfg))
    print("\n" + plot_losses(history))
    return correct / len(test_y)

# -----------------------------------------------------------------------------
# main

MODEL_KEYS = ("dataset", "patch_size", "n_layer", "n_head", "n_embd", "pool", "mlp")  # from ckpts

def main(argv=(), **overrides):
    """Train, test and draw (or, with --infer, only predict one test image from the checkpoint).
    From a notebook: main(n_layer=2, train_seconds=30) or main(["--n_layer=2"])."""
    argv = list(argv) + [f"--{name}={value}" for name, value in overrides.items()]
    defaults = settings(argv)  # the constants, with the chosen dataset's row of DATASETS
    if "--help" in argv or "-h" in argv:
        print(help_text(defaults))
        return None
    cfg, given = parse_args(argv, defaults)
    ckpt = load_checkpoint(cfg.checkpoint) if cfg.infer or cfg.resume else None
    if ckpt and "dataset" not in given:  # the checkpoint's dataset picks its row and its data_dir
        argv = [f"--dataset={ckpt['config']['dataset']}", *argv]
        cfg, given = parse_args(argv, settings(argv))
    if ckpt:
        restore_config(cfg, given, ckpt)
    check_config(cfg)
    cfg.device = choose_device(cfg.device)
    if cfg.infer:  # show one test image, the checkpoint's answer and where it looked
        classes = ckpt["data"]["classes"]
        model = build_model(cfg, len(classes), ckpt["model"])
        test_x, test_y = load_dataset(cfg.dataset, cfg.data_dir)["test"]
        if not 0 <= cfg.index < len(test_x):
            raise UserError(f"--index={cfg.index} is out of range; the test set has "
                            f"{len(test_x):,} images, 0 to {len(test_x) - 1}")
        title = (f"test image {cfg.index} of {cfg.dataset}, model from {cfg.checkpoint} "
                 f"(step {ckpt['step']}, val loss {ckpt['best_val_loss']:.4f})")
        image, label = test_x[cfg.index].to(cfg.device), test_y[cfg.index].item()
        guess = show_image(model, image, label, classes, title, test_views(cfg))
        return SimpleNamespace(model=model, cfg=cfg, classes=classes, prediction=classes[guess])
    data = load_dataset(cfg.dataset, cfg.data_dir)
    if cfg.val_size >= len(data["train"][0]):
        raise UserError(f"--val_size={cfg.val_size} leaves no image to train on; "
                        f"the training set has {len(data['train'][0]):,}")
    check_writable(cfg.checkpoint)
    if not cfg.resume:  # a new run never replaces an earlier run's checkpoint
        keep_previous(cfg.checkpoint)
    t_start = time.time()
    model, history = train(cfg, data, ckpt)
    accuracy = final_report(model, history, cfg, data)
    print(f"\nrun took {format_time(time.time() - t_start)}")
    return SimpleNamespace(model=model, history=history, cfg=cfg, classes=data["classes"],
                           accuracy=accuracy)

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
    """The constants with the row of DATASETS that argv (or the constant) names, paths filled in."""
    config = hyperparameters()
    named = [arg.partition("=")[2] for arg in argv if arg.startswith("--dataset=")]
    config["dataset"] = named[-1] if named else config["dataset"]
    if config["dataset"] not in DATASETS:
        raise UserError(f"unknown dataset {config['dataset']!r}; choose one of: "
                        f"{', '.join(DATASETS)}")
    config.update(DATASETS[config["dataset"]])
    for name in ("data_dir", "checkpoint"):
        config[name] = config[name].format(dataset=config["dataset"])
    return config

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
        (min(cfg.eval_interval, cfg.log_interval) < 1,  # no eval_iters: every val image counts
         "--eval_interval and --log_interval must be at least 1"),
        (cfg.train_seconds <= 0 and cfg.max_iters <= 0,
         "nothing to train: set --train_seconds=SECONDS, or --train_seconds=0 --max_iters=STEPS"),
        (cfg.learning_rate <= 0 or cfg.warmup_iters < 0,
         "--learning_rate must be above 0 and --warmup_iters at least 0"),
        # vit.py's own settings
        (cfg.patch_size < 1 or 28 % cfg.patch_size,
         f"--patch_size must divide 28 (1, 2, 4, 7, 14 or 28), got {cfg.patch_size}"),
        (cfg.pool not in ("cls", "mean"), f"--pool must be cls or mean, got {cfg.pool!r}"),
        (cfg.mlp not in ("relu2", "gelu"), f"--mlp must be relu2 or gelu, got {cfg.mlp!r}"),
        (cfg.val_size < 1 or min(cfg.shift, cfg.num_show, cfg.train_seconds) < 0,
         "--val_size must be at least 1; --shift, --num_show and --train_seconds at least 0"),
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

def keep_previous(path):
    """Before a new run saves, move an earlier checkpoint aside: out/gpt.pt -> out/gpt.1.pt."""
    if os.path.exists(path):
        stem, ext = os.path.splitext(path)
        n = next(n for n in range(1, 10**6) if not os.path.exists(f"{stem}.{n}{ext}"))
        os.replace(path, f"{stem}.{n}{ext}")
        print(f"kept the earlier checkpoint at {path} as {stem}.{n}{ext}")

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

def save_checkpoint(path, state):
    """Write to a temporary name, then rename: a crash mid-write never destroys the checkpoint."""
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)

def load_checkpoint(path):
    """A checkpoint written by this script, or one clear line saying why not."""
    script = "vit.py"
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
    ckpt["config"].setdefault("mlp", "gelu")  # saved before vit.py's MLP had a choice
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

# The four files of both datasets, each dataset's mirrors (tried in order) and the md5 of each
# file as published (MNIST: torchvision's list; Fashion-MNIST: the table in Zalando's README).
FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
SOURCES = {
    "mnist": (["https://ossci-datasets.s3.amazonaws.com/mnist/",
               "https://storage.googleapis.com/cvdf-datasets/mnist/",
               "http://yann.lecun.com/exdb/mnist/"],
              ["f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
               "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"]),
    "fashion": (["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
                ["8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                 "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"]),
}

def download(urls, path, checksum):
    """Fetch the first of `urls` that works into `path`, checking its md5. The bytes go to
    path + '.part', renamed only when complete and correct: a failure leaves nothing."""
    problems = []
    for url in urls:
        print(f"downloading {url}")
        try:
            response = requests.get(url, timeout=30)  # 30 MB at most: held in memory
            response.raise_for_status()
        except requests.RequestException as e:  # refused, timed out, 404, cut short
            problems.append(f"{url}: {type(e).__name__}")
            continue
        md5 = hashlib.md5(response.content).hexdigest()
        if md5 != checksum:
            problems.append(f"{url}: md5 {md5} is not the expected {checksum}")
            continue
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path + ".part", "wb") as f:
            f.write(response.content)
        return os.replace(path + ".part", path)
    raise UserError(f"could not download {os.path.basename(path)} ({'; '.join(problems)}); fetch "
                    f"it from {urls[0]} yourself and put it in {os.path.dirname(path) or '.'}/")

def read_idx(path):
    """A gzipped IDX file as a uint8 array. Header: two zero bytes, a type byte (0x08 = bytes),
    the number of dimensions, then each size as a big-endian 32-bit integer; the data follows."""
    try:
        with gzip.open(path, "rb") as f:
            raw = bytearray(f.read())  # a bytearray: torch wants a writable buffer
        if raw[:3] != b"\x00\x00\x08":
            raise ValueError("not an IDX file of bytes")
        shape = struct.unpack(f">{raw[3]}I", raw[4:4 + 4 * raw[3]])
        return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * raw[3]).reshape(shape)
    except (OSError, EOFError, IndexError, ValueError, struct.error) as e:  # cut short, or not IDX
        raise UserError(f"{path!r} is damaged ({e}); delete it and run again to download it "
                        f"afresh") from None

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
