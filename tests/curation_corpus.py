"""The planted corpus of the curation tests: documents of real words, exact and near copies, PII, junk."""

from __future__ import annotations

import re

import numpy as np

from fmjax.curation import dedup, pii


def _vocabulary() -> list[str]:
  import pydoc_data.topics

  return sorted(set(re.findall(r"[a-z]{3,}", " ".join(pydoc_data.topics.topics.values()).lower())))


VOCAB = _vocabulary()


def render(words: list[str]) -> str:
  """Sentences of 10 words, capitalised, 4 sentences per paragraph."""
  sentences = [" ".join(words[k:k + 10]).capitalize() + "." for k in range(0, len(words), 10)]
  return "\n".join(" ".join(sentences[k:k + 4]) for k in range(0, len(sentences), 4))


def random_words(rng: np.random.Generator, n: int) -> list[str]:
  return [VOCAB[i] for i in rng.integers(0, len(VOCAB), n)]


def shingle_jaccard(a: str, b: str, k: int = 5) -> float:
  """True Jaccard of the k-word shingle sets of two texts, as dedup normalizes them."""
  def shingles(t):
    w = dedup.normalize(t).split(" ")
    return {tuple(w[i:i + k]) for i in range(len(w) - k + 1)}
  sa, sb = shingles(a), shingles(b)
  return len(sa & sb) / len(sa | sb)


PII_ITEMS = {  # planted string -> placeholder
    "ada.lovelace@example.org": "<EMAIL>", "j_smith+news@mail.example.co.uk": "<EMAIL>",
    "(555) 123-4567": "<PHONE>", "555-987-6543": "<PHONE>", "555.246.8100": "<PHONE>",
    "+44 20 7946 0958": "<PHONE>", "+1-202-555-0143": "<PHONE>",
    "192.168.10.42": "<IP_ADDRESS>", "2001:db8:85a3::8a2e:370:7334": "<IP_ADDRESS>",
    "fe80::1ff:fe23:4567:890a": "<IP_ADDRESS>",
    "4111 1111 1111 1111": "<CREDIT_CARD>", "5500-0000-0000-0004": "<CREDIT_CARD>", "378282246310005": "<CREDIT_CARD>",
    "AKIAIOSFODNN7EXAMPLE": "<API_KEY>", "ghp_" + "A1b2C3d4E5" * 3 + "F6g7H8": "<API_KEY>",
    "github_pat_" + "11ABCDEFG0" * 4 + "xyz_789": "<API_KEY>", "sk-proj-" + "Xy9" * 16: "<API_KEY>",
    "xoxb-2048-4096-" + "Ab1" * 8: "<API_KEY>", "AIza" + "SyA1b2c3d4e5f6g7h8i9j0" + "K_L-m3n4o5p6q": "<API_KEY>",
}
PII_TYPES = {v: k for k, v in pii.PLACEHOLDERS.items()}


def build_corpus(seed: int = 0) -> dict:
  """Records in stream order plus what is planted: clean (some with PII), exact / near duplicates, junk."""
  rng = np.random.default_rng(seed)
  clean = {f"clean-{i}": random_words(rng, int(rng.integers(220, 320))) for i in range(150)}
  texts = {k: render(w) for k, w in clean.items()}
  expected = dict(texts)  # id -> text expected in the output
  ids = list(clean)

  # PII: every item once, inside otherwise clean documents; the output must carry the placeholder instead.
  pii_counts: dict[str, int] = {t: 0 for t in pii.PLACEHOLDERS}
  items = list(PII_ITEMS.items())
  for n, k in enumerate(ids[100:100 + len(items) // 2 + 1]):
    words = clean[k]
    parts_in, parts_out = [], []
    for item, placeholder in items[2 * n:2 * n + 2]:
      parts_in.append(f"Contact {item} today")
      parts_out.append(f"Contact {placeholder} today")
      pii_counts[PII_TYPES[placeholder]] += 1
    base = render(words)
    texts[k] = base + "\n" + " and ".join(parts_in) + "."
    expected[k] = base + "\n" + " and ".join(parts_out) + "."

  stream = [(k, texts[k]) for k in ids]
  sources = ids[:90]  # duplicates copy documents without PII

  def insert_after(source: str, rec: tuple[str, str]) -> None:
    pos = next(i for i, (k, _) in enumerate(stream) if k == source)
    stream.insert(int(rng.integers(pos + 1, len(stream) + 1)), rec)

  variants = [lambda t: t, str.upper, lambda t: t.replace(" ", "  ").replace("\n", "\n\n"),
              lambda t: "  " + t.replace(". ", ".\t") + " \n", str.swapcase,
              lambda t: "".join(chr(ord(c) + 0xFEE0) if "a" <= c <= "z" else c for c in t[:40]) + t[40:]]
  exact = {}
  for n, src in enumerate(rng.choice(sources, 12, replace=False)):
    exact[f"exact-{n}"] = src
    insert_after(src, (f"exact-{n}", variants[n % len(variants)](texts[src])))

  near, near_jaccard = {}, {}
  long_sources = [k for k in sources if len(clean[k]) >= 270 and k not in exact.values()]
  for n, src in enumerate(rng.choice(long_sources, 12, replace=False)):
    tokens = texts[src].split(" ")  # edit the text in place: 2 words changed, 1 inserted
    for i in rng.choice(len(tokens), 2, replace=False):
      tokens[i] = "zebra" + tokens[i]
    tokens.insert(int(rng.integers(len(tokens))), "inserted")
    text = " ".join(tokens)
    near[f"near-{n}"], near_jaccard[f"near-{n}"] = src, shingle_jaccard(text, texts[src])
    insert_after(src, (f"near-{n}", text))

  junk_texts = {
      "min_chars": "Too short to keep.",
      "max_chars": render(random_words(rng, 5000)),
      "min_alpha_ratio": "\n".join(" ".join(str(x) for x in rng.integers(0, 10**6, 8)) for _ in range(15)),
      "max_dup_line_ratio": "\n".join(["Subscribe to our newsletter for updates."] * 8 +
                                      [render(random_words(rng, 12)) for _ in range(4)]),
      "max_repeated_ngram_ratio": " ".join([render(random_words(rng, 40))] +
                                           ["click here to buy cheap watches online now"] * 12),
  }
  junk = {}
  for rule, text in junk_texts.items():
    junk[f"junk-{rule}"] = rule
    stream.insert(int(rng.integers(len(stream) + 1)), (f"junk-{rule}", text))
  return dict(records=[{"text": t, "id": k, "lang": "en"} for k, t in stream], clean=ids, expected=expected,
              exact=exact, near=near, near_jaccard=near_jaccard, junk=junk, pii_counts=pii_counts)
