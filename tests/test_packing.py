"""Packed train rows (`ssft_jax.data.packing`): the same per-token losses and gradients as the unpacked view, the
same matching, deferral of a question that does not fit, exact resume."""
import dataclasses

import jax
import numpy as np
import pytest

from ssft_jax import assembly, config as config_lib, data as data_lib, losses, mesh as mesh_lib, rows as rows_lib, train
from ssft_jax.data import packing


def tiny_config(**data):
    c = config_lib.load_config("demo", "tiny")
    c.mesh.update(data=1, fsdp=1, tensor=1, num_devices=1)
    c.data.update(**data)
    return c


def _loss_and_grads(cfg, params, train_view, tag_of_trace, table, lengths):
    def loss(p):
        rows = rows_lib.fill_train_rows(train_view, tag_of_trace, table, lengths)
        s, n = losses.set_loss_sums(cfg, p, rows)
        return s / n, n
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


def _tags(B, M, N, seed):
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(N)[:M] for _ in range(B)]).astype(np.int32)


def _assert_same_loss_and_grads(cfg, params, unpacked, packed, table, lengths, tags, rtol, atol):
    (lu, nu), gu = _loss_and_grads(cfg, params, unpacked, tags, table, lengths)
    (lp, npk), gp = _loss_and_grads(cfg, params, packed, tags, table, lengths)
    assert float(nu) == float(npk) > 0
    np.testing.assert_allclose(float(lp), float(lu), rtol=rtol)
    for a, b in zip(jax.tree.leaves(gu), jax.tree.leaves(gp)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=rtol, atol=atol)


def test_first_fit_decreasing():
    assert packing.first_fit_decreasing([5, 3, 4, 2], 2, 7) == [(0, 0), (1, 4), (1, 0), (0, 5)]
    assert packing.first_fit_decreasing([5, 5, 5], 2, 7) is None
    assert packing.pack_groups(2, 1) == 2 and packing.pack_groups(2, 4) == 1 and packing.pack_groups(4, 2) == 2


def test_packed_loss_and_grads_equal_unpacked_on_the_tiny_model():
    c = tiny_config()
    mesh = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    x = assembly.build_inputs(c, mesh)
    ref = next(data_lib.make_iterator(x.questions, x.layout, x.tag_table, x.tag_lengths, seed=0))
    B, M = x.layout.batch_size, x.layout.num_traces
    S = x.layout.train_row_len
    lay = dataclasses.replace(x.layout, pack_rows=B, pack_len=3 * S)  # 3/4 of the unpacked slots
    it = data_lib.make_iterator(x.questions, lay, x.tag_table, x.tag_lengths, seed=0)
    pk = next(it)
    assert it.deferred_total == 0  # nothing deferred: the very same questions and cost views
    np.testing.assert_array_equal(pk["question_index"], ref["question_index"])
    for k in ref["cost"]:
        np.testing.assert_array_equal(pk["cost"][k], ref["cost"][k])
    counts_u, counts_p = data_lib.batch_token_counts(ref), data_lib.batch_token_counts(pk)
    assert (
        counts_u["train_real"] == counts_p["train_real"] and counts_p["train_slots"] * 4 == counts_u["train_slots"] * 3
    )
    tags = _tags(B, M, c.ssft.num_tags, 0)
    tags[1] = -1  # a dropped question: all padding in both layouts
    _assert_same_loss_and_grads(x.model_config, x.params, ref["train"], pk["train"], x.tag_table, x.tag_lengths,
                                tags, rtol=2e-5, atol=1e-7)
    # The filled rows hold the same sequences: prompt + tag + trace, positions 0.. per sequence.
    fu = jax.tree.map(np.asarray, rows_lib.fill_tags(ref["train"], tags, x.tag_table, x.tag_lengths))
    fp = jax.tree.map(np.asarray, rows_lib.fill_packed_tags(pk["train"], tags, x.tag_table, x.tag_lengths))
    for b in (0, 2):
        for j in range(M):
            row = pk["train"]["tag_row"][b, j]
            seg = b * M + j + 1
            sel_p, sel_u = fp["segment_ids"][row] == seg, fu["segment_ids"][b, j] != 0
            for k in ("tokens", "positions", "targets", "loss_mask"):
                np.testing.assert_array_equal(fp[k][row][sel_p], fu[k][b, j][sel_u])


def test_train_step_packed_equals_unpacked_with_micro_batches(tmp_path):
    """The real jitted step (matching included), two micro-batches, on 2 data-parallel devices."""
    runs = {}
    for packed in (False, True):
        c = tiny_config(packed=packed, pack_rows=4 if packed else 0, pack_len=400 if packed else 0)
        c.mesh.update(data=2, num_devices=2)
        c.micro_batches, c.num_steps, c.export_hf, c.checkpoint.every_steps = 2, 2, False, 100
        c.logging.tensorboard = False
        runs[packed] = train.run(c, tmp_path / str(packed), progress=False)
    assert runs[True]["compiles"] == 1
    assert runs[True]["assignment_patterns"] == runs[False]["assignment_patterns"]
    for step, loss in runs[False]["losses"].items():
        np.testing.assert_allclose(runs[True]["losses"][step], loss, rtol=2e-5)


def _questions(lengths, prompt=3):
    return [
        data_lib.TokenizedQuestion(
            index=i,
            id=f"q{i}",
            where=f"mem[{i}]",
            prompt_ids=np.full(prompt, 5, np.int32),
            trace_ids=tuple(np.full(n, 7, np.int32) for n in ls),
            truncated=(False,) * len(ls),
        )
        for i, ls in enumerate(lengths)
    ]


def _layout(**kw):
    base = dict(num_tags=3, num_traces=2, cost_len=4, max_prompt_len=4, max_trace_len=20, tag_len=2, batch_size=2)
    return data_lib.LayoutConfig(**{**base, **kw})


def test_a_question_that_does_not_fit_is_deferred_and_the_iterator_resumes_exactly():
    rng = np.random.default_rng(0)
    qs = _questions([tuple(int(n) for n in rng.choice([2, 3, 10], size=2)) for _ in range(24)])
    lay = _layout(pack_rows=2, pack_len=28)  # rows of 28: two short questions fit, two long ones do not
    table, lengths = np.ones((3, 2), np.int32), np.full(3, 2, np.int32)
    mk = lambda: data_lib.make_iterator(qs, lay, table, lengths, seed=1, epochs=2)  # noqa: E731
    it = mk()
    seen, states, batches = [], [], []
    for _ in range(10):
        states.append(it.get_state())
        b = next(it)
        batches.append(b)
        seen += list(b["question_index"])
        assert (b["train"]["segment_ids"].sum() == sum(2 * 3 + sum(len(t) for t in qs[i].trace_ids)
                                                       for i in b["question_index"]))
    assert it.deferred_total > 0
    assert len(set(seen)) > 16  # deferred questions come back
    again = mk()
    again.set_state(states[6])
    for want in batches[6:]:
        got = next(again)
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
            np.testing.assert_array_equal(a, b)


def test_packing_errors_name_the_question_or_the_setting():
    table, lengths = np.ones((3, 2), np.int32), np.full(3, 2, np.int32)
    qs = _questions([(18, 18)] * 4)
    with pytest.raises(packing.PackingError, match=r"mem\[\d\].*alone needs more than 1 rows"):
        next(data_lib.make_iterator(qs, _layout(pack_rows=1), table, lengths, shuffle=False))
    qs = _questions([(18, 18)] * 8 + [(2, 2)] * 2)
    with pytest.raises(packing.PackingError, match="deferred: data.pack_rows=2"):
        it = data_lib.make_iterator(qs, _layout(pack_rows=2, pack_len=24), table, lengths, shuffle=False, epochs=1)
        list(it)
    with pytest.raises(config_lib.ConfigError, match="data.pack_fill='rows'"):
        config_lib.validate(tiny_config(packed=True, pack_rows=4, pack_fill="rows"))
    with pytest.raises(ValueError, match="pack_fill must be"):
        _layout(pack_rows=2, pack_fill="row")
    with pytest.raises(config_lib.ConfigError, match="pack_rows must be >= 1"):
        config_lib.validate(tiny_config(packed=True))
    with pytest.raises(config_lib.ConfigError, match="not a multiple of micro_batches"):
        c = tiny_config(packed=True, pack_rows=3)
        c.mesh.update(data=2, num_devices=2)
        config_lib.validate(c, 2)


@pytest.mark.slow
def test_packed_loss_and_grads_equal_unpacked_on_smollm2():
    from ssft_jax import gguf_convert, hf_io, tokenization

    folder = gguf_convert.ensure_smollm2_hf()
    cfg, params = hf_io.load_hf_params(folder)
    tok = tokenization.load_tokenizer(folder)
    tags = tokenization.ForkingTags.for_tokenizer(tok, 4, "text")
    records = [{"id": f"q{i}", "question": q, "traces": tr} for i, (q, tr) in enumerate([
        ("What is 2+3?", ["2+3=5. The answer is 5.", "Count up from 2: 3, 4, 5. So 5."]),
        ("Name a prime.", ["2 is prime: it divides only by 1 and itself.", "7."]),
    ])]
    layout = data_lib.LayoutConfig.for_tokenizer(tok, tags, num_traces=2, cost_len=8, max_prompt_len=48,
                                                 max_trace_len=24, batch_size=2)
    qs, _ = data_lib.tokenize_records(records, tok, tags, layout)
    table, lengths = data_lib.tag_table(tok, tags, layout.tag_len)
    ref = next(data_lib.make_iterator(qs, layout, table, lengths, shuffle=False, epochs=1))
    pk = next(
        data_lib.make_iterator(
            qs,
            dataclasses.replace(layout, pack_rows=2, pack_len=2 * layout.train_row_len),
            table,
            lengths,
            shuffle=False,
            epochs=1,
        )
    )
    _assert_same_loss_and_grads(cfg, params, ref["train"], pk["train"], table, lengths,
                                np.array([[0, 2], [3, 1]], np.int32), rtol=1e-4, atol=1e-5)


def test_fill_by_tokens_fills_the_rows_and_keeps_every_question_once_and_resumes_exactly():
    """pack_fill="tokens": B is the most questions; the rows fill up, each question comes exactly once per epoch,
    empty slots have no valid trace, and the iterator state restores the same batches."""
    rng = np.random.default_rng(0)
    qs = _questions([tuple(int(n) for n in rng.choice([2, 3, 10, 17], size=2)) for _ in range(40)])
    table, lengths = np.ones((3, 2), np.int32), np.full(3, 2, np.int32)
    by_q = dict(pack_rows=2, pack_len=48)  # two questions always fit: the heaviest pair is 88 tokens
    by_t = _layout(batch_size=6, pack_fill="tokens", **by_q)
    mk = lambda lay: data_lib.make_iterator(qs, lay, table, lengths, seed=3, epochs=1)  # noqa: E731
    fill = {}
    for name, lay in (("questions", _layout(**by_q)), ("tokens", by_t)):
        real = slots = 0
        seen = []
        it = mk(lay)
        for b in it:
            idx = b["question_index"]
            seen += [int(i) for i in idx if i >= 0]
            # the real train tokens are exactly the batch's questions' sequences (tag slots are filled in-graph)
            assert b["train"]["segment_ids"].sum() == sum(2 * 3 + sum(len(t) for t in qs[i].trace_ids)
                                                          for i in idx if i >= 0)
            assert not b["train"]["trace_valid"][idx < 0].any() and not b["cost"]["segment_ids"][idx < 0].any()
            real += b["train"]["segment_ids"].sum() + 2 * b["train"]["trace_valid"].sum()
            slots += b["train"]["segment_ids"].size
        fill[name] = real / slots
        assert len(seen) == len(set(seen))
        if name == "tokens":  # no batch is dropped at the end of the epoch: it leaves with what it has
            assert sorted(seen) == list(range(40))
    assert fill["tokens"] > fill["questions"] + 0.1, fill
    it = mk(by_t)
    states, batches = [], []
    for _ in range(6):
        states.append(it.get_state())
        batches.append(next(it))
    assert it.deferred_total > 0
    again = mk(by_t)
    again.set_state(states[3])
    for want in batches[3:]:
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(next(again))):
            np.testing.assert_array_equal(a, b)


def test_fill_by_tokens_trains_like_the_same_questions_without_empty_slots(tmp_path):
    """A batch with empty question slots: the step's loss and gradients are those of its real questions alone,
    through the cost pass (both layouts), the matching and the set loss."""
    c = tiny_config()
    mesh = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    x = assembly.build_inputs(c, mesh)
    B = x.layout.batch_size
    S = x.layout.train_row_len
    lay = dataclasses.replace(x.layout, pack_rows=B, pack_len=3 * S, pack_fill="tokens")
    els = data_lib.make_dataset(x.questions, lay, x.tag_table, x.tag_lengths, seed=0)
    packer = packing.PackedTrainLayout(lay)
    real = [els[i] for i in range(B // 2)]
    with_empty = packing.stack_batch(real + [packing.empty_element(real[0])] * (B - B // 2), packer)
    assert list(with_empty["question_index"][B // 2:]) == [-1] * (B - B // 2)
    lay_half = dataclasses.replace(lay, batch_size=B // 2, pack_rows=B)
    alone = packing.stack_batch(real, packing.PackedTrainLayout(lay_half))
    for layout_name in ("packed", "prefix_cache"):
        cost_kw = dict(layout=layout_name, prompt_len=lay.max_prompt_len, block_len=lay.pair_block_len)
        N, M = lay.num_tags, lay.num_traces
        ce = losses.cost_matrix(x.model_config, x.params, with_empty["cost"], N, M, **cost_kw)
        ca = losses.cost_matrix(x.model_config, x.params, alone["cost"], N, M, **cost_kw)
        np.testing.assert_allclose(np.asarray(ce)[:B // 2], np.asarray(ca), rtol=1e-5)
        assert np.isinf(np.asarray(ce)[B // 2:]).all()
        tags_e, ok_e, _ = losses.assign("ssft", ce, with_empty["cost"]["tag_valid"], with_empty["train"]["trace_valid"],
                                        jax.random.key(0), c.ssft.matcher)
        assert (np.asarray(tags_e)[B // 2:] == -1).all() and bool(np.asarray(ok_e)[:B // 2].all())
    tags = np.asarray(tags_e)
    (le, ne), ge = _loss_and_grads(x.model_config, x.params, with_empty["train"], tags, x.tag_table, x.tag_lengths)
    (la, na), ga = _loss_and_grads(x.model_config, x.params, alone["train"], tags[:B // 2], x.tag_table,
                                   x.tag_lengths)
    assert float(ne) == float(na) > 0
    np.testing.assert_allclose(float(le), float(la), rtol=2e-5)
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(ge)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=1e-7)


def test_packed_run_resumes_exactly(tmp_path):
    """train.run with packed rows filled by tokens, stopped after 2 steps and resumed: the losses and the questions
    per step of an uninterrupted run."""
    def cfg():
        c = tiny_config(packed=True, pack_rows=2, pack_len=300, pack_fill="tokens")
        c.num_steps, c.export_hf, c.checkpoint.every_steps, c.log_every = 4, False, 2, 1
        c.logging.tensorboard = False
        return c
    whole = train.run(cfg(), tmp_path / "whole", progress=False)
    train.run(cfg(), tmp_path / "parts", progress=False, stop_after=2)
    resumed = train.run(cfg(), tmp_path / "parts", progress=False)
    assert resumed["start_step"] == 2
    assert resumed["losses"] == whole["losses"] and set(resumed["losses"]) == {1, 2, 3, 4}  # the whole run's
    from ssft_jax import metrics_log
    per_step = lambda w: {r["step"]: r.get("questions") for r in metrics_log.read_metrics(w)}  # noqa: E731
    a, b = per_step(tmp_path / "whole"), per_step(tmp_path / "parts")
    assert all(a[s] is not None and 1 <= a[s] <= 4 for s in a) and all(a[s] == b[s] for s in (3, 4))
