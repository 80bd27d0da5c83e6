//! Server state-machine tests.
//!
//! A simulated client builds real STUN/TURN requests with `MessageBuilder` and long-term
//! credentials, learns REALM and NONCE from a 401 like a real client, and feeds the datagrams into
//! `Server`. Time is an `Instant` advanced by hand and the server RNG is seeded, so every run is
//! the same. Every test asserts the exact `Command`s that come out; responses are decoded with
//! the crate's own `Message::decode` and checked for class, error code, attributes, integrity and
//! fingerprint.
//!
//! [`harness`] holds the simulated client and the helpers; each other module is one behaviour.

mod harness;

mod allocate;
mod alternate;
mod auth;
mod bandwidth;
mod binding;
mod capacity;
mod channel;
mod drain;
mod expiry;
mod family;
mod hairpin;
mod malformed;
mod permission;
mod properties;
mod refresh;
mod reload;
mod stream;
mod usage;
