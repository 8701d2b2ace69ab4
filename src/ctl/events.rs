//! `vmsyncctl events [--json] [--now]`: prints the daemon's state changes
//! one line each (see [`crate::events`]) until the daemon stops or the
//! user interrupts.

use std::io::Write;
use std::path::Path;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::control::{Request, Response};
use crate::events::{Event, EventKind};

/// How `events` prints each event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `change peer:b state=resyncing`.
    Text,
    /// One JSON object per line, as the daemon sends it.
    Json,
}

/// Subscribes at `socket` and writes every event to `out`. Returns when the
/// stream ends: after the present state with `now`, or when the daemon
/// stops.
pub async fn follow(
    socket: &Path,
    now: bool,
    format: Format,
    out: &mut impl Write,
) -> Result<(), String> {
    let reach = |e: std::io::Error| format!("cannot reach the daemon at {}: {e}", socket.display());
    let stream = UnixStream::connect(socket).await.map_err(reach)?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(&Request::Events { now }).map_err(|e| e.to_string())?;
    line.push(b'\n');
    // The write half stays open: the daemon takes its end as "client gone".
    write.write_all(&line).await.map_err(reach)?;
    let mut lines = BufReader::new(read).lines();
    let first = lines
        .next_line()
        .await
        .map_err(reach)?
        .ok_or_else(|| "the daemon closed the connection without an answer".to_string())?;
    let response: Response = serde_json::from_str(&first)
        .map_err(|e| format!("unreadable reply from the daemon: {e}"))?;
    if !response.ok {
        return Err(response.error.unwrap_or_else(|| "request refused".into()));
    }
    while let Some(line) = lines.next_line().await.map_err(reach)? {
        let event: Event = serde_json::from_str(&line)
            .map_err(|e| format!("unreadable event from the daemon: {e}: {line}"))?;
        let printed = match format {
            Format::Json => writeln!(out, "{line}"),
            Format::Text => writeln!(out, "{}", event.to_line()),
        };
        // A closed pipe (`vmsyncctl events | head`) ends the stream quietly.
        if printed.and_then(|()| out.flush()).is_err() || event.kind == EventKind::Destroy {
            break;
        }
    }
    Ok(())
}
