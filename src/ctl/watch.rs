//! `vmsyncctl status --watch`: a live view of one node, redrawn every
//! interval, with a progress bar for each resync, the background sync of a
//! machine switch and a running verify (drawn by `indicatif`).
//!
//! When stdout is not a terminal nothing is drawn; one plain status line
//! per interval is printed instead, for logs.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::control::{self, PeerStatus, Request, Status};

/// Redraws until the daemon goes away (an error) or the user interrupts.
pub async fn watch(socket: &Path, interval: Duration) -> Result<(), String> {
    let mut view = View::new(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    loop {
        let status = fetch(socket).await?;
        view.show(&status);
        tokio::time::sleep(interval).await;
    }
}

async fn fetch(socket: &Path) -> Result<Status, String> {
    let response = control::call(socket, &Request::Status)
        .await
        .map_err(|e| format!("cannot reach the daemon at {}: {e}", socket.display()))?;
    match (response.ok, response.status) {
        (true, Some(status)) => Ok(status),
        _ => Err(response.error.unwrap_or_else(|| "no status".into())),
    }
}

/// Where a piece of long work started, so that its bar shows the work of
/// this run (the daemon reports totals since it started).
struct Run {
    done_at_start: u64,
}

struct View {
    terminal: bool,
    bars: MultiProgress,
    header: ProgressBar,
    /// One line per peer, then the background sync, then verify.
    lines: HashMap<String, (ProgressBar, Option<Run>)>,
    order: Vec<String>,
}

impl View {
    fn new(terminal: bool) -> Self {
        let bars = MultiProgress::with_draw_target(if terminal {
            ProgressDrawTarget::stdout()
        } else {
            ProgressDrawTarget::hidden()
        });
        let header = bars.add(ProgressBar::new(0).with_style(plain_style()));
        View {
            terminal,
            bars,
            header,
            lines: HashMap::new(),
            order: Vec::new(),
        }
    }

    fn show(&mut self, status: &Status) {
        let summary = summary(status);
        if !self.terminal {
            println!("{summary}");
            return;
        }
        self.header.set_message(summary);
        for peer in &status.peers {
            let (work, done, remaining) = peer_work(peer);
            self.update(
                &format!("peer {}", peer.name),
                &peer_label(peer),
                work.then_some((done, remaining)),
            );
        }
        let sync = &status.sync;
        self.update(
            "sync",
            &format!("sync: {}", sync.state),
            (sync.state == "syncing").then_some((sync.fetched_bytes, sync.stale_bytes)),
        );
        let verify = &status.verify;
        let verify_work = (verify.state == "running").then_some((
            verify.bytes_done,
            verify.total_bytes.saturating_sub(verify.bytes_done),
        ));
        self.update(
            "verify",
            &format!(
                "verify: {}{}",
                verify.state,
                if verify.differing_blocks > 0 {
                    format!(" ({} blocks differ)", verify.differing_blocks)
                } else {
                    String::new()
                }
            ),
            verify_work,
        );
    }

    /// Sets one line: a bar while `work` (bytes done since the daemon
    /// started, bytes remaining) is under way, else just the label.
    fn update(&mut self, key: &str, label: &str, work: Option<(u64, u64)>) {
        if !self.lines.contains_key(key) {
            let bar = self.bars.add(ProgressBar::new(0).with_style(plain_style()));
            self.lines.insert(key.to_string(), (bar, None));
            self.order.push(key.to_string());
        }
        let (bar, run) = self.lines.get_mut(key).expect("inserted above");
        bar.set_message(label.to_string());
        match work {
            Some((done_total, remaining)) => {
                if run.is_none() {
                    *run = Some(Run {
                        done_at_start: done_total,
                    });
                    bar.reset();
                    bar.set_style(bar_style());
                }
                let done = done_total.saturating_sub(run.as_ref().map_or(0, |r| r.done_at_start));
                bar.set_length(done + remaining);
                bar.set_position(done);
            }
            None => {
                if run.take().is_some() {
                    bar.set_style(plain_style());
                }
                bar.tick();
            }
        }
    }
}

fn plain_style() -> ProgressStyle {
    ProgressStyle::with_template("{msg}").expect("a valid template")
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{msg:32} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
    )
    .expect("a valid template")
    .progress_chars("=> ")
}

/// The first line: who this node is and what it serves.
fn summary(s: &Status) -> String {
    let mut line = format!(
        "{} on {}: {} (term {}), disk {}, device {}",
        s.resource,
        s.node,
        s.role,
        s.term,
        s.disk,
        s.device.as_deref().unwrap_or("none")
    );
    if s.fenced {
        line.push_str(", FENCED");
    }
    for peer in &s.peers {
        line.push_str(&format!("; {} {}", peer.name, peer.state));
        if peer.stale_bytes > 0 {
            line.push_str(&format!(" ({} stale)", human_bytes(peer.stale_bytes)));
        }
    }
    line
}

fn peer_label(p: &PeerStatus) -> String {
    let mut label = format!("{} ({}): {}", p.name, p.link, p.state);
    if !p.connected && p.state != "disconnected" {
        label.push_str(", not connected");
    }
    if p.disconnected_by_operator {
        label.push_str(", taken down");
    }
    if let Some(e) = &p.last_error {
        label.push_str(&format!(" — {e}"));
    }
    label
}

/// Whether a bar is due for this peer, and its (done since the daemon
/// started, remaining) bytes: a resync, or a WAN peer's lazy push.
fn peer_work(p: &PeerStatus) -> (bool, u64, u64) {
    match &p.wan {
        Some(wan) if wan.stale_bytes > 0 => (true, wan.pushed_wire_bytes, wan.stale_bytes),
        _ => (p.state == "resyncing", p.resynced_bytes, p.stale_bytes),
    }
}

fn human_bytes(bytes: u64) -> String {
    indicatif::BinaryBytes(bytes).to_string()
}
