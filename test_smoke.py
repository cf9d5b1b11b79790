"""Smoke and correctness tests for gpt.py, seq2seq.py and vit.py: python -m pytest -q

Each test builds the smallest model or dataset that shows one property, and asserts it.
The scripts are imported as modules (importing one trains nothing).
"""

import http.server
import math
import os
import subprocess
import sys
import threading

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def run_script(*args, timeout=120):
    """Run a script as a user would; return (exit code, stdout, stderr)."""
    result = subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=timeout)
    return result.returncode, result.stdout, result.stderr


def assert_one_line_error(code, stderr, *words):
    """A user mistake ends with a non-zero exit and one line on stderr naming the problem, no traceback."""
    assert code != 0
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    for word in words:
        assert word in lines[0], lines[0]


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

import gpt  # noqa: E402

TINY_GPT = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=8",
            "--train_seconds=0", "--eval_iters=2", "--log_interval=5", "--num_chars=20", "--warmup_iters=5"]


@pytest.fixture
def shakespeare(tmp_path):
    """The first 20,000 characters of input.txt: enough to learn from in a few steps."""
    with open(os.path.join(HERE, "input.txt"), encoding="utf-8") as f:
        text = f.read(20_000)
    path = tmp_path / "tiny.txt"
    path.write_text(text, encoding="utf-8")
    return path


def tiny_gpt(vocab_size=11, block_size=8, use_sdpa=True):
    torch.manual_seed(0)
    return gpt.GPT(gpt.GPTConfig(vocab_size, block_size, n_layer=2, n_head=2, n_embd=16, use_sdpa=use_sdpa)).eval()


def gpt_config(shakespeare, tmp_path, *args):
    return gpt.parse_args([*TINY_GPT, f"--input_file={shakespeare}", f"--checkpoint={tmp_path / 'gpt.pt'}", *args])


def test_gpt_loss_starts_at_ln_vocab_and_training_lowers_it(shakespeare, tmp_path):
    cfg = gpt_config(shakespeare, tmp_path, "--max_iters=40", "--eval_interval=40")
    text = shakespeare.read_text()
    vocab_size = len(set(text))
    model = tiny_gpt(vocab_size, block_size=16)
    x = torch.tensor([gpt.Tokenizer(sorted(set(text))).encode(text[:17])])
    _, loss_at_init = model(x[:, :-1], x[:, 1:])
    assert abs(loss_at_init.item() - math.log(vocab_size)) < 0.1  # an untrained model guesses uniformly
    _, _, _, history, _, _ = gpt.train(cfg)
    step, train_loss, val_loss = history[-1]
    assert step == 40 and train_loss < math.log(vocab_size) - 0.5


@pytest.mark.parametrize("use_sdpa", [False, True])
def test_gpt_causal_mask_hides_the_future(use_sdpa):
    model = tiny_gpt(use_sdpa=use_sdpa)
    x = torch.randint(0, 11, (1, 8), generator=torch.Generator().manual_seed(1))
    changed = x.clone()
    changed[0, 5:] = (changed[0, 5:] + 1) % 11  # change every token after position 4
    logits, _ = model(x)
    logits_changed, _ = model(changed)
    assert torch.allclose(logits[0, :5], logits_changed[0, :5], atol=1e-6)  # positions 0..4 cannot tell
    assert not torch.allclose(logits[0, 5:], logits_changed[0, 5:])


def test_gpt_hand_written_attention_equals_sdpa():
    manual, fused = tiny_gpt(use_sdpa=False), tiny_gpt(use_sdpa=True)
    fused.load_state_dict(manual.state_dict())
    x = torch.randint(0, 11, (3, 8), generator=torch.Generator().manual_seed(2))
    assert torch.allclose(manual(x)[0], fused(x)[0], atol=1e-5)


@pytest.mark.parametrize("use_sdpa", [False, True])
def test_gpt_kv_cache_writes_the_same_text_past_block_size(use_sdpa):
    model = tiny_gpt(block_size=8, use_sdpa=use_sdpa)
    prompt = torch.tensor([[1, 2, 3]])
    greedy = [list(model.generate(prompt, 30, temperature=0, use_cache=cache)) for cache in (True, False)]
    assert greedy[0] == greedy[1]  # 30 new tokens: the window slides several times
    sampled = [list(model.generate(prompt, 30, temperature=1.0, top_k=5, top_p=0.9, use_cache=cache,
                                   generator=torch.Generator().manual_seed(3))) for cache in (True, False)]
    assert sampled[0] == sampled[1]


def test_gpt_checkpoint_round_trip_gives_the_same_logits(shakespeare, tmp_path):
    cfg = gpt_config(shakespeare, tmp_path, "--max_iters=10", "--eval_interval=10")
    model, tokenizer, splits, _, _, _ = gpt.train(cfg)  # the only evaluation, at step 10, is saved
    ckpt = gpt.load_checkpoint(cfg.checkpoint, cfg)
    loaded = gpt.build_model(model.config, ckpt["model"])
    x = splits["val"][:16][None]
    assert torch.equal(model.eval()(x)[0], loaded.eval()(x)[0])
    assert ckpt["step"] == 10 and ckpt["chars"] == tokenizer.chars


def test_gpt_resume_continues_exactly_where_it_stopped(shakespeare, tmp_path, monkeypatch):
    uninterrupted, _, _, _, _, _ = gpt.train(gpt_config(shakespeare, tmp_path / "a", "--max_iters=20", "--eval_interval=10"))

    interrupted = gpt_config(shakespeare, tmp_path / "b", "--max_iters=20", "--eval_interval=10")
    lr_at = gpt.lr_at

    def ctrl_c_at_step_10(step, progress, cfg):
        if step == 10:
            raise KeyboardInterrupt
        return lr_at(step, progress, cfg)

    monkeypatch.setattr(gpt, "lr_at", ctrl_c_at_step_10)
    with pytest.raises(KeyboardInterrupt):
        gpt.train(interrupted)  # the checkpoint of step 10 is kept
    monkeypatch.setattr(gpt, "lr_at", lr_at)
    interrupted.resume = True
    resumed, _, _, _, _, _ = gpt.train(interrupted)
    for a, b in zip(uninterrupted.state_dict().values(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)


def test_gpt_sample_only_writes_from_a_saved_checkpoint(shakespeare, tmp_path, capsys):
    gpt.train(gpt_config(shakespeare, tmp_path, "--max_iters=5", "--eval_interval=5"))
    capsys.readouterr()
    gpt.main([*TINY_GPT, f"--checkpoint={tmp_path / 'gpt.pt'}", "--sample_only", "--prompt=ROMEO:", "--num_chars=50"])
    out = capsys.readouterr().out
    assert "sampling from" in out
    assert len(out.split("ROMEO:", 1)[1].strip("\n")) >= 40  # 50 new characters after the prompt


def test_gpt_help_lists_every_constant_with_its_comment():
    code, out, _ = run_script("gpt.py", "--help")
    assert code == 0
    assert "--n_layer=4" in out and "number of Transformer blocks" in out


@pytest.mark.parametrize("args, words", [
    (["--n_layers=6"], ["unknown option '--n_layers=6'", "--n_layer"]),
    (["--input_file=no_such_file.txt"], ["no_such_file.txt", "not found"]),
])
def test_gpt_bad_command_line_is_one_clear_line(args, words):
    code, _, stderr = run_script("gpt.py", *args)
    assert_one_line_error(code, stderr, *words)


def test_gpt_bad_inputs_raise_user_errors(shakespeare, tmp_path):
    with pytest.raises(gpt.UserError, match="--n_layer expects a int, got 'six'"):
        gpt.parse_args(["--n_layer=six"])
    with pytest.raises(gpt.UserError, match="expects true or false"):
        gpt.parse_args(["--resume=maybe"])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(gpt.UserError, match="holds 0 characters"):
        gpt.read_text(str(empty))
    with pytest.raises(gpt.UserError, match="never seen the character"):
        gpt.Tokenizer(list("abc")).encode("abz")


def test_gpt_refuses_checkpoints_of_another_script_or_shape(shakespeare, tmp_path):
    cfg = gpt_config(shakespeare, tmp_path, "--max_iters=2", "--eval_interval=2")
    gpt.train(cfg)
    wider = gpt_config(shakespeare, tmp_path, "--n_embd=64")
    with pytest.raises(gpt.UserError, match="n_embd=32 \\(you have 64\\)"):
        gpt.load_checkpoint(cfg.checkpoint, wider)
    foreign = tmp_path / "vit.pt"
    torch.save({"script": "vit.py", "model": {}}, foreign)
    with pytest.raises(gpt.UserError, match="written by vit.py"):
        gpt.load_checkpoint(str(foreign), cfg)


def test_gpt_trains_under_torchrun_with_two_processes(shakespeare, tmp_path):
    checkpoint = tmp_path / "ddp.pt"
    code, out, err = run_script("-m", "torch.distributed.run", "--nproc_per_node=2", "gpt.py", *TINY_GPT,
                                "--max_iters=6", "--eval_interval=3", f"--input_file={shakespeare}",
                                f"--checkpoint={checkpoint}", timeout=180)
    assert code == 0, err
    assert "x2" in out and out.count("val loss over the whole validation split") == 1  # rank 0 alone reports
    assert sorted(os.listdir(tmp_path)) == ["ddp.pt", "tiny.txt"]  # one checkpoint, no temporary file left
    assert torch.load(checkpoint, weights_only=False)["step"] >= 3
