"""`--help_config`: every config key with its value (the given config file's, overrides applied) and the comment that
documents it in `config.base_config` (read from its source, so the help is the code's own documentation).

    python -m ssft_jax.train --config configs/demo.py --help_config
"""
from __future__ import annotations

import ast
import inspect
import io
import textwrap
import tokenize

import ml_collections

from ssft_jax import config as config_lib


def _comments_by_line(source: str) -> dict[int, tuple[int, str]]:
    """line -> (column, text) of each comment in `source`."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip())
    return out


def _documented_keys(source: str) -> dict[str, str]:
    """dotted key -> comment, for the `c.<section> = ConfigDict(dict(key=value,  # comment ...))` of `source`: the
    comment lines right above a key and the comment after it (with its continuation lines in the same column)."""
    tree, comments = ast.parse(source), _comments_by_line(source)
    lines = source.splitlines()
    docs: dict[str, str] = {}

    def comment_for(node: ast.AST, name: str | None = None, same_line: tuple[str, ...] = ()) -> str:
        line = node.lineno
        above = []
        k = line - 1
        while k >= 1 and lines[k - 1].strip().startswith("#"):
            above.insert(0, comments[k][1])
            k -= 1
        if above and len(same_line) > 1:  # several keys on one line: the comment above is the one it names first
            named = next((n for n in same_line if above[0].startswith((f"{n}:", f"`{n}`"))), same_line[0])
            above = above if name == named else []
        after = []
        if line in comments and not lines[line - 1].strip().startswith("#"):
            col, text = comments[line]
            after.append(text)
            k = line + 1
            while k in comments and comments[k][0] == col and lines[k - 1].strip().startswith("#"):
                after.append(comments[k][1])
                k += 1
        return " ".join(above + after)

    def walk_dict(call: ast.AST, prefix: str) -> None:
        # ConfigDict(dict(...)) or dict(...): keyword arguments are keys; nested dicts are sections
        while isinstance(call, ast.Call) and call.args and not call.keywords:
            call = call.args[0]
        if not isinstance(call, ast.Call):
            return
        for kw in call.keywords:
            if kw.arg is None:
                continue
            key = f"{prefix}.{kw.arg}"
            same_line = tuple(k.arg for k in call.keywords if k.arg and k.lineno == kw.lineno)
            docs[key] = comment_for(kw, kw.arg, same_line)
            if isinstance(kw.value, ast.Call):
                walk_dict(kw.value, key)

    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name.endswith("_defaults"):  # gfpo_defaults -> gfpo.*
            ret = next((n for n in ast.walk(node) if isinstance(n, ast.Return)), None)
            if ret is not None:
                walk_dict(ret.value, node.name[: -len("_defaults")])
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "c":
                if isinstance(node.value, ast.Call):
                    walk_dict(node.value, target.attr)
                docs.setdefault(target.attr, comment_for(node))
    return docs


def _flatten(node: ml_collections.ConfigDict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for key in sorted(node.keys()):
        value, name = node[key], f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            out.extend(_flatten(value, name + "."))
        else:
            out.append((name, value))
    return out


def describe(config: ml_collections.ConfigDict, width: int = 118) -> str:
    """Every key of `config` as `key = value`, its documentation below it (see the module docstring)."""
    docs = _documented_keys(inspect.getsource(config_lib))
    blocks, section = [], None
    for key, value in _flatten(config):
        if "." in key and key.split(".")[0] != section:  # a section's own comment, once, above its keys
            section = key.split(".")[0]
            if docs.get(section):
                blocks.append(f"# [{section}] " + textwrap.fill(docs[section], width - 12,
                                                                subsequent_indent="#     "))
        doc = docs.get(key, "")
        text = f"{key} = {value!r}"
        if doc:
            text += "\n" + textwrap.fill(doc, width, initial_indent="    ", subsequent_indent="    ")
        blocks.append(text)
    return "\n".join(blocks)
