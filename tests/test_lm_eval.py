"""The lm-evaluation-harness adapter: requests against direct float64 log-softmax sums, and a local multiple-choice
task run offline whose reported accuracy equals one computed from `Model.logits`."""

import json
import string

import jax
import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from fmjax.api import Model  # noqa: E402
from fmjax.data import ByteTokenizer  # noqa: E402
from fmjax.evaluation import perplexity  # noqa: E402
from fmjax.evaluation.harness import FmjaxLM  # noqa: E402
from fmjax.model import init_params, resolve  # noqa: E402

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def model() -> Model:
  cfg = resolve("smoke")
  return Model(cfg, init_params(cfg, jax.random.PRNGKey(0)), TOK)


def requests(kind: str, args: list[tuple]) -> list[Instance]:
  return [Instance(kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def log_softmax64(logits: np.ndarray) -> np.ndarray:
  x = np.asarray(logits, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def direct(model: Model, context: str, continuation: str, max_length: int = 10_000) -> float:
  """Σ log p(continuation | BOS + context) from one whole row of `Model.logits`, the row cut to its last
  `max_length` + 1 tokens."""
  ids = [TOK.bos_id, *TOK.encode(context + continuation).tolist()][-(max_length + 1):]
  logp = log_softmax64(model.logits(np.asarray(ids)[None, :-1]))[0]
  n = len(continuation.encode("utf-8"))
  return float(sum(logp[t, ids[t + 1]] for t in range(len(ids) - 1 - n, len(ids) - 1)))


def test_loglikelihood_equals_direct_log_softmax_sums_and_flags_greedy_continuations(model):
  contexts = list(string.ascii_letters)
  best = model.logits(np.asarray([[TOK.bos_id, *TOK.encode(c)] for c in contexts])).argmax(-1)[:, -1] - TOK.offset
  k = next(i for i, b in enumerate(best) if 32 < b < 127)  # a context whose greedy next byte is printable
  greedy = chr(best[k])
  args = [("The list", " type"), ("Answer:  ", "4"), ("", "no context"), ("a" * 40, " cut from the left"),
          (contexts[k], greedy), (contexts[k], "~" if greedy != "~" else "!")]
  got = FmjaxLM(model, batch_size=4, max_length=32).loglikelihood(requests("loglikelihood", args))
  args_moved = [(c.rstrip(), c[len(c.rstrip()):] + x) for c, x in args]  # trailing spaces score with the answer
  want = [direct(model, c, x, 32) for c, x in args_moved]
  np.testing.assert_allclose([g[0] for g in got], want, rtol=1e-5)
  assert [g[1] for g in got] == [False] * 4 + [True, False]


def test_loglikelihood_rolling_equals_perplexity_total_nll(model):
  texts = ["short text", "0123456789abcdef" * 2, "windows of sixteen bytes, three!"[:16] * 3]  # 10, 32, 48 bytes
  got = FmjaxLM(model, batch_size=4, max_length=16).loglikelihood_rolling(requests("loglikelihood_rolling",
                                                                                   [(t,) for t in texts]))
  want = [-perplexity(model, [t], seq_len=16, batch_size=4, eos=False).nll_sum for t in texts]
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_generate_until_batches_requests_by_gen_kwargs_and_keeps_their_order(model):
  calls = []

  def generate(prompts, max_new_tokens, **kwargs):
    calls.append((list(prompts), max_new_tokens, kwargs))
    return [f"{p}->{max_new_tokens}" for p in prompts]

  fake = Model(model.config, model.params, TOK)
  fake.generate = generate
  greedy = {"until": ["\n\n", "Q:"], "max_gen_toks": 5}
  sampled = {"until": "Q:", "do_sample": True, "temperature": 0.7, "top_p": 0.9}
  args = [("a", greedy), ("bbb", sampled), ("cc", greedy), ("dddd", greedy), ("e", sampled)]
  got = FmjaxLM(fake, batch_size=2, max_gen_toks=7).generate_until(requests("generate_until", args))
  assert got == ["a->5", "bbb->7", "cc->5", "dddd->5", "e->7"]
  sample_args = dict(stop=["Q:"], seed=0, temperature=0.7, top_k=0, top_p=0.9)
  assert calls == [(["dddd", "cc"], 5, dict(stop=["\n\n", "Q:"], seed=0, temperature=0.0, top_k=0, top_p=1.0)),
                   (["a"], 5, dict(stop=["\n\n", "Q:"], seed=0, temperature=0.0, top_k=0, top_p=1.0)),
                   (["bbb", "e"], 7, sample_args)]
  with pytest.raises(ValueError, match="repetition_penalty"):
    FmjaxLM(fake).generate_until(requests("generate_until", [("a", {"repetition_penalty": 1.1})]))


def test_local_multiple_choice_task_reports_the_accuracy_of_model_logits(model, tmp_path):
  words = ["cat", "sun", "tree", "river", "stone", "cloud", "bird", "fire"]
  docs = [{"question": f"Q: what is a {w}?\nA:", "choices": ["an animal", "a thing", f"a {w}"]} for w in words]
  scores = np.asarray([[direct(model, d["question"], " " + c) for c in d["choices"]] for d in docs])
  best = scores.argmax(1)
  for i, d in enumerate(docs):  # the model is right on the first five documents and wrong on the last three
    d["answer"] = int(best[i] if i < 5 else (best[i] + 1) % 3)
  (tmp_path / "tiny.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
  (tmp_path / "tasks").mkdir()
  (tmp_path / "tasks" / "tiny.yaml").write_text(f"""
task: fmjax_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files: {{test: {tmp_path / "tiny.jsonl"}}}
  cache_dir: {tmp_path / "hf_cache"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
""")
  tasks = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
  out = lm_eval.simple_evaluate(model=FmjaxLM(model, batch_size=8), tasks=["fmjax_tiny_mc"], task_manager=tasks,
                                bootstrap_iters=0, log_samples=False)
  assert out["results"]["fmjax_tiny_mc"]["acc,none"] == 5 / 8
