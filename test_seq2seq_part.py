"""Tests for seq2seq.py: python -m pytest -q test_seq2seq_part.py

Each test builds the smallest model or dataset that shows one property, and asserts it.
The script is imported as a module (importing it trains nothing).
"""

import hashlib
import http.server
import io
import math
import os
import runpy
import shutil
import subprocess
import sys
import threading
import zipfile

import pytest
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import seq2seq  # noqa: E402 (importable once HERE is on the path)

SCRIPT = os.path.join(HERE, "seq2seq.py")


def run_script(*args, timeout=120, cwd=HERE):
    """Run a script as a user would; return (exit code, stdout, stderr)."""
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                            timeout=timeout)
    return result.returncode, result.stdout, result.stderr


def assert_one_line_error(code, stderr, *words):
    """A user mistake ends with a non-zero exit and one line on stderr naming the problem."""
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
# seq2seq.py

# sizes that differ from every task's row, so a checkpoint must bring its own
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


def test_main_returns_the_trained_model_its_tokenizers_and_its_score(trained):
    result, path = trained
    assert isinstance(result.model, seq2seq.Seq2Seq) and result.model.config.n_embd == 24
    assert result.src_tok.encode("5 Mar 19") and 0.0 <= result.score <= 100.0
    assert [step for step, _, _ in result.history] == [2, 4]
    assert torch.load(path, weights_only=False)["data"]["tgt"] == result.tgt_tok.tokens


@pytest.mark.parametrize("task", ["dates", "reverse", "add"])
def test_a_few_training_steps_lower_the_loss(task):
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
def test_the_loss_is_unchanged_when_padding_is_added_to_a_batch(use_sdpa):
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
def test_padding_does_not_change_the_answer(varied_model, use_sdpa):
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


def test_the_decoders_causal_mask_hides_future_target_tokens():
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


def test_hand_written_attention_equals_sdpa_with_padding_masks():
    fused, hand_written = tiny_seq2seq(use_sdpa=True), tiny_seq2seq(use_sdpa=False)
    src = torch.tensor([[4, 5, 6, 7, 8], [9, 10, 0, 0, 0]])  # the second source is padded
    tgt = torch.tensor([[1, 4, 5, 6], [1, 7, 0, 0]])
    with torch.no_grad():
        assert torch.allclose(fused(src, tgt)[0], hand_written(src, tgt)[0], atol=1e-5)


def test_beam_search_of_width_one_equals_greedy_decoding(varied_model):
    model, sources = varied_model
    for source in sources:
        src = torch.tensor([source])
        assert seq2seq.beam_search(model, src, 1, 16) == seq2seq.greedy_decode(model, src, 16)[0]


def test_kv_cached_decoding_equals_uncached_decoding(varied_model):
    model, sources = varied_model
    src, _ = seq2seq.collate([(s, [seq2seq.BOS]) for s in sources])  # padded to the longest
    cached = seq2seq.greedy_decode(model, src, 16, use_cache=True)
    assert cached == seq2seq.greedy_decode(model, src, 16, use_cache=False)


@pytest.mark.parametrize("task", ["dates", "reverse", "add"])
def test_the_synthetic_generators_never_put_a_heldout_example_in_training(task):
    train, heldout = seq2seq.make_synthetic(task, 20000, 500, seed=0)
    key = (lambda src, tgt: tgt) if task == "dates" else (lambda src, tgt: src)  # dates: any format
    heldout_keys = {key(*pair) for pair in heldout}
    assert len(heldout_keys) == 500
    assert not heldout_keys & {key(*pair) for pair in train}


def test_bleu_matches_a_hand_computed_case_with_the_brevity_penalty():
    hypothesis, reference = "a b c d x".split(), "a b c d e f g h".split()
    # clipped n-gram precisions 4/5, 3/4, 2/3, 1/2; 5 words against 8: penalty exp(1 - 8/5)
    expected = 100 * math.exp(1 - 8 / 5) * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** (1 / 4)
    assert seq2seq.corpus_bleu([hypothesis], [[reference]]) == pytest.approx(expected)
    assert expected == pytest.approx(36.70, abs=0.01)
    sentence = "el gato negro duerme en la casa".split()
    assert seq2seq.corpus_bleu([sentence], [[sentence]]) == pytest.approx(100.0)
    assert seq2seq.corpus_bleu([sentence], [["un perro blanco come pan".split()]]) == 0.0


def test_the_run_says_when_the_heldout_score_first_reaches_99_5(tmp_path, monkeypatch, capsys):
    cfg = tiny_settings("--eval_interval=1", f"--checkpoint={tmp_path / 'd.pt'}")
    data = seq2seq.load_task(cfg)
    model = seq2seq.build_model(cfg, {"src": data.src_tok.tokens, "tgt": data.tgt_tok.tokens})
    scores = iter([50.0, 99.0, 99.6, 100.0])  # one per evaluation, at steps 1, 2, 3 and 4
    monkeypatch.setattr(seq2seq, "heldout_score", lambda *args, **kwargs: ([], [], next(scores)))
    seq2seq.train(model, data, cfg)
    out = capsys.readouterr().out
    assert out.count("reached 99.5% at step") == 1 and "reached 99.5% at step 3," in out


def test_a_small_pairs_file_is_read(tmp_path):
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


def test_the_pairs_are_downloaded_once_and_cached(http_server, tmp_path, monkeypatch):
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
def test_a_failed_or_corrupted_download_leaves_nothing_behind(http_server, tmp_path, served,
                                                              truncated):
    url = http_server({"/spa-eng.zip": served}, truncated=truncated)
    path = str(tmp_path / "data" / "spa-eng.zip")
    checksum = hashlib.sha256(spa_eng_zip("Go.\tVe.\n")).hexdigest()
    with pytest.raises(seq2seq.UserError) as error:
        seq2seq.download([url + "/spa-eng.zip"], path, checksum)
    message = str(error.value)
    assert "spa-eng.zip" in message and path in message and "\n" not in message
    assert os.listdir(tmp_path / "data") == []


def test_a_cached_file_that_is_not_the_pairs_zip_is_refused(tmp_path):
    (tmp_path / "spa-eng.zip").write_bytes(b"not a zip")
    cfg = tiny_settings("--task=translate", f"--data_dir={tmp_path}")
    with pytest.raises(seq2seq.UserError, match="delete it"):
        seq2seq.read_translation_pairs(cfg)


@pytest.mark.parametrize("content, words", [
    ("", ["holds no sentence pairs"]),
    ("Go. Ve.\n", ["line 1", "not English<TAB>Spanish"]),
])
def test_an_empty_or_untabbed_pairs_file_is_refused_in_one_line(tmp_path, content, words):
    path = tmp_path / "pairs.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(seq2seq.UserError) as error:
        seq2seq.read_translation_pairs(tiny_settings("--task=translate", f"--pairs_file={path}"))
    assert "\n" not in str(error.value) and all(word in str(error.value) for word in words)


# ---- the learner's loop ----------------------------------------------------------------

def test_the_script_pasted_into_a_notebook_cell_runs_with_its_edited_constants(
        tmp_path, monkeypatch, capsys):
    with open(SCRIPT, encoding="utf-8") as f:
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


def test_an_edited_constant_and_an_edited_task_row_win_under_every_task(monkeypatch, capsys):
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


def test_a_checkpoint_answers_and_resumes_with_checkpoint_alone(trained, tmp_path, capsys):
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


def test_a_second_run_keeps_the_first_runs_checkpoint(trained, tmp_path, capsys):
    _, path = trained
    first = tmp_path / "dates.pt"
    shutil.copy(path, first)
    before = first.read_bytes()
    seq2seq.main([*TINY_SEQ2SEQ, "--max_iters=2", f"--checkpoint={first}"])
    assert f"as {tmp_path / 'dates.1.pt'}" in capsys.readouterr().out
    assert (tmp_path / "dates.1.pt").read_bytes() == before
    assert torch.load(first, weights_only=False)["step"] == 2  # the new run's own


def test_ctrl_c_keeps_the_best_checkpoint_so_far(tmp_path, monkeypatch):
    path = tmp_path / "dates.pt"
    lr_at = seq2seq.lr_at

    def ctrl_c_at_step_3(step, progress, cfg):
        if step == 3:
            raise KeyboardInterrupt
        return lr_at(step, progress, cfg)

    monkeypatch.setattr(seq2seq, "lr_at", ctrl_c_at_step_3)
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
def test_a_bad_input_is_one_line_and_destroys_nothing(sentinel, trained, monkeypatch, capsys,
                                                      args, words):
    trained_bytes = open(trained[1], "rb").read()
    args = [f"--checkpoint={trained[1]}" if arg == "TRAINED" else arg for arg in args]
    monkeypatch.setattr(sys, "argv", ["seq2seq.py", *args])
    with pytest.raises(SystemExit) as exit:
        runpy.run_path(SCRIPT, run_name="__main__")  # the script's own entry point
    assert_one_line_error(exit.value.code, capsys.readouterr().err, *words)
    kept = [p.read_bytes() for p in (sentinel / "out").iterdir()]
    assert b"an earlier run" in kept and open(trained[1], "rb").read() == trained_bytes


def test_a_named_device_the_machine_lacks_is_one_line_from_the_command_line():
    missing = "cuda" if not torch.cuda.is_available() else "mps"
    if missing == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has every device")
    code, _, stderr = run_script(SCRIPT, f"--device={missing}")
    assert_one_line_error(code, stderr, f"this machine has no {missing.upper()}")
