"""README.md and docs/*.md stay true: every config they name loads and validates, README.md stays a map, links resolve.

Fast: it reads text files and builds ConfigDicts; nothing is traced or compiled.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import pytest

from fmjax import config_lib
from fmjax import spec as spec_lib
from fmjax.train import checks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
GUIDES = sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
DOCS = [README, *GUIDES]
MAX_README_LINES = 250

# `configs/<name>.py` with an optional `:variant` (`k=v,flag`; a value may itself hold ':' or '/', as in
# `data=embedded:code` or `init_from=/tmp/pt`). A variant ends at whitespace, a quote, a backtick, a bracket or a pipe.
SPEC = re.compile(r"configs/([A-Za-z0-9_]+)\.py(?::([^\s`'\"()\[\]{}|\\]+))?")
# `for r in 0 0.25; do` in a shell block: `$r` in a spec stands for each of those values.
SHELL_FOR = re.compile(r"\bfor (\w+) in ([^;\n]+);")
SHELL_VAR = re.compile(r"\$\{?(\w+)\}?")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _rel(path: str) -> str:
  return os.path.relpath(path, REPO)


def _read(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


def _is_placeholder(variant: str) -> bool:
  """`model=<preset>`, `steps=N`, `init_from=DIR`, `...`: text that stands for a value, not a value."""
  if "<" in variant or ">" in variant or "..." in variant:
    return True
  return any(re.fullmatch(r"[A-Z][A-Z_]*", value) for _, _, value in (item.partition("=")
                                                                       for item in variant.split(",")))


def _specs(text: str) -> list[str]:
  """Every config spec the text names, with shell loop variables expanded and placeholders left out.

  Paths in variants (`init_from=/tmp/pt`, `teacher=/tmp/pt`, `ref_logps=/tmp/ref`, `data=alpaca.jsonl`) are kept:
  `get_config` only records them. (The fine-tuning configs also read `<init_from>/config.json` and the run's
  tokenizer file, but only when they exist, so a directory that does not exist loads as well; no spec needs to be
  skipped for reading a directory at load time.)"""
  loops = {var: values.split() for var, values in SHELL_FOR.findall(text)}
  out = []
  for m in SPEC.finditer(text):
    variant = (m.group(2) or "").rstrip(".,;:")
    if _is_placeholder(variant):
      continue
    variants = [variant]
    for var in set(SHELL_VAR.findall(variant)):
      if var not in loops:  # a shell variable set elsewhere: not a value we can check
        variants = []
        break
      variants = [v.replace(f"${{{var}}}", x).replace(f"${var}", x) for v in variants for x in loops[var]]
    out += [f"configs/{m.group(1)}.py" + (f":{v}" if v else "") for v in variants]
  return out


def _all_specs() -> dict[str, list[str]]:
  """spec -> the files that name it."""
  where: dict[str, list[str]] = {}
  for path in DOCS:
    for spec in _specs(_read(path)):
      files = where.setdefault(spec, [])
      if _rel(path) not in files:
        files.append(_rel(path))
  return where


SPECS = _all_specs()


@pytest.mark.parametrize("spec", sorted(SPECS), ids=sorted(SPECS))
def test_named_config_loads_and_validates(spec, monkeypatch):
  monkeypatch.chdir(REPO)  # as `--config=configs/...` is written: relative to the repository root
  try:
    config = config_lib.load(spec)
    checks.check_spec(spec_lib.resolve(config))
    config_lib.resolved_model(config)  # the preset it names exists and its fields are consistent
  except Exception as e:  # noqa: BLE001 - any failure is a doc that names a config that does not work
    pytest.fail(f"{spec} (named in {', '.join(SPECS[spec])}) does not load: {type(e).__name__}: {e}")


def test_docs_name_configs():
  assert len(SPECS) >= 20, sorted(SPECS)
  named = {spec.partition(":")[0] for spec in SPECS}
  for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
    assert _rel(path) in named, f"{_rel(path)} is not named in README.md or docs/*.md"


def test_spec_extraction():
  text = ("`configs/pretrain.py:data=embedded:code` and --config=configs/cpt.py:init_from=/tmp/pt,replay=0 --workdir=x\n"
          "configs/pretrain.py:model=<preset> configs/<stage>.py[:variant] configs/sft.py:steps=N, configs/dpo.py.\n"
          "for a in 0.5 1.0; do x --config=configs/distill.py:alpha=$a,steps=2 --y; done  configs/lora.py:rank=$k\n")
  assert _specs(text) == ["configs/pretrain.py:data=embedded:code", "configs/cpt.py:init_from=/tmp/pt,replay=0",
                          "configs/dpo.py", "configs/distill.py:alpha=0.5,steps=2", "configs/distill.py:alpha=1.0,steps=2"]


def test_unknown_variant_fails(monkeypatch):
  monkeypatch.chdir(REPO)
  with pytest.raises(ValueError, match="unknown"):
    config_lib.load("configs/sft.py:no_such_variant=1")


def test_readme_is_a_map():
  lines = _read(README).count("\n")
  assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move detail into docs/ (at most {MAX_README_LINES})"


def test_readme_links_every_guide():
  linked = {os.path.normpath(os.path.join(REPO, target.partition("#")[0]))
            for target in LINK.findall(_read(README)) if target.partition("#")[0].startswith("docs/")}
  for target in linked:
    assert os.path.isfile(target), f"README.md links {_rel(target)}, which does not exist"
  for guide in GUIDES:
    assert guide in linked, f"README.md does not link {_rel(guide)}"


def _anchors(path: str) -> set[str]:
  """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
  out = set()
  for heading in re.findall(r"(?m)^#{1,6} (.+)$", re.sub(r"(?ms)^```.*?^```", "", _read(path))):
    out.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
  return out


@pytest.mark.parametrize("doc", [_rel(p) for p in DOCS])
def test_local_links_resolve(doc):
  path = os.path.join(REPO, doc)
  for target in LINK.findall(_read(path)):
    if re.match(r"[a-z]+://", target):
      continue
    file, _, anchor = target.partition("#")
    dest = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
    assert os.path.exists(dest), f"{doc} links {target}: {_rel(dest)} does not exist"
    if anchor and dest.endswith(".md"):
      assert anchor in _anchors(dest), f"{doc} links {target}: no heading #{anchor} in {_rel(dest)}"


@pytest.mark.parametrize("doc", [_rel(p) for p in DOCS])
def test_named_tools_exist(doc):
  for tool in sorted(set(re.findall(r"\btools/(\w+\.py)", _read(os.path.join(REPO, doc))))):
    assert os.path.isfile(os.path.join(REPO, "tools", tool)), f"{doc} names tools/{tool}, which does not exist"


def test_the_config_keys_page_is_current():
  """docs/config-keys.md is what tools/config_keys.py prints from the declarations (a new key, a changed default or
  doc, a new head: run `python tools/config_keys.py > docs/config-keys.md`)."""
  proc = subprocess.run([sys.executable, "tools/config_keys.py"], cwd=REPO, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(os.path.join(REPO, "docs", "config-keys.md"), encoding="utf-8") as f:
    assert f.read() == proc.stdout, "docs/config-keys.md is stale: run python tools/config_keys.py > docs/config-keys.md"
  assert "### `grpo`" in proc.stdout and "| `kl_coef` |" in proc.stdout and "### `lora`" in proc.stdout
