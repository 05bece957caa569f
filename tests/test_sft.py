"""SFT: loss only on responses (and EOS), chat templates, packed examples kept apart, the head against float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import config_lib, objectives, sample
from fmjax.data import ByteTokenizer, chat, formats, pipeline
from fmjax.data.sources import WHERE, open_source
from fmjax.model import Transformer, init_params, resolve
from fmjax.objectives import LossContext
import from_config

TOK = ByteTokenizer()
CHATS = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
          {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
          {"role": "assistant", "content": "ciao"}],
         [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
         [{"role": "user", "content": "name a colour"}, {"role": "assistant", "content": "teal"},
          {"role": "user", "content": "thanks"}]]  # ends with the user: EOS carries no loss


def packed_rows(records, fmt="chat", seq_len=160, template="fmjax"):
  c = config_lib.base()
  c.data.chat_template = template
  encode = formats.Encoder(fmt, TOK, "text", seq_len, "error", template)
  return list(pipeline._rows([{**r, WHERE: f"m{i}"} for i, r in enumerate(records)], encode, fmt, c.data, seq_len,
                             0, 0, 1, train=False))


def examples(row):
  seg = row["segment_ids"]
  keys = ("tokens", "targets", "loss_mask", "positions")
  return [{k: row[k][seg == s] for k in keys} for s in np.unique(seg[seg > 0])]


@pytest.mark.parametrize("template", ["fmjax", "chatml", "llama3", "[{role}] {content} </s>\n"])
def test_only_assistant_turns_their_end_marker_and_final_eos_carry_loss(template):
  rows = packed_rows([{"messages": m} for m in CHATS], seq_len=512, template=template)
  got = sorted((TOK.decode(e["targets"][e["loss_mask"] == 1]), e["targets"][-1] == TOK.eos_id and e["loss_mask"][-1])
               for row in rows for e in examples(row))
  footer = chat.ChatTemplate(template).footer.replace("{role}", "assistant")
  assert got == sorted([(f"hello{footer}ciao{footer}", True), (f"4{footer}", True), (f"teal{footer}", False)])
  for row in rows:  # the text of every example (prompt included) is the template's rendering
    for e in examples(row):
      text = TOK.decode(e["tokens"])
      assert text.count(chat.ChatTemplate(template).header.replace("{role}", "user")) >= 1


def test_prompt_completion_loss_is_on_the_completion_and_eos():
  (row,) = packed_rows([{"prompt": "Q: capital of France?", "completion": " Paris"}], "prompt_completion")
  (e,) = examples(row)
  assert TOK.decode(e["targets"][e["loss_mask"] == 1]) == " Paris" and e["loss_mask"][-1] == 1
  assert e["targets"][-1] == TOK.eos_id and int(e["loss_mask"].sum()) == len(" Paris") + 1


def test_a_bad_chat_template_names_the_fix():
  with pytest.raises(ValueError, match=r"data.chat_template='<\|{role}\|>' is neither a preset"):
    chat.ChatTemplate("<|{role}|>")
  assert chat.ChatTemplate("chatml").prompt([{"role": "user", "content": "hi"}]) == \
      "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def reference_loss(logits, batch, mask):
  """Masked token-mean NLL and greedy accuracy in float64 NumPy."""
  x = np.asarray(logits, np.float64)
  logz = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
  nll = logz - np.take_along_axis(x, batch["targets"][..., None], -1)[..., 0]
  hit = (x.argmax(-1) == batch["targets"]).astype(np.float64)
  return (nll * mask).sum() / mask.sum(), (hit * mask).sum() / mask.sum()


@pytest.mark.parametrize("completion_only", [True, False])
def test_sft_head_matches_float64_reference(completion_only):
  rows = packed_rows([{"messages": m} for m in CHATS * 3], seq_len=128)
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  logits = 3.0 * np.random.default_rng(0).standard_normal((*batch["tokens"].shape, TOK.vocab_size)).astype(np.float32)
  cfg = config_lib.use_head(config_lib.base(), "sft", completion_only=completion_only)
  ctx = LossContext(apply=lambda p, *a: jnp.asarray(logits))
  loss_sum, weight, metrics = objectives.get(cfg).loss(None, {k: jnp.asarray(v) for k, v in batch.items()}, ctx)
  mask = batch["loss_mask"] if completion_only else (batch["segment_ids"] > 0).astype(np.float64)
  nll, acc = reference_loss(logits, batch, mask)
  assert float(weight) == mask.sum() and 0 < mask.sum() < batch["tokens"].size
  assert abs(float(loss_sum) / float(weight) - nll) <= 1e-6 * nll
  assert abs(float(metrics["accuracy"]) / float(weight) - acc) <= 1e-9


def test_packed_examples_never_attend_to_each_other():
  cfg = resolve("smoke", {"vocab_size": 384})
  params = init_params(cfg, jax.random.PRNGKey(0))
  apply = jax.jit(lambda tokens, seg, pos: Transformer(cfg).apply({"params": params}, tokens, seg, pos))
  records = [{"messages": m} for m in CHATS]
  (row,) = packed_rows(records, seq_len=256)
  seg = row["segment_ids"]
  assert len(np.unique(seg[seg > 0])) == 3  # all three share the row
  packed = np.asarray(apply(row["tokens"][None], seg[None], row["positions"][None]))[0]
  for s in (1, 2, 3):
    alone = row["tokens"][seg == s]
    solo = np.asarray(apply(alone[None], np.ones_like(alone)[None], np.arange(len(alone))[None]))[0]
    np.testing.assert_allclose(packed[seg == s], solo, atol=1e-5)
  # change the first example's tokens: the others' logits do not move at all
  changed = row["tokens"].copy()
  changed[seg == 1] = (changed[seg == 1] + 7) % 256 + 3
  moved = np.asarray(apply(changed[None], seg[None], row["positions"][None]))[0]
  assert np.abs(moved[seg == 1] - packed[seg == 1]).max() > 1e-3
  np.testing.assert_array_equal(moved[seg > 1], packed[seg > 1])


def test_greedy_batch_of_ragged_prompts_equals_each_prompt_alone():
  cfg = resolve("smoke", {"vocab_size": 384})
  params = init_params(cfg, jax.random.PRNGKey(3))
  apply = lambda p, *b: Transformer(cfg).apply({"params": p}, *b)  # noqa: E731
  prompts = [np.asarray([1, 5, 9, 30], np.int32), np.asarray([1, 77], np.int32)]
  together = sample.greedy(apply, params, prompts, 4)
  for p, out in zip(prompts, together):
    (alone,) = sample.greedy(apply, params, [p], 4)
    np.testing.assert_array_equal(out, alone)
    seq = list(p)  # the naive loop: argmax of the last position of the growing sequence
    for _ in range(4):
      x = jnp.asarray([seq])
      seq.append(int(jnp.argmax(apply(params, x, jnp.ones_like(x), jnp.arange(len(seq))[None])[0, -1])))
    np.testing.assert_array_equal(out, seq[len(p):])
  stop = int(together[0][2])
  (cut,) = sample.greedy(apply, params, [prompts[0]], 4, stop_ids=[stop])
  assert list(cut) == list(together[0][:list(together[0]).index(stop) + 1])


def test_multi_task_mixture_draws_rows_by_weight_and_never_mixes_tasks_in_a_row():
  c = config_lib.base()
  c.data.tokenizer, c.data.overlong = "bytes", "drop"
  c.data.mixture = {"explain": {"source": "embedded:instruct/explain", "weight": "0.75"},
                    "name": {"source": "embedded:instruct/name", "weight": "0.25"}}
  c.train.seq_len, c.train.batch_size = 512, 8
  dataset, batch_layout = from_config.train_dataset(c, TOK)
  assert set(batch_layout.dtypes()) == {"tokens", "targets", "loss_mask", "segment_ids", "positions"}
  task = lambda text: "explain" if text.startswith("<|user|>What does `") else \
      "name" if text.startswith("<|user|>Which function of") else text  # noqa: E731
  counts = {"explain": 0, "name": 0}
  it = iter(dataset)
  for _ in range(40):
    b = next(it)
    for tokens, seg in zip(b["tokens"], b["segment_ids"]):
      kinds = {task(TOK.decode(tokens[seg == s])) for s in np.unique(seg[seg > 0])}
      assert len(kinds) == 1  # a row holds examples of one source
      counts[kinds.pop()] += 1
  assert 0.65 < counts["explain"] / 320 < 0.85  # 320 rows drawn with p = 0.75
  with pytest.raises(ValueError, match=r"task 'poems' is unknown; tasks: \['explain', 'summarize', 'name'\]"):
    open_source("embedded:instruct/poems", "train")
