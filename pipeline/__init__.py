"""Offline preprocessing: raw interaction logs -> time-ordered per-user sequences in sharded Parquet."""
