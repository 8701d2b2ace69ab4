//! vmsync wire protocol (being written).
