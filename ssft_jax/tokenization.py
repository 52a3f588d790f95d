"""Tokenization for SSFT: chat rendering, prompt/completion masks and global forking tags.

Layout of one training example (ChatML, text-mode tags)::

    prompt_ids      <|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n
    tag_ids         <|im_start|><think3>\\n                      (empty when tag_index is None)
    completion_ids  {trace}<|im_end|>                              (loss_mask = 1 exactly here)
    trailer_ids     \\n                                             (template text after the end token;
                                                                     not in input_ids, kept for checks)

Rules:
  * Masks come from rendering the prompt with ``add_generation_prompt=True`` and checking it is a
    token prefix of the rendered conversation; ``return_assistant_tokens_mask`` is never used (it is
    all-zero on Qwen/Llama templates).
  * Text supplied by users or traces is always encoded as text: a literal ``<|im_end|>`` or
    ``<think3>`` inside it never becomes a control token. Templates are rendered with placeholders in
    place of message contents; only the template's own text is scanned for special tokens, the
    contents go through ``encode_text`` (``split_special_tokens=True``). Special added tokens always
    cut the input in the ``tokenizers`` library, so encoding the text between two control tokens on
    its own gives the same ids as encoding the whole string.
  * Segments are encoded separately (prompt | tag | trace | end token). Where a segment boundary is a
    control token (the usual case) this equals tokenizing the whole string; a trace that starts with
    whitespace can tokenize differently at the tag/trace boundary than the same string would. Training
    and generation both use the segmented ids, so they agree with each other.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from typing import Any, Sequence

THINK_TOKEN_FORMAT = "<think{i}>"
TAG_MODES = ("text", "special")  # ForkingTags.mode: plain text in the chat, or one added special token each
CHATML_TEXT_FORMAT = "<|im_start|><think{i}>\n"
PLAIN_TEXT_FORMAT = "<think{i}>\n"
# Tokens that end an assistant turn in common chat templates (ChatML, Llama 3, Phi, Gemma).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")

# Private-use code points: no template or tokenizer treats them specially, and no real text has them.
_PLACEHOLDER = "\ue000ssft{k}\ue001"
_PLACEHOLDER_RE = re.compile("\ue000ssft(\\d+)\ue001")


class PromptPrefixError(ValueError):
    """The rendered prompt is not a token prefix of the rendered conversation."""


class TemplateError(ValueError):
    """The chat template does something this module cannot account for."""


# --------------------------------------------------------------------------------------------
# Loading and plain encoding
# --------------------------------------------------------------------------------------------


def load_tokenizer(path: str | os.PathLike):
    """Load a fast HF tokenizer from a local folder (never touches the network)."""
    from transformers import AutoTokenizer

    path = pathlib.Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder {path} does not exist")
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if not hasattr(tok, "backend_tokenizer"):
        raise TypeError(f"{path}: need a fast (tokenizers-backed) tokenizer, got {type(tok).__name__}")
    return tok


def encode_text(tokenizer, text: str) -> list[int]:
    """Ids of ``text`` as plain text: no BOS/EOS, and special-token strings are split, not matched."""
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def encode_control(tokenizer, text: str) -> list[int]:
    """Ids of trusted text (template or tag text): special-token strings become control tokens."""
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=False)["input_ids"])


def _special_token_strings(tokenizer) -> list[str]:
    decoder = tokenizer.backend_tokenizer.get_added_tokens_decoder()
    return sorted({t.content for t in decoder.values() if t.special and t.content}, key=len, reverse=True)


def token_id(tokenizer, token: str) -> int | None:
    """Id of one vocabulary entry, or None. (`get_vocab()` builds a fresh dict of the whole vocabulary on every call,
    ~25 ms at 49k entries; the backend's `token_to_id` is a single lookup.)"""
    return tokenizer.backend_tokenizer.token_to_id(token)


def eos_token_ids(tokenizer) -> list[int]:
    """Ids that end an assistant turn: known end-of-turn tokens present in the vocab, then eos."""
    ids: list[int] = []
    for tok in END_OF_TURN_TOKENS:
        tid = token_id(tokenizer, tok)
        if tid is not None and tid not in ids:
            ids.append(tid)
    eos = tokenizer.eos_token_id
    if eos is not None and eos not in ids:
        ids.append(int(eos))
    if not ids:
        raise ValueError("tokenizer has neither an end-of-turn token nor an eos token")
    return ids


# --------------------------------------------------------------------------------------------
# Forking tags
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ForkingTags:
    """The N global forking tags ``<think1>..<thinkN>`` (tag index i is ``<think{i+1}>``).

    mode="text": the tag is plain text ``text_format.format(i=i+1)`` (the paper's released models use
      ``<|im_start|><think3>\\n`` on ChatML); tags differ only in their digit tokens.
    mode="special": ``<think{i}>`` are added special tokens (``add_to_tokenizer``); each tag is one token.
    """

    n: int
    mode: str = "text"
    text_format: str = CHATML_TEXT_FORMAT
    special_format: str = THINK_TOKEN_FORMAT

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"need at least one forking tag, got n={self.n}")
        if self.mode not in TAG_MODES:
            raise ValueError(f"mode must be 'text' or 'special', got {self.mode!r}")
        for fmt in (self.text_format, self.special_format):
            if "{i}" not in fmt:
                raise ValueError(f"tag format {fmt!r} must contain '{{i}}'")

    @classmethod
    def for_tokenizer(cls, tokenizer, n: int, mode: str = "text") -> "ForkingTags":
        """Tags with the text format suited to ``tokenizer``: ChatML-style if it has ``<|im_start|>``."""
        fmt = CHATML_TEXT_FORMAT if token_id(tokenizer, "<|im_start|>") is not None else PLAIN_TEXT_FORMAT
        return cls(n=n, mode=mode, text_format=fmt)

    def _check(self, index: int) -> None:
        if not 0 <= index < self.n:
            raise IndexError(f"tag index {index} out of range for {self.n} tags")

    def token_strings(self) -> list[str]:
        """``['<think1>', ..., '<thinkN>']`` (the added tokens in special mode)."""
        return [self.special_format.format(i=i + 1) for i in range(self.n)]

    def tag_string(self, index: int) -> str:
        """The text inserted at the start of the assistant turn for tag ``index`` (0-based)."""
        self._check(index)
        fmt = self.text_format if self.mode == "text" else self.special_format
        return fmt.format(i=index + 1)

    def add_to_tokenizer(self, tokenizer) -> tuple[list[int], int]:
        """Special mode: add ``<think1..N>`` as special tokens (idempotent).

        Returns (ids of the N tag tokens, ``len(tokenizer)`` afterwards). The model side must grow its
        embedding to at least that size and initialise the new rows (e.g. from the mean embedding);
        a model whose embedding is already padded past ``len(tokenizer)`` may need no growth.
        """
        if self.mode != "special":
            raise ValueError("add_to_tokenizer is only for mode='special'")
        from tokenizers import AddedToken

        new = [
            AddedToken(s, special=True, normalized=False)
            for s in self.token_strings()
            if token_id(tokenizer, s) is None
        ]
        if new:
            tokenizer.add_tokens(new, special_tokens=True)
        ids = [tokenizer.convert_tokens_to_ids(s) for s in self.token_strings()]
        return ids, len(tokenizer)

    def tag_ids(self, tokenizer, index: int) -> list[int]:
        """Token ids of tag ``index``. Lengths may differ across tags in text mode (<think9> vs <think10>)."""
        text = self.tag_string(index)
        if self.mode == "special":
            tid = token_id(tokenizer, text)
            if tid is None:
                raise KeyError(f"{text!r} is not in the tokenizer; call ForkingTags.add_to_tokenizer first")
            return [tid]
        return encode_control(tokenizer, text)

    def all_tag_ids(self, tokenizer) -> list[list[int]]:
        return [self.tag_ids(tokenizer, i) for i in range(self.n)]

    def max_tag_len(self, tokenizer) -> int:
        return max(len(t) for t in self.all_tag_ids(tokenizer))


# --------------------------------------------------------------------------------------------
# Safe chat rendering
# --------------------------------------------------------------------------------------------


def _as_messages(prompt_messages: Sequence[dict] | str) -> list[dict]:
    if isinstance(prompt_messages, str):
        return [{"role": "user", "content": prompt_messages}]
    msgs = [dict(m) for m in prompt_messages]
    for m in msgs:
        if "role" not in m or not isinstance(m.get("content"), str):
            raise TemplateError(f"each message needs a role and a string content, got {m!r}")
    return msgs


def _render_segments(
    tokenizer,
    messages: list[dict],
    *,
    add_generation_prompt: bool,
    trusted_prefix: dict[int, str] | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> tuple[str, list[tuple[str, str]]]:
    """Render ``messages`` with each content replaced by a placeholder.

    Returns (skeleton string, pieces) where pieces is a list of ("template", text) and
    ("content", text) in order; ``trusted_prefix[k]`` is put before message k's placeholder and
    counts as template text (used for tag text, whose control tokens must stay control tokens).
    """
    trusted_prefix = trusted_prefix or {}
    rendered_msgs = []
    for k, m in enumerate(messages):
        if _PLACEHOLDER_RE.search(m["content"]):
            raise TemplateError("message content contains the reserved placeholder characters U+E000/U+E001")
        rendered_msgs.append({**m, "content": trusted_prefix.get(k, "") + _PLACEHOLDER.format(k=k)})
    skeleton = tokenizer.apply_chat_template(
        rendered_msgs, tokenize=False, add_generation_prompt=add_generation_prompt, **(chat_template_kwargs or {})
    )
    found = [int(m.group(1)) for m in _PLACEHOLDER_RE.finditer(skeleton)]
    if sorted(found) != list(range(len(messages))):
        raise TemplateError(
            "the chat template does not emit every message content exactly once "
            f"(placeholders found: {found}, messages: {len(messages)}); cannot render it safely"
        )
    pieces: list[tuple[str, str]] = []
    pos = 0
    for m in _PLACEHOLDER_RE.finditer(skeleton):
        pieces.append(("template", skeleton[pos : m.start()]))
        pieces.append(("content", messages[int(m.group(1))]["content"]))
        pos = m.end()
    pieces.append(("template", skeleton[pos:]))
    return skeleton, pieces


def _encode_pieces(tokenizer, pieces: list[tuple[str, str]]) -> list[int]:
    """Encode rendered pieces: control tokens only from template text, contents always as text."""
    specials = _special_token_strings(tokenizer)
    special_re = re.compile("|".join(re.escape(s) for s in specials)) if specials else None
    ids: list[int] = []
    buf: list[str] = []

    def flush():
        if buf:
            ids.extend(encode_text(tokenizer, "".join(buf)))
            buf.clear()

    for kind, text in pieces:
        if kind == "content" or special_re is None:
            buf.append(text)
            continue
        pos = 0
        for m in special_re.finditer(text):
            buf.append(text[pos : m.start()])
            flush()
            ids.append(token_id(tokenizer, m.group(0)))
            pos = m.end()
        buf.append(text[pos:])
    flush()
    return ids


def render_messages_ids(
    tokenizer,
    messages: Sequence[dict] | str,
    *,
    add_generation_prompt: bool = False,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    """Token ids of a chat-rendered conversation, with message contents encoded as plain text."""
    _, pieces = _render_segments(
        tokenizer, _as_messages(messages), add_generation_prompt=add_generation_prompt,
        chat_template_kwargs=chat_template_kwargs,
    )
    return _encode_pieces(tokenizer, pieces)


# --------------------------------------------------------------------------------------------
# Examples
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RenderedExample:
    """One tokenized example: prompt | tag | completion (see module docstring)."""

    prompt_ids: tuple[int, ...]
    tag_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    trailer_ids: tuple[int, ...] = ()

    @property
    def input_ids(self) -> list[int]:
        """prompt + tag + completion (what the model trains on; a generation prompt when no completion)."""
        return [*self.prompt_ids, *self.tag_ids, *self.completion_ids]

    @property
    def loss_mask(self) -> list[int]:
        """1 exactly on the completion tokens (trace + end-of-turn token), 0 on prompt and tag."""
        return [0] * (len(self.prompt_ids) + len(self.tag_ids)) + [1] * len(self.completion_ids)

    @property
    def generation_prompt_ids(self) -> list[int]:
        """prompt + tag: where sampling of a trace starts."""
        return [*self.prompt_ids, *self.tag_ids]

    @property
    def full_ids(self) -> list[int]:
        """input_ids + the template's text after the end token (equals the full template rendering)."""
        return [*self.input_ids, *self.trailer_ids]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.tag_ids) + len(self.completion_ids)


def render_example(
    tokenizer,
    prompt_messages: Sequence[dict] | str,
    completion: str | None,
    tags: ForkingTags,
    tag_index: int | None,
    add_eos: bool = True,
    *,
    example_id: Any = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> RenderedExample:
    """Tokenize one (prompt, tag, completion) example.

    Args:
      prompt_messages: chat messages without the final assistant turn, or a user string.
      completion: the reasoning trace / answer text (plain text), or None for a generation prompt.
      tags, tag_index: which forking tag starts the assistant turn; None for no tag.
      add_eos: end the completion with the template's end-of-turn token (``<|im_end|>``), which the
        loss covers. Whatever the template puts after it (ChatML: ``\\n``) goes to ``trailer_ids``.
      example_id: named in errors.
    Raises:
      PromptPrefixError if the generation prompt is not a token prefix of the rendered conversation;
      TemplateError if the template does not end the assistant turn with an end-of-turn token.
    """
    messages = _as_messages(prompt_messages)
    if messages and messages[-1]["role"] == "assistant":
        raise TemplateError(f"example {example_id!r}: prompt_messages must not end with an assistant turn")
    tag_text = tags.tag_string(tag_index) if tag_index is not None else ""
    tag_ids = tags.tag_ids(tokenizer, tag_index) if tag_index is not None else []

    _, prompt_pieces = _render_segments(
        tokenizer, messages, add_generation_prompt=True, chat_template_kwargs=chat_template_kwargs
    )
    prompt_ids = _encode_pieces(tokenizer, prompt_pieces)

    full_messages = messages + [{"role": "assistant", "content": completion or ""}]
    _, full_pieces = _render_segments(
        tokenizer, full_messages, add_generation_prompt=False,
        trusted_prefix={len(messages): tag_text}, chat_template_kwargs=chat_template_kwargs,
    )
    full_ids = _encode_pieces(tokenizer, full_pieces)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        at = next(
            (i for i, (a, b) in enumerate(zip(prompt_ids, full_ids)) if a != b), min(len(prompt_ids), len(full_ids))
        )
        raise PromptPrefixError(
            f"example {example_id!r}: the rendered prompt (add_generation_prompt=True, {len(prompt_ids)} tokens) "
            f"is not a token prefix of the rendered conversation ({len(full_ids)} tokens); first difference at "
            f"token {at}: prompt {tokenizer.decode(prompt_ids[at:at + 8])!r} vs conversation "
            f"{tokenizer.decode(full_ids[at:at + 8])!r}"
        )

    completion_ids = encode_text(tokenizer, completion) if completion else []
    trailer: list[int] = []
    if completion is not None and add_eos:
        # The template text after the assistant content, e.g. "<|im_end|>\n" for ChatML.
        tail_ids = _encode_pieces(tokenizer, [("template", full_pieces[-1][1])])
        ends = eos_token_ids(tokenizer)
        if not tail_ids or tail_ids[0] not in ends:
            raise TemplateError(
                f"example {example_id!r}: the chat template does not close the assistant turn with an "
                f"end-of-turn token {ends} (text after the content: {full_pieces[-1][1]!r})"
            )
        completion_ids = completion_ids + tail_ids[:1]
        trailer = tail_ids[1:]
    return RenderedExample(tuple(prompt_ids), tuple(tag_ids), tuple(completion_ids), tuple(trailer))


def full_render_ids(
    tokenizer,
    prompt_messages: Sequence[dict] | str,
    completion: str,
    tags: ForkingTags,
    tag_index: int | None,
    *,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    """Reference ids: the whole conversation rendered by the template as one string, assistant
    content = tag text + completion, tokenized in one go (control tokens matched everywhere; use it
    only for text without control strings). ``render_example(...).full_ids`` should equal this."""
    tag_text = tags.tag_string(tag_index) if tag_index is not None else ""
    msgs = _as_messages(prompt_messages) + [{"role": "assistant", "content": tag_text + completion}]
    text = tokenizer.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=False, **(chat_template_kwargs or {})
    )
    return encode_control(tokenizer, text)


# --------------------------------------------------------------------------------------------
# A character-level chat tokenizer for models trained from scratch (the CPU demo)
# --------------------------------------------------------------------------------------------

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


# transformers 5 loads any folder whose config.json says model_type "qwen2" with its own Qwen2Tokenizer, whatever
# tokenizer_config.json names: it keeps only the vocabulary, merges and added tokens of tokenizer.json and rebuilds
# the rest as below (NFC, this split, byte-level, BPE without unk). A tokenizer meant to be exported beside a qwen2
# model must therefore be exactly this pipeline, or serving tokenizes differently from training.
QWEN2_SPLIT_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501  (Qwen2's pre-tokenizer, verbatim)
CHAR_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what the `tokenizers` ByteLevel pre-tokenizer emits)."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_char_tokenizer(folder: str | os.PathLike, extra_chars: str = ""):
    """A ChatML tokenizer with one token per printable ASCII character (plus ``extra_chars``), saved to ``folder``.

    Built with the `tokenizers` library, so it behaves like any HF fast tokenizer: chat template, special tokens,
    save/load, export next to the weights. A from-scratch model needs no subword vocabulary, and character tokens keep
    the demo's vocabulary (and softmax) tiny: ids 0-3 are ``<|endoftext|> <|im_start|> <|im_end|> <unk>``, then one
    id per character in code-point order.

    It is a byte-level BPE in exactly the pipeline transformers 5 rebuilds for a "qwen2" folder (see
    ``QWEN2_SPLIT_REGEX``), with no merges between ASCII characters, so ``AutoTokenizer`` on an export reproduces
    these ids, whitespace included. A non-ASCII ``extra_chars`` character is one token through merges of its UTF-8
    bytes (its bytes and partial merges get ids after the characters). A character outside the vocabulary encodes
    as ``<unk>`` (one per UTF-8 byte) here, and is dropped by transformers 5's rebuilt tokenizer (no unk there).
    """
    import string
    import unicodedata

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    b2u = _bytes_to_unicode()
    chars = sorted(set(string.printable) | set(unicodedata.normalize("NFC", extra_chars)))
    vocab = {t: i for i, t in enumerate(CHAR_SPECIAL_TOKENS)}
    for c in chars:
        vocab.setdefault("".join(b2u[b] for b in c.encode()), len(vocab))
    merges = []
    for c in chars:  # after every character has its id, so ASCII ids do not depend on extra_chars
        pieces = [b2u[b] for b in c.encode()]
        acc = pieces[0]
        vocab.setdefault(acc, len(vocab))
        for piece in pieces[1:]:
            vocab.setdefault(piece, len(vocab))
            merges.append((acc, piece))
            acc += piece
            vocab.setdefault(acc, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>", additional_special_tokens=["<|im_start|>"],
                                   chat_template=CHATML_TEMPLATE)
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    return load_tokenizer(folder)


# --------------------------------------------------------------------------------------------
# Saving a tokenizer that transformers 5.x and 4.x load alike, with a chat template that takes a forking tag
# --------------------------------------------------------------------------------------------

FORKING_TAG_VARIABLE = "forking_tag"
# A class name both transformers lines resolve to the tokenizer.json-backed fast tokenizer (5.x writes
# "TokenizersBackend", which 4.x does not have).
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
_CLAUSE_BEGIN = "{#- ssft-jax forking_tag: begin #}"
_CLAUSE_END = "{#- ssft-jax forking_tag: end #}"
_CLAUSE_RE = re.compile(re.escape(_CLAUSE_BEGIN) + ".*?" + re.escape(_CLAUSE_END), re.S)
# tokenizer_config.json keys transformers 5 writes that describe the loading call, not the tokenizer.
_LOAD_TIME_KEYS = ("is_local", "local_files_only", "_commit_hash", "name_or_path")


class TokenizerExportError(ValueError):
    """A saved tokenizer does not load back to the same ids (or chat rendering) as the tokenizer it was saved from."""


def _jinja_str(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r") + "'"


def chat_template_with_forking_tag(template: str, tags: ForkingTags) -> str:
    """``template`` plus a clause that, with ``add_generation_prompt=True``, opens the assistant turn with a tag.

    ``apply_chat_template(messages, add_generation_prompt=True, forking_tag=3)`` then ends with tag 3's text
    (``<|im_start|><think3>\\n`` in text mode, ``<think3>`` in special mode): the number is the one in the tag's name,
    1..N (tag index + 1); a string is inserted as it is. Without ``forking_tag`` the template renders as before. The
    clause is appended at the end, i.e. right after the generation prompt, where ``render_example`` puts the tag; a
    clause from an earlier export is replaced, not repeated.
    """
    fmt = tags.text_format if tags.mode == "text" else tags.special_format
    head, tail = fmt.split("{i}", 1)
    clause = (
        f"{_CLAUSE_BEGIN}"
        f"{{%- if add_generation_prompt and {FORKING_TAG_VARIABLE} is defined"
        f" and {FORKING_TAG_VARIABLE} is not none %}}"
        f"{{%- if {FORKING_TAG_VARIABLE} is string %}}{{{{- {FORKING_TAG_VARIABLE} }}}}"
        f"{{%- elif {FORKING_TAG_VARIABLE} < 1 or {FORKING_TAG_VARIABLE} > {tags.n} %}}"
        f"{{{{- raise_exception('forking_tag must be 1..{tags.n} (the number in <think1>..<think{tags.n}>)') }}}}"
        f"{{%- else %}}{{{{- {_jinja_str(head)} ~ {FORKING_TAG_VARIABLE} ~ {_jinja_str(tail)} }}}}"
        f"{{%- endif %}}{{%- endif %}}"
        f"{_CLAUSE_END}"
    )
    return _CLAUSE_RE.sub("", template) + clause


def _probe_texts(tokenizer, tags: ForkingTags | None) -> list[str]:
    """Texts whose ids must survive saving: whitespace runs, digits and operators, chat markers, the tags (as control
    text and typed inside user text). ASCII only: see ``build_char_tokenizer`` on characters outside a vocabulary."""
    texts = [
        "The answer is 19.\n",
        "  two  spaces,\ttabs\t and\n\nnewlines \n",
        "ones: 7+1=8. tens: 80=80. 8+80=88. 12-3*4/2 (x) [y] {z} <a> |b| ~c ^d",
        "Let me think step by step. So the answer is 42.",
    ]
    if token_id(tokenizer, "<|im_start|>") is not None:
        texts.append("<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n")
    if tags is not None:
        for i in range(tags.n):
            texts.append(tags.tag_string(i) + "First, add the numbers.")
        texts.append(f"I typed {tags.special_format.format(i=1)} by hand")
    return texts


def verify_saved_tokenizer(tokenizer, folder: str | os.PathLike, tags: ForkingTags | None = None) -> None:
    """Load ``folder`` the way a server would (``AutoTokenizer``, beside whatever config.json the folder holds) and
    check that it gives ``tokenizer``'s ids, size, end-of-turn ids and tagged generation prompts. Raises
    TokenizerExportError naming the first difference."""
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    where = f"{folder} (loaded as {type(loaded).__name__})"
    if len(loaded) != len(tokenizer):
        raise TokenizerExportError(f"{where}: {len(loaded)} tokens, the tokenizer saved had {len(tokenizer)}")
    for text in _probe_texts(tokenizer, tags):
        for encode in (encode_control, encode_text):  # control strings matched, and split as user text
            want, got = encode(tokenizer, text), encode(loaded, text)
            if want != got:
                raise TokenizerExportError(f"{where}: {text!r} ({encode.__name__}) encodes to {got}, the tokenizer "
                                           f"saved gives {want}")
    if eos_token_ids(loaded) != eos_token_ids(tokenizer):
        raise TokenizerExportError(f"{where}: end-of-turn ids {eos_token_ids(loaded)} != {eos_token_ids(tokenizer)}")
    if tags is not None and loaded.chat_template:
        msgs = [{"role": "user", "content": "What is 2+2?"}]
        for i in range(tags.n):
            text = loaded.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                              **{FORKING_TAG_VARIABLE: i + 1})
            want = render_example(tokenizer, msgs, None, tags, i).generation_prompt_ids
            if encode_control(loaded, text) != want:
                raise TokenizerExportError(f"{where}: the chat template with {FORKING_TAG_VARIABLE}={i + 1} renders "
                                           f"{text!r}, not the training prompt {tokenizer.decode(want)!r}")


def save_tokenizer(tokenizer, folder: str | os.PathLike, *, tags: ForkingTags | None = None,
                   verify: bool = True) -> pathlib.Path:
    """Write ``tokenizer`` to ``folder`` so that transformers 5.x and 4.x (4.57 tested) load the same tokenizer.

    On top of ``save_pretrained``: ``tokenizer_class`` becomes ``PreTrainedTokenizerFast`` (5.x writes
    ``TokenizersBackend``, unknown to 4.x); every special added token is listed in ``additional_special_tokens``
    (4.x reads a dict, not 5.x's list, under ``extra_special_tokens``) and in ``added_tokens_decoder``; the chat
    template goes to ``chat_template.jinja`` and ``tokenizer_config.json`` and, with ``tags``, takes a
    ``forking_tag`` (``chat_template_with_forking_tag``). ``verify`` loads the folder back (``verify_saved_tokenizer``);
    write config.json first, since it decides which class transformers 5 loads.
    """
    import json

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    path = folder / "tokenizer_config.json"
    tc = json.loads(path.read_text())
    for key in _LOAD_TIME_KEYS:
        tc.pop(key, None)
    tc["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    decoder = tokenizer.backend_tokenizer.get_added_tokens_decoder()
    named = {str(v) for k, v in tokenizer.special_tokens_map.items() if k != "additional_special_tokens"
             and isinstance(v, str)}
    extra = tc.pop("extra_special_tokens", None)
    if isinstance(extra, dict):  # named model-specific tokens: the same meaning in both lines
        tc["extra_special_tokens"] = extra
        named |= {str(v) for v in extra.values()}
    listed = [str(t) for t in extra] if isinstance(extra, list) else []
    listed += [t.content for _, t in sorted(decoder.items()) if t.special and t.content not in named]
    tc["additional_special_tokens"] = list(dict.fromkeys(t for t in listed if t not in named))
    tc["added_tokens_decoder"] = {
        str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                 "single_word": t.single_word, "special": t.special}
        for i, t in sorted(decoder.items())
    }
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if template is not None:
        if tags is not None:
            template = chat_template_with_forking_tag(template, tags)
        (folder / "chat_template.jinja").write_text(template)
        tc["chat_template"] = template  # readers older than chat_template.jinja look here
    path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
    if verify:
        verify_saved_tokenizer(tokenizer, folder, tags)
    return folder
