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
use crate::proto::{
    framing::{next_frame, stream_padding, FramingError, MAX_STREAM_MESSAGE},
    Transport,
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
/// Written bytes at the front of the queue that make it compact.
const COMPACT_AT: usize = 64 * 1024;
/// Plaintext put into TLS records between two socket writes.
const TLS_BATCH: usize = 64 * 1024;
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
    /// When the client's first STUN message (with the magic cookie) arrived: the handshake
    /// deadline stops there.
    pub first_stun: Option<Instant>,
    /// When the connection last held an allocation (the idle deadline counts from there, or
    /// from `opened`; messages alone do not keep an allocation-less connection open).
    pub last_allocated: Option<Instant>,
    /// When the socket last took output (or the queue was last empty): a client whose queue
    /// makes no progress for a while has stopped reading.
    pub last_progress: Instant,
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
            first_stun: None,
            last_allocated: None,
            last_progress: now,
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
            return false;
        }
        if self.output_start == self.output.len() {
            // Nothing was pending: progress is measured from now.
            self.last_progress = Instant::now();
        }
        self.compact_output();
        for part in parts {
            self.output.extend_from_slice(part);
        }
        self.output.resize(self.output.len() + (padded - len), 0);
        if self.tls.is_some() {
            self.message_ends.push_back(self.output.len());
        }
        true
    }

    /// Drops the part of the queue already written once it is half the buffer or 64 KiB, so
    /// the buffer holds what is pending plus at most that (a client that always has something
    /// pending must not make it grow forever); the move is amortised over the bytes written.
    fn compact_output(&mut self) {
        if self.output_start == 0 {
            return;
        }
        if self.output_start == self.output.len() {
            self.output.clear();
            self.message_ends.clear();
        } else if self.output_start >= self.output.len() / 2 || self.output_start >= COMPACT_AT {
            self.output.drain(..self.output_start);
            for end in self.message_ends.iter_mut() {
                *end -= self.output_start;
            }
        } else {
            return;
        }
        self.output_start = 0;
    }

    /// Whether output is waiting (in the queue or in rustls).
    pub fn has_output(&self) -> bool {
        self.output_start < self.output.len() || self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// Writes as much queued output as the socket takes; `Ok(true)` once all of it is out.
    pub fn flush(&mut self) -> Result<bool, CloseReason> {
        let mut wrote = 0;
        let done = match &mut self.tls {
            None => {
                while self.output_start < self.output.len() {
                    match self.stream.write(&self.output[self.output_start..]) {
                        Ok(0) => return Err(CloseReason::Error),
                        Ok(n) => {
                            self.output_start += n;
                            wrote += n;
                        }
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
                        Ok(n) => wrote += n,
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
                // One message, one record (see `message_ends`), but a batch of records per
                // write: the socket write above sends them together (rustls writes its
                // records vectored), so a record per message costs no system call per
                // message. A batch is at most TLS_BATCH bytes, so rustls' buffer stays small.
                let mut batch = 0;
                while batch < TLS_BATCH && self.output_start < self.output.len() {
                    let end = self
                        .message_ends
                        .pop_front()
                        .unwrap_or(self.output.len())
                        .min(self.output.len());
                    match tls.writer().write(&self.output[self.output_start..end]) {
                        Ok(n) if n == end - self.output_start => {
                            batch += n;
                            self.output_start = end;
                        }
                        Ok(_) | Err(_) => return Err(CloseReason::Tls),
                    }
                }
            },
        };
        if done || wrote > 0 {
            self.last_progress = Instant::now();
        }
        if done && self.output.capacity() > IDLE_BUFFER {
            self.output = Vec::new();
            self.output_start = 0;
            self.message_ends = std::collections::VecDeque::new();
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
        self.input.capacity()
            + self.output.capacity()
            + self.message_ends.capacity() * std::mem::size_of::<usize>()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::connection_limits::ConnectionLimits;
    use std::{net::TcpListener, sync::Arc};

    /// A connection whose client reads about as fast as the relay queues, so the queue is
    /// never empty: its buffer must stay bounded by what is pending (review finding: the sent
    /// front of the queue was never freed), and every byte must arrive in order.
    #[test]
    fn a_queue_that_never_empties_stays_bounded_and_in_order() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        client.set_recv_buffer_size(4096).expect("rcvbuf");
        client
            .connect(&listener.local_addr().expect("addr").into())
            .expect("connect");
        let mut client: TcpStream = client.into();
        client.set_nonblocking(true).expect("nonblocking");
        let (stream, peer) = listener.accept().expect("accept");
        socket2::SockRef::from(&stream)
            .set_send_buffer_size(4096)
            .expect("sndbuf");
        stream.set_nonblocking(true).expect("nonblocking");
        let limits = Arc::new(ConnectionLimits::new(4, 4));
        let slot = limits.try_acquire(peer.ip()).expect("slot");
        let local = stream.local_addr().expect("local");
        let mut connection = Connection::new(stream, peer, local, None, slot, Instant::now());

        let mut next = 0u32;
        let mut expected = 0u32;
        let mut carry = Vec::new();
        let mut largest = 0;
        for round in 0..20_000 {
            for _ in 0..4 {
                let message: Vec<u8> = next.to_be_bytes().repeat(25);
                if connection.queue(&[&message]) {
                    next += 1;
                }
            }
            connection.flush().expect("flush");
            // Read a little less than was queued until the queue is well filled, then as much.
            let want = if round < 500 { 300 } else { 400 };
            let mut buf = vec![0u8; want];
            if let Ok(n) = client.read(&mut buf) {
                carry.extend_from_slice(&buf[..n]);
            }
            while carry.len() >= 100 {
                let word: [u8; 4] = carry[..4].try_into().expect("4 bytes");
                assert_eq!(
                    u32::from_be_bytes(word),
                    expected,
                    "messages in order, whole"
                );
                expected += 1;
                carry.drain(..100);
            }
            largest = largest.max(connection.buffered());
        }
        assert!(next > 50_000, "traffic flowed: {next} messages");
        assert!(connection.has_output(), "the queue never emptied");
        assert!(
            largest <= 2 * MAX_OUTPUT + 64 * 1024,
            "buffer bounded by twice the queue: {largest} bytes"
        );
    }
}
