"""Chat templates: how a list of messages becomes one token sequence, and which of its tokens carry loss.

A template is one string with `{role}` and `{content}` in it, applied to every message in turn, e.g. the default
`<|{role}|>{content}<|end|>` (fmjax's sentencepiece tokenizers reserve these markers as single ids). The text
before `{content}` (the turn header) never carries loss; an assistant message's content and the text after it (the
end marker, which teaches the model to stop) do. The sequence is BOS, the rendered messages, EOS; EOS carries loss
when the conversation ends with an assistant turn. `data.chat_template` names a preset or gives a template string.
A message's `content` is a string or, OpenAI style, a list of text parts (`content_text`).
"""

from __future__ import annotations

from typing import Any

from fmjax.errors import UserError

PRESETS = {
    "fmjax": "<|{role}|>{content}<|end|>",  # reserved single-id markers of fmjax tokenizers
    "chatml": "<|im_start|>{role}\n{content}<|im_end|>\n",  # Qwen / OpenAI ChatML
    "llama3": "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",  # Llama 3 instruct
    "plain": "{role}: {content}\n",  # no special tokens at all
}
ROLES = ("system", "user", "assistant")
TEXT_PARTS = ("text", "input_text", "output_text")  # OpenAI chat / Responses API part types that hold text


def content_text(content: Any, where: str) -> str:
  """A message's `content` as one string: a string as is, or a list of text parts (`{"type": "text", "text": ...}`
  or bare strings) joined with nothing between them, as Hugging Face chat templates render them. `where` names the
  message (`data.jsonl:3: message 1`) in the error for null content, a non-text part or any other value."""
  if isinstance(content, str):
    return content
  if content is None:
    raise UserError(f"{where} has content null; give it text (a string, or a list of {{'type': 'text', 'text': "
                    "...} parts), or remove that message or the record.")
  if not isinstance(content, list):
    raise UserError(f"{where} has content of type {type(content).__name__}; give it a string, or a list of "
                    "{'type': 'text', 'text': ...} parts.")
  texts = []
  for k, part in enumerate(content):
    if isinstance(part, str):
      texts.append(part)
      continue
    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
    text = part.get("text") if isinstance(part, dict) else None
    if kind not in TEXT_PARTS or not isinstance(text, str):
      raise UserError(f"{where}, content part {k} is of type {kind!r}, not text; a language model trains on text "
                      "parts only ({'type': 'text', 'text': ...}): remove the other parts, or the record.")
    texts.append(text)
  return "".join(texts)


class ChatTemplate:
  """A parsed template: `pieces(role, content, trained)` → [(text, loss weight)], `prompt(messages)` for generation."""

  def __init__(self, spec: str = "fmjax"):
    template = PRESETS.get(spec, spec)
    if template.count("{content}") != 1 or "{role}" not in template.split("{content}")[0]:
      raise UserError(f"data.chat_template={spec!r} is neither a preset {sorted(PRESETS)} nor a template with "
                      "'{role}' before one '{content}', e.g. '<|{role}|>{content}<|end|>'.")
    self.spec = spec
    self.header, self.footer = template.split("{content}")

  def pieces(self, role: str, content: str, trained: bool) -> list[tuple[str, int]]:
    """One message as (text, weight) pieces: header (0), content and footer (1 when `trained`)."""
    w = int(trained)
    return [(self.header.replace("{role}", role), 0), (content, w), (self.footer.replace("{role}", role), w)]

  def prompt(self, messages: list[dict]) -> str:
    """The text a model continues to answer `messages`: every message rendered, then the assistant's header."""
    return "".join(t for n, m in enumerate(messages)
                   for t, _ in self.pieces(m["role"], content_text(m["content"], f"message {n}"), False)) + \
        self.header.replace("{role}", "assistant")
