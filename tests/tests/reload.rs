//! Issue 13, reload without dropping allocations, through the real binary (socket path, on
//! loopback): `relay ctl reload` and SIGHUP re-read `--config FILE` (and the users and secrets
//! files it names): REST secrets rotate (old and new both accepted, then only the new), users
//! come and go (a removed user's next request gets 401), a tightened peer policy takes a live
//! allocation's permission away at once (traffic to that peer stops, another peer's goes on),
//! the log level and the per-user quota change; an invalid file or a changed listen address
//! keeps everything and `relay ctl reload` exits non-zero naming the problem.

mod support;

use std::{
    net::{SocketAddr, UdpSocket},
    path::PathBuf,
    time::{Duration, Instant},
};

use relay::proto::{
    auth::rest_password,
    channel_data::ChannelData,
    stun::{Attribute, Message, Method},
};
use support::{client::Client, Relay};

const REALM: &str = "relay.local";
/// Peers on loopback addresses the default policy denies; the config allows them by name.
const PEER_A: &str = "127.0.0.5";
const PEER_B: &str = "127.0.0.6";

struct Files {
    dir: PathBuf,
}

impl Files {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("relay-reload-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.path(name), text).expect("write");
    }

    /// The config file: loopback listener, users and secrets from files, the peers allowed
    /// by `allow_unsafe`, `extra` lines appended.
    fn config(&self, allow_unsafe: &[&str], log_level: &str, extra: &str) {
        let list: Vec<String> = allow_unsafe.iter().map(|ip| format!("\"{ip}\"")).collect();
        self.write(
            "relay.toml",
            &format!(
                "listen = [\"127.0.0.1:0\"]\n\
                 relay-ip = [\"127.0.0.1\"]\n\
                 realm = \"{REALM}\"\n\
                 workers = 2\n\
                 users-file = \"{}\"\n\
                 auth-secret-file = \"{}\"\n\
                 allow-peer-unsafe = [{}]\n\
                 log-level = \"{log_level}\"\n{extra}",
                self.path("users").display(),
                self.path("secrets").display(),
                list.join(", ")
            ),
        );
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn peer(ip: &str) -> (UdpSocket, SocketAddr) {
    let socket = UdpSocket::bind((ip, 0)).expect("peer socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(400)))
        .expect("timeout");
    let addr = socket.local_addr().expect("peer address");
    (socket, addr)
}

/// What `peer` receives next (within its timeout).
fn received(peer: &UdpSocket) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = [0u8; 2048];
    peer.recv_from(&mut buf)
        .ok()
        .map(|(n, from)| (buf[..n].to_vec(), from))
}

/// The DATA of the next Data indication or ChannelData the client gets, if any.
fn client_gets(client: &Client) -> Option<Vec<u8>> {
    let datagram = client.recv()?;
    if let Ok(cd) = ChannelData::decode(&datagram) {
        return Some(cd.data.to_vec());
    }
    let msg = Message::decode(&datagram).ok()?;
    msg.data().map(<[u8]>::to_vec)
}

fn permit(client: &mut Client, peer: SocketAddr) -> Option<u16> {
    client.request_error(
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(peer)],
    )
}

fn refresh(client: &mut Client) -> Option<u16> {
    client.request_error(Method::REFRESH, &[Attribute::Lifetime(600)])
}

/// A logged-in client with an allocation.
fn allocated(relay: &Relay, user: &str, password: &str) -> (Client, SocketAddr) {
    let mut client = Client::new(relay.listener(), REALM);
    client.login(user, password);
    let relayed = client.allocate();
    (client, relayed)
}

/// A TURN REST credential signed with `secret`, valid for an hour.
fn rest_credential(secret: &str, user: &str) -> (String, String) {
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 3600;
    let username = format!("{expiry}:{user}");
    let password = rest_password(secret.as_bytes(), &username).expect("hmac");
    (username, password)
}

#[track_caller]
fn reload_ok(relay: &Relay) -> String {
    let (ok, stdout, stderr) = relay.ctl(&["reload"]);
    assert!(
        ok,
        "relay ctl reload failed: {stdout}{stderr}\n{}",
        relay.log()
    );
    println!("reload: {}", stdout.trim());
    stdout
}

#[track_caller]
fn reload_refused(relay: &Relay) -> String {
    let (ok, stdout, stderr) = relay.ctl(&["reload"]);
    assert!(!ok, "relay ctl reload succeeded: {stdout}");
    println!("refused: {}", stderr.trim());
    stderr
}

/// Sends `tag` to `peer` through `client`'s allocation (a Send indication) and says whether it
/// arrived from `relayed`.
fn relays_to(
    client: &mut Client,
    relayed: SocketAddr,
    peer: (&UdpSocket, SocketAddr),
    tag: &str,
) -> bool {
    client.send_indication(peer.1, tag.as_bytes());
    matches!(received(peer.0), Some((data, from)) if data == tag.as_bytes() && from == relayed)
}

#[test]
fn reload_rotates_secrets_changes_users_policy_and_log_level_without_dropping_allocations() {
    let files = Files::new();
    files.write("users", "alice:wonderland\n");
    files.write("secrets", "old-secret\n");
    files.config(&[PEER_A, PEER_B], "info", "");
    let config = files.path("relay.toml");
    let relay = Relay::start(&["--config", config.to_str().expect("utf-8")]);
    let (peer_a, addr_a) = peer(PEER_A);
    let (peer_b, addr_b) = peer(PEER_B);

    // Alice relays to both peers, to A over a channel too.
    let (mut alice, relayed) = allocated(&relay, "alice", "wonderland");
    assert_eq!(permit(&mut alice, addr_a), None);
    assert_eq!(permit(&mut alice, addr_b), None);
    alice.bind_channel(0x4000, addr_a);
    assert!(relays_to(
        &mut alice,
        relayed,
        (&peer_a, addr_a),
        "a before"
    ));
    assert!(relays_to(
        &mut alice,
        relayed,
        (&peer_b, addr_b),
        "b before"
    ));
    alice.send_raw(
        &ChannelData {
            channel: 0x4000,
            data: b"cd before",
        }
        .encode(false),
    );
    assert_eq!(
        received(&peer_a).map(|(d, _)| d),
        Some(b"cd before".to_vec())
    );

    // REST secret rotation, step 1: old and new both accepted.
    let (old_user, old_password) = rest_credential("old-secret", "dave");
    let (mut old_rest, _) = allocated(&relay, &old_user, &old_password);
    files.write("secrets", "old-secret\nnew-secret\n");
    let message = reload_ok(&relay);
    assert!(message.contains("2 REST secret(s)"), "{message}");
    let (new_user, new_password) = rest_credential("new-secret", "erin");
    let (mut new_rest, _) = allocated(&relay, &new_user, &new_password);
    assert_eq!(
        refresh(&mut old_rest),
        None,
        "old secret during the rotation"
    );
    // Step 2: the old secret is gone: its credential's next request gets 401.
    files.write("secrets", "new-secret\n");
    reload_ok(&relay);
    assert_eq!(
        refresh(&mut new_rest),
        None,
        "new secret after the rotation"
    );
    assert_eq!(
        refresh(&mut old_rest),
        Some(401),
        "old secret after the rotation"
    );

    // A user added by a reload allocates; removed again, its next request gets 401, while
    // alice (kept) goes on.
    files.write("users", "alice:wonderland\nbob:builder\n");
    reload_ok(&relay);
    let (mut bob, _) = allocated(&relay, "bob", "builder");
    files.write("users", "alice:wonderland\n");
    let message = reload_ok(&relay);
    assert!(message.contains("no longer"), "{message}");
    assert_eq!(refresh(&mut bob), Some(401), "removed user");
    assert_eq!(refresh(&mut alice), None, "kept user");

    // The policy no longer allows peer A: alice's permission and channel to A are gone at
    // once (both directions), B still relays; a new permission for A gets 403.
    files.config(&[PEER_B], "info", "");
    let message = reload_ok(&relay);
    assert!(
        message.contains("1 permission(s) and 1 channel(s)"),
        "{message}"
    );
    assert!(!relays_to(
        &mut alice,
        relayed,
        (&peer_a, addr_a),
        "a after"
    ));
    alice.send_raw(
        &ChannelData {
            channel: 0x4000,
            data: b"cd after",
        }
        .encode(false),
    );
    assert_eq!(received(&peer_a), None, "ChannelData to a forbidden peer");
    peer_a.send_to(b"from a", relayed).expect("peer a sends");
    assert_eq!(client_gets(&alice), None, "peer data from a forbidden peer");
    assert!(relays_to(&mut alice, relayed, (&peer_b, addr_b), "b after"));
    peer_b.send_to(b"from b", relayed).expect("peer b sends");
    assert_eq!(client_gets(&alice), Some(b"from b".to_vec()));
    assert_eq!(permit(&mut alice, addr_a), Some(403));
    let list = relay.allocations();
    let mine = list
        .allocations
        .iter()
        .find(|a| a.relayed == relayed.to_string())
        .expect("alice's allocation is still there");
    assert_eq!(mine.peers, vec![PEER_B.to_owned()], "{mine:?}");

    // The log level: the relay socket closing is logged at debug only.
    let (mut quiet, _) = allocated(&relay, "alice", "wonderland");
    quiet.delete();
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !relay.log().contains("relay socket closed"),
        "{}",
        relay.log()
    );
    files.config(&[PEER_B], "debug", "");
    reload_ok(&relay);
    let (mut loud, _) = allocated(&relay, "alice", "wonderland");
    loud.delete();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !relay.log().contains("relay socket closed") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        relay.log().contains("relay socket closed"),
        "{}",
        relay.log()
    );

    // Quotas: a lowered per-user cap refuses alice's next Allocate (486); her live one stays.
    files.config(&[PEER_B], "debug", "max-allocations-per-user = 1\n");
    let message = reload_ok(&relay);
    assert!(message.contains("max-allocations-per-user 1"), "{message}");
    let mut second = Client::new(relay.listener(), REALM);
    second.login("alice", "wonderland");
    assert_eq!(
        second.request_error(Method::ALLOCATE, &[Attribute::RequestedTransport(17)]),
        Some(486)
    );
    assert_eq!(refresh(&mut alice), None);

    // An invalid file keeps everything: peer A stays forbidden, bob stays removed, alice relays.
    files.write("relay.toml", "listen = [\"127.0.0.1:0\"]\nlisen = 1\n");
    let error = reload_refused(&relay);
    assert!(error.contains("unknown field `lisen`"), "{error}");
    assert!(error.contains("running configuration stays"), "{error}");
    // So does a users file that cannot be read.
    files.config(&[PEER_A, PEER_B], "info", "");
    std::fs::remove_file(files.path("users")).expect("remove users file");
    let error = reload_refused(&relay);
    assert!(
        error.contains(&files.path("users").display().to_string()),
        "{error}"
    );
    files.write("users", "alice:wonderland\nbob:builder\n");
    // A changed listen address is named, with both values, and refuses the whole reload:
    // neither bob nor peer A (both in the same file) come back.
    files.config(&[PEER_A, PEER_B], "info", "");
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(&config, text.replace("127.0.0.1:0", "127.0.0.1:1")).expect("write");
    let error = reload_refused(&relay);
    assert!(
        error.contains("cannot change while the relay runs")
            && error.contains("listen ([127.0.0.1:0] -> [127.0.0.1:1])"),
        "{error}"
    );
    assert_eq!(permit(&mut alice, addr_a), Some(403));
    assert_eq!(refresh(&mut bob), Some(401));
    assert!(relays_to(
        &mut alice,
        relayed,
        (&peer_b, addr_b),
        "b after refusals"
    ));
    // Refusals of `relay ctl reload` are logged too.
    assert!(
        relay.log().contains("cannot change while the relay runs"),
        "{}",
        relay.log()
    );

    // SIGHUP applies the fixed file (bob and peer A are back), polled a bounded number of times.
    files.config(&[PEER_A, PEER_B], "info", "");
    let pid = i32::try_from(relay.pid()).expect("pid");
    // SAFETY: kill only sends a signal to our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut answer = permit(&mut alice, addr_a);
    while answer.is_some() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        answer = permit(&mut alice, addr_a);
    }
    assert_eq!(answer, None, "SIGHUP did not apply:\n{}", relay.log());
    assert_eq!(refresh(&mut bob), None, "bob is back");
    assert!(relays_to(&mut alice, relayed, (&peer_a, addr_a), "a again"));
    // SIGHUP with a broken file logs why and keeps running.
    let refusals = || relay.log().matches("configuration not reloaded").count();
    let before = refusals();
    files.write("relay.toml", "nonsense");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while refusals() == before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(refusals(), before + 1, "{}", relay.log());
    assert!(relays_to(
        &mut alice,
        relayed,
        (&peer_a, addr_a),
        "a after a bad SIGHUP"
    ));
    // Nothing was dropped along the way: alice's allocation is the one from the start.
    assert_eq!(refresh(&mut alice), None);
}
