"""PII scrubbing: regexes replace e-mail addresses, phone numbers, IP addresses, card numbers and API keys by typed
placeholders (`<EMAIL>`, `<PHONE>`, `<IP_ADDRESS>`, `<CREDIT_CARD>`, `<API_KEY>`).

Rules, applied in this order (a placeholder left by an earlier rule cannot match a later one):
  API_KEY      AWS access key ids (AKIA/ASIA + 16), GitHub tokens (gh[pousr]_ + 36+, github_pat_ + 22+), OpenAI-style
               `sk-` tokens (20+ characters, at least one digit), Slack `xox[baprs]-` tokens, Google `AIza` + 35, and
               the value (16+ hex/base64 characters with a digit) after `api_key=`, `secret:`, `access_token=`,
               `password=` and similar, case-insensitive; the key name is kept (`api_key=<API_KEY>`).
  EMAIL        local@domain.tld
  CREDIT_CARD  13-19 digits, single spaces or dashes allowed between them, first digit 2-6 (the major networks), Luhn
               checksum valid; so a 13-digit millisecond timestamp (leading 1) or an ISBN (leading 9) stays.
  PHONE        `+`, country code (no leading 0), 8-15 digits in all, in groups (`+44 20 7946 0958`); North
               American `(555) 123-4567`, `555-123-4567`, `555.123.4567`, optional leading `1-`: the two separators
               must agree, so dates (`2024-01-02`) and versions (`3.11.2`) never match.
  IP_ADDRESS   IPv6 in full or `::`-compressed form (validated by `ipaddress`; a compressed form needs a digit, so
               C++ `A::B` stays), then IPv4: four octets 0-255 without leading zeros and no further `.digit`
               (`1.2.3.4.5`, `10.0.19041.1` stay).
Speed: each regex starts with a literal or a character class, so the regex engine skips to candidate positions, and
the match's left boundary is checked by a lookbehind placed after the first character. E-mail addresses are found
from their `@`. The other rules run only when cheap counts allow a match: enough ASCII digits (13 for a card, 10 for
a North American phone, ...), a key name followed by `:` or `=`, `+`, `::` or 7 colons.
"""

from __future__ import annotations

import collections
import ipaddress
import re
from typing import Callable

PLACEHOLDERS = {"API_KEY": "<API_KEY>", "EMAIL": "<EMAIL>", "CREDIT_CARD": "<CREDIT_CARD>", "PHONE": "<PHONE>",
                "IP_ADDRESS": "<IP_ADDRESS>"}

_KEY_PATTERNS = (  # each starts with its literal prefix; the lookbehind after it checks the character before that
    r"A(?<!\wA)(?:KIA|SIA)[0-9A-Z]{16}\b",
    r"gh[pousr]_(?<!\w....)[A-Za-z0-9]{36,255}\b",
    r"github_pat_(?<!\w.{11})[A-Za-z0-9_]{22,255}\b",
    r"sk-(?<!\w...)(?=[A-Za-z0-9_-]*[0-9])[A-Za-z0-9_-]{20,}",
    r"xox[baprs]-(?<!\w.....)[A-Za-z0-9-]{10,}",
    r"AIza(?<!\w....)[0-9A-Za-z_-]{35}(?![0-9A-Za-z_-])",
)
_SECRET_NAMES = ("key", "secret", "token", "passw")
_SECRET_GATE = re.compile(r"(?:key|secret|token|passw(?:or)?d)[\"']?\s*[:=]")  # searched in the lowercased text
_SECRET_VALUE = re.compile(  # the first character (a, c, p or s) picks the key-name branch
    r"(?i)([acps](?<!\w.)(?:(?<=a)(?:pi[_-]?(?:key|secret|token)|ccess[_-]?token|uth[_-]?token)|(?<=s)ecret"
    r"(?:[_-]?key)?|(?<=c)lient[_-]?secret|(?<=p)ass(?:word|wd))[\"']?\s*[:=]\s*[\"']?)"
    r"(?=[A-Za-z0-9+/_-]*[0-9])[A-Za-z0-9+/_-]{16,}={0,2}")
_EMAIL_LOCAL = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-_")
_EMAIL_DOMAIN = re.compile(r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_CARD = re.compile(r"[2-6](?<![\w-].)[0-9](?:[ -]?[0-9]){11,17}(?![\w-])")
_INTL_PHONE = re.compile(r"\+(?<![\w+].)[1-9][0-9]{0,2}(?:[ .-]?(?:\([0-9]{1,4}\)|[0-9]{1,4})){2,6}(?!\w)")
_US_PHONE = re.compile(  # the first character is the `1` of a `1-` prefix, the `(` of `(555)`, or the area code's
    r"[(1-9](?<![\w.+-].)"  # first digit; the alternatives go on from whichever it was
    r"(?:(?<=1)[-. ](?:\([2-9][0-9]{2}\) ?[0-9]{3}[-. ]|[2-9][0-9]{2}([-.])[0-9]{3}\1)"
    r"|(?<=\()[2-9][0-9]{2}\) ?[0-9]{3}[-. ]"
    r"|(?<=[2-9])[0-9]{2}([-.])[0-9]{3}\2)"
    r"[0-9]{4}(?![\w-]|\.[0-9])")
_IPV6 = re.compile(r"[0-9A-Fa-f:](?<![\w:.].)(?:(?<=:)|[0-9A-Fa-f]{0,3})(?::[0-9A-Fa-f]{0,4}){1,7}"
                   r"(?::[0-9]{1,3}(?:\.[0-9]{1,3}){3})?(?![\w:])")
_IPV4 = re.compile(r"[0-9](?<![\w.].)[0-9]{0,2}(?:\.[0-9]{1,3}){3}(?!\.?[0-9]|\w)")


def luhn_valid(digits: str) -> bool:
  """True if the digit string passes the Luhn checksum (every second digit from the right doubled)."""
  total = 0
  for i, ch in enumerate(reversed(digits)):
    d = ord(ch) - 48
    if i % 2:
      d = d * 2 - 9 if d > 4 else d * 2
    total += d
  return total % 10 == 0


def _card(m: re.Match) -> str | None:
  return "<CREDIT_CARD>" if luhn_valid(m.group().replace(" ", "").replace("-", "")) else None


def _intl_phone(m: re.Match) -> str | None:
  return "<PHONE>" if 8 <= sum(ch.isdigit() for ch in m.group()) <= 15 else None


def _ipv4(m: re.Match) -> str | None:
  ok = all(int(o) <= 255 and (o == "0" or o[0] != "0") for o in m.group().split("."))
  return "<IP_ADDRESS>" if ok else None


def _ipv6(m: re.Match) -> str | None:
  s = m.group()
  if s.count(":") < 7 and not any(ch.isdigit() for ch in s):
    return None
  try:
    ipaddress.IPv6Address(s)
  except ValueError:
    return None
  return "<IP_ADDRESS>"


def _emails(text: str) -> tuple[str, int]:
  """Replaces e-mail addresses found from each `@`: the local part is the run of allowed characters before it."""
  at = text.find("@")
  if at < 0:
    return text, 0
  parts, last, n = [], 0, 0
  while at >= 0:
    start = at
    while start > last and text[start - 1] in _EMAIL_LOCAL:
      start -= 1
    m = _EMAIL_DOMAIN.match(text, at + 1) if start < at else None
    if m:
      parts += [text[last:start], "<EMAIL>"]
      last, n = m.end(), n + 1
      at = text.find("@", last)
    else:
      at = text.find("@", at + 1)
  parts.append(text[last:])
  return "".join(parts), n


def _regex_rule(regex: re.Pattern, placeholder: str, check: Callable[[re.Match], str | None] | None = None,
                gate: Callable[[str], bool] | None = None) -> Callable[[str], tuple[str, int]]:
  """A rule that replaces each match of `regex` by `placeholder`, or by `check(match)` (None keeps the match)."""

  def rule(text: str) -> tuple[str, int]:
    if gate is not None and not gate(text):
      return text, 0
    if check is None:
      return regex.subn(placeholder, text)
    n = 0

    def sub(m: re.Match) -> str:
      nonlocal n
      out = check(m)
      if out is None:
        return m.group()
      n += 1
      return out

    return regex.sub(sub, text), n

  return rule


def _has_secret_name(text: str) -> bool:
  lower = text.lower()
  return any(name in lower for name in _SECRET_NAMES) and _SECRET_GATE.search(lower) is not None


# (type, rule, ASCII digits a match needs: the rule is skipped for a text with fewer)
_RULES: tuple[tuple[str, Callable[[str], tuple[str, int]], int], ...] = (
    *(("API_KEY", _regex_rule(re.compile(p), "<API_KEY>"), 0) for p in _KEY_PATTERNS),
    ("API_KEY", _regex_rule(_SECRET_VALUE, "", lambda m: m.group(1) + "<API_KEY>", _has_secret_name), 1),
    ("EMAIL", _emails, 0),
    ("CREDIT_CARD", _regex_rule(_CARD, "", _card), 13),
    ("PHONE", _regex_rule(_INTL_PHONE, "", _intl_phone, lambda t: "+" in t), 8),
    ("PHONE", _regex_rule(_US_PHONE, "<PHONE>"), 10),
    ("IP_ADDRESS", _regex_rule(_IPV6, "", _ipv6, lambda t: "::" in t or t.count(":") >= 7), 1),
    ("IP_ADDRESS", _regex_rule(_IPV4, "", _ipv4, lambda t: "." in t), 4),
)


def scrub(text: str) -> tuple[str, dict[str, int]]:
  """(text with PII replaced by typed placeholders, {type: replacements}); types without replacements are absent."""
  counts: dict[str, int] = collections.Counter()
  ascii_part = text.encode("ascii", "ignore")
  digits = len(ascii_part) - len(ascii_part.translate(None, b"0123456789"))  # of the input: an upper bound later
  for kind, rule, min_digits in _RULES:
    if digits < min_digits:
      continue
    text, n = rule(text)
    if n:
      counts[kind] += n
  return text, dict(counts)
