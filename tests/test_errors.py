"""Bad input, as a user types it: `python -m fmjax.main` and the tools refuse it at start with one line,
`fmjax: error: <message>` naming the key or file and the fix, exit code 2, no traceback, nothing written.

Each row is one subprocess (the jax import is most of its ~2 s); without pytest-xdist the rows selected run
concurrently, under xdist each test runs its own row. The inputs (data files, a pre-made run directory) are
snapshotted first: no row may change them, and a row's new --workdir must not be created.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

import subprocess_rows

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**{k: v for k, v in os.environ.items() if k != "FMJAX_DEBUG"},
       "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
PRETRAIN, DISTILL = "--config=configs/pretrain.py:smoke", "--config=configs/distill.py:smoke"


@dataclasses.dataclass(frozen=True)
class Row:
  id: str
  args: tuple[str, ...]  # after `python -m fmjax.main` (or the tool); {files}, {run} and {tmp} are filled in
  names: str  # the key or file the message must name
  fix: str  # a word of the fix the message must give
  tool: str = ""  # tools/<tool>.py; empty: fmjax.main
  workdir: str = "new"  # new: --workdir={tmp}/run, which must not be created | run: the pre-made run | none: in args
  debug: bool = False  # --debug or FMJAX_DEBUG=1: the traceback instead of the one line
  env: tuple[tuple[str, str], ...] = ()  # added to the environment

  def argv(self, files: str, run: str, tmp: str) -> list[str]:
    args = [a.format(files=files, run=run, tmp=tmp) for a in self.args]
    if self.workdir != "none":
      args.append(f"--workdir={run if self.workdir == 'run' else os.path.join(tmp, 'run')}")
    return [sys.executable, *([f"tools/{self.tool}.py"] if self.tool else ["-m", "fmjax.main"]), *args]


def main_row(id_: str, names: str, fix: str, *args: str, config: str = PRETRAIN, **kw) -> Row:
  return Row(id_, ((config,) if config else ()) + args, names, fix, **kw)


# Through the command line, as a user types it (each row is a subprocess: keep this table to what only a process
# shows; VALUES and INPUTS below check the rest of the validation in-process).
ROWS = [
    # config values (fmjax/spec.py resolve): refused before any work, an existing run left as it is
    main_row("lr_negative_on_a_run", "optimizer.lr=-1.0", "peak learning rate", "--config.optimizer.lr=-1",
             workdir="run"),
    main_row("b2_above_1", "optimizer.b2=1.5", "in [0, 1)", "--config.optimizer.b2=1.5"),
    main_row("warmup_not_below_steps", "optimizer.warmup_steps=40", "smaller than train.steps",
             "--config.optimizer.warmup_steps=40"),
    main_row("keep_zero_on_a_run", "checkpoint.keep=0", ">= 1", "--config.checkpoint.keep=0", workdir="run"),
    main_row("objective_unknown", "objective.name='dpoo'", "one of", "--config.objective.name=dpoo"),
    main_row("beta_zero", "objective.beta=0.0", "must be > 0", "--config.objective.beta=0",
             config="--config=configs/dpo.py:smoke"),
    main_row("option_of_another_head", "objective.beta", "z_loss", "--config.objective.beta=0.5"),
    main_row("batch_not_divisible_by_grad_accum", "train.grad_accum=3", "change one of them",
             "--config.train.grad_accum=3"),
    main_row("mesh_does_not_divide", "mesh.fsdp=3", "-1 to fill", "--config.mesh.fsdp=3"),
    main_row("holdout_above_1", "data.holdout=1.5", "[0, 1)", "--config.data.holdout=1.5"),
    main_row("lora_dropout_1", "lora.dropout=1.0", "[0, 1)", "--config.lora.rank=4", "--config.lora.dropout=1.0"),
    # flags and config files (startup.run)
    main_row("unknown_config_key", "lrr", "spelling", "--config.optimizer.lrr=1"),
    main_row("unknown_variant", "smok", "known variants", config="--config=configs/pretrain.py:smok"),
    main_row("bad_variant_type", "steps=abc", "takes an int", config="--config=configs/pretrain.py:steps=abc"),
    main_row("missing_config_file", "configs/nope.py", "configs/pretrain.py", config="--config=configs/nope.py"),
    # the run directory
    main_row("workdir_is_a_file", "{files}/afile", "move that file", "--workdir={files}/afile", workdir="none"),
    # inputs: tokenizer, data, init_from, teacher
    main_row("tokenizer_garbage_on_a_run", "{files}/notes.model", "tools/train_tokenizer.py",
             "--config.data.tokenizer_path={files}/notes.model", workdir="run"),
    main_row("jsonl_without_text", "{files}/body.jsonl", "--config.data.field=body",
             "--config.data.source={files}/body.jsonl"),
    main_row("glob_matches_nothing", "{files}/zzz*.jsonl", "check the path", "--config.data.source={files}/zzz*.jsonl"),
    main_row("malformed_jsonl_line", "{files}/bad.jsonl:2", "fix or remove that line",
             "--config.data.source={files}/bad.jsonl"),
    main_row("init_from_missing", "init_from.workdir", "init_from.bootstrap",
             "--config.init_from.workdir={files}/nowhere"),
    main_row("teacher_missing", "objective.teacher", "objective.teacher_bootstrap",
             config="--config=configs/distill.py:smoke,teacher={files}/nowhere"),
    # tools
    Row("generate_without_workdir", ("--prompt=hi",), "--workdir", "--help", tool="generate", workdir="none"),
    Row("evaluate_glob_matches_nothing", ("perplexity", "--model={run}", "--data={files}/zzz*.jsonl"),
        "{files}/zzz*.jsonl", "check the path", tool="evaluate", workdir="none"),
    Row("train_tokenizer_without_text", ("--input={files}/body.jsonl", "--output={tmp}/tok.model"),
        "{files}/body.jsonl", "--field=body", tool="train_tokenizer", workdir="none"),
    Row("aot_compile_missing_config", ("--config=configs/nope.py", "--topology=v5p-8"), "configs/nope.py",
        "configs/pretrain.py", tool="aot_compile", workdir="none"),
    Row("convert_hf_into_a_run", ("import", "--hf_dir={files}/empty", "--workdir={run}"), "--workdir={run}",
        "new directory", tool="convert_hf", workdir="none"),
    Row("curate_glob_matches_nothing", ("--input={files}/zzz*.jsonl", "--output={tmp}/out"), "--input=",
        "check the path", tool="curate", workdir="none"),
]
DEBUG_ROWS = [
    main_row("debug_flag", "optimizer.lr=-1.0", "", "--config.optimizer.lr=-1", "--debug", debug=True),
    Row("debug_flag_tool", ("--input={files}/zzz*.jsonl", "--output={tmp}/out", "--debug"), "zzz*.jsonl", "",
        tool="curate", workdir="none", debug=True),
    Row("debug_env_flags", ("--config=configs/nope.py", "--topology=v5p-8"), "configs/nope.py", "",
        tool="aot_compile", workdir="none", debug=True, env=(("FMJAX_DEBUG", "1"),)),
]


def snapshot(*roots: str) -> dict[str, tuple[int, int]]:
  """(mtime_ns, size) of every file and directory under `roots`."""
  out = {}
  for root in roots:
    for directory, dirs, files in os.walk(root):
      for name in [*dirs, *files]:
        st = os.stat(os.path.join(directory, name))
        out[os.path.join(directory, name)] = (st.st_mtime_ns, st.st_size)
  return out


@dataclasses.dataclass
class Inputs:
  files: str  # data files and directories that rows name
  run: str  # a run directory with a config.json and checkpoints (as a run leaves it)
  root: str  # each row's scratch directory is root/<row id>
  before: dict[str, tuple[int, int]]

  def tmp(self, row: Row) -> str:
    return subprocess_rows.scratch(self.root, row.id)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
  base = tmp_path_factory.mktemp("errors")
  files, run, root = base / "files", base / "run", base / "rows"
  for d in (files / "empty", files / "untrained", run / "checkpoints" / "10" / "state", run / "checkpoints" / "10" /
            "data", run / "checkpoints" / "20" / "state", root):
    d.mkdir(parents=True)
  (files / "afile").write_text("not a directory\n")
  (files / "notes.model").write_text("some notes, not a sentencepiece model\n")
  (files / "notes.json").write_text('{"not": "a tokenizer"}\n')
  (files / "body.jsonl").write_text(json.dumps({"body": "hello there"}) + "\n" + json.dumps({"body": "x"}) + "\n")
  (files / "bad.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + '{"text": "unterminated\n')
  (files / "untrained" / "config.json").write_text(json.dumps({"model": {"name": "smoke"}}) + "\n")  # never trained
  (run / "config.json").write_text(json.dumps({"model": {"name": "smoke"}}) + "\n")
  (run / "metrics.jsonl").write_text(json.dumps({"step": 10, "loss": 5.0}) + "\n")
  for step in ("10", "20"):
    (run / "checkpoints" / step / "state" / "_METADATA").write_bytes(b"\0" * 64)
  (run / "checkpoints" / "10" / "data" / "process_0-of-1.json").write_text("{}\n")
  return Inputs(str(files), str(run), str(root), snapshot(str(files), str(run)))


def execute(row: Row, inputs: Inputs) -> subprocess.CompletedProcess:
  return subprocess.run(row.argv(inputs.files, inputs.run, inputs.tmp(row)), cwd=REPO, env={**ENV, **dict(row.env)},
                        capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def prefetched(request, inputs) -> dict[str, subprocess.CompletedProcess]:
  return subprocess_rows.prefetch(request, Row, lambda r: execute(r, inputs))


def result(row: Row, inputs: Inputs, prefetched: dict) -> subprocess.CompletedProcess:
  return prefetched[row.id] if row.id in prefetched else execute(row, inputs)


def test_table_rows_are_distinct_and_cover_main_and_tools():
  ids = [r.id for r in ROWS + DEBUG_ROWS]
  assert len(ids) == len(set(ids))
  assert sum(not r.tool for r in ROWS) >= 20 and len({r.tool for r in ROWS if r.tool}) >= 3
  assert len({v[0] for v in VALUES} | {i[0] for i in INPUTS}) == len(VALUES) + len(INPUTS)


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_bad_input_is_one_line_naming_it_and_the_fix(row: Row, inputs: Inputs, prefetched):
  proc = result(row, inputs, prefetched)
  output = proc.stdout + proc.stderr
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 2, output[-3000:]
  assert lines and lines[-1].startswith("fmjax: error: "), output[-3000:]
  assert "Traceback" not in output, output[-3000:]
  message = lines[-1]
  fill = dict(files=inputs.files, run=inputs.run, tmp=inputs.tmp(row))
  assert row.names.format(**fill) in message, message
  assert row.fix.format(**fill) in message, message
  assert snapshot(inputs.files, inputs.run) == inputs.before, "a row changed its inputs or the run directory"
  if row.workdir == "new":
    assert not os.path.exists(os.path.join(inputs.tmp(row), "run")), "the new --workdir was created"


@pytest.mark.parametrize("row", DEBUG_ROWS, ids=lambda r: r.id)
def test_debug_shows_the_traceback(row: Row, inputs: Inputs, prefetched):
  proc = result(row, inputs, prefetched)
  assert proc.returncode != 0 and "Traceback" in proc.stderr, proc.stderr[-3000:]
  assert row.names.format(files=inputs.files, run=inputs.run, tmp="") in proc.stderr
  assert "fmjax: error:" not in proc.stderr


# In-process: every config value with a range or a set of choices, with a value outside it -> (key=value named, a
# word of what it must be). `test_every_rule_has_a_row` keeps this table and the rules (fmjax/spec.py's sections, each
# head's options, each parameterisation's) in step.
VALUES = [
    ("train.steps", 0, "> 0"), ("train.batch_size", 0, "> 0"), ("train.seq_len", 0, "> 0"),
    ("train.grad_accum", 0, "> 0"), ("train.stop_after", -1, ">= 0"),
    ("train.spike_factor", -1.0, ">= 0"), ("train.spike_window", 0, "> 0"), ("train.spike_skips", -1, ">= 0"),
    ("optimizer.name", "adam", "adamw"), ("optimizer.lr", -1.0, "peak learning rate"),
    ("optimizer.schedule", "linear", "cosine"), ("optimizer.warmup_steps", -1, ">= 0"),
    ("optimizer.min_lr_ratio", 1.5, "[0, 1]"), ("optimizer.decay_fraction", 0.0, "(0, 1]"),
    ("optimizer.decay_shape", "cube", "sqrt"), ("optimizer.b1", 1.0, "[0, 1)"), ("optimizer.b2", 1.5, "[0, 1)"),
    ("optimizer.eps", 0.0, "> 0"), ("optimizer.weight_decay", -0.1, ">= 0"),
    ("optimizer.no_decay_regex", "(norm", "regular expression"), ("optimizer.clip_norm", -1.0, ">= 0"),
    ("checkpoint.every_steps", -1, ">= 0"), ("checkpoint.every_minutes", -1.0, ">= 0"), ("checkpoint.keep", 0, ">= 1"),
    ("checkpoint.keep_every", -1, ">= 0"),
    ("eval.every_steps", -1, ">= 0"), ("eval.batches", 0, "> 0"), ("eval.position_buckets", -1, ">= 0"),
    ("log.every_steps", 0, "> 0"), ("log.peak_flops", -1.0, ">= 0"),
    ("data.format", "csv", "prompt_completion"), ("data.holdout", 1.5, "[0, 1)"), ("data.workers", -1, ">= 0"),
    ("data.packing_bins", 0, "> 0"), ("data.overlong", "cut", "truncate"), ("data.text_packing", "pack", "stream"),
    ("data.chat_template", "{content}", "{role}"),
    ("data.tokenizer", "wordpiece", "sentencepiece"), ("data.tokenizer_train_chars", 0, "> 0"),
    ("data.vocab_size", 100, "> 264"), ("data.shards", -1, ">= 0"),
    ("objective.name", "dpoo", "cdpo"), ("objective.z_loss", -1.0, ">= 0"), ("objective.beta", 0.0, "> 0"),
    ("objective.reference", "live", "precomputed"), ("objective.label_smoothing", 0.5, "[0, 0.5)"),
    ("objective.simpo_gamma", -1.0, ">= 0"), ("objective.kto_desirable_weight", 0.0, "> 0"),
    ("objective.kto_undesirable_weight", 0.0, "> 0"), ("objective.teacher_step", -2, ">= -1"),
    ("objective.divergence", "kl", "forward_kl"), ("objective.jsd_beta", 1.0, "(0, 1)"),
    ("objective.reward_timeout", -1.0, ">= 0"), ("objective.temperature", 0.0, "> 0"),
    ("objective.alpha", 1.5, "[0, 1]"), ("objective.top_k", -1, ">= 0"),
    ("objective.center_rewards_coefficient", -1.0, ">= 0"), ("objective.reward_model_step", -2, ">= -1"),
    ("objective.num_generations", 0, "> 0"), ("objective.num_iterations", 0, "> 0"),
    ("objective.max_completion_length", 0, "> 0"), ("objective.top_p", 0.0, "(0, 1]"),
    ("objective.loss_type", "ppo", "dr_grpo"), ("objective.scale_rewards", "std", "rloo"),
    ("objective.importance_sampling_level", "seq", "sequence_token"),
    ("objective.epsilon_low", 1.0, "[0, 1)"), ("objective.epsilon_high", -0.1, ">= 0"),
    ("objective.kl_coef", -0.1, ">= 0"), ("objective.missing_eos_penalty", -1.0, ">= 0"),
    ("objective.sampler_correction", "tis", "token_truncate"), ("objective.sampler_correction_max", 0.0, "> 0"),
    ("objective.sampler_correction_min", -1.0, ">= 0"), ("objective.num_ppo_epochs", 0, "> 0"),
    ("objective.num_mini_batches", 0, "> 0"), ("objective.cliprange", 1.0, "(0, 1)"),
    ("objective.cliprange_value", 0.0, "> 0"), ("objective.vf_coef", -1.0, ">= 0"), ("objective.gamma", 1.5, "[0, 1]"),
    ("objective.lam", -0.5, "[0, 1]"), ("objective.kl_estimator", "k2", "k3"),
    ("objective.kl_penalty", "both", "loss"), ("objective.critic", "value", "separate"),
    ("objective.critic_init_step", -2, ">= -1"),
    ("init_from.step", -2, ">= -1"),
    ("quant.base", "nf2", "nf4"), ("quant.frozen", "fp8", "int8"), ("quant.blocksize", 48, "64"),
    ("lora.rank", -1, ">= 0"), ("lora.alpha", 0.0, "> 0"), ("lora.dropout", 1.0, "[0, 1)"),
    ("lora.targets", "(q", "regular expression"),
    ("reft.rank", -1, ">= 0"), ("reft.method", "reft", "loreft"), ("reft.layers", "1-3", "comma-separated"),
    ("reft.positions", "first5", "f<k>+l<k>"), ("reft.dropout", 1.0, "[0, 1)"),
    *((f"mesh.{axis}", 0, "-1 (fill)") for axis in ("data", "fsdp", "context", "tensor", "expert", "dcn_data",
                                                     "dcn_fsdp", "dcn_context", "dcn_tensor", "dcn_expert")),
]


def shown(value) -> str:
  return repr(value) if isinstance(value, str) else str(value)


def load(spec: str = "configs/pretrain.py:smoke", **overrides):
  """The config of `spec` with `overrides`; an option of a head other than the config's (objective.beta on the
  pre-training config) switches to the first head that reads it."""
  from fmjax import config_lib, objectives

  c = config_lib.load(os.path.join(REPO, spec))
  for key in overrides:
    section, name = key.split(".")
    if section == "objective" and name != "name" and name not in c.objective:
      config_lib.use_head(c, next(h for h, t in objectives.REGISTRY.items() if name in t.options.docs()))
  for key, value in overrides.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


def test_every_rule_has_a_row():
  import dataclasses

  from fmjax import adapters, config_lib, objectives, spec

  base, rows = config_lib.base(), {key for key, _, _ in VALUES}
  ruled = [f"{section}.{f.name}" for section, cls in spec.SECTIONS.items() for f in dataclasses.fields(cls)
           if f.metadata.get("rule") is not None]
  ruled += [f"{section}.{key}" for section, cls in adapters.registered().items() for key, _, _ in cls.rules]
  ruled += ["objective.name"]
  for key in ruled:
    section, name = key.split(".")
    assert name in base[section], f"rule for {key}, which base() does not have"
    assert key in rows, f"no row of VALUES checks {key}"
  for head in objectives.REGISTRY.values():  # each built-in head's options with a range rule
    if not head.make.__module__.startswith("fmjax."):
      continue  # registered by another test module (tests/plugin_heads.py)
    for f in dataclasses.fields(head.options):
      if f.metadata.get("rule") is not None:
        assert f"objective.{f.name}" in rows, f"no row of VALUES checks objective.{f.name}"


@pytest.mark.parametrize("key,value,fix", VALUES, ids=[v[0] for v in VALUES])
def test_a_value_out_of_range_names_the_key_the_value_and_the_range(key, value, fix):
  from fmjax import spec
  from fmjax.errors import UserError
  from fmjax.train import checks

  with pytest.raises(UserError) as e:
    checks.check_spec(spec.resolve(load(**{key: value})))
  assert f"{key}={shown(value)} must be" in str(e.value) and fix in str(e.value), str(e.value)


# In-process: the combinations, model fields, the run directory and the inputs that `check_run` refuses
# (id, config spec, overrides, --workdir, the key or file named, a word of the fix); {files} / {run} as above.
SMOKE = "configs/pretrain.py:smoke"
INPUTS = [
    ("grad_accum", SMOKE, {"train.grad_accum": 3}, "new", "train.batch_size=8", "train.grad_accum=3"),
    ("warmup", SMOKE, {"optimizer.warmup_steps": 50}, "new", "optimizer.warmup_steps=50", "train.steps=40"),
    ("model_kv_heads", SMOKE, {"model.num_kv_heads": 3}, "new", "model.num_kv_heads=3", "multiple"),
    ("model_head_dim", SMOKE, {"model.head_dim": 15}, "new", "model.head_dim=15", "even"),
    ("model_dtype", SMOKE, {"model.dtype": "float64"}, "new", "model.dtype='float64'", "bfloat16"),
    ("model_norm_eps", SMOKE, {"model.norm_eps": 0.0}, "new", "model.norm_eps=0.0", "> 0"),
    ("model_remat", SMOKE, {"model.remat": "all"}, "new", "model.remat='all'", "dots"),
    ("model_preset", SMOKE, {"model.name": "gpt5"}, "new", "model.name='gpt5'", "preset"),
    ("model_matmul", SMOKE, {"model.matmul": "fp8"}, "new", "model.matmul='fp8'", "int8"),
    ("quant_base_without_a_parameterisation", SMOKE, {"quant.base": "nf4"}, "new", "quant.base='nf4'",
     "quant.frozen"),
    ("quant_blocks_do_not_tile", "configs/lora.py:smoke", {"quant.base": "nf4", "quant.blocksize": 128}, "new",
     "model.d_model=64", "e.g. 32"),
    ("workdir_empty", SMOKE, {}, "", "--workdir", "--workdir=/tmp/run"),
    ("workdir_in_a_file", SMOKE, {}, "{files}/afile/run", "{files}/afile", "another --workdir"),
    ("tokenizer_missing", SMOKE, {"data.tokenizer_path": "{files}/nope.model"}, "new", "{files}/nope.model",
     "train_tokenizer.py"),
    ("tokenizer_json_garbage", SMOKE, {"data.tokenizer_path": "{files}/notes.json"}, "new", "data.tokenizer_path",
     "tokenizer.json"),
    ("init_from_without_checkpoints", SMOKE, {"init_from.workdir": "{files}/untrained"}, "new", "init_from.workdir",
     "train it first"),
    ("init_from_step_missing", SMOKE, {"init_from.workdir": "{run}", "init_from.step": 3}, "new", "init_from.step=3",
     "[10, 20]"),
    ("sft_init_from_missing", "configs/sft.py:smoke,init_from={files}/nowhere", {}, "new", "init_from.workdir",
     "init_from.bootstrap"),
    ("bootstrap_missing", SMOKE, {"init_from.bootstrap": "configs/nope.py"}, "new", "init_from.bootstrap",
     "configs/pretrain.py"),
    ("teacher_bootstrap_missing", "configs/distill.py:smoke", {"objective.teacher_bootstrap": "nope.py"}, "new",
     "objective.teacher_bootstrap", "configs/pretrain.py"),
    ("teacher_not_a_run", "configs/distill.py:smoke", {"objective.teacher": "{files}/empty"}, "new",
     "objective.teacher", "config.json"),
    ("teacher_without_checkpoints", "configs/distill.py:smoke", {"objective.teacher": "{files}/untrained"}, "new",
     "objective.teacher=", "train it first"),
    ("teacher_step_missing", "configs/distill.py:smoke", {"objective.teacher": "{run}", "objective.teacher_step": 5},
     "new", "objective.teacher_step=5", "-1 for the newest"),
    ("prepared_missing", SMOKE, {"data.source": "prepared:{files}/nowhere"}, "new", "prepared:", "prepare_data.py"),
    ("tokenizer_source_glob", SMOKE, {"data.tokenizer_source": "{files}/zzz*.txt"}, "new", "zzz*.txt",
     "check the path"),
    ("mixed_kinds", SMOKE, {"data.source": "{files}/*"}, "new", "{files}/*", "data.mixture"),
    ("reward_head_on_a_language_model", "configs/reward.py:smoke", {"model.num_labels": 0}, "new",
     "model.num_labels=0", "set model.num_labels to 1"),
    ("classify_with_one_label", "configs/classify.py:smoke", {"model.num_labels": 1}, "new", "model.num_labels=1",
     ">= 2"),
    ("grpo_with_eval", "configs/grpo.py:smoke", {"eval.every_steps": 10}, "new", "eval.every_steps=0",
     "tools/evaluate.py rewards"),
    ("grpo_checkpoints_inside_a_rollout", "configs/grpo.py:smoke,mu=2", {"checkpoint.every_steps": 5}, "new",
     "checkpoint.every_steps=5", "multiple of objective.num_iterations=2"),
    ("grpo_batch_not_groups", "configs/grpo.py:smoke", {"train.batch_size": 30}, "new", "train.batch_size=30",
     "objective.num_generations=8"),
    ("grpo_no_room_for_a_prompt", "configs/grpo.py:smoke", {"objective.max_completion_length": 47}, "new",
     "train.seq_len=48", "raise train.seq_len"),
    ("grpo_unknown_reward", "configs/grpo.py:smoke", {"objective.rewards": "sorted"}, "new", "'sorted'",
     "package.module:function"),
    ("grpo_reward_module_missing", "configs/grpo.py:smoke", {"objective.rewards": "no_such_mod:fn"}, "new",
     "'no_such_mod:fn'", "PYTHONPATH"),
    ("grpo_reward_model_missing", "configs/grpo.py:smoke,rlhf,reward_model={files}/untrained", {}, "new",
     "objective.reward_model", "train it first"),
]


@pytest.mark.parametrize("row", INPUTS, ids=[i[0] for i in INPUTS])
def test_check_run_refuses_with_the_key_and_the_fix(row, inputs: Inputs, tmp_path):
  from fmjax import spec
  from fmjax.errors import UserError
  from fmjax.train import checks

  _, config_file, overrides, workdir, names, fix = row
  fill = lambda v: v.format(files=inputs.files, run=inputs.run) if isinstance(v, str) else v  # noqa: E731
  config = load(fill(config_file), **{k: fill(v) for k, v in overrides.items()})
  with pytest.raises(UserError) as e:
    checks.check_run(spec.resolve(config), str(tmp_path / "run") if workdir == "new" else fill(workdir))
  message = str(e.value)
  assert fill(names) in message and fill(fix) in message, message
  assert "\n" not in message
  assert snapshot(inputs.files, inputs.run) == inputs.before
  assert not (tmp_path / "run").exists()
