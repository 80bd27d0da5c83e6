//! TCP and TLS clients in the worker loop (RFC 8656 §5, RFC 8489 §6.2).
//!
//! A listener's readiness accepts connections (within the relay-wide caps); a connection's
//! readiness reads what it holds, frames it into messages and hands each to the core, whose
//! answers and relayed data for the client are queued on the connection and written at the
//! worker's flush. A connection that cannot write everything asks epoll for writability until
//! its queue is empty. Deadlines (TLS handshake and first message, idle without allocation,
//! a client that stopped reading) are checked by a sweep once a second.
//!
//! Closing a connection ends its allocation (RFC 8656 §5) through the core, which removes its
//! routes and relay sockets with the usual commands.

use std::{
    io,
    net::{SocketAddr, TcpListener},
    os::fd::AsRawFd,
    sync::Arc,
    time::{Duration, Instant},
};

use rustls::ServerConnection;
use tracing::{debug, warn};

use super::{Entry, Io, Role, Sockets, Worker, WorkerSnapshot};
use crate::{
    daemon::{
        connection::{CloseReason, Connection, ReadOutcome},
        connection_limits::ConnectionLimits,
        tls::TlsCertificates,
    },
    proto::{server::Forward, Transport},
};

/// How often connection deadlines are checked.
pub(super) const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// How long a client may keep its send queue full (not reading) before it is closed.
const STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections accepted per listener per wake, so a connection flood cannot starve the
/// worker's other sockets.
const ACCEPT_BATCH: usize = 64;
/// Read rounds per connection per wake (each up to the connection's read budget).
const READ_ROUNDS: usize = 4;
/// Transmits queued from stream input before a flush (each owns a copy of its payload).
const MAX_QUEUED_FROM_STREAMS: usize = 1024;
/// STUN's magic cookie (RFC 8489 §5), bytes 4-7 of every STUN message.
const MAGIC_COOKIE: [u8; 4] = 0x2112_A442u32.to_be_bytes();

/// What the worker needs to serve TCP and TLS clients.
#[derive(Clone, Debug)]
pub struct StreamEnv {
    /// The TLS listeners' certificate (`None` without TLS listeners).
    pub tls: Option<Arc<TlsCertificates>>,
    /// Relay-wide connection caps.
    pub limits: Arc<ConnectionLimits>,
    /// For the TLS handshake and the first complete STUN message.
    pub handshake_timeout: Duration,
    /// For a connection without an allocation.
    pub idle_timeout: Duration,
}

/// Queues one message for stream client `key` on its connection (dropped if it is gone or its
/// queue is full). A free function over the worker's fields, so callers can lend the bytes
/// from another of its fields (the receive arena).
pub(super) fn queue_on(
    sockets: &mut Sockets,
    streams: &std::collections::HashMap<(SocketAddr, SocketAddr, Transport), u64>,
    dirty: &mut Vec<u64>,
    drops: &mut u64,
    key: (SocketAddr, SocketAddr, Transport),
    parts: &[&[u8]],
) {
    let Some(&token) = streams.get(&key) else {
        debug!(client = %key.0, "connection closed; message dropped");
        return;
    };
    let Some(connection) = sockets.stream_mut(token) else {
        return;
    };
    if !connection.queue(parts) {
        *drops += 1;
        return;
    }
    if !connection.dirty {
        connection.dirty = true;
        dirty.push(token);
    }
}

impl Worker {
    /// Starts accepting TCP (or, with `transport` TLS, TLS) clients on a bound listener.
    pub fn add_stream_listener(
        &mut self,
        listener: TcpListener,
        transport: Transport,
    ) -> io::Result<()> {
        if transport == Transport::Tls && self.stream_env.tls.is_none() {
            return Err(io::Error::other("a TLS listener needs a certificate"));
        }
        let fd = listener.as_raw_fd();
        let token = self
            .sockets
            .insert(Io::Listener(listener), Role::StreamListener { transport });
        if let Err(error) = self.epoll.get_ref().add(fd, token) {
            self.sockets.remove(token);
            return Err(error);
        }
        Ok(())
    }

    /// Accepts the connections waiting on listener `token`, within the caps.
    pub(super) fn accept(&mut self, token: u64, transport: Transport, now: Instant) {
        for _ in 0..ACCEPT_BATCH {
            let accepted = match self.sockets.get(token).map(|e| &e.socket) {
                Some(Io::Listener(listener)) => listener.accept(),
                _ => return,
            };
            let (stream, client) = match accepted {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::ECONNABORTED | libc::EPERM)) => {
                    continue
                }
                Err(error) => {
                    // EMFILE/ENFILE/ENOBUFS: the connection stays queued and the listener
                    // readable, so a level-triggered listener would spin the worker. It leaves
                    // epoll until the next sweep (a second); the worker's other sockets,
                    // timers and connections carry on meanwhile.
                    warn!(%error, %transport, "accept failed; the listener pauses for a second");
                    self.pause_listener(token);
                    return;
                }
            };
            let slot = match self.stream_env.limits.try_acquire(client.ip()) {
                Ok(slot) => slot,
                Err(refused) => {
                    debug!(%client, ?refused, %transport, "connection refused: over the cap");
                    continue;
                }
            };
            let local = match stream.local_addr() {
                Ok(local) => local,
                Err(_) => continue,
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            // Small messages (responses, ChannelData) must not wait for Nagle.
            let _ = stream.set_nodelay(true);
            let tls = match (transport, &self.stream_env.tls) {
                (Transport::Tls, Some(certificates)) => {
                    match ServerConnection::new(certificates.current()) {
                        Ok(tls) => Some(tls),
                        Err(error) => {
                            warn!(%error, "TLS session setup failed; connection dropped");
                            continue;
                        }
                    }
                }
                _ => None,
            };
            let connection = Connection::new(stream, client, local, tls, slot, now);
            let fd = connection.stream().as_raw_fd();
            let token = self
                .sockets
                .insert(Io::Stream(Box::new(connection)), Role::Stream);
            if let Err(error) = self.epoll.get_ref().add(fd, token) {
                warn!(%error, "cannot watch a connection; dropped");
                self.sockets.remove(token);
                continue;
            }
            debug!(%client, %local, %transport, "connection accepted");
            if let Some(old) = self.streams.insert((client, local, transport), token) {
                // The kernel never hands out a 4-tuple that is still open; an entry left
                // behind would be a bug, and the new connection wins.
                warn!(%client, "connection replaced an entry for the same 5-tuple");
                self.close_stream(old, CloseReason::Error);
                self.streams.insert((client, local, transport), token);
            }
        }
    }

    /// Connection `token` is ready: write pending output if it is writable, read and handle
    /// every whole message it holds.
    pub(super) fn stream_ready(&mut self, token: u64, writable: bool, now: Instant) {
        if writable {
            self.flush_stream(token);
        }
        for _ in 0..READ_ROUNDS {
            let Some(connection) = self.sockets.stream_mut(token) else {
                return;
            };
            let read = connection.read();
            // Take the input out, so each message can be handed to the core while the
            // worker's other state is borrowed mutably.
            let has_output = connection.has_output();
            if has_output && !connection.dirty {
                // TLS handshake records to answer.
                connection.dirty = true;
                self.dirty_streams.push(token);
            }
            if let Err(reason) = self.stream_messages(token, now) {
                self.close_stream(token, reason);
                return;
            }
            match read {
                ReadOutcome::Drained => return,
                ReadOutcome::More => {}
                ReadOutcome::Closed(reason) => {
                    self.close_stream(token, reason);
                    return;
                }
            }
        }
        // Fair turns: the rest in the next round.
        self.unfinished_streams.push(token);
    }

    /// Hands every whole message of connection `token`'s input to the core.
    fn stream_messages(&mut self, token: u64, now: Instant) -> Result<(), CloseReason> {
        loop {
            let Some(connection) = self.sockets.stream_mut(token) else {
                return Ok(());
            };
            let Some(range) = connection.next_message()? else {
                connection.release_input();
                return Ok(());
            };
            let (client, local, transport) =
                (connection.client, connection.local, connection.transport);
            // The handshake deadline ends with real STUN (the magic cookie, RFC 8489 §5), not
            // with any 20 bytes that frame as STUN.
            let stun = |m: &[u8]| m.len() >= 20 && m[0] >> 6 == 0 && m[4..8] == MAGIC_COOKIE;
            if connection.first_stun.is_none() && stun(&connection.input()[range.clone()]) {
                connection.first_stun = Some(now);
            }
            let message = &connection.input()[range];
            let forward = self
                .server
                .handle_client_message(client, local, transport, message, now);
            // ChannelData to a peer: the payload is copied out of the connection's input
            // (which the next read reuses) into the send queue.
            let to_peer = match forward {
                Some(Forward::ToPeer {
                    relayed,
                    peer,
                    payload,
                }) => message
                    .get(payload)
                    .map(|bytes| (relayed, peer, bytes.to_vec())),
                _ => None,
            };
            if let Some((relayed, peer, bytes)) = to_peer {
                if let Some(&relay) = self.relays.get(&relayed) {
                    self.count(relay, true, bytes.len());
                    self.sends.push_owned(relay, peer, None, bytes);
                }
            }
            self.drain_commands(None);
            // Relayed datagrams from streams are copies: bounded per round like the arena
            // bounds the UDP path's.
            if self.sends.len() >= MAX_QUEUED_FROM_STREAMS {
                self.flush();
            }
        }
    }

    /// Writes what connection `token` has queued; watches writability while some is left.
    fn flush_stream(&mut self, token: u64) {
        let Some(connection) = self.sockets.stream_mut(token) else {
            return;
        };
        connection.dirty = false;
        let done = match connection.flush() {
            Ok(done) => done,
            Err(reason) => return self.close_stream(token, reason),
        };
        if done != connection.watching_writable {
            return;
        }
        // All written and still watching, or some left and not watching yet.
        connection.watching_writable = !done;
        let fd = connection.stream().as_raw_fd();
        if let Err(error) = self.epoll.get_ref().watch(fd, token, !done) {
            warn!(%error, "cannot watch a connection's writability; closed");
            self.close_stream(token, CloseReason::Error);
        }
    }

    /// Flushes every connection that got output since the last flush.
    pub(super) fn flush_streams(&mut self) {
        while let Some(token) = self.dirty_streams.pop() {
            self.flush_stream(token);
        }
    }

    /// Closes connection `token` and ends its allocation (RFC 8656 §5).
    pub(super) fn close_stream(&mut self, token: u64, reason: CloseReason) {
        let Some(entry) = self.sockets.remove(token) else {
            return;
        };
        let Io::Stream(mut connection) = entry.socket else {
            return;
        };
        self.epoll.get_ref().remove(connection.stream().as_raw_fd());
        let key = (connection.client, connection.local, connection.transport);
        if self.streams.get(&key) == Some(&token) {
            self.streams.remove(&key);
        }
        match reason {
            // A client that half-closed after its last request still gets the answers already
            // queued (RFC 8489 §6.2.1: no close with a request unanswered), as far as the
            // socket takes them now.
            CloseReason::Client => {
                let _ = connection.flush();
            }
            CloseReason::Error => {}
            _ => connection.close_notify(),
        }
        *self
            .streams_closed
            .entry((connection.transport.label(), reason.label()))
            .or_insert(0) += 1;
        debug!(
            client = %connection.client,
            transport = %connection.transport,
            reason = reason.label(),
            dropped = connection.dropped,
            "connection closed"
        );
        drop(connection);
        self.server.connection_closed(key.0, key.1, key.2);
        self.drain_commands(None);
    }

    /// Closes the connections past a deadline: no handshake and first message in time, idle
    /// without an allocation, or not reading what is sent to them.
    pub(super) fn sweep_streams(&mut self, now: Instant) {
        self.resume_listeners();
        let env = &self.stream_env;
        let mut expired = Vec::new();
        for &token in self.streams.values() {
            let Some(Entry {
                socket: Io::Stream(c),
                ..
            }) = self.sockets.get_mut(token)
            else {
                continue;
            };
            if self.server.has_allocation(c.client, c.local, c.transport) {
                c.last_allocated = Some(now);
            }
            let since = |at: Instant| now.saturating_duration_since(at);
            // Idle counts from the last moment with an allocation, or from the connect:
            // messages alone (Bindings, garbage that frames) do not hold a connection slot.
            let idle_since = c.last_allocated.unwrap_or(c.opened).max(c.opened);
            let reason = if c.first_stun.is_none() && since(c.opened) >= env.handshake_timeout {
                Some(CloseReason::HandshakeTimeout)
            } else if c.has_output() && since(c.last_progress) >= STALL_TIMEOUT {
                Some(CloseReason::Stalled)
            } else if since(idle_since) >= env.idle_timeout {
                Some(CloseReason::Idle)
            } else {
                None
            };
            if let Some(reason) = reason {
                expired.push((token, reason));
            }
        }
        for (token, reason) in expired {
            self.close_stream(token, reason);
        }
    }

    /// Takes listener `token` out of epoll (accept keeps failing); the next sweep puts it back.
    fn pause_listener(&mut self, token: u64) {
        if let Some(entry) = self.sockets.get(token) {
            self.epoll.get_ref().remove(entry.socket.raw_fd());
            self.paused_listeners.push(token);
        }
    }

    /// Puts paused listeners back into epoll.
    fn resume_listeners(&mut self) {
        for token in std::mem::take(&mut self.paused_listeners) {
            if let Some(entry) = self.sockets.get(token) {
                if let Err(error) = self.epoll.get_ref().add(entry.socket.raw_fd(), token) {
                    warn!(%error, "cannot resume a TCP/TLS listener; retrying");
                    self.paused_listeners.push(token);
                }
            }
        }
    }

    /// Closes every connection (the relay is stopping).
    pub(super) fn close_streams(&mut self) {
        let tokens: Vec<u64> = self.streams.values().copied().collect();
        for token in tokens {
            self.close_stream(token, CloseReason::Shutdown);
        }
        self.flush();
    }

    /// Connection counts and buffers for metrics.
    pub(super) fn stream_snapshot(&self, snapshot: &mut WorkerSnapshot) {
        for &token in self.streams.values() {
            if let Some(Io::Stream(c)) = self.sockets.get(token).map(|e| &e.socket) {
                *snapshot.connections.entry(c.transport.label()).or_insert(0) += 1;
                snapshot.stream_buffered_bytes += c.buffered() as u64;
            }
        }
    }
}
