"""Forking tags as added special tokens: new embedding rows at the mean, carried through HF export."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ssft_jax import hf_io, model as M, tokenization as T  # noqa: E402

from hf_fixtures import build_tiny_tokenizer, make_hf_model  # noqa: E402


def test_special_tags_survive_export(tmp_path):
    import transformers
    tok = build_tiny_tokenizer(tmp_path / "tok")
    base_vocab = len(tok)
    make_hf_model("qwen2_untied", tmp_path / "base", vocab_size=base_vocab)
    cfg, params = hf_io.load_hf_params(tmp_path / "base")

    tags = T.ForkingTags(n=6, mode="special")
    tag_ids, new_len = tags.add_to_tokenizer(tok)
    assert new_len == base_vocab + 6 and len(tag_ids) == 6
    cfg, params = M.resize_vocab(cfg, params, new_len)
    out = hf_io.save_hf_folder(tmp_path / "export", cfg, params, tokenizer=tok, eos_token_ids=T.eos_token_ids(tok))
    # The weights are as readable as every other file of the folder (safetensors wrote them 0600).
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file()}
    assert len(set(modes.values())) == 1, modes

    tok2 = T.load_tokenizer(out)
    assert [tags.tag_ids(tok2, i) for i in range(6)] == [[t] for t in tag_ids]
    # A user typing "<think3>" still gets text, not the tag token.
    assert tag_ids[2] not in T.encode_text(tok2, "I wrote <think3> by hand")

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    emb = hf_model.get_input_embeddings().weight.detach().numpy()
    assert emb.shape[0] == new_len
    np.testing.assert_allclose(emb[tag_ids[0]], emb[:base_vocab].mean(0), atol=1e-6)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok2.convert_tokens_to_ids("<|im_end|>")

    # The exported model generates after a tag token exactly like ours does.
    prompt = T.render_example(tok2, "What is 2+2?", None, tags, 3).generation_prompt_ids
    with torch.no_grad():
        ref = hf_model(torch.tensor([prompt])).logits.numpy()
    ours = np.asarray(M.forward(cfg, params, np.asarray([prompt])))
    assert np.abs(ref - ours).max() < 1e-4
