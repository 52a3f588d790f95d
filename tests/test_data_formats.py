"""The multi-trace shapes researchers already have (native, plain-string traces, s1K, s1K-1.1 teacher columns, TRL
conversational and prompt/completion rows), in JSONL, parquet, `datasets` folders and hub ids: each normalises to the
same tokenized questions as the native file; grouping by prompt; the held-out split; evaluation's labels."""
import json
import pathlib
import random
import re

import pytest

from ssft_jax import config as config_lib, data as D, datasets as ds_lib, evaluate as E, tokenization as tk

from hf_fixtures import build_tiny_tokenizer

# Question, its traces (teacher -> thinking), the shared attempt, the answer. Fewer traces than teachers for some.
QUESTIONS = [
    ("What is 2+3?", {"gemini": "2+3: count up from 2.", "deepseek": "3+2=5 by symmetry.", "qwen": "Five."}, "5", "5"),
    ("What is 7-4?", {"gemini": "7-4 is 3.", "deepseek": "4+3=7 so 3."}, "3", "3"),
    ("What is 2*6?", {"deepseek": "Double 6."}, "12", "12"),
    ("Name a prime.", {"gemini": "2 is prime.", "qwen": "The first is 2."}, "2", "2"),
]
TEACHERS = ("gemini", "deepseek", "qwen")


def _trace(thinking, attempt):
    return thinking + D.formats.THINKING_ANSWER_SEPARATOR + attempt


def _native(plain=False):
    out = []
    for q, th, att, ans in QUESTIONS:
        traces = [_trace(t, att) if plain else {"text": _trace(t, att), "source": k} for k, t in th.items()]
        out.append({"question": q, "traces": traces, "answer": ans})
    return out


def _s1k():
    return [{"solution": ans, "question": q, "cot_type": "math", "source_type": "synthetic", "metadata": "{}",
             "cot": None, "thinking_trajectories": list(th.values()), "attempt": att} for q, th, att, ans in QUESTIONS]


def _s1k_teachers():
    rows = []
    for q, th, att, ans in QUESTIONS:
        row = {"solution": ans, "question": q, "cot_type": "math", "source_type": "synthetic", "metadata": "{}"}
        for t in TEACHERS:  # a teacher without a trace for this question: None columns, as in a parquet file
            row[f"{t}_thinking_trajectory"] = th.get(t)
            row[f"{t}_attempt"] = att if t in th else None
        rows.append(row)
    return rows


def _per_trace(shape, seed=0):
    """One row per trace, the rows of all questions shuffled together. prompt_completion alternates its string and
    conversational forms (a JSONL file may mix them); _chat/_str: one form only (a parquet column has one type)."""
    rows = []
    for q, th, att, ans in QUESTIONS:
        for k, t in enumerate(th.values()):
            if shape == "messages":
                rows.append({"messages": [{"role": "user", "content": q},
                                          {"role": "assistant", "content": _trace(t, att)}], "answer": ans})
            elif shape == "prompt_completion_chat" or (shape == "prompt_completion" and k % 2):
                rows.append({"prompt": [{"role": "user", "content": q}],
                             "completion": [{"role": "assistant", "content": _trace(t, att)}], "solution": ans})
            else:
                rows.append({"prompt": q, "completion": _trace(t, att), "answer": ans})
    random.Random(seed).shuffle(rows)
    return rows


SHAPES = {"native": _native, "native_plain": lambda: _native(plain=True), "s1k": _s1k,
          "s1k_teachers": _s1k_teachers, "messages": lambda: _per_trace("messages"),
          "prompt_completion_str": lambda: _per_trace("prompt_completion_str"),
          "prompt_completion_chat": lambda: _per_trace("prompt_completion_chat")}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    tags = tk.ForkingTags.for_tokenizer(tok, 4)
    layout = D.LayoutConfig.for_tokenizer(tok, tags, num_traces=3, cost_len=4, max_prompt_len=64, max_trace_len=64,
                                          batch_size=1)
    return tok, tags, layout


def _view(questions):
    """What training sees of each question, independent of question and trace order."""
    return sorted((q.id, tuple(q.prompt_ids), tuple(sorted(tuple(t) for t in q.trace_ids)), q.answer)
                  for q in questions)


def _load(sources, setup, **kw):
    qs, report = D.load_questions(sources, *setup, **kw)
    assert not report.skipped
    return qs


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    return _view(_load(_jsonl(tmp_path_factory.mktemp("ref") / "native.jsonl", _native()), setup))


@pytest.mark.parametrize("store", ["jsonl", "parquet"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_shape_gives_the_native_questions(shape, store, setup, reference, tmp_path):
    path = (_jsonl if store == "jsonl" else _parquet)(tmp_path / f"d.{store}", SHAPES[shape]())
    assert _view(_load(path, setup)) == reference
    assert len(reference) == 4 and [len(r[2]) for r in reference] != [3] * 4  # some questions have fewer than M
    forced = shape.replace("_plain", "").replace("_str", "").replace("_chat", "")
    assert _view(_load(path, setup, format=forced)) == reference


def test_shapes_mix_across_files(setup, reference, tmp_path):
    # questions split over files of two shapes
    s1k, msgs = _s1k(), _per_trace("messages")
    a = _jsonl(tmp_path / "a.jsonl", s1k[:2])
    b = _parquet(tmp_path / "b.parquet", [r for r in msgs if r["messages"][0]["content"] in
                                          {q for q, *_ in QUESTIONS[2:]}])
    assert _view(_load([a, b], setup)) == reference
    # the traces of the same questions split over a messages file and a prompt/completion file (one per teacher
    # group): grouped by prompt across files
    pc = _per_trace("prompt_completion")
    first = _jsonl(tmp_path / "m.jsonl", msgs[: len(msgs) // 2])
    second = _jsonl(tmp_path / "p.jsonl", [r for r in pc if _trace_of(r) not in {_trace_of(m) for m in msgs[
        : len(msgs) // 2]}])
    assert _view(_load([first, second], setup)) == reference


def _trace_of(row):
    if "messages" in row:
        return row["messages"][-1]["content"]
    return row["completion"] if isinstance(row["completion"], str) else row["completion"][0]["content"]


def test_grouping_does_not_depend_on_row_or_file_order(setup, reference, tmp_path):
    views, orders = set(), set()
    for seed in range(4):
        rows = _per_trace("messages", seed=seed)
        half = len(rows) // 2
        parts = [_jsonl(tmp_path / f"{seed}a.jsonl", rows[:half]), _jsonl(tmp_path / f"{seed}b.jsonl", rows[half:])]
        qs = _load(parts[::-1] if seed % 2 else parts, setup)
        views.add(tuple(_view(qs)))
        orders.add(tuple(q.id for q in qs))
    assert views == {tuple(reference)} and len(orders) > 1  # the same questions and ids, whatever the order
    # the id of a question without one is its prompt's hash: the same for a string and its one user turn
    assert {r[0] for r in reference} == {D.prompt_id(q) for q, *_ in QUESTIONS}
    assert D.prompt_id("Hi") == D.prompt_id([{"role": "user", "content": "Hi"}]) != D.prompt_id("Hi ")


def test_grouping_compares_prompts_exactly(setup, tmp_path):
    def row(msgs, trace, **kw):
        return {"messages": msgs + [{"role": "assistant", "content": trace}], **kw}

    user = [{"role": "user", "content": "What is 2+3?"}]
    system = [{"role": "system", "content": "Be brief."}] + user
    rows = [row(user, "It is 5."), row(system, "5."), row(user, "2+3=5."), row(system, "Five."),
            row([{"role": "user", "content": "What is 2+3? "}], "5")]
    recs = D.read_records(rows)
    assert [r.record.get("question") or r.record["messages"] for r in recs] == [
        "What is 2+3?", system, "What is 2+3? "]
    assert [[t["text"] for t in r.record["traces"]] for r in recs] == [["It is 5.", "2+3=5."], ["5.", "Five."], ["5"]]
    assert recs[0].trace_where == ("records[0]", "records[2]")
    qs = _load(rows, setup)
    assert len({tuple(q.prompt_ids) for q in qs}) == 3  # the system turn is part of the rendered prompt
    # rows of one question that disagree on its answer (or id) reject the question, at the row that disagrees
    bad = [row(user, "It is 5.", answer="5"), row(system, "5."), row(user, "2+3=5.", answer=5)]
    recs = D.read_records(bad)
    assert recs[0].reason == "conflicting_rows" and recs[0].where == "records[2]" and "'5' at records[0]" in (
        recs[0].detail)
    with pytest.raises(D.DataError, match=r"records\[2\]: record 'q-[0-9a-f]{16}': conflicting_rows"):
        D.load_questions(bad, *setup)
    ids = [row(user, "It is 5.", id="a"), row(user, "2+3=5.", id="b")]
    assert D.read_records(ids)[0].reason == "conflicting_rows" and "id 'b', but 'a'" in D.read_records(ids)[0].detail


def test_ambiguous_shapes_are_an_error_naming_the_file(setup, tmp_path):
    path = _jsonl(tmp_path / "mixed.jsonl", _native()[:1] + _s1k()[1:2])
    with pytest.raises(D.FormatError, match=rf"{path}: its rows fit several shapes: native \(e\.g\. {path}:1\), "
                                            rf"s1k \(e\.g\. {path}:2\); set data.format"):
        D.read_records(path)
    # forced, the row that is not of that shape is a bad record, skipped and counted
    qs, report = D.load_questions(path, *setup, format="native", on_bad_record="skip")
    assert len(qs) == 1 and report.skipped == {"missing_field": 1}
    with pytest.raises(ValueError, match="format='csv'"):
        D.read_records(path, format="csv")


def test_datasets_folder_and_splits(setup, reference, tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "s1k_teachers"
    datasets.Dataset.from_list(_s1k_teachers()).save_to_disk(str(folder))
    assert _view(_load(str(folder), setup)) == reference
    assert D.read_records(str(folder))[0].where == f"{folder}:row 0"
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(_s1k()[:1]),
                          "test": datasets.Dataset.from_list(_s1k()[1:])}).save_to_disk(str(dd))
    assert len(D.read_records(str(dd))) == 1 and len(D.read_records(f"{dd}:test")) == 3  # default: train
    assert D.read_records(f"{dd}:test")[0].where == f"{dd}[test]:row 0"
    with pytest.raises(D.FormatError, match=r"no split 'dev'; it has \['train', 'test'\]"):
        D.read_records(f"{dd}:dev")
    with pytest.raises(FileNotFoundError, match=r"nope.jsonl: no such file or folder"):
        D.read_records(str(tmp_path / "nope.jsonl"))


def test_hub_id_read_offline_from_the_local_cache(setup, reference, tmp_path, monkeypatch):
    """A cache laid out as `datasets` leaves it after `load_dataset("owner/s1K-1.1")` online (cache/owner___name/
    config/version/hash/{name}-{split}.arrow + dataset_info.json), built here from local files with the parquet
    builder; offline, `load_dataset` reloads it from there, and so does `read_records`."""
    datasets = pytest.importorskip("datasets")
    from datasets.packaged_modules.parquet.parquet import Parquet

    cache = tmp_path / "cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    files = {"train": str(_parquet(tmp_path / "train.parquet", _s1k_teachers()))}
    builder = Parquet(data_files=files, cache_dir=str(cache), dataset_name="s1_k-1.1", config_id="default",
                      hash="0123abcd")
    builder.download_and_prepare()
    (cache / "s1_k-1.1").rename(cache / "simplescaling___s1_k-1.1")  # the namespace a hub id puts in front
    assert _view(_load("simplescaling/s1K-1.1", setup)) == reference
    assert _view(_load("simplescaling/s1K-1.1:train", setup)) == reference
    assert D.read_records("simplescaling/s1K-1.1")[0].where == "simplescaling/s1K-1.1[train]:row 0"
    with pytest.raises(FileNotFoundError) as ei:
        D.read_records("simplescaling/not-cached")
    msg = str(ei.value)
    assert "'simplescaling/not-cached'" in msg and str(cache) in msg and "HF_HUB_OFFLINE" in msg


# ------------------------------------------------------------------------------------------------
# Held-out split and evaluation's labels
# ------------------------------------------------------------------------------------------------


def _many(n):
    return [{"question": f"What is {k}+1?", "traces": [f"{k}+1={k + 1}"], "answer": str(k + 1)} for k in range(n)]


def test_readme_examples_are_the_shapes_they_show(setup):
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("\n## Your data\n"):readme.index("\n## Training\n")]
    blocks = [[json.loads(line) for line in b.strip().splitlines()] for b in re.findall(r"```json\n(.*?)```", section,
                                                                                          re.S)]
    shapes = [D.formats.detect_shape("readme", [D.RawRecord("readme", r) for r in rows]) for rows in blocks]
    assert shapes == ["native", "s1k", "s1k_teachers", "messages", "prompt_completion"]
    for rows in blocks:
        assert len(rows) == 3 and _load(rows, setup)


def test_heldout_of_files_is_by_id_hash_whatever_the_order(setup, tmp_path):
    rows = _many(40)
    c = config_lib.base_config()
    c.data.update(name="jsonl", path=str(_jsonl(tmp_path / "a.jsonl", rows)))
    assert ds_lib.build_records(c) == ([str(tmp_path / "a.jsonl")], [])  # "auto": files hold nothing out, unread
    c.data.heldout = 5
    train, held = ds_lib.build_records(c)
    ids = lambda recs: {r["id"] for r in recs}  # noqa: E731  (held out: record dicts with the ids training gives)
    assert len(held) == 5 and len(train) == 35 and not {D.record_id(r.record) for r in train} & ids(held)
    assert ids(held) <= {D.prompt_id(r["question"]) for r in rows}
    assert len(_load(train, setup)) == 35  # training takes the RawRecords as they are (their where: file:line)
    random.Random(1).shuffle(rows)
    c.data.path = f"{_jsonl(tmp_path / 'b.jsonl', rows[:20])},{_jsonl(tmp_path / 'c.jsonl', rows[20:])}"
    assert ids(ds_lib.build_records(c)[1]) == ids(held)  # the same questions from other files in another order
    c.data.heldout = 0.25
    assert len(ds_lib.build_records(c)[1]) == 10
    c.data.heldout = 40
    with pytest.raises(D.DataError, match="holds out 40 of 40 questions: none left to train on"):
        ds_lib.build_records(c)


def test_gsm8k_heldout_auto_is_its_last_200_and_fractions_work(tmp_path):
    rows = [{"question": f"Q{i}?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(210)]
    _jsonl(tmp_path / "test.jsonl", rows)
    c = config_lib.base_config()
    c.data.update(name="gsm8k", path=str(tmp_path))
    train, held = ds_lib.build_records(c)
    assert [r["question"] for r in held] == [f"Q{i}?" for i in range(10, 210)] and len(train) == 10
    c.data.heldout = 0.1
    assert [r["question"] for r in ds_lib.build_records(c)[1]] == [f"Q{i}?" for i in range(189, 210)]


@pytest.mark.parametrize("field,value", [("heldout", 1.5), ("heldout", -1), ("heldout", "all"), ("heldout", True),
                                         ("format", "csv"), ("extra_traces", "all")])
def test_new_data_fields_are_validated(field, value):
    c = config_lib.base_config()
    c.data[field] = value
    with pytest.raises(config_lib.ConfigError, match=f"data.{field}="):
        config_lib.validate(c, 8)


def test_evaluation_labels_what_it_scores(tmp_path):
    path = str(_jsonl(tmp_path / "a.jsonl", _many(12)))
    run = config_lib.base_config()
    run.data.update(name="jsonl", path=path, heldout=3)
    qs, scored = E.select_questions("jsonl", train_config=run.to_dict())
    held = ds_lib.build_records(run)[1]
    assert scored == "heldout" and qs == held and len(qs) == 3
    qs, scored = E.select_questions("jsonl", train_config=run.to_dict(), split="train")
    assert scored == "train" and len(qs) == 9
    run.data.heldout = "auto"  # the run trained on every question: never labelled held out
    qs, scored = E.select_questions("jsonl", train_config=run.to_dict())
    assert scored == "train" and len(qs) == 12
    qs, scored = E.select_questions("jsonl", path=path)  # no run names these files
    assert scored == "files" and len(qs) == 12
    other = str(_jsonl(tmp_path / "b.jsonl", _many(2)))
    assert E.select_questions("jsonl", path=other, train_config=run.to_dict())[1] == "files"
    assert E.select_questions("synthetic")[1] == "heldout"


def test_an_empty_file_is_named(setup, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(D.DataError, match=r"empty\.jsonl: holds no records"):
        D.load_questions(str(tmp_path / "empty.jsonl"), *setup)


def test_a_record_with_a_nan_literal_is_named_by_its_id(setup, tmp_path):
    path = tmp_path / "nan.jsonl"
    path.write_text('{"id": "q-nan", "question": "What?", "traces": ["a", "b"], "answer": NaN}\n'
                    '{"id": "q-ok", "question": "Why?", "traces": ["c", "d"], "answer": "1"}\n')
    qs, report = D.load_questions(str(path), *setup, on_bad_record="skip")
    assert [q.id for q in qs] == ["q-ok"]
    assert "nan.jsonl:1: record 'q-nan'" in report.summary() and "record '?'" not in report.summary()


@pytest.mark.parametrize("answer", [{"x": 1}, [1, 2], True])
def test_an_answer_that_is_not_a_string_or_number_is_refused(setup, tmp_path, answer):
    path = _jsonl(tmp_path / "a.jsonl", [{"id": "q1", "question": "What?", "traces": ["a", "b"], "answer": answer}])
    with pytest.raises(D.DataError, match=r"a\.jsonl:1.*'answer' must be a string or a number"):
        D.load_questions(str(path), *setup)
    for fine in ("42", 42, 4.5):  # what checkers compare
        path = _jsonl(tmp_path / "b.jsonl", [{"id": "q1", "question": "What?", "traces": ["a", "b"], "answer": fine}])
        assert D.load_questions(str(path), *setup)[0][0].answer == fine
