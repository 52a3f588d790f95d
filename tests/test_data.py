"""SSFT data: record validation, the static-shape cost/train layouts, fill_tags, the C read-back, the Grain pipeline."""
import json
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssft_jax import data as D, model as Mdl, rows as rows_lib, tokenization as tk

from hf_fixtures import build_tiny_tokenizer

TRACES = [
    "Let me think step by step. The answer is 42.",
    "First, add the numbers: 2+2=4. So the answer is 4.",
    "Paris is the capital of France.",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _records(n, max_traces=2):
    """n records; record k has 1 + k % max_traces traces (so some have fewer than M)."""
    out = []
    for k in range(n):
        nt = 1 + k % max_traces
        out.append({"id": f"q{k}", "question": f"What is {k}+{k}? Solve {k}.",
                    "traces": [{"text": f"{TRACES[t]} ({k})", "source": f"m{t}"} for t in range(nt)], "answer": 2 * k})
    return out


def _setup(tok, *, n_tags=3, n_traces=2, L=4, P=56, T=16, B=2, n=6, **kw):
    tags = tk.ForkingTags.for_tokenizer(tok, n_tags)
    cfg = D.LayoutConfig.for_tokenizer(tok, tags, num_traces=n_traces, cost_len=L, max_prompt_len=P, max_trace_len=T,
                                       batch_size=B, **kw)
    qs, rep = D.tokenize_records(_records(n, n_traces), tok, tags, cfg)
    table, lengths = D.tag_table(tok, tags)
    return tags, cfg, qs, rep, table, lengths


# ------------------------------------------------------------------------------------------------
# Config and tag table
# ------------------------------------------------------------------------------------------------


def test_layout_config_validation_and_budgets():
    with pytest.raises(ValueError, match="N >= M"):
        D.LayoutConfig(num_tags=2, num_traces=3, cost_len=4, max_prompt_len=8, max_trace_len=8, tag_len=2, batch_size=1)
    mixed = D.LayoutConfig(num_tags=1, num_traces=3, cost_len=4, max_prompt_len=8, max_trace_len=8, tag_len=2,
                           batch_size=1, allow_more_traces_than_tags=True)  # the sft_mixed baseline
    assert mixed.cost_row_len == 8 + 3 * (2 + 4)
    with pytest.raises(ValueError, match="valid tags"):
        D.LayoutConfig(num_tags=3, num_traces=2, cost_len=4, max_prompt_len=8, max_trace_len=8, tag_len=2,
                       batch_size=1, tag_valid=(True, False, False))
    with pytest.raises(ValueError, match="positive int"):
        D.LayoutConfig(num_tags=3, num_traces=2, cost_len=0, max_prompt_len=8, max_trace_len=8, tag_len=2, batch_size=1)
    c = D.LayoutConfig(num_tags=6, num_traces=4, cost_len=128, max_prompt_len=256, max_trace_len=1024, tag_len=3,
                       batch_size=8)
    assert c.cost_row_len == 256 + 24 * (3 + 128)
    assert c.cost_tokens_repeated_prompt == 24 * (256 + 3 + 128)
    assert c.train_row_len == 256 + 3 + 1024
    # L > T: the cost slot is clamped to T.
    c2 = D.LayoutConfig(num_tags=2, num_traces=2, cost_len=50, max_prompt_len=8, max_trace_len=10, tag_len=2,
                        batch_size=1)
    assert c2.cost_slot_len == 10 and c2.cost_row_len == 8 + 4 * (2 + 10)


def test_tag_table_left_padded_with_unequal_tag_lengths(tok):
    tags = tk.ForkingTags.for_tokenizer(tok, 10)  # <think10> has one more (digit) token than <think9>
    table, lengths = D.tag_table(tok, tags)
    ids = tags.all_tag_ids(tok)
    assert len(ids[9]) == len(ids[8]) + 1 and table.shape == (10, len(ids[9]))
    for i, t in enumerate(ids):
        assert lengths[i] == len(t)
        assert list(table[i, table.shape[1] - len(t):]) == t
        assert not table[i, :table.shape[1] - len(t)].any()
    with pytest.raises(ValueError, match="tag slot"):
        D.tag_table(tok, tags, tag_len=len(ids[0]))


# ------------------------------------------------------------------------------------------------
# Cost view
# ------------------------------------------------------------------------------------------------


def test_cost_view_layout_and_masks(tok):
    tags, cfg, qs, _, table, lengths = _setup(tok, n_tags=10, n_traces=3, L=5, P=56, T=24, n=4)
    lay = D.QuestionLayout(cfg, table, lengths)
    N, M, P, Lt, Le = cfg.num_tags, cfg.num_traces, cfg.max_prompt_len, cfg.tag_len, cfg.cost_slot_len
    for q in qs:
        cv = lay.cost_view(q)
        assert cv["tokens"].shape == (cfg.cost_row_len,)
        p = len(q.prompt_ids)
        assert list(cv["tokens"][:p]) == list(q.prompt_ids) and (cv["segment_ids"][:p] == 1).all()
        assert (cv["positions"][:p] == np.arange(p)).all() and not cv["segment_ids"][p:P].any()
        nt = len(q.trace_ids)
        assert list(cv["trace_valid"]) == [j < nt for j in range(M)]
        covered = np.zeros(cfg.cost_row_len, bool)
        for i in range(N):
            tag = tags.tag_ids(tok, i)
            for j in range(M):
                base = cfg.pair_block_start(i, j)
                blk = slice(base, base + Lt + Le)
                if j >= nt:  # invalid trace: the whole block is padding, no loss
                    assert not cv["segment_ids"][blk].any() and not cv["loss_mask"][blk].any()
                    assert (cv["pair_ids"][blk] == -1).all()
                    continue
                trace = list(q.trace_ids[j][:Le])
                a, b = base + Lt - len(tag), base + Lt + len(trace)
                # exactly the unpacked sequence prompt + tag + trace[:L'], tag left-padded against the trace
                assert list(cv["tokens"][a:b]) == tag + trace
                assert list(q.prompt_ids) + tag + trace == tk.render_example(
                    tok, f"What is {int(q.id[1:])}+{int(q.id[1:])}? Solve {int(q.id[1:])}.",
                    TRACES[j] + f" ({q.id[1:]})", tags, i).input_ids[:p + len(tag) + len(trace)]
                assert (cv["segment_ids"][a:b] == 2 + i * M + j).all() and (cv["prefix_segment_ids"][a:b] == 1).all()
                assert not cv["segment_ids"][base:a].any() and not cv["segment_ids"][b:base + Lt + Le].any()
                assert (cv["positions"][a:b] == p + np.arange(b - a)).all()
                # loss exactly where the target is one of the first L' trace tokens
                lm = np.flatnonzero(cv["loss_mask"])
                mine = lm[(lm >= a) & (lm < b)]
                assert list(mine) == list(range(base + Lt - 1, b - 1))
                assert list(cv["targets"][mine]) == trace
                assert (cv["pair_ids"][mine] == i * M + j).all()
                assert cv["cost_lengths"][j] == len(trace) == min(Le, len(q.trace_ids[j]))
                covered[a:b] = True
        assert int(cv["loss_mask"].sum()) == N * sum(min(Le, len(t)) for t in q.trace_ids)
        assert not cv["segment_ids"][P:][~covered[P:]].any()
        assert ((cv["pair_ids"] >= 0) == (cv["loss_mask"] == 1)).all()


def test_cost_view_segments_only_see_prompt_and_themselves(tok):
    tags, cfg, qs, _, table, lengths = _setup(tok, n_tags=3, n_traces=2, L=4, P=56, T=16, n=2)
    cv = D.QuestionLayout(cfg, table, lengths).cost_view(qs[1])  # q1 has 2 traces
    R = cfg.cost_row_len
    slots = jnp.arange(R)[None]
    mask = np.asarray(Mdl.attention_mask(jnp.asarray(cv["segment_ids"])[None], jnp.asarray(cv["segment_ids"])[None],
                                         slots, slots, jnp.asarray(cv["prefix_segment_ids"])[None]))[0, 0, 0]
    seg = cv["segment_ids"]
    p = len(qs[1].prompt_ids)
    checked = 0
    for t in range(R):
        vis = set(np.flatnonzero(mask[t]))
        if seg[t] == 0:
            assert not vis
        elif seg[t] == 1:
            assert vis == set(range(t + 1))
        else:
            own = {s for s in range(t + 1) if seg[s] == seg[t]}
            assert vis == set(range(p)) | own
            checked += 1
    assert checked == int((seg >= 2).sum()) > 0


def test_cost_matrix_read_back_exact_and_nan_free(tok):
    tags, cfg, qs, _, table, lengths = _setup(tok, n_tags=3, n_traces=2, L=4, P=56, T=16, n=4, B=4)
    N, M = cfg.num_tags, cfg.num_traces
    batch = next(D.make_iterator(qs, cfg, table, lengths, shuffle=False, epochs=1))
    cv = batch["cost"]
    rs = np.random.RandomState(0)
    want = rs.randint(1, 64, (4, N, M)).astype(np.float32) / 4  # dyadic: means are exact
    nll = np.full(cv["tokens"].shape, np.nan, np.float32)  # NaN wherever no loss: must be ignored
    for b in range(4):
        for k in np.flatnonzero(cv["loss_mask"][b]):
            pid = cv["pair_ids"][b, k]
            # per-token values vary around the pair's mean, pairwise cancelling (+d, -d) keeps the mean exact
            nll[b, k] = want[b, pid // M, pid % M]
    # alternate +/- 0.5 on consecutive tokens of each pair with an even count
    for b in range(4):
        for pid in range(N * M):
            idx = np.flatnonzero((cv["pair_ids"][b] == pid) & (cv["loss_mask"][b] == 1))
            for u in range(0, len(idx) - 1, 2):
                nll[b, idx[u]] += 0.5
                nll[b, idx[u + 1]] -= 0.5
    C = np.asarray(jax.jit(lambda x, v: rows_lib.cost_matrix_from_token_nll(x, v, N, M))(nll, cv))
    tv = cv["trace_valid"]
    assert not np.isnan(C).any()
    np.testing.assert_array_equal(C[np.broadcast_to(tv[:, None, :], C.shape)],
                                  want[np.broadcast_to(tv[:, None, :], C.shape)])
    assert (~tv).any() and np.isposinf(C[np.broadcast_to(~tv[:, None, :], C.shape)]).all()
    # invalid tags are masked to +inf too
    cv2 = dict(cv, tag_valid=np.array([[True, False, True]] * 4))
    C2 = np.asarray(rows_lib.cost_matrix_from_token_nll(nll, cv2, N, M))
    assert np.isposinf(C2[:, 1]).all() and (C2[:, [0, 2]][np.broadcast_to(tv[:, None], (4, 2, M))] < np.inf).all()


def test_tag_valid_config_leaves_blocks_empty(tok):
    tags, cfg, qs, _, table, lengths = _setup(tok, n_tags=3, n_traces=2, n=2, tag_valid=(True, False, True))
    cv = D.QuestionLayout(cfg, table, lengths).cost_view(qs[1])
    assert list(cv["tag_valid"]) == [True, False, True]
    blk = slice(cfg.pair_block_start(1, 0), cfg.pair_block_start(2, 0))
    assert not cv["segment_ids"][blk].any() and cv["segment_ids"][cfg.pair_block_start(2, 0):].any()


# ------------------------------------------------------------------------------------------------
# Train view and fill_tags
# ------------------------------------------------------------------------------------------------


def test_train_view_fill_tags_matches_render_example(tok):
    tags, cfg, qs, _, table, lengths = _setup(tok, n_tags=10, n_traces=2, L=4, P=56, T=40, n=4, B=4)
    M, P, Lt, S = cfg.num_traces, cfg.max_prompt_len, cfg.tag_len, cfg.train_row_len
    batch = next(D.make_iterator(qs, cfg, table, lengths, shuffle=False, epochs=1))
    tv = batch["train"]
    assert tv["tokens"].shape == (4, M, S)
    assert not tv["segment_ids"][:, :, P:P + Lt].any() and not tv["tokens"][:, :, P:P + Lt].any()  # empty slot
    # tags 8 and 9 have different lengths: both exercise left padding
    assign = np.array([[9, 8], [8, 9], [0, -1], [3, 9]], np.int32)
    f = {k: np.asarray(v) for k, v in jax.jit(rows_lib.fill_tags)(tv, assign, table, lengths).items()}
    for b in range(4):
        q = qs[int(batch["question_index"][b])]
        k = int(q.id[1:])
        for j in range(M):
            valid = j < len(q.trace_ids)
            assert tv["trace_valid"][b, j] == valid
            if not valid or assign[b, j] < 0:
                assert not (f["segment_ids"][b, j].any() or f["loss_mask"][b, j].any() or f["tokens"][b, j].any())
                continue
            i = assign[b, j]
            ex = tk.render_example(tok, f"What is {k}+{k}? Solve {k}.", TRACES[j] + f" ({k})", tags, int(i))
            real = f["segment_ids"][b, j] == 1
            assert list(f["tokens"][b, j][real]) == ex.input_ids
            # the tag sits right after the prompt slots, left-padded against the trace
            lt = len(ex.tag_ids)
            assert list(f["tokens"][b, j, P + Lt - lt:P + Lt]) == list(ex.tag_ids)
            assert not f["segment_ids"][b, j, P:P + Lt - lt].any()
            assert (f["positions"][b, j][real] == np.arange(len(ex.input_ids))).all()
            # loss on exactly the positions whose target is a completion token (trace + end-of-turn)
            lm = f["loss_mask"][b, j] == 1
            assert lm.any() and list(f["targets"][b, j][lm]) == list(ex.completion_ids)
            assert list(np.flatnonzero(lm)) == list(range(P + Lt - 1, P + Lt + len(ex.completion_ids) - 1))
            # targets: the next real token everywhere in the row
            ids = ex.input_ids
            assert list(f["targets"][b, j][real]) == ids[1:] + [0]


def test_fill_tags_ignores_tags_on_invalid_traces_and_handles_flat_rows(tok):
    tags, cfg, qs, _, table, lengths = _setup(tok, n_tags=3, n_traces=2, n=2, B=2)
    tv = next(D.make_iterator(qs, cfg, table, lengths, shuffle=False, epochs=1))["train"]
    assert list(tv["trace_valid"][0]) == [True, False]
    f = rows_lib.fill_tags(tv, np.array([[0, 1], [1, 2]]), table, lengths)
    assert not np.asarray(f["segment_ids"])[0, 1].any() and not np.asarray(f["loss_mask"])[0, 1].any()
    flat = {k: np.asarray(v).reshape((-1,) + np.shape(v)[2:]) for k, v in tv.items()}
    g = rows_lib.fill_tags(flat, np.array([0, 1, 1, 2]), table, lengths)
    for k in f:
        np.testing.assert_array_equal(np.asarray(f[k]).reshape(np.shape(g[k])), g[k])


def test_truncated_traces_lose_eos_and_are_counted(tok):
    tags = tk.ForkingTags.for_tokenizer(tok, 3)
    cfg = D.LayoutConfig.for_tokenizer(tok, tags, num_traces=2, cost_len=50, max_prompt_len=56, max_trace_len=6,
                                       batch_size=1)  # L > T: the cost covers all T tokens
    eos = tk.eos_token_ids(tok)[0]
    qs, rep = D.tokenize_records(_records(2), tok, tags, cfg, overlong="truncate")
    assert rep.truncated_traces == 3 and rep.truncated_questions == 2 and rep.num_kept == 2
    assert all(len(t) == 6 and t[-1] != eos for q in qs for t in q.trace_ids) and all(all(q.truncated) for q in qs)
    table, lengths = D.tag_table(tok, tags)
    cv = D.QuestionLayout(cfg, table, lengths).cost_view(qs[1])
    assert cfg.cost_slot_len == 6 and int(cv["loss_mask"].sum()) == 3 * 2 * 6
    with pytest.raises(D.DataError, match="trace_over_budget"):
        D.tokenize_records(_records(2), tok, tags, cfg, overlong="reject")
    # both records are overlong: skipping them all leaves nothing, which is an error too
    with pytest.raises(D.DataError, match="no usable records"):
        D.tokenize_records(_records(2), tok, tags, cfg, overlong="reject", on_bad_record="skip")


# ------------------------------------------------------------------------------------------------
# The real proof: packed cost view == separate unpacked sequences through the model
# ------------------------------------------------------------------------------------------------


def _token_nll(logits, targets):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def test_packed_cost_and_filled_train_rows_equal_unpacked_model_runs(tok):
    tags, cfg, qs, _, table, lengths = _setup(tok, n_tags=3, n_traces=2, L=5, P=56, T=24, n=2, B=2)
    N, M = cfg.num_tags, cfg.num_traces
    mcfg = Mdl.ModelConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    params = Mdl.init_params(mcfg, seed=3)
    params = jax.tree.map(lambda x: x * 3.0, params)  # sharper logits: the comparison must be sensitive
    batch = next(D.make_iterator(qs, cfg, table, lengths, shuffle=False, epochs=1))
    cv = batch["cost"]

    @jax.jit
    def packed_cost(cv):
        logits = Mdl.forward(mcfg, params, cv["tokens"], cv["segment_ids"], cv["positions"],
                             prefix_segment_ids=cv["prefix_segment_ids"])
        return rows_lib.cost_matrix_from_token_nll(_token_nll(logits, cv["targets"]), cv, N, M)

    C = np.asarray(packed_cost(cv))
    # reference: each (prompt + tag_i + trace_j[:L']) alone in its own row, right-padded (segment 0)
    seqs, meta = [], []
    for b in range(2):
        q = qs[int(batch["question_index"][b])]
        for i in range(N):
            for j in range(len(q.trace_ids)):
                head = list(q.prompt_ids) + tags.tag_ids(tok, i)
                tr = list(q.trace_ids[j][:cfg.cost_slot_len])
                seqs.append(head + tr)
                meta.append((b, i, j, len(head), len(tr)))
    W = max(map(len, seqs))
    toks = np.zeros((len(seqs), W), np.int32)
    segs = np.zeros((len(seqs), W), np.int32)
    for r, s in enumerate(seqs):
        toks[r, :len(s)], segs[r, :len(s)] = s, 1
    logits = jax.jit(lambda t, s: Mdl.forward(mcfg, params, t, s))(toks, segs)
    nll = np.asarray(_token_nll(logits, jnp.asarray(np.concatenate([toks[:, 1:], toks[:, :1] * 0], 1))))
    ref = np.full((2, N, M), np.inf, np.float32)
    for r, (b, i, j, h, n) in enumerate(meta):
        ref[b, i, j] = nll[r, h - 1:h - 1 + n].mean()
    np.testing.assert_allclose(C, ref, atol=1e-4, rtol=0)
    fin = np.isfinite(ref)
    assert np.isposinf(C[~fin]).all() and (~fin).any()
    both = fin[:, 0] & fin[:, 1]
    assert np.abs(C[:, 0][both] - C[:, 1][both]).max() > 1e-2, "costs must depend on the tag for the test to mean much"

    # train view: filled rows (with padding gaps) compute what the contiguous render_example sequence does
    assign = np.array([[2, 0], [1, 0]], np.int32)
    f = rows_lib.fill_tags(batch["train"], assign, table, lengths)
    rows = {k: jnp.reshape(v, (-1, v.shape[-1])) for k, v in f.items()}
    tl = jax.jit(lambda r: _token_nll(Mdl.forward(mcfg, params, r["tokens"], r["segment_ids"], r["positions"]),
                                      r["targets"]))(rows)
    tl = np.asarray(tl).reshape(2, M, -1)
    lm = np.asarray(f["loss_mask"])
    for b in range(2):
        q = qs[int(batch["question_index"][b])]
        for j in range(len(q.trace_ids)):
            ids = list(q.prompt_ids) + tags.tag_ids(tok, int(assign[b, j])) + list(q.trace_ids[j])
            lg = Mdl.forward(mcfg, params, jnp.asarray([ids]))
            r_nll = np.asarray(_token_nll(lg, jnp.asarray([ids[1:] + [0]])))[0]
            start = len(ids) - len(q.trace_ids[j]) - 1
            np.testing.assert_allclose(tl[b, j][lm[b, j] == 1], r_nll[start:len(ids) - 1], atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------
# Validation: every reason, in both modes, with file:line
# ------------------------------------------------------------------------------------------------

GOOD = {"id": "good", "question": "What is 2+2?", "traces": [{"text": "2+2=4. So the answer is 4."}]}
GOOD2 = {"id": "good2", "question": "What is 3+3?", "traces": [{"text": "3+3=6. So the answer is 6."}]}
# Rows of a per-trace shape (TRL conversational) for one question that disagree on its answer: the case is a file
# of that shape (a native row among them would make the file's shape ambiguous).
CONFLICTING = [{"id": "x", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": t}],
                "answer": a} for t, a in (("a", "1"), ("b", "2"))]
BAD_CASES = {
    "broken_json": b'{"id": "x", "question": "q", "traces": [',
    "invalid_utf8": b'{"id": "x", "question": "caf\xe9", "traces": [{"text": "a"}]}',
    "lone_surrogate": {"id": "x", "question": "q", "traces": [{"text": "bad \ud800 text"}]},
    "nul_byte": {"id": "x", "question": "q\u0000", "traces": [{"text": "a"}]},
    "non_finite_number": b'{"id": "x", "question": "q", "traces": [{"text": "a"}], "answer": NaN}',
    "wrong_type": {"id": "x", "question": "q", "traces": [{"text": 5}]},
    "missing_field": {"id": "x", "traces": [{"text": "a"}]},
    "duplicate_id": {"id": "good", "question": "q", "traces": [{"text": "a"}]},
    "bad_messages": {"id": "x", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                     "traces": [{"text": "a"}]},
    "conflicting_rows": CONFLICTING,
    "empty_prompt": {"id": "x", "question": "  ", "traces": [{"text": "a"}]},
    "no_traces": {"id": "x", "question": "q", "traces": []},
    "empty_trace": {"id": "x", "question": "q", "traces": [{"text": "a"}, {"text": " \n"}]},
    "duplicate_trace": {"id": "x", "question": "q", "traces": [{"text": "same"}, {"text": "same"}]},
    "too_many_traces": {"id": "x", "question": "q", "traces": [{"text": "a"}, {"text": "b"}, {"text": "c"}]},
    "unknown_characters": {"id": "x", "question": "caf\u00e9?", "traces": [{"text": "a"}]},  # char tokenizer: no é
    "template_error": {"id": "x", "question": "q \ue000ssft0\ue001", "traces": [{"text": "a"}]},
    "prompt_over_budget": {"id": "x", "question": "word " * 80, "traces": [{"text": "a"}]},
    "trace_over_budget": {"id": "x", "question": "q", "traces": [{"text": "word " * 80}]},
}


def test_every_reason_has_a_case():
    assert set(BAD_CASES) == set(D.REASONS)


def _messages_rows(rec):
    """A native record as TRL conversational rows, one per trace."""
    return [{"id": rec["id"], "messages": [{"role": "user", "content": rec["question"]},
                                           {"role": "assistant", "content": t["text"]}]} for t in rec["traces"]]


def _write_jsonl(path, bad):
    """GOOD, a blank line, the bad case, GOOD2; returns the line the bad record is reported at."""
    if isinstance(bad, list):  # rows of a per-trace shape: the good records in that shape too
        good, rows, good2 = _messages_rows(GOOD), [json.dumps(r).encode() for r in bad], _messages_rows(GOOD2)
        lines = [json.dumps(r).encode() for r in good] + [b""] + rows + [json.dumps(r).encode() for r in good2]
        return path.write_bytes(b"\n".join(lines) + b"\n") and len(good) + 1 + len(rows)  # the row that disagrees
    lines = [json.dumps(GOOD).encode(), b"", bad if isinstance(bad, bytes) else json.dumps(bad).encode(),
             json.dumps(GOOD2).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return 3  # line number of the bad record


@pytest.fixture(scope="module")
def char_tok(tmp_path_factory):
    return tk.build_char_tokenizer(tmp_path_factory.mktemp("char_tok"))


@pytest.mark.parametrize("reason", sorted(BAD_CASES))
@pytest.mark.parametrize("mode", ["error", "skip"])
def test_bad_records_error_or_skip(tok, char_tok, tmp_path, reason, mode, caplog):
    # The tiny BPE tokenizer is byte-level: it can encode every character, so unknown characters need the char one.
    t = char_tok if reason == "unknown_characters" else tok
    tags = tk.ForkingTags.for_tokenizer(t, 3)
    cfg = D.LayoutConfig.for_tokenizer(t, tags, num_traces=2, cost_len=4, max_prompt_len=56, max_trace_len=30,
                                       batch_size=1)
    path = tmp_path / "data.jsonl"
    line = _write_jsonl(path, BAD_CASES[reason])
    if mode == "error":
        with pytest.raises(D.DataError) as ei:
            D.load_questions(path, t, tags, cfg, overlong="reject")
        msg = str(ei.value)
        assert f"{path}:{line}" in msg and reason in msg and ei.value.reason == reason
        assert ei.value.where == f"{path}:{line}" and ei.value.count == 1
        if reason not in ("broken_json", "invalid_utf8", "non_finite_number"):
            assert "'x'" in msg or "'good'" in msg  # the record id
    else:
        with caplog.at_level(logging.WARNING, logger="ssft_jax.data"):
            qs, rep = D.load_questions(path, t, tags, cfg, overlong="reject", on_bad_record="skip")
        assert rep.skipped == {reason: 1} and rep.num_records == 3 and rep.num_kept == 2
        assert [q.id for q in qs] == ["good", "good2"] and [q.index for q in qs] == [0, 1]
        assert f"{path}:{line}" in rep.examples[reason][0]
        assert any(reason in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_new_rejections_say_what_and_where(char_tok, tmp_path):
    """The details of the reasons this layer added: the NaN's path in the record, the characters the tokenizer
    lacks, and for a grouped question the row of the trace that is bad."""
    tags = tk.ForkingTags.for_tokenizer(char_tok, 3)
    cfg = D.LayoutConfig.for_tokenizer(char_tok, tags, num_traces=2, cost_len=4, max_prompt_len=56,
                                       max_trace_len=30, batch_size=1)
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": "x", "question": "q", "traces": [{"text": "a", "score": -Infinity}]}\n')
    with pytest.raises(D.DataError, match=r"non_finite_number: traces\[0\]\.score is not a finite number"):
        D.load_questions(path, char_tok, tags, cfg)
    lacking = "traces[1] has characters the tokenizer cannot encode: '\u00e9' (U+00E9), '\U0001F600' (U+1F600)"
    with pytest.raises(D.DataError, match=re.escape(f"records[0]: record 'x': unknown_characters: {lacking}")):
        D.tokenize_records([{"id": "x", "question": "q", "traces": ["ok", "caf\u00e9 \U0001F600"]}], char_tok, tags,
                           cfg)
    rows = [{"prompt": "q", "completion": c} for c in ("a", "")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(D.DataError) as ei:
        D.load_questions(path, char_tok, tags, cfg)
    assert ei.value.where == f"{path}:2" and ei.value.reason == "empty_trace"  # the trace's row, not the question's


def test_in_memory_and_parquet_sources_name_the_record(tok, tmp_path):
    tags = tk.ForkingTags.for_tokenizer(tok, 3)
    cfg = D.LayoutConfig.for_tokenizer(tok, tags, num_traces=2, cost_len=4, max_prompt_len=56, max_trace_len=30,
                                       batch_size=1)
    recs = [GOOD, {"id": 7, "question": 3, "traces": [{"text": "a"}]}]
    with pytest.raises(D.DataError, match=r"gsm8k\[1\]: record '7': wrong_type"):
        D.tokenize_records(D.read_records(recs, name="gsm8k"), tok, tags, cfg)
    with pytest.raises(D.DataError, match=r"records\[1\]: .*wrong_type"):
        D.tokenize_records(recs + ["not a record"], tok, tags, cfg)
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [GOOD, {"id": "p1", "question": "q", "traces": [{"text": "x"}, {"text": "x"}]},
            {"id": "p2", "question": "What is 1+1?", "traces": [{"text": "It is 2.", "source": "m1"}]}]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(D.DataError, match=rf"{path}:row 1: record 'p1': duplicate_trace"):
        D.load_questions(path, tok, tags, cfg)
    qs, rep = D.load_questions([path, [{**GOOD, "id": "mem"}]], tok, tags, cfg, on_bad_record="skip")
    assert [q.id for q in qs] == ["good", "p2", "mem"] and rep.skipped == {"duplicate_trace": 1}
    # messages records render like the equivalent question
    q_msgs, _ = D.tokenize_records([{"id": "m", "messages": [{"role": "user", "content": GOOD["question"]}],
                                     "traces": GOOD["traces"]}], tok, tags, cfg)
    assert list(q_msgs[0].prompt_ids) == list(qs[0].prompt_ids)


def test_tokenization_equals_render_example(tok):
    tags, cfg, qs, rep, _, _ = _setup(tok, n=3, T=64)
    assert rep.num_kept == 3 and not rep.skipped and rep.truncated_traces == 0
    for q in qs:
        k = int(q.id[1:])
        for j, ids in enumerate(q.trace_ids):
            ex = tk.render_example(tok, f"What is {k}+{k}? Solve {k}.", TRACES[j] + f" ({k})", tags, None)
            assert list(q.prompt_ids) == list(ex.prompt_ids) and list(ids) == list(ex.completion_ids)


# ------------------------------------------------------------------------------------------------
# Grain pipeline
# ------------------------------------------------------------------------------------------------


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(x, y), a, b)))


def _assert_resumes_exactly(mk, ref, cuts):
    """For each cut: take `cut` batches from a fresh iterator, carry its state through JSON into another fresh one,
    and the rest must equal the uninterrupted run's batches from there on."""
    for cut in cuts:
        it = mk()
        _take(it, cut)
        state = json.loads(json.dumps(it.get_state()))
        it2 = mk()
        it2.set_state(state)
        rest = list(it2)
        assert len(rest) == len(ref) - cut and all(_same(a, b) for a, b in zip(rest, ref[cut:]))


@pytest.mark.parametrize("threads", [0, 2])
def test_resume_yields_identical_batches(tok, threads):
    import grain

    tags, cfg, qs, _, table, lengths = _setup(tok, n=7, B=2)
    ro = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4 if threads else 0)
    mk = lambda: D.make_iterator(qs, cfg, table, lengths, seed=5, epochs=3, read_options=ro)  # noqa: E731
    ref = list(mk())
    assert len(ref) == (7 * 3) // 2  # batches run across epochs; only the final partial batch is dropped
    # mid-epoch 1, across the epoch-1/2 boundary (batch 3 holds elements 6 and 7), epoch 3
    _assert_resumes_exactly(mk, ref, cuts=(1, 3, 5))
    # each epoch is a permutation of all questions, shuffled differently
    order = np.concatenate([b["question_index"] for b in ref])
    assert sorted(order[:7]) == list(range(7)) and sorted(order[7:14]) == list(range(7))
    assert list(order[:7]) != list(order[7:14])


def _chosen_traces(batch, qs, cfg):
    """Per batch row: the question index and which of its tokenized traces fill the M train rows."""
    t0 = cfg.max_prompt_len + cfg.tag_len
    out = []
    for b, qi in enumerate(batch["question_index"]):
        q, tr = qs[int(qi)], batch["train"]
        picked = []
        for j in range(cfg.num_traces):
            if tr["trace_valid"][b, j]:
                ids = list(tr["tokens"][b, j, t0:t0 + tr["trace_lengths"][b, j]])
                picked.append(next(k for k, t in enumerate(q.trace_ids) if list(t) == ids))
        out.append((int(qi), tuple(picked)))
    return out


def test_extra_traces_error_first_and_sample(tok):
    tags = tk.ForkingTags.for_tokenizer(tok, 3)
    cfg = D.LayoutConfig.for_tokenizer(tok, tags, num_traces=2, cost_len=4, max_prompt_len=56, max_trace_len=24,
                                       batch_size=2)
    recs = [{"id": f"q{k}", "question": f"What is {k}+{k}?", "traces": [f"{TRACES[t % 3][:12]} {k}.{t}" for t in
                                                                      range(4)]} for k in range(5)]
    recs += [{"id": f"one{k}", "question": f"What is {k}?", "traces": [f"It is {k}."]} for k in range(2)]
    with pytest.raises(D.DataError, match=r"too_many_traces: 4 traces > M=2 \(data.extra_traces='first'"):
        D.tokenize_records(recs, tok, tags, cfg)
    first, rep = D.tokenize_records(recs, tok, tags, cfg, extra_traces="first")
    assert rep.questions_over_m == 5 and "5 questions with more than M=2 traces (the first M kept)" in rep.summary()
    assert [[tok.decode(t[:-1].tolist()) for t in q.trace_ids] for q in first[:1]] == [recs[0]["traces"][:2]]

    qs, rep = D.tokenize_records(recs, tok, tags, cfg, extra_traces="sample")
    assert [len(q.trace_ids) for q in qs] == [4] * 5 + [1, 1] and rep.questions_over_m == 5
    table, lengths = D.tag_table(tok, tags)
    mk = lambda seed=3: D.make_iterator(qs, cfg, table, lengths, seed=seed, epochs=4)  # noqa: E731
    ref = list(mk())
    chosen = [c for b in ref for c in _chosen_traces(b, qs, cfg)]
    assert len(chosen) == 28
    # M distinct traces for every question that has more, in record order; one-trace questions as they are
    assert all(len(p) == 2 and p[0] < p[1] for qi, p in chosen if qi < 5)
    assert {p for qi, p in chosen if qi >= 5} == {(0,)}
    per_question = {qi: [p for i, p in chosen if i == qi] for qi in range(5)}
    assert all(len(v) == 4 for v in per_question.values())  # one visit per epoch
    assert any(len(set(v)) > 1 for v in per_question.values())  # a fresh subset each epoch, not one fixed choice
    assert chosen == [c for b in mk() for c in _chosen_traces(b, qs, cfg)]  # deterministic given the seed
    assert chosen != [c for b in mk(seed=4) for c in _chosen_traces(b, qs, cfg)]
    # mid-epoch 1; before and after batch 3 (the last question of epoch 1, the first of 2)
    _assert_resumes_exactly(mk, ref, cuts=(1, 3, 4, 9))


def test_sharding_and_static_shapes(tok):
    tags, cfg, qs, _, table, lengths = _setup(tok, n=8, B=2)
    got = []
    for k in range(2):
        for b in D.make_iterator(qs, cfg, table, lengths, seed=1, epochs=1, process_index=k, process_count=2):
            assert b["cost"]["tokens"].shape == (2, cfg.cost_row_len)
            assert b["train"]["tokens"].shape == (2, cfg.num_traces, cfg.train_row_len)
            assert b["cost"]["tag_valid"].shape == (2, cfg.num_tags) and b["question_index"].shape == (2,)
            got.append(b["question_index"])
    assert sorted(np.concatenate(got)) == list(range(8))
    with pytest.raises(ValueError, match="process_index"):
        D.make_iterator(qs, cfg, table, lengths, process_index=2, process_count=2)
    counts = D.batch_token_counts(next(D.make_iterator(qs, cfg, table, lengths, epochs=1)))
    assert 0 < counts["train_loss_tokens"] < counts["train_real"] < counts["train_slots"]


def test_prefix_cache_cost_layout_equals_packed(tok):
    """`ssft.cost_layout='prefix_cache'` (prompt once into a KV cache, read by N*M block rows) gives the packed
    row's C, with the same +inf where a trace is padding, and so the same optimal assignment."""
    from ssft_jax import losses

    tags, cfg, qs, _, table, lengths = _setup(tok, n_tags=3, n_traces=2, L=5, P=56, T=24, n=2, B=2)
    N, M = cfg.num_tags, cfg.num_traces
    mcfg = Mdl.ModelConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    params = jax.tree.map(lambda x: x * 3.0, Mdl.init_params(mcfg, seed=3))
    cv = next(D.make_iterator(qs, cfg, table, lengths, shuffle=False, epochs=1))["cost"]
    cost = jax.jit(lambda cv, layout: losses.cost_matrix(mcfg, params, cv, N, M, layout=layout,
                                                         prompt_len=cfg.max_prompt_len, block_len=cfg.pair_block_len),
                   static_argnums=1)
    packed, cached = np.asarray(cost(cv, "packed")), np.asarray(cost(cv, "prefix_cache"))
    fin = np.isfinite(packed)
    assert (~fin).any() and np.array_equal(fin, np.isfinite(cached)) and np.isposinf(cached[~fin]).all()
    np.testing.assert_allclose(cached[fin], packed[fin], atol=1e-5, rtol=0)
    assert np.ptp(packed[fin]) > 1e-2  # costs that differ: the comparison means something
    with pytest.raises(ValueError, match="prompt_len"):
        losses.cost_matrix(mcfg, params, cv, N, M, layout="prefix_cache", prompt_len=cfg.max_prompt_len, block_len=1)


def test_l_advisor_on_hand_made_traces():
    from ssft_jax.data import divergence_report, first_divergence
    assert first_divergence([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert first_divergence([1, 2], [1, 2, 3]) == 2 and first_divergence([5], [5]) is None
    # question 1: three traces; two agree on their first 13 tokens (differ at 13), one differs at 0
    a = list(range(20))
    b = list(range(13)) + [99] * 7
    c = [7] + list(range(1, 20))
    rep = divergence_report([[a, b, c], [[1, 2, 3], [1, 2, 3]]], cost_len=12)
    assert sorted(rep.points.tolist()) == [0, 0, 13] and rep.identical_pairs == 1
    assert rep.share_unseparated == pytest.approx(1 / 3) and rep.warn
    assert rep.suggested_cost_len == 14 and "L=14" in rep.warning() and "33%" in rep.warning()
    assert not divergence_report([[a, b, c]], cost_len=14).warn


def test_the_validation_report_carries_the_l_advice(char_tok, caplog):
    tags = tk.ForkingTags.for_tokenizer(char_tok, 4, "text")
    layout = D.LayoutConfig(num_tags=4, num_traces=2, cost_len=3, max_prompt_len=64, max_trace_len=32, tag_len=16,
                            batch_size=1)
    recs = [{"id": "q", "question": "1+1?", "traces": ["so 1+1=2", "so 2"]}]
    with caplog.at_level("WARNING"):
        _, report = D.tokenize_records(recs, char_tok, tags, layout)
    assert report.divergence.points.tolist() == [3] and "cost_prefix_len L=3" in report.summary()
    assert any("cannot tell those traces apart" in r.message for r in caplog.records)
