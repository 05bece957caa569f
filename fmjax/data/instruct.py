"""`embedded:instruct`, a zero-download instruction-tuning corpus built from the standard library's docstrings.

Every public function or method with a docstring (the `api` entries of `fmjax.data.embedded`) yields up to three chat
records {"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}], "task": TASK}, keyed
`TASK:QUALNAME` (`explain:json.dumps`) and ordered by key:
  explain    Q "What does `json.dumps` do?"
             A the docstring's first paragraph: its lines up to the first blank one, stripped and joined by spaces.
  summarize  Q "Summarize this function in one sentence:\\n" + the signature (`def dumps(obj, *, skipkeys=False, ...)`)
             A the first sentence of that paragraph.
  name       Q "Which function of the `json` module does this? " + the first sentence
             A "`json.dumps`".
The first sentence runs up to and including the first period followed by a space (not the period of an abbreviation
such as `e.g.` or `eg.`), else it is the whole paragraph.

Filters. An entry makes no record at all when
  - its first paragraph is shorter than `MIN_CHARS` or longer than `MAX_CHARS` characters (`EOF`, `minute (0-59)`,
    `**DEPRECATED**` say too little; a wall of text is no summary);
  - its first line looks like a signature or usage line written out C style rather than prose: it starts with a
    (dotted) name directly followed by `(` (`S.find(sub[, start]) -> int`, `getopt(args, options)`, pdb's `c(ont)`),
    or with a lowercase word and has an arrow (`data -> gzip encoded data`, `datetime -> string name of time zone`);
  - its signature is longer than `MAX_SIGNATURE` characters;
and it makes no `name` record when its first sentence is also the first sentence of another function's docstring
(`Return the current value.` fits many), since the question would have several right answers.

Held-out split, by module and consistent with `embedded:prose`: a record is in `validation` iff the `prose` key of its
module, `doc:MODULE`, is in prose's validation split (`embedded.split_keys`); otherwise it is in `train`; `all` holds
both. A model pre-trained on the train split of `embedded:prose` has therefore never seen a held-out module's
docstrings, so the loss on held-out instructions measures generalisation to unseen APIs, not recall of their text.
To keep that true where the standard library repeats itself (`_py_abc.ABCMeta.register` copies `abc`'s, many
methods share `Return True if ...` lines), a held-out function whose first paragraph occurs verbatim in a train-side
prose document makes no record at all (a few percent of the held-out functions).
"""

from __future__ import annotations

import collections
import re

from fmjax.data import embedded
from fmjax.errors import UserError

TASKS = ("explain", "summarize", "name")
MIN_CHARS, MAX_CHARS = 20, 400  # bounds on a first paragraph's length
MAX_SIGNATURE = 200
ABBREVIATIONS = ("e.g", "eg", "i.e", "ie", "cf", "vs")  # words whose period ends no sentence
SIGNATURE_LINE = re.compile(r"[\w.]+\(|[a-z].*[-=]>")  # "Return a mapping of scheme -> URL." is prose


def first_lines(doc: str) -> list[str]:
  """The lines of `doc` up to its first blank line, as written."""
  lines = []
  for line in doc.splitlines():
    if not line.strip():
      break
    lines.append(line)
  return lines


def first_paragraph(doc: str) -> str:
  """The lines of `doc` up to its first blank line, stripped and joined by single spaces."""
  return " ".join(line.strip() for line in first_lines(doc))


def first_sentence(paragraph: str) -> str:
  """`paragraph` up to and including its first sentence-ending `. `; the whole paragraph when it has none."""
  for end in re.finditer(r"\. ", paragraph):
    word = (paragraph[:end.start()].split() or [""])[-1].lstrip("([").lower()
    if word not in ABBREVIATIONS:
      return paragraph[:end.start() + 1]
  return paragraph


def looks_like_signature(line: str) -> bool:
  """Whether a docstring's first line spells out a signature, C style (`S.find(sub) -> int`, `data -> bytes`)."""
  return bool(SIGNATURE_LINE.match(line))


def keep(entry: dict[str, str]) -> bool:
  """Whether an api entry passes the length, signature-style and signature-length filters."""
  paragraph = first_paragraph(entry["doc"])
  return (MIN_CHARS <= len(paragraph) <= MAX_CHARS and len(entry["signature"]) <= MAX_SIGNATURE
          and not looks_like_signature(entry["doc"].splitlines()[0]))


def chat(question: str, answer: str, task: str) -> dict:
  """One instruction record."""
  return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
          "task": task}


def build(entries: dict[str, dict[str, str]]) -> dict[str, dict]:
  """Every record (key -> record) that api `entries` (qualified name -> module, signature, doc) make."""
  sentences = {name: first_sentence(first_paragraph(entry["doc"])) for name, entry in entries.items()}
  shared = collections.Counter(sentences.values())  # over every entry: a filtered twin still makes it ambiguous
  records = {}
  for name, entry in entries.items():
    if not keep(entry):
      continue
    module, sentence = entry["module"], sentences[name]
    records[f"explain:{name}"] = chat(f"What does `{name}` do?", first_paragraph(entry["doc"]), "explain")
    records[f"summarize:{name}"] = chat(f"Summarize this function in one sentence:\n{entry['signature']}",
                                        sentence, "summarize")
    if shared[sentence] == 1:
      records[f"name:{name}"] = chat(f"Which function of the `{module}` module does this? {sentence}",
                                     f"`{name}`", "name")
  return records


def validation_modules() -> set[str]:
  """The modules whose `doc:MODULE` document is on the validation side of `embedded:prose`."""
  return {key[len("doc:"):] for key, _ in embedded.load_records("prose", "validation") if key.startswith("doc:")}


def sides(entries: dict[str, dict[str, str]]) -> dict[str, str]:
  """The split side (`train` / `validation`) of each api entry that is not left out as a held-out repeat."""
  held = validation_modules()
  seen = "\n\n".join(embedded.load("prose", "train"))
  out = {}
  for name, entry in entries.items():
    if entry["module"] not in held:
      out[name] = "train"
    elif "\n".join(first_lines(entry["doc"])) not in seen:
      out[name] = "validation"
  return out


def load_records(split: str = "train") -> list[tuple[str, dict]]:
  """(key, record) of the instruction records on side `split` (`train`, `validation`, `all`), in key order."""
  if split not in embedded.SPLITS:
    raise UserError(f"split {split!r} is not one of {embedded.SPLITS}.")
  entries = embedded.api_entries()
  side = sides(entries)
  records = build(entries)
  return [(key, records[key]) for key in sorted(records)
          if (name := key.split(":", 1)[1]) in side and split in ("all", side[name])]


def preference_records(split: str = "train") -> list[tuple[str, dict]]:
  """(key, record) of `embedded:preference`: for each `explain` and `summarize` record of side `split`, the prompt
  with chosen = its own answer and rejected = the answer of the next function (in key order) of the same module
  whose answer differs, or of the next module when it has none: plausible but wrong. Keys and split as
  `load_records`; records are {"prompt": [user], "chosen": [assistant], "rejected": [assistant], "task"}."""
  records = [(k, r) for k, r in load_records(split) if r["task"] in ("explain", "summarize")]
  out = []
  for task in ("explain", "summarize"):
    group = [(k, r) for k, r in records if r["task"] == task]
    modules = [k.split(":", 1)[1].rsplit(".", 1)[0] for k, _ in group]
    answers = [r["messages"][1]["content"] for _, r in group]
    for i, (key, record) in enumerate(group):
      wrong = None
      for j in (k % len(group) for k in range(i + 1, i + len(group))):
        if answers[j] != answers[i]:
          wrong = wrong or answers[j]  # the first other answer, if the module has no other function
          if modules[j] == modules[i]:
            wrong = answers[j]
            break
      if wrong is not None:
        out.append((key, {"prompt": record["messages"][:1], "chosen": record["messages"][1:],
                          "rejected": [{"role": "assistant", "content": wrong}], "task": task}))
  return sorted(out, key=lambda kv: kv[0])
