"""Data curation for pre-training and fine-tuning corpora on Apache Beam: quality filters, PII scrubbing, exact and
near (MinHash + LSH) deduplication, a per-rule report and a governance manifest. CLI: `tools/curate.py`."""

from __future__ import annotations

from fmjax.curation.dedup import Bands, MinHasher, components, digest, estimate_jaccard, lsh_params, normalize
from fmjax.curation.pii import PLACEHOLDERS, luhn_valid, scrub
from fmjax.curation.pipeline import CurationConfig, run
from fmjax.curation.quality import RULES, QualityConfig
from fmjax.curation.read import CurationError, list_inputs

__all__ = ["Bands", "CurationConfig", "CurationError", "MinHasher", "PLACEHOLDERS", "QualityConfig", "RULES",
           "components", "digest", "estimate_jaccard", "list_inputs", "luhn_valid", "lsh_params", "normalize", "run",
           "scrub"]
