//! A testnet whose nodes each live in a Linux network namespace of their
//! own, so the network between them can be cut: one veth pair per node to
//! a bridge, addresses from a /24 of 198.18.0.0/16 (a benchmarking range,
//! RFC 2544, used only inside these namespaces) that no other testnet on
//! the machine holds, so two testnets (or one a killed test left behind)
//! never answer for each other's addresses. A partition moves the cut-off
//! nodes' veths to a second bridge (they still reach each other, not the
//! rest); a heal moves them back.
//!
//! With NAT ([`NatKind`]), node 0 stays on the bridge (the public relay
//! and bootstrap node) and every other node sits behind a router namespace
//! of its own: the router holds the node's "public" address on the bridge
//! (198.18.S.i+1) and does NAT with iptables for the node's private /30
//! of 198.19.S.0/24. Nodes then reach each other only through the
//! routers, as homes on the internet do.
//!
//! Needs root (namespaces, links). Every name carries the testnet's own
//! tag, so setup and teardown only ever touch what this testnet created.
//! Latency and loss (`tc netem`) need the kernel's netem qdisc, which not
//! every kernel has: [`netem_available`] says.

use std::process::Command;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// How a home router translates addresses (RFC 4787 terms).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum NatKind {
    /// Endpoint-independent mapping and filtering: the router forwards
    /// everything arriving on its public address to the node (iptables
    /// MASQUERADE plus a DNAT of all inbound traffic; a "DMZ host").
    FullCone,
    /// Endpoint-independent mapping (Linux keeps the source port where it
    /// can), address-and-port-dependent filtering (only replies pass
    /// conntrack): plain MASQUERADE, what most home routers do.
    PortRestricted,
    /// A new random source port for every destination (MASQUERADE
    /// --random-fully): the mapping depends on the endpoint, so the port
    /// a relay sees is not the port another peer must use.
    Symmetric,
}

impl std::str::FromStr for NatKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "full-cone" => Ok(Self::FullCone),
            "port-restricted" => Ok(Self::PortRestricted),
            "symmetric" => Ok(Self::Symmetric),
            _ => bail!("unknown NAT kind {s:?}: full-cone, port-restricted or symmetric"),
        }
    }
}

impl std::fmt::Display for NatKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::FullCone => "full-cone",
            Self::PortRestricted => "port-restricted",
            Self::Symmetric => "symmetric",
        })
    }
}

/// The namespaces and links of one testnet.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Netns {
    /// Short tag in every name (interface names hold 15 bytes).
    pub tag: String,
    /// Nodes, each in namespace `mycel-{tag}-{i}`.
    pub nodes: u32,
    /// The bearer token every node's API wants: they listen on the
    /// bridge, not on loopback.
    pub api_token: String,
    /// Third octet of the testnet's addresses: `198.18.{subnet}.0/24`.
    #[serde(default)]
    pub subnet: u8,
    /// Nodes other than node 0 behind NAT routers of these kinds, taken in
    /// turn (node 1 the first kind, node 2 the second, ...); empty: no NAT.
    #[serde(default)]
    pub nat: Vec<NatKind>,
}

/// The first /24 of 198.18.0.0/16 that no interface on this machine has an
/// address in.
fn free_subnet() -> Result<u8> {
    let out = Command::new("ip").args(["-4", "-o", "addr", "show"]).output().context("running ip")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let used: std::collections::HashSet<u8> = text
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("198.18."))
        .filter_map(|rest| rest.split('.').next()?.parse().ok())
        .collect();
    (0..=254u8).find(|n| !used.contains(n)).context("every /24 of 198.18.0.0/16 is in use by other testnets")
}

/// Runs `ip` (or `tc`) with these arguments; fails with its stderr.
fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Runs a command (`args[0]` and its arguments) inside namespace `ns`.
fn run_in(ns: &str, args: &[&str]) -> Result<()> {
    let mut all = vec!["netns", "exec", ns];
    all.extend(args);
    run("ip", &all)
}

/// Whether this process may create namespaces (runs as root); if not, why.
pub fn check_root() -> Result<()> {
    if effective_uid() != 0 {
        bail!("network namespaces need root: run as root (or leave out --netns)");
    }
    if Command::new("ip").arg("-V").output().is_err() {
        bail!("network namespaces need the `ip` command (iproute2)");
    }
    Ok(())
}

fn effective_uid() -> u32 {
    // /proc/self/status has "Uid: real effective saved fs".
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(2).and_then(|u| u.parse().ok()))
        .unwrap_or(u32::MAX)
}

/// Whether packet loss can be added: iptables (its `statistic` match) in
/// the namespaces. If not, why.
pub fn loss_available() -> Result<()> {
    check_root()?;
    if Command::new("iptables").arg("--version").output().is_err() {
        bail!("packet loss needs iptables (Debian: apt-get install iptables)");
    }
    Ok(())
}

/// Whether the kernel has the netem qdisc (latency and loss), tried on a
/// throwaway dummy link.
pub fn netem_available() -> bool {
    let tag = format!("mcq{}", std::process::id() % 100_000);
    if run("ip", &["link", "add", &tag, "type", "dummy"]).is_err() {
        return false;
    }
    let ok = run("tc", &["qdisc", "add", "dev", &tag, "root", "netem", "delay", "1ms"]).is_ok();
    let _ = run("ip", &["link", "del", &tag]);
    ok
}

impl Netns {
    /// Creates the bridges and one namespace per node.
    pub fn create(nodes: u32, nat: Vec<NatKind>) -> Result<Self> {
        check_root()?;
        if nodes > 250 {
            bail!("at most 250 nodes in namespaces (one /24 of addresses)");
        }
        if !nat.is_empty() && nodes > 63 {
            bail!("at most 63 nodes behind NAT (a /30 each in one /24)");
        }
        if !nat.is_empty() && Command::new("iptables").arg("--version").output().is_err() {
            bail!("NAT needs iptables (Debian: apt-get install iptables)");
        }
        let tag = format!("{:x}", std::process::id() % 0xffff);
        let mut random = [0u8; 16];
        use std::io::Read as _;
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut random))
            .context("reading /dev/urandom for the API token")?;
        let api_token = random.iter().map(|b| format!("{b:02x}")).collect();
        let net = Self { tag, nodes, api_token, subnet: free_subnet()?, nat };
        if let Err(e) = net.build() {
            net.destroy();
            return Err(e);
        }
        Ok(net)
    }

    fn build(&self) -> Result<()> {
        let (main, cut) = (self.bridge(0), self.bridge(1));
        run("ip", &["link", "add", &main, "type", "bridge"])?;
        run("ip", &["addr", "add", &format!("{}/24", self.host_addr()), "dev", &main])?;
        run("ip", &["link", "set", &main, "up"])?;
        run("ip", &["link", "add", &cut, "type", "bridge"])?;
        run("ip", &["link", "set", &cut, "up"])?;
        for i in 0..self.nodes {
            if let Some(kind) = self.nat_of(i) {
                self.build_home(i, kind)?;
                continue;
            }
            let (ns, host, inner) = (self.namespace(i), self.veth(i, 'h'), self.veth(i, 'n'));
            run("ip", &["netns", "add", &ns])?;
            run("ip", &["link", "add", &host, "type", "veth", "peer", "name", &inner])?;
            run("ip", &["link", "set", &inner, "netns", &ns])?;
            run("ip", &["link", "set", &host, "master", &main, "up"])?;
            let addr = format!("{}/24", self.addr(i));
            run_in(&ns, &["ip", "addr", "add", &addr, "dev", &inner])?;
            run_in(&ns, &["ip", "link", "set", &inner, "up"])?;
            run_in(&ns, &["ip", "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    /// Node `i` behind its own router: bridge - router (WAN, NAT) - node.
    fn build_home(&self, i: u32, kind: NatKind) -> Result<()> {
        let (router, ns) = (self.router(i), self.namespace(i));
        let (host, wan, lan, inner) = (self.veth(i, 'h'), self.veth(i, 'w'), self.veth(i, 'l'), self.veth(i, 'n'));
        let in_router = |args: &[&str]| run_in(&router, args);
        run("ip", &["netns", "add", &router])?;
        run("ip", &["netns", "add", &ns])?;
        run("ip", &["link", "add", &host, "type", "veth", "peer", "name", &wan])?;
        run("ip", &["link", "set", &wan, "netns", &router])?;
        run("ip", &["link", "set", &host, "master", &self.bridge(0), "up"])?;
        run("ip", &["link", "add", &lan, "type", "veth", "peer", "name", &inner])?;
        run("ip", &["link", "set", &lan, "netns", &router])?;
        run("ip", &["link", "set", &inner, "netns", &ns])?;
        let public = self.public_addr(i);
        in_router(&["ip", "addr", "add", &format!("{public}/24"), "dev", &wan])?;
        in_router(&["ip", "addr", "add", &format!("{}/30", self.gateway(i)), "dev", &lan])?;
        for dev in [wan.as_str(), lan.as_str(), "lo"] {
            in_router(&["ip", "link", "set", dev, "up"])?;
        }
        in_router(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        let masquerade: &[&str] = match kind {
            NatKind::Symmetric => &["MASQUERADE", "--random-fully"],
            NatKind::FullCone | NatKind::PortRestricted => &["MASQUERADE"],
        };
        let mut rule = vec!["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", &wan, "-j"];
        rule.extend(masquerade);
        in_router(&rule)?;
        let node = self.addr(i);
        if kind == NatKind::FullCone {
            let to = ["-j", "DNAT", "--to-destination", &node];
            let mut dnat = vec!["iptables", "-t", "nat", "-A", "PREROUTING", "-i", &wan, "-d", &public];
            dnat.extend(to);
            in_router(&dnat)?;
        }
        // A home router's firewall: what nobody asked for is dropped, not
        // answered (a Linux router's own stack would reset unsolicited TCP,
        // which ends a hole punch that a real router lets wait), except
        // what the host (tests, `testnet status`) sends the node's API and
        // what the full cone forwards.
        let host = self.host_addr();
        let est = ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"];
        let forwarded = ["-m", "conntrack", "--ctstate", "DNAT", "-j", "ACCEPT"];
        for (chain, extra) in [("INPUT", &est[..]), ("FORWARD", &est[..]), ("FORWARD", &forwarded[..])] {
            let mut rule = vec!["iptables", "-A", chain, "-i", &wan];
            rule.extend(extra);
            in_router(&rule)?;
        }
        in_router(&["iptables", "-A", "FORWARD", "-i", &wan, "-s", &host, "-j", "ACCEPT"])?;
        for chain in ["INPUT", "FORWARD"] {
            in_router(&["iptables", "-A", chain, "-i", &wan, "-j", "DROP"])?;
        }
        let addr = format!("{node}/30");
        let in_node = |args: &[&str]| run_in(&ns, args);
        in_node(&["ip", "addr", "add", &addr, "dev", &inner])?;
        in_node(&["ip", "link", "set", &inner, "up"])?;
        in_node(&["ip", "link", "set", "lo", "up"])?;
        in_node(&["ip", "route", "add", "default", "via", &self.gateway(i)])?;
        // The host (tests, `testnet status`) reaches the node's API
        // through its router; no other namespace has this route.
        run("ip", &["route", "add", &format!("{}/30", self.lan_net(i)), "via", &public])?;
        Ok(())
    }

    /// Removes everything [`Netns::create`] made (what is already gone is
    /// skipped).
    pub fn destroy(&self) {
        for i in 0..self.nodes {
            if self.nat_of(i).is_some() {
                let _ = run("ip", &["netns", "del", &self.router(i)]);
            }
            let _ = run("ip", &["netns", "del", &self.namespace(i)]);
            let _ = run("ip", &["link", "del", &self.veth(i, 'h')]);
        }
        let _ = run("ip", &["link", "del", &self.bridge(0)]);
        let _ = run("ip", &["link", "del", &self.bridge(1)]);
    }

    /// Node `i`'s namespace.
    pub fn namespace(&self, i: u32) -> String {
        format!("mycel-{}-{i}", self.tag)
    }

    /// Node `i`'s address (behind NAT, its private one).
    pub fn addr(&self, i: u32) -> String {
        match self.nat_of(i) {
            Some(_) => format!("198.19.{}.{}", self.subnet, 4 * i + 2),
            _ => self.public_addr(i),
        }
    }

    /// The address node `i` is seen from on the bridge: its own, or its
    /// router's behind NAT.
    pub fn public_addr(&self, i: u32) -> String {
        format!("198.18.{}.{}", self.subnet, i + 1)
    }

    /// The NAT node `i` is behind, if any.
    pub fn nat_of(&self, i: u32) -> Option<NatKind> {
        match i {
            0 => None,
            _ => self.nat.get((i as usize - 1) % self.nat.len().max(1)).copied(),
        }
    }

    /// Home router `i`'s namespace.
    pub fn router(&self, i: u32) -> String {
        format!("mycel-{}-r{i}", self.tag)
    }

    fn lan_net(&self, i: u32) -> String {
        format!("198.19.{}.{}", self.subnet, 4 * i)
    }

    fn gateway(&self, i: u32) -> String {
        format!("198.19.{}.{}", self.subnet, 4 * i + 1)
    }

    /// The host's address on the main bridge (how tests reach the APIs).
    pub fn host_addr(&self) -> String {
        format!("198.18.{}.254", self.subnet)
    }

    fn bridge(&self, which: u8) -> String {
        format!("mb{}b{which}", self.tag)
    }

    fn veth(&self, i: u32, end: char) -> String {
        format!("mv{}{end}{i}", self.tag)
    }

    /// Cuts `nodes` off from the rest (they still reach each other).
    pub fn partition(&self, nodes: &[u32]) -> Result<()> {
        for i in nodes {
            run("ip", &["link", "set", &self.veth(*i, 'h'), "master", &self.bridge(1)])?;
        }
        Ok(())
    }

    /// Puts every node back on the main bridge.
    pub fn heal(&self) -> Result<()> {
        for i in 0..self.nodes {
            run("ip", &["link", "set", &self.veth(i, 'h'), "master", &self.bridge(0)])?;
        }
        Ok(())
    }

    /// Drops `percent` of the packets every node receives, at random
    /// (iptables' `statistic` match in each node's namespace); 0 removes
    /// the loss.
    pub fn loss(&self, percent: f32) -> Result<()> {
        if !(0.0..100.0).contains(&percent) {
            bail!("loss must be at least 0% and under 100%");
        }
        loss_available()?;
        for i in 0..self.nodes {
            let ns = self.namespace(i);
            run_in(&ns, &["iptables", "-F", "INPUT"])?;
            if percent > 0.0 {
                let p = format!("{:.4}", percent / 100.0);
                let rule = ["iptables", "-A", "INPUT", "-m", "statistic", "--mode", "random", "--probability", &p];
                run_in(&ns, &[&rule[..], &["-j", "DROP"]].concat())?;
            }
        }
        Ok(())
    }

    /// Adds `delay_ms` and `loss_percent` to every packet toward every node
    /// (needs the netem qdisc: see [`netem_available`]).
    pub fn netem(&self, delay_ms: u32, loss_percent: f32) -> Result<()> {
        if !netem_available() {
            bail!("this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM): latency cannot be added here");
        }
        for i in 0..self.nodes {
            let dev = self.veth(i, 'h');
            let (delay, loss) = (format!("{delay_ms}ms"), format!("{loss_percent}%"));
            run("tc", &["qdisc", "replace", "dev", &dev, "root", "netem", "delay", &delay, "loss", &loss])?;
        }
        Ok(())
    }
}
