"""`chat_template: tokenizer`: a tokenizer's own Jinja chat template, rendered as transformers'
`apply_chat_template` renders it, and the loss mask of what it renders.

transformers is not needed: the template is compiled here with the same sandboxed jinja2
environment (trim_blocks, lstrip_blocks, loop controls, `{% generation %}`), the same globals
(`raise_exception`, `strftime_now`, a restricted `dict` and `namespace`), its `tojson` filter and
the tokenizer's special tokens as variables (`bos_token`, `eos_token`, ...), and the text is
encoded whole without added special tokens, as transformers does with `tokenize=True`.

What trains: every assistant turn's content and the end-of-turn token that closes it. Where the
template has `{% generation %}` blocks they say it; otherwise each assistant message's content is
found in the rendered text by rendering the conversation a second time with markers in place of
the assistant contents: the text between markers must match the real rendering exactly, so a
user turn that quotes the answer cannot be mistaken for it, and a template that edits or moves
the content is refused, never guessed at.
"""

from __future__ import annotations

import functools
import json
import re
from contextvars import ContextVar
from datetime import datetime
from typing import Any

from llmforge.spec.errors import UserError

# The named special tokens transformers passes to every template (`special_tokens_map`).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Private-use characters around each assistant content's index in the marker rendering.
_OPEN, _CLOSE = "\ue000", "\ue001"
_MARKER = re.compile(f"{_OPEN}(\\d+){_CLOSE}")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# (rendered blocks so far, generation spans found) while a render tracks `{% generation %}` blocks.
_TRACKING: ContextVar[tuple[list[str], list[tuple[int, int]]] | None] = ContextVar("llmforge_generation", default=None)
FIX = ("use a template with {% generation %} ... {% endgeneration %} around each assistant turn's content and end-of-turn token "
       "(put it in the tokenizer's chat_template.jinja), or a chat_template of llmforge's own (default, plain, or '{prompt}/{response}')")


def template_source(tokenizer) -> str | None:
    """The tokenizer's chat template: `chat_template.jinja`, else tokenizer_config.json's `chat_template`
    (a string, or a list of {name, template} of which transformers uses "default"); None without one."""
    files = getattr(tokenizer, "files", None) or {}
    if "chat_template.jinja" in files:  # transformers 5 writes it, and lets it win over the config
        return files["chat_template.jinja"]
    template = tokenizer.file_json("tokenizer_config.json").get("chat_template") if files else None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise UserError(f"the tokenizer's tokenizer_config.json lists chat templates {sorted(map(str, named))} but none named 'default'",
                            "name the one to train with 'default' (transformers uses that one too)")
        template = named["default"]
    return template if isinstance(template, str) and template.strip() else None


def template_variables(tokenizer) -> dict[str, str]:
    """The special tokens a template sees, read as transformers 5 reads them: tokenizer_config.json, where
    special_tokens_map.json overrides it only for a config without `added_tokens_decoder` (its legacy path)."""
    config = tokenizer.file_json("tokenizer_config.json")
    found = {name: config.get(name) for name in SPECIAL_TOKEN_NAMES}
    if "added_tokens_decoder" not in config:
        found.update({k: v for k, v in tokenizer.file_json("special_tokens_map.json").items() if k in SPECIAL_TOKEN_NAMES})
    out = {}
    for name, value in found.items():
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            out[name] = value
    return out


@functools.lru_cache(maxsize=16)
def compile_template(source: str):
    """The template compiled in transformers' environment (a sandbox: templates from the Hub are untrusted code)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}`: renders its body, and records where it lies while tracking."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            text = caller()
            tracking = _TRACKING.get()
            if tracking is not None:  # everything before this block has been rendered into `blocks` already
                blocks, spans = tracking
                start = sum(map(len, blocks))
                spans.append((start, start + len(text)))
            return text

    class Namespace(jinja2.utils.Namespace):
        # As transformers: no underscore attributes, so a template cannot reach CPython internals.
        def __init__(*args, **kwargs):
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot store underscore attributes on a namespace ({name!r})")

    class Dict:
        # `dict(...)` and `dict.fromkeys(...)` only: no attribute access to the real type.
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers' does not.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt), dict=Dict(),
                       namespace=Namespace)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"the tokenizer's chat template is not valid Jinja (line {e.lineno}): {e.message}", FIX) from None


def render(source: str, messages: list[dict[str, Any]], variables: dict[str, str], *, add_generation_prompt: bool = False,
           track: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """(text, character spans of its `{% generation %}` blocks when `track`) as apply_chat_template renders it."""
    import jinja2

    template = compile_template(source)
    # transformers passes tools and documents (None without any) and the special tokens as variables.
    context = {**variables, "messages": messages, "tools": None, "documents": None, "add_generation_prompt": add_generation_prompt}
    blocks: list[str] = []
    spans: list[tuple[int, int]] = []
    try:
        if not track:
            return template.render(**context), spans
        token = _TRACKING.set((blocks, spans))
        try:
            for block in template.generate(**context):
                blocks.append(block)
        finally:
            _TRACKING.reset(token)
    except jinja2.TemplateError as e:
        roles = ", ".join(m["role"] for m in messages)
        raise UserError(f"the tokenizer's chat template refused a conversation ({roles}): {e}",
                        "fix the records to suit the template (most accept system?, then user/assistant turns in turn), "
                        "or use another chat_template") from None
    return "".join(blocks), spans


def locate_contents(source: str, messages: list[dict[str, Any]], variables: dict[str, str], text: str) -> list[tuple[int, int]]:
    """Character spans of each assistant message's content in `text` (the template's rendering of `messages`), in order.

    The conversation is rendered again with a marker in place of each assistant content; `text`
    must be that rendering with the markers replaced by the contents (or the contents trimmed, as
    Llama's `| trim` and Mistral's do). Anything else means the template edits, moves or repeats
    the content, and no span is trusted.
    """
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    marked = list(messages)
    for n, i in enumerate(assistants):
        marked[i] = {**messages[i], "content": f"{_OPEN}{n}{_CLOSE}"}
    pieces = _MARKER.split(render(source, marked, variables)[0])
    literals, order = pieces[0::2], [int(k) for k in pieces[1::2]]
    if order != list(range(len(assistants))):
        rendered = sorted(set(order))
        missing = [n + 1 for n in range(len(assistants)) if n not in rendered]
        why = (f"it does not render assistant turn(s) {missing}" if missing
               else "it renders assistant contents more than once or out of order")
        raise UserError(f"cannot find where the assistant turns lie in the tokenizer's chat template's rendering: {why}", FIX)
    spans, pos = [], 0
    for n, i in enumerate(assistants):
        if not text.startswith(literals[n], pos):
            raise _moved(text, pos, literals[n])
        pos += len(literals[n])
        content, after = messages[i]["content"], literals[n + 1]
        last = n + 1 == len(assistants)
        for rendered in dict.fromkeys((content, content.strip(), content.rstrip(), content.lstrip())):
            end = pos + len(rendered)
            if text.startswith(rendered, pos) and (text[end:] == after if last else text.startswith(after, end)):
                spans.append((pos, end))
                pos = end
                break
        else:
            raise UserError(f"the tokenizer's chat template changes assistant turn {n + 1}'s content as it renders it "
                            f"(it renders {text[pos:pos + 60]!r} where the content {content[:40]!r} should be), so what to "
                            "train on cannot be found", FIX)
    return spans


def _moved(text: str, pos: int, expected: str) -> UserError:
    return UserError(f"the tokenizer's chat template renders this conversation differently once the assistant contents are replaced "
                     f"(expected {expected[:60]!r}, found {text[pos:pos + 60]!r}): it depends on what the assistant says, so what "
                     "to train on cannot be found", FIX)


class TokenizerTemplate:
    """A tokenizer's own chat template: records → (ids, loss mask), and prompts → ids to continue.

    Args:
        tokenizer: an `HFTokenizer` whose HF files hold a chat template.
        train_on_turns: "all" (every assistant turn trains) or "last" (only the last one).
    """

    def __init__(self, tokenizer, *, train_on_turns: str = "all") -> None:
        self.tokenizer, self.train_on_turns = tokenizer, train_on_turns
        source = template_source(tokenizer)
        if source is None:
            raise UserError("chat_template 'tokenizer' needs a chat template in the tokenizer's files "
                            "(tokenizer_config.json's chat_template, or chat_template.jinja), and this tokenizer has none",
                            "use a tokenizer that has one (tokenizer: {name: pretrained, path: <HF tokenizer folder>}), "
                            "or a chat_template of llmforge's own (default, plain, or a '{prompt}/{response}' string)")
        self.source, self.variables = source, template_variables(tokenizer)
        self.generation_blocks = bool(_GENERATION_TAG.search(source))
        compile_template(source)  # a syntax error shows now, not at the first record

    def conversation(self, record: dict[str, Any]) -> list[dict[str, Any]]:
        """A record as chat messages: `messages` as they are; a prompt/response record as [system,] user, assistant."""
        if "messages" in record:
            return [dict(m) for m in record["messages"]]
        turns = [{"role": "system", "content": record["system"]}] if record.get("system") is not None else []
        return [*turns, {"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]

    def encode(self, record: dict[str, Any]) -> tuple[list[int], list[int]]:
        """(ids as apply_chat_template(tokenize=True) gives them, loss mask: assistant contents and their end-of-turn tokens)."""
        messages = self.conversation(record)
        text, spans = render(self.source, messages, self.variables, track=self.generation_blocks)
        ids, offsets = self.tokenizer.encode_with_offsets(text)
        if self.generation_blocks:
            if not spans:
                raise UserError("the tokenizer's chat template has {% generation %} blocks, but none rendered for this conversation "
                                f"({', '.join(m['role'] for m in messages)}), so nothing would train", FIX)
            runs = [r for r in (_token_run(offsets, span) for span in spans) if r is not None]
        else:
            spans = locate_contents(self.source, messages, self.variables, text)
            runs = [self._closed(ids, offsets, span, n, text) for n, span in enumerate(spans)]
        if self.train_on_turns == "last":
            runs = runs[-1:]
        mask = [0] * len(ids)
        for first, last in runs:
            mask[first:last + 1] = [1] * (last + 1 - first)
        return ids, mask

    def _closed(self, ids: list[int], offsets: list[tuple[int, int]], span: tuple[int, int], n: int, text: str) -> tuple[int, int]:
        """The tokens of an assistant content and the end-of-turn token right after it: the first token past the
        content, which must be one of the tokenizer's special (added) tokens (`<|eot_id|>`, `<|im_end|>`, `</s>`)."""
        run = _token_run(offsets, span)
        after = (run[1] + 1) if run is not None else next((j for j, (s, _) in enumerate(offsets) if s >= span[0]), len(ids))
        if after >= len(ids) or ids[after] not in self.tokenizer.added_ids():
            found = text[span[1]:span[1] + 30] or "the end of the text"
            raise UserError(f"the tokenizer's chat template closes assistant turn {n + 1} with {found!r}, not with a special "
                            "end-of-turn token, so the model would never learn to stop", FIX)
        return (run[0] if run is not None else after), after

    def prompt_ids(self, prompt: str, system: str | None = None) -> list[int]:
        """A user turn as the template renders it with add_generation_prompt=True: what generation continues."""
        turns = [{"role": "system", "content": system}] if system is not None else []
        text, _ = render(self.source, [*turns, {"role": "user", "content": prompt}], self.variables, add_generation_prompt=True)
        return self.tokenizer.encode_with_offsets(text)[0]


def _token_run(offsets: list[tuple[int, int]], span: tuple[int, int]) -> tuple[int, int] | None:
    """(first, last) index of the tokens that overlap a character span, as one run; None for an empty span.

    One run from the first overlapping token to the last, so a whitespace token whose offsets a
    post-processor trimmed to nothing still trains inside a content.
    """
    start, end = span
    inside = [j for j, (s, e) in enumerate(offsets) if s < end and e > start]
    return (inside[0], inside[-1]) if inside else None


PROBE = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"},
         {"role": "user", "content": "And 3 + 3?"}, {"role": "assistant", "content": "6"}]


def probe(tokenizer) -> None:
    """Refuse a tokenizer without a template, or a template whose assistant turns cannot be found, before any run:
    what `validate` checks, with a two-turn conversation every chat template accepts."""
    _, mask = TokenizerTemplate(tokenizer).encode({"messages": PROBE})
    if not any(mask):
        raise UserError("the tokenizer's chat template marks nothing to train in a two-turn conversation", FIX)
