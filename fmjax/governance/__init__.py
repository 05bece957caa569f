"""Governance: manifests of data outputs, the lineage of training runs, model cards."""
