//! Small value types carried inside messages.

use std::fmt;

use bytes::BytesMut;

use crate::codec::{wire_enum, FieldError, Reader, Wire};

wire_enum! {
    /// Which of the two connections between a pair of nodes this is.
    ///
    /// Like DRBD, a pair of nodes keeps two TCP connections so that small
    /// control messages (acks, barrier acks, pings) never queue behind
    /// megabytes of write data. The channel is bound into the handshake MAC,
    /// so a connection authenticated as one cannot be replayed as the other.
    pub enum Channel {
        /// Bulk traffic: writes, barriers, resync data, read replies, bitmaps.
        Data = 0,
        /// Control traffic: acks, barrier acks, state, pings.
        Meta = 1,
        /// Block reads from a node that holds the newest version
        /// (on-demand fetch and background sync after a machine switch):
        /// `ReadRequest` one way, `ReadReply`/`ReadSame`/`ReadError` back.
        /// Independent of the replication link and of both nodes' roles.
        Fetch = 2,
        /// A node and the directory server (either side may dial): the
        /// `Dir*` messages.
        Directory = 3,
    }
}

wire_enum! {
    /// A node's role for the resource.
    pub enum Role {
        /// Mirrors writes; does not expose the device.
        Secondary = 0,
        /// Exposes the device and originates every write.
        Primary = 1,
    }
}

wire_enum! {
    /// How trustworthy a node's local copy is (DRBD's disk states, reduced to
    /// the ones a peer needs to know).
    pub enum DiskState {
        /// No local storage attached.
        Diskless = 0,
        /// Mid-resync or never synced: some blocks are garbage; the node's
        /// staleness bitmap says which.
        Inconsistent = 1,
        /// Consistent but known to miss writes of a newer term.
        Outdated = 2,
        /// Consistent; whether it is the newest is not known yet (e.g. just
        /// started, no peer or directory reached).
        Consistent = 3,
        /// Consistent and holds the newest data.
        UpToDate = 4,
        /// The backing device returned an I/O error: the node stopped
        /// using it (DRBD's `on-io-error detach`) until its daemon is
        /// restarted. Last, so older values keep their tags.
        Failed = 5,
    }
}

/// Data-generation identifiers, as in DRBD: random ids naming the history of
/// the data a node holds, so that two nodes that meet can tell "same data",
/// "you are behind me by my bitmap" or "we diverged" (split brain) and never
/// resync in the wrong direction. Zero means "none".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct GenerationIds {
    /// Id of the data generation currently held.
    pub current: u64,
    /// Id of the generation at which the node started tracking changes in
    /// its bitmap (a peer whose `current` equals this is behind by exactly
    /// that bitmap).
    pub bitmap: u64,
    /// Older generations, newest first.
    pub history: [u64; 2],
}

impl Wire for GenerationIds {
    fn put(&self, out: &mut BytesMut) {
        self.current.put(out);
        self.bitmap.put(out);
        self.history.iter().for_each(|h| h.put(out));
    }

    fn get(r: &mut Reader) -> Result<Self, FieldError> {
        Ok(Self {
            current: u64::get(r)?,
            bitmap: u64::get(r)?,
            history: [u64::get(r)?, u64::get(r)?],
        })
    }

    fn fmt_debug(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:016x}/{:016x}/{:016x}/{:016x}",
            self.current, self.bitmap, self.history[0], self.history[1]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn enum_tags_round_trip_and_unknown_tags_fail() {
        for &c in Channel::ALL {
            assert_eq!(Channel::from_tag(c.tag()), Some(c));
        }
        for &r in Role::ALL {
            assert_eq!(Role::from_tag(r.tag()), Some(r));
        }
        for &d in DiskState::ALL {
            assert_eq!(DiskState::from_tag(d.tag()), Some(d));
        }
        let err = DiskState::get(&mut Reader::new(Bytes::from_static(&[9]))).unwrap_err();
        assert_eq!(err, FieldError::Invalid("unknown DiskState tag 9".into()));
    }

    #[test]
    fn generation_ids_round_trip() {
        let g = GenerationIds {
            current: 1,
            bitmap: 2,
            history: [3, u64::MAX],
        };
        let mut out = BytesMut::new();
        g.put(&mut out);
        assert_eq!(out.len(), 32);
        assert_eq!(GenerationIds::get(&mut Reader::new(out.freeze())), Ok(g));
    }
}
