"""Tests for vit.py (to be merged into test_smoke.py): python -m pytest -q test_vit_part.py

Each test builds the smallest model or dataset that shows one property, and asserts it.
"""

import gzip
import hashlib
import http.server
import os
import re
import runpy
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import vit  # noqa: E402 (importable once HERE is on the path)


def run_script(*args, cwd=HERE, env=None, timeout=120):
    """Run a script as a user would; return (exit code, stdout, stderr)."""
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                            timeout=timeout, env=env)
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
# vit.py

# a model and a run small enough for a test; the sizes differ from the constants on purpose
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


def test_vit_random_shift_moves_whole_images_by_at_most_shift_pixels():
    images = torch.zeros(64, 28, 28, dtype=torch.uint8)
    images[:, 13, 13] = 255  # one bright pixel in the middle
    shifted = vit.random_shift(images, 2, torch.Generator().manual_seed(0))
    assert shifted.dtype == torch.uint8 and shifted.shape == images.shape
    rows, cols = (shifted == 255).nonzero()[:, 1], (shifted == 255).nonzero()[:, 2]
    assert len(rows) == 64  # every image still holds its pixel, moved as a whole
    assert set(rows.tolist()) == set(range(11, 16)) and set(cols.tolist()) == set(range(11, 16))


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


def test_vit_a_few_training_steps_lower_the_loss():
    torch.manual_seed(0)
    images, labels = vit_synthetic_images(256)
    images, labels = torch.from_numpy(images), torch.from_numpy(labels).long()
    model = vit.ViT(vit.ViTConfig(patch_size=7, n_layer=1, n_head=2, n_embd=16))
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
    edits = {"n_layer": 1, "n_head": 2, "n_embd": 16, "batch_size": 16, "train_seconds": 0.0,
             "max_iters": 6, "eval_interval": 3, "warmup_iters": 2, "log_interval": 3,
             "val_size": 50, "num_show": 1, "device": "cpu", "dataset": "fashion"}
    for name, value in edits.items():
        source, n = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", source, flags=re.MULTILINE)
        assert n == 1, name
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
    monkeypatch.setattr(vit, "train_seconds", 0.0)
    monkeypatch.setattr(vit, "max_iters", 4)
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
    sizes = ["--n_layer=2", "--n_head=3", "--n_embd=24", "--patch_size=14", "--pool=mean"]
    vit.main(TINY_VIT + sizes + ["--dataset=fashion"])
    capsys.readouterr()
    predicted = vit.main(["--infer", "--checkpoint=out/vit-fashion.pt"])
    assert capsys.readouterr().out.startswith("test image 0 of fashion")  # the dataset came too
    config = predicted.model.config
    assert (config.n_layer, config.n_head, config.n_embd, config.patch_size, config.pool) == (
        2, 3, 24, 14, "mean")
    saved = vit.load_checkpoint("out/vit-fashion.pt")["step"]
    run = ["--train_seconds=0", f"--max_iters={saved + 5}", "--eval_interval=5", "--val_size=50"]
    resumed = vit.main(["--resume", "--checkpoint=out/vit-fashion.pt", *run])
    assert f"resuming at step {saved}" in capsys.readouterr().out
    assert resumed.history[-1][0] == saved + 5 and resumed.model.config.n_embd == 24
    assert not os.path.exists("out/vit-fashion.1.pt")  # a resumed run keeps its own file


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
