import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import gpt  # noqa: E402 (importable once HERE is on the path)


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
GPT2 = dict(rope=False, norm="layer", mlp="gelu", qk_norm=False, tie_weights=False)


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
            scores.append((gpt.rotate(q, pos_q) * gpt.rotate(k, pos_k)).sum())
        assert torch.allclose(scores[0], scores[1], atol=1e-4)
        assert torch.allclose(scores[0], scores[2], atol=1e-4)
    assert torch.allclose(gpt.rotate(q, torch.tensor([0])), q)  # position 0 is not turned


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
                                    "optimizer", "schedule", "all"])
def test_gpt_every_switch_combination_trains(shakespeare, tmp_path, switch):
    back = {"rope": False, "norm": "layer", "mlp": "gelu", "qk_norm": False, "tie_weights": True,
            "optimizer": "adamw", "schedule": "cosine"}
    flips = back if switch == "all" else {switch: back[switch]} if switch in back else {}
    result = run_gpt(shakespeare, tmp_path, max_iters=30, eval_interval=10, num_chars=0, **flips)
    losses = [h[2] for h in result.history]
    assert losses[-1] < losses[0] - 0.1, losses


def test_gpt_muon_update_has_singular_values_near_one():
    weight = torch.nn.Parameter(torch.zeros(64, 32))
    opt = torch.optim.Muon([weight], lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False)
    weight.grad = torch.randn(64, 32) @ torch.diag(torch.logspace(0, 1, 32))  # uneven directions
    opt.step()
    update = -weight.detach() / math.sqrt(64 / 32)  # Muon scales a tall matrix's step up
    singular = torch.linalg.svdvals(update)
    assert singular.min() > 0.5 and singular.max() < 1.5, singular  # every direction moves alike


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
             "train_seconds = 255.0": "train_seconds = 0.0", "max_iters = 5000": "max_iters = 6",
             "num_chars = 500": "num_chars = 10", f'input_file = "input.txt"':
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
    assert "--n_layer=6 " in out and "--n_embd=128 " in out and "number of Transformer blocks" in out


@pytest.mark.parametrize("args, words", [
    (["--n_layers=6"], ["unknown option '--n_layers=6'", "--n_layer"]),
    (["--n_layer=six"], ["--n_layer expects a whole number, got 'six'"]),
    (["--n_layer", "6"], ["--n_layer needs a value", "--n_layer=VALUE"]),
    (["--resume=maybe"], ["expects true or false"]),
    (["--input_file=no_such_file.txt"], ["no_such_file.txt", "not found"]),
    (["--device=gpu"], ["--device=gpu is not a device"]),
    (["--device=cuda"] if not torch.cuda.is_available() else ["--device=gpu"], ["--device="]),
    (["--device=mps"] if not torch.backends.mps.is_available() else ["--device=gpu"], ["--device="]),
    (["--n_embd=30", "--n_head=4"], ["--n_embd=30 is not a multiple of --n_head=4"]),
    (["--train_seconds=0", "--max_iters=0"], ["nothing to train"]),
    (["--eval_interval=0"], ["--eval_interval"]),
    (["--top_p=0"], ["--top_p"]),
    (["--temperature=-1"], ["--temperature"]),
    (["--num_chars=-5"], ["--num_chars"]),
    (["--norm=batch"], ["--norm must be one of rms, layer"]),
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
    code, out, stderr = run_script(os.path.join(HERE, "gpt.py"), "--learning_rate=1e9", "--muon_lr=1e9",
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
