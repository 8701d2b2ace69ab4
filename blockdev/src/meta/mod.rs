//! On-disk metadata (being written).
