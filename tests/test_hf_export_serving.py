"""An HF export serves: transformers 5 (the pin) and 4.57 load it to our tokenizer's ids, our config and our logits;
its chat template opens the assistant turn with a chosen tag; greedy generation from it in transformers equals our
sampler's for every tag; `evaluate --prefer hf_export` equals `evaluate` on the checkpoint; a hub id resolves
through the local Hugging Face cache.

Both transformers lines are probed by the same code (tests/hf_serve_probe.py): in-process under 5.x, in a subprocess
under a side install of 4.57 (tests/hf_fixtures.py: ensure_transformers4), and compared here with our side.
"""
import json
import os
import pathlib
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ssft_jax import hf_io, model as M, sampling, tokenization as T  # noqa: E402

import hf_serve_probe  # noqa: E402
from hf_fixtures import build_tiny_tokenizer, ensure_transformers4, make_hf_model  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
MESSAGES = [{"role": "user", "content": "What is 17 + 25?"}]
# Spaces (runs, leading, trailing), tabs, newlines, digits and operators, chat markers, a tag as control text, a tag
# typed by a user: each must encode to the same ids in the export as in training.
TEXTS = [
    "The answer is 19.\n",
    "  two  spaces,\ttabs and\n\nnewlines  \n",
    "ones: 7+1=8. tens: 80=80. 8+80=88.",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|><think3>\nFirst, 17 + 25 = 42.<|im_end|>",
    "<think3>\nright to left: 5+7=12",
    "I typed <think2> by hand",
]
LOGITS_TAG = 3  # the forked prompt whose full logits are compared (tag <think3>)
MAX_NEW = 12


class Side:
    """Our side of an export: the tokenizer, tags, model config and params it was written from."""

    def __init__(self, name, folder, tok, tags, cfg=None, params=None, theta=None, generate=False):
        self.name, self.folder, self.tok, self.tags, self.cfg, self.params, self.theta = \
            name, folder, tok, tags, cfg, params, theta
        self.generate = generate  # compare greedy generation too (the rest always: ids, prompts, config, logits)

    def case(self, generate=None):
        generate = self.generate if generate is None else generate
        return {"name": self.name, "folder": str(self.folder), "texts": TEXTS, "messages": MESSAGES,
                "num_tags": self.tags.n, "logits_tag": LOGITS_TAG, "max_new_tokens": MAX_NEW if generate else 0}

    def prompts(self):
        return [T.render_example(self.tok, MESSAGES, None, self.tags, i).generation_prompt_ids
                for i in range(self.tags.n)]


# ------------------------------------------------------------------------------------------------------------------
# The exports
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_run(tiny_ssft_run):
    """The demo model (configs/demo.py:tiny: character tokenizer, 6 special-token tags), trained 4 steps by the
    trainer, which wrote the checkpoint and hf_export/ (conftest's shared run; read only)."""
    return tiny_ssft_run[0]


@pytest.fixture(scope="module")
def demo(demo_run):
    from ssft_jax import assembly
    lm = assembly.load_for_generation(workdir=demo_run)  # the checkpoint, and the tokenizer training used
    assert lm.source.startswith("checkpoint") and lm.tags.mode == "special"
    return Side("demo", demo_run / "hf_export", lm.tokenizer, lm.tags, lm.cfg, lm.params, lm.cfg.rope_theta,
                generate=True)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct with 6 special-token tags added, each tag row set apart (from the rows of "1".."6") so
    that the tags steer generation differently, as after training; exported by save_hf_folder."""
    from ssft_jax import gguf_convert
    src = gguf_convert.ensure_smollm2_hf()
    cfg, params = hf_io.load_hf_params(src)
    tok = T.load_tokenizer(src)
    tags = T.ForkingTags.for_tokenizer(tok, 6, "special")
    tag_ids, n_vocab = tags.add_to_tokenizer(tok)
    cfg, params = M.resize_vocab(cfg, params, n_vocab)
    digits = [T.encode_text(tok, str(i + 1))[0] for i in range(6)]
    params["embedding"] = params["embedding"].at[jnp.asarray(tag_ids)].set(params["embedding"][jnp.asarray(digits)])
    out = hf_io.save_hf_folder(tmp_path_factory.mktemp("smol") / "export", cfg, params, tokenizer=tok,
                               eos_token_ids=T.eos_token_ids(tok), tags=tags)
    return Side("smollm2", out, tok, tags, cfg, params, 100000.0, generate=True)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """A tiny Llama 3 (llama3 RoPE scaling: 4.x reads it from rope_scaling) with a BPE tokenizer and text-mode tags."""
    root = tmp_path_factory.mktemp("llama3")
    tok = build_tiny_tokenizer(root / "tok")
    make_hf_model("llama3", root / "base", vocab_size=len(tok))
    cfg, params = hf_io.load_hf_params(root / "base")
    tags = T.ForkingTags.for_tokenizer(tok, 4, "text")
    out = hf_io.save_hf_folder(root / "export", cfg, params, tokenizer=tok, eos_token_ids=T.eos_token_ids(tok),
                               tags=tags)
    return Side("llama3", out, tok, tags, cfg, params, 500000.0)


@pytest.fixture(scope="module")
def char_text_tags(tmp_path_factory):
    """The character tokenizer with text-mode tags, saved beside a qwen2 config.json (tokenizer only)."""
    root = tmp_path_factory.mktemp("char_text")
    tok = T.build_char_tokenizer(root / "tok")
    tags = T.ForkingTags.for_tokenizer(tok, 6, "text")
    (root / "export").mkdir()
    (root / "export" / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    T.save_tokenizer(tok, root / "export", tags=tags)
    return Side("char_text", root / "export", tok, tags)


# ------------------------------------------------------------------------------------------------------------------
# Comparing what transformers saw with our side
# ------------------------------------------------------------------------------------------------------------------


def check_against_ours(side: Side, got: dict, logits_dir: pathlib.Path) -> dict:
    """Assert every probe of `got` equals our side; return the measured figures."""
    tok, tags = side.tok, side.tags
    where = f"{side.name} under transformers {got['transformers']} ({got['tokenizer_class']})"
    assert got["len"] == len(tok), where
    assert got["eos_token"] == "<|im_end|>", where
    for text, ids, ids_split, decoded in zip(TEXTS, got["ids"], got["ids_split"], got["decoded"]):
        assert ids == T.encode_control(tok, text), f"{where}: {text!r}"
        assert ids_split == T.encode_text(tok, text), f"{where}: {text!r} as user text"
        assert decoded == text, f"{where}: decode({text!r})"
    prompts = side.prompts()
    assert got["prompts"] == prompts, f"{where}: chat template with forking_tag != render_example's prompt"
    assert got["prompt_without_tag"] == T.render_messages_ids(tok, MESSAGES, add_generation_prompt=True), where
    if side.cfg is None:
        return {}
    cfg, params = side.cfg, side.params
    c = got["config"]
    assert c["effective_rope_theta"] == side.theta == cfg.rope_theta, where
    assert (c["vocab_size"], c["num_hidden_layers"], c["tie_word_embeddings"]) == \
        (cfg.vocab_size, cfg.num_hidden_layers, cfg.tie_word_embeddings), where
    assert "float32" in c["torch_dtype"], where
    np.testing.assert_allclose(got["inv_freq_head"], np.asarray(M.rope_inverse_frequencies(cfg))[:4], rtol=1e-6,
                               err_msg=where)
    ref = np.load(logits_dir / f"logits_{side.name}.npy")
    ours = np.asarray(M.forward(cfg, params, jnp.asarray([prompts[LOGITS_TAG - 1]])))[0]
    err = float(np.abs(ref - ours).max())
    # fp32 on both sides: 1e-4 for logits of magnitude up to 10, growing with it beyond, since float32 rounding
    # scales with the activations. (SmolLM2's 30 layers end in logits up to ~39 and differ by 1.0-1.2e-4 between
    # summation orders: eager or SDPA attention in torch; the tiny models stay near 1e-7.)
    bound = 1e-4 * max(1.0, float(np.abs(ref).max()) / 10)
    assert err <= bound, f"{where}: max |logit diff| {err:.2e} > {bound:.1e} on the <think{LOGITS_TAG}> prompt"
    eos = T.eos_token_ids(tok)
    assert list(np.atleast_1d(got["generation_eos"])) == eos, f"{where}: generation_config eos"  # servers stop there
    if "greedy" not in got:
        return {"max_logit_diff": err, "bound": bound}
    # Our sampler, greedy: the prompt prefilled once, each tag as a suffix (what evaluate does).
    prompt = T.render_messages_ids(tok, MESSAGES, add_generation_prompt=True)
    forked = sampling.generate_forked(cfg, params, [prompt], tags.all_tag_ids(tok), max_new_tokens=MAX_NEW,
                                      eos_token_ids=eos)[0]
    for i, gens in enumerate(forked):
        assert gens[0].tokens == got["greedy"][i], f"{where}: greedy after <think{i + 1}>"
    return {"max_logit_diff": err, "bound": bound, "distinct_greedy": len({tuple(g) for g in got["greedy"]})}


def probe_here(sides, tmp_path) -> dict:
    results = {s.name: hf_serve_probe.probe(s.case(), tmp_path) for s in sides}
    return {s.name: check_against_ours(s, results[s.name], tmp_path) for s in sides}


# ------------------------------------------------------------------------------------------------------------------
# transformers 5 (the pin), in-process
# ------------------------------------------------------------------------------------------------------------------


def test_demo_export_serves_like_the_checkpoint(demo, tmp_path):
    # (A few steps do not yet separate the tags; SmolLM2 below has tags that steer apart.)
    print(f"demo export, transformers 5: {probe_here([demo], tmp_path)['demo']}")


def test_smollm2_export_with_special_tags_serves(smollm2, tmp_path):
    figures = probe_here([smollm2], tmp_path)["smollm2"]
    print(f"SmolLM2 export, transformers 5: {figures}")
    assert figures["distinct_greedy"] > 1  # the tags steer: the comparison covers more than one continuation
    cfg_json = json.loads((smollm2.folder / "config.json").read_text())
    # Both layouts, the same theta: 4.x reads the top level, 5.x rope_parameters.
    assert cfg_json["rope_theta"] == cfg_json["rope_parameters"]["rope_theta"] == 100000.0
    assert cfg_json["torch_dtype"] == cfg_json["dtype"] == "float32"
    tc = json.loads((smollm2.folder / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert {f"<think{i}>" for i in range(1, 7)} <= set(tc["additional_special_tokens"])


def test_llama3_and_text_tag_exports_serve(llama3, char_text_tags, tmp_path):
    probe_here([llama3, char_text_tags], tmp_path)
    cfg_json = json.loads((llama3.folder / "config.json").read_text())
    assert cfg_json["rope_scaling"]["rope_type"] == "llama3" and "rope_theta" not in cfg_json["rope_scaling"]
    assert cfg_json["rope_scaling"]["factor"] == cfg_json["rope_parameters"]["factor"] == 8.0


# ------------------------------------------------------------------------------------------------------------------
# transformers 4.57, in a subprocess over a side install
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_same_exports_load_alike_under_transformers_4(demo, smollm2, llama3, char_text_tags, tmp_path):
    side_dir, why = ensure_transformers4()
    if side_dir is None:
        pytest.skip(why)
    sides = [demo, smollm2, llama3, char_text_tags]
    spec = tmp_path / "spec.json"
    # Generation once (the demo, tiny); elsewhere config, ids, prompts and logits, which fix what greedy decoding does.
    spec.write_text(json.dumps({"cases": [s.case(generate=s is demo) for s in sides]}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(side_dir), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(HERE / "hf_serve_probe.py"), str(spec), str(tmp_path / "out")],
                       env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "result.json").read_text())
    assert {v["transformers"] for v in results.values()} == {"4.57.6"}
    figures = {s.name: check_against_ours(s, results[s.name], tmp_path / "out") for s in sides}
    print(f"transformers 4.57 subprocess {time.perf_counter() - t0:.1f}s: {figures}")


# ------------------------------------------------------------------------------------------------------------------
# evaluate on the export == evaluate on the checkpoint
# ------------------------------------------------------------------------------------------------------------------


def test_evaluate_on_the_export_equals_evaluate_on_the_checkpoint(demo_run, tmp_path):
    from ssft_jax import evaluate as E
    gens = {}
    for prefer in ("checkpoint", "hf_export"):
        out = tmp_path / prefer
        # Sampling (T=1, one seed) rather than greedy: a few training steps leave greedy decoding repeating one
        # character whatever the prompt, while samples change with any change of the prompt's ids or the weights.
        rc = E.main(["--workdir", str(demo_run), "--prefer", prefer, "--num_questions", "4", "--temperature", "1",
                     "--top_p", "1", "--max_new_tokens", "24", "--no_plots", "--out", str(out)])
        assert rc == 0
        gens[prefer] = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
        assert json.loads((out / "metrics.json").read_text())["settings"]["source"].startswith(
            "checkpoint" if prefer == "checkpoint" else "hf")
    a, b = gens["checkpoint"], gens["hf_export"]
    assert len(a) == len(b) == 4 * 6
    assert [(g["question_index"], g["slot"], g["text"]) for g in a] == [(g["question_index"], g["slot"], g["text"])
                                                                        for g in b]
    assert any(" " in g["text"] or "\n" in g["text"] for g in a)  # whitespace is generated and compared, not lost


# ------------------------------------------------------------------------------------------------------------------
# The tokenizer files and the chat template
# ------------------------------------------------------------------------------------------------------------------


def test_character_ids_are_code_point_order_after_the_four_specials(tmp_path):
    import string
    tok = T.build_char_tokenizer(tmp_path / "tok")
    chars = sorted(string.printable)
    assert len(tok) == 4 + len(chars)
    assert T.encode_text(tok, "".join(chars)) == list(range(4, 4 + len(chars)))  # the ids earlier runs trained on
    tok2 = T.build_char_tokenizer(tmp_path / "tok2", extra_chars="é→")
    ids = T.encode_text(tok2, "aé→b")
    assert len(ids) == 4 and tok2.decode(ids) == "aé→b" and ids[0] == T.encode_text(tok, "a")[0]


def test_a_tokenizer_that_does_not_round_trip_is_refused(tmp_path):
    """The character tokenizer as it was (WordLevel over raw characters): transformers 5 reloads it beside a qwen2
    config.json as a byte-level Qwen2Tokenizer that drops every space; saving must say so, not write it."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", " ", "a", "b"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    raw.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", unk_token="<unk>")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(T.TokenizerExportError, match="encodes to"):
        T.save_tokenizer(tok, tmp_path)


def test_forking_tag_template_clause(tmp_path):
    from transformers import AutoTokenizer
    tok = T.build_char_tokenizer(tmp_path / "tok")
    tags = T.ForkingTags.for_tokenizer(tok, 6, "text")
    T.save_tokenizer(tok, tmp_path / "out", tags=tags)
    T.save_tokenizer(AutoTokenizer.from_pretrained(tmp_path / "out"), tmp_path / "again", tags=tags)  # re-export
    template = (tmp_path / "again" / "chat_template.jinja").read_text()
    assert template.count("forking_tag: begin") == 1  # replaced, not stacked
    served = AutoTokenizer.from_pretrained(tmp_path / "again")

    def render(**kw):
        return served.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True, **kw)
    plain = render()
    assert plain == tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert render(forking_tag=3) == plain + "<|im_start|><think3>\n"
    assert render(forking_tag="<|im_start|><think5>\n") == plain + "<|im_start|><think5>\n"  # a string as it is
    assert render(forking_tag=None) == plain
    for bad in (0, 7):
        with pytest.raises(Exception, match="forking_tag must be 1..6"):
            render(forking_tag=bad)
    # Not after a finished conversation: the tag opens a generation, it is not appended to history.
    full = MESSAGES + [{"role": "assistant", "content": "42"}]
    assert served.apply_chat_template(full, tokenize=False, forking_tag=3).endswith("42<|im_end|>\n")


# ------------------------------------------------------------------------------------------------------------------
# model.hf_dir as a hub repo id, read from the local Hugging Face cache
# ------------------------------------------------------------------------------------------------------------------


def _cache_from_folder(folder: pathlib.Path, cache: pathlib.Path, repo_id: str, commit: str) -> pathlib.Path:
    """Lay `folder` out as huggingface_hub's download would: blobs named by content hash, the snapshot's files
    symlinks to them (relative), refs/main naming the commit."""
    import hashlib
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snap


def test_a_hub_id_resolves_through_the_local_cache(tmp_path, monkeypatch):
    import huggingface_hub
    tok = build_tiny_tokenizer(tmp_path / "tok")
    make_hf_model("qwen2_tied", tmp_path / "model", vocab_size=len(tok))
    for f in (tmp_path / "tok").iterdir():
        (tmp_path / "model" / f.name).write_bytes(f.read_bytes())
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = _cache_from_folder(tmp_path / "model", cache, "ssft-test/tiny-qwen2", commit)
    # huggingface_hub itself recognises the layout (its cache scanner reports no warnings and the one revision)...
    info = huggingface_hub.scan_cache_dir(cache)
    assert not info.warnings and [r.repo_id for r in info.repos] == ["ssft-test/tiny-qwen2"]
    assert {rev.commit_hash for r in info.repos for rev in r.revisions} == {commit}
    # ... and resolve_pretrained finds it, by explicit cache_dir and through HF_HUB_CACHE.
    assert hf_io.resolve_pretrained("ssft-test/tiny-qwen2", cache_dir=cache) == snap
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    found = hf_io.resolve_pretrained("ssft-test/tiny-qwen2")
    assert found == snap
    cfg, params = hf_io.load_hf_params(found)  # and the model behind it loads
    assert cfg.model_type == "qwen2" and T.load_tokenizer(found).encode("hi") == tok.encode("hi")
    assert hf_io.resolve_pretrained(str(tmp_path / "model")) == tmp_path / "model"  # a local folder is itself

    with pytest.raises(hf_io.PretrainedNotFoundError) as e:
        hf_io.resolve_pretrained("ssft-test/not-downloaded", cache_dir=cache)
    msg = str(e.value)
    assert "'ssft-test/not-downloaded'" in msg and str(cache) in msg and "hf download ssft-test/not-downloaded" in msg
    assert isinstance(e.value, FileNotFoundError)
    # A path that is no repo id passes through for its loader to name (the memory planner then uses model.preset).
    assert hf_io.resolve_pretrained(str(tmp_path / "nowhere" / "model")) == tmp_path / "nowhere" / "model"
