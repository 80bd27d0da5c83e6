//! One TCP or TLS client connection: its socket, TLS session, and bounded input and output.
//!
//! Non-blocking throughout; the worker's epoll says when to read or write. Input is framed
//! into messages ([`crate::net::framing`]) and handed to the core one by one; output is whole
//! messages appended to a bounded queue: a message that does not fit is dropped (UDP
//! semantics: relayed data may be lost), and a client that keeps the queue full is closed by
//! the worker's sweep. Nothing a client does makes a connection hold more than
//! [`MAX_INPUT`] + [`MAX_OUTPUT`] bytes of its own (plus rustls' record buffers).

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    ops::Range,
    time::Instant,
};

use rustls::ServerConnection;

use super::connection_limits::ConnectionSlot;
use crate::{
    net::framing::{next_frame, stream_padding, FramingError, MAX_STREAM_MESSAGE},
    proto::Transport,
};

/// Bytes read per read call.
const READ_CHUNK: usize = 16 * 1024;
/// Input buffered: one whole message plus a read's worth.
const MAX_INPUT: usize = MAX_STREAM_MESSAGE + READ_CHUNK;
/// Output queued for a client that reads slowly: 256 KiB, about 2,000 relayed 120-byte
/// packets, over 1 s of a video call.
pub const MAX_OUTPUT: usize = 256 * 1024;
/// Bytes read per connection per wake, so one fast sender cannot starve the worker's others.
const READ_BUDGET: usize = 256 * 1024;
/// Buffer capacity a connection keeps between reads; beyond it an empty buffer is freed.
const IDLE_BUFFER: usize = 2048;

/// What a [`Connection::read`] left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadOutcome {
    /// The socket has nothing more now.
    Drained,
    /// The input or the budget filled up first: frame, then read again.
    More,
    /// The connection ended (after the input read so far).
    Closed(CloseReason),
}

/// Why a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed it (or reset it).
    Client,
    /// A read or write failed.
    Error,
    /// The TLS layer refused the client's records.
    Tls,
    /// The stream is not TURN, or a message is too large.
    Framing(FramingError),
    /// No TLS handshake and first STUN message in time.
    HandshakeTimeout,
    /// No allocation and nothing received for the idle timeout.
    Idle,
    /// The client stopped reading: its queue stayed full.
    Stalled,
    /// The relay is stopping.
    Shutdown,
    /// The operator ended its allocation (`relay ctl disconnect`).
    Disconnected,
}

impl CloseReason {
    /// A short name for logs and metrics labels.
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::Client => "client",
            CloseReason::Error => "error",
            CloseReason::Tls => "tls",
            CloseReason::Framing(error) => error.label(),
            CloseReason::HandshakeTimeout => "handshake_timeout",
            CloseReason::Idle => "idle",
            CloseReason::Stalled => "stalled",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Disconnected => "disconnected",
        }
    }
}

pub struct Connection {
    stream: TcpStream,
    pub client: SocketAddr,
    /// The server address the client connected to (its listener; a specific address even
    /// on a wildcard listener).
    pub local: SocketAddr,
    pub transport: Transport,
    tls: Option<Box<ServerConnection>>,
    /// Received plaintext not yet framed, from `input_start`.
    input: Vec<u8>,
    input_start: usize,
    /// Queued plaintext not yet written (or handed to rustls), from `output_start`.
    output: Vec<u8>,
    output_start: usize,
    /// On TLS: where each queued message ends in `output`. Each message goes into a TLS
    /// record of its own, as coturn writes them: clients such as coturn's turnutils_uclient
    /// read one message per record and lose the rest of a record holding several.
    message_ends: std::collections::VecDeque<usize>,
    pub opened: Instant,
    /// When the client last sent a whole message.
    pub last_message: Option<Instant>,
    /// Since when messages to the client have been dropped for a full queue.
    pub full_since: Option<Instant>,
    /// Messages dropped for a full queue.
    pub dropped: u64,
    /// Whether epoll also reports this connection writable (its output is pending).
    pub watching_writable: bool,
    /// Whether it is on the worker's list of connections to flush.
    pub dirty: bool,
    _slot: ConnectionSlot,
}

impl Connection {
    pub fn new(
        stream: TcpStream,
        client: SocketAddr,
        local: SocketAddr,
        tls: Option<ServerConnection>,
        slot: ConnectionSlot,
        now: Instant,
    ) -> Self {
        let transport = if tls.is_some() {
            Transport::Tls
        } else {
            Transport::Tcp
        };
        Self {
            stream,
            client,
            local,
            transport,
            tls: tls.map(|mut tls| {
                // The queue above is the bound; rustls gets one message at a time (a whole
                // 64 KiB peer datagram must fit), so its own limit would only cut messages.
                tls.set_buffer_limit(None);
                Box::new(tls)
            }),
            input: Vec::new(),
            input_start: 0,
            output: Vec::new(),
            output_start: 0,
            message_ends: std::collections::VecDeque::new(),
            opened: now,
            last_message: None,
            full_since: None,
            dropped: 0,
            watching_writable: false,
            dirty: false,
            _slot: slot,
        }
    }

    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Reads what the socket holds (up to a budget) into the input; an error ends the
    /// connection. TLS handshake records are answered through the output path. `Ok(true)`
    /// means the input filled up before everything was read: frame what is there, then read
    /// again (rustls may hold decrypted data the socket will not signal again). An end of
    /// the connection comes after what was read before it, which is still to be framed.
    pub fn read(&mut self) -> ReadOutcome {
        self.compact_input();
        let mut budget = READ_BUDGET;
        if let Some(tls) = &mut self.tls {
            drain_plaintext(tls, &mut self.input, MAX_INPUT);
        }
        while budget > 0 && self.input.len() < MAX_INPUT {
            let got = match &mut self.tls {
                None => read_plain(&mut self.stream, &mut self.input, MAX_INPUT),
                Some(tls) => read_tls(&mut self.stream, tls, &mut self.input, MAX_INPUT),
            };
            match got {
                Ok(None) => return ReadOutcome::Drained,
                Ok(Some(n)) => budget = budget.saturating_sub(n),
                Err(reason) => return ReadOutcome::Closed(reason),
            }
        }
        ReadOutcome::More
    }

    /// The next whole message in the input (its range in [`Connection::input`]), consumed with
    /// its padding; `None` until one is complete.
    pub fn next_message(&mut self) -> Result<Option<Range<usize>>, CloseReason> {
        let pending = &self.input[self.input_start..];
        match next_frame(pending).map_err(CloseReason::Framing)? {
            None => Ok(None),
            Some(frame) => {
                let start = self.input_start;
                self.input_start += frame.consumed;
                Ok(Some(start..start + frame.message))
            }
        }
    }

    pub fn input(&self) -> &[u8] {
        &self.input
    }

    /// After the whole messages were handled: an emptied input gives its buffer back, so an
    /// idle connection holds no read buffer (a busy one reallocates per read, which is cheap
    /// next to the read itself).
    pub fn release_input(&mut self) {
        if self.input_start == self.input.len() {
            self.input_start = 0;
            self.input.clear();
            if self.input.capacity() > IDLE_BUFFER {
                self.input = Vec::new();
            }
        }
    }

    fn compact_input(&mut self) {
        if self.input_start > 0 {
            self.input.drain(..self.input_start);
            self.input_start = 0;
        }
        if self.input.is_empty() && self.input.capacity() > IDLE_BUFFER {
            // An idle connection keeps no large buffer (thousands of them wait on a relay).
            self.input = Vec::new();
        }
    }

    /// Queues one message made of `parts`, padded to a multiple of 4 (ChannelData on a
    /// stream, RFC 8656 §12.5; STUN messages already are). All or nothing: a message that
    /// does not fit is dropped and counted, so the stream never carries half a message.
    pub fn queue(&mut self, parts: &[&[u8]]) -> bool {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let padded = len + stream_padding(len);
        if self.output.len() - self.output_start + padded > MAX_OUTPUT {
            self.dropped += 1;
            self.full_since.get_or_insert_with(Instant::now);
            return false;
        }
        if self.output_start > 0 && self.output_start == self.output.len() {
            self.output.clear();
            self.output_start = 0;
        }
        for part in parts {
            self.output.extend_from_slice(part);
        }
        self.output.resize(self.output.len() + (padded - len), 0);
        if self.tls.is_some() {
            self.message_ends.push_back(self.output.len());
        }
        true
    }

    /// Whether output is waiting (in the queue or in rustls).
    pub fn has_output(&self) -> bool {
        self.output_start < self.output.len() || self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// Writes as much queued output as the socket takes; `Ok(true)` once all of it is out.
    pub fn flush(&mut self) -> Result<bool, CloseReason> {
        let done = match &mut self.tls {
            None => {
                while self.output_start < self.output.len() {
                    match self.stream.write(&self.output[self.output_start..]) {
                        Ok(0) => return Err(CloseReason::Error),
                        Ok(n) => self.output_start += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(write_error(&e)),
                    }
                }
                self.output_start == self.output.len()
            }
            Some(tls) => loop {
                while tls.wants_write() {
                    match tls.write_tls(&mut self.stream) {
                        Ok(0) => return Err(CloseReason::Error),
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(write_error(&e)),
                    }
                }
                if tls.wants_write() {
                    break false;
                }
                // Application data waits until the handshake is done (rustls would buffer it
                // anyway; keeping it here keeps the queue bound in one place).
                if self.output_start == self.output.len() || tls.is_handshaking() {
                    break self.output_start == self.output.len();
                }
                // One message, one record (see `message_ends`); rustls' buffer then holds one
                // record at most, since the loop writes it out before taking the next.
                let end = self
                    .message_ends
                    .pop_front()
                    .unwrap_or(self.output.len())
                    .min(self.output.len());
                match tls.writer().write(&self.output[self.output_start..end]) {
                    Ok(n) if n == end - self.output_start => self.output_start = end,
                    Ok(_) => return Err(CloseReason::Tls),
                    Err(_) => return Err(CloseReason::Tls),
                }
            },
        };
        if self.output.len() - self.output_start <= MAX_OUTPUT / 2 {
            self.full_since = None;
        }
        if done && self.output.capacity() > IDLE_BUFFER {
            self.output = Vec::new();
            self.output_start = 0;
        }
        Ok(done)
    }

    /// Sends a TLS close_notify if the socket takes it (best effort, before closing).
    pub fn close_notify(&mut self) {
        if let Some(tls) = &mut self.tls {
            tls.send_close_notify();
            let _ = tls.write_tls(&mut self.stream);
        }
    }

    /// Bytes this connection holds in its own buffers (for the memory figure in metrics).
    pub fn buffered(&self) -> usize {
        self.input.capacity() + self.output.capacity()
    }
}

/// One read of plaintext from a TCP socket into `input` (up to `max` bytes held); `None`
/// when the socket has nothing now.
fn read_plain(
    stream: &mut TcpStream,
    input: &mut Vec<u8>,
    max: usize,
) -> Result<Option<usize>, CloseReason> {
    let old = input.len();
    let room = READ_CHUNK.min(max - old);
    input.resize(old + room, 0);
    let result = stream.read(&mut input[old..]);
    let n = match result {
        Ok(n) => n,
        Err(e) => {
            input.truncate(old);
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(read_error(&e)),
            };
        }
    };
    input.truncate(old + n);
    if n == 0 {
        return Err(CloseReason::Client);
    }
    Ok(Some(n))
}

/// One read of TLS records, decrypted into `input`; `None` when the socket has nothing now.
fn read_tls(
    stream: &mut TcpStream,
    tls: &mut ServerConnection,
    input: &mut Vec<u8>,
    max: usize,
) -> Result<Option<usize>, CloseReason> {
    let n = match tls.read_tls(stream) {
        Ok(0) => return Err(CloseReason::Client),
        Ok(n) => n,
        Err(e) => match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => return Ok(None),
            _ => return Err(read_error(&e)),
        },
    };
    let state = match tls.process_new_packets() {
        Ok(state) => state,
        Err(error) => {
            tracing::debug!(%error, "TLS error; connection closed");
            // Tell the client why (an alert), if the socket takes it.
            let _ = tls.write_tls(stream);
            return Err(CloseReason::Tls);
        }
    };
    let closed = state.peer_has_closed();
    drain_plaintext(tls, input, max);
    if closed
        && tls
            .process_new_packets()
            .is_ok_and(|s| s.plaintext_bytes_to_read() == 0)
    {
        return Err(CloseReason::Client);
    }
    Ok(Some(n))
}

/// Moves decrypted data from rustls into `input` (up to `max` bytes held).
fn drain_plaintext(tls: &mut ServerConnection, input: &mut Vec<u8>, max: usize) {
    while input.len() < max {
        let old = input.len();
        input.resize(max.min(old + READ_CHUNK), 0);
        match tls.reader().read(&mut input[old..]) {
            Ok(got) if got > 0 => input.truncate(old + got),
            // Nothing buffered (WouldBlock), the peer closed (0), or an error that the next
            // process_new_packets reports.
            _ => {
                input.truncate(old);
                break;
            }
        }
    }
}

fn read_error(error: &io::Error) -> CloseReason {
    match error.kind() {
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => CloseReason::Client,
        _ => CloseReason::Error,
    }
}

fn write_error(error: &io::Error) -> CloseReason {
    match error.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => CloseReason::Client,
        _ => CloseReason::Error,
    }
}
