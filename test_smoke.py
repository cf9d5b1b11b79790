"""Tests for gpt.py, seq2seq.py and vit.py: python -m pytest -q

Each test builds the smallest model or dataset that shows one property, and asserts it; its
name says the property. The scripts are imported as modules (importing one trains nothing).
"""

import gzip
import hashlib
import http.server
import io
import math
import os
import re
import runpy
import shutil
import subprocess
import sys
import threading
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import gpt  # noqa: E402 (importable once HERE is on the path)
import seq2seq  # noqa: E402
import vit  # noqa: E402


def run_script(*args, timeout=120, cwd=HERE, env=None):
    """Run a script as a user would; return (exit code, stdout, stderr)."""
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                            timeout=timeout, env=env)
    return result.returncode, result.stdout, result.stderr


def assert_one_line_error(code, stderr, *words):
    """A user mistake: a non-zero exit and one line on stderr naming the problem, no traceback."""
    assert code != 0
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    for word in words:
        assert word in lines[0], lines[0]


def ctrl_c_at(monkeypatch, script, stop):
    """Press Ctrl-C in `script`'s training loop just before it takes step `stop`."""
    lr_at = script.lr_at

    def interrupted(step, progress, cfg):
        if step == stop:
            raise KeyboardInterrupt
        return lr_at(step, progress, cfg)

    monkeypatch.setattr(script, "lr_at", interrupted)


@pytest.fixture
def http_server():
    """Serve files from memory on 127.0.0.1: http_server({"/a.gz": b"..."}) returns the base URL.
    A path listed in `truncated` announces its full length but sends only half, then hangs up."""
    servers = []

    def start(files, truncated=()):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if self.path in truncated else body)

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


# -----------------------------------------------------------------------------
# gpt.py

def exec_as_notebook_cell(script, edits, cwd, monkeypatch):
    """Run a script's source the way a pasted Jupyter cell runs it: no __file__, the kernel's own
    arguments in sys.argv, and the constants at the top edited in the text. Returns its globals."""
    with open(os.path.join(HERE, script), encoding="utf-8") as f:
        source = f.read()
    for old, new in edits.items():
        assert old in source, old
        source = source.replace(old, new, 1)
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "k.json"])
    namespace = {"__name__": "__main__"}
    exec(compile(source, "<cell>", "exec"), namespace)
    return namespace


# -----------------------------------------------------------------------------
# gpt.py

TINY_GPT = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=8, train_seconds=0,
                eval_iters=2, log_interval=5, num_chars=20, warmup_iters=5)
GPT2 = dict(rope=False, norm="layer", mlp="gelu", qk_norm=False, tie_weights=False,
            token_shift=False, softcap=0.0, mlp_ratio=4)


@pytest.fixture
def shakespeare(tmp_path):
    """The first 20,000 characters of input.txt: enough to learn from in a few steps."""
    with open(os.path.join(HERE, "input.txt"), encoding="utf-8") as f:
        text = f.read(20_000)
    path = tmp_path / "tiny.txt"
    path.write_text(text, encoding="utf-8")
    return path


def tiny_gpt(vocab_size=11, block_size=8, **switches):
    torch.manual_seed(0)
    config = {**gpt.hyperparameters(), "vocab_size": vocab_size, "block_size": block_size,
              "n_layer": 2, "n_head": 2, "n_embd": 16, **switches}
    model = gpt.GPT(gpt.SimpleNamespace(**config)).eval()
    for p in model.parameters():  # zero-initialised layers would hide what the tests look for
        p.data.normal_(0, 0.3)
    return model


def run_gpt(shakespeare, tmp_path, **overrides):
    """main() on the tiny text with a tiny model; returns what main returns."""
    settings = {**TINY_GPT, "input_file": str(shakespeare),
                "checkpoint": str(tmp_path / "gpt.pt"), **overrides}
    return gpt.main(**settings)


def test_gpt_loss_starts_at_ln_vocab_and_training_lowers_it(shakespeare, tmp_path):
    result = run_gpt(shakespeare, tmp_path, max_iters=40, eval_interval=20)
    vocab = len(result.tokenizer.chars)
    first_train_loss = gpt.GPT(result.model.config)(*[torch.tensor([[1, 2, 3]])] * 2)[1]
    assert abs(first_train_loss.item() - math.log(vocab)) < 1e-4  # zero head: uniform guess
    step, train_loss, val_loss = result.history[-1]
    assert step == 40 and train_loss < math.log(vocab) - 0.7


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("use_sdpa", [False, True])
def test_gpt_causal_mask_hides_the_future(use_sdpa, rope):
    model = tiny_gpt(use_sdpa=use_sdpa, rope=rope)
    x = torch.randint(0, 11, (1, 8), generator=torch.Generator().manual_seed(1))
    changed = x.clone()
    changed[0, 5:] = (changed[0, 5:] + 1) % 11  # change every token after position 4
    logits, changed_logits = model(x, x)[0], model(changed, changed)[0]
    assert torch.allclose(logits[0, :5], changed_logits[0, :5], atol=1e-5)  # 0..4 cannot tell
    assert not torch.allclose(logits[0, 5:], changed_logits[0, 5:])


@pytest.mark.parametrize("switches", [{}, GPT2])
def test_gpt_hand_written_attention_equals_sdpa(switches):
    manual, fused = tiny_gpt(use_sdpa=False, **switches), tiny_gpt(use_sdpa=True, **switches)
    fused.load_state_dict(manual.state_dict())
    x = torch.randint(0, 11, (3, 8), generator=torch.Generator().manual_seed(2))
    assert torch.allclose(manual(x, x)[0], fused(x, x)[0], atol=1e-5)


def test_gpt_rotary_scores_depend_only_on_the_distance():
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    for m, n in [(3, 1), (10, 5), (40, 2)]:
        scores = []
        for shift in (0, 7, 100):
            pos_q, pos_k = torch.tensor([m + shift]), torch.tensor([n + shift])
            turned_q = gpt.rotate(q, *gpt.rotary_angles(pos_q, 8))
            scores.append((turned_q * gpt.rotate(k, *gpt.rotary_angles(pos_k, 8))).sum())
        assert torch.allclose(scores[0], scores[1], atol=1e-4)
        assert torch.allclose(scores[0], scores[2], atol=1e-4)
    assert torch.allclose(gpt.rotate(q, *gpt.rotary_angles(torch.tensor([0]), 8)), q)  # 0: none


@pytest.mark.parametrize("switches", [{}, GPT2])
@pytest.mark.parametrize("use_sdpa", [False, True])
def test_gpt_kv_cache_writes_the_same_text_past_block_size(use_sdpa, switches):
    model = tiny_gpt(block_size=8, use_sdpa=use_sdpa, **switches)
    prompt = torch.tensor([[1, 2, 3]])
    greedy = [list(model.generate(prompt, 30, temperature=0, use_cache=cache))
              for cache in (True, False)]
    assert greedy[0] == greedy[1]  # 30 new tokens: the window slides several times
    sampled = [list(model.generate(prompt, 30, temperature=1.0, top_k=5, top_p=0.9,
                                   use_cache=cache, generator=torch.Generator().manual_seed(3)))
               for cache in (True, False)]
    assert sampled[0] == sampled[1]


def classic_gpt_logits(model, idx):
    """Today's classic GPT-2 forward pass, written out from the model's own weights."""
    B, T = idx.shape
    x = model.tok_emb.weight[idx] + model.pos_emb.weight[:T]
    for block in model.blocks:
        h = F.layer_norm(x, (x.size(-1),), block.ln1.weight)
        q, k, v = (h @ block.attn.qkv.weight.T).split(x.size(-1), dim=2)
        heads = [t.view(B, T, 2, -1).transpose(1, 2) for t in (q, k, v)]
        att = heads[0] @ heads[1].transpose(-2, -1) / math.sqrt(heads[0].size(-1))
        att = att.masked_fill(torch.ones(T, T).tril() == 0, float("-inf")).softmax(-1)
        x = x + (att @ heads[2]).transpose(1, 2).reshape(B, T, -1) @ block.attn.proj.weight.T
        h = F.layer_norm(x, (x.size(-1),), block.ln2.weight)
        x = x + F.gelu(h @ block.mlp.fc.weight.T) @ block.mlp.proj.weight.T
    return F.layer_norm(x, (x.size(-1),), model.ln_f.weight) @ model.head.weight.T


def test_gpt_with_every_switch_at_gpt2_is_the_classic_model():
    model = tiny_gpt(**{**GPT2, "tie_weights": True})
    assert model.head.weight is model.tok_emb.weight
    x = torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(4))
    assert torch.allclose(model(x, x)[0], classic_gpt_logits(model, x), atol=1e-5)


@pytest.mark.parametrize("switch", ["none", "rope", "norm", "mlp", "qk_norm", "tie_weights",
                                    "token_shift", "softcap", "optimizer", "schedule", "all"])
def test_gpt_every_switch_combination_trains(shakespeare, tmp_path, switch):
    back = {**GPT2, "tie_weights": True, "optimizer": "adamw", "schedule": "cosine"}
    other = {**back, "mlp": "relu2"}  # the MLP already is GPT-2's GELU: flip it to ReLU² instead
    flips = back if switch == "all" else {switch: other[switch]} if switch in other else {}
    result = run_gpt(shakespeare, tmp_path, max_iters=30, eval_interval=10, num_chars=0, **flips)
    losses = [h[2] for h in result.history]
    uniform = math.log(len(result.tokenizer.chars))  # a uniform guess: about where each starts
    assert losses[-1] < uniform - 0.5, losses  # at least the character frequencies are learnt


def test_gpt_token_shift_hands_half_the_channels_one_position_on():
    x = torch.randn(2, 5, 8)
    shifted = gpt.shift_tokens(x)
    assert torch.equal(shifted[:, 1:, :4], x[:, :-1, :4])  # the first half: one step later
    assert torch.equal(shifted[:, :1, :4], torch.zeros(2, 1, 4))  # nothing before position 0
    assert torch.equal(shifted[..., 4:], x[..., 4:])  # the second half stays
    cache = {}
    pieces = [gpt.shift_tokens(x[:, :3], cache, "a")] + [
        gpt.shift_tokens(x[:, t:t + 1], cache, "a") for t in (3, 4)]  # as the KV cache reads it
    assert torch.equal(torch.cat(pieces, dim=1), shifted)


def test_gpt_softcap_bounds_the_logits():
    model = tiny_gpt(softcap=5.0)
    for p in model.parameters():
        p.data.mul_(10)  # large weights, large logits
    x = torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(7))
    assert model(x, x)[0].abs().max() <= 5.0  # tanh saturates at exactly 1 in float32
    assert model(x, x)[0].abs().max() > 4.0  # ... where the uncapped logits would go past it


def test_gpt_muon_update_has_singular_values_near_one():
    weight = torch.nn.Parameter(torch.zeros(64, 32))
    opt = gpt.Muon([weight], lr=1.0, momentum=0.0)
    weight.grad = torch.randn(64, 32) @ torch.diag(torch.logspace(0, 1, 32))  # uneven directions
    opt.step()
    update = -weight.detach() / math.sqrt(64 / 32)  # Muon scales a tall matrix's step up
    singular = torch.linalg.svdvals(update)
    assert singular.min() > 0.5 and singular.max() < 1.5, singular  # every direction moves alike


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (24, 24)])
def test_gpt_muon_matches_torch_muon_up_to_its_bfloat16(shape):
    generator = torch.Generator().manual_seed(3)
    ours = torch.nn.Parameter(torch.randn(*shape, generator=generator))
    theirs = torch.nn.Parameter(ours.detach().clone())
    start = ours.detach().clone()
    opts = [gpt.Muon([ours], lr=0.1), torch.optim.Muon([theirs], lr=0.1, weight_decay=0.0)]
    for _ in range(4):  # momentum and Nesterov's look-ahead carry over between steps
        ours.grad = torch.randn(*shape, generator=generator)
        theirs.grad = ours.grad.clone()
        for opt in opts:
            opt.step()
    gap, moved = (theirs - ours).abs().max(), (ours - start).abs().max()
    assert gap < 0.03 * moved, (gap, moved)  # bfloat16 keeps 8 bits: differences of ~1%
    buffers = [opt.state[p]["momentum_buffer"] for opt, p in zip(opts, (ours, theirs))]
    assert torch.equal(*buffers)


def test_gpt_top_k_never_picks_outside_the_k_most_likely():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(5))
    allowed = set(torch.topk(logits, 5).indices[0].tolist())
    generator = torch.Generator().manual_seed(6)
    picks = {gpt.sample_next(logits, 2.0, 5, 1.0, generator).item() for _ in range(500)}
    assert picks <= allowed and len(picks) > 1


def test_gpt_lr_schedule_warms_up_holds_decays_and_ends_at_the_floor():
    cfg = gpt.SimpleNamespace(learning_rate=1e-2, min_lr=1e-3, warmup_iters=10, schedule="wsd",
                              decay_fraction=0.4)
    assert gpt.lr_at(0, 0.0, cfg) == pytest.approx(0.1)  # warmup starts near zero
    assert gpt.lr_at(9, 0.01, cfg) == pytest.approx(1.0)  # ... and reaches the peak
    assert gpt.lr_at(50, 0.5, cfg) == pytest.approx(1.0)  # stable
    assert gpt.lr_at(80, 0.8, cfg) == pytest.approx(0.55)  # halfway down the decay
    assert gpt.lr_at(99, 1.0, cfg) == pytest.approx(0.1)  # the floor: min_lr / learning_rate
    cfg.schedule = "cosine"
    assert gpt.lr_at(50, 0.5, cfg) == pytest.approx(0.55)
    assert gpt.lr_at(99, 1.0, cfg) == pytest.approx(0.1)


def test_gpt_resume_continues_exactly_where_it_stopped(shakespeare, tmp_path, monkeypatch):
    whole = run_gpt(shakespeare, tmp_path / "a", max_iters=20, eval_interval=10, num_chars=0)
    lr_at, seen = gpt.lr_at, {}

    def ctrl_c_at_step_10(step, progress, cfg):
        if step == 10:
            raise KeyboardInterrupt
        seen[step] = lr_at(step, progress, cfg)
        return seen[step]

    monkeypatch.setattr(gpt, "lr_at", ctrl_c_at_step_10)
    with pytest.raises(KeyboardInterrupt):
        run_gpt(shakespeare, tmp_path / "b", max_iters=20, eval_interval=10)  # keeps step 10
    monkeypatch.setattr(gpt, "lr_at", lr_at)
    resumed = gpt.main(["--resume", f"--checkpoint={tmp_path / 'b' / 'gpt.pt'}",
                        *[f"--{k}={v}" for k, v in TINY_GPT.items() if k != "n_embd"],
                        f"--input_file={shakespeare}", "--max_iters=20", "--eval_interval=10"])
    assert resumed.cfg.n_embd == 32  # the size came from the checkpoint
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)
    assert whole.history == resumed.history
    with pytest.raises(gpt.UserError, match="trained with --optimizer=muon; add --optimizer"):
        gpt.main(["--resume", f"--checkpoint={tmp_path / 'b' / 'gpt.pt'}", "--optimizer=adamw",
                  f"--input_file={shakespeare}"])


def test_gpt_sampling_into_a_reader_that_stops_early_ends_quietly(shakespeare, tmp_path):
    run_gpt(shakespeare, tmp_path, max_iters=2, eval_interval=2)
    sampler = subprocess.Popen([sys.executable, "gpt.py", "--infer", "--num_chars=20000",
                                f"--checkpoint={tmp_path / 'gpt.pt'}"], cwd=HERE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert sampler.stdout.readline().startswith(b"sampling from")
    sampler.stdout.close()  # stop reading mid-sample, as `python gpt.py --infer | head -1` does
    stderr = sampler.stderr.read().decode()
    assert sampler.wait(timeout=60) == 1  # it was still writing: the closed pipe was hit
    assert stderr == "", stderr  # no traceback, not even Python's "Exception ignored" at exit


def test_gpt_checkpoint_carries_its_model_and_refuses_contradictions(shakespeare, tmp_path,
                                                                     capsys):
    trained = run_gpt(shakespeare, tmp_path, max_iters=10, eval_interval=10, n_layer=3)
    capsys.readouterr()
    path = str(tmp_path / "gpt.pt")
    result = gpt.main(["--infer", f"--checkpoint={path}", "--prompt=ROMEO:", "--num_chars=50"])
    assert result.cfg.n_layer == 3 and len(result.sample) == 50
    assert "sampling from" in capsys.readouterr().out
    x = torch.tensor([[1, 2, 3]])
    assert torch.equal(trained.model.eval()(x)[0], result.model(x)[0])
    with pytest.raises(gpt.UserError, match="--n_layer=4 contradicts the checkpoint"):
        gpt.main(["--infer", f"--checkpoint={path}", "--n_layer=4"])
    foreign = tmp_path / "vit.pt"
    torch.save({"script": "vit.py", "model": {}}, foreign)
    with pytest.raises(gpt.UserError, match="written by vit.py"):
        gpt.main(["--infer", f"--checkpoint={foreign}"])


def test_gpt_a_checkpoint_from_an_older_gpt_py_is_refused_in_one_line(tmp_path):
    old = tmp_path / "old.pt"
    torch.save({"script": "gpt.py", "model": {}, "optimizer": {}, "chars": []}, old)
    with pytest.raises(gpt.UserError, match="written by an older gpt.py; train it again"):
        gpt.main(["--infer", f"--checkpoint={old}"])


def test_gpt_a_checkpoint_from_before_token_shift_softcap_and_mlp_ratio_samples_as_trained(
        shakespeare, tmp_path):
    run_gpt(shakespeare, tmp_path, max_iters=5, eval_interval=5, token_shift=False, softcap=0.0,
            mlp_ratio=4)
    ckpt = torch.load(tmp_path / "gpt.pt", weights_only=False)
    for name in ("token_shift", "softcap", "mlp_ratio"):  # as the older gpt.py saved it
        del ckpt["config"][name]
    torch.save(ckpt, tmp_path / "old.pt")
    result = gpt.main(["--infer", f"--checkpoint={tmp_path / 'old.pt'}", "--num_chars=5"])
    assert (result.cfg.token_shift, result.cfg.softcap, result.cfg.mlp_ratio) == (False, 0.0, 4)


def test_gpt_a_second_run_keeps_the_first_runs_checkpoint(shakespeare, tmp_path):
    first = run_gpt(shakespeare, tmp_path, max_iters=10, eval_interval=10)
    saved = torch.load(tmp_path / "gpt.pt", weights_only=False)
    run_gpt(shakespeare, tmp_path, max_iters=5, eval_interval=5)
    kept = torch.load(tmp_path / "gpt.1.pt", weights_only=False)
    assert kept["best_val_loss"] == saved["best_val_loss"] == first.history[-1][2]
    assert torch.load(tmp_path / "gpt.pt", weights_only=False)["step"] == 5


def test_gpt_pasted_into_a_notebook_cell_trains_and_main_returns_the_model(shakespeare,
                                                                            tmp_path, monkeypatch):
    edits = {"n_layer = 4": "n_layer = 1", "n_embd = 128": "n_embd = 16",
             "train_seconds = 270.0": "train_seconds = 0.0", "max_iters = 5000": "max_iters = 6",
             "num_chars = 500": "num_chars = 10", 'input_file = "input.txt"':
             f'input_file = "{shakespeare.name}"', "eval_iters = 20": "eval_iters = 1"}
    cell = exec_as_notebook_cell("gpt.py", edits, tmp_path, monkeypatch)
    checkpoint = torch.load(tmp_path / "out" / "gpt.pt", weights_only=False)
    assert checkpoint["config"]["n_layer"] == 1 and checkpoint["step"] == 6  # the edits ran
    result = cell["main"](max_iters=4)
    assert isinstance(result.model, cell["GPT"]) and result.history[-1][0] == 4
    assert "--n_layer=1" in cell["help_text"](cell["hyperparameters"]())


def test_gpt_help_shows_the_values_and_comments():
    code, out, _ = run_script("gpt.py", "--help", "--n_layer=6")
    assert code == 0
    assert "--n_layer=6 " in out and "--n_embd=128 " in out
    assert "number of Transformer blocks" in out


@pytest.mark.parametrize("args, words", [
    (["--n_layers=6"], ["unknown option '--n_layers=6'", "--n_layer"]),
    (["--n_layer=six"], ["--n_layer expects a whole number, got 'six'"]),
    (["--n_layer", "6"], ["--n_layer needs a value", "--n_layer=VALUE"]),
    (["--resume=maybe"], ["expects true or false"]),
    (["--input_file=no_such_file.txt"], ["no_such_file.txt", "not found"]),
    (["--device=gpu"], ["--device=gpu is not a device"]),
    (["--device=cuda"] if not torch.cuda.is_available() else ["--device=gpu"], ["--device="]),
    (["--device=mps"] if not torch.backends.mps.is_available() else ["--device=gpu"],
     ["--device="]),
    (["--n_embd=30", "--n_head=4"], ["--n_embd=30 is not a multiple of --n_head=4"]),
    (["--train_seconds=0", "--max_iters=0"], ["nothing to train"]),
    (["--eval_interval=0"], ["--eval_interval"]),
    (["--top_p=0"], ["--top_p"]),
    (["--temperature=-1"], ["--temperature"]),
    (["--num_chars=-5"], ["--num_chars"]),
    (["--norm=batch"], ["--norm must be one of rms, layer"]),
    (["--softcap=-1"], ["--softcap must be 0 (off) or more"]),
    (["--mlp_ratio=0"], ["--mlp_ratio must be at least 1"]),
    (["--checkpoint=somedir/"], ["is a folder"]),
    (["--checkpoint=input.txt/gpt.pt"], ["cannot write checkpoints in 'input.txt'"]),
    (["--infer", "--checkpoint=input.txt"], ["not a readable checkpoint"]),
    (["--infer", "--checkpoint=no/such.pt"], ["no checkpoint at", "train first"]),
])
def test_gpt_bad_input_is_one_clear_line(args, words, tmp_path):
    before = sorted(os.listdir(HERE))
    code, _, stderr = run_script("gpt.py", *args)
    assert_one_line_error(code, stderr, *words)
    assert sorted(os.listdir(HERE)) == before  # nothing written, nothing destroyed


def test_gpt_a_diverging_loss_stops_at_once_in_one_line(shakespeare, tmp_path):
    code, out, stderr = run_script(os.path.join(HERE, "gpt.py"), "--learning_rate=1e9",
                                   "--muon_lr=1e9",
                                   "--train_seconds=0", "--max_iters=50", "--n_layer=1",
                                   "--n_embd=16", f"--input_file={shakespeare}", cwd=tmp_path)
    assert_one_line_error(code, stderr, "the loss diverged", "--learning_rate")
    assert "step    50" not in out


def test_gpt_trains_under_torchrun_with_two_processes(shakespeare, tmp_path):
    checkpoint = tmp_path / "ddp.pt"
    args = [f"--{k}={v}" for k, v in TINY_GPT.items()]
    code, out, err = run_script("-m", "torch.distributed.run", "--nproc_per_node=2", "gpt.py",
                                *args, "--max_iters=6", "--eval_interval=3",
                                f"--input_file={shakespeare}", f"--checkpoint={checkpoint}",
                                timeout=180)
    assert code == 0, err
    assert "x2" in out and out.count("whole validation split") == 1  # rank 0 alone reports
    assert sorted(os.listdir(tmp_path)) == ["ddp.pt", "tiny.txt"]  # no temporary file left
    assert torch.load(checkpoint, weights_only=False)["step"] >= 3


# -----------------------------------------------------------------------------
# seq2seq.py

SEQ2SEQ = os.path.join(HERE, "seq2seq.py")


TINY_SIZES = ["--n_layer=1", "--n_head=2", "--n_embd=24", "--block_size=32"]
TINY_DATA = ["--n_train=400", "--val_size=20", "--eval_examples=10", "--device=cpu"]
TINY_RUN = ["--batch_size=16", "--train_seconds=0", "--max_iters=4", "--eval_interval=2",
            "--warmup_iters=2", "--log_interval=2", "--beam_size=2"]
TINY_SEQ2SEQ = TINY_SIZES + TINY_DATA + TINY_RUN


def tiny_seq2seq(use_sdpa=True, src_vocab_size=11, tgt_vocab_size=13, label_smoothing=0.0):
    torch.manual_seed(0)
    config = seq2seq.Seq2SeqConfig(src_vocab_size, tgt_vocab_size, block_size=16, n_layer=2,
                                   n_head=2, n_embd=32, use_sdpa=use_sdpa,
                                   label_smoothing=label_smoothing)
    return seq2seq.Seq2Seq(config).eval()


def tiny_settings(*args):
    args = [*TINY_SEQ2SEQ, *args]
    cfg, _ = seq2seq.parse_args(args, seq2seq.settings(args))
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny dates run with non-default sizes: main()'s result and its checkpoint's path."""
    path = str(tmp_path_factory.mktemp("trained") / "dates.pt")
    result = seq2seq.main([*TINY_SEQ2SEQ, f"--checkpoint={path}"])
    return result, path


def test_seq2seq_main_returns_the_trained_model_its_tokenizers_and_its_score(trained):
    result, path = trained
    assert isinstance(result.model, seq2seq.Seq2Seq) and result.model.config.n_embd == 24
    assert result.src_tok.encode("5 Mar 19") and 0.0 <= result.score <= 100.0
    assert [step for step, _, _ in result.history] == [2, 4]
    assert torch.load(path, weights_only=False)["data"]["tgt"] == result.tgt_tok.tokens


@pytest.mark.parametrize("task", ["dates", "reverse", "add"])
def test_seq2seq_a_few_training_steps_lower_the_loss(task):
    cfg = tiny_settings(f"--task={task}", "--n_embd=32", "--learning_rate=3e-3")
    data = seq2seq.load_task(cfg)
    model = seq2seq.build_model(cfg, {"src": data.src_tok.tokens, "tgt": data.tgt_tok.tokens})
    optimizers = seq2seq.make_optimizers(model, cfg)
    src, tgt = seq2seq.collate(data.train[:64])
    before = model(src, tgt)[1].item()
    for step in range(30):
        seq2seq.set_lr(optimizers, seq2seq.lr_at(step, step / 30, cfg))
        batch = seq2seq.get_batch(data.train, cfg.batch_size, torch.Generator().manual_seed(step))
        model(*batch)[1].backward()
        optimizers[0].step()
        optimizers[0].zero_grad()
    assert model(src, tgt)[1].item() < before - 0.5


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_seq2seq_the_loss_is_unchanged_when_padding_is_added_to_a_batch(use_sdpa):
    model = tiny_seq2seq(use_sdpa, label_smoothing=0.1)  # smoothing must ignore padding too
    src, tgt = seq2seq.collate([([4, 5, 6, 2], [1, 7, 8, 9, 2]), ([9, 10, 2], [1, 11, 2])])
    padded_src = F.pad(src, (0, 3), value=seq2seq.PAD)  # (2, 7): three more padding columns
    padded_tgt = F.pad(tgt, (0, 2), value=seq2seq.PAD)  # (2, 7)
    with torch.no_grad():
        assert torch.allclose(model(src, tgt)[1], model(padded_src, padded_tgt)[1], atol=1e-6)


@pytest.fixture
def varied_model():
    """Random weights large enough that the answers differ from source to source (a fresh model
    tends to repeat one token), and four sources of different lengths."""
    model = tiny_seq2seq()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.05 if "emb" in name else 0.3)
    return model, [[4, 5, 6, 7], [8, 9, 10], [6], [7, 7, 5, 4, 9]]


@pytest.mark.parametrize("use_sdpa", [True, False])
def test_seq2seq_padding_does_not_change_the_answer(varied_model, use_sdpa):
    model, sources = varied_model
    for m in model.modules():
        if isinstance(m, seq2seq.Attention):
            m.use_sdpa = use_sdpa
    short = torch.tensor([sources[0]])  # (1, S)
    padded = torch.tensor([sources[0] + [seq2seq.PAD] * 3])  # the same source, padded
    with torch.no_grad():
        memory_short, _ = model.encode(short)
        memory_padded, _ = model.encode(padded)
    assert torch.allclose(memory_short, memory_padded[:, :len(sources[0])], atol=1e-5)
    alone = [seq2seq.greedy_decode(model, torch.tensor([s]), 16)[0] for s in sources]
    batch, _ = seq2seq.collate([(s, [seq2seq.BOS]) for s in sources])  # (4, 5): three padded
    assert seq2seq.greedy_decode(model, batch, 16) == alone
    assert len({tuple(answer) for answer in alone}) > 1


def test_seq2seq_the_decoders_causal_mask_hides_future_target_tokens():
    model = tiny_seq2seq()
    src = torch.tensor([[4, 5, 6]])
    tgt = torch.tensor([[1, 4, 5, 6, 7, 8]])
    changed = tgt.clone()
    changed[0, 3:] = torch.tensor([9, 10, 11])  # rewrite everything after position 2
    with torch.no_grad():
        memory, src_mask = model.encode(src)
        logits = model.decode(tgt, memory, src_mask)
        logits_changed = model.decode(changed, memory, src_mask)
    assert torch.allclose(logits[:, :3], logits_changed[:, :3], atol=1e-6)
    assert not torch.allclose(logits[:, 3:], logits_changed[:, 3:])


def test_seq2seq_hand_written_attention_equals_sdpa_with_padding_masks():
    fused, hand_written = tiny_seq2seq(use_sdpa=True), tiny_seq2seq(use_sdpa=False)
    src = torch.tensor([[4, 5, 6, 7, 8], [9, 10, 0, 0, 0]])  # the second source is padded
    tgt = torch.tensor([[1, 4, 5, 6], [1, 7, 0, 0]])
    with torch.no_grad():
        assert torch.allclose(fused(src, tgt)[0], hand_written(src, tgt)[0], atol=1e-5)


def test_seq2seq_beam_search_of_width_one_equals_greedy_decoding(varied_model):
    model, sources = varied_model
    for source in sources:
        src = torch.tensor([source])
        assert seq2seq.beam_search(model, src, 1, 16) == seq2seq.greedy_decode(model, src, 16)[0]


def test_seq2seq_kv_cached_decoding_equals_uncached_decoding(varied_model):
    model, sources = varied_model
    src, _ = seq2seq.collate([(s, [seq2seq.BOS]) for s in sources])  # padded to the longest
    cached = seq2seq.greedy_decode(model, src, 16, use_cache=True)
    assert cached == seq2seq.greedy_decode(model, src, 16, use_cache=False)


@pytest.mark.parametrize("task", ["dates", "reverse", "add"])
def test_seq2seq_the_synthetic_generators_never_put_a_heldout_example_in_training(task):
    train, heldout = seq2seq.make_synthetic(task, 20000, 500, seed=0)
    key = (lambda src, tgt: tgt) if task == "dates" else (lambda src, tgt: src)  # dates: any format
    heldout_keys = {key(*pair) for pair in heldout}
    assert len(heldout_keys) == 500
    assert not heldout_keys & {key(*pair) for pair in train}


def test_seq2seq_bleu_matches_a_hand_computed_case_with_the_brevity_penalty():
    hypothesis, reference = "a b c d x".split(), "a b c d e f g h".split()
    # clipped n-gram precisions 4/5, 3/4, 2/3, 1/2; 5 words against 8: penalty exp(1 - 8/5)
    expected = 100 * math.exp(1 - 8 / 5) * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** (1 / 4)
    assert seq2seq.corpus_bleu([hypothesis], [[reference]]) == pytest.approx(expected)
    assert expected == pytest.approx(36.70, abs=0.01)
    sentence = "el gato negro duerme en la casa".split()
    assert seq2seq.corpus_bleu([sentence], [[sentence]]) == pytest.approx(100.0)
    assert seq2seq.corpus_bleu([sentence], [["un perro blanco come pan".split()]]) == 0.0


def test_seq2seq_the_run_says_when_the_heldout_score_first_reaches_99_5(tmp_path, monkeypatch,
                                                                       capsys):
    cfg = tiny_settings("--eval_interval=1", f"--checkpoint={tmp_path / 'd.pt'}")
    data = seq2seq.load_task(cfg)
    model = seq2seq.build_model(cfg, {"src": data.src_tok.tokens, "tgt": data.tgt_tok.tokens})
    scores = iter([50.0, 99.0, 99.6, 100.0])  # one per evaluation, at steps 1, 2, 3 and 4
    monkeypatch.setattr(seq2seq, "heldout_score", lambda *args, **kwargs: ([], [], next(scores)))
    seq2seq.train(model, data, cfg)
    out = capsys.readouterr().out
    assert out.count("reached 99.5% at step") == 1 and "reached 99.5% at step 3," in out


def test_seq2seq_the_average_of_the_weights_moves_a_decay_step_towards_them():
    average, model = tiny_seq2seq(), tiny_seq2seq()
    for p in model.parameters():
        p.data.add_(1.0)
    before = [a.clone() for a in average.parameters()]
    cfg = tiny_settings("--ema_decay=0.99")
    seq2seq.update_average(average, model, 10**6, cfg)  # late in training: the decay itself
    for a, b, p in zip(average.parameters(), before, model.parameters()):
        assert torch.allclose(a, 0.99 * b + 0.01 * p, atol=1e-6)
    seq2seq.update_average(average, model, 0, cfg)  # the first step: decay 1/10, not 0.99
    for a, b, p in zip(average.parameters(), before, model.parameters()):
        assert torch.allclose(a, 0.1 * (0.99 * b + 0.01 * p) + 0.9 * p, atol=1e-6)
    seq2seq.update_average(average, model, 10**6, tiny_settings("--ema_decay=0"))
    assert all(torch.equal(a, p) for a, p in zip(average.parameters(), model.parameters()))


def test_seq2seq_resume_continues_exactly_where_it_stopped(tmp_path, monkeypatch):
    run = [*TINY_SEQ2SEQ, "--max_iters=8", "--eval_interval=4", "--log_interval=4"]
    whole = seq2seq.main([*run, f"--checkpoint={tmp_path / 'a.pt'}"])
    ctrl_c_at(monkeypatch, seq2seq, 4)
    with pytest.raises(KeyboardInterrupt):
        seq2seq.main([*run, f"--checkpoint={tmp_path / 'b.pt'}"])  # saved at step 4
    monkeypatch.undo()
    resumed = seq2seq.main([*run, "--resume", f"--checkpoint={tmp_path / 'b.pt'}"])
    assert whole.history == resumed.history and [h[0] for h in whole.history] == [4, 8]
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)  # the average, which also needs the raw weights


def test_seq2seq_a_small_pairs_file_is_read(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("Go.\tVe.\tCC-BY 2.0 (France) Attribution: tatoeba.org\n\n"
                    "I like cats.\tMe gustan los gatos.\n", encoding="utf-8")
    cfg = tiny_settings("--task=translate", f"--pairs_file={path}")
    assert seq2seq.read_translation_pairs(cfg) == [("Go.", "Ve."),
                                                   ("I like cats.", "Me gustan los gatos.")]


def spa_eng_zip(text):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("spa-eng/spa.txt", text)
    return buffer.getvalue()


def test_seq2seq_the_pairs_are_downloaded_once_and_cached(http_server, tmp_path, monkeypatch):
    body = spa_eng_zip("Go.\tVe.\nHi.\tHola.\n")
    url = http_server({"/spa-eng.zip": body})
    monkeypatch.setattr(seq2seq, "SPA_ENG_URLS", [url + "/missing.zip", url + "/spa-eng.zip"])
    monkeypatch.setattr(seq2seq, "SPA_ENG_SHA256", hashlib.sha256(body).hexdigest())
    cfg = tiny_settings("--task=translate", f"--data_dir={tmp_path}")
    assert seq2seq.read_translation_pairs(cfg) == [("Go.", "Ve."), ("Hi.", "Hola.")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spa-eng.zip"]
    monkeypatch.setattr(seq2seq, "SPA_ENG_URLS", [url + "/missing.zip"])  # now read from disk
    assert len(seq2seq.read_translation_pairs(cfg)) == 2


@pytest.mark.parametrize("served, truncated", [
    (b"<html>a login page, not a zip</html>", ()),  # wrong bytes: the checksum fails
    (spa_eng_zip("Go.\tVe.\n"), ("/spa-eng.zip",)),  # the connection drops halfway
])
def test_seq2seq_a_failed_or_corrupted_download_leaves_nothing_behind(http_server, tmp_path, served,
                                                              truncated):
    url = http_server({"/spa-eng.zip": served}, truncated=truncated)
    path = str(tmp_path / "data" / "spa-eng.zip")
    checksum = hashlib.sha256(spa_eng_zip("Go.\tVe.\n")).hexdigest()
    with pytest.raises(seq2seq.UserError) as error:
        seq2seq.download([url + "/spa-eng.zip"], path, checksum)
    message = str(error.value)
    assert "spa-eng.zip" in message and path in message and "\n" not in message
    assert os.listdir(tmp_path / "data") == []


def test_seq2seq_a_cached_file_that_is_not_the_pairs_zip_is_refused(tmp_path):
    (tmp_path / "spa-eng.zip").write_bytes(b"not a zip")
    cfg = tiny_settings("--task=translate", f"--data_dir={tmp_path}")
    with pytest.raises(seq2seq.UserError, match="delete it"):
        seq2seq.read_translation_pairs(cfg)


@pytest.mark.parametrize("content, words", [
    ("", ["holds no sentence pairs"]),
    ("Go. Ve.\n", ["line 1", "not English<TAB>Spanish"]),
])
def test_seq2seq_an_empty_or_untabbed_pairs_file_is_refused_in_one_line(tmp_path, content, words):
    path = tmp_path / "pairs.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(seq2seq.UserError) as error:
        seq2seq.read_translation_pairs(tiny_settings("--task=translate", f"--pairs_file={path}"))
    assert "\n" not in str(error.value) and all(word in str(error.value) for word in words)


# ---- the learner's loop ----------------------------------------------------------------

def test_seq2seq_the_script_pasted_into_a_notebook_cell_runs_with_its_edited_constants(
        tmp_path, monkeypatch, capsys):
    with open(SEQ2SEQ, encoding="utf-8") as f:
        source = f.read()
    edits = {"n_train = 200000": "n_train = 400", "val_size = 2000": "val_size = 20",
             "max_iters = 5000": "max_iters = 2", "eval_interval = 500": "eval_interval = 2",
             "warmup_iters = 200": "warmup_iters = 1", "eval_examples = 200": "eval_examples = 5",
             'device = "auto"': 'device = "cpu"', '"train_seconds": 140.0': '"train_seconds": 0.0',
             '"n_embd": 64,  #': '"n_embd": 16,  #'}
    for old, new in edits.items():
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "kernel.json"])
    exec(compile(source, "<cell>", "exec"), {"__name__": "__main__"})  # no __file__ in a cell
    out = capsys.readouterr().out
    assert "training for 2 steps" in out and "held-out exact match % on 20 examples" in out
    ckpt = torch.load(tmp_path / "out" / "seq2seq-dates.pt", weights_only=False)
    assert ckpt["step"] == 2 and ckpt["config"]["n_embd"] == 16


def test_seq2seq_an_edited_constant_and_an_edited_task_row_win_under_every_task(monkeypatch,
                                                                                capsys):
    monkeypatch.setattr(seq2seq, "warmup_iters", 7)  # as if edited at the top of the file
    for task, row in seq2seq.TASKS.items():
        assert row.keys() == seq2seq.TASKS["dates"].keys()  # every row has every column...
        assert not row.keys() & seq2seq.hyperparameters().keys()  # ...and no column is a constant
        monkeypatch.setitem(row, "train_seconds", 3.0)
        argv = [f"--task={task}"]
        cfg, _ = seq2seq.parse_args(argv, seq2seq.settings(argv))
        assert (cfg.task, cfg.warmup_iters, cfg.train_seconds) == (task, 7, 3.0)
        assert seq2seq.main([f"--task={task}", "--help"]) is None
        out = capsys.readouterr().out
        assert "--warmup_iters=7 " in out and "--train_seconds=3.0 " in out
        assert f"--n_layer={row['n_layer']} " in out and f"seq2seq-{task}.pt" in out
    assert tiny_settings("--task=add", "--train_seconds=5").train_seconds == 5.0  # argv wins


def test_seq2seq_a_checkpoint_answers_and_resumes_with_checkpoint_alone(trained, tmp_path, capsys):
    _, path = trained
    capsys.readouterr()
    result = seq2seq.main(["--infer", "--text=5 Mar 19", f"--checkpoint={path}"])
    out = capsys.readouterr().out
    assert out.startswith(f"answering with {path} (task dates, step 4") and "5 Mar 19" in out
    assert result.model.config.n_embd == 24 and result.cfg.block_size == 32
    copy = str(tmp_path / "resumed.pt")
    shutil.copy(path, copy)
    again = seq2seq.main([*TINY_DATA, "--resume", f"--checkpoint={copy}", "--train_seconds=0",
                          "--max_iters=6", "--eval_interval=2"])
    assert "resuming at step 4" in capsys.readouterr().out
    assert again.model.config.n_layer == 1 and [h[0] for h in again.history] == [2, 4, 6]
    with pytest.raises(seq2seq.UserError, match="trained with --optimizer=adamw; add --opt"):
        seq2seq.main([*TINY_DATA, "--resume", f"--checkpoint={copy}", "--optimizer=muon"])


def test_seq2seq_muon_takes_the_blocks_matrices_and_adamw_everything_else():
    model = tiny_seq2seq()
    adamw, muon = seq2seq.make_optimizers(model, tiny_settings("--optimizer=muon"))
    in_muon = {id(p) for group in muon.param_groups for p in group["params"]}
    in_adamw = {id(p) for group in adamw.param_groups for p in group["params"]}
    assert not in_muon & in_adamw and in_muon | in_adamw == {id(p) for p in model.parameters()}
    for name, p in model.named_parameters():  # embeddings, head and norm gains stay with AdamW
        assert (id(p) in in_muon) == (name.startswith(("encoder.", "decoder.")) and p.dim() == 2)
    assert len(seq2seq.make_optimizers(model, tiny_settings("--optimizer=adamw"))) == 1


def test_seq2seq_a_second_run_keeps_the_first_runs_checkpoint(trained, tmp_path, capsys):
    _, path = trained
    first = tmp_path / "dates.pt"
    shutil.copy(path, first)
    before = first.read_bytes()
    seq2seq.main([*TINY_SEQ2SEQ, "--max_iters=2", f"--checkpoint={first}"])
    assert f"as {tmp_path / 'dates.1.pt'}" in capsys.readouterr().out
    assert (tmp_path / "dates.1.pt").read_bytes() == before
    assert torch.load(first, weights_only=False)["step"] == 2  # the new run's own


def test_seq2seq_ctrl_c_keeps_the_best_checkpoint_so_far(tmp_path, monkeypatch):
    path = tmp_path / "dates.pt"
    ctrl_c_at(monkeypatch, seq2seq, 3)
    with pytest.raises(KeyboardInterrupt):
        seq2seq.main([*TINY_SEQ2SEQ, f"--checkpoint={path}"])
    assert torch.load(path, weights_only=False)["step"] == 2
    assert os.listdir(tmp_path) == ["dates.pt"]  # no temporary file left


@pytest.fixture
def sentinel(tmp_path, monkeypatch):
    """A working folder holding an earlier run's checkpoint at the default path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "seq2seq-dates.pt").write_bytes(b"an earlier run")
    (tmp_path / "a_file").write_text("not a folder")
    return tmp_path


BAD_INPUTS = [
    (["--device=gpu"], ["--device=gpu is not a device"]),
    (["--n_embd=30", "--n_head=4"], ["--n_embd=30 is not a multiple of --n_head=4"]),
    (["--train_seconds=0", "--max_iters=0"], ["nothing to train"]),
    (["--eval_interval=0"], ["--eval_interval", "at least 1"]),
    (["--beam_size=0"], ["--beam_size must be at least 1"]),
    (["--min_lr=1"], ["--min_lr"]),
    (["--checkpoint=somedir/"], ["is a folder"]),
    (["--checkpoint=a_file/model.pt"], ["cannot write checkpoints in 'a_file'"]),
    (["--n_layer", "6"], ["--n_layer needs a value", "'=' and no space"]),
    (["--n_layers=6"], ["unknown option '--n_layers=6'", "--n_layer"]),
    (["--task=spelling"], ["unknown task 'spelling'", "dates"]),
    (["--dtype=half"], ["--dtype must be"]),
    (["--pairs_file=no/such/file.txt", "--task=translate"], ["not found", "no/such/file.txt"]),
    (["--infer"], ["--infer needs a source"]),
    (["--infer", "--text=5 Mar 19", "--checkpoint=missing.pt"], ["no checkpoint at 'missing.pt'"]),
    (["--infer", "--text=5 Mar 19", "--checkpoint=out/seq2seq-dates.pt"], ["not a readable"]),
    (["--infer", "--text=5 Mar 19", "--n_embd=64", "TRAINED"], ["--n_embd=64 contradicts"]),
    (["--infer", "--text=5 März 19", "TRAINED"], ["never seen", "ä"]),
    (["--infer", "--text=" + "1" * 40, "TRAINED"], ["41 tokens long", "at most 32"]),
    ([*TINY_SEQ2SEQ, "--learning_rate=1e9"], ["the loss diverged", "--learning_rate"]),
]


@pytest.mark.parametrize("args, words", BAD_INPUTS, ids=lambda x: " ".join(x)[:40])
def test_seq2seq_a_bad_input_is_one_line_and_destroys_nothing(sentinel, trained, monkeypatch,
                                                               capsys, args, words):
    trained_bytes = open(trained[1], "rb").read()
    args = [f"--checkpoint={trained[1]}" if arg == "TRAINED" else arg for arg in args]
    monkeypatch.setattr(sys, "argv", ["seq2seq.py", *args])
    with pytest.raises(SystemExit) as exit:
        runpy.run_path(SEQ2SEQ, run_name="__main__")  # the script's own entry point
    assert_one_line_error(exit.value.code, capsys.readouterr().err, *words)
    kept = [p.read_bytes() for p in (sentinel / "out").iterdir()]
    assert b"an earlier run" in kept and open(trained[1], "rb").read() == trained_bytes


def test_seq2seq_a_named_device_the_machine_lacks_is_one_line_from_the_command_line():
    missing = "cuda" if not torch.cuda.is_available() else "mps"
    if missing == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has every device")
    code, _, stderr = run_script(SEQ2SEQ, f"--device={missing}")
    assert_one_line_error(code, stderr, f"this machine has no {missing.upper()}")


# -----------------------------------------------------------------------------
# vit.py

TINY_VIT = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--patch_size=7", "--batch_size=16",
            "--train_seconds=0", "--max_iters=10", "--eval_interval=5", "--warmup_iters=2",
            "--log_interval=5", "--val_size=50", "--num_show=2", "--device=cpu"]


def vit_write_idx(path, array):
    """Write a uint8 array as a gzipped IDX file, the format MNIST ships in."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def vit_synthetic_images(n, seed=0):
    """n noisy 28x28 images of two classes: class 0 is bright on the left, class 1 on the right."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = rng.integers(0, 60, (n, 28, 28))
    for i, label in enumerate(labels):
        images[i, 4:24, 2:12] += 180 if label == 0 else 0
        images[i, 4:24, 16:26] += 180 if label == 1 else 0
    return images.astype(np.uint8), labels.astype(np.uint8)


def vit_synthetic_folder(folder, n_train=300, n_test=100):
    """A data folder holding the four MNIST file names, filled with synthetic images."""
    os.makedirs(folder, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = vit_synthetic_images(n, seed)
        vit_write_idx(os.path.join(folder, f"{split}-images-idx3-ubyte.gz"), images)
        vit_write_idx(os.path.join(folder, f"{split}-labels-idx1-ubyte.gz"), labels)
    return str(folder)


@pytest.fixture
def vit_home(tmp_path, monkeypatch):
    """A working folder as a user has it: data/mnist and data/fashion hold (synthetic) images,
    so every default path works."""
    vit_synthetic_folder(tmp_path / "data" / "mnist")
    vit_synthetic_folder(tmp_path / "data" / "fashion")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def vit_trained(tmp_path_factory):
    """A folder with data, a tiny trained out/vit-mnist.pt and a gpt.py checkpoint, made once."""
    home = tmp_path_factory.mktemp("vit_trained")
    vit_synthetic_folder(home / "data" / "mnist", n_train=120, n_test=20)
    torch.save({"script": "gpt.py", "config": {}}, home / "gpt.pt")
    torch.save({"script": "vit.py", "config": {}, "model": {}}, home / "old.pt")  # before "data"
    (home / "notes.txt").write_text("a file, not a folder")
    vit.main(TINY_VIT + [f"--data_dir={home}/data/mnist", f"--checkpoint={home}/out/vit-mnist.pt"])
    return home


def unpatchify(patches, P, H=28, W=28):
    """The inverse of vit.patchify: (B, N, P*P) back to images (B, H, W)."""
    x = patches.view(len(patches), H // P, W // P, P, P)  # (B, H/P, W/P, P, P)
    return x.permute(0, 1, 3, 2, 4).reshape(len(patches), H, W)  # (B, H/P, P, W/P, P) -> (B, H, W)


def test_vit_patch_embedding_is_a_stride_p_convolution_and_patches_tile_the_image():
    torch.manual_seed(0)
    P, C = 7, 16
    images = torch.rand(3, 28, 28)  # (B, H, W)
    linear = torch.nn.Linear(P * P, C, bias=False)
    conv = torch.nn.Conv2d(1, C, kernel_size=P, stride=P, bias=False)
    conv.weight.data = linear.weight.data.view(C, 1, P, P)  # the same numbers, as C filters
    by_linear = linear(vit.patchify(images, P))  # (B, N, C)
    by_conv = conv(images[:, None]).flatten(2).transpose(1, 2)  # (B, C, 4, 4) -> (B, N, C)
    torch.testing.assert_close(by_linear, by_conv, rtol=1e-5, atol=1e-5)
    assert torch.equal(unpatchify(vit.patchify(images, P), P), images)
    assert torch.equal(vit.patchify(images, P)[:, 1], images[:, :7, 7:14].reshape(3, 49))


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_without_position_embeddings_shuffled_patches_give_the_same_output(pool):
    torch.manual_seed(0)
    model = vit.ViT(vit.ViTConfig(patch_size=7, n_layer=2, n_head=2, n_embd=16, pool=pool)).eval()
    images = torch.rand(2, 28, 28)
    shuffled = unpatchify(vit.patchify(images, 7)[:, torch.randperm(16)], 7)
    with torch.no_grad():
        assert not torch.allclose(model(images)[0], model(shuffled)[0], atol=1e-6)  # learned...
        model.pos_emb.weight.zero_()  # ...and without them the model sees a bag of patches
        torch.testing.assert_close(model(images)[0], model(shuffled)[0], rtol=1e-4, atol=1e-6)


def test_vit_hand_written_attention_equals_sdpa():
    torch.manual_seed(0)
    fused = vit.ViT(vit.ViTConfig(patch_size=7, n_layer=2, n_head=2, n_embd=16)).eval()
    config = vit.ViTConfig(patch_size=7, n_layer=2, n_head=2, n_embd=16, use_sdpa=False)
    by_hand = vit.ViT(config).eval()
    by_hand.load_state_dict(fused.state_dict())
    images = torch.rand(4, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(fused(images)[0], by_hand(images)[0], rtol=1e-5, atol=1e-5)


def test_vit_cls_attention_is_a_distribution_over_the_patches():
    torch.manual_seed(0)
    model = vit.ViT(vit.ViTConfig(patch_size=4, n_layer=2, n_head=2, n_embd=16)).eval()
    logits, seen = vit.attention_over_patches(model, torch.rand(3, 28, 28))
    assert logits.shape == (3, 10) and seen.shape == (3, 49)  # one weight per patch
    assert (seen >= 0).all() and (seen.sum(dim=1) < 1).all()  # the rest goes to CLS itself


def test_vit_five_views_average_the_image_and_its_four_one_pixel_shifts():
    torch.manual_seed(0)
    model = vit.ViT(vit.ViTConfig(n_layer=2, n_head=2, n_embd=16)).eval()
    images = torch.zeros(3, 28, 28)
    images[:, 4:24, 4:24] = torch.rand(3, 20, 20)  # a black rim: rolling = shifting here
    moved = [images.roll(step, dims) for step in (1, -1) for dims in (1, 2)]
    with torch.no_grad():
        by_hand = sum(model(x)[0] for x in [images, *moved]) / 5  # (B, K)
        torch.testing.assert_close(vit.classify(model, images, views=5), by_hand)
        torch.testing.assert_close(vit.classify(model, images), model(images)[0])


def test_vit_random_shift_moves_whole_images_by_at_most_shift_pixels():
    images = torch.zeros(64, 28, 28, dtype=torch.uint8)
    images[:, 13, 13] = 255  # one bright pixel in the middle
    shifted = vit.random_shift(images, 2, torch.Generator().manual_seed(0))
    assert shifted.dtype == torch.uint8 and shifted.shape == images.shape
    rows, cols = (shifted == 255).nonzero()[:, 1], (shifted == 255).nonzero()[:, 2]
    assert len(rows) == 64  # every image still holds its pixel, moved as a whole
    assert set(rows.tolist()) == set(range(11, 16)) and set(cols.tolist()) == set(range(11, 16))


def test_vit_augmented_batches_keep_each_images_label_and_pixels_in_0_1():
    torch.manual_seed(0)
    images = torch.zeros(50, 28, 28, dtype=torch.uint8)
    images[:, 2:-2, 2:-2] = torch.randint(0, 256, (50, 24, 24), dtype=torch.uint8)  # black rim
    labels = torch.arange(50) % 10
    x, y = vit.get_batch(images, labels, 64, torch.Generator().manual_seed(0), shift=2, flip=True)
    ix = torch.randint(50, (64,), generator=torch.Generator().manual_seed(0))  # the same draw
    assert torch.equal(y, labels[ix])  # each image keeps its own label
    assert x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    # moved by at most the rim and maybe mirrored, each image keeps all of its own pixels
    torch.testing.assert_close(x.sum(dim=(1, 2)), images[ix].float().sum(dim=(1, 2)) / 255)
    x, _ = vit.get_batch(images, labels, 64, torch.Generator().manual_seed(0), flip=True)
    source = images[ix].float() / 255
    mirrored = (x == source.flip(2)).all(dim=(1, 2))
    assert ((x == source).all(dim=(1, 2)) | mirrored).all() and 0 < mirrored.sum() < 64


def test_vit_idx_reader_parses_images_and_labels(tmp_path):
    images, labels = vit_synthetic_images(5)
    vit_write_idx(tmp_path / "img.gz", images)
    vit_write_idx(tmp_path / "lab.gz", labels)
    assert np.array_equal(vit.read_idx(str(tmp_path / "img.gz")), images)
    assert np.array_equal(vit.read_idx(str(tmp_path / "lab.gz")), labels)
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(gzip.decompress((tmp_path / "img.gz").read_bytes())[:-100])
    with pytest.raises(vit.UserError, match="damaged"):
        vit.read_idx(str(tmp_path / "short.gz"))


def test_vit_download_writes_the_file_when_the_md5_matches(tmp_path, http_server):
    body = b"MNIST" * 1000
    url = http_server({"/train-labels-idx1-ubyte.gz": body})
    path = str(tmp_path / "data" / "train-labels-idx1-ubyte.gz")
    vit.download([url + "/train-labels-idx1-ubyte.gz"], path, hashlib.md5(body).hexdigest())
    assert open(path, "rb").read() == body
    assert os.listdir(tmp_path / "data") == ["train-labels-idx1-ubyte.gz"]


def test_vit_download_moves_on_when_a_mirror_is_down_or_cuts_the_transfer(tmp_path, http_server):
    body = bytes(range(256)) * 400
    down = http_server({})  # answers 404
    cut = http_server({"/f.gz": body}, truncated={"/f.gz"})
    good = http_server({"/f.gz": body})
    path = str(tmp_path / "f.gz")
    mirrors = [down + "/f.gz", cut + "/f.gz", good + "/f.gz"]
    vit.download(mirrors, path, hashlib.md5(body).hexdigest())
    assert open(path, "rb").read() == body
    assert os.listdir(tmp_path) == ["f.gz"]


def test_vit_download_with_the_wrong_md5_fails_in_one_line_and_leaves_no_file(tmp_path,
                                                                              http_server):
    url = http_server({"/t10k-labels-idx1-ubyte.gz": b"not the real file"})
    path = str(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(vit.UserError) as error:
        vit.download([url + "/t10k-labels-idx1-ubyte.gz"], path, "ec29112dd5afa0611ce80d1b7f02629c")
    message = str(error.value)
    assert "\n" not in message
    assert "md5" in message and "t10k-labels-idx1-ubyte.gz" in message and str(tmp_path) in message
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("mlp", ["relu2", "gelu"])
def test_vit_a_few_training_steps_lower_the_loss(mlp):
    torch.manual_seed(0)
    images, labels = vit_synthetic_images(256)
    images, labels = torch.from_numpy(images), torch.from_numpy(labels).long()
    model = vit.ViT(vit.ViTConfig(patch_size=7, n_layer=1, n_head=2, n_embd=16, mlp=mlp))
    cfg, _ = vit.parse_args(["--learning_rate=3e-3", "--device=cpu"], vit.settings([]))
    optimizers = vit.make_optimizers(model, cfg)
    scaler, no_autocast = torch.amp.GradScaler(enabled=False), torch.autocast("cpu", enabled=False)
    generator = torch.Generator().manual_seed(0)
    x, y = vit.get_batch(images, labels, 256, generator)
    initial = model(x, y)[1].item()
    for _ in range(30):
        batch = vit.get_batch(images, labels, 32, generator, shift=2)
        vit.train_step(model, optimizers, scaler, no_autocast, [batch], cfg)
    x, y = vit.get_batch(images, labels, 256, generator)
    assert abs(initial - torch.log(torch.tensor(10.0)).item()) < 0.2  # no class preferred at init
    assert model(x, y)[1].item() < initial - 1.0


def test_vit_training_writes_a_checkpoint_that_gives_the_same_predictions(tmp_path):
    folder = vit_synthetic_folder(tmp_path / "data")
    cfg, _ = vit.parse_args(TINY_VIT + ["--max_iters=20", "--eval_interval=20",
                                        f"--checkpoint={tmp_path}/vit.pt"], vit.settings([]))
    data = vit.load_dataset("mnist", folder)
    model, history = vit.train(cfg, data)
    assert [step for step, _, _ in history] == [20]
    ckpt = vit.load_checkpoint(cfg.checkpoint)
    assert ckpt["script"] == "vit.py" and ckpt["step"] == 20 and ckpt["data"]["classes"][1] == "1"
    assert sorted(os.listdir(tmp_path)) == ["data", "vit.pt"]  # no temporary file left behind
    again = vit.build_model(cfg, 10, ckpt["model"])
    test_x, test_y = data["test"]
    no_autocast = torch.autocast("cpu", enabled=False)
    assert torch.equal(vit.estimate_loss(model, test_x, test_y, cfg, no_autocast)[1],
                       vit.estimate_loss(again, test_x, test_y, cfg, no_autocast)[1])


def test_vit_main_trains_tests_and_returns_the_model_then_infers_from_the_checkpoint(vit_home,
                                                                                       capsys):
    result = vit.main(TINY_VIT)
    out = capsys.readouterr().out
    for words in ("test accuracy:", "confusion matrix", "where the CLS token looked", "loss (."):
        assert words in out
    assert isinstance(result.model, vit.ViT) and result.model.config.n_embd == 16
    assert 0 <= result.accuracy <= 1 and [h[0] for h in result.history] == [5, 10]
    predicted = vit.main(["--infer", "--index=3"])
    out = capsys.readouterr().out
    assert out.startswith("test image 3 of mnist") and "predicted" in out
    assert predicted.prediction in vit.CLASSES["mnist"]


def test_vit_pasted_into_a_notebook_cell_runs_with_its_edited_constants(vit_home, capsys,
                                                                        monkeypatch):
    with open(os.path.join(HERE, "vit.py"), encoding="utf-8") as f:
        source = f.read()
    edits = {"n_layer": 1, "n_head": 2, "n_embd": 16, "batch_size": 16, "max_iters": 6,
             "eval_interval": 3, "warmup_iters": 2, "log_interval": 3,
             "val_size": 50, "num_show": 1, "device": "cpu", "dataset": "fashion"}
    for name, value in edits.items():
        source, n = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", source, flags=re.MULTILINE)
        assert n == 1, name
    source, n = re.subn(r'"train_seconds": [0-9.]+', '"train_seconds": 0.0', source)  # table rows
    assert n == len(vit.DATASETS)
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "k.json"])
    cell = {"__name__": "__main__"}  # what a notebook cell runs in: no __file__
    exec(compile(source, "<cell>", "exec"), cell)
    out = capsys.readouterr().out
    assert "test accuracy:" in out and "| fashion: 250 train, 50 val images" in out
    assert os.path.exists("out/vit-fashion.pt")
    result = cell["main"](n_layer=2)  # main(...) called from the next cell
    assert isinstance(result.model, cell["ViT"]) and result.model.config.n_layer == 2


@pytest.mark.parametrize("dataset", list(vit.DATASETS))
def test_vit_an_edited_constant_and_an_edited_table_entry_win_under_every_dataset(
        dataset, vit_home, monkeypatch):
    monkeypatch.setattr(vit, "n_embd", 24)
    monkeypatch.setattr(vit, "n_head", 3)
    monkeypatch.setattr(vit, "max_iters", 4)
    monkeypatch.setitem(vit.DATASETS[dataset], "train_seconds", 0.0)
    monkeypatch.setitem(vit.DATASETS[dataset], "shift", 2)
    for row in vit.DATASETS.values():
        assert not set(row) & set(vit.hyperparameters())  # a name lives in one place only
    result = vit.main(["--n_layer=1", "--val_size=50", "--num_show=0", "--batch_size=8",
                       "--eval_interval=2"], dataset=dataset)
    assert result.model.config.n_embd == 24 and result.model.config.n_head == 3
    assert result.cfg.max_iters == 4 and result.cfg.shift == 2
    assert result.cfg.checkpoint == f"out/vit-{dataset}.pt"
    assert os.path.exists(result.cfg.checkpoint)
    assert vit.settings([f"--dataset={dataset}"])["shift"] == 2
    argv = [f"--dataset={dataset}", "--shift=0"]
    assert vit.parse_args(argv, vit.settings(argv))[0].shift == 0  # the command line wins


def test_vit_help_shows_the_values_the_run_would_use(monkeypatch, capsys):
    monkeypatch.setattr(vit, "n_layer", 3)
    assert vit.main(["--dataset=fashion", "--help"]) is None
    out = capsys.readouterr().out
    assert f"--shift={vit.DATASETS['fashion']['shift']} " in out and "--n_layer=3 " in out
    assert "--checkpoint='out/vit-fashion.pt'" in out and "--data_dir='data/fashion'" in out
    assert re.search(r"--shift=\d +augmentation", out)  # with the comment from the table
    code, out, _ = run_script("vit.py", "--help")
    assert code == 0 and "--dataset='mnist'" in out and "--shift=1 " in out


def test_vit_a_checkpoint_with_other_sizes_is_inferred_and_resumed_with_checkpoint_alone(
        vit_home, capsys):
    sizes = ["--n_layer=2", "--n_head=3", "--n_embd=24", "--patch_size=14", "--pool=mean",
             "--mlp=gelu"]
    vit.main(TINY_VIT + sizes + ["--dataset=fashion"])
    capsys.readouterr()
    predicted = vit.main(["--infer", "--checkpoint=out/vit-fashion.pt"])
    assert capsys.readouterr().out.startswith("test image 0 of fashion")  # the dataset came too
    config = predicted.model.config
    assert (config.n_layer, config.n_head, config.n_embd, config.patch_size, config.pool,
            config.mlp) == (2, 3, 24, 14, "mean", "gelu")
    saved = vit.load_checkpoint("out/vit-fashion.pt")["step"]
    run = ["--train_seconds=0", f"--max_iters={saved + 5}", "--eval_interval=5", "--val_size=50"]
    resumed = vit.main(["--resume", "--checkpoint=out/vit-fashion.pt", *run])
    assert f"resuming at step {saved}" in capsys.readouterr().out
    assert resumed.history[-1][0] == saved + 5 and resumed.model.config.n_embd == 24
    assert not os.path.exists("out/vit-fashion.1.pt")  # a resumed run keeps its own file


def test_vit_a_checkpoint_from_before_the_mlp_choice_answers_with_gelu(vit_trained, tmp_path,
                                                                      capsys):
    ckpt = torch.load(vit_trained / "out" / "vit-mnist.pt", weights_only=False)
    del ckpt["config"]["mlp"]  # as the older vit.py saved it: its MLP was always GELU
    torch.save(ckpt, tmp_path / "old.pt")
    predicted = vit.main(["--infer", f"--checkpoint={tmp_path / 'old.pt'}",
                          f"--data_dir={vit_trained / 'data' / 'mnist'}"])
    assert predicted.model.config.mlp == "gelu"
    gelu = vit.ViT(vit.ViTConfig(patch_size=7, n_layer=1, n_head=2, n_embd=16, mlp="gelu"))
    gelu.load_state_dict(ckpt["model"])
    images = torch.rand(2, 28, 28)
    assert torch.equal(predicted.model.cpu().eval()(images)[0], gelu.eval()(images)[0])


def test_vit_a_second_run_keeps_the_first_runs_checkpoint(vit_home, capsys):
    vit.main(TINY_VIT)
    first = open("out/vit-mnist.pt", "rb").read()
    vit.main(TINY_VIT + ["--seed=1"])
    assert "kept the earlier checkpoint at out/vit-mnist.pt as out/vit-mnist.1.pt" in (
        capsys.readouterr().out)
    assert open("out/vit-mnist.1.pt", "rb").read() == first
    assert vit.load_checkpoint("out/vit-mnist.pt")["config"]["seed"] == 1


def test_vit_ctrl_c_keeps_the_best_checkpoint_so_far(vit_home, monkeypatch):
    train_step, calls = vit.train_step, []

    def ctrl_c_at_step_8(*args):
        calls.append(1)
        if len(calls) > 8:
            raise KeyboardInterrupt
        return train_step(*args)

    monkeypatch.setattr(vit, "train_step", ctrl_c_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        vit.main(TINY_VIT)
    ckpt = vit.load_checkpoint("out/vit-mnist.pt")
    assert ckpt["step"] == 5 and not os.path.exists("out/vit-mnist.pt.tmp")


def run_vit_in_process(args, capsys, monkeypatch):
    """Run vit.py as `python vit.py ARGS` would, in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["vit.py", *args])
    code = 0
    try:
        runpy.run_path(os.path.join(HERE, "vit.py"), run_name="__main__")
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def files_in(folder):
    """{md5 of contents: path} of every file under folder."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            found[hashlib.md5(open(path, "rb").read()).hexdigest()] = path
    return found


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
NO_MPS = pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")


@pytest.mark.parametrize("args, words", [
    pytest.param(["--device=cuda"], ["--device=cuda", "no CUDA"], marks=NO_CUDA),
    pytest.param(["--device=mps"], ["--device=mps", "no MPS"], marks=NO_MPS),
    (["--device=gpu"], ["--device=gpu", "not a device"]),
    (["--n_embd=30", "--n_head=4"], ["--n_embd=30", "multiple of --n_head=4"]),
    (["--train_seconds=0", "--max_iters=0"], ["nothing to train"]),
    (["--eval_interval=0"], ["--eval_interval", "at least 1"]),
    (["--checkpoint=somedir/"], ["--checkpoint=somedir/", "is a folder"]),
    (["--checkpoint=notes.txt/vit.pt"], ["cannot write checkpoints in 'notes.txt'"]),
    (["--learning_rate=1e9", "--max_iters=50"], ["loss diverged", "--learning_rate"]),
    (["--n_layer", "6"], ["--n_layer needs a value", "with '=' and no space"]),
    (["--batch_size=many"], ["--batch_size expects a whole number"]),
    (["--dataset=cifar"], ["unknown dataset 'cifar'", "mnist, fashion"]),
    (["--patch_size=5"], ["--patch_size must divide 28"]),
    (["--pool=max"], ["--pool must be cls or mean"]),
    (["--mlp=swiglu"], ["--mlp must be relu2 or gelu"]),
    (["--dtype=int8"], ["--dtype must be"]),
    (["--val_size=120"], ["--val_size=120", "no image to train on"]),
    (["--train_seconds=-5"], ["--train_seconds at least 0"]),
    (["--infer", "--index=20"], ["--index=20 is out of range"]),
    (["--infer", "--n_embd=32"], ["--n_embd=32 contradicts the checkpoint", "n_embd=16"]),
    (["--infer", "--checkpoint=gpt.pt"], ["written by gpt.py"]),
    (["--infer", "--checkpoint=old.pt"], ["written by an older vit.py", "train it again"]),
    (["--infer", "--checkpoint=out"], ["--checkpoint=out is a folder"]),
    (["--resume", "--checkpoint=missing.pt"], ["no checkpoint at 'missing.pt'"]),
])
def test_vit_bad_input_is_one_line_and_destroys_no_file(args, words, vit_trained, tmp_path,
                                                        capsys, monkeypatch):
    home = shutil.copytree(vit_trained, tmp_path / "home")
    monkeypatch.chdir(home)
    before = files_in(home)
    code, _, err = run_vit_in_process(TINY_VIT + args, capsys, monkeypatch)
    assert_one_line_error(code, err, *words)
    assert set(before) <= set(files_in(home))  # every file is still there, byte for byte


def test_vit_a_damaged_data_file_is_refused_in_one_line(vit_home):
    with open("data/mnist/train-images-idx3-ubyte.gz", "r+b") as f:
        f.truncate(100)  # a download cut short, copied in by hand
    with pytest.raises(vit.UserError, match="train-images-idx3-ubyte.gz.*delete it") as error:
        vit.main(TINY_VIT)
    assert "\n" not in str(error.value)


def test_vit_pictures_print_on_a_console_that_cannot_encode_block_characters(vit_trained):
    env = dict(os.environ, PYTHONIOENCODING="cp1252")
    code, out, err = run_script(os.path.join(HERE, "vit.py"), "--infer", "--device=cpu",
                                cwd=vit_trained, env=env)
    assert code == 0, err
    assert "where the CLS token looked" in out and "@" in out and "\u2588" not in out
