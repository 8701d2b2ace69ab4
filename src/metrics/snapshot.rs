//! The metrics read from the node's status at scrape time.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Metric, Registry};
use std::any::Any;
use std::collections::HashMap;

use crate::control::Status;

type Labels = Vec<(&'static str, String)>;

/// Every state a peer entry can show (`status` spells them so).
const PEER_STATES: [&str; 9] = [
    "disconnected",
    "connected",
    "resyncing",
    "up-to-date",
    "behind",
    "failed",
    "primary",
    "secondary",
    "connecting",
];
const ROLES: [&str; 3] = ["primary", "secondary", "standalone"];
const DISK_STATES: [&str; 6] = [
    "diskless",
    "inconsistent",
    "outdated",
    "consistent",
    "up-to-date",
    "failed",
];

/// Adds the status-derived metrics to a scrape's registry.
pub fn register(registry: &mut Registry, status: &Status) {
    let mut add = Builder {
        registry,
        families: HashMap::new(),
    };
    add.gauge(
        "vmsync_info",
        "Always 1; labels name the resource and node",
        vec![
            ("resource", status.resource.clone()),
            ("node", status.node.clone()),
        ],
        1,
    );
    add.one_of(
        "vmsync_role",
        "1 for this node's role",
        "role",
        &ROLES,
        &status.role,
        vec![],
    );
    add.one_of(
        "vmsync_disk_state",
        "1 for this replica's disk state",
        "state",
        &DISK_STATES,
        &status.disk,
        vec![],
    );
    add.gauge(
        "vmsync_term",
        "The newest term this node knows",
        vec![],
        status.term as i64,
    );
    add.gauge(
        "vmsync_fenced",
        "1 while writes are refused because another node was made primary",
        vec![],
        i64::from(status.fenced),
    );
    add.gauge(
        "vmsync_device_exposed",
        "1 while the device (/dev/ublkbN or the block socket) is served",
        vec![],
        i64::from(status.device.is_some()),
    );
    for peer in &status.peers {
        let who = || vec![("peer", peer.name.clone())];
        add.gauge(
            "vmsync_peer_connected",
            "1 while the link to the peer is up",
            who(),
            i64::from(peer.connected),
        );
        add.one_of(
            "vmsync_peer_state",
            "1 for the peer's replication state",
            "state",
            &PEER_STATES,
            &peer.state,
            who(),
        );
        add.gauge(
            "vmsync_peer_stale_bytes",
            "Bytes the peer lacks",
            who(),
            peer.stale_bytes as i64,
        );
        add.gauge(
            "vmsync_peer_send_queue_bytes",
            "Bytes queued for the peer and not yet handed to its socket",
            who(),
            peer.send_queue_bytes as i64,
        );
        add.counter(
            "vmsync_peer_replicated_bytes",
            "Guest write bytes mirrored to the peer as they happened",
            who(),
            peer.replicated_bytes,
        );
        add.counter(
            "vmsync_peer_shared_record_bytes",
            "Bytes sent to the peer in records sealed once for every peer",
            who(),
            peer.shared_record_bytes,
        );
        add.counter(
            "vmsync_peer_zero_copy_bytes",
            "Bytes the data connection handed to the kernel zero-copy",
            who(),
            peer.zero_copy_bytes,
        );
        add.counter(
            "vmsync_peer_resynced_bytes",
            "Bytes resent to the peer by resync",
            who(),
            peer.resynced_bytes,
        );
        if let Some(wan) = &peer.wan {
            add.counter(
                "vmsync_peer_wan_pushed_bytes",
                "Bytes the lazy WAN push put on the wire",
                who(),
                wan.pushed_wire_bytes,
            );
            for (by, bytes) in [
                ("hash", wan.saved_by_hash_bytes),
                ("compression", wan.saved_by_compression_bytes),
            ] {
                let mut labels = who();
                labels.push(("by", by.to_string()));
                add.counter(
                    "vmsync_peer_wan_saved_bytes",
                    "Bytes the WAN push kept off the wire",
                    labels,
                    bytes,
                );
            }
        }
    }
    let sync = &status.sync;
    add.gauge(
        "vmsync_sync_stale_bytes",
        "Bytes this node lacks after a machine switch",
        vec![],
        sync.stale_bytes as i64,
    );
    add.counter(
        "vmsync_fetched_bytes",
        "Bytes fetched from other nodes since the promotion (on demand and background)",
        vec![],
        sync.fetched_bytes,
    );
    add.counter(
        "vmsync_on_demand_fetches",
        "Guest requests that waited for a fetch",
        vec![],
        sync.on_demand_fetches,
    );
}

/// Registers one-sample metrics (a fresh registry per scrape, so every
/// name is registered once, as a family, on first use).
struct Builder<'r> {
    registry: &'r mut Registry,
    families: HashMap<&'static str, Box<dyn Any>>,
}

impl Builder<'_> {
    fn gauge(&mut self, name: &'static str, help: &str, labels: Labels, value: i64) {
        let family = self.family::<Gauge>(name, help);
        family.get_or_create(&labels).set(value);
    }

    fn counter(&mut self, name: &'static str, help: &str, labels: Labels, value: u64) {
        let family = self.family::<Counter>(name, help);
        family.get_or_create(&labels).inc_by(value);
    }

    /// An enum as one 0/1 series per value (the Prometheus idiom).
    fn one_of(
        &mut self,
        name: &'static str,
        help: &str,
        key: &'static str,
        values: &[&str],
        current: &str,
        labels: Labels,
    ) {
        let family = self.family::<Gauge>(name, help);
        for value in values {
            let mut series = labels.clone();
            series.push((key, value.to_string()));
            family
                .get_or_create(&series)
                .set(i64::from(*value == current));
        }
    }

    /// The family of `name`, registered on first use.
    fn family<M>(&mut self, name: &'static str, help: &str) -> Family<Labels, M>
    where
        M: Default + 'static,
        Family<Labels, M>: Metric + Clone,
    {
        if let Some(family) = self.families.get(name) {
            return family
                .downcast_ref::<Family<Labels, M>>()
                .expect("one metric type per name")
                .clone();
        }
        let family = Family::<Labels, M>::default();
        self.registry.register(name, help, family.clone());
        self.families.insert(name, Box::new(family.clone()));
        family
    }
}
