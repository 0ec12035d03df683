"""Python's cyclic garbage collector kept off a run's set-up, and off what the set-up built.

A full (generation 2) collection walks every tracked object in the process. While `llmforge
run` imports torch and megatron-core and builds the model, the object count climbs to ~360,000
and the collector runs full collections over it again and again: on the shakespeare-char
recipe six of them in the first four seconds, 0.65 s together, for ~300 objects of garbage
(issue 31, docs/performance.md). So `run` starts with automatic collection off (`quiet`), a
training stage keeps it off while it builds its model, optimizer and loaders, and its loop
freezes what exists when it starts (`gc.freeze`: a permanent generation that collections
skip) and turns collection back on, so that the loop's collections walk only what its steps
allocate. A `prepare` stage runs with collection on (`stage_starting`), over what it allocates
itself: the start-up's objects are frozen first (`loud`). Torchtitan and
Megatron-LM keep the collector off their loops too (`gc_freq`, `--manual-gc`).

Reference counting frees everything as usual meanwhile; only garbage *cycles* made during
set-up wait, until the loop ends and unfreezes them for later collections.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

_state = {"quiet": False}


def quiet() -> None:
    """Automatic collection off until `loud`, or until a training loop starts (`frozen_setup`)."""
    if gc.isenabled():
        gc.disable()
        _state["quiet"] = True


def loud() -> None:
    """Automatic collection on again, if `quiet` turned it off; what exists by then (the imports, the spec) is
    frozen first. Otherwise the first young collection after `enable` walks every object the quiet start-up
    made: on the shakespeare-char recipe a generation-0 and a generation-1 collection over ~265,000 objects
    at the start of `prepare`, 0.23 s together, for ~8,000 freed. `frozen_setup`'s exit (or the process's)
    unfreezes them."""
    if _state["quiet"]:
        _state["quiet"] = False
        gc.freeze()
        gc.enable()


def stage_starting(kind: str) -> None:
    """A stage of type `kind` starts: a training stage sets up quietly, anything else (prepare) collects as usual."""
    if kind == "prepare":
        loud()
    else:
        quiet()


@contextlib.contextmanager
def frozen_setup() -> Iterator[None]:
    """Inside: the objects that existed on entry are out of the collector's way (and collection is on again after a
    quiet start-up); on exit they are back in its reach."""
    gc.freeze()
    loud()
    try:
        yield
    finally:
        gc.unfreeze()
