"""Smoke and correctness tests for gpt.py, seq2seq.py and vit.py: python -m pytest -q

Each test builds the smallest model or dataset that shows one property, and asserts it.
The scripts are imported as modules (importing one trains nothing).
"""

import gzip
import hashlib
import http.server
import io
import math
import os
import subprocess
import sys
import threading
import zipfile

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import gpt  # noqa: E402 (importable once HERE is on the path)
import seq2seq  # noqa: E402 (importable once HERE is on the path)
import vit  # noqa: E402 (importable once HERE is on the path)


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
    with pytest.raises(gpt.UserError, match="--n_layer expects a whole number, got 'six'"):
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


# -----------------------------------------------------------------------------
# seq2seq.py




def tiny_seq2seq(use_sdpa=True, src_vocab_size=11, tgt_vocab_size=13):
    torch.manual_seed(0)
    config = seq2seq.Seq2SeqConfig(src_vocab_size, tgt_vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=32,
                                   use_sdpa=use_sdpa)
    return seq2seq.Seq2Seq(config).eval()


TINY_SEQ2SEQ = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--n_train=400", "--n_heldout=20", "--batch_size=16", "--device=cpu"]


def tiny_settings(*args):
    return seq2seq.settings([*TINY_SEQ2SEQ, *args])


@pytest.mark.parametrize("task", ["dates", "reverse", "add"])
def test_seq2seq_a_few_training_steps_lower_the_loss(task):
    cfg = tiny_settings(f"--task={task}", "--learning_rate=3e-3", "--warmup_iters=5")
    src_tok, tgt_tok, data = seq2seq.load_task(cfg)
    torch.manual_seed(0)
    model = seq2seq.build_model(seq2seq.model_config(cfg, src_tok, tgt_tok))
    optimizer = seq2seq.make_optimizer(model, cfg, "cpu")
    src, tgt = seq2seq.collate(data["train"][:64])
    before = model(src, tgt)[1].item()
    for step in range(30):
        for group in optimizer.param_groups:
            group["lr"] = seq2seq.lr_at(step, step / 30, cfg)
        batch = seq2seq.get_batch(data["train"], cfg.batch_size, torch.Generator().manual_seed(step))
        model(*batch, cfg.label_smoothing)[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    assert model(src, tgt)[1].item() < before - 0.5


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
    batch, _ = seq2seq.collate([(s, [seq2seq.BOS]) for s in sources])  # (4, 5): three of them padded
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
        assert seq2seq.beam_search(model, src, beam_size=1, max_len=16) == seq2seq.greedy_decode(model, src, 16)[0]


def test_seq2seq_kv_cached_decoding_equals_uncached_decoding(varied_model):
    model, sources = varied_model
    src, _ = seq2seq.collate([(s, [seq2seq.BOS]) for s in sources])  # padded to the longest
    cached = seq2seq.greedy_decode(model, src, 16, use_cache=True)
    assert cached == seq2seq.greedy_decode(model, src, 16, use_cache=False)


@pytest.mark.parametrize("task", ["dates", "reverse", "add"])
def test_seq2seq_the_synthetic_generators_never_put_a_heldout_example_in_training(task):
    train, heldout = seq2seq.make_synthetic(task, 20000, 500, seed=0)
    key = (lambda src, tgt: tgt) if task == "dates" else (lambda src, tgt: src)  # a date is held out in every format
    heldout_keys = {key(*pair) for pair in heldout}
    assert len(heldout_keys) == 500
    assert not heldout_keys & {key(*pair) for pair in train}


def test_seq2seq_a_small_pairs_file_is_read(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("Go.\tVe.\tCC-BY 2.0 (France) Attribution: tatoeba.org\n\nI like cats.\tMe gustan los gatos.\n",
                    encoding="utf-8")
    cfg = tiny_settings("--task=translate", f"--pairs_file={path}")
    assert seq2seq.read_translation_pairs(cfg) == [("Go.", "Ve."), ("I like cats.", "Me gustan los gatos.")]


def spa_eng_zip(text):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("spa-eng/spa.txt", text)
    return buffer.getvalue()


def test_seq2seq_the_pairs_are_downloaded_once_and_cached(http_server, tmp_path, monkeypatch):
    body = spa_eng_zip("Go.\tVe.\nHi.\tHola.\n")
    url = http_server({"/spa-eng.zip": body})
    monkeypatch.setattr(seq2seq, "SPA_ENG_URLS", [url + "/missing.zip", url + "/spa-eng.zip"])  # the first one fails
    monkeypatch.setattr(seq2seq, "SPA_ENG_SHA256", hashlib.sha256(body).hexdigest())
    cfg = tiny_settings("--task=translate", f"--data_dir={tmp_path}")
    assert seq2seq.read_translation_pairs(cfg) == [("Go.", "Ve."), ("Hi.", "Hola.")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spa-eng.zip"]
    monkeypatch.setattr(seq2seq, "SPA_ENG_URLS", [url + "/missing.zip"])  # a second run reads the cached file
    assert len(seq2seq.read_translation_pairs(cfg)) == 2


@pytest.mark.parametrize("served, truncated", [
    (b"<html>a login page, not a zip</html>", ()),  # wrong bytes: the checksum fails
    (spa_eng_zip("Go.\tVe.\n"), ("/spa-eng.zip",)),  # the connection drops halfway
])
def test_seq2seq_a_failed_or_corrupted_download_leaves_nothing_behind(http_server, tmp_path, served, truncated):
    url = http_server({"/spa-eng.zip": served}, truncated=truncated)
    path = str(tmp_path / "data" / "spa-eng.zip")
    with pytest.raises(seq2seq.UserError) as error:
        seq2seq.download([url + "/spa-eng.zip"], path, hashlib.sha256(spa_eng_zip("Go.\tVe.\n")).hexdigest())
    message = str(error.value)
    assert "spa-eng.zip" in message and path in message and "\n" not in message
    assert os.listdir(tmp_path / "data") == []


def test_seq2seq_a_cached_file_that_is_not_the_pairs_zip_is_refused(tmp_path):
    (tmp_path / "spa-eng.zip").write_bytes(b"not a zip")
    cfg = tiny_settings("--task=translate", f"--data_dir={tmp_path}")
    with pytest.raises(seq2seq.UserError, match="delete it"):
        seq2seq.read_translation_pairs(cfg)


def test_seq2seq_bleu_of_a_sentence_against_itself_is_100_and_against_a_disjoint_one_is_0():
    sentence = "el gato negro duerme en la casa".split()
    assert seq2seq.corpus_bleu([sentence], [[sentence]]) == pytest.approx(100.0)
    assert seq2seq.corpus_bleu([sentence], [["un perro blanco come pan".split()]]) == 0.0


def test_seq2seq_the_model_answers_from_its_checkpoint_and_refuses_another_scripts(tmp_path, capsys):
    path = str(tmp_path / "dates.pt")
    args = ["--train_seconds=0", "--max_iters=3", "--eval_interval=3", f"--checkpoint={path}"]
    seq2seq.main([*TINY_SEQ2SEQ, *args])
    capsys.readouterr()
    seq2seq.main([*TINY_SEQ2SEQ, *args, "--text=5 Mar 19", "--beam_size=2"])
    out = capsys.readouterr().out
    assert "answering with" in out and "5 Mar 19" in out  # the answer, then the picture with the source across
    torch.save({"script": "gpt.py"}, path)
    with pytest.raises(seq2seq.UserError, match="not seq2seq.py"):
        seq2seq.main([*TINY_SEQ2SEQ, *args, "--text=5 Mar 19"])


@pytest.mark.parametrize("args, words", [
    (["--task=spelling"], ["unknown task", "dates"]),
    (["--pairs_file=no/such/file.txt", "--task=translate"], ["not found", "no/such/file.txt"]),
])
def test_seq2seq_bad_command_lines_give_one_clear_line(args, words):
    code, _, stderr = run_script("seq2seq.py", *args)
    assert_one_line_error(code, stderr, *words)


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


def test_seq2seq_text_with_characters_the_model_never_saw_gives_one_clear_line(tmp_path):
    path = str(tmp_path / "dates.pt")
    seq2seq.main([*TINY_SEQ2SEQ, "--train_seconds=0", "--max_iters=1", "--eval_interval=1", f"--checkpoint={path}"])
    code, _, stderr = run_script("seq2seq.py", "--n_layer=1", "--n_head=2", "--n_embd=32", f"--checkpoint={path}",
                                 "--text=5 März 19")
    assert_one_line_error(code, stderr, "never seen", "ä")


# -----------------------------------------------------------------------------
# vit.py




TINY_VIT = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--patch_size=7", "--batch_size=16",
            "--train_seconds=0", "--warmup_iters=2", "--log_interval=5", "--num_show=2", "--device=cpu"]


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


def test_vit_patch_embedding_is_a_stride_p_convolution_and_unpatchify_undoes_it():
    torch.manual_seed(0)
    P, C = 7, 16
    images = torch.rand(3, 28, 28)  # (B, H, W)
    linear = torch.nn.Linear(P * P, C, bias=False)
    conv = torch.nn.Conv2d(1, C, kernel_size=P, stride=P, bias=False)
    conv.weight.data = linear.weight.data.view(C, 1, P, P)  # the same numbers, seen as C filters of P x P
    by_linear = linear(vit.patchify(images, P))  # (B, N, C)
    by_conv = conv(images[:, None]).flatten(2).transpose(1, 2)  # (B, C, 4, 4) -> (B, N, C)
    torch.testing.assert_close(by_linear, by_conv, rtol=1e-5, atol=1e-5)
    assert torch.equal(vit.unpatchify(vit.patchify(images, P), P, 28, 28), images)


def vit_shuffle_patches(images, P, order):
    return vit.unpatchify(vit.patchify(images, P)[:, order], P, 28, 28)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_without_position_embeddings_shuffled_patches_give_the_same_output(pool):
    torch.manual_seed(0)
    model = vit.ViT(vit.ViTConfig(patch_size=7, n_layer=2, n_head=2, n_embd=16, pool=pool)).eval()
    images = torch.rand(2, 28, 28)
    shuffled = vit_shuffle_patches(images, 7, torch.randperm(16))
    with torch.no_grad():
        assert not torch.allclose(model(images)[0], model(shuffled)[0], atol=1e-6)  # positions are learned...
        model.pos_emb.weight.zero_()  # ...and without them the model sees a bag of patches
        torch.testing.assert_close(model(images)[0], model(shuffled)[0], rtol=1e-4, atol=1e-6)


def test_vit_hand_written_attention_equals_sdpa():
    torch.manual_seed(0)
    config = vit.ViTConfig(patch_size=7, n_layer=2, n_head=2, n_embd=16)
    fused = vit.ViT(config).eval()
    by_hand = vit.ViT(vit.ViTConfig(patch_size=7, n_layer=2, n_head=2, n_embd=16, use_sdpa=False)).eval()
    by_hand.load_state_dict(fused.state_dict())
    images = torch.rand(4, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(fused(images)[0], by_hand(images)[0], rtol=1e-5, atol=1e-5)


def test_vit_cls_attention_is_a_distribution_over_the_patches():
    torch.manual_seed(0)
    model = vit.ViT(vit.ViTConfig(patch_size=4, n_layer=2, n_head=2, n_embd=16)).eval()
    logits, seen = vit.attention_over_patches(model, torch.rand(3, 28, 28))
    assert logits.shape == (3, 10) and seen.shape == (3, 49)  # one weight per patch
    assert (seen >= 0).all() and (seen.sum(dim=1) < 1).all()  # the rest of the CLS row goes to the CLS token itself


def test_vit_random_shift_moves_whole_images_by_at_most_shift_pixels():
    images = torch.zeros(64, 28, 28, dtype=torch.uint8)
    images[:, 13, 13] = 255  # one bright pixel in the middle
    shifted = vit.random_shift(images, 2, torch.Generator().manual_seed(0))
    assert shifted.dtype == torch.uint8 and shifted.shape == images.shape
    rows, cols = (shifted == 255).nonzero()[:, 1], (shifted == 255).nonzero()[:, 2]
    assert len(rows) == 64  # every image still holds its pixel, moved as a whole
    assert set(rows.tolist()) == set(range(11, 16)) and set(cols.tolist()) == set(range(11, 16))


def test_vit_dataset_defaults_apply_unless_the_command_line_sets_them():
    assert vit.settings([]).shift == vit.shift
    fashion = vit.settings(["--dataset=fashion"])
    assert fashion.shift == vit.DATASET_DEFAULTS["fashion"]["shift"] != vit.shift
    assert fashion.data_dir == "data/fashion" and fashion.checkpoint == "out/vit-fashion.pt"
    assert vit.settings(["--dataset=fashion", "--shift=2"]).shift == 2


def test_vit_idx_reader_parses_images_and_labels(tmp_path):
    images, labels = vit_synthetic_images(5)
    vit_write_idx(tmp_path / "img.gz", images)
    vit_write_idx(tmp_path / "lab.gz", labels)
    assert np.array_equal(vit.read_idx(str(tmp_path / "img.gz")), images)
    assert np.array_equal(vit.read_idx(str(tmp_path / "lab.gz")), labels)
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(gzip.decompress((tmp_path / "img.gz").read_bytes())[:-100])
    with pytest.raises(vit.UserError, match="header promises"):
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
    vit.download([down + "/f.gz", cut + "/f.gz", good + "/f.gz"], path, hashlib.md5(body).hexdigest())
    assert open(path, "rb").read() == body
    assert os.listdir(tmp_path) == ["f.gz"]


def test_vit_download_with_the_wrong_md5_fails_in_one_line_and_leaves_no_file(tmp_path, http_server):
    url = http_server({"/t10k-labels-idx1-ubyte.gz": b"not the real file"})
    path = str(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(vit.UserError) as error:
        vit.download([url + "/t10k-labels-idx1-ubyte.gz"], path, "ec29112dd5afa0611ce80d1b7f02629c")
    message = str(error.value)
    assert "\n" not in message
    assert "md5" in message and "t10k-labels-idx1-ubyte.gz" in message and str(tmp_path) in message
    assert os.listdir(tmp_path) == []


def test_vit_a_few_training_steps_lower_the_loss():
    torch.manual_seed(0)
    images, labels = vit_synthetic_images(256)
    images, labels = torch.from_numpy(images), torch.from_numpy(labels).long()
    model = vit.ViT(vit.ViTConfig(patch_size=7, n_layer=1, n_head=2, n_embd=16))
    cfg = vit.parse_args(["--learning_rate=3e-3"])
    optimizer = vit.make_optimizer(model, cfg, "cpu")
    generator = torch.Generator().manual_seed(0)
    x, y = vit.get_batch(images, labels, 256, generator)
    initial = model(x, y)[1].item()
    for _ in range(30):
        x, y = vit.get_batch(images, labels, 32, generator, shift=2)
        loss = model(x, y)[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    x, y = vit.get_batch(images, labels, 256, generator)
    assert abs(initial - torch.log(torch.tensor(10.0)).item()) < 0.2  # at init, no class is preferred
    assert model(x, y)[1].item() < initial - 1.0


def test_vit_training_writes_a_checkpoint_that_gives_the_same_predictions(tmp_path):
    folder = vit_synthetic_folder(tmp_path / "data")
    cfg = vit.parse_args(TINY_VIT + ["--max_iters=20", "--eval_interval=20", "--val_size=50",
                                     f"--checkpoint={tmp_path}/vit.pt"])
    data = vit.load_dataset("mnist", folder)
    model, autocast = vit.train(cfg, data)
    ckpt = vit.load_checkpoint(cfg.checkpoint, cfg)
    assert ckpt["script"] == "vit.py" and ckpt["step"] == 20
    assert os.listdir(tmp_path) == ["data", "vit.pt"]  # no temporary file left behind
    again = vit.build_model(vit.model_config(cfg), ckpt["model"])
    test_x = data["test"][0]
    assert torch.equal(vit.predict_all(model, test_x, "cpu", autocast), vit.predict_all(again, test_x, "cpu", autocast))


def test_vit_main_trains_tests_and_predicts_on_a_tiny_dataset(tmp_path, capsys):
    folder = vit_synthetic_folder(tmp_path / "data")
    args = TINY_VIT + [f"--data_dir={folder}", "--max_iters=30", "--eval_interval=10", "--val_size=50",
                       f"--checkpoint={tmp_path}/vit.pt"]
    vit.main(args)
    out = capsys.readouterr().out
    assert "test accuracy:" in out and "confusion matrix" in out and "where the CLS token looked" in out
    vit.main(args + ["--predict", "--index=3"])
    out = capsys.readouterr().out
    assert out.startswith("test image 3 of mnist") and "predicted" in out


def test_vit_bad_inputs_fail_with_one_clear_line(tmp_path):
    code, _, stderr = run_script("vit.py", "--dataset=cifar")
    assert_one_line_error(code, stderr, "unknown dataset", "mnist, fashion")
    torch.save({"script": "gpt.py", "config": {}}, tmp_path / "gpt.pt")
    code, _, stderr = run_script("vit.py", "--predict", f"--checkpoint={tmp_path}/gpt.pt")
    assert_one_line_error(code, stderr, "written by gpt.py")
    folder = vit_synthetic_folder(tmp_path / "data", n_train=60, n_test=10)
    tiny = TINY_VIT + [f"--data_dir={folder}", f"--checkpoint={tmp_path}/vit.pt", "--val_size=10"]
    vit.main(tiny + ["--max_iters=1", "--eval_interval=1", "--num_show=0"])
    code, _, stderr = run_script("vit.py", *tiny, "--predict", "--index=10")
    assert_one_line_error(code, stderr, "--index=10", "out of range")


def test_vit_checkpoint_of_another_shape_or_a_damaged_file_is_refused_in_one_line(tmp_path):
    folder = vit_synthetic_folder(tmp_path / "data", n_train=60, n_test=10)
    tiny = TINY_VIT + [f"--data_dir={folder}", f"--checkpoint={tmp_path}/vit.pt", "--val_size=10"]
    vit.main(tiny + ["--max_iters=1", "--eval_interval=1", "--num_show=0"])
    with pytest.raises(vit.UserError, match=r"n_embd=16 \(you have 32\)") as error:
        vit.main(tiny + ["--n_embd=32", "--predict"])
    assert "\n" not in str(error.value)
    with open(os.path.join(folder, "train-images-idx3-ubyte.gz"), "r+b") as f:
        f.truncate(100)  # a download cut short, copied in by hand
    with pytest.raises(vit.UserError, match="train-images-idx3-ubyte.gz.*delete it") as error:
        vit.main(tiny)
    assert "\n" not in str(error.value)
