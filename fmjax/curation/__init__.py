"""Streaming data curation for pre-training and fine-tuning corpora: quality filters, PII scrubbing, exact and
near (MinHash + LSH) deduplication, with a per-rule report. NumPy only (no JAX); CLI: `tools/curate.py`."""

from __future__ import annotations

from fmjax.curation.dedup import ExactDeduper, MinHasher, NearDeduper, estimate_jaccard, lsh_params, normalize
from fmjax.curation.pii import PLACEHOLDERS, luhn_valid, scrub
from fmjax.curation.pipeline import (CurationConfig, CurationError, Curator, Report, curate, input_files,
                                     read_records)
from fmjax.curation.quality import RULES, QualityConfig

__all__ = ["CurationConfig", "CurationError", "Curator", "ExactDeduper", "MinHasher", "NearDeduper", "PLACEHOLDERS",
           "QualityConfig", "RULES", "Report", "curate", "estimate_jaccard", "input_files", "luhn_valid",
           "lsh_params", "normalize", "read_records", "scrub"]
