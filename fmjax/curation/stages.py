"""The curation stages as Beam transforms: read -> quality + PII -> exact dedup -> near dedup -> write, and tallies.

Documents are keyed by `order` (see `fmjax.curation.read`), so every choice ("keep the first copy", which shard,
the order inside a shard, which examples a report shows) is a function of the input alone, never of how many
workers ran or in what order bundles finished. What moves between workers:
  * the documents, to their output shard (joined there with the drop decisions); on a runner that fuses stages
    (Dataflow, Flink, Spark) also once after reading, so the CPU-heavy rules spread across workers however few the
    input files (the direct runner spreads every stage's input across its workers itself);
  * exact dedup: (8-byte digest, order) per document;
  * near dedup: per document and band, (8-byte band key, order, num_perm bytes of b-bit signature); then the
    verified edges, whose connected components are found in one place (`dedup.components`: 16 bytes an edge).
"""

from __future__ import annotations

import collections
import hashlib
import json
from typing import Any, Iterable, Iterator

import apache_beam as beam
import numpy as np

from fmjax.curation import dedup, pii, quality, read

MAX_COMPARED = 16  # a candidate is verified against at most this many earlier members of its LSH bucket


class Tally(beam.CombineFn):
  """Sums dicts of counts; the empty tally is {}."""

  def create_accumulator(self) -> collections.Counter:
    return collections.Counter()

  def add_input(self, acc: collections.Counter, counts: dict[str, int]) -> collections.Counter:
    acc.update(counts)
    return acc

  def merge_accumulators(self, accs: Iterable[collections.Counter]) -> collections.Counter:
    out = collections.Counter()
    for acc in accs:
      out.update(acc)
    return out

  def extract_output(self, acc: collections.Counter) -> dict[str, int]:
    return dict(acc)


class Read(beam.DoFn):
  """input index -> (order, record) for each good record; tagged `bad` (order, error) and `stats` (dict)."""

  def __init__(self, inputs: list[str], field: str, tfds_data_dir: str):
    self.inputs, self.field, self.tfds_data_dir = inputs, field, tfds_data_dir

  def process(self, index: int) -> Iterator[Any]:
    source = read.Input(self.inputs[index], self.field, self.tfds_data_dir)
    for status, i, payload in source:
      if status == "ok":
        yield read.order(index, i), payload
      else:
        yield beam.pvalue.TaggedOutput("bad", (read.order(index, i), payload))
    yield beam.pvalue.TaggedOutput("stats", {"index": index, **source.stats()})


class Rules(beam.DoFn):
  """(order, record) -> (order, scrubbed record) if quality keeps it; tagged outputs for the later stages:
  `exact` (digest, order), `bands` (band key, (order, b-bit signature)), `tally` counts, `examples`."""

  def __init__(self, cfg: Any, report: Any):
    self.cfg, self.report = cfg, report

  def start_bundle(self) -> None:
    self.tally = collections.Counter()  # summed here and emitted once per bundle: one element, not one a document

  def finish_bundle(self) -> Iterator[Any]:
    from apache_beam.transforms import window
    from apache_beam.utils.windowed_value import WindowedValue

    yield beam.pvalue.TaggedOutput("tally", WindowedValue(dict(self.tally), window.GlobalWindow().max_timestamp(),
                                                          [window.GlobalWindow()]))

  def setup(self) -> None:
    cfg = self.cfg
    self.hasher = dedup.MinHasher(cfg.num_perm, cfg.shingle_size, cfg.seed) if cfg.near_dedup else None
    self.bands = dedup.Bands(cfg.near_dedup_threshold, cfg.num_perm, cfg.seed) if cfg.near_dedup else None
    self.ngram_rule = cfg.quality is not None and cfg.quality.max_repeated_ngram_ratio < 1.0

  def process(self, element: tuple[int, dict]) -> Iterator[Any]:
    order, record = element
    cfg = self.cfg
    text = record[cfg.field]
    norm = dedup.normalize(text)
    words = dedup.word_hashes(norm) if self.hasher is not None or self.ngram_rule else None
    tally = self.tally
    tally["input_docs"] += 1
    if cfg.quality is not None:
      rule = quality.check(text, cfg.quality, norm, words)
      if rule is not None:
        tally[f"dropped/{rule}"] += 1
        yield beam.pvalue.TaggedOutput("examples", (rule, (order, self.report.example(order, text))))
        return
    if cfg.pii:
      scrubbed, counts = pii.scrub(text)
      if counts:
        tally["docs_with_pii"] += 1
        tally.update({f"pii/{k}": v for k, v in counts.items()})
        yield beam.pvalue.TaggedOutput("examples", ("pii", (order, self.report.example(
            order, scrubbed, replacements=counts))))
        record, text = {**record, cfg.field: scrubbed}, scrubbed
        norm, words = dedup.normalize(text), None
    if cfg.exact_dedup:
      yield beam.pvalue.TaggedOutput("exact", (dedup.digest(norm), order))
    if self.hasher is not None:
      sig = self.hasher.signature(norm, words)
      low = self.bands.low_bits(sig)
      for key in self.bands.keys(sig):
        yield beam.pvalue.TaggedOutput("bands", (key, (order, low)))
    yield order, record


def exact_drops(element: tuple[int, Iterable[int]]) -> Iterator[tuple[int, tuple[str, dict]]]:
  """digest -> its documents' orders: every copy after the first is dropped, pointing at the first."""
  _, orders = element
  orders = sorted(orders)
  for o in orders[1:]:
    yield o, ("exact_duplicate", {"kept": orders[0]})


def candidate_edges(threshold: float):
  """band key -> members: (earlier, later, estimated Jaccard) for each verified pair, each later member compared
  with the first `MAX_COMPARED` members of the bucket (sorted by order)."""

  def edges(element: tuple[int, Iterable[tuple[int, bytes]]]) -> Iterator[tuple[int, int, float]]:
    members = sorted(element[1])
    if len(members) < 2:
      return
    orders = [o for o, _ in members]
    sigs = np.frombuffer(b"".join(low for _, low in members), np.uint8).reshape(len(members), -1)
    head = sigs[:MAX_COMPARED]
    chance = 1.0 / 256
    est = ((sigs[:, None, :] == head[None, :, :]).mean(axis=2) - chance) / (1.0 - chance)  # [members, head]
    for i in range(1, len(members)):
      for j in range(min(i, MAX_COMPARED)):
        if est[i, j] >= threshold:
          yield orders[j], orders[i], round(float(est[i, j]), 4)

  return edges


def near_drops(edges: list[tuple[int, int, float]]) -> Iterator[tuple[int, tuple[str, dict]]]:
  """All verified edges -> every document of a component but its first, pointing at the first, with the best
  estimated Jaccard among the document's edges."""
  if not edges:
    return
  arr = np.asarray(edges, np.float64)
  pairs = arr[:, :2].astype(np.int64)
  nodes, roots = dedup.components(pairs)
  best = np.zeros(len(nodes))
  for col in (0, 1):
    np.maximum.at(best, np.searchsorted(nodes, pairs[:, col]), arr[:, 2])
  for node, root, j in zip(nodes.tolist(), roots.tolist(), best.tolist()):
    if node != root:
      yield node, ("near_duplicate", {"kept": root, "jaccard": round(j, 3)})


def shard_of(order: int, num_shards: int) -> int:
  """A document's output shard: a fixed hash of its order."""
  return int(dedup.fmix64(np.asarray([order], np.uint64))[0] % np.uint64(num_shards))


class WriteShard(beam.DoFn):
  """shard -> {"docs": [(order, record)], "drops": [(order, (rule, info))]}: writes the kept records in input order
  to `{output}/curated-SSSSS-of-NNNNN.jsonl`; yields {"file", "records", "sha256"}; tagged `tally`, `examples`."""

  def __init__(self, output: str, num_shards: int, report: Any):
    self.output, self.num_shards, self.report = output, num_shards, report

  def process(self, element: tuple[int, dict[str, list]]) -> Iterator[Any]:
    from apache_beam.io.filesystems import FileSystems

    shard, groups = element
    drops: dict[int, tuple[str, dict]] = {}
    for o, (rule, info) in groups["drops"]:
      if o not in drops or rule == "exact_duplicate":  # an exact copy is reported as such even if also near
        drops[o] = (rule, info)
    name = f"curated-{shard:05d}-of-{self.num_shards:05d}.jsonl"
    path = FileSystems.join(self.output, name)
    h, kept, tally = hashlib.sha256(), 0, collections.Counter()
    with FileSystems.create(path + ".partial") as f:
      for o, record in sorted(groups["docs"], key=lambda d: d[0]):
        if o in drops:
          rule, info = drops[o]
          tally[f"dropped/{rule}"] += 1
          yield beam.pvalue.TaggedOutput("examples", (rule, (o, self.report.example(o, record[self.report.field],
                                                                                    **info))))
          continue
        line = (json.dumps({k: v for k, v in record.items() if k != read.WHERE}, ensure_ascii=False) + "\n").encode()
        f.write(line)
        h.update(line)
        kept += 1
    FileSystems.rename([path + ".partial"], [path])
    tally["kept_docs"] += kept
    yield beam.pvalue.TaggedOutput("tally", dict(tally))
    yield {"file": name, "records": kept, "sha256": h.hexdigest()}


class Curate(beam.PTransform):
  """inputs (a PCollection of input indices) -> written shards; `.tallies`, `.examples`, `.stats`, `.bad` are set
  by `expand` for the report."""

  def __init__(self, inputs: list[str], output: str, cfg: Any, report: Any, num_shards: int,
               tfds_data_dir: str = "", spread: bool = True):
    super().__init__()
    self.inputs, self.output, self.cfg, self.report = inputs, output, cfg, report
    self.num_shards, self.tfds_data_dir, self.spread = num_shards, tfds_data_dir, spread

  def expand(self, indices: beam.PCollection) -> beam.PCollection:
    cfg, report = self.cfg, self.report
    if self.spread:  # a runner that fuses stages would read and rule each file on one worker
      indices = indices | "Spread inputs" >> beam.Reshuffle()
    read_out = indices | "Read" >> beam.ParDo(Read(self.inputs, cfg.field, self.tfds_data_dir)).with_outputs(
        "bad", "stats", main="docs")
    docs = read_out.docs | "Spread docs" >> beam.Reshuffle() if self.spread else read_out.docs
    ruled = docs | "Rules" >> beam.ParDo(Rules(cfg, report)).with_outputs("exact", "bands", "tally", "examples",
                                                                           main="docs")
    drops = []
    if cfg.exact_dedup:
      drops.append(ruled.exact | "Group copies" >> beam.GroupByKey() | "Exact drops" >> beam.FlatMap(exact_drops))
    if cfg.near_dedup:
      edges = (ruled.bands | "Group bands" >> beam.GroupByKey()
               | "Verify" >> beam.FlatMap(candidate_edges(cfg.near_dedup_threshold))
               | "Unique edges" >> beam.Distinct())
      drops.append(edges | "All edges" >> beam.combiners.ToList() | "Components" >> beam.FlatMap(near_drops))
    p = indices.pipeline
    by_shard = {
        "shards": p | "Shard ids" >> beam.Create([(s, None) for s in range(self.num_shards)]),
        "docs": ruled.docs | "Docs by shard" >> beam.Map(lambda d, n: (shard_of(d[0], n), d), self.num_shards),
        "drops": ((drops or [p | "No drops" >> beam.Create([])]) | "All drops" >> beam.Flatten()
                  | "Drops by shard" >> beam.Map(lambda d, n: (shard_of(d[0], n), d), self.num_shards)),
    }
    written = (by_shard | "Join" >> beam.CoGroupByKey()
               | "Write" >> beam.ParDo(WriteShard(self.output, self.num_shards, report)).with_outputs(
                   "tally", "examples", main="files"))
    bad_tally = read_out.bad | "Bad tally" >> beam.Map(lambda _: {"input_docs": 1, "dropped/bad_record": 1})
    bad_examples = read_out.bad | "Bad examples" >> beam.Map(
        lambda b, r: ("bad_record", (b[0], r.example(b[0], None, error=b[1]))), report)
    self.tallies = ((ruled.tally, written.tally, bad_tally) | "Tallies" >> beam.Flatten()
                    | "Sum" >> beam.CombineGlobally(Tally()))
    self.examples = ((ruled.examples, written.examples, bad_examples) | "Examples" >> beam.Flatten()
                     | "First examples" >> beam.combiners.Top.SmallestPerKey(cfg.max_examples, key=_first))
    self.stats = read_out.stats | "Input stats" >> beam.combiners.ToList()
    self.bad = read_out.bad
    return written.files | "Files" >> beam.combiners.ToList()


def _first(item: tuple[int, dict]) -> int:
  return item[0]
