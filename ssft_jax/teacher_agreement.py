"""Tag-teacher agreement on real text: the paper's Figure 5 question, without generating anything.

GSM8K ships four model solutions per test question (`datasets.gsm8k.TEACHERS`: 6B and 175B models, fine-tuned or
verifier-selected). On the 151 questions where all four are correct and distinct (the `gsm8k_teachers` dataset,
trace j = teacher j) a model is trained with `ssft` and with `random` assignment for the same budget. Then:

  agreement  the teacher's *modal tag* is the tag the training matching gave it most often (the run's
             `summary.json` `trace_tag_counts`). On each held-out question the final model's cost matrix C[i, j]
             (mean NLL of teacher j's solution after tag i, as training computes it) is matched exactly; a teacher
             agrees when it lands on its modal tag. Reported per teacher (chance 1/N) and for all four at once
             (chance (N-M)!/N! when the modal tags are distinct, 0 when two teachers share one).
  heat map   the per-tag mean NLL of each teacher's held-out solutions, centred per teacher: a tag that steers to a
             teacher shows as that teacher's coolest cell.

    python -m ssft_jax.teacher_agreement [--out demo_out/real/gsm8k_agreement] [--steps K] [--quick]

The metric functions take plain arrays, so tests feed them a hand-made cost history.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import pathlib
import time
from typing import Any, Iterable, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

logger = logging.getLogger(__name__)

METHODS = ("ssft", "random")  # the comparison: bound by the matching vs tags that carry no information


# --------------------------------------------------------------------------------------------- the metric

def exact_assignment(cost: np.ndarray) -> np.ndarray:
    """Tag of each trace [M] for one question's C [N, M] (N >= M): the one-to-one assignment of least total cost
    (the Hungarian method; the in-graph solvers agree with it, `tests/test_matching.py`)."""
    cost = np.asarray(cost, np.float64)
    if cost.ndim != 2 or cost.shape[0] < cost.shape[1]:
        raise ValueError(f"expected a cost matrix [N tags, M traces] with N >= M, got shape {cost.shape}")
    if not np.isfinite(cost).all():
        raise ValueError("the cost matrix has a non-finite entry")
    rows, cols = linear_sum_assignment(cost)
    tags = np.empty(cost.shape[1], np.int64)
    tags[cols] = rows
    return tags


def counts_from_assignments(assignments: Iterable[Sequence[int]], num_tags: int) -> np.ndarray:
    """[M, N] tag histogram per trace position from assignments (tag per trace, -1 for none): what a run's
    `summary.json` `trace_tag_counts` holds, counted by the same `RunStats`."""
    from ssft_jax.run_stats import RunStats

    rows = [list(a) for a in assignments]
    if not rows:
        raise ValueError("no assignments")
    stats = RunStats(num_tags)
    stats.add_assignments(np.asarray(rows))
    return np.asarray(stats.trace_tag_counts(), np.int64)


def modal_tags(trace_tag_counts) -> np.ndarray:
    """The tag each trace position (teacher) got most often [M]; a tie goes to the lowest tag."""
    counts = np.asarray(trace_tag_counts)
    if counts.ndim != 2 or (counts.sum(axis=1) == 0).any():
        raise ValueError(f"expected [M, N] counts with every teacher matched at least once, got {counts.tolist()}")
    return counts.argmax(axis=1)


def chance_all_agree(modal: np.ndarray, num_tags: int) -> float:
    """P(a uniformly random one-to-one assignment puts every teacher on its modal tag)."""
    if len(set(modal.tolist())) < len(modal):
        return 0.0
    return 1.0 / math.perm(num_tags, len(modal))


def agreement(trace_tag_counts, heldout_costs: np.ndarray) -> dict[str, Any]:
    """Held-out tag-teacher agreement (module docstring) from training's [M, N] counts and held-out C [Q, N, M]."""
    counts = np.asarray(trace_tag_counts, np.int64)
    costs = np.asarray(heldout_costs, np.float64)
    if costs.ndim != 3 or costs.shape[1:] != counts.shape[::-1]:
        raise ValueError(f"held-out costs {costs.shape} do not match the [M, N] = {counts.shape} training counts")
    num_tags = costs.shape[1]
    modal = modal_tags(counts)
    tags = np.stack([exact_assignment(c) for c in costs])  # [Q, M]
    hit = tags == modal[None, :]
    return {
        "questions": int(costs.shape[0]),
        "modal_tags": modal.tolist(),
        # how consistently training itself placed each teacher: the share of its matchings on the modal tag
        "train_share_on_modal_tag": [float(counts[j, t] / counts[j].sum()) for j, t in enumerate(modal)],
        "per_teacher": hit.mean(axis=0).tolist(),
        "teacher_on_its_tag": float(hit.mean()),
        "chance_teacher": 1.0 / num_tags,
        "all_teachers": float(hit.all(axis=1).mean()),
        "chance_all": chance_all_agree(modal, num_tags),
        "heldout_assignments": tags.tolist(),
    }


def tag_teacher_nll(heldout_costs: np.ndarray) -> np.ndarray:
    """[N, M] mean over held-out questions of C[i, j]: each tag's NLL of each teacher's solutions."""
    return np.asarray(heldout_costs, np.float64).mean(axis=0)


# ------------------------------------------------------------------------------------- held-out costs

def heldout_costs(workdir: str | pathlib.Path, records: Sequence[dict]) -> np.ndarray:
    """C [Q, N, M] of `records` under the final checkpoint of a training run in `workdir`: the same cost view, cost
    layout and L as its training steps (`losses.cost_matrix`), one question at a time, in record order."""
    import jax

    from ssft_jax import assembly, config as config_lib, data as data_lib, losses, memory_plan, mesh as mesh_lib

    lm = assembly.load_checkpoint_for_generation(workdir)
    config = config_lib.from_saved(lm.train_config)
    config.batch_size, config.micro_batches, config.data.packed = 1, 1, False  # every question, in order
    mesh = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    pieces = assembly.build(config, mesh=mesh, params="none", tokenizer=lm.tokenizer)
    layout, s = pieces.layout, config.ssft
    questions, report = data_lib.tokenize_records(list(records), pieces.tokenizer, pieces.tags, layout,
                                                  overlong=config.data.overlong)
    if len(questions) != len(records) or any(len(q.trace_ids) != s.max_traces for q in questions):
        raise ValueError(f"every held-out question needs all {s.max_traces} teachers in budget ({report.summary()})")
    cost_fn = jax.jit(lambda p, view: losses.cost_matrix(
        lm.cfg, p, view, s.num_tags, s.max_traces, config.model.logprob_chunk,
        layout=memory_plan.resolve_cost_layout(config, layout.tag_len, mesh),
        prompt_len=layout.max_prompt_len, block_len=layout.pair_block_len))
    it = data_lib.make_iterator(questions, layout, pieces.tag_table, pieces.tag_lengths, epochs=1, shuffle=False,
                                process_index=0, process_count=1)
    out = [np.asarray(cost_fn(lm.params, batch["cost"]))[0] for batch in it]
    if len(out) != len(records):
        raise RuntimeError(f"{len(out)} cost matrices for {len(records)} questions")
    return np.stack(out)


# ------------------------------------------------------------------------------------------------- the run

CONFIG = "smollm2_gsm8k_teachers"


def run_config(method: str, *, quick: bool = False, steps: int | None = None, seed: int = 0):
    """configs/smollm2_gsm8k_teachers.py (its 'tiny' variant with quick) for `method`, on one CPU device."""
    from ssft_jax.config import load_config

    c = load_config(CONFIG, "tiny" if quick else "")
    c.mesh.update(data=1, fsdp=1, tensor=1, num_devices=1)
    c.ssft.method, c.seed = method, seed
    if steps:
        c.num_steps = steps
    return c


def markdown_table(results: dict[str, dict]) -> str:
    first = next(iter(results.values()))
    lines = [f"| method | teacher on its training tag (chance {first['chance_teacher']:.3f}) | all four on theirs "
             f"(chance {first['chance_all']:.4f}) | training's share on the modal tag | modal tags |",
             "|---|---|---|---|---|"]
    for method, r in results.items():
        lines.append(f"| {method} | {r['teacher_on_its_tag']:.3f} | {r['all_teachers']:.3f} "
                     f"(chance {r['chance_all']:.4f}) | {np.mean(r['train_share_on_modal_tag']):.3f} | "
                     f"{' '.join(f'<think{t + 1}>' for t in r['modal_tags'])} |")
    return "\n".join(lines)


def plot(results: dict[str, dict], teachers: Sequence[str], path: pathlib.Path) -> None:
    """Per method, the [N, M] held-out NLL of each teacher under each tag, centred per teacher (column)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.6 * len(results), 4.0))
    for ax, (method, r) in zip(np.atleast_1d(axes), results.items()):
        nll = np.asarray(r["tag_teacher_nll"])
        centred = nll - nll.mean(axis=0, keepdims=True)
        lim = max(float(np.abs(centred).max()), 1e-6)
        ax.imshow(centred, cmap="coolwarm", vmin=-lim, vmax=lim, aspect="auto")
        for i in range(nll.shape[0]):
            for j in range(nll.shape[1]):
                ax.text(j, i, f"{nll[i, j]:.3f}", ha="center", va="center", fontsize=7,
                        fontweight="bold" if r["modal_tags"][j] == i else "normal")
        ax.set_title(f"{method}: held-out NLL per tag (colour: centred per teacher, +-{lim:.3f} nats)\n"
                     f"teacher on its tag {r['teacher_on_its_tag']:.2f} (chance {r['chance_teacher']:.2f})",
                     fontsize=8)
        ax.set_xticks(range(len(teachers)), [t.replace("_", "\n") for t in teachers], fontsize=7)
        ax.set_yticks(range(nll.shape[0]), [f"<think{i + 1}>" for i in range(nll.shape[0])], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(out: str | pathlib.Path, *, quick: bool = False, steps: int | None = None, seed: int = 0,
        methods: Sequence[str] = METHODS, progress: bool = False) -> dict[str, Any]:
    """Train each method on `gsm8k_teachers` (a finished run in `<out>/<method>` is reused, a stopped one resumes),
    then measure the held-out agreement; writes `agreement.json`, `agreement.md` and `tag_teacher_nll.png`."""
    from ssft_jax import datasets, train
    from ssft_jax.datasets.gsm8k import TEACHERS

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    for method in methods:
        config = run_config(method, quick=quick, steps=steps, seed=seed)
        workdir = out / method
        t0 = time.perf_counter()
        summary = train.run(config, workdir, progress=progress)
        t_train = time.perf_counter() - t0
        _, held = datasets.build_records(config)
        costs = heldout_costs(workdir, held)
        np.save(workdir / "heldout_costs.npy", costs)
        results[method] = {**agreement(summary["trace_tag_counts"], costs),
                           "tag_teacher_nll": tag_teacher_nll(costs).tolist(),
                           "train_steps": int(summary["final_step"]), "train_questions": summary["questions"],
                           "seconds": {"train": round(t_train, 1),
                                       "heldout_costs": round(time.perf_counter() - t0 - t_train, 1)}}
        logger.info("%s: teacher on its tag %.3f (chance %.3f), all four %.3f (chance %.4f)", method,
                    results[method]["teacher_on_its_tag"], results[method]["chance_teacher"],
                    results[method]["all_teachers"], results[method]["chance_all"])
    (out / "agreement.json").write_text(json.dumps({"teachers": list(TEACHERS), "results": results}, indent=1))
    table = markdown_table(results)
    (out / "agreement.md").write_text(table + "\n")
    plot(results, TEACHERS, out / "tag_teacher_nll.png")
    return {"teachers": list(TEACHERS), "results": results, "table": table}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="demo_out/real/gsm8k_agreement", help="output folder (runs, figures)")
    p.add_argument("--quick", action="store_true", help="the CI-sized run: a tiny from-scratch model, 3 steps")
    p.add_argument("--steps", type=int, default=None, help="training steps per method (default: the config's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    for name in (__name__, "ssft_jax.data", "ssft_jax.datasets.gsm8k"):  # ours; the libraries' INFO stays quiet
        logging.getLogger(name).setLevel(logging.INFO)
    t0 = time.perf_counter()
    res = run(args.out, quick=args.quick, steps=args.steps, seed=args.seed, progress=not args.quiet)
    print(res["table"])
    print(f"wall time {time.perf_counter() - t0:.0f} s; written to {args.out}")
    return 0


def cli() -> None:
    from ssft_jax import cli as cli_lib
    raise SystemExit(cli_lib.run_reporting_errors(main))


if __name__ == "__main__":
    cli()
