//! The stream-client variant's client side: the run's TLS material, TCP and TLS connections
//! from a chosen client address, the stream framing (RFC 8656 §12.5), and a TURN session
//! (`turn::Client`) over a connection.

use std::{
    io::{ErrorKind, Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    os::fd::FromRawFd,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, UnixTime},
    ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme, StreamOwned,
};

use super::StreamTransport;
use crate::bench::{
    lab::{self, LISTEN_IP},
    runner::Ctx,
    turn::{self, Response, Transport},
};

/// The run's TLS material: a self-signed certificate and its key as PEM files in a private
/// directory (removed on drop), and the client configuration that pins the certificate.
pub struct TlsMaterial {
    dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    client: Arc<ClientConfig>,
}

impl TlsMaterial {
    pub fn generate(out: &Path) -> anyhow::Result<Self> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let certified =
            rcgen::generate_simple_self_signed(vec!["bench.lab".to_owned(), LISTEN_IP.to_string()])
                .context("generating the benchmark's TLS certificate")?;
        let dir = out.join(format!("stream-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let material = Self {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            dir,
            client: client_config(certified.cert.der().clone())?,
        };
        let write = |path: &Path, text: &str, mode: u32| {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(path)
                .and_then(|mut f| f.write_all(text.as_bytes()))
                .with_context(|| format!("writing {}", path.display()))
        };
        write(&material.cert, &certified.cert.pem(), 0o644)?;
        write(&material.key, &certified.key_pair.serialize_pem(), 0o600)?;
        Ok(material)
    }
}

impl Drop for TlsMaterial {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// rustls with ring, TLS 1.2 and 1.3, no session resumption (every handshake is a full one,
/// as for a new client), trusting exactly `cert`.
fn client_config(cert: CertificateDer<'static>) -> anyhow::Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .context("rustls protocol versions")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCert { cert, provider }))
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// Accepts exactly the run's own certificate and does not check the handshake signature: the
/// server is the one this run started in a namespace of its own, and verifying an ECDSA
/// signature per handshake would cost the generator core more than the server's signing
/// costs it, so the generator, not the server, could set the handshake rate.
#[derive(Debug)]
struct PinnedCert {
    cert: CertificateDer<'static>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.cert.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "not the benchmark's certificate".to_owned(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client connection: plain TCP or TLS over TCP.
pub(super) enum Conn {
    Tcp(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Conn {
    pub(super) fn tcp(&self) -> &TcpStream {
        match self {
            Self::Tcp(s) => s,
            Self::Tls(s) => &s.sock,
        }
    }

    /// "TLSv1_3 TLS13_AES_256_GCM_SHA384" once the handshake is done.
    pub(super) fn tls_description(&self) -> Option<String> {
        let Self::Tls(s) = self else { return None };
        Some(format!(
            "{:?} {:?}",
            s.conn.protocol_version()?,
            s.conn.negotiated_cipher_suite()?.suite()
        ))
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::Tcp(s) => s.flush(),
            Self::Tls(s) => s.flush(),
        }
    }
}

/// The length of the complete frame at the start of `buf` on a stream (RFC 8656 §12.5: STUN
/// by its header length; ChannelData by its length, padded to a multiple of 4), None while
/// incomplete, Err for bytes that are neither.
pub(super) fn frame_len(buf: &[u8]) -> anyhow::Result<Option<usize>> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
    let total = match buf[0] >> 6 {
        0b00 => 20 + len,
        0b01 => (4 + len).next_multiple_of(4),
        _ => bail!(
            "the server sent neither STUN nor ChannelData ({:#04x})",
            buf[0]
        ),
    };
    Ok((buf.len() >= total).then_some(total))
}

/// Requests over a connection, responses read back by the stream framing; what is not the
/// awaited response (ChannelData, other messages) is skipped. Bounded by the connection's
/// read timeout and `limit`.
pub(super) struct StreamTransportConn {
    pub(super) conn: Conn,
    buf: Vec<u8>,
    limit: Duration,
}

impl Transport for StreamTransportConn {
    fn exchange(
        &mut self,
        message: &[u8],
        method: u16,
        tid: &[u8; 12],
    ) -> anyhow::Result<Response> {
        self.conn.write_all(message)?;
        self.conn.flush()?;
        let deadline = Instant::now() + self.limit;
        let mut chunk = [0u8; 4096];
        loop {
            while let Some(n) = frame_len(&self.buf)? {
                let frame: Vec<u8> = self.buf.drain(..n).collect();
                if let Some(response) = turn::decode(&frame, method, tid) {
                    return Ok(response);
                }
            }
            if Instant::now() > deadline || self.buf.len() > 1 << 16 {
                bail!(
                    "no response to method {method:#06x} within {:?}",
                    self.limit
                );
            }
            match self.conn.read(&mut chunk) {
                Ok(0) => bail!("the server closed the connection (method {method:#06x})"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    bail!(
                        "no response to method {method:#06x} within {:?}",
                        self.limit
                    )
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// A TCP connection from `src` (any port) to `dst`, connect bounded by `timeout`. The source
/// addresses spread the handshakes over the lab's client addresses, so TIME_WAIT and the
/// ephemeral ports of one address never limit them.
fn connect_from(src: Ipv4Addr, dst: SocketAddrV4, timeout: Duration) -> std::io::Result<TcpStream> {
    let sockaddr = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: socket() has no preconditions; the descriptor is checked, then owned by the
    // TcpStream below, which closes it on every path.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket nobody else owns.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros() as i32),
    };
    let local = sockaddr(SocketAddrV4::new(src, 0));
    let remote = sockaddr(dst);
    // SAFETY: each call reads a value of the size passed from our stack, on our socket. The
    // port is chosen at connect (IP_BIND_ADDRESS_NO_PORT), per destination; SO_SNDTIMEO
    // bounds a blocking connect on Linux.
    let rc = unsafe {
        let set = |level, name, value: *const libc::c_void, size: usize| {
            libc::setsockopt(fd, level, name, value, size as libc::socklen_t)
        };
        if set(
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            std::ptr::addr_of!(one).cast(),
            std::mem::size_of_val(&one),
        ) != 0
            || set(
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                std::ptr::addr_of!(tv).cast(),
                std::mem::size_of_val(&tv),
            ) != 0
            || libc::bind(fd, std::ptr::addr_of!(local).cast(), len) != 0
        {
            -1
        } else {
            libc::connect(fd, std::ptr::addr_of!(remote).cast(), len)
        }
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    stream.set_write_timeout(Some(timeout))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Connects client `index` over `transport` and completes the TLS handshake (eagerly, so a
/// failure is named as one).
fn connect(
    transport: StreamTransport,
    tls: &TlsMaterial,
    index: usize,
    timeout: Duration,
) -> anyhow::Result<Conn> {
    let dst = SocketAddrV4::new(LISTEN_IP, transport.port());
    let tcp = connect_from(lab::client_ip(index), dst, timeout)
        .with_context(|| format!("{} connect to {dst}", transport.name()))?;
    Ok(match transport {
        StreamTransport::Tcp => Conn::Tcp(tcp),
        StreamTransport::Tls => {
            let name = ServerName::from(IpAddr::V4(LISTEN_IP));
            let mut conn = ClientConnection::new(Arc::clone(&tls.client), name)?;
            let mut tcp = tcp;
            while conn.is_handshaking() {
                conn.complete_io(&mut tcp).context("TLS handshake")?;
            }
            Conn::Tls(Box::new(StreamOwned::new(conn, tcp)))
        }
    })
}

/// A TURN session over a new connection: Allocate (with the 401 round) as client `index`.
pub(super) fn session(
    transport: StreamTransport,
    tls: &TlsMaterial,
    ctx: &Ctx,
    index: usize,
    name: &str,
) -> anyhow::Result<(turn::Client<StreamTransportConn>, SocketAddr)> {
    let timeout = Duration::from_secs(3);
    let conn = connect(transport, tls, index, timeout)?;
    let (user, pass) = turn::rest_credentials(&ctx.secret, name);
    let mut client = turn::Client::over(
        StreamTransportConn {
            conn,
            buf: Vec::new(),
            limit: timeout,
        },
        index as u64,
        user,
        &pass,
    );
    let relayed = client.allocate()?;
    Ok((client, relayed))
}

/// Whether the server answers a Binding request over `transport` (its stream listener is up).
pub(super) fn probe(transport: StreamTransport, tls: &TlsMaterial) -> anyhow::Result<()> {
    let conn = connect(transport, tls, 0, Duration::from_millis(500))?;
    let mut t = StreamTransportConn {
        conn,
        buf: Vec::new(),
        limit: Duration::from_millis(500),
    };
    let tid = [0x53u8; 12];
    match t.exchange(&turn::binding_request(&tid), turn::BINDING, &tid)? {
        Response::Success(_) => Ok(()),
        Response::Error(code, _) => bail!("Binding over {}: error {code}", transport.name()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_framing_pads_channel_data_and_sizes_stun() {
        assert_eq!(frame_len(&[0x40, 0x00, 0x00]).unwrap(), None);
        // ChannelData of 5 bytes: 4 + 5, padded to 12 on a stream.
        let mut cd = vec![0x40, 0x00, 0x00, 0x05];
        cd.resize(11, 0);
        assert_eq!(frame_len(&cd).unwrap(), None);
        cd.push(0);
        assert_eq!(frame_len(&cd).unwrap(), Some(12));
        // STUN: 20-byte header plus the length field.
        let mut stun = vec![0x01, 0x01, 0x00, 0x08];
        stun.resize(28, 0);
        assert_eq!(frame_len(&stun).unwrap(), Some(28));
        assert_eq!(frame_len(&stun[..27]).unwrap(), None);
        assert!(frame_len(&[0xc0, 0, 0, 0]).is_err());
    }
}
