"""Record formats (TRL's dataset conventions) → tokenized examples, already shifted for next-token prediction.

Formats, chosen per source by `format` (`auto` picks by the first record's keys):
  text               {FIELD: str}                                  loss on every token (and EOS)
  prompt_completion  {"prompt": str|messages, "completion": str|messages}  loss on the completion and EOS
  chat               {"messages": [{"role", "content"}, ...]}      loss on assistant turns (with their end marker)
  preference         {"prompt"?, "chosen", "rejected"}  (strings or messages)  two sequences, loss on each response
  unpaired           {"prompt", "completion", "label": bool}       one response, desirable or not (Kahneman-Tversky style)
  classification     {FIELD or "prompt": str, "label": int}        one sequence and its class in [0, model.num_labels)
A sequence is BOS + pieces + EOS with a 0/1 weight per token (1 = the model must predict it). The example holds
`tokens` = seq[:-1], `targets` = seq[1:], `loss_mask` = weight[1:] — so packing can never pair a token with another
document's target. Preference examples hold those three keys twice, prefixed `chosen_` and `rejected_`.

Messages go through a chat template (fmjax/data/chat.py; default: fmjax's reserved single-id markers):
  BOS <|system|>…<|end|> <|user|>…<|end|> <|assistant|>…<|end|> … EOS
the assistant's content and its `<|end|>` carry loss, and EOS does when the conversation ends with the assistant.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fmjax.data.chat import ROLES, ChatTemplate, content_text
from fmjax.data.sources import WHERE, DataError
from fmjax.errors import UserError

FORMATS = ("auto", "text", "prompt_completion", "chat", "preference", "unpaired", "classification")
OVERLONG = ("error", "truncate", "drop")


def detect(record: dict, field: str) -> str:
  """The format a record's keys imply."""
  if "messages" in record:
    return "chat"
  if "chosen" in record and "rejected" in record:
    return "preference"
  if "completion" in record and "label" in record:
    return "unpaired"
  if "label" in record and (field in record or "prompt" in record):
    return "classification"
  if "prompt" in record and "completion" in record:
    return "prompt_completion"
  if field in record:
    return "text"
  keys = sorted(k for k in record if k != WHERE)
  text_key = next((k for k in keys if isinstance(record[k], str)), "KEY")
  raise DataError(f"{record.get(WHERE, 'record')}: cannot tell the format from its fields {keys}: it has no text "
                  f"field {field!r} (data.field), nor prompt/completion, messages, prompt/chosen/rejected or "
                  f"prompt/completion/label. If {text_key!r} holds the text, set --config.data.field={text_key}; "
                  "else set data.format to the records' format, or fix the data.")


REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")  # precomputed reference log-probs (TRL's column names)
PER_EXAMPLE = ("ref_logps", "label")  # per-example scalars, carried as per-token columns (see `features`)


def sequence_keys(fmt: str) -> tuple[str, ...]:
  """Prefixes of the packed sequences a format yields."""
  return ("chosen_", "rejected_") if fmt.startswith("preference") else ("",)


def features(fmt: str) -> tuple[str, ...]:
  """Per-token arrays of each packed sequence: `preference+ref` (preference records with REF_KEYS) adds
  `ref_logps`, the pair's reference log-prob at the sequence's first position and 0 elsewhere; `unpaired` adds
  `label`, +1 (desirable) or −1 (undesirable) at the first position; `classification` adds `label`, the class id
  at the first position."""
  extra = ("ref_logps",) if fmt.endswith("+ref") else ("label",) if fmt in ("unpaired", "classification") else ()
  return ("tokens", "targets", "loss_mask") + extra


class Encoder:
  """Turns a record of one format into an example dict (picklable, so it runs in grain worker processes)."""

  def __init__(self, fmt: str, tokenizer: Any, field: str = "text", max_len: int = 0, overlong: str = "error",
               chat_template: str = "fmjax", num_labels: int = 0):
    self.chat = ChatTemplate(chat_template)
    if fmt not in FORMATS[1:]:
      raise UserError(f"data.format={fmt!r} is unknown; use one of {FORMATS}.")
    if overlong not in OVERLONG:
      raise UserError(f"data.overlong={overlong!r} is unknown; use one of {OVERLONG}.")
    self.fmt, self.tokenizer, self.field, self.max_len, self.overlong = fmt, tokenizer, field, max_len, overlong
    self.num_labels = num_labels

  def __call__(self, record: dict) -> dict[str, np.ndarray] | None:
    where = record.get(WHERE, "record")
    if self.fmt == "text":
      text = self._get(record, self.field, where)
      if not isinstance(text, str):
        raise DataError(f"{where}: field {self.field!r} is {type(text).__name__}, not text.")
      return _example(*self._sequence([(text, 1)]))  # text is split across rows, never too long
    if self.fmt == "preference":
      prompt = self._turns(record.get("prompt", ""), 0, where)
      example = {}
      for side in ("chosen", "rejected"):
        response = self._get(record, side, where)
        turns = self._turns(response, 1, where)
        if not _text(response).strip():  # TRL refuses it too: a side with no response tokens trains nothing
          raise DataError(f"{where}: field {side!r} is empty; a preference pair needs a non-empty 'chosen' and "
                          f"'rejected' response: fill in its {side!r} or remove the record.")
        seq = self._sequence(prompt + turns)
        example.update({f"{side}_{k}": v for k, v in _example(*seq).items()})
        if f"ref_{side}_logps" in record:
          value = record[f"ref_{side}_logps"]
          if not isinstance(value, (int, float)):
            raise DataError(f"{where}: ref_{side}_logps must be a number, got {type(value).__name__}.")
          example[f"{side}_ref_logps"] = _at_start(len(example[f"{side}_tokens"]), value)
    elif self.fmt == "classification":
      text = self._get(record, self.field if self.field in record else "prompt", where)
      example = _example(*self._sequence(self._turns(text, 1, where)))
      example["label"] = _at_start(len(example["tokens"]), self._label(record, where))
    elif self.fmt == "chat":
      example = _example(*self._sequence(self._turns(self._get(record, "messages", where), None, where)))
    else:
      example = _example(*self._sequence(self._turns(self._get(record, "prompt", where), 0, where)
                                         + self._turns(self._get(record, "completion", where), 1, where)))
      if self.fmt == "unpaired":
        label = self._get(record, "label", where)
        if not isinstance(label, bool):
          raise DataError(f"{where}: label must be true (desirable) or false (undesirable), got {label!r}.")
        example["label"] = _at_start(len(example["tokens"]), 1.0 if label else -1.0)
    return fit(example, self.max_len, self.overlong, where)

  def prompt_ids(self, record: dict) -> np.ndarray:
    """The ids a policy continues for an RL rollout: BOS and the record's `prompt` (a string, or messages followed
    by the assistant's turn header), tokenized piece by piece as training pairs are, so that a prompt and its
    sampled completion read as the reward model's training sequences do."""
    where = record.get(WHERE, "record")
    prompt = self._get(record, "prompt", where)
    pieces = self._turns(prompt, 0, where)
    if isinstance(prompt, list):
      pieces.append((self.chat.header.replace("{role}", "assistant"), 0))
    ids = [np.asarray([self.tokenizer.bos_id], np.int32)] + [np.asarray(self.tokenizer.encode(t), np.int32)
                                                             for t, _ in pieces]
    return np.concatenate(ids)

  def _label(self, record: dict, where: str) -> int:
    label = self._get(record, "label", where)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < max(self.num_labels, 1):
      raise DataError(f"{where}: label={label!r} must be a class id, an integer in [0, {self.num_labels}) "
                      f"(model.num_labels={self.num_labels}); map label names to ids in the data, or raise "
                      "model.num_labels.")
    return label

  def _get(self, record: dict, key: str, where: str) -> Any:
    if key not in record:
      raise DataError(f"{where}: missing field {key!r} for data.format={self.fmt!r} (fields: "
                      f"{sorted(k for k in record if k != WHERE)}); fix the data, or set data.format / data.field.")
    return record[key]

  def _turns(self, value: Any, weight: int | None, where: str) -> list[tuple[str, int]]:
    """(text, weight) pieces for a string or a list of messages; weight None = by role (assistant = 1)."""
    if isinstance(value, str):
      return [(value, 1 if weight is None else weight)] if value else []
    if not isinstance(value, list):
      raise DataError(f"{where}: expected a string or a list of messages, got {type(value).__name__}.")
    pieces = []
    for n, message in enumerate(value):
      if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise DataError(f"{where}: message {n} must be an object with 'role' and 'content'.")
      role = message["role"]
      if role not in ROLES:
        raise DataError(f"{where}: message {n} has role {role!r}; roles are {ROLES}.")
      text = content_text(message["content"], f"{where}: message {n} ({role})")
      pieces += self.chat.pieces(role, text, (role == "assistant") if weight is None else bool(weight))
    return pieces

  def _sequence(self, pieces: list[tuple[str, int]]) -> tuple[np.ndarray, np.ndarray]:
    tok = self.tokenizer
    ids = [np.asarray([tok.bos_id], np.int32)]
    weights = [np.zeros(1, np.float32)]
    for text, w in pieces:
      encoded = tok.encode(text)
      ids.append(encoded)
      weights.append(np.full(len(encoded), w, np.float32))
    ids.append(np.asarray([tok.eos_id], np.int32))
    weights.append(np.asarray([pieces[-1][1] if pieces else 1], np.float32))  # EOS counts after a response
    return np.concatenate(ids), np.concatenate(weights)


def fit(example: dict[str, np.ndarray], max_len: int, overlong: str, where: str) -> dict[str, np.ndarray] | None:
  """Applies the over-long policy to an example whose sequences must fit in one row of `max_len` tokens."""
  longest = max(len(v) for k, v in example.items() if k.endswith("tokens"))
  if not max_len or longest <= max_len:
    return example
  if overlong == "drop":
    return None
  if overlong == "truncate":
    return {k: v[:max_len] for k, v in example.items()}
  raise DataError(f"{where}: an example of {longest} tokens exceeds train.seq_len={max_len}; raise train.seq_len, "
                  "or set data.overlong='truncate' (cut the end) or 'drop'.")


def _at_start(length: int, value: float) -> np.ndarray:
  """A per-example scalar as a per-token column that survives packing: `value` at position 0, zeros after."""
  column = np.zeros(length, np.float32)
  column[0] = value
  return column


def _text(value: str | list) -> str:
  """The text of a string or of a list of messages (already checked by `Encoder._turns`)."""
  return value if isinstance(value, str) else "".join(content_text(m["content"], "") for m in value)


def _example(ids: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
  return {"tokens": ids[:-1], "targets": ids[1:], "loss_mask": weights[1:]}


def texts(record: dict, field: str = "text") -> list[str]:
  """Every piece of text in a record of any format (what a tokenizer trains on)."""
  out = []
  for key in (field, "prompt", "completion", "chosen", "rejected", "messages"):
    value = record.get(key)
    if isinstance(value, str):
      out.append(value)
    elif isinstance(value, list):
      for m in value:
        try:
          out.append(content_text(m.get("content") if isinstance(m, dict) else None, "record"))
        except UserError:
          pass  # no text to learn pieces from; the encoder reports the message, naming its record
  return out
