"""The tokenized question: what validation produces (`records`) and the layout consumes (`layout`, `pipeline`).

Its own module so that neither of those imports the other for it."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class TokenizedQuestion:
    """One question ready for layout: the Grain source element."""

    index: int  # position in the tokenized list (the batch's question_index)
    id: str
    where: str
    prompt_ids: np.ndarray  # [p] int32, the rendered prompt (generation prompt, no tag)
    # 1..M arrays (more with data.extra_traces="sample": the pipeline picks M per epoch), each [len] int32: trace +
    # end-of-turn, at most T
    trace_ids: tuple[np.ndarray, ...]
    truncated: tuple[bool, ...]  # per trace: cut to T (end-of-turn token lost)
    answer: Any = None
