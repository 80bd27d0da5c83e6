//! Driving the kernel fast path directly, as the daemon does: bindings with next hops that the
//! real resolver found (rtnetlink, in the calling thread's namespace) and the lab's peer policy.

use relay::{
    fastpath::{
        netlink::Rtnl, nexthop::NextHops, BindingHops, ChannelBinding, FastPath, PermissionBinding,
    },
    proto::policy::PeerPolicy,
};

/// The lab's peer policy: its benchmark ranges (which the safe default denies) allowed.
pub fn lab_policy() -> PeerPolicy {
    let mut policy = PeerPolicy::safe_default();
    for net in ["198.18.0.0/15", "2001:2::/48"] {
        policy.allow(net.parse().expect("CIDR literal"));
    }
    policy
}

/// Installs bindings the way the daemon does: each address's next hop resolved over
/// rtnetlink and written before the binding refers to it.
pub struct Installer {
    table: NextHops<Rtnl>,
}

impl Installer {
    /// For `fastpath`, already attached, in the calling thread's namespace.
    pub fn new(fastpath: &FastPath) -> Self {
        let rtnl = Rtnl::open().expect("rtnetlink socket");
        let capacity = u16::try_from(fastpath.capacity().next_hops).unwrap_or(u16::MAX);
        let mut table = NextHops::new(rtnl, capacity);
        table.set_attached(fastpath.attached_ifindexes());
        Self { table }
    }

    /// Installs `binding`; `hairpin` when its peer is another allocation's relayed address.
    /// Panics when the next-hop table is full or the kernel refuses the entries.
    pub fn install(
        &mut self,
        fastpath: &mut FastPath,
        binding: &ChannelBinding,
        hairpin: bool,
    ) -> BindingHops {
        let client = self
            .table
            .acquire_from(Some(binding.listener.ip()), binding.client.ip())
            .expect("next hop for the client");
        let peer = if hairpin {
            client
        } else {
            self.table
                .acquire_from(Some(binding.relayed.ip()), binding.peer.ip())
                .expect("next hop for the peer")
        };
        for id in [client, peer] {
            let hop = self.table.value(id).expect("acquired next hop");
            fastpath.set_next_hop(id.0, &hop).expect("write next hop");
        }
        // Fixtures keep their allocation ids small: each is its own counter slot.
        let hops = BindingHops {
            client: client.0,
            peer: peer.0,
            hairpin,
            counters: u32::try_from(binding.allocation).expect("small allocation id"),
        };
        fastpath
            .install_channel(binding, hops)
            .unwrap_or_else(|e| panic!("install {binding:?}: {e}"));
        hops
    }

    /// Installs `permission` (and its allocation's client entry) as the daemon does: next hops
    /// of (listener, client) and (relayed, peer), counter slot = allocation id. Panics when the
    /// next-hop table is full or the kernel refuses the entries.
    pub fn install_permission(
        &mut self,
        fastpath: &mut FastPath,
        permission: &PermissionBinding,
    ) -> BindingHops {
        let client = self
            .table
            .acquire_from(Some(permission.listener.ip()), permission.client.ip())
            .expect("next hop for the client");
        let peer = self
            .table
            .acquire_from(Some(permission.relayed.ip()), permission.peer_ip)
            .expect("next hop for the peer");
        for id in [client, peer] {
            let hop = self.table.value(id).expect("acquired next hop");
            fastpath.set_next_hop(id.0, &hop).expect("write next hop");
        }
        let hops = BindingHops {
            client: client.0,
            peer: peer.0,
            hairpin: false,
            counters: u32::try_from(permission.allocation).expect("small allocation id"),
        };
        fastpath
            .install_permission(permission, hops)
            .unwrap_or_else(|e| panic!("install {permission:?}: {e}"));
        hops
    }
}

/// `relay_xdp_pass` on veth ends, for as long as it lives: veth delivers frames that XDP
/// transmits or redirects into it only if its far end runs an XDP program.
pub struct FarEnds {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FarEnds {
    /// On each `(namespace, interface)` end.
    pub fn attach(ends: &[(&crate::Netns, &str)]) -> Self {
        let ends: Vec<(String, String)> = ends
            .iter()
            .map(|(ns, dev)| (format!("/run/netns/{}", ns.name()), (*dev).to_owned()))
            .collect();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let mut fastpath = FastPath::load().unwrap_or_else(|e| panic!("load: {e}"));
            for (ns, dev) in &ends {
                crate::enter_netns(ns);
                fastpath
                    .attach_pass(dev)
                    .unwrap_or_else(|e| panic!("XDP_PASS on {dev}: {e}"));
            }
            ready_tx.send(()).expect("test waits");
            // Programs stay attached until the test drops this (or panics).
            let _ = stop_rx.recv();
        });
        ready_rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("far-end programs attached");
        Self {
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// On the client's and the peer's ends of a three-host lab.
    pub fn of(lab: &crate::lab::ThreeHosts) -> Self {
        Self::attach(&[(&lab.client, &lab.client_if), (&lab.peer, &lab.peer_if)])
    }
}

impl Drop for FarEnds {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
