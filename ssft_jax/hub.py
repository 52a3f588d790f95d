"""The HF export's model card and its upload to the Hugging Face Hub.

`write_model_card` puts a README.md in an export folder: base model, method, N / M / L, how to prompt each tag (the
exported chat template's `forking_tag=k`) and the run's figures. `push_to_hub` uploads the folder with
`huggingface_hub` (create the repo if needed, one commit); `--config.export.hub_repo_id` does both at the end of a
run.

    python -m ssft_jax.hub EXPORT_DIR REPO_ID [--public]
"""
from __future__ import annotations

import argparse
import pathlib
from typing import Any, Mapping


class HubError(RuntimeError):
    """An upload that cannot happen (offline mode, no token, a refused repo): one message naming what to change."""


def model_card(*, base_model: str, method: str, num_tags: int, max_traces: int, cost_prefix_len: int,
               tag_mode: str, summary: Mapping[str, Any] | None = None, stage: str = "ssft") -> str:
    """The README.md of an export (YAML front matter + markdown)."""
    summary = dict(summary or {})
    base = base_model or "a model trained from scratch"
    lines = ["---", "library_name: transformers", "tags:", "- ssft", "- forking-tokens", "- ssft-jax"]
    if base_model and "/" in base_model and not base_model.startswith(("/", ".")):
        lines.append(f"base_model: {base_model}")
    lines += ["---", "", f"# {method} model with {num_tags} global forking tags", ""]
    what = {"ssft": "Set Supervised Fine-Tuning (SSFT, arXiv 2510.05132): each training question's traces were "
                    "matched one-to-one to forking tags by least cost (mean NLL of the trace's first "
                    f"L={cost_prefix_len} tokens after each tag), and each trace was trained after its own tag",
            "random": "SFT with a random assignment of traces to forking tags (the paper's baseline)",
            "sft_mixed": "plain SFT on all traces under one shared tag (the paper's SFT-mixed baseline)",
            "fixed": "SFT with trace j always under tag j"}.get(method, f"method {method!r}")
    if stage == "gfpo":
        what = "GFPO (RL on the choice of forking tag) after " + what
    lines += [f"Fine-tuned from {base} with {what}, by ssft-jax "
              f"(N={num_tags} tags, up to M={max_traces} traces per question).", ""]
    lines += [
        "## Prompting each tag",
        "",
        "The chat template takes `forking_tag=k` (k = 1..N) and writes `<think{k}>` after the assistant turn's "
        "opening" + (" as one added token" if tag_mode == "special" else " as text") + ". One generation per "
        "tag gives N different reasoning paths; a majority vote over them is the paper's Cons@N.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'tok = AutoTokenizer.from_pretrained("REPO_OR_FOLDER")',
        'model = AutoModelForCausalLM.from_pretrained("REPO_OR_FOLDER")',
        'messages = [{"role": "user", "content": "What is 17 + 25?"}]',
        f"for k in range(1, {num_tags + 1}):",
        "    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, forking_tag=k, tokenize=False)",
        '    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids',
        "    out = model.generate(ids, max_new_tokens=512, do_sample=False)",
        '    print(f"<think{k}>", tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))',
        "```",
        "",
    ]
    if summary:
        lines += ["## Training run", "", "| | |", "|---|---|"]
        per_step = summary.get("losses") or summary.get("rewards") or {}
        rows = [("steps", summary.get("final_step")), ("questions", summary.get("questions"))]
        if per_step:
            values = list(per_step.values())
            rows.append(("loss" if summary.get("losses") else "mean reward",
                         f"{values[0]:.4f} -> {values[-1]:.4f}"))
        if summary.get("tag_counts") is not None:
            rows.append(("traces matched per tag", " ".join(str(int(n)) for n in summary["tag_counts"])))
        lines += [f"| {k} | {v} |" for k, v in rows if v is not None]
        lines.append("")
    return "\n".join(lines)


def write_model_card(export_dir: str | pathlib.Path, config, summary: Mapping[str, Any] | None = None) -> pathlib.Path:
    """README.md in `export_dir` for a run `config` (its summary's figures, when given)."""
    s = config.ssft
    path = pathlib.Path(export_dir) / "README.md"
    path.write_text(model_card(base_model=config.model.hf_dir, method=s.method, num_tags=s.num_tags,
                               max_traces=s.max_traces, cost_prefix_len=s.cost_prefix_len, tag_mode=s.tag_mode,
                               summary=summary, stage=config.get("stage", "ssft")))
    return path


def push_to_hub(export_dir: str | pathlib.Path, repo_id: str, *, private: bool = True, token: str | None = None,
                endpoint: str | None = None, commit_message: str = "Upload SSFT export") -> str:
    """Upload the folder `export_dir` to the model repo `repo_id` (created if missing, `private` then) in one commit;
    returns the commit's URL. `endpoint` (default: HF_ENDPOINT or huggingface.co) and `token` (default: the logged-in
    one) go to `huggingface_hub.HfApi`."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    folder = pathlib.Path(export_dir)
    if not (folder / "config.json").is_file():
        raise HubError(f"{folder} is not an HF export folder (no config.json)")
    if constants.is_offline_mode():
        raise HubError(f"cannot push {folder} to {repo_id}: HF_HUB_OFFLINE is set; unset it to upload")
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                 commit_message=commit_message)
    except OfflineModeIsEnabled as e:
        raise HubError(f"cannot push to {repo_id}: {e}") from e
    except HfHubHTTPError as e:
        raise HubError(f"the Hub refused the upload to {repo_id}: {str(e).splitlines()[0]} (a token with write "
                       "access: `hf auth login` or HF_TOKEN)") from e
    return str(getattr(info, "commit_url", info))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Upload an HF export folder (with its model card) to the Hugging Face Hub.")
    p.add_argument("export_dir")
    p.add_argument("repo_id", help="owner/name")
    p.add_argument("--public", action="store_true", help="create the repo public (default: private)")
    p.add_argument("--endpoint", default=None, help="the Hub's URL (default: HF_ENDPOINT or huggingface.co)")
    a = p.parse_args(argv)
    print(push_to_hub(a.export_dir, a.repo_id, private=not a.public, endpoint=a.endpoint))
    return 0


def cli() -> None:
    from ssft_jax import cli as cli_lib
    raise SystemExit(cli_lib.run_reporting_errors(main, extra=(HubError,)))


if __name__ == "__main__":
    cli()
