//! The client side of the verbs of `vmsyncctl` that keep a connection open:
//! `events` and `status --watch`.

pub mod events;
pub mod watch;
